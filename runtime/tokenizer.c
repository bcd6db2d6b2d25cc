/* Tokenizer: the vocabulary from tokenizer.ggml.*, special-token partitioning (llama.cpp's
 * tokenizer_st_partition), and the public tokenize / token_to_piece / detokenizer functions.
 * The algorithms are in tok_spm.c and tok_bpe.c. */
#include "tok_impl.h"
#include "model.h"
#include "unicode.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------------
 * Hashing
 * ------------------------------------------------------------------------------------------- */

static uint64_t hash_bytes(uint64_t h, const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 0x100000001B3ull;
    }
    return h;
}

#define HASH_SEED 0xCBF29CE484222325ull

static uint64_t table_size(uint64_t n) {
    uint64_t cap = 16;
    while (cap < 2 * n)
        cap *= 2;
    return cap;
}

int32_t vocab_find(const struct mr_vocab *v, const char *s, size_t len) {
    uint64_t i = hash_bytes(HASH_SEED, s, len) & v->map_mask;
    for (;; i = (i + 1) & v->map_mask) {
        int32_t id = v->map[i];
        if (id < 0)
            return -1;
        if (v->len[id] == len && memcmp(v->text + v->off[id], s, len) == 0)
            return id;
    }
}

int32_t vocab_merge_rank(const struct mr_vocab *v, const char *l, size_t ln, const char *r,
                         size_t rn) {
    if (!v->mmap)
        return -1;
    uint64_t h = hash_bytes(hash_bytes(HASH_SEED, l, ln), r, rn);
    for (uint64_t i = h & v->mmap_mask;; i = (i + 1) & v->mmap_mask) {
        int32_t m = v->mmap[i];
        if (m < 0)
            return -1;
        const char *t = v->mtext + v->moff[m];
        if (v->mfirst[m] == ln && v->mlen[m] == ln + rn && memcmp(t, l, ln) == 0 &&
            memcmp(t + ln, r, rn) == 0)
            return m;
    }
}

int tok_out_push(struct tok_out *o, int32_t id) {
    if (o->n == o->cap) {
        size_t cap = o->cap ? 2 * o->cap : 64;
        int32_t *ids = mr_alloc(o->a, cap * sizeof(*ids), 0);
        if (!ids)
            return MOERUN_ERR_NOMEM;
        if (o->n)
            memcpy(ids, o->ids, o->n * sizeof(*ids));
        mr_free(o->a, o->ids);
        o->ids = ids;
        o->cap = cap;
    }
    o->ids[o->n++] = id;
    return MOERUN_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Loading
 * ------------------------------------------------------------------------------------------- */

void vocab_free(struct mr_vocab *v) {
    if (!v)
        return;
    const moerun_allocator *a = v->a;
    mr_free(a, v->text);
    mr_free(a, v->off);
    mr_free(a, v->len);
    mr_free(a, v->score);
    mr_free(a, v->attr);
    mr_free(a, v->piece);
    mr_free(a, v->piece_off);
    mr_free(a, v->piece_len);
    mr_free(a, v->map);
    mr_free(a, v->mtext);
    mr_free(a, v->moff);
    mr_free(a, v->mlen);
    mr_free(a, v->mfirst);
    mr_free(a, v->mmap);
    mr_free(a, v->special);
    mr_free(a, v);
}

uint32_t vocab_n_tokens(const struct mr_vocab *v) {
    return v ? v->n : 0;
}

/* a string value as a C string (no embedded NUL), or NULL */
static const char *str_value(const struct gguf_str *s) {
    return strlen(s->ptr) == s->len ? s->ptr : NULL;
}

static int get_name(const struct gguf_ctx *g, const char *key, const char **out) {
    struct gguf_str s;
    int rc = gguf_get_str(g, key, &s);
    if (rc != MOERUN_OK)
        return rc;
    *out = str_value(&s);
    if (!*out)
        return mr_err(MOERUN_ERR_FORMAT, "tokenizer: %s contains a NUL byte", key);
    return MOERUN_OK;
}

static int load_tokens(struct mr_vocab *v, const struct gguf_array *tokens) {
    const struct gguf_str *strs = tokens->data;
    uint64_t total = 0;
    for (uint32_t i = 0; i < v->n; i++)
        total += strs[i].len ? strs[i].len : 32; /* "[EMPTY_<i>]" */
    v->text = mr_alloc(v->a, total ? total : 1, 0);
    v->off = mr_calloc(v->a, v->n, sizeof(*v->off));
    v->len = mr_calloc(v->a, v->n, sizeof(*v->len));
    v->score = mr_calloc(v->a, v->n, sizeof(*v->score));
    v->attr = mr_calloc(v->a, v->n, sizeof(*v->attr));
    v->map_mask = table_size(v->n) - 1;
    v->map = mr_alloc(v->a, (v->map_mask + 1) * sizeof(*v->map), 0);
    if (!v->text || !v->off || !v->len || !v->score || !v->attr || !v->map)
        return mr_err(MOERUN_ERR_NOMEM, "tokenizer: out of memory for %u tokens", v->n);
    memset(v->map, 0xFF, (v->map_mask + 1) * sizeof(*v->map));
    uint64_t o = 0;
    for (uint32_t i = 0; i < v->n; i++) {
        if (strs[i].len > UINT32_MAX)
            return mr_err(MOERUN_ERR_FORMAT, "tokenizer: token %u is %llu bytes long", i,
                          (unsigned long long)strs[i].len);
        size_t len = (size_t)strs[i].len;
        if (len == 0) /* as llama.cpp */
            len = (size_t)snprintf(v->text + o, 32, "[EMPTY_%u]", i);
        else
            memcpy(v->text + o, strs[i].ptr, len);
        v->off[i] = o;
        v->len[i] = (uint32_t)len;
        const char *t = v->text + o;
        o += len;
        uint64_t h = hash_bytes(HASH_SEED, t, len) & v->map_mask;
        for (;; h = (h + 1) & v->map_mask) {
            int32_t id = v->map[h];
            if (id < 0) {
                v->map[h] = (int32_t)i;
                break;
            }
            if (v->len[id] == len && memcmp(v->text + v->off[id], t, len) == 0)
                return mr_err(MOERUN_ERR_FORMAT,
                              "tokenizer: tokenizer.ggml.tokens: duplicate token (ids %d and %u)",
                              id, i);
        }
    }
    return MOERUN_OK;
}

static int load_scores_types(struct mr_vocab *v, const struct gguf_ctx *g) {
    struct gguf_array arr;
    int rc = gguf_get_arr(g, "tokenizer.ggml.scores", &arr);
    if (rc < 0)
        return rc;
    if (rc == MOERUN_OK) {
        if (arr.elem_type != GGUF_VT_F32 && arr.elem_type != GGUF_VT_I32)
            return mr_err(MOERUN_ERR_FORMAT,
                          "tokenizer: tokenizer.ggml.scores is an array of %s, not f32",
                          gguf_vtype_name(arr.elem_type));
        if (arr.n != v->n)
            return mr_err(MOERUN_ERR_FORMAT,
                          "tokenizer: tokenizer.ggml.scores has %llu entries for %u tokens",
                          (unsigned long long)arr.n, v->n);
        for (uint32_t i = 0; i < v->n; i++)
            v->score[i] = arr.elem_type == GGUF_VT_F32 ? ((const float *)arr.data)[i]
                                                       : (float)((const int32_t *)arr.data)[i];
    }
    rc = gguf_get_arr(g, "tokenizer.ggml.token_type", &arr);
    if (rc < 0)
        return rc;
    if (rc == 1) {
        memset(v->attr, TOK_ATTR_NORMAL, v->n);
        return MOERUN_OK;
    }
    if (arr.elem_type != GGUF_VT_I32)
        return mr_err(MOERUN_ERR_FORMAT,
                      "tokenizer: tokenizer.ggml.token_type is an array of %s, not i32",
                      gguf_vtype_name(arr.elem_type));
    if (arr.n != v->n)
        return mr_err(MOERUN_ERR_FORMAT,
                      "tokenizer: tokenizer.ggml.token_type has %llu entries for %u tokens",
                      (unsigned long long)arr.n, v->n);
    static const uint8_t type_attr[7] = {0,
                                         TOK_ATTR_NORMAL,
                                         TOK_ATTR_UNKNOWN,
                                         TOK_ATTR_CONTROL,
                                         TOK_ATTR_USER_DEFINED,
                                         TOK_ATTR_UNUSED,
                                         TOK_ATTR_BYTE};
    const int32_t *types = arr.data;
    for (uint32_t i = 0; i < v->n; i++)
        v->attr[i] = (types[i] >= 0 && types[i] < 7) ? type_attr[types[i]] : 0;
    return MOERUN_OK;
}

static int load_merges(struct mr_vocab *v, const struct gguf_ctx *g) {
    struct gguf_array arr;
    int rc = gguf_get_arr(g, "tokenizer.ggml.merges", &arr);
    if (rc < 0)
        return rc;
    if (rc == 1)
        return mr_err(MOERUN_ERR_FORMAT, "tokenizer: tokenizer.ggml.merges is missing (gpt2)");
    if (arr.elem_type != GGUF_VT_STRING)
        return mr_err(MOERUN_ERR_FORMAT,
                      "tokenizer: tokenizer.ggml.merges is an array of %s, not strings",
                      gguf_vtype_name(arr.elem_type));
    if (arr.n > INT32_MAX)
        return mr_err(MOERUN_ERR_FORMAT, "tokenizer: tokenizer.ggml.merges has %llu entries",
                      (unsigned long long)arr.n);
    const struct gguf_str *strs = arr.data;
    v->n_merges = (uint32_t)arr.n;
    uint64_t total = 0;
    for (uint32_t i = 0; i < v->n_merges; i++)
        total += strs[i].len;
    v->mtext = mr_alloc(v->a, total ? total : 1, 0);
    v->moff = mr_calloc(v->a, v->n_merges ? v->n_merges : 1, sizeof(*v->moff));
    v->mlen = mr_calloc(v->a, v->n_merges ? v->n_merges : 1, sizeof(*v->mlen));
    v->mfirst = mr_calloc(v->a, v->n_merges ? v->n_merges : 1, sizeof(*v->mfirst));
    v->mmap_mask = table_size(v->n_merges) - 1;
    v->mmap = mr_alloc(v->a, (v->mmap_mask + 1) * sizeof(*v->mmap), 0);
    if (!v->mtext || !v->moff || !v->mlen || !v->mfirst || !v->mmap)
        return mr_err(MOERUN_ERR_NOMEM, "tokenizer: out of memory for %u merges", v->n_merges);
    memset(v->mmap, 0xFF, (v->mmap_mask + 1) * sizeof(*v->mmap));
    uint64_t o = 0;
    for (uint32_t i = 0; i < v->n_merges; i++) {
        const char *s = strs[i].ptr;
        uint64_t len = strs[i].len;
        if (len > UINT32_MAX)
            return mr_err(MOERUN_ERR_FORMAT, "tokenizer: merge %u is too long", i);
        /* llama.cpp: split at the first space from index 1; none: ("", "") */
        const char *sp = len > 1 ? memchr(s + 1, ' ', (size_t)len - 1) : NULL;
        uint32_t first = 0, second = 0;
        if (sp) {
            first = (uint32_t)(sp - s);
            second = (uint32_t)(len - first - 1);
            memcpy(v->mtext + o, s, first);
            memcpy(v->mtext + o + first, sp + 1, second);
        }
        v->moff[i] = o;
        v->mfirst[i] = first;
        v->mlen[i] = first + second;
        const char *t = v->mtext + o;
        o += first + second;
        uint64_t h = hash_bytes(HASH_SEED, t, first + second) & v->mmap_mask;
        for (;; h = (h + 1) & v->mmap_mask) {
            int32_t m = v->mmap[h];
            if (m < 0) {
                v->mmap[h] = (int32_t)i;
                break;
            }
            if (v->mfirst[m] == first && v->mlen[m] == first + second &&
                memcmp(v->mtext + v->moff[m], t, first + second) == 0)
                break; /* a repeated merge keeps its first rank */
        }
    }
    return MOERUN_OK;
}

/* the special ids: defaults, then the keys (an id out of range is an error) */
static int load_special_ids(struct mr_vocab *v, const struct gguf_ctx *g) {
    struct {
        const char *key;
        int32_t *id;
    } keys[] = {
        {"tokenizer.ggml.bos_token_id", &v->bos},     {"tokenizer.ggml.eos_token_id", &v->eos},
        {"tokenizer.ggml.unknown_token_id", &v->unk}, {"tokenizer.ggml.padding_token_id", &v->pad},
        {"tokenizer.ggml.eot_token_id", &v->eot},     {"tokenizer.ggml.eom_token_id", &v->eom},
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(keys); i++) {
        if (*keys[i].id >= 0 && (uint32_t)*keys[i].id >= v->n)
            *keys[i].id = -1; /* a default beyond a small vocabulary */
        uint32_t id;
        int rc = gguf_get_u32(g, keys[i].key, &id);
        if (rc < 0)
            return rc;
        if (rc == 1)
            continue;
        if (id >= v->n)
            return mr_err(MOERUN_ERR_FORMAT, "tokenizer: %s = %u but there are %u tokens",
                          keys[i].key, id, v->n);
        *keys[i].id = (int32_t)id;
    }
    return MOERUN_OK;
}

/* EOT / EOM by text when the keys do not name them (llama.cpp's workaround); such tokens
 * become control tokens */
static void detect_eot(struct mr_vocab *v) {
    static const char *const eot_names[] = {
        "<|eot_id|>",    "<|im_end|>",
        "<|end|>",       "<end_of_turn>",
        "<|endoftext|>", "<EOT>",
        "_<EOT>",        "<\xEF\xBD\234end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>",
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(eot_names) && v->eot < 0; i++)
        v->eot = vocab_find(v, eot_names[i], strlen(eot_names[i]));
    if (v->eom < 0)
        v->eom = vocab_find(v, "<|eom_id|>", 10);
    if (v->eot >= 0)
        v->attr[v->eot] |= TOK_ATTR_CONTROL;
    if (v->eom >= 0)
        v->attr[v->eom] |= TOK_ATTR_CONTROL;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* what token_to_piece gives with render_special (each piece is at most the text's length) */
static int build_pieces(struct mr_vocab *v) {
    uint64_t total = v->n ? v->off[v->n - 1] + v->len[v->n - 1] : 0;
    v->piece = mr_alloc(v->a, total ? total : 1, 0);
    v->piece_off = mr_calloc(v->a, v->n, sizeof(*v->piece_off));
    v->piece_len = mr_calloc(v->a, v->n, sizeof(*v->piece_len));
    if (!v->piece || !v->piece_off || !v->piece_len)
        return mr_err(MOERUN_ERR_NOMEM, "tokenizer: out of memory for the token pieces");
    uint64_t o = 0;
    for (uint32_t i = 0; i < v->n; i++) {
        const char *t = v->text + v->off[i];
        size_t len = v->len[i];
        char *p = v->piece + o;
        size_t n = 0;
        unsigned attr = v->attr[i];
        if (attr & (TOK_ATTR_UNKNOWN | TOK_ATTR_CONTROL | TOK_ATTR_USER_DEFINED)) {
            memcpy(p, t, len);
            n = len;
        } else if (attr & TOK_ATTR_NORMAL) {
            for (size_t k = 0; k < len;) {
                if (v->type == VOCAB_SPM) {
                    if (len - k >= 3 && memcmp(t + k, "\xE2\x96\x81", 3) == 0) {
                        p[n++] = ' ';
                        k += 3;
                    } else
                        p[n++] = t[k++];
                } else {
                    size_t adv;
                    uint32_t cp = unicode_decode(t + k, len - k, &adv);
                    int b = unicode_cp_to_byte(cp);
                    if (b >= 0 && cp != UNICODE_REPLACEMENT) {
                        p[n++] = (char)b;
                    } else { /* not a byte-level character: its bytes as they are */
                        memcpy(p + n, t + k, adv);
                        n += adv;
                    }
                    k += adv;
                }
            }
        } else if (attr & TOK_ATTR_BYTE) {
            int hi = len == 6 ? hexval(t[3]) : -1, lo = len == 6 ? hexval(t[4]) : -1;
            if (len == 6 && memcmp(t, "<0x", 3) == 0 && t[5] == '>' && hi >= 0 && lo >= 0)
                p[n++] = (char)(hi * 16 + lo);
            else {
                memcpy(p, t, len);
                n = len;
            }
        } /* unused and undefined tokens: nothing */
        v->piece_off[i] = o;
        v->piece_len[i] = (uint32_t)n;
        o += n;
    }
    return MOERUN_OK;
}

static int cmp_u64(const void *x, const void *y) {
    uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
    return a < b ? -1 : a > b;
}

/* CONTROL, USER_DEFINED and UNKNOWN tokens, longest text first (then lowest id) */
static int build_special(struct mr_vocab *v) {
    uint32_t n = 0;
    for (uint32_t i = 0; i < v->n; i++)
        n += (v->attr[i] & (TOK_ATTR_CONTROL | TOK_ATTR_USER_DEFINED | TOK_ATTR_UNKNOWN)) != 0;
    v->n_special = n;
    if (n == 0)
        return MOERUN_OK;
    uint64_t *keys = mr_alloc(v->a, n * sizeof(*keys), 0);
    v->special = mr_alloc(v->a, n * sizeof(*v->special), 0);
    if (!keys || !v->special) {
        mr_free(v->a, keys);
        return mr_err(MOERUN_ERR_NOMEM, "tokenizer: out of memory");
    }
    n = 0;
    for (uint32_t i = 0; i < v->n; i++) {
        if (v->attr[i] & (TOK_ATTR_CONTROL | TOK_ATTR_USER_DEFINED | TOK_ATTR_UNKNOWN))
            keys[n++] = ((uint64_t)(UINT32_MAX - v->len[i]) << 32) | i;
    }
    qsort(keys, n, sizeof(*keys), cmp_u64);
    for (uint32_t i = 0; i < n; i++)
        v->special[i] = (int32_t)(keys[i] & 0xFFFFFFFFu);
    mr_free(v->a, keys);
    return MOERUN_OK;
}

int vocab_load(const struct gguf_ctx *g, const moerun_allocator *a, struct mr_vocab **out) {
    *out = NULL;
    struct gguf_array tokens;
    int rc = gguf_get_arr(g, "tokenizer.ggml.tokens", &tokens);
    if (rc != MOERUN_OK)
        return rc; /* 1: no tokenizer */
    if (tokens.elem_type != GGUF_VT_STRING)
        return mr_err(MOERUN_ERR_FORMAT,
                      "tokenizer: tokenizer.ggml.tokens is an array of %s, not strings",
                      gguf_vtype_name(tokens.elem_type));
    if (tokens.n == 0 || tokens.n > INT32_MAX)
        return mr_err(MOERUN_ERR_FORMAT, "tokenizer: tokenizer.ggml.tokens has %llu entries",
                      (unsigned long long)tokens.n);
    const char *model = NULL, *pre = NULL;
    rc = get_name(g, "tokenizer.ggml.model", &model);
    if (rc == 1)
        return mr_err(MOERUN_ERR_FORMAT, "tokenizer: tokenizer.ggml.model is missing");
    if (rc < 0)
        return rc;
    if (strcmp(model, "no_vocab") == 0 || strcmp(model, "none") == 0)
        return 1;
    enum vocab_type type;
    if (strcmp(model, "llama") == 0)
        type = VOCAB_SPM;
    else if (strcmp(model, "gpt2") == 0)
        type = VOCAB_BPE;
    else
        return mr_err(MOERUN_ERR_UNSUPPORTED,
                      "tokenizer: tokenizer.ggml.model '%s' is not supported (llama, gpt2)", model);

    struct mr_vocab *v = mr_calloc(a, 1, sizeof(*v));
    if (!v)
        return mr_err(MOERUN_ERR_NOMEM, "tokenizer: out of memory");
    v->a = a;
    v->type = type;
    v->n = (uint32_t)tokens.n;
    v->eot = v->eom = v->pad = -1;
    bool no_bos = false;
    if (type == VOCAB_SPM) { /* llama.cpp's defaults */
        v->bos = 1;
        v->eos = 2;
        v->unk = 0;
        v->add_bos = true;
        v->add_space_prefix = true;
        v->pre = TOK_PRE_DEFAULT;
    } else {
        v->bos = 11;
        v->eos = 11;
        v->unk = -1;
        rc = get_name(g, "tokenizer.ggml.pre", &pre);
        if (rc < 0)
            goto out_free;
        if (rc == 1 || pre[0] == '\0') {
            mr_log_warn("tokenizer: no tokenizer.ggml.pre, using the 'default' pre-tokenizer");
            pre = "default";
        }
        rc = tok_pre_from_name(pre, &v->pre, &v->ignore_merges, &v->add_bos, &no_bos);
        if (rc < 0)
            goto out_free;
    }
    rc = load_tokens(v, &tokens);
    if (rc == MOERUN_OK)
        rc = load_scores_types(v, g);
    if (rc == MOERUN_OK && type == VOCAB_BPE)
        rc = load_merges(v, g);
    if (rc != MOERUN_OK)
        goto out_free;
    if (no_bos)
        v->bos = -1;
    rc = load_special_ids(v, g);
    if (rc != MOERUN_OK)
        goto out_free;

    bool flag = v->add_space_prefix;
    rc = gguf_get_bool(g, "tokenizer.ggml.add_space_prefix", &flag);
    if (rc < 0)
        goto out_free;
    v->add_space_prefix = type == VOCAB_SPM && flag;
    rc = gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &v->add_bos);
    if (rc >= 0)
        rc = gguf_get_bool(g, "tokenizer.ggml.add_eos_token", &v->add_eos);
    if (rc < 0)
        goto out_free;
    if (v->add_bos && v->bos < 0) {
        rc = mr_err(MOERUN_ERR_FORMAT,
                    "tokenizer: tokenizer.ggml.add_bos_token is true but there is no BOS token");
        goto out_free;
    }
    if (v->add_eos && v->eos < 0) {
        rc = mr_err(MOERUN_ERR_FORMAT,
                    "tokenizer: tokenizer.ggml.add_eos_token is true but there is no EOS token");
        goto out_free;
    }
    detect_eot(v);
    rc = build_pieces(v);
    if (rc == MOERUN_OK)
        rc = build_special(v);
    if (rc != MOERUN_OK)
        goto out_free;
    *out = v;
    return MOERUN_OK;
out_free:
    vocab_free(v);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Special-token partitioning: text that spells a special token becomes that token, trying the
 * tokens longest first; each token splits every raw fragment left to right.
 * ------------------------------------------------------------------------------------------- */

struct frag {
    int32_t id; /* -1: raw text */
    size_t off, len;
};

struct frags {
    const moerun_allocator *a;
    struct frag *f;
    size_t n, cap;
};

static int frags_push(struct frags *fs, int32_t id, size_t off, size_t len) {
    if (fs->n == fs->cap) {
        size_t cap = fs->cap ? 2 * fs->cap : 16;
        struct frag *f = mr_alloc(fs->a, cap * sizeof(*f), 0);
        if (!f)
            return mr_err(MOERUN_ERR_NOMEM, "tokenizer: out of memory");
        if (fs->n)
            memcpy(f, fs->f, fs->n * sizeof(*f));
        mr_free(fs->a, fs->f);
        fs->f = f;
        fs->cap = cap;
    }
    fs->f[fs->n++] = (struct frag){id, off, len};
    return MOERUN_OK;
}

/* first occurrence of t[0..tl) in s[0..n), or NULL */
static const char *find_bytes(const char *s, size_t n, const char *t, size_t tl) {
    if (tl > n)
        return NULL;
    const char *end = s + (n - tl);
    for (const char *p = s; p <= end;) {
        p = memchr(p, t[0], (size_t)(end - p) + 1);
        if (!p)
            return NULL;
        if (memcmp(p, t, tl) == 0)
            return p;
        p++;
    }
    return NULL;
}

static int partition(const struct mr_vocab *v, const char *text, size_t len, bool parse_special,
                     struct frags *fs) {
    int rc = frags_push(fs, -1, 0, len);
    struct frags nf = {.a = fs->a};
    for (uint32_t k = 0; k < v->n_special && rc == MOERUN_OK; k++) {
        int32_t id = v->special[k];
        if (!parse_special && (v->attr[id] & (TOK_ATTR_CONTROL | TOK_ATTR_UNKNOWN)))
            continue;
        const char *t = v->text + v->off[id];
        size_t tl = v->len[id];
        bool changed = false;
        nf.n = 0;
        for (size_t i = 0; i < fs->n && rc == MOERUN_OK; i++) {
            struct frag f = fs->f[i];
            const char *m = f.id < 0 ? find_bytes(text + f.off, f.len, t, tl) : NULL;
            if (!m) {
                if (changed)
                    rc = frags_push(&nf, f.id, f.off, f.len);
                continue;
            }
            for (size_t j = 0; !changed && j < i && rc == MOERUN_OK; j++)
                rc = frags_push(&nf, fs->f[j].id, fs->f[j].off, fs->f[j].len);
            changed = true;
            size_t cur = f.off, end = f.off + f.len;
            while (m && rc == MOERUN_OK) {
                size_t mo = (size_t)(m - text);
                if (mo > cur)
                    rc = frags_push(&nf, -1, cur, mo - cur);
                if (rc == MOERUN_OK)
                    rc = frags_push(&nf, id, mo, tl);
                cur = mo + tl;
                m = find_bytes(text + cur, end - cur, t, tl);
            }
            if (cur < end && rc == MOERUN_OK)
                rc = frags_push(&nf, -1, cur, end - cur);
        }
        if (changed && rc == MOERUN_OK) {
            struct frags t2 = *fs;
            *fs = nf;
            nf = t2;
        }
    }
    mr_free(nf.a, nf.f);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Public API
 * ------------------------------------------------------------------------------------------- */

static const struct mr_vocab *model_vocab(const moerun_model *model, const char *fn, int *rc) {
    if (!model) {
        *rc = mr_err(MOERUN_ERR_INVALID_ARG, "%s: model is NULL", fn);
        return NULL;
    }
    if (!model->vocab) {
        *rc = mr_err(MOERUN_ERR_UNSUPPORTED, "%s: model has no tokenizer", fn);
        return NULL;
    }
    *rc = MOERUN_OK;
    return model->vocab;
}

uint32_t moerun_model_n_vocab(const moerun_model *model) {
    if (!model)
        return 0;
    return model->vocab ? model->vocab->n : model->info.n_vocab;
}

int32_t moerun_token_bos(const moerun_model *model) {
    return model && model->vocab ? model->vocab->bos : -1;
}

int32_t moerun_token_eos(const moerun_model *model) {
    return model && model->vocab ? model->vocab->eos : -1;
}

int moerun_token_is_eog(const moerun_model *model, int32_t token) {
    if (!model || !model->vocab || token < 0)
        return 0;
    const struct mr_vocab *v = model->vocab;
    return token == v->eos || token == v->eot || token == v->eom;
}

int moerun_tokenize(const moerun_model *model, const char *text, size_t len, int add_special,
                    int parse_special, int32_t *tokens, size_t cap, size_t *n_tokens) {
    mr_err_clear();
    int rc;
    const struct mr_vocab *v = model_vocab(model, "moerun_tokenize", &rc);
    if (!v)
        return rc;
    if ((!text && len > 0) || (!tokens && cap > 0) || !n_tokens)
        return mr_err(MOERUN_ERR_INVALID_ARG, "moerun_tokenize: NULL text, tokens or n_tokens");
    *n_tokens = 0;
    struct frags fs = {.a = v->a};
    struct tok_out out = {.a = v->a};
    rc = MOERUN_OK;
    if (len > 0)
        rc = partition(v, text, len, parse_special != 0, &fs);
    if (rc == MOERUN_OK && add_special && v->add_bos)
        rc = tok_out_push(&out, v->bos);
    bool prev_special = true; /* SPM: a space prefix before the first text and after a token */
    for (size_t i = 0; i < fs.n && rc == MOERUN_OK; i++) {
        const struct frag *f = &fs.f[i];
        if (f->id >= 0) {
            rc = tok_out_push(&out, f->id);
            prev_special = true;
        } else if (v->type == VOCAB_SPM) {
            rc =
                tok_spm_encode(v, text + f->off, f->len, v->add_space_prefix && prev_special, &out);
            prev_special = false;
        } else {
            rc = tok_bpe_encode(v, text + f->off, f->len, &out);
        }
    }
    if (rc == MOERUN_OK && add_special && v->add_eos)
        rc = tok_out_push(&out, v->eos);
    if (rc == MOERUN_ERR_NOMEM)
        mr_err(rc, "moerun_tokenize: out of memory for %zu bytes of text", len);
    if (rc == MOERUN_OK) {
        *n_tokens = out.n;
        if (out.n > cap)
            rc = mr_err(MOERUN_ERR_RANGE,
                        "moerun_tokenize: the text needs %zu tokens, room for %zu", out.n, cap);
        else if (out.n)
            memcpy(tokens, out.ids, out.n * sizeof(*tokens));
    }
    mr_free(v->a, out.ids);
    mr_free(v->a, fs.f);
    return rc;
}

/* the piece of token (render_special or not), or NULL with *rc for a bad id */
static const char *token_piece(const struct mr_vocab *v, int32_t token, bool render_special,
                               size_t *len, int *rc) {
    if (token < 0 || (uint32_t)token >= v->n) {
        *rc = mr_err(MOERUN_ERR_RANGE, "tokenizer: token id %d out of range (%u tokens)", token,
                     v->n);
        return NULL;
    }
    *rc = MOERUN_OK;
    *len = (!render_special && (v->attr[token] & (TOK_ATTR_UNKNOWN | TOK_ATTR_CONTROL)))
               ? 0
               : v->piece_len[token];
    return v->piece + v->piece_off[token];
}

int moerun_token_to_piece(const moerun_model *model, int32_t token, int render_special, char *buf,
                          size_t size) {
    int rc;
    const struct mr_vocab *v = model_vocab(model, "moerun_token_to_piece", &rc);
    if (!v)
        return rc;
    if (!buf && size > 0)
        return mr_err(MOERUN_ERR_INVALID_ARG, "moerun_token_to_piece: buf is NULL");
    size_t len;
    const char *p = token_piece(v, token, render_special != 0, &len, &rc);
    if (!p)
        return rc;
    if (len > INT_MAX)
        len = INT_MAX;
    if (len > 0 && size > 0)
        memcpy(buf, p, MR_MIN(len, size));
    return (int)len;
}

int moerun_detok_push(const moerun_model *model, moerun_detok *d, int32_t token, char *out,
                      size_t size) {
    int rc;
    const struct mr_vocab *v = model_vocab(model, "moerun_detok_push", &rc);
    if (!v)
        return rc;
    if (!d || (!out && size > 0) || d->n_pending > 3)
        return mr_err(MOERUN_ERR_INVALID_ARG, "moerun_detok_push: NULL or corrupt argument");
    size_t plen;
    const char *piece = token_piece(v, token, false, &plen, &rc);
    if (!piece)
        return rc;
    /* the bytes: the held-back ones, then the piece */
    size_t np = d->n_pending, total = np + plen, i = 0, o = 0;
    while (i < total) {
        unsigned char win[4];
        size_t wl = MR_MIN((size_t)4, total - i);
        for (size_t k = 0; k < wl; k++)
            win[k] = i + k < np ? d->pending[i + k] : (unsigned char)piece[i + k - np];
        int r = unicode_utf8_check(win, wl);
        if (r == 0) /* incomplete at the end: hold it */
            break;
        size_t n_out = r > 0 ? (size_t)r : 3;
        if (o + n_out > size || o + n_out > INT_MAX)
            return mr_err(MOERUN_ERR_RANGE,
                          "moerun_detok_push: output buffer of %zu bytes is "
                          "too small",
                          size);
        if (r > 0)
            memcpy(out + o, win, (size_t)r);
        else
            memcpy(out + o, "\xEF\xBF\xBD", 3);
        o += n_out;
        i += r > 0 ? (size_t)r : (size_t)-r;
    }
    unsigned char held[4];
    size_t nh = total - i;
    for (size_t k = 0; k < nh; k++)
        held[k] = i + k < np ? d->pending[i + k] : (unsigned char)piece[i + k - np];
    memcpy(d->pending, held, nh);
    d->n_pending = (unsigned)nh;
    return (int)o;
}

int moerun_detok_flush(moerun_detok *d, char *out, size_t size) {
    if (!d || (!out && size > 0))
        return mr_err(MOERUN_ERR_INVALID_ARG, "moerun_detok_flush: NULL argument");
    if (d->n_pending == 0)
        return 0;
    if (size < 3)
        return mr_err(MOERUN_ERR_RANGE,
                      "moerun_detok_flush: output buffer of %zu bytes is too "
                      "small",
                      size);
    memcpy(out, "\xEF\xBF\xBD", 3);
    memset(d, 0, sizeof(*d));
    return 3;
}
