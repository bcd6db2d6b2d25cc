/* Unicode helpers: UTF-8, code point flags, the GPT-2 byte map. */
#include "unicode.h"

uint16_t unicode_flags(uint32_t cp) {
    if (cp > UNICODE_MAX_CP)
        return UNICODE_CONTROL;
    size_t lo = 0, hi = unicode_n_ranges; /* find the last range with first <= cp */
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (unicode_ranges[mid].first <= cp)
            lo = mid;
        else
            hi = mid;
    }
    return unicode_ranges[lo].flags;
}

static bool is_cont(unsigned char c) {
    return (c & 0xC0) == 0x80;
}

uint32_t unicode_decode(const char *str, size_t len, size_t *adv) {
    const unsigned char *s = (const unsigned char *)str;
    unsigned char c = s[0];
    *adv = 1;
    if (!(c & 0x80))
        return c;
    if (!(c & 0x40))
        return UNICODE_REPLACEMENT;
    if (!(c & 0x20)) {
        if (len < 2 || !is_cont(s[1]))
            return UNICODE_REPLACEMENT;
        *adv = 2;
        return ((uint32_t)(c & 0x1F) << 6) | (s[1] & 0x3F);
    }
    if (!(c & 0x10)) {
        if (len < 3 || !is_cont(s[1]) || !is_cont(s[2]))
            return UNICODE_REPLACEMENT;
        *adv = 3;
        return ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
    }
    if (!(c & 0x08)) {
        if (len < 4 || !is_cont(s[1]) || !is_cont(s[2]) || !is_cont(s[3]))
            return UNICODE_REPLACEMENT;
        *adv = 4;
        return ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) |
               ((uint32_t)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
    }
    return UNICODE_REPLACEMENT;
}

size_t unicode_decode_all(const char *s, size_t len, uint32_t *cps) {
    size_t n = 0, off = 0;
    while (off < len) {
        size_t adv;
        cps[n++] = unicode_decode(s + off, len - off, &adv);
        off += adv;
    }
    return n;
}

size_t unicode_encode(uint32_t cp, char out[4]) {
    if (cp <= 0x7F) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp <= 0x7FF) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp <= 0xFFFF) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | ((cp >> 18) & 0x07));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* GPT-2: the printable bytes '!'..'~', 0xA1..0xAC, 0xAE..0xFF stand for themselves; the other
 * 68 bytes, in order, map to U+0100, U+0101, ... */
static bool byte_is_printable(unsigned b) {
    return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
}

uint32_t unicode_byte_to_cp(uint8_t b) {
    if (byte_is_printable(b))
        return b;
    uint32_t n = 0; /* non-printable bytes before b */
    for (unsigned i = 0; i < b; i++)
        n += !byte_is_printable(i);
    return 256 + n;
}

int unicode_cp_to_byte(uint32_t cp) {
    if (cp < 256)
        return byte_is_printable(cp) ? (int)cp : -1;
    if (cp >= 256 + 68)
        return -1;
    uint32_t n = cp - 256;
    for (unsigned i = 0; i < 256; i++) {
        if (!byte_is_printable(i) && n-- == 0)
            return (int)i;
    }
    return -1;
}

int unicode_utf8_check(const unsigned char *s, size_t len) {
    unsigned char c = s[0];
    if (c < 0x80)
        return 1;
    size_t need;
    unsigned char lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (c >= 0xC2 && c <= 0xDF)
        need = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        need = 3;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
    } else
        return -1; /* continuation byte, C0, C1, F5..FF */
    for (size_t i = 1; i < need; i++) {
        if (i >= len)
            return 0; /* a valid prefix so far */
        unsigned char l = i == 1 ? lo : 0x80, h = i == 1 ? hi : 0xBF;
        if (s[i] < l || s[i] > h)
            return -(int)i;
    }
    return (int)need;
}
