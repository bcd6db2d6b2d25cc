/* Unicode helpers for the tokenizer (internal): UTF-8 decoding as llama.cpp does it, code point
 * classes (the generated tables in unicode_data.c), and GPT-2's byte <-> unicode map. */
#ifndef MOERUN_UNICODE_H
#define MOERUN_UNICODE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Code point flags: one general-category class plus the whitespace bit (Unicode White_Space).
 * Unassigned code points are UNICODE_CONTROL (\p{C}), as in llama.cpp's tables. */
#define UNICODE_NUMBER     0x0002 /* \p{N} */
#define UNICODE_LETTER     0x0004 /* \p{L} */
#define UNICODE_SEPARATOR  0x0008 /* \p{Z} */
#define UNICODE_MARK       0x0010 /* \p{M} */
#define UNICODE_PUNCT      0x0020 /* \p{P} */
#define UNICODE_SYMBOL     0x0040 /* \p{S} */
#define UNICODE_CONTROL    0x0080 /* \p{C} */
#define UNICODE_WHITESPACE 0x0100 /* \s */

#define UNICODE_MAX_CP      0x10FFFFu
#define UNICODE_REPLACEMENT 0xFFFDu

struct unicode_range {
    uint32_t first; /* first code point of the range */
    uint16_t flags;
};
extern const struct unicode_range unicode_ranges[]; /* sorted by first; [0].first == 0 */
extern const size_t unicode_n_ranges;

/* Flags of a code point; code points above U+10FFFF are UNICODE_CONTROL. */
uint16_t unicode_flags(uint32_t cp);

static inline bool unicode_is_letter(uint32_t cp) {
    return unicode_flags(cp) & UNICODE_LETTER;
}
static inline bool unicode_is_number(uint32_t cp) {
    return unicode_flags(cp) & UNICODE_NUMBER;
}
static inline bool unicode_is_punct(uint32_t cp) {
    return unicode_flags(cp) & UNICODE_PUNCT;
}
static inline bool unicode_is_space(uint32_t cp) {
    return unicode_flags(cp) & UNICODE_WHITESPACE;
}

/* Bytes of the UTF-8 sequence that starts with byte c, from its high nibble alone (llama.cpp's
 * unicode_len_utf8: continuation bytes count 1). */
static inline size_t unicode_len_utf8(unsigned char c) {
    static const unsigned char lookup[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    return lookup[c >> 4];
}

/* Decode one code point from s[0..len) (len >= 1) the way llama.cpp does: the lead byte's
 * length, continuation bytes checked, no overlong/surrogate checks; an invalid sequence gives
 * U+FFFD and consumes one byte. *adv gets the bytes consumed. */
uint32_t unicode_decode(const char *s, size_t len, size_t *adv);

/* Decode all of s into cps (room for len entries); returns the count. */
size_t unicode_decode_all(const char *s, size_t len, uint32_t *cps);

/* Encode cp (<= U+10FFFF) as UTF-8 into out; returns the byte count (1..4). */
size_t unicode_encode(uint32_t cp, char out[4]);

/* ASCII lower case (the contractions of the pre-tokenizers only need ASCII). */
static inline uint32_t unicode_tolower_ascii(uint32_t cp) {
    return (cp >= 'A' && cp <= 'Z') ? cp + 32 : cp;
}

/* GPT-2 bytes_to_unicode: the code point that stands for byte b. */
uint32_t unicode_byte_to_cp(uint8_t b);
/* The byte a code point stands for, or -1 when cp is not one of the 256. */
int unicode_cp_to_byte(uint32_t cp);

/* Length of the complete, well-formed UTF-8 sequence at s[0..len) (1..4); 0 when s holds a
 * proper prefix of a well-formed sequence that more bytes could complete; -n when the first n
 * bytes (n >= 1, the maximal ill-formed subpart) cannot start a well-formed sequence. */
int unicode_utf8_check(const unsigned char *s, size_t len);

#endif /* MOERUN_UNICODE_H */
