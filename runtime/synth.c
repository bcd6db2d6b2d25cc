/* Synthetic models: random weights of a chosen shape, type and seed, written as GGUF.
 *
 * Determinism: every weight row draws from its own random stream, seeded from (seed, tensor,
 * row), so the file depends on the parameters and the seed only, not on the thread count.
 * Rows are generated and quantized in batches by the thread pool and streamed to the writer,
 * so a model larger than memory can be written.
 */
#include "cpu/matmul.h"
#include "cpu/quants.h"
#include "gguf.h"
#include "internal.h"
#include "types.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

void moerun_synth_params_init(moerun_synth_params *p) {
    memset(p, 0, sizeof(*p));
    p->struct_size = sizeof(*p);
    p->arch = "mixtral";
    p->weight_type = MOERUN_TYPE_Q8_0;
    p->seed = 42;
    p->n_vocab = 512;
    p->n_embd = 256;
    p->n_layer = 4;
    p->n_head = 8;
    p->n_head_kv = 4;
    p->n_expert = 8;
    p->n_expert_used = 2;
    p->n_ff = 512;
    p->n_ctx = 4096;
    p->rope_freq_base = 0.0f; /* the architecture's */
    p->rms_eps = 1e-5f;
    p->n_threads = 0;
}

/* --- random numbers -------------------------------------------------------------------------- */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Approximately N(0, 1): the sum of four 16-bit uniforms, centred and scaled (Irwin-Hall).
 * Cheap, bounded (|x| < 3.47) and the same on every machine. */
static float synth_normal(uint64_t *state) {
    uint64_t r = splitmix64(state);
    uint32_t s = (uint32_t)(r & 0xffff) + (uint32_t)((r >> 16) & 0xffff) +
                 (uint32_t)((r >> 32) & 0xffff) + (uint32_t)(r >> 48);
    /* mean 4 * 32767.5, variance 4 * (65536^2 - 1) / 12 */
    return ((float)s - 131070.0f) * (1.0f / 37837.23f);
}

/* --- the tensors of a model --------------------------------------------------------------------
 */

enum init_kind {
    INIT_NORMAL, /* N(0, scale^2) */
    INIT_NORM,   /* 1 + N(0, scale^2): RMSNorm weights */
};

struct synth_tensor {
    char name[64];
    int type;
    uint32_t n_dims;
    uint64_t ne[GGUF_MAX_DIMS];
    enum init_kind init;
    float scale;
};

struct synth_plan {
    struct synth_tensor *t;
    size_t n, cap;
};

static int plan_add(struct synth_plan *plan, const char *name, int type, uint32_t n_dims,
                    uint64_t ne0, uint64_t ne1, uint64_t ne2, enum init_kind init, float scale) {
    if (plan->n == plan->cap) {
        size_t cap = plan->cap ? plan->cap * 2 : 64;
        struct synth_tensor *t = realloc(plan->t, cap * sizeof(*t));
        if (!t)
            return mr_err(MOERUN_ERR_NOMEM, "synth: out of memory for the tensor list");
        plan->t = t;
        plan->cap = cap;
    }
    struct synth_tensor *t = &plan->t[plan->n++];
    memset(t, 0, sizeof(*t));
    snprintf(t->name, sizeof(t->name), "%s", name);
    t->type = type;
    t->n_dims = n_dims;
    t->ne[0] = ne0;
    t->ne[1] = ne1;
    t->ne[2] = ne2;
    t->ne[3] = 1;
    t->init = init;
    t->scale = scale;
    return MOERUN_OK;
}

/* What an architecture adds to the Mixtral layer (docs/architectures.md). */
enum synth_flags {
    SYNTH_QKV_BIAS = 1u << 0,     /* qwen2moe: q/k/v biases */
    SYNTH_QK_NORM_HEAD = 1u << 1, /* qwen3moe: q/k RMSNorm per head, [hd] */
    SYNTH_QK_NORM_FULL = 1u << 2, /* olmoe: q/k RMSNorm over the whole projection */
    SYNTH_SHARED_EXP = 1u << 3,   /* qwen2moe: a shared expert with a sigmoid gate */
    SYNTH_HEAD_DIM = 1u << 4,     /* writes attention.key_length / value_length */
};

struct synth_arch {
    const char *name;      /* moe-synth --arch */
    const char *gguf_arch; /* general.architecture */
    unsigned flags;        /* enum synth_flags */
    float rope_freq_base;  /* default RoPE base, as the real models of the family */
};

static const struct synth_arch synth_archs[] = {
    {"mixtral", "llama", 0, 1e4f},
    {"qwen2moe", "qwen2moe", SYNTH_QKV_BIAS | SYNTH_SHARED_EXP, 1e6f},
    {"qwen3moe", "qwen3moe", SYNTH_QK_NORM_HEAD | SYNTH_HEAD_DIM, 1e6f},
    {"olmoe", "olmoe", SYNTH_QK_NORM_FULL, 1e4f},
};

#define SYNTH_ARCH_NAMES "mixtral, qwen2moe, qwen3moe, olmoe"

static uint32_t synth_head_dim(const moerun_synth_params *p) {
    return p->n_head_dim ? p->n_head_dim : p->n_embd / p->n_head;
}

static uint32_t synth_ff_shared(const moerun_synth_params *p) {
    return p->n_ff_shared ? p->n_ff_shared : 2 * p->n_ff;
}

/* The tensors of one model, in llama.cpp's names and order: the Mixtral layer plus what the
 * architecture's flags add. */
static int plan_build(const moerun_synth_params *p, unsigned flags, struct synth_plan *plan) {
    const int wt = p->weight_type, f32 = MOERUN_TYPE_F32;
    const uint64_t d = p->n_embd, v = p->n_vocab, ff = p->n_ff, ne = p->n_expert;
    const uint64_t hd = synth_head_dim(p), dq = hd * p->n_head, dkv = hd * p->n_head_kv;
    const uint64_t fsh = synth_ff_shared(p);
    const float sd = 1.0f / sqrtf((float)d), sff = 1.0f / sqrtf((float)ff);
    const float sq = 1.0f / sqrtf((float)dq), ssh = 1.0f / sqrtf((float)fsh);
    char name[64];
    int rc = plan_add(plan, "token_embd.weight", wt, 2, d, v, 1, INIT_NORMAL, 1.0f);
    for (uint32_t il = 0; il < p->n_layer && rc == MOERUN_OK; il++) {
        const struct {
            const char *suffix;
            unsigned need; /* flags that add the tensor; 0 = always */
            int type;
            uint32_t n_dims;
            uint64_t ne0, ne1, ne2;
            enum init_kind init;
            float scale;
        } parts[] = {
            {"attn_norm.weight", 0, f32, 1, d, 1, 1, INIT_NORM, 0.1f},
            {"attn_q.weight", 0, wt, 2, d, dq, 1, INIT_NORMAL, sd},
            {"attn_q.bias", SYNTH_QKV_BIAS, f32, 1, dq, 1, 1, INIT_NORMAL, 0.2f},
            {"attn_k.weight", 0, wt, 2, d, dkv, 1, INIT_NORMAL, sd},
            {"attn_k.bias", SYNTH_QKV_BIAS, f32, 1, dkv, 1, 1, INIT_NORMAL, 0.2f},
            {"attn_v.weight", 0, wt, 2, d, dkv, 1, INIT_NORMAL, sd},
            {"attn_v.bias", SYNTH_QKV_BIAS, f32, 1, dkv, 1, 1, INIT_NORMAL, 0.2f},
            {"attn_q_norm.weight", SYNTH_QK_NORM_HEAD, f32, 1, hd, 1, 1, INIT_NORM, 0.1f},
            {"attn_k_norm.weight", SYNTH_QK_NORM_HEAD, f32, 1, hd, 1, 1, INIT_NORM, 0.1f},
            {"attn_q_norm.weight", SYNTH_QK_NORM_FULL, f32, 1, dq, 1, 1, INIT_NORM, 0.1f},
            {"attn_k_norm.weight", SYNTH_QK_NORM_FULL, f32, 1, dkv, 1, 1, INIT_NORM, 0.1f},
            {"attn_output.weight", 0, wt, 2, dq, d, 1, INIT_NORMAL, sq},
            {"ffn_norm.weight", 0, f32, 1, d, 1, 1, INIT_NORM, 0.1f},
            /* router: wider than the rest so routing is decisive */
            {"ffn_gate_inp.weight", 0, f32, 2, d, ne, 1, INIT_NORMAL, 4.0f * sd},
            {"ffn_gate_exps.weight", 0, wt, 3, d, ff, ne, INIT_NORMAL, sd},
            {"ffn_down_exps.weight", 0, wt, 3, ff, d, ne, INIT_NORMAL, sff},
            {"ffn_up_exps.weight", 0, wt, 3, d, ff, ne, INIT_NORMAL, sd},
            {"ffn_gate_inp_shexp.weight", SYNTH_SHARED_EXP, f32, 1, d, 1, 1, INIT_NORMAL, sd},
            {"ffn_gate_shexp.weight", SYNTH_SHARED_EXP, wt, 2, d, fsh, 1, INIT_NORMAL, sd},
            {"ffn_down_shexp.weight", SYNTH_SHARED_EXP, wt, 2, fsh, d, 1, INIT_NORMAL, ssh},
            {"ffn_up_shexp.weight", SYNTH_SHARED_EXP, wt, 2, d, fsh, 1, INIT_NORMAL, sd},
        };
        for (size_t i = 0; i < MR_ARRAY_LEN(parts) && rc == MOERUN_OK; i++) {
            if (parts[i].need && !(parts[i].need & flags))
                continue;
            snprintf(name, sizeof(name), "blk.%u.%s", il, parts[i].suffix);
            rc = plan_add(plan, name, parts[i].type, parts[i].n_dims, parts[i].ne0, parts[i].ne1,
                          parts[i].ne2, parts[i].init, parts[i].scale);
        }
    }
    if (rc == MOERUN_OK)
        rc = plan_add(plan, "output_norm.weight", f32, 1, d, 1, 1, INIT_NORM, 0.1f);
    if (rc == MOERUN_OK)
        rc = plan_add(plan, "output.weight", wt, 2, d, v, 1, INIT_NORMAL, sd);
    return rc;
}

static int check_params(const moerun_synth_params *p, const struct synth_arch **arch) {
    if (!p || p->struct_size < sizeof(*p))
        return mr_err(MOERUN_ERR_INVALID_ARG, "synth: params not initialised "
                                              "(call moerun_synth_params_init)");
    *arch = NULL;
    for (size_t i = 0; i < MR_ARRAY_LEN(synth_archs); i++) {
        if (p->arch && strcmp(p->arch, synth_archs[i].name) == 0)
            *arch = &synth_archs[i];
    }
    if (!*arch)
        return mr_err(MOERUN_ERR_UNSUPPORTED,
                      "synth: unknown architecture '%s' (known: " SYNTH_ARCH_NAMES ")",
                      p->arch ? p->arch : "(null)");
    if (!moerun_type_is_supported(p->weight_type))
        return mr_err(MOERUN_ERR_UNSUPPORTED, "synth: weight type %d (%s) is not supported",
                      p->weight_type,
                      moerun_type_name(p->weight_type) ? moerun_type_name(p->weight_type) : "?");
    const uint32_t blck = mr_type_info(p->weight_type)->blck;
    const uint32_t limit = 1u << 20;
    if (p->n_vocab < 259 || p->n_vocab > (1u << 24))
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "synth: n_vocab %u must be in [259, 2^24] "
                      "(3 special and 256 byte tokens at least)",
                      p->n_vocab);
    if (p->n_embd == 0 || p->n_embd > limit || p->n_embd % blck != 0)
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "synth: n_embd %u must be a positive multiple of %u (the %s block size)",
                      p->n_embd, blck, moerun_type_name(p->weight_type));
    if (p->n_ff == 0 || p->n_ff > limit || p->n_ff % blck != 0)
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "synth: n_ff %u must be a positive multiple of %u (the %s block size)",
                      p->n_ff, blck, moerun_type_name(p->weight_type));
    if (p->n_layer == 0 || p->n_layer > 4096)
        return mr_err(MOERUN_ERR_INVALID_ARG, "synth: n_layer %u must be in [1, 4096]", p->n_layer);
    if (p->n_head == 0 || p->n_head > 4096)
        return mr_err(MOERUN_ERR_INVALID_ARG, "synth: n_head %u must be in [1, 4096]", p->n_head);
    if (p->n_head_dim == 0 && (p->n_embd % p->n_head != 0 || (p->n_embd / p->n_head) % 2 != 0))
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "synth: n_head %u must divide n_embd %u into heads of even size "
                      "(or set n_head_dim)",
                      p->n_head, p->n_embd);
    if (p->n_head_dim != 0 &&
        (p->n_head_dim % 2 != 0 || p->n_head_dim > 4096 || p->n_head * p->n_head_dim % blck != 0))
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "synth: n_head_dim %u must be even, <= 4096, and n_head x n_head_dim a "
                      "multiple of %u (the %s block size)",
                      p->n_head_dim, blck, moerun_type_name(p->weight_type));
    if (p->n_head_kv == 0 || p->n_head % p->n_head_kv != 0)
        return mr_err(MOERUN_ERR_INVALID_ARG, "synth: n_head_kv %u must divide n_head %u",
                      p->n_head_kv, p->n_head);
    if (p->n_expert == 0 || p->n_expert > 1024 || p->n_expert_used == 0 ||
        p->n_expert_used > p->n_expert)
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "synth: need 1 <= n_expert_used (%u) <= n_expert (%u) <= 1024",
                      p->n_expert_used, p->n_expert);
    if (p->n_ff_shared > limit || p->n_ff_shared % blck != 0)
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "synth: n_ff_shared %u must be a multiple of %u (the %s block size), "
                      "at most 2^20",
                      p->n_ff_shared, blck, moerun_type_name(p->weight_type));
    if (p->n_ctx == 0)
        return mr_err(MOERUN_ERR_INVALID_ARG, "synth: n_ctx must be positive");
    if (!(p->rope_freq_base >= 0) || !(p->rms_eps > 0))
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "synth: rope_freq_base must be >= 0 (0 = the architecture's) and "
                      "rms_eps > 0");
    return MOERUN_OK;
}

/* --- vocabulary: a byte-level SentencePiece vocab with English-looking pieces ----------------- */

static const char *const synth_words[] = {
    "the",   "of",     "and",  "to",   "in",    "is",     "that",  "it",     "was",    "for",
    "on",    "are",    "as",   "with", "his",   "they",   "at",    "be",     "this",   "have",
    "from",  "or",     "one",  "had",  "by",    "word",   "but",   "not",    "what",   "all",
    "were",  "we",     "when", "your", "can",   "said",   "there", "use",    "an",     "each",
    "which", "she",    "do",   "how",  "their", "if",     "will",  "up",     "other",  "about",
    "out",   "many",   "then", "them", "these", "so",     "some",  "her",    "would",  "make",
    "like",  "him",    "into", "time", "has",   "look",   "two",   "more",   "write",  "go",
    "see",   "number", "no",   "way",  "could", "people", "my",    "than",   "first",  "water",
    "been",  "call",   "who",  "oil",  "its",   "now",    "find",  "long",   "down",   "day",
    "did",   "get",    "come", "made", "may",   "part",   "model", "expert", "memory", "disk",
};

static const char synth_mark[] = "\xe2\x96\x81"; /* U+2581, SentencePiece's space */

/* Candidate piece number i: the words with the word-start mark, then letters, letter pairs and
 * triples, each without and with the mark, then numbered fillers. Later candidates can repeat
 * an earlier word ("an", "the"): write_vocab skips those. */
static void synth_candidate(uint64_t i, char *buf, size_t size) {
    const uint64_t nw = MR_ARRAY_LEN(synth_words);
    if (i < nw) {
        snprintf(buf, size, "%s%s", synth_mark, synth_words[i]);
        return;
    }
    i -= nw;
    if (i < 2 * 26) {
        snprintf(buf, size, "%s%c", i < 26 ? "" : synth_mark, (char)('a' + i % 26));
        return;
    }
    i -= 2 * 26;
    if (i < 2 * 26 * 26) {
        uint64_t j = i % (26 * 26);
        snprintf(buf, size, "%s%c%c", i < 26 * 26 ? "" : synth_mark, (char)('a' + j / 26),
                 (char)('a' + j % 26));
        return;
    }
    i -= 2 * 26 * 26;
    if (i < 2 * 26 * 26 * 26) {
        uint64_t j = i % (26 * 26 * 26);
        snprintf(buf, size, "%s%c%c%c", i < 26 * 26 * 26 ? "" : synth_mark, (char)('a' + j / 676),
                 (char)('a' + j / 26 % 26), (char)('a' + j % 26));
        return;
    }
    snprintf(buf, size, "<extra_%llu>", (unsigned long long)(i - 2 * 26 * 26 * 26));
}

/* Whether candidate text (past the words) repeats one of the words. */
static bool synth_is_word(const char *piece) {
    const size_t nm = sizeof(synth_mark) - 1;
    if (strncmp(piece, synth_mark, nm) != 0)
        return false;
    for (size_t i = 0; i < MR_ARRAY_LEN(synth_words); i++) {
        if (strcmp(piece + nm, synth_words[i]) == 0)
            return true;
    }
    return false;
}

#define SYNTH_PIECE_MAX 32

static int write_vocab(struct gguf_writer *w, uint32_t n_vocab) {
    int rc = MOERUN_ERR_NOMEM;
    char *text = malloc((size_t)n_vocab * SYNTH_PIECE_MAX);
    const char **tokens = malloc((size_t)n_vocab * sizeof(*tokens));
    float *scores = malloc((size_t)n_vocab * sizeof(*scores));
    int32_t *types = malloc((size_t)n_vocab * sizeof(*types));
    if (!text || !tokens || !scores || !types) {
        rc = mr_err(MOERUN_ERR_NOMEM, "synth: out of memory for a vocabulary of %u", n_vocab);
        goto out_free;
    }
    static const char *const special[3] = {"<unk>", "<s>", "</s>"};
    uint64_t cand = 0; /* next candidate piece */
    for (uint32_t id = 0; id < n_vocab; id++) {
        char *t = text + (size_t)id * SYNTH_PIECE_MAX;
        if (id < 3) {
            snprintf(t, SYNTH_PIECE_MAX, "%s", special[id]);
            types[id] = id == 0 ? 2 : 3; /* unknown, control */
            scores[id] = 0.0f;
        } else if (id < 259) {
            snprintf(t, SYNTH_PIECE_MAX, "<0x%02X>", id - 3);
            types[id] = 6; /* byte */
            scores[id] = 0.0f;
        } else {
            do
                synth_candidate(cand++, t, SYNTH_PIECE_MAX);
            while (cand > MR_ARRAY_LEN(synth_words) && synth_is_word(t));
            types[id] = 1; /* normal */
            scores[id] = -(float)(id - 259);
        }
        tokens[id] = t;
    }
    rc = gguf_writer_set_str(w, "tokenizer.ggml.model", "llama");
    if (rc == MOERUN_OK)
        rc = gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", tokens, n_vocab);
    if (rc == MOERUN_OK)
        rc = gguf_writer_set_arr(w, "tokenizer.ggml.scores", GGUF_VT_F32, scores, n_vocab);
    if (rc == MOERUN_OK)
        rc = gguf_writer_set_arr(w, "tokenizer.ggml.token_type", GGUF_VT_I32, types, n_vocab);
    if (rc == MOERUN_OK)
        rc = gguf_writer_set_u32(w, "tokenizer.ggml.unknown_token_id", 0);
    if (rc == MOERUN_OK)
        rc = gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", 1);
    if (rc == MOERUN_OK)
        rc = gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 2);
    if (rc == MOERUN_OK)
        rc = gguf_writer_set_bool(w, "tokenizer.ggml.add_bos_token", true);
    if (rc == MOERUN_OK)
        rc = gguf_writer_set_bool(w, "tokenizer.ggml.add_eos_token", false);
out_free:
    free(types);
    free(scores);
    free(tokens);
    free(text);
    return rc;
}

static int write_metadata(struct gguf_writer *w, const moerun_synth_params *p,
                          const struct synth_arch *arch) {
    char key[96], name[96];
    const char *a = arch->gguf_arch;
    snprintf(name, sizeof(name), "moerun synthetic %s %s", arch->name,
             moerun_type_name(p->weight_type));
    int rc = gguf_writer_set_str(w, "general.architecture", a);
    if (rc == MOERUN_OK)
        rc = gguf_writer_set_str(w, "general.name", name);
    if (rc == MOERUN_OK)
        rc = gguf_writer_set_u64(w, "moerun.synth.seed", p->seed);
    const uint32_t hd = synth_head_dim(p);
    const bool head_dim = (arch->flags & SYNTH_HEAD_DIM) || p->n_head_dim != 0;
    const struct {
        const char *suffix;
        bool present;
        uint32_t value;
    } u32s[] = {
        {"vocab_size", true, p->n_vocab},
        {"context_length", true, p->n_ctx},
        {"embedding_length", true, p->n_embd},
        {"block_count", true, p->n_layer},
        {"feed_forward_length", true, p->n_ff},
        {"expert_feed_forward_length", true, p->n_ff},
        {"expert_shared_feed_forward_length", (arch->flags & SYNTH_SHARED_EXP) != 0,
         synth_ff_shared(p)},
        {"attention.head_count", true, p->n_head},
        {"attention.head_count_kv", true, p->n_head_kv},
        {"attention.key_length", head_dim, hd},
        {"attention.value_length", head_dim, hd},
        {"rope.dimension_count", true, hd},
        {"expert_count", true, p->n_expert},
        {"expert_used_count", true, p->n_expert_used},
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(u32s) && rc == MOERUN_OK; i++) {
        if (!u32s[i].present)
            continue;
        snprintf(key, sizeof(key), "%s.%s", a, u32s[i].suffix);
        rc = gguf_writer_set_u32(w, key, u32s[i].value);
    }
    if (rc == MOERUN_OK) {
        snprintf(key, sizeof(key), "%s.rope.freq_base", a);
        rc = gguf_writer_set_f32(w, key,
                                 p->rope_freq_base > 0 ? p->rope_freq_base : arch->rope_freq_base);
    }
    if (rc == MOERUN_OK) {
        snprintf(key, sizeof(key), "%s.attention.layer_norm_rms_epsilon", a);
        rc = gguf_writer_set_f32(w, key, p->rms_eps);
    }
    if (rc == MOERUN_OK)
        rc = write_vocab(w, p->n_vocab);
    return rc;
}

/* --- weights ------------------------------------------------------------------------------------
 */

#define SYNTH_BATCH_BYTES (8u << 20) /* output bytes generated per batch */

struct synth_batch {
    const struct synth_tensor *t;
    const struct cpu_type_kernels *k;
    uint64_t seed;      /* of the model */
    uint64_t tensor;    /* index in the plan */
    uint64_t row0;      /* first row of the batch */
    uint64_t n_rows;    /* rows in the batch */
    uint64_t row_bytes; /* bytes of a row in the tensor's type */
    float *scratch;     /* [nth][ne0] float rows */
    uint8_t *out;       /* [n_rows][row_bytes] */
};

static void synth_rows(void *arg, int ith, int nth) {
    struct synth_batch *b = arg;
    const uint64_t ne0 = b->t->ne[0];
    float *row = b->scratch + (size_t)ith * ne0;
    for (uint64_t r = (uint64_t)ith; r < b->n_rows; r += (uint64_t)nth) {
        uint64_t state = b->seed;
        state = splitmix64(&state) ^ (b->tensor * 0x9e3779b97f4a7c15ull);
        state = splitmix64(&state) ^ (b->row0 + r);
        for (uint64_t i = 0; i < ne0; i++) {
            float x = synth_normal(&state) * b->t->scale;
            row[i] = b->t->init == INIT_NORM ? 1.0f + x : x;
        }
        b->k->from_float(row, b->out + r * b->row_bytes, (int64_t)ne0);
    }
}

static int write_weights(struct gguf_writer *w, const struct synth_plan *plan, uint64_t seed,
                         struct cpu_pool *pool) {
    const int nth = cpu_pool_size(pool);
    uint64_t max_ne0 = 0, max_row_bytes = 0;
    for (size_t i = 0; i < plan->n; i++) {
        uint64_t rb;
        if (!mr_type_nbytes(plan->t[i].type, plan->t[i].ne[0], &rb))
            return mr_err(MOERUN_ERR_INTERNAL, "synth: bad row size for '%s'", plan->t[i].name);
        max_ne0 = MR_MAX(max_ne0, plan->t[i].ne[0]);
        max_row_bytes = MR_MAX(max_row_bytes, rb);
    }
    /* a batch is floor(SYNTH_BATCH_BYTES / row bytes) rows (at least one) of any tensor */
    const uint64_t batch_bytes_max = MR_MAX((uint64_t)SYNTH_BATCH_BYTES, max_row_bytes);
    int rc = MOERUN_OK;
    float *scratch = malloc((size_t)nth * max_ne0 * sizeof(float));
    uint8_t *out = malloc((size_t)batch_bytes_max);
    if (!scratch || !out) {
        rc = mr_err(MOERUN_ERR_NOMEM, "synth: out of memory for the weight batch");
        goto out_free;
    }
    const enum cpu_isa isa = cpu_isa_best();
    for (size_t ti = 0; ti < plan->n && rc == MOERUN_OK; ti++) {
        const struct synth_tensor *t = &plan->t[ti];
        struct synth_batch b = {
            .t = t,
            .k = cpu_kernels(isa, t->type),
            .seed = seed,
            .tensor = ti,
            .scratch = scratch,
            .out = out,
        };
        if (!b.k || !b.k->from_float) {
            rc = mr_err(MOERUN_ERR_UNSUPPORTED, "synth: no quantizer for %s",
                        moerun_type_name(t->type));
            break;
        }
        mr_type_nbytes(t->type, t->ne[0], &b.row_bytes);
        const uint64_t rows = t->ne[1] * t->ne[2] * t->ne[3];
        const uint64_t per_batch =
            SYNTH_BATCH_BYTES / b.row_bytes ? SYNTH_BATCH_BYTES / b.row_bytes : 1;
        for (uint64_t r0 = 0; r0 < rows && rc == MOERUN_OK; r0 += per_batch) {
            b.row0 = r0;
            b.n_rows = MR_MIN(per_batch, rows - r0);
            cpu_pool_run(pool, synth_rows, &b);
            rc = gguf_writer_write_data(w, out, b.n_rows * b.row_bytes);
        }
    }
out_free:
    free(out);
    free(scratch);
    return rc;
}

int moerun_synth_write(const moerun_synth_params *p, const char *path) {
    mr_err_clear();
    const struct synth_arch *arch = NULL;
    int rc = check_params(p, &arch);
    if (rc != MOERUN_OK)
        return rc;
    if (!path || !*path)
        return mr_err(MOERUN_ERR_INVALID_ARG, "synth: no output path");

    struct synth_plan plan = {0};
    struct gguf_writer *w = NULL;
    struct cpu_pool *pool = NULL;
    char *tmp = NULL;
    int fd = -1;

    rc = plan_build(p, arch->flags, &plan);
    if (rc != MOERUN_OK)
        goto out;
    rc = gguf_writer_create(NULL, &w);
    if (rc != MOERUN_OK)
        goto out;
    rc = write_metadata(w, p, arch);
    for (size_t i = 0; i < plan.n && rc == MOERUN_OK; i++)
        rc = gguf_writer_add_tensor(w, plan.t[i].name, plan.t[i].type, plan.t[i].n_dims,
                                    plan.t[i].ne);
    if (rc != MOERUN_OK)
        goto out;
    rc = cpu_pool_create(p->n_threads, &pool);
    if (rc != MOERUN_OK)
        goto out;

    size_t tmp_len = strlen(path) + 16;
    tmp = malloc(tmp_len);
    if (!tmp) {
        rc = mr_err(MOERUN_ERR_NOMEM, "synth: out of memory");
        goto out;
    }
    snprintf(tmp, tmp_len, "%s.tmpXXXXXX", path);
    fd = mkstemp(tmp);
    if (fd < 0) {
        rc = mr_err_errno(errno, "synth: cannot create a temporary file next to the output");
        goto out;
    }
    rc = gguf_writer_begin(w, fd);
    if (rc == MOERUN_OK)
        rc = write_weights(w, &plan, p->seed, pool);
    if (rc == MOERUN_OK)
        rc = gguf_writer_finish(w);
    if (rc == MOERUN_OK && fchmod(fd, 0644) != 0)
        rc = mr_err_errno(errno, "synth: fchmod");
    if (close(fd) != 0 && rc == MOERUN_OK)
        rc = mr_err_errno(errno, "synth: close");
    fd = -1;
    if (rc == MOERUN_OK && rename(tmp, path) != 0)
        rc = mr_err_errno(errno, "synth: rename to the output path");
    if (rc != MOERUN_OK)
        unlink(tmp);
out:
    if (fd >= 0) {
        close(fd);
        unlink(tmp);
    }
    free(tmp);
    cpu_pool_destroy(pool);
    gguf_writer_destroy(w);
    free(plan.t);
    return rc;
}
