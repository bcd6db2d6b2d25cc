/* Tokenizer: llama.cpp's test vectors, the golden prompts, pre-tokenizer piece boundaries,
 * a tiny byte-level BPE vocabulary built here, the UTF-8 streaming detokenizer, hostile
 * metadata, the Unicode tables and long inputs. */
#include "testutil.h"

#include "gguf.h"
#include "model.h"
#include "moerun.h"
#include "tok_impl.h"
#include "unicode.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static struct tu_rng rng;

/* ---------------------------------------------------------------------------------------------
 * helpers
 * ------------------------------------------------------------------------------------------- */

/* a model object around a vocabulary (the public functions only need model->vocab) */
static void wrap(moerun_model *m, struct mr_vocab *v) {
    memset(m, 0, sizeof(*m));
    m->vocab = v;
}

static size_t tokenize(const moerun_model *m, const char *s, size_t len, int add_special,
                       int parse_special, int32_t **ids) {
    size_t n = 0;
    int rc = moerun_tokenize(m, s, len, add_special, parse_special, NULL, 0, &n);
    assert_true(rc == MOERUN_OK || rc == MOERUN_ERR_RANGE);
    *ids = malloc((n ? n : 1) * sizeof(**ids));
    size_t n2 = 0;
    assert_int_equal(moerun_tokenize(m, s, len, add_special, parse_special, *ids, n, &n2),
                     MOERUN_OK);
    assert_int_equal(n, n2);
    return n;
}

/* concatenated pieces into a malloc'd buffer */
static char *detokenize(const moerun_model *m, const int32_t *ids, size_t n, size_t *len) {
    size_t cap = 64, o = 0;
    char *buf = malloc(cap);
    for (size_t i = 0; i < n; i++) {
        int k = moerun_token_to_piece(m, ids[i], 0, NULL, 0);
        assert_true(k >= 0);
        while (o + (size_t)k > cap)
            buf = realloc(buf, cap *= 2);
        assert_int_equal(moerun_token_to_piece(m, ids[i], 0, buf + o, (size_t)k), k);
        o += (size_t)k;
    }
    *len = o;
    return buf;
}

/* ---------------------------------------------------------------------------------------------
 * Unicode tables
 * ------------------------------------------------------------------------------------------- */

static void test_unicode_tables(void **state) {
    (void)state;
    const uint32_t letters[] = {'a',
                                'Z',
                                0xE9,
                                0x416 /* Ж */,
                                0x5D0 /* א */,
                                0x4E16 /* 世 */,
                                0xAC00 /* 가 */,
                                0x1780 /* ក */,
                                0x10400};
    for (size_t i = 0; i < MR_ARRAY_LEN(letters); i++) {
        assert_true(unicode_is_letter(letters[i]));
        assert_false(unicode_is_number(letters[i]) || unicode_is_space(letters[i]));
    }
    const uint32_t numbers[] = {'0', '9', 0x661 /* Arabic-Indic 1 */, 0xBD /* ½ */, 0x2167, 0xFF15};
    for (size_t i = 0; i < MR_ARRAY_LEN(numbers); i++)
        assert_true(unicode_is_number(numbers[i]));
    const uint32_t puncts[] = {'!', ',', '.', '\'', '(', '_', 0x3002, 0x2014, 0xFF01, 0xBF};
    for (size_t i = 0; i < MR_ARRAY_LEN(puncts); i++)
        assert_true(unicode_is_punct(puncts[i]));
    const uint32_t nonpunct[] = {'$', '+', '<', '^', '`', '|', '~', 'a', '1'};
    for (size_t i = 0; i < MR_ARRAY_LEN(nonpunct); i++)
        assert_false(unicode_is_punct(nonpunct[i]));
    const uint32_t spaces[] = {' ',    '\t',   '\n',   '\r',   0x0B,   0x0C,   0x85,   0xA0,
                               0x1680, 0x2000, 0x200A, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000};
    for (size_t i = 0; i < MR_ARRAY_LEN(spaces); i++)
        assert_true(unicode_is_space(spaces[i]));
    const uint32_t nonspace[] = {'a', 0x1C, 0x200B, 0x180E, 0xFEFF, 0};
    for (size_t i = 0; i < MR_ARRAY_LEN(nonspace); i++)
        assert_false(unicode_is_space(nonspace[i]));
    assert_true(unicode_flags(0x300) & UNICODE_MARK);
    assert_true(unicode_flags('$') & UNICODE_SYMBOL);
    assert_true(unicode_flags(0x378) & UNICODE_CONTROL); /* unassigned */
    assert_true(unicode_flags(0x110000) & UNICODE_CONTROL);
    /* the table is sorted and starts at 0 */
    assert_int_equal(unicode_ranges[0].first, 0);
    for (size_t i = 1; i < unicode_n_ranges; i++)
        assert_true(unicode_ranges[i].first > unicode_ranges[i - 1].first);

    /* the GPT-2 byte map is a bijection onto 256 code points below U+0144 */
    int seen[0x144] = {0};
    for (int b = 0; b < 256; b++) {
        uint32_t cp = unicode_byte_to_cp((uint8_t)b);
        assert_true(cp < 0x144);
        assert_int_equal(seen[cp]++, 0);
        assert_int_equal(unicode_cp_to_byte(cp), b);
    }
    assert_int_equal(unicode_byte_to_cp(' '), 0x120);  /* Ġ */
    assert_int_equal(unicode_byte_to_cp('\n'), 0x10A); /* Ċ */
    assert_int_equal(unicode_cp_to_byte(0x144), -1);

    /* decoding as llama.cpp: invalid bytes are U+FFFD one at a time */
    uint32_t cps[8];
    assert_int_equal(unicode_decode_all("a\xC3\xA9\xFF\xE4\xB8", 6, cps), 5); /* E4 B8 cut */
    assert_int_equal(cps[0], 'a');
    assert_int_equal(cps[1], 0xE9);
    assert_int_equal(cps[2], 0xFFFD);
    assert_int_equal(cps[3], 0xFFFD);
    /* round trip of random code points */
    for (int i = 0; i < 1000; i++) {
        uint32_t cp = (uint32_t)(tu_rng_u64(&rng) % 0x110000);
        char u[4];
        size_t n = unicode_encode(cp, u), adv;
        assert_int_equal(unicode_decode(u, n, &adv), cp);
        assert_int_equal(adv, n);
    }
}

/* ---------------------------------------------------------------------------------------------
 * Pre-tokenizer piece boundaries
 * ------------------------------------------------------------------------------------------- */

/* split text with pre and compare with the expected pieces (NULL-terminated) */
static void check_split(enum tok_pre pre, const char *text, const char *const *expect) {
    size_t len = strlen(text);
    uint32_t *cps = malloc((len + 1) * sizeof(*cps));
    size_t *lens = malloc((len + 1) * sizeof(*lens)), *tmp = malloc((len + 1) * sizeof(*tmp));
    size_t n = unicode_decode_all(text, len, cps);
    size_t np = tok_pre_split(pre, cps, n, lens, tmp);
    size_t ne = 0;
    while (expect[ne])
        ne++;
    size_t c = 0, bo = 0;
    int ok = np == ne;
    for (size_t i = 0; i < np && ok; i++) {
        size_t bytes = 0;
        for (size_t k = 0; k < lens[i]; k++) {
            char u[4];
            bytes += unicode_encode(cps[c + k], u);
        }
        ok = strlen(expect[i]) == bytes && memcmp(expect[i], text + bo, bytes) == 0;
        c += lens[i];
        bo += bytes;
    }
    if (!ok) {
        fprintf(stderr, "pre %d, text '%s': got %zu pieces:", (int)pre, text, np);
        c = 0;
        for (size_t i = 0; i < np; i++) {
            fprintf(stderr, " [");
            for (size_t k = 0; k < lens[i]; k++) {
                char u[4];
                size_t ul = unicode_encode(cps[c + k], u);
                fprintf(stderr, "%.*s", (int)ul, u);
            }
            fprintf(stderr, "]");
            c += lens[i];
        }
        fprintf(stderr, "\n");
    }
    free(cps);
    free(lens);
    free(tmp);
    assert_true(ok);
}

#define SPLIT(pre, text, ...)                                                                      \
    do {                                                                                           \
        const char *const e_[] = {__VA_ARGS__, NULL};                                              \
        check_split(pre, text, e_);                                                                \
    } while (0)

static void test_pre_split(void **state) {
    (void)state;
    /* gpt-2 (also mpt, olmo): case-sensitive contractions, \s+(?!\S) */
    SPLIT(TOK_PRE_GPT2, "Hello world", "Hello", " world");
    SPLIT(TOK_PRE_GPT2, "don't I'M", "don", "'t", " I", "'", "M");
    SPLIT(TOK_PRE_GPT2, "123 4567", "123", " 4567");
    SPLIT(TOK_PRE_GPT2, "a   b", "a", "  ", " b");
    SPLIT(TOK_PRE_GPT2, "a  ", "a", "  ");
    SPLIT(TOK_PRE_GPT2, "x\n\ny", "x", "\n", "\n", "y");
    SPLIT(TOK_PRE_GPT2, " ?!x", " ?!", "x");
    /* llama3: case-insensitive contractions, digits in threes, newlines */
    SPLIT(TOK_PRE_LLAMA3, "I'M here", "I", "'M", " here");
    SPLIT(TOK_PRE_LLAMA3, "we'LL", "we", "'LL");
    SPLIT(TOK_PRE_LLAMA3, "12345678", "123", "456", "78");
    SPLIT(TOK_PRE_LLAMA3, "a  \n\nb", "a", "  \n\n", "b");
    SPLIT(TOK_PRE_LLAMA3, "x   y", "x", "  ", " y");
    SPLIT(TOK_PRE_LLAMA3, "x  ", "x", "  ");
    SPLIT(TOK_PRE_LLAMA3, "!!!\n\nabc", "!!!\n\n", "abc");
    SPLIT(TOK_PRE_LLAMA3, "(hi", "(hi");
    SPLIT(TOK_PRE_LLAMA3, "\xE4\xB8\x96\xE7\x95\x8C 42", "\xE4\xB8\x96\xE7\x95\x8C", " ", "42");
    /* qwen2: single digits */
    SPLIT(TOK_PRE_QWEN2, "12345", "1", "2", "3", "4", "5");
    SPLIT(TOK_PRE_QWEN2, "I'm ok", "I", "'m", " ok");
    /* deepseek-llm: letter class, punctuation class, trailing spaces, CJK, numbers; U+3000 is
     * \s (the collapsed text), not a member of "　-。" */
    SPLIT(TOK_PRE_DEEPSEEK_LLM,
          "Hello \xE4\xB8\x96\xE7\x95\x8C"
          "123\n",
          "Hello", " ", "\xE4\xB8\x96\xE7\x95\x8C", "123", "\n");
    SPLIT(TOK_PRE_DEEPSEEK_LLM,
          "a\xE3\x80\x80"
          "b",
          "a",
          "\xE3\x80\x80"
          "b");
    SPLIT(TOK_PRE_DEEPSEEK_LLM, "x\xE3\x80\x82", "x", "\xE3\x80\x82");
    SPLIT(TOK_PRE_DEEPSEEK_LLM, "ab  ", "ab", "  ");
    SPLIT(TOK_PRE_DEEPSEEK_LLM, "\xD0\x96\xD0\xB8", "\xD0\x96\xD0\xB8"); /* Жи: Cyrillic */
    /* deepseek-coder: single digits */
    SPLIT(TOK_PRE_DEEPSEEK_CODER, "ab12", "ab", "1", "2");
    SPLIT(TOK_PRE_DEEPSEEK_CODER, "x, y", "x", ",", " y");
    /* falcon: punctuation runs first, then gpt2, then [0-9]{3} */
    SPLIT(TOK_PRE_FALCON, "1234567", "123", "456", "7");
    SPLIT(TOK_PRE_FALCON, "a+b", "a", "+", "b");
    /* starcoder: every digit alone, then gpt2 */
    SPLIT(TOK_PRE_STARCODER, "abc 123", "abc", " ", "1", "2", "3");
    /* default */
    SPLIT(TOK_PRE_DEFAULT, "hello 12345!", "hello", " ", "123", "45", "!");

    /* every pre-tokenizer: the pieces cover random text exactly (checked inside
     * tok_pre_split's contract: lengths sum to n, none empty) */
    const enum tok_pre all[] = {TOK_PRE_DEFAULT, TOK_PRE_GPT2,         TOK_PRE_LLAMA3,
                                TOK_PRE_QWEN2,   TOK_PRE_DEEPSEEK_LLM, TOK_PRE_DEEPSEEK_CODER,
                                TOK_PRE_FALCON,  TOK_PRE_STARCODER};
    const uint32_t alphabet[] = {'a', 'Z',  '1',    ' ',    '\n', '\r', '\t',  '\'',    's',   '!',
                                 '$', 0xE9, 0x4E16, 0x3000, 0xA0, 0x85, 0x661, 0x1F600, 0xFF01};
    uint32_t cps[300];
    size_t lens[300], tmp[300];
    for (int it = 0; it < 200; it++) {
        size_t n = (size_t)(tu_rng_u64(&rng) % 300);
        for (size_t i = 0; i < n; i++)
            cps[i] = alphabet[tu_rng_u64(&rng) % MR_ARRAY_LEN(alphabet)];
        for (size_t p = 0; p < MR_ARRAY_LEN(all); p++) {
            size_t np = tok_pre_split(all[p], cps, n, lens, tmp), sum = 0;
            for (size_t i = 0; i < np; i++) {
                assert_true(lens[i] > 0);
                sum += lens[i];
            }
            assert_int_equal(sum, n);
        }
    }
    /* names */
    enum tok_pre pre;
    bool im, ab, nb;
    assert_int_equal(tok_pre_from_name("llama-bpe", &pre, &im, &ab, &nb), MOERUN_OK);
    assert_int_equal(pre, TOK_PRE_LLAMA3);
    assert_true(im && ab);
    assert_int_equal(tok_pre_from_name("mpt", &pre, &im, &ab, &nb), MOERUN_OK);
    assert_int_equal(pre, TOK_PRE_GPT2);
    assert_false(im);
    assert_int_equal(tok_pre_from_name("qwen2", &pre, &im, &ab, &nb), MOERUN_OK);
    assert_int_equal(pre, TOK_PRE_QWEN2);
    assert_int_equal(tok_pre_from_name("x", &pre, &im, &ab, &nb), MOERUN_ERR_UNSUPPORTED);
    assert_non_null(strstr(moerun_errmsg(), "unknown pre-tokenizer 'x'"));
}

/* ---------------------------------------------------------------------------------------------
 * A tiny byte-level BPE vocabulary written here
 * ------------------------------------------------------------------------------------------- */

struct tiny_opts {
    const char *model;  /* tokenizer.ggml.model */
    const char *pre;    /* NULL: absent */
    int n_scores_delta; /* scores array length = n + delta (0 = no scores when BPE) */
    int64_t bos;        /* -1: absent */
    int64_t eos;        /* -1: absent */
    int types_f32;      /* token_type written with the wrong element type */
    int no_merges;
};

#define TINY_N_EXTRA 9
static const char *const tiny_extra[TINY_N_EXTRA] = {
    "he", "ll", "hell", "hello", "\xC4\xA0w", "xyz", "<|endoftext|>", "<|user|>", "<|im_end|>"};
enum { T_HE = 256, T_LL, T_HELL, T_HELLO, T_GW, T_XYZ, T_EOT, T_USER, T_IMEND };
static const char *const tiny_merges[] = {"h e", "l l", "he ll", "hell o", "\xC4\xA0 w"};

static const char *write_tiny(const struct tiny_opts *o) {
    uint32_t n = 256 + TINY_N_EXTRA;
    char *texts[256 + TINY_N_EXTRA];
    int32_t types[256 + TINY_N_EXTRA];
    float scores[256 + TINY_N_EXTRA + 4];
    for (uint32_t i = 0; i < n; i++) {
        texts[i] = calloc(16, 1);
        types[i] = 1;
        scores[i] = -(float)i;
        if (i < 256)
            unicode_encode(unicode_byte_to_cp((uint8_t)i), texts[i]);
        else
            strcpy(texts[i], tiny_extra[i - 256]);
    }
    types[T_EOT] = 3;
    types[T_IMEND] = 3;
    types[T_USER] = 4;
    struct gguf_writer *w;
    assert_int_equal(gguf_writer_create(NULL, &w), MOERUN_OK);
    assert_int_equal(gguf_writer_set_str(w, "general.architecture", "llama"), MOERUN_OK);
    assert_int_equal(gguf_writer_set_str(w, "tokenizer.ggml.model", o->model), MOERUN_OK);
    if (o->pre)
        assert_int_equal(gguf_writer_set_str(w, "tokenizer.ggml.pre", o->pre), MOERUN_OK);
    assert_int_equal(
        gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)texts, n),
        MOERUN_OK);
    if (o->n_scores_delta)
        assert_int_equal(gguf_writer_set_arr(w, "tokenizer.ggml.scores", GGUF_VT_F32, scores,
                                             (uint64_t)((int)n + o->n_scores_delta)),
                         MOERUN_OK);
    if (o->types_f32)
        assert_int_equal(
            gguf_writer_set_arr(w, "tokenizer.ggml.token_type", GGUF_VT_F32, scores, n), MOERUN_OK);
    else
        assert_int_equal(gguf_writer_set_arr(w, "tokenizer.ggml.token_type", GGUF_VT_I32, types, n),
                         MOERUN_OK);
    if (!o->no_merges)
        assert_int_equal(gguf_writer_set_arr_str(w, "tokenizer.ggml.merges", tiny_merges,
                                                 MR_ARRAY_LEN(tiny_merges)),
                         MOERUN_OK);
    if (o->bos >= 0)
        assert_int_equal(gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)o->bos),
                         MOERUN_OK);
    if (o->eos >= 0)
        assert_int_equal(gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)o->eos),
                         MOERUN_OK);
    const char *path = tu_tmp_path(".gguf");
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    assert_int_equal(gguf_writer_begin(w, fd), MOERUN_OK);
    assert_int_equal(gguf_writer_finish(w), MOERUN_OK);
    gguf_writer_destroy(w);
    close(fd);
    for (uint32_t i = 0; i < n; i++)
        free(texts[i]);
    return path;
}

/* load a tiny vocabulary; returns the status, *v on success */
static int load_tiny(const struct tiny_opts *o, struct mr_vocab **v) {
    const char *path = write_tiny(o);
    struct gguf_ctx *g;
    assert_int_equal(gguf_open_file(path, NULL, &g), MOERUN_OK);
    int rc = vocab_load(g, NULL, v);
    gguf_close(g);
    unlink(path);
    return rc;
}

static const struct tiny_opts tiny_default = {"gpt2", "gpt-2", 0, -1, T_EOT, 0, 0};

static int32_t byte_id(unsigned char b) {
    return b; /* the first 256 tokens are the bytes in order */
}

static void test_tiny_bpe(void **state) {
    (void)state;
    struct mr_vocab *v;
    assert_int_equal(load_tiny(&tiny_default, &v), MOERUN_OK);
    moerun_model m;
    wrap(&m, v);
    assert_int_equal(moerun_model_n_vocab(&m), 256 + TINY_N_EXTRA);
    int32_t *ids;
    /* "hello world": merges give "hello"; " world" -> Ġw o r l d */
    size_t n = tokenize(&m, "hello world", 11, 0, 0, &ids);
    int32_t expect1[] = {T_HELLO, T_GW, 'o', 'r', 'l', 'd'};
    assert_int_equal(n, MR_ARRAY_LEN(expect1));
    assert_memory_equal(ids, expect1, sizeof(expect1));
    free(ids);
    /* "hell" + "he": rank order; "xyz" is a token but gpt-2 does not ignore merges */
    n = tokenize(&m, "hellhe xyz", 10, 0, 0, &ids);
    int32_t expect2[] = {T_HELL, T_HE, byte_id(' '), 'x', 'y', 'z'};
    assert_int_equal(n, MR_ARRAY_LEN(expect2));
    assert_memory_equal(ids, expect2, sizeof(expect2));
    free(ids);
    /* special tokens: control only with parse_special, user-defined always */
    const char *s = "a<|endoftext|>b<|user|>";
    n = tokenize(&m, s, strlen(s), 0, 1, &ids);
    int32_t expect3[] = {'a', T_EOT, 'b', T_USER};
    assert_int_equal(n, MR_ARRAY_LEN(expect3));
    assert_memory_equal(ids, expect3, sizeof(expect3));
    free(ids);
    n = tokenize(&m, s, strlen(s), 0, 0, &ids);
    assert_true(n > 4);
    assert_int_equal(ids[n - 1], T_USER);
    for (size_t i = 0; i < n; i++)
        assert_true(ids[i] != T_EOT);
    size_t dl;
    char *d = detokenize(&m, ids, n, &dl);
    assert_int_equal(dl, strlen(s));
    assert_memory_equal(d, s, dl);
    free(d);
    free(ids);
    /* add_special: gpt2 adds nothing by default */
    n = tokenize(&m, "he", 2, 1, 0, &ids);
    assert_int_equal(n, 1);
    assert_int_equal(ids[0], T_HE);
    free(ids);
    /* a too-small buffer tells the size */
    int32_t one[1];
    size_t need = 0;
    assert_int_equal(moerun_tokenize(&m, "hello world", 11, 0, 0, one, 1, &need), MOERUN_ERR_RANGE);
    assert_int_equal(need, 6);
    /* pieces */
    char buf[32];
    assert_int_equal(moerun_token_to_piece(&m, T_GW, 0, buf, sizeof(buf)), 2);
    assert_memory_equal(buf, " w", 2);
    assert_int_equal(moerun_token_to_piece(&m, T_EOT, 0, buf, sizeof(buf)), 0);
    assert_int_equal(moerun_token_to_piece(&m, T_EOT, 1, buf, sizeof(buf)), 13);
    assert_memory_equal(buf, "<|endoftext|>", 13);
    assert_int_equal(moerun_token_to_piece(&m, T_EOT, 1, buf, 4), 13); /* truncated */
    assert_int_equal(moerun_token_to_piece(&m, T_USER, 0, buf, sizeof(buf)), 8);
    assert_int_equal(moerun_token_to_piece(&m, 0x0A, 0, buf, sizeof(buf)), 1);
    assert_int_equal(buf[0], '\n');
    assert_int_equal(moerun_token_to_piece(&m, 100000, 0, buf, sizeof(buf)), MOERUN_ERR_RANGE);
    assert_int_equal(moerun_token_to_piece(&m, -1, 0, buf, sizeof(buf)), MOERUN_ERR_RANGE);
    /* eos from the key; eot found by text (<|im_end|>, listed before <|endoftext|>) */
    assert_int_equal(moerun_token_eos(&m), T_EOT);
    assert_true(moerun_token_is_eog(&m, T_EOT));
    assert_true(moerun_token_is_eog(&m, T_IMEND));
    assert_false(moerun_token_is_eog(&m, T_HE));
    assert_int_equal(moerun_token_bos(&m), 11); /* llama.cpp's BPE default */
    /* random byte strings round-trip through tokenize and the pieces (valid UTF-8 only: an
     * invalid byte becomes U+FFFD before byte encoding, as in llama.cpp) */
    for (int it = 0; it < 50; it++) {
        char text[200];
        size_t len = 0, want = 1 + tu_rng_u64(&rng) % 60;
        while (len < want) {
            uint32_t cp = (uint32_t)(tu_rng_u64(&rng) % 4 == 0 ? tu_rng_u64(&rng) % 0x30000
                                                               : 0x20 + tu_rng_u64(&rng) % 0x60);
            if (cp >= 0xD800 && cp <= 0xDFFF)
                continue;
            len += unicode_encode(cp, text + len);
        }
        n = tokenize(&m, text, len, 0, 0, &ids);
        d = detokenize(&m, ids, n, &dl);
        assert_int_equal(dl, len);
        assert_memory_equal(d, text, len);
        free(d);
        free(ids);
    }
    vocab_free(v);

    /* llama3 ignores merges for a piece that is a token: "xyz" whole; BOS added */
    struct tiny_opts o = tiny_default;
    o.pre = "llama3";
    o.bos = 'B';
    assert_int_equal(load_tiny(&o, &v), MOERUN_OK);
    wrap(&m, v);
    n = tokenize(&m, "xyz", 3, 1, 0, &ids);
    assert_int_equal(n, 2);
    assert_int_equal(ids[0], 'B');
    assert_int_equal(ids[1], T_XYZ);
    free(ids);
    vocab_free(v);
}

/* ---------------------------------------------------------------------------------------------
 * Streaming detokenizer
 * ------------------------------------------------------------------------------------------- */

static void test_detok_stream(void **state) {
    (void)state;
    struct mr_vocab *v;
    assert_int_equal(load_tiny(&tiny_default, &v), MOERUN_OK);
    moerun_model m;
    wrap(&m, v);
    char out[256];
    moerun_detok d;
    memset(&d, 0, sizeof(d));
    /* é split across two byte tokens */
    assert_int_equal(moerun_detok_push(&m, &d, 0xC3, out, sizeof(out)), 0);
    assert_int_equal(moerun_detok_push(&m, &d, 0xA9, out, sizeof(out)), 2);
    assert_memory_equal(out, "\xC3\xA9", 2);
    /* a 4-byte emoji over four tokens */
    const unsigned char emoji[] = {0xF0, 0x9F, 0x98, 0x80};
    for (int i = 0; i < 3; i++)
        assert_int_equal(moerun_detok_push(&m, &d, emoji[i], out, sizeof(out)), 0);
    assert_int_equal(moerun_detok_push(&m, &d, emoji[3], out, sizeof(out)), 4);
    assert_memory_equal(out, emoji, 4);
    /* invalid bytes become U+FFFD */
    assert_int_equal(moerun_detok_push(&m, &d, 0xFF, out, sizeof(out)), 3);
    assert_memory_equal(out, "\xEF\xBF\xBD", 3);
    assert_int_equal(moerun_detok_push(&m, &d, 0xC3, out, sizeof(out)), 0);
    assert_int_equal(moerun_detok_push(&m, &d, 'a', out, sizeof(out)), 4);
    assert_memory_equal(out,
                        "\xEF\xBF\xBD"
                        "a",
                        4);
    assert_int_equal(moerun_detok_push(&m, &d, 0xED, out, sizeof(out)), 0);
    assert_int_equal(moerun_detok_push(&m, &d, 0xA0, out, sizeof(out)), 6); /* surrogate */
    /* flush emits what is held */
    assert_int_equal(moerun_detok_push(&m, &d, 0xE2, out, sizeof(out)), 0);
    assert_int_equal(moerun_detok_push(&m, &d, 0x82, out, sizeof(out)), 0);
    assert_int_equal(moerun_detok_flush(&d, out, sizeof(out)), 3);
    assert_memory_equal(out, "\xEF\xBF\xBD", 3);
    assert_int_equal(d.n_pending, 0);
    assert_int_equal(moerun_detok_flush(&d, out, sizeof(out)), 0);
    /* too small an output buffer leaves the state alone */
    assert_int_equal(moerun_detok_push(&m, &d, 0xC3, out, sizeof(out)), 0);
    assert_int_equal(moerun_detok_push(&m, &d, 0xA9, out, 1), MOERUN_ERR_RANGE);
    assert_int_equal(d.n_pending, 1);
    assert_int_equal(moerun_detok_push(&m, &d, 0xA9, out, sizeof(out)), 2);
    /* random valid text, one byte token at a time, comes out whole */
    for (int it = 0; it < 100; it++) {
        char text[256], got[1024];
        size_t len = 0, glen = 0;
        while (len < 200) {
            uint32_t cp = (uint32_t)(tu_rng_u64(&rng) % 0x110000);
            if (cp >= 0xD800 && cp <= 0xDFFF)
                continue;
            len += unicode_encode(cp, text + len);
        }
        memset(&d, 0, sizeof(d));
        for (size_t i = 0; i < len; i++) {
            int k = moerun_detok_push(&m, &d, (unsigned char)text[i], got + glen, 64);
            assert_true(k >= 0);
            glen += (size_t)k;
        }
        assert_int_equal(moerun_detok_flush(&d, got + glen, 64), 0);
        assert_int_equal(glen, len);
        assert_memory_equal(got, text, len);
    }
    vocab_free(v);
}

/* ---------------------------------------------------------------------------------------------
 * Hostile metadata
 * ------------------------------------------------------------------------------------------- */

static void expect_load(const struct tiny_opts *o, int status, const char *msg) {
    struct mr_vocab *v = (struct mr_vocab *)1;
    int rc = load_tiny(o, &v);
    if (rc != status)
        fprintf(stderr, "load: %d (%s), expected %d\n", rc, moerun_errmsg(), status);
    assert_int_equal(rc, status);
    if (status < 0) {
        assert_null(v);
        assert_non_null(strstr(moerun_errmsg(), msg));
    } else
        vocab_free(v);
}

static void test_hostile(void **state) {
    (void)state;
    struct tiny_opts o = tiny_default;
    o.n_scores_delta = -1;
    expect_load(&o, MOERUN_ERR_FORMAT, "tokenizer.ggml.scores");
    o.n_scores_delta = 3;
    expect_load(&o, MOERUN_ERR_FORMAT, "tokenizer.ggml.scores");
    o = tiny_default;
    o.bos = 256 + TINY_N_EXTRA;
    expect_load(&o, MOERUN_ERR_FORMAT, "bos_token_id");
    o = tiny_default;
    o.eos = 1u << 30;
    expect_load(&o, MOERUN_ERR_FORMAT, "eos_token_id");
    o = tiny_default;
    o.model = "bert";
    expect_load(&o, MOERUN_ERR_UNSUPPORTED, "'bert'");
    o.model = "t5";
    expect_load(&o, MOERUN_ERR_UNSUPPORTED, "'t5'");
    o = tiny_default;
    o.pre = "x";
    expect_load(&o, MOERUN_ERR_UNSUPPORTED, "unknown pre-tokenizer 'x'");
    o = tiny_default;
    o.types_f32 = 1;
    expect_load(&o, MOERUN_ERR_FORMAT, "token_type");
    o = tiny_default;
    o.no_merges = 1;
    expect_load(&o, MOERUN_ERR_FORMAT, "merges");
    o = tiny_default;
    o.pre = NULL; /* absent: "default" */
    expect_load(&o, MOERUN_OK, "");
    /* llama (SPM) with a correct scores array loads */
    o = tiny_default;
    o.model = "llama";
    o.n_scores_delta = 0;
    o.bos = 1;
    expect_load(&o, MOERUN_OK, "");

    /* no tokenizer: public functions say so */
    moerun_model m;
    memset(&m, 0, sizeof(m));
    m.info.n_vocab = 77;
    assert_int_equal(moerun_model_n_vocab(&m), 77);
    size_t n;
    int32_t ids[4];
    assert_int_equal(moerun_tokenize(&m, "a", 1, 0, 0, ids, 4, &n), MOERUN_ERR_UNSUPPORTED);
    assert_non_null(strstr(moerun_errmsg(), "no tokenizer"));
    assert_int_equal(moerun_token_bos(&m), -1);
    assert_int_equal(moerun_token_is_eog(&m, 0), 0);
    assert_int_equal(moerun_tokenize(NULL, "a", 1, 0, 0, ids, 4, &n), MOERUN_ERR_INVALID_ARG);
}

/* ---------------------------------------------------------------------------------------------
 * llama.cpp's vocab test vectors and the golden prompts
 * ------------------------------------------------------------------------------------------- */

static int open_vocab_model(const char *path, moerun_model **m) {
    moerun_model_params p;
    moerun_model_params_init(&p);
    p.metadata_only = 1;
    int rc = moerun_model_open(path, &p, m);
    if (rc != MOERUN_OK)
        fprintf(stderr, "moerun_model_open(%s, metadata_only): %s\n", path, moerun_errmsg());
    return rc;
}

static void run_vocab_vectors(const char *name, bool spm) {
    char rel[256];
    snprintf(rel, sizeof(rel), "golden/vocab/%s", name);
    const char *p = tu_shared_path(rel);
    if (!p) {
        fprintf(stderr, "skipping %s: not found\n", rel);
        return;
    }
    char path[4096];
    snprintf(path, sizeof(path), "%s", p);
    moerun_model *m;
    assert_int_equal(open_vocab_model(path, &m), MOERUN_OK);
    char ipath[4200], opath[4200];
    snprintf(ipath, sizeof(ipath), "%s.inp", path);
    snprintf(opath, sizeof(opath), "%s.out", path);
    size_t isz, osz;
    char *inp = tu_read_file(ipath, &isz), *outp = tu_read_file(opath, &osz);
    assert_non_null(inp);
    assert_non_null(outp);
    outp = realloc(outp, osz + 1);
    outp[osz] = '\0';
    const char *sep = "\n__ggml_vocab_test__\n";
    size_t sl = strlen(sep), pos = 0, n_cases = 0, n_roundtrip = 0;
    char *line = outp;
    for (;;) {
        const char *end = NULL;
        for (size_t k = pos; k + sl <= isz; k++) {
            if (memcmp(inp + k, sep, sl) == 0) {
                end = inp + k;
                break;
            }
        }
        if (!end)
            break;
        size_t len = (size_t)(end - (inp + pos));
        const char *text = inp + pos;
        pos += len + sl;
        /* expected ids */
        char *nl = strchr(line, '\n');
        assert_non_null(nl);
        *nl = '\0';
        int32_t want[512];
        size_t nw = 0;
        for (char *t = strtok(line, " \t\r"); t; t = strtok(NULL, " \t\r"))
            want[nw++] = (int32_t)strtol(t, NULL, 10);
        line = nl + 1;
        int32_t *ids;
        size_t n = tokenize(m, text, len, 0, 0, &ids);
        if (n != nw || memcmp(ids, want, n * sizeof(*ids)) != 0) {
            fprintf(stderr, "%s case %zu '%.*s': got", name, n_cases, (int)len, text);
            for (size_t i = 0; i < n; i++)
                fprintf(stderr, " %d", ids[i]);
            fprintf(stderr, "\n  want");
            for (size_t i = 0; i < nw; i++)
                fprintf(stderr, " %d", want[i]);
            fprintf(stderr, "\n");
        }
        assert_int_equal(n, nw);
        assert_memory_equal(ids, want, n * sizeof(*ids));
        /* detokenizing gives the text back (SPM: less the space prefix) */
        size_t dl;
        char *d = detokenize(m, ids, n, &dl);
        const char *dd = d;
        if (spm && dl > 0 && d[0] == ' ') {
            dd++;
            dl--;
        }
        assert_int_equal(dl, len);
        assert_memory_equal(dd, text, len);
        n_roundtrip++;
        free(d);
        free(ids);
        n_cases++;
    }
    assert_int_equal(n_cases, 46);
    assert_int_equal(n_roundtrip, 46);
    free(inp);
    free(outp);
    moerun_model_close(m);
}

static void test_vocab_llama_spm(void **state) {
    (void)state;
    run_vocab_vectors("ggml-vocab-llama-spm.gguf", true);
}

static void test_vocab_gpt2(void **state) {
    (void)state;
    run_vocab_vectors("ggml-vocab-gpt-2.gguf", false);
}

static void test_vocab_deepseek_llm(void **state) {
    (void)state;
    run_vocab_vectors("ggml-vocab-deepseek-llm.gguf", false);
}

static void run_golden_prompt(const char *name) {
    char rel[256];
    snprintf(rel, sizeof(rel), "golden/%s.gguf", name);
    const char *p = tu_shared_path(rel);
    if (!p) {
        fprintf(stderr, "skipping %s: not found\n", rel);
        return;
    }
    char path[4096];
    snprintf(path, sizeof(path), "%s", p);
    moerun_model *m;
    assert_int_equal(open_vocab_model(path, &m), MOERUN_OK);
    snprintf(rel, sizeof(rel), "golden/%s.prompt", name);
    size_t psz, tsz;
    char *prompt = tu_read_file(tu_shared_path(rel), &psz);
    snprintf(rel, sizeof(rel), "golden/%s.tokens", name);
    char *toks = tu_read_file(tu_shared_path(rel), &tsz);
    assert_non_null(prompt);
    assert_non_null(toks);
    toks = realloc(toks, tsz + 1);
    toks[tsz] = '\0';
    int32_t want[1024];
    size_t nw = 0;
    for (char *t = strtok(toks, ", \n"); t; t = strtok(NULL, ", \n"))
        want[nw++] = (int32_t)strtol(t, NULL, 10);
    int32_t *ids;
    size_t n = tokenize(m, prompt, psz, 1, 0, &ids);
    assert_int_equal(n, nw);
    assert_memory_equal(ids, want, n * sizeof(*ids));
    assert_int_equal(ids[0], moerun_token_bos(m));
    free(ids);
    free(prompt);
    free(toks);
    moerun_model_close(m);
}

static void test_golden_prompts(void **state) {
    (void)state;
    run_golden_prompt("mixtral-spm32k-f16");
    run_golden_prompt("tinymix-f16");
}

/* SPM specifics on the llama vocab: special tokens with parse_special, space prefix after a
 * special token, byte fallback */
static void test_spm_special(void **state) {
    (void)state;
    const char *p = tu_shared_path("golden/vocab/ggml-vocab-llama-spm.gguf");
    if (!p)
        return;
    moerun_model *m;
    assert_int_equal(open_vocab_model(p, &m), MOERUN_OK);
    int32_t *a, *b;
    size_t na = tokenize(m, "<s>Hi", 5, 0, 1, &a);
    size_t nb = tokenize(m, "Hi", 2, 0, 0, &b);
    assert_int_equal(na, nb + 1);
    assert_int_equal(a[0], 1);
    assert_memory_equal(a + 1, b, nb * sizeof(*b)); /* " Hi" after the special token */
    free(a);
    na = tokenize(m, "<s>Hi", 5, 0, 0, &a);
    assert_true(na > 2);
    for (size_t i = 0; i < na; i++)
        assert_true(a[i] != 1);
    free(a);
    free(b);
    /* a character outside the vocabulary falls back to <0xXX> tokens */
    na = tokenize(m, "\xF0\x9F\xA6\x99", 4, 0, 0, &a); /* 🦙 */
    size_t dl;
    char *d = detokenize(m, a, na, &dl);
    assert_int_equal(dl, 5);
    assert_memory_equal(d, " \xF0\x9F\xA6\x99", 5);
    free(d);
    free(a);
    assert_true(moerun_token_is_eog(m, 2));
    assert_false(moerun_token_is_eog(m, 1));
    moerun_model_close(m);
}

/* ---------------------------------------------------------------------------------------------
 * Long inputs
 * ------------------------------------------------------------------------------------------- */

static void test_long_input(void **state) {
    (void)state;
    size_t len = 1u << 20;
    char *text = malloc(len);
    static const char *const words[] = {
        "the ", "quick ",        "brown ", "fox ", "12345 ", "\n", "\xC3\xA9t\xC3\xA9 ",
        "!!  ", "\xE4\xB8\x96 ", "x"};
    size_t o = 0;
    while (o < len) {
        const char *w = words[tu_rng_u64(&rng) % MR_ARRAY_LEN(words)];
        size_t wl = MR_MIN(strlen(w), len - o);
        memcpy(text + o, w, wl);
        o += wl;
    }
    const char *names[] = {"golden/vocab/ggml-vocab-gpt-2.gguf",
                           "golden/vocab/ggml-vocab-llama-spm.gguf"};
    for (size_t k = 0; k < MR_ARRAY_LEN(names); k++) {
        const char *p = tu_shared_path(names[k]);
        if (!p)
            continue;
        moerun_model *m;
        assert_int_equal(open_vocab_model(p, &m), MOERUN_OK);
        clock_t t0 = clock();
        int32_t *ids;
        size_t n = tokenize(m, text, len, 0, 0, &ids);
        double s = (double)(clock() - t0) / CLOCKS_PER_SEC;
        fprintf(stderr, "%s: 1 MiB -> %zu tokens in %.2f s (two passes)\n", names[k], n, s);
        assert_true(n > len / 16);
        free(ids);
        moerun_model_close(m);
    }
    /* one long word: merges are a heap, not quadratic */
    memset(text, 'a', len);
    struct mr_vocab *v;
    assert_int_equal(load_tiny(&tiny_default, &v), MOERUN_OK);
    moerun_model m;
    wrap(&m, v);
    int32_t *ids;
    size_t n = tokenize(&m, text, len, 0, 0, &ids);
    assert_int_equal(n, len);
    free(ids);
    vocab_free(v);
    free(text);
}

int main(void) {
    tu_rng_init(&rng, tu_seed());
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_unicode_tables), cmocka_unit_test(test_pre_split),
        cmocka_unit_test(test_tiny_bpe),       cmocka_unit_test(test_detok_stream),
        cmocka_unit_test(test_hostile),        cmocka_unit_test(test_vocab_llama_spm),
        cmocka_unit_test(test_vocab_gpt2),     cmocka_unit_test(test_vocab_deepseek_llm),
        cmocka_unit_test(test_golden_prompts), cmocka_unit_test(test_spm_special),
        cmocka_unit_test(test_long_input),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
