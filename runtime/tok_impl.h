/* Tokenizer internals shared by tokenizer.c, tok_spm.c, tok_bpe.c and the test. */
#ifndef MOERUN_TOK_IMPL_H
#define MOERUN_TOK_IMPL_H

#include "internal.h"
#include "tokenizer.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum vocab_type { VOCAB_SPM = 1, VOCAB_BPE = 2 };

/* token attributes (from tokenizer.ggml.token_type; 0 = undefined) */
#define TOK_ATTR_NORMAL       0x01u /* type 1 */
#define TOK_ATTR_UNKNOWN      0x02u /* type 2 */
#define TOK_ATTR_CONTROL      0x04u /* type 3 */
#define TOK_ATTR_USER_DEFINED 0x08u /* type 4 */
#define TOK_ATTR_UNUSED       0x10u /* type 5 */
#define TOK_ATTR_BYTE         0x20u /* type 6 */

/* BPE pre-tokenizers: the regex lists of llama.cpp, by the set they use. */
enum tok_pre {
    TOK_PRE_DEFAULT,
    TOK_PRE_GPT2,
    TOK_PRE_LLAMA3,
    TOK_PRE_QWEN2,
    TOK_PRE_DEEPSEEK_LLM,
    TOK_PRE_DEEPSEEK_CODER,
    TOK_PRE_FALCON,
    TOK_PRE_STARCODER,
};

struct mr_vocab {
    const moerun_allocator *a;
    enum vocab_type type;
    enum tok_pre pre;
    bool ignore_merges;    /* BPE: a piece that is itself a token is emitted whole */
    bool add_bos, add_eos; /* with add_special */
    bool add_space_prefix; /* SPM */
    uint32_t n;            /* tokens */
    char *text;            /* arena of token texts */
    uint64_t *off;         /* [n] offset of token i's text in text */
    uint32_t *len;         /* [n] */
    float *score;          /* [n] */
    uint8_t *attr;         /* [n] TOK_ATTR_* */
    char *piece;           /* arena: each token's bytes as token_to_piece renders them */
    uint64_t *piece_off;   /* [n] */
    uint32_t *piece_len;   /* [n] */
    int32_t *map;          /* open addressing, text -> id; -1 = empty */
    uint64_t map_mask;
    /* BPE merges "first second", rank = index */
    uint32_t n_merges;
    char *mtext;      /* arena: first and second concatenated, no space */
    uint64_t *moff;   /* [n_merges] */
    uint32_t *mlen;   /* [n_merges] bytes of first + second */
    uint32_t *mfirst; /* [n_merges] bytes of first */
    int32_t *mmap;    /* open addressing, pair -> rank; -1 = empty */
    uint64_t mmap_mask;
    int32_t bos, eos, unk, pad, eot, eom; /* -1 = none */
    int32_t *special; /* [n_special] CONTROL/USER_DEFINED/UNKNOWN ids, longest text first */
    uint32_t n_special;
};

/* The id of the token spelled s[0..len), or -1. */
int32_t vocab_find(const struct mr_vocab *v, const char *s, size_t len);
/* The rank of the merge (l, r), or -1. */
int32_t vocab_merge_rank(const struct mr_vocab *v, const char *l, size_t ln, const char *r,
                         size_t rn);

/* Growable id list for one tokenize call. */
struct tok_out {
    const moerun_allocator *a;
    int32_t *ids;
    size_t n, cap;
};
int tok_out_push(struct tok_out *o, int32_t id);

/* Encode one raw-text fragment (no special tokens inside), appending to out. SPM: with
 * space_prefix a space goes before the text; spaces are escaped to U+2581 here. Returns
 * MOERUN_OK or MOERUN_ERR_NOMEM / MOERUN_ERR_RANGE (text too long). */
/* A word being merged: its symbols, and candidate merges of adjacent ones ordered by key (higher
 * first: the SPM piece's score, or minus the BPE merge's rank), then leftmost (tok_merge.c). */
struct tok_sym {
    uint32_t start, n; /* bytes in the text being merged; n = 0: merged away */
    int32_t prev, next;
};

struct tok_bigram {
    double key;
    int32_t left, right;
    uint32_t size;
};

void tok_heap_push(struct tok_bigram *h, size_t *n, struct tok_bigram b);
struct tok_bigram tok_heap_pop(struct tok_bigram *h, size_t *n);

int tok_spm_encode(const struct mr_vocab *v, const char *text, size_t len, bool space_prefix,
                   struct tok_out *out);
int tok_bpe_encode(const struct mr_vocab *v, const char *text, size_t len, struct tok_out *out);

/* tokenizer.ggml.pre name -> set and flags (llama.cpp's aliases). Returns MOERUN_OK or
 * MOERUN_ERR_UNSUPPORTED. *ignore_merges and *add_bos are set for llama3; *no_bos for
 * chatglm-bpe (the default BOS id is dropped). */
int tok_pre_from_name(const char *name, enum tok_pre *pre, bool *ignore_merges, bool *add_bos,
                      bool *no_bos);

/* Split n code points into pieces with the pre-tokenizer's regex list; lens and tmp have room
 * for n entries. Returns the piece count; the piece lengths (in code points, in order, summing
 * to n) are in lens. */
size_t tok_pre_split(enum tok_pre pre, const uint32_t *cps, size_t n, size_t *lens, size_t *tmp);

#endif /* MOERUN_TOK_IMPL_H */
