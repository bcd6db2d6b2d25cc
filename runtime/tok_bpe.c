/* Byte-level BPE ("gpt2"): the pre-tokenizers of llama.cpp as hand-written matchers over code
 * points, GPT-2 byte encoding, and rank-ordered merges with a heap. */
#include "tok_impl.h"
#include "unicode.h"

#include <string.h>

/* ---------------------------------------------------------------------------------------------
 * Pre-tokenizer splitting. Each step splits every piece further: a regex's matches and the
 * unmatched stretches between them all become pieces (llama.cpp's unicode_regex_split). The
 * gpt2 and llama3 patterns follow llama.cpp's custom matchers (an unmatched code point is a
 * piece of its own); the others follow std::regex search semantics. llama.cpp matches the
 * regexes without \p{..} against the code points with non-ASCII whitespace replaced by U+000B
 * (so U+3000 is \s and not in the class "　-。"): wmap() does the same.
 * ------------------------------------------------------------------------------------------- */

struct split {
    const uint32_t *cp;
    size_t *out;
    size_t n_out;
    size_t b, e; /* the piece being split */
    size_t prev; /* end of the last emitted piece */
};

static void add_to(struct split *s, size_t end) {
    if (end > s->prev)
        s->out[s->n_out++] = end - s->prev;
    s->prev = end;
}

/* flags at i, 0 outside the piece */
static uint16_t fl(const struct split *s, size_t i) {
    return (i >= s->b && i < s->e) ? unicode_flags(s->cp[i]) : 0;
}

static uint32_t cpt_at(const struct split *s, size_t i) {
    return (i >= s->b && i < s->e) ? s->cp[i] : 0xFFFFFFFFu;
}

static uint32_t wmap(uint32_t c) {
    return (c > 0x7F && unicode_is_space(c)) ? 0x0B : c;
}

#define F_WLN (UNICODE_WHITESPACE | UNICODE_LETTER | UNICODE_NUMBER)

/* 's|'t|'re|'ve|'m|'ll|'d at pos: its length or 0; ci = case-insensitive */
/* The last alternatives of the GPT-2 style patterns, \s+(?!\S) | \s+ | (any one character):
 * a run of nws whitespace characters at pos less its last one when something follows it, else
 * the whole run, else one character. Ends the piece there; returns the new position. */
static size_t ws_tail(struct split *s, size_t pos, size_t nws) {
    if (nws > 1 && pos + nws < s->e)
        pos += nws - 1;
    else if (nws > 0)
        pos += nws;
    else
        pos++;
    add_to(s, pos);
    return pos;
}

static size_t contraction(const struct split *s, size_t pos, bool ci) {
    if (s->cp[pos] != '\'' || pos + 1 >= s->e)
        return 0;
    uint32_t c1 = s->cp[pos + 1];
    if (ci)
        c1 = unicode_tolower_ascii(c1);
    if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd')
        return 2;
    if (pos + 2 < s->e) {
        uint32_t c2 = s->cp[pos + 2];
        if (ci)
            c2 = unicode_tolower_ascii(c2);
        if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l'))
            return 3;
    }
    return 0;
}

/* 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S) */
static void split_gpt2(struct split *s) {
    size_t pos = s->b;
    while (pos < s->e) {
        uint32_t c = s->cp[pos];
        uint16_t f = fl(s, pos);
        size_t k = contraction(s, pos, false);
        if (k) {
            pos += k;
            add_to(s, pos);
            continue;
        }
        uint16_t f2 = c == ' ' ? fl(s, pos + 1) : f;
        if (f2 & UNICODE_LETTER) {
            pos += c == ' ';
            while (fl(s, pos) & UNICODE_LETTER)
                pos++;
            add_to(s, pos);
            continue;
        }
        if (f2 & UNICODE_NUMBER) {
            pos += c == ' ';
            while (fl(s, pos) & UNICODE_NUMBER)
                pos++;
            add_to(s, pos);
            continue;
        }
        if (!(f2 & F_WLN) && f2) {
            pos += c == ' ';
            while (!(fl(s, pos) & F_WLN) && fl(s, pos))
                pos++;
            add_to(s, pos);
            continue;
        }
        size_t nws = 0;
        while (fl(s, pos + nws) & UNICODE_WHITESPACE)
            nws++;
        pos = ws_tail(s, pos, nws);
    }
}

/* llama3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
 *         ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
 * qwen2: the same with \p{N} (max_digits 1). */
static void split_llama3_like(struct split *s, size_t max_digits) {
    size_t pos = s->b;
    while (pos < s->e) {
        uint32_t c = s->cp[pos];
        uint16_t f = fl(s, pos);
        size_t k = contraction(s, pos, true);
        if (k) {
            pos += k;
            add_to(s, pos);
            continue;
        }
        if (!(c == '\r' || c == '\n' || (f & UNICODE_NUMBER))) {
            if ((f & UNICODE_LETTER) || (fl(s, pos + 1) & UNICODE_LETTER)) {
                pos++;
                while (fl(s, pos) & UNICODE_LETTER)
                    pos++;
                add_to(s, pos);
                continue;
            }
        }
        if (f & UNICODE_NUMBER) {
            size_t ini = pos;
            while (fl(s, pos) & UNICODE_NUMBER) {
                if (++pos - ini >= max_digits) {
                    add_to(s, pos);
                    ini = pos;
                }
            }
            add_to(s, pos);
            continue;
        }
        uint16_t f2 = c == ' ' ? fl(s, pos + 1) : f;
        if (!(f2 & F_WLN) && f) {
            pos += c == ' ';
            while (!(fl(s, pos) & F_WLN) && fl(s, pos))
                pos++;
            uint32_t c2 = cpt_at(s, pos);
            while (c2 == '\r' || c2 == '\n')
                c2 = cpt_at(s, ++pos);
            add_to(s, pos);
            continue;
        }
        size_t nws = 0, last_rn = 0;
        while (fl(s, pos + nws) & UNICODE_WHITESPACE) {
            uint32_t c2 = s->cp[pos + nws];
            if (c2 == '\r' || c2 == '\n')
                last_rn = pos + nws + 1;
            nws++;
        }
        if (last_rn > 0) { /* \s*[\r\n]+ */
            pos = last_rn;
            add_to(s, pos);
            continue;
        }
        pos = ws_tail(s, pos, nws);
    }
}

static void split_llama3(struct split *s) {
    split_llama3_like(s, 3);
}

static void split_qwen2(struct split *s) {
    split_llama3_like(s, 1);
}

/* CLASS+ : runs of the class and the stretches between them */
static void split_runs(struct split *s, bool (*cls)(uint32_t)) {
    size_t pos = s->b;
    while (pos < s->e) {
        bool in = cls(s->cp[pos]);
        while (pos < s->e && cls(s->cp[pos]) == in)
            pos++;
        add_to(s, pos);
    }
}

/* CLASS (one code point per match) */
static void split_singles(struct split *s, bool (*cls)(uint32_t)) {
    for (size_t pos = s->b; pos < s->e; pos++) {
        if (cls(s->cp[pos])) {
            add_to(s, pos);
            add_to(s, pos + 1);
        }
    }
    add_to(s, s->e);
}

/* \s?CLASS+ */
static void split_space_runs(struct split *s, bool (*cls)(uint32_t)) {
    size_t pos = s->b;
    while (pos < s->e) {
        size_t start = pos;
        if (unicode_is_space(s->cp[pos]) && pos + 1 < s->e && cls(s->cp[pos + 1]))
            pos++;
        else if (!cls(s->cp[pos])) {
            pos++;
            continue;
        }
        while (pos < s->e && cls(s->cp[pos]))
            pos++;
        add_to(s, start);
        add_to(s, pos);
    }
    add_to(s, s->e);
}

static bool is_ascii_digit(uint32_t c) {
    return c >= '0' && c <= '9';
}

/* [0-9][0-9][0-9] */
static void split_digits3(struct split *s) {
    size_t pos = s->b;
    while (pos < s->e) {
        if (pos + 3 <= s->e && is_ascii_digit(s->cp[pos]) && is_ascii_digit(s->cp[pos + 1]) &&
            is_ascii_digit(s->cp[pos + 2])) {
            add_to(s, pos);
            add_to(s, pos + 3);
            pos += 3;
        } else
            pos++;
    }
    add_to(s, s->e);
}

/* \s+$ */
static void split_trailing_space(struct split *s) {
    size_t t = s->e;
    while (t > s->b && unicode_is_space(s->cp[t - 1]))
        t--;
    add_to(s, t);
    add_to(s, s->e);
}

static bool cls_default_punct(uint32_t c) { /* [\p{P}\$\+<=>\^~\|] */
    return unicode_is_punct(c) || (c < 0x80 && c && strchr("$+<=>^~|", (int)c));
}
static bool cls_falcon_punct(uint32_t c) { /* [\p{P}\$\+<=>\^~\|`] */
    return unicode_is_punct(c) || (c < 0x80 && c && strchr("$+<=>^~|`", (int)c));
}
static bool cls_number(uint32_t c) {
    return unicode_is_number(c);
}
static bool cls_letter(uint32_t c) {
    return unicode_is_letter(c);
}
static bool cls_punct(uint32_t c) {
    return unicode_is_punct(c);
}
static bool cls_crlf(uint32_t c) {
    return c == '\r' || c == '\n';
}

struct cp_range {
    uint32_t lo, hi;
};

static bool in_ranges(const struct cp_range *r, size_t n, uint32_t c) {
    for (size_t i = 0; i < n; i++) {
        if (c >= r[i].lo && c <= r[i].hi)
            return true;
    }
    return false;
}

/* deepseek-llm's letter class [A-Za-zµÀ-ÖØ-öø-ƺ...𞤀-𞥃] */
static const struct cp_range ds_letters[] = {
    {0x41, 0x5A},       {0x61, 0x7A},       {0xB5, 0xB5},       {0xC0, 0xD6},
    {0xD8, 0xF6},       {0xF8, 0x1BA},      {0x1BC, 0x1BF},     {0x1C4, 0x293},
    {0x295, 0x2AF},     {0x370, 0x373},     {0x376, 0x377},     {0x37B, 0x37D},
    {0x37F, 0x37F},     {0x386, 0x386},     {0x388, 0x38A},     {0x38C, 0x38C},
    {0x38E, 0x3A1},     {0x3A3, 0x3F5},     {0x3F7, 0x481},     {0x48A, 0x52F},
    {0x531, 0x556},     {0x10A0, 0x10C5},   {0x13A0, 0x13F5},   {0x13F8, 0x13FD},
    {0x1C90, 0x1CBA},   {0x1CBD, 0x1CBF},   {0x1D00, 0x1D2B},   {0x1D6B, 0x1D77},
    {0x1D79, 0x1D9A},   {0x1E00, 0x1F15},   {0x1F18, 0x1F1D},   {0x1F20, 0x1F45},
    {0x1F48, 0x1F4D},   {0x1F50, 0x1F57},   {0x1F59, 0x1F59},   {0x1F5B, 0x1F5B},
    {0x1F5D, 0x1F5D},   {0x1F5F, 0x1F7D},   {0x1F80, 0x1FB4},   {0x1FB6, 0x1FBC},
    {0x1FBE, 0x1FBE},   {0x1FC2, 0x1FC4},   {0x1FC6, 0x1FCC},   {0x1FD0, 0x1FD3},
    {0x1FD6, 0x1FDB},   {0x1FE0, 0x1FEC},   {0x1FF2, 0x1FF4},   {0x1FF6, 0x1FFC},
    {0x2102, 0x2102},   {0x2107, 0x2107},   {0x210A, 0x2113},   {0x2115, 0x2115},
    {0x2119, 0x211D},   {0x2124, 0x2124},   {0x2126, 0x2126},   {0x2128, 0x2128},
    {0x212A, 0x212D},   {0x212F, 0x2134},   {0x2139, 0x2139},   {0x213C, 0x213F},
    {0x2145, 0x2149},   {0x214E, 0x214E},   {0x2183, 0x2184},   {0x2C00, 0x2C7B},
    {0x2C7E, 0x2CE4},   {0x2CEB, 0x2CEE},   {0x2CF2, 0x2CF3},   {0xA640, 0xA66D},
    {0xA680, 0xA69B},   {0xA722, 0xA76F},   {0xA771, 0xA787},   {0xA78B, 0xA78E},
    {0xAB70, 0xABBF},   {0xFB00, 0xFB06},   {0xFB13, 0xFB17},   {0xFF21, 0xFF3A},
    {0xFF41, 0xFF5A},   {0x10400, 0x1044F}, {0x104B0, 0x104D3}, {0x104D8, 0x104FB},
    {0x10C80, 0x10CB2}, {0x10CC0, 0x10CF2}, {0x118A0, 0x118DF}, {0x1E900, 0x1E943},
};

/* deepseek-llm's punctuation class [!-/:-~！-／：-～‘-‟　-。] */
static const struct cp_range ds_punct[] = {
    {0x21, 0x2F},     {0x3A, 0x7E},     {0xFF01, 0xFF0F},
    {0xFF1A, 0xFF5E}, {0x2018, 0x201F}, {0x3000, 0x3002},
};

/* deepseek's CJK class [一-龥ࠀ-一가-퟿] */
static const struct cp_range ds_cjk[] = {
    {0x4E00, 0x9FA5},
    {0x0800, 0x4E00},
    {0xAC00, 0xD7FF},
};

static bool cls_ds_letter(uint32_t c) {
    return in_ranges(ds_letters, MR_ARRAY_LEN(ds_letters), wmap(c));
}
static bool cls_ds_punct(uint32_t c) {
    return in_ranges(ds_punct, MR_ARRAY_LEN(ds_punct), wmap(c));
}
static bool cls_ds_cjk(uint32_t c) {
    return in_ranges(ds_cjk, MR_ARRAY_LEN(ds_cjk), wmap(c));
}

enum step {
    ST_GPT2,
    ST_LLAMA3,
    ST_QWEN2,
    ST_DEFAULT_PUNCT_RUNS,
    ST_FALCON_PUNCT_RUNS,
    ST_NUMBER_RUNS,
    ST_NUMBER_SINGLE,
    ST_DIGITS3,
    ST_CRLF_SINGLE,
    ST_DS_LETTERS,
    ST_DS_PUNCT,
    ST_TRAILING_SPACE,
    ST_DS_CJK_RUNS,
    ST_SPACE_LETTERS,
    ST_SPACE_PUNCT,
    ST_END
};

static const enum step pre_steps[][7] = {
    [TOK_PRE_DEFAULT] = {ST_DEFAULT_PUNCT_RUNS, ST_GPT2, ST_NUMBER_RUNS, ST_DIGITS3, ST_END},
    [TOK_PRE_GPT2] = {ST_GPT2, ST_END},
    [TOK_PRE_LLAMA3] = {ST_LLAMA3, ST_END},
    [TOK_PRE_QWEN2] = {ST_QWEN2, ST_END},
    [TOK_PRE_DEEPSEEK_LLM] = {ST_CRLF_SINGLE, ST_DS_LETTERS, ST_DS_PUNCT, ST_TRAILING_SPACE,
                              ST_DS_CJK_RUNS, ST_NUMBER_RUNS, ST_END},
    [TOK_PRE_DEEPSEEK_CODER] = {ST_CRLF_SINGLE, ST_SPACE_LETTERS, ST_SPACE_PUNCT, ST_DS_CJK_RUNS,
                                ST_NUMBER_SINGLE, ST_END},
    [TOK_PRE_FALCON] = {ST_FALCON_PUNCT_RUNS, ST_GPT2, ST_DIGITS3, ST_END},
    [TOK_PRE_STARCODER] = {ST_NUMBER_SINGLE, ST_GPT2, ST_END},
};

static void run_step(enum step st, struct split *s) {
    switch (st) {
    case ST_GPT2:
        split_gpt2(s);
        break;
    case ST_LLAMA3:
        split_llama3(s);
        break;
    case ST_QWEN2:
        split_qwen2(s);
        break;
    case ST_DEFAULT_PUNCT_RUNS:
        split_runs(s, cls_default_punct);
        break;
    case ST_FALCON_PUNCT_RUNS:
        split_runs(s, cls_falcon_punct);
        break;
    case ST_NUMBER_RUNS:
        split_runs(s, cls_number);
        break;
    case ST_NUMBER_SINGLE:
        split_singles(s, cls_number);
        break;
    case ST_DIGITS3:
        split_digits3(s);
        break;
    case ST_CRLF_SINGLE:
        split_singles(s, cls_crlf);
        break;
    case ST_DS_LETTERS:
        split_space_runs(s, cls_ds_letter);
        break;
    case ST_DS_PUNCT:
        split_space_runs(s, cls_ds_punct);
        break;
    case ST_TRAILING_SPACE:
        split_trailing_space(s);
        break;
    case ST_DS_CJK_RUNS:
        split_runs(s, cls_ds_cjk);
        break;
    case ST_SPACE_LETTERS:
        split_space_runs(s, cls_letter);
        break;
    case ST_SPACE_PUNCT:
        split_space_runs(s, cls_punct);
        break;
    case ST_END:
        break;
    }
}

size_t tok_pre_split(enum tok_pre pre, const uint32_t *cps, size_t n, size_t *lens, size_t *tmp) {
    if (n == 0)
        return 0;
    size_t n_pieces = 1;
    lens[0] = n;
    size_t *cur = lens, *next = tmp;
    for (const enum step *st = pre_steps[pre]; *st != ST_END; st++) {
        struct split s = {.cp = cps, .out = next, .n_out = 0};
        size_t b = 0;
        for (size_t i = 0; i < n_pieces; i++) {
            s.b = s.prev = b;
            s.e = b + cur[i];
            run_step(*st, &s);
            b = s.e;
        }
        n_pieces = s.n_out;
        size_t *t = cur;
        cur = next;
        next = t;
    }
    if (cur != lens)
        memcpy(lens, cur, n_pieces * sizeof(*lens));
    return n_pieces;
}

int tok_pre_from_name(const char *name, enum tok_pre *pre, bool *ignore_merges, bool *add_bos,
                      bool *no_bos) {
    static const struct {
        const char *name;
        enum tok_pre pre;
        bool llama3;
    } names[] = {
        {"default", TOK_PRE_DEFAULT, false},
        {"llama3", TOK_PRE_LLAMA3, true},
        {"llama-v3", TOK_PRE_LLAMA3, true},
        {"llama-bpe", TOK_PRE_LLAMA3, true},
        {"falcon3", TOK_PRE_LLAMA3, true},
        {"dbrx", TOK_PRE_LLAMA3, false},
        {"smaug-bpe", TOK_PRE_LLAMA3, false},
        {"chatglm-bpe", TOK_PRE_LLAMA3, false},
        {"deepseek-llm", TOK_PRE_DEEPSEEK_LLM, false},
        {"deepseek-coder", TOK_PRE_DEEPSEEK_CODER, false},
        {"falcon", TOK_PRE_FALCON, false},
        {"mpt", TOK_PRE_GPT2, false},
        {"olmo", TOK_PRE_GPT2, false},
        {"jais", TOK_PRE_GPT2, false},
        {"gpt-2", TOK_PRE_GPT2, false},
        {"phi-2", TOK_PRE_GPT2, false},
        {"jina-es", TOK_PRE_GPT2, false},
        {"jina-de", TOK_PRE_GPT2, false},
        {"gigachat", TOK_PRE_GPT2, false},
        {"jina-v1-en", TOK_PRE_GPT2, false},
        {"jina-v2-es", TOK_PRE_GPT2, false},
        {"jina-v2-de", TOK_PRE_GPT2, false},
        {"jina-v2-code", TOK_PRE_GPT2, false},
        {"roberta-bpe", TOK_PRE_GPT2, false},
        {"starcoder", TOK_PRE_STARCODER, false},
        {"refact", TOK_PRE_STARCODER, false},
        {"command-r", TOK_PRE_STARCODER, false},
        {"smollm", TOK_PRE_STARCODER, false},
        {"codeshell", TOK_PRE_STARCODER, false},
        {"exaone", TOK_PRE_STARCODER, false},
        {"minerva-7b", TOK_PRE_STARCODER, false},
        {"qwen2", TOK_PRE_QWEN2, false},
        {"deepseek-r1-qwen", TOK_PRE_QWEN2, false},
        {"megrez", TOK_PRE_QWEN2, false},
        {"stablelm2", TOK_PRE_QWEN2, false},
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(names); i++) {
        if (strcmp(name, names[i].name) == 0) {
            *pre = names[i].pre;
            *ignore_merges = names[i].llama3;
            *add_bos = names[i].llama3;
            *no_bos = strcmp(name, "chatglm-bpe") == 0;
            return MOERUN_OK;
        }
    }
    return mr_err(MOERUN_ERR_UNSUPPORTED, "tokenizer: unknown pre-tokenizer '%s'", name);
}

/* ---------------------------------------------------------------------------------------------
 * BPE merges over one byte-encoded word.
 * ------------------------------------------------------------------------------------------- */

struct bpe_work {
    const struct mr_vocab *v;
    const char *enc;
    struct tok_sym *sym;
    struct tok_bigram *heap;
    size_t n_heap;
};

static void add_bigram(struct bpe_work *w, int32_t left, int32_t right) {
    if (left < 0 || right < 0)
        return;
    const struct tok_sym *l = &w->sym[left], *r = &w->sym[right];
    int32_t rank = vocab_merge_rank(w->v, w->enc + l->start, l->n, w->enc + r->start, r->n);
    if (rank < 0)
        return;
    struct tok_bigram b = {-(double)rank, left, right, l->n + r->n}; /* lowest rank first */
    tok_heap_push(w->heap, &w->n_heap, b);
}

static int bpe_word(struct bpe_work *w, uint32_t start, uint32_t nbytes, struct tok_out *out) {
    const struct mr_vocab *v = w->v;
    const char *word = w->enc + start;
    if (v->ignore_merges) {
        int32_t id = vocab_find(v, word, nbytes);
        if (id >= 0)
            return tok_out_push(out, id);
    }
    int32_t n_sym = 0;
    for (uint32_t off = 0; off < nbytes;) {
        uint32_t clen = (uint32_t)unicode_len_utf8((unsigned char)word[off]);
        if (clen > nbytes - off)
            clen = nbytes - off;
        struct tok_sym *s = &w->sym[n_sym];
        s->start = start + off;
        s->n = clen;
        s->prev = n_sym - 1;
        off += clen;
        s->next = off == nbytes ? -1 : n_sym + 1;
        n_sym++;
    }
    w->n_heap = 0;
    for (int32_t i = 1; i < n_sym; i++)
        add_bigram(w, i - 1, i);
    while (w->n_heap > 0) {
        struct tok_bigram b = tok_heap_pop(w->heap, &w->n_heap);
        struct tok_sym *l = &w->sym[b.left], *r = &w->sym[b.right];
        if (l->n == 0 || r->n == 0 || l->n + r->n != b.size)
            continue; /* outdated */
        l->n += r->n;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0)
            w->sym[r->next].prev = b.left;
        add_bigram(w, l->prev, b.left);
        add_bigram(w, b.left, l->next);
    }
    for (int32_t i = 0; i != -1 && n_sym > 0; i = w->sym[i].next) {
        const struct tok_sym *s = &w->sym[i];
        if (s->n == 0)
            continue;
        int32_t id = vocab_find(v, w->enc + s->start, s->n);
        int rc = MOERUN_OK;
        if (id >= 0) {
            rc = tok_out_push(out, id);
        } else { /* llama.cpp: each byte of the symbol's text, where that is a token */
            for (uint32_t j = 0; j < s->n && rc == MOERUN_OK; j++) {
                int32_t bid = vocab_find(v, w->enc + s->start + j, 1);
                if (bid >= 0)
                    rc = tok_out_push(out, bid);
            }
        }
        if (rc != MOERUN_OK)
            return rc;
    }
    return MOERUN_OK;
}

int tok_bpe_encode(const struct mr_vocab *v, const char *text, size_t len, struct tok_out *out) {
    if (len == 0)
        return MOERUN_OK;
    if (len > (UINT32_MAX / 8))
        return mr_err(MOERUN_ERR_RANGE, "tokenizer: text of %zu bytes is too long", len);
    const moerun_allocator *a = v->a;
    int rc = MOERUN_ERR_NOMEM;
    uint32_t *cps = mr_alloc(a, len * sizeof(*cps), 0);
    size_t *lens = mr_alloc(a, len * sizeof(*lens), 0);
    size_t *tmp = mr_alloc(a, len * sizeof(*tmp), 0);
    char *enc = NULL;
    struct tok_sym *sym = NULL;
    struct tok_bigram *heap = NULL;
    if (!cps || !lens || !tmp)
        goto out_free;
    size_t n = unicode_decode_all(text, len, cps);
    size_t n_pieces = tok_pre_split(v->pre, cps, n, lens, tmp);

    /* byte-level encoding: every byte of each code point's UTF-8 becomes one character */
    size_t enc_size = 0, max_word = 0, ci = 0;
    for (size_t p = 0; p < n_pieces; p++) {
        size_t word = 0;
        for (size_t k = 0; k < lens[p]; k++, ci++) {
            char u[4];
            size_t ul = unicode_encode(cps[ci], u);
            for (size_t j = 0; j < ul; j++)
                word += unicode_byte_to_cp((uint8_t)u[j]) < 0x80 ? 1 : 2;
        }
        enc_size += word;
        max_word = MR_MAX(max_word, word);
    }
    enc = mr_alloc(a, enc_size, 0);
    sym = mr_alloc(a, max_word * sizeof(*sym), 0);
    heap = mr_alloc(a, 3 * max_word * sizeof(*heap), 0);
    if (!enc || !sym || !heap)
        goto out_free;
    struct bpe_work w = {.v = v, .enc = enc, .sym = sym, .heap = heap};
    size_t eo = 0;
    ci = 0;
    rc = MOERUN_OK;
    for (size_t p = 0; p < n_pieces && rc == MOERUN_OK; p++) {
        size_t start = eo;
        for (size_t k = 0; k < lens[p]; k++, ci++) {
            char u[4];
            size_t ul = unicode_encode(cps[ci], u);
            for (size_t j = 0; j < ul; j++)
                eo += unicode_encode(unicode_byte_to_cp((uint8_t)u[j]), enc + eo);
        }
        rc = bpe_word(&w, (uint32_t)start, (uint32_t)(eo - start), out);
    }
    if (rc == MOERUN_ERR_NOMEM)
        mr_err(rc, "tokenizer: out of memory");
    mr_free(a, heap);
    mr_free(a, sym);
    mr_free(a, enc);
    mr_free(a, tmp);
    mr_free(a, lens);
    mr_free(a, cps);
    return rc;
out_free:
    mr_free(a, heap);
    mr_free(a, sym);
    mr_free(a, enc);
    mr_free(a, tmp);
    mr_free(a, lens);
    mr_free(a, cps);
    return mr_err(MOERUN_ERR_NOMEM, "tokenizer: out of memory for %zu bytes of text", len);
}
