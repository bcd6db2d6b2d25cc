/* Weights: hyper-parameters of the architecture, tensors bound to their roles with checked
 * types and shapes, and the tensor data read into memory. */
#include "weights.h"
#include "internal.h"
#include "model.h"
#include "offload.h"
#include "types.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* <arch>.<suffix> as u32: MOERUN_OK, 1 when absent (out unchanged), or an error. */
static int hp_u32(const struct gguf_ctx *g, const char *arch, const char *suffix, uint32_t *out) {
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    return gguf_get_u32(g, key, out);
}

static int hp_required(const struct gguf_ctx *g, const char *arch, const char *suffix,
                       uint32_t *out) {
    int rc = hp_u32(g, arch, suffix, out);
    if (rc == 1)
        return mr_err(MOERUN_ERR_FORMAT, "model: missing hyper-parameter %s.%s", arch, suffix);
    if (rc == MOERUN_OK && *out == 0)
        return mr_err(MOERUN_ERR_FORMAT, "model: %s.%s is 0", arch, suffix);
    return rc;
}

static int read_hparams(const struct moerun_model *m, struct mr_hparams *hp) {
    const struct gguf_ctx *g = m->gguf;
    const char *a = m->info.arch;
    char key[128];
    int rc;
    memset(hp, 0, sizeof(*hp));
    if ((rc = hp_required(g, a, "embedding_length", &hp->n_embd)) < 0 ||
        (rc = hp_required(g, a, "block_count", &hp->n_layer)) < 0 ||
        (rc = hp_required(g, a, "attention.head_count", &hp->n_head)) < 0)
        return rc;
    if (hp_u32(g, a, "expert_count", &hp->n_expert) == 1 || hp->n_expert == 0)
        return mr_err(MOERUN_ERR_UNSUPPORTED,
                      "model: %s.expert_count is missing: dense (non-MoE) models are not "
                      "supported",
                      a);
    if ((rc = hp_required(g, a, "expert_used_count", &hp->n_expert_used)) < 0)
        return rc;
    hp->n_head_kv = hp->n_head;
    if ((rc = hp_u32(g, a, "attention.head_count_kv", &hp->n_head_kv)) < 0)
        return rc;
    if (hp->n_layer > 65536 || hp->n_embd > (1u << 20) || hp->n_head > 4096 || hp->n_expert > 4096)
        return mr_err(MOERUN_ERR_FORMAT,
                      "model: implausible hyper-parameters (layers %u, "
                      "embedding %u, heads %u, experts %u)",
                      hp->n_layer, hp->n_embd, hp->n_head, hp->n_expert);
    if (hp->n_head_kv == 0 || hp->n_head % hp->n_head_kv != 0)
        return mr_err(MOERUN_ERR_FORMAT,
                      "model: %s.attention.head_count_kv (%u) must divide head_count (%u)", a,
                      hp->n_head_kv, hp->n_head);
    if (hp->n_expert_used > hp->n_expert)
        return mr_err(MOERUN_ERR_FORMAT, "model: %s.expert_used_count (%u) > expert_count (%u)", a,
                      hp->n_expert_used, hp->n_expert);

    hp->head_dim = hp->n_embd % hp->n_head == 0 ? hp->n_embd / hp->n_head : 0;
    if ((rc = hp_u32(g, a, "attention.key_length", &hp->head_dim)) < 0)
        return rc;
    uint32_t v_len = hp->head_dim;
    if ((rc = hp_u32(g, a, "attention.value_length", &v_len)) < 0)
        return rc;
    if (hp->head_dim == 0 || hp->head_dim > 4096 || v_len != hp->head_dim)
        return mr_err(MOERUN_ERR_FORMAT,
                      "model: head size %u (key) / %u (value) is not usable (embedding %u, "
                      "%u heads)",
                      hp->head_dim, v_len, hp->n_embd, hp->n_head);
    hp->n_rot = hp->head_dim;
    if ((rc = hp_u32(g, a, "rope.dimension_count", &hp->n_rot)) < 0)
        return rc;
    if (hp->n_rot == 0 || hp->n_rot % 2 != 0 || hp->n_rot > hp->head_dim)
        return mr_err(MOERUN_ERR_FORMAT,
                      "model: %s.rope.dimension_count %u must be even and at most the head size %u",
                      a, hp->n_rot, hp->head_dim);
    hp->n_ctx_train = m->info.n_ctx_train ? m->info.n_ctx_train : 4096;
    hp->rope_base = m->info.rope_freq_base;
    hp->rms_eps = m->info.rms_eps;
    snprintf(key, sizeof(key), "%s.attention.layer_norm_rms_epsilon", a);
    if (!gguf_get_kv(g, key))
        return mr_err(MOERUN_ERR_FORMAT, "model: missing hyper-parameter %s", key);
    if (!(hp->rms_eps > 0) || !(hp->rope_base > 0))
        return mr_err(MOERUN_ERR_FORMAT, "model: rms epsilon (%g) and rope base (%g) must be > 0",
                      hp->rms_eps, hp->rope_base);
    return MOERUN_OK;
}

/* Bind one tensor: present with the expected shape (unused dims 1) and an allowed type. */
enum bind_rule {
    BIND_MATRIX,   /* any supported weight type */
    BIND_F32,      /* norms and biases */
    BIND_OPTIONAL, /* a matrix that may be absent */
};

static int bind(const struct gguf_ctx *g, struct mr_weight *w, const char *name,
                enum bind_rule rule, uint64_t ne0, uint64_t ne1, uint64_t ne2) {
    const struct gguf_tensor *t = gguf_get_tensor(g, name);
    memset(w, 0, sizeof(*w));
    if (!t) {
        if (rule == BIND_OPTIONAL)
            return MOERUN_OK;
        return mr_err(MOERUN_ERR_FORMAT, "model: missing tensor '%s'", name);
    }
    const uint64_t want[4] = {ne0, ne1, ne2, 1};
    if (memcmp(t->ne, want, sizeof(want)) != 0)
        return mr_err(MOERUN_ERR_FORMAT,
                      "model: tensor '%s' at offset %llu has shape [%llu, %llu, %llu, %llu], "
                      "expected [%llu, %llu, %llu]",
                      name, (unsigned long long)t->info_offset, (unsigned long long)t->ne[0],
                      (unsigned long long)t->ne[1], (unsigned long long)t->ne[2],
                      (unsigned long long)t->ne[3], (unsigned long long)ne0,
                      (unsigned long long)ne1, (unsigned long long)ne2);
    if (rule == BIND_F32 ? t->type != MOERUN_TYPE_F32 : !moerun_type_is_supported(t->type))
        return mr_err(MOERUN_ERR_UNSUPPORTED, "model: tensor '%s' has type %s, %s", name,
                      moerun_type_name(t->type) ? moerun_type_name(t->type) : "?",
                      rule == BIND_F32 ? "expected F32" : "which moerun does not compute with");
    w->type = t->type;
    memcpy(w->ne, t->ne, sizeof(w->ne));
    mr_type_nbytes(t->type, t->ne[0], &w->row_bytes);
    w->matrix_bytes = w->row_bytes * t->ne[1];
    /* data is set once the data section is in memory: keep the file offset for now */
    w->data = (const uint8_t *)(uintptr_t)t->offset;
    return MOERUN_OK;
}

static int bind_layer(const struct gguf_ctx *g, const struct mr_arch *arch,
                      const struct mr_hparams *hp, uint32_t il, struct mr_layer *l) {
    const uint64_t d = hp->n_embd, q = (uint64_t)hp->n_head * hp->head_dim,
                   kv = (uint64_t)hp->n_head_kv * hp->head_dim, E = hp->n_expert;
    char name[96];
#define BIND(field, suffix, rule, a, b, c)                                                         \
    do {                                                                                           \
        snprintf(name, sizeof(name), "blk.%u.%s", il, suffix);                                     \
        int rc_ = bind(g, &l->field, name, rule, a, b, c);                                         \
        if (rc_ != MOERUN_OK)                                                                      \
            return rc_;                                                                            \
    } while (0)

    BIND(attn_norm, "attn_norm.weight", BIND_F32, d, 1, 1);
    BIND(wq, "attn_q.weight", BIND_MATRIX, d, q, 1);
    BIND(wk, "attn_k.weight", BIND_MATRIX, d, kv, 1);
    BIND(wv, "attn_v.weight", BIND_MATRIX, d, kv, 1);
    BIND(wo, "attn_output.weight", BIND_MATRIX, q, d, 1);
    if (arch->qkv_bias) {
        BIND(bq, "attn_q.bias", BIND_F32, q, 1, 1);
        BIND(bk, "attn_k.bias", BIND_F32, kv, 1, 1);
        BIND(bv, "attn_v.bias", BIND_F32, kv, 1, 1);
    }
    if (arch->qk_norm == MR_QK_NORM_HEAD) {
        BIND(q_norm, "attn_q_norm.weight", BIND_F32, hp->head_dim, 1, 1);
        BIND(k_norm, "attn_k_norm.weight", BIND_F32, hp->head_dim, 1, 1);
    } else if (arch->qk_norm == MR_QK_NORM_FULL) {
        BIND(q_norm, "attn_q_norm.weight", BIND_F32, q, 1, 1);
        BIND(k_norm, "attn_k_norm.weight", BIND_F32, kv, 1, 1);
    }
    BIND(ffn_norm, "ffn_norm.weight", BIND_F32, d, 1, 1);
    BIND(router, "ffn_gate_inp.weight", BIND_MATRIX, d, E, 1);
    BIND(gate_exps, "ffn_gate_exps.weight", BIND_MATRIX, d, hp->n_ff_exp, E);
    BIND(up_exps, "ffn_up_exps.weight", BIND_MATRIX, d, hp->n_ff_exp, E);
    BIND(down_exps, "ffn_down_exps.weight", BIND_MATRIX, hp->n_ff_exp, d, E);
    if (arch->shared_expert) {
        BIND(sh_gate_inp, "ffn_gate_inp_shexp.weight", BIND_MATRIX, d, 1, 1);
        BIND(sh_gate, "ffn_gate_shexp.weight", BIND_MATRIX, d, hp->n_ff_shexp, 1);
        BIND(sh_up, "ffn_up_shexp.weight", BIND_MATRIX, d, hp->n_ff_shexp, 1);
        BIND(sh_down, "ffn_down_shexp.weight", BIND_MATRIX, hp->n_ff_shexp, d, 1);
    }
#undef BIND
    return MOERUN_OK;
}

/* Widths the metadata may omit come from the first layer's tensors, checked against the keys
 * that are present. */
static int ffn_widths(const struct gguf_ctx *g, const struct mr_arch *arch, const char *a,
                      struct mr_hparams *hp) {
    const struct gguf_tensor *t = gguf_get_tensor(g, "blk.0.ffn_gate_exps.weight");
    if (!t) {
        if (gguf_get_tensor(g, "blk.0.ffn_gate.0.weight"))
            return mr_err(MOERUN_ERR_UNSUPPORTED,
                          "model: experts stored as separate tensors per expert (an old GGUF "
                          "layout); convert the model again with a current llama.cpp");
        return mr_err(MOERUN_ERR_FORMAT, "model: missing tensor 'blk.0.ffn_gate_exps.weight'");
    }
    if (t->ne[1] > UINT32_MAX)
        return mr_err(MOERUN_ERR_FORMAT, "model: 'blk.0.ffn_gate_exps.weight' is too wide");
    hp->n_ff_exp = (uint32_t)t->ne[1];
    uint32_t key_ff = hp->n_ff_exp;
    int rc = hp_u32(g, a, "expert_feed_forward_length", &key_ff);
    if (rc < 0)
        return rc;
    if (key_ff != hp->n_ff_exp)
        return mr_err(MOERUN_ERR_FORMAT,
                      "model: %s.expert_feed_forward_length %u but the expert tensors are %u wide",
                      a, key_ff, hp->n_ff_exp);
    if (!arch->shared_expert)
        return MOERUN_OK;
    t = gguf_get_tensor(g, "blk.0.ffn_gate_shexp.weight");
    if (!t)
        return mr_err(MOERUN_ERR_FORMAT, "model: missing tensor 'blk.0.ffn_gate_shexp.weight'");
    if (t->ne[1] > UINT32_MAX)
        return mr_err(MOERUN_ERR_FORMAT, "model: 'blk.0.ffn_gate_shexp.weight' is too wide");
    hp->n_ff_shexp = (uint32_t)t->ne[1];
    uint32_t key_sh = hp->n_ff_shexp;
    if ((rc = hp_u32(g, a, "expert_shared_feed_forward_length", &key_sh)) < 0)
        return rc;
    if (key_sh != hp->n_ff_shexp)
        return mr_err(MOERUN_ERR_FORMAT,
                      "model: %s.expert_shared_feed_forward_length %u but the shared expert is "
                      "%u wide",
                      a, key_sh, hp->n_ff_shexp);
    return MOERUN_OK;
}

static void rebase(struct mr_weight *w, uint8_t *data, uint64_t data_offset) {
    if (w->row_bytes) /* bound: data holds its absolute file offset */
        w->data = data + ((uint64_t)(uintptr_t)w->data - data_offset);
}

static int read_data(struct mr_weights *w, const struct gguf_ctx *g, const char *path,
                     const moerun_allocator *a) {
    w->data_bytes = g->file_size - MR_MIN(g->data_offset, g->file_size);
    w->data = mr_alloc(a, w->data_bytes, 64);
    if (!w->data)
        return mr_err(MOERUN_ERR_NOMEM, "model: cannot allocate %llu bytes for the weights",
                      (unsigned long long)w->data_bytes);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return mr_err_errno(errno, "model: open for reading the weights");
    int rc = MOERUN_OK;
    uint64_t done = 0;
    while (done < w->data_bytes) {
        size_t want = (size_t)MR_MIN(w->data_bytes - done, 64ull << 20);
        ssize_t got = pread(fd, w->data + done, want, (off_t)(g->data_offset + done));
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0) {
            rc = mr_err_errno(errno, "model: reading the weights");
            break;
        }
        if (got == 0) {
            rc = mr_err(MOERUN_ERR_FORMAT, "model: the file ended at %llu while reading weights",
                        (unsigned long long)(g->data_offset + done));
            break;
        }
        done += (uint64_t)got;
    }
    close(fd);
    return rc;
}

/* The file mapped read-only: weights come from the page cache on demand. */
static int map_data(struct mr_weights *w, const struct gguf_ctx *g, const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return mr_err_errno(errno, "model: open for mapping");
    void *map = mmap(NULL, (size_t)g->file_size, PROT_READ, MAP_SHARED, fd, 0);
    int e = errno;
    close(fd);
    if (map == MAP_FAILED)
        return mr_err_errno(e, "model: mmap");
    w->map = map;
    w->map_bytes = g->file_size;
    w->data = (uint8_t *)map + g->data_offset;
    w->data_bytes = g->file_size - g->data_offset;
    return MOERUN_OK;
}

int weights_load(struct moerun_model *m, const char *path) {
    const moerun_allocator *a = m->params.allocator;
    const struct gguf_ctx *g = m->gguf;
    const struct mr_arch *arch = mr_arch_find(m->info.arch);
    if (!arch)
        return mr_err(MOERUN_ERR_UNSUPPORTED,
                      "model: architecture '%s' is not supported (supported: llama (Mixtral), "
                      "qwen2moe, qwen3moe, olmoe)",
                      m->info.arch);
    struct mr_weights *w = mr_calloc(a, 1, sizeof(*w));
    if (!w)
        return mr_err(MOERUN_ERR_NOMEM, "model: out of memory");
    m->w = w;
    w->arch = arch;
    struct mr_hparams *hp = &w->hp;
    int rc = read_hparams(m, hp);
    if (rc == MOERUN_OK)
        rc = ffn_widths(g, arch, m->info.arch, hp);
    if (rc != MOERUN_OK)
        return rc;

    const struct gguf_tensor *emb = gguf_get_tensor(g, "token_embd.weight");
    if (!emb)
        return mr_err(MOERUN_ERR_FORMAT, "model: missing tensor 'token_embd.weight'");
    if (emb->ne[1] > (1u << 24))
        return mr_err(MOERUN_ERR_FORMAT, "model: vocabulary of %llu tokens is too large",
                      (unsigned long long)emb->ne[1]);
    hp->n_vocab = (uint32_t)emb->ne[1];
    if (m->info.n_vocab && m->info.n_vocab != hp->n_vocab)
        return mr_err(MOERUN_ERR_FORMAT,
                      "model: the tokenizer has %u tokens but token_embd.weight has %u rows",
                      m->info.n_vocab, hp->n_vocab);
    const uint64_t d = hp->n_embd;
    if ((rc = bind(g, &w->tok_embd, "token_embd.weight", BIND_MATRIX, d, hp->n_vocab, 1)) ||
        (rc = bind(g, &w->output_norm, "output_norm.weight", BIND_F32, d, 1, 1)) ||
        (rc = bind(g, &w->output, "output.weight", BIND_OPTIONAL, d, hp->n_vocab, 1)))
        return rc;
    if (!w->output.row_bytes)
        w->output = w->tok_embd; /* tied embeddings */

    if (hp->n_layer > g->n_tensors) /* bounds the allocation below by the file's size */
        return mr_err(MOERUN_ERR_FORMAT, "model: block_count %u but the file has %llu tensors",
                      hp->n_layer, (unsigned long long)g->n_tensors);
    w->layers = mr_calloc(a, hp->n_layer, sizeof(*w->layers));
    if (!w->layers)
        return mr_err(MOERUN_ERR_NOMEM, "model: out of memory for %u layers", hp->n_layer);
    for (uint32_t il = 0; il < hp->n_layer && rc == MOERUN_OK; il++)
        rc = bind_layer(g, arch, hp, il, &w->layers[il]);
    if (rc != MOERUN_OK)
        return rc;
    /* tiers (a host budget, or a GPU): the weights stay in the file */
    if (m->params.host_bytes || m->params.device != MOERUN_DEVICE_CPU)
        return offload_open(m, path);
    rc = m->params.use_mmap ? map_data(w, g, path) : read_data(w, g, path, a);
    if (rc != MOERUN_OK)
        return rc;

    rebase(&w->tok_embd, w->data, g->data_offset);
    rebase(&w->output_norm, w->data, g->data_offset);
    rebase(&w->output, w->data, g->data_offset);
    for (uint32_t il = 0; il < hp->n_layer; il++) {
        struct mr_weight *first = &w->layers[il].attn_norm;
        size_t n = sizeof(struct mr_layer) / sizeof(struct mr_weight);
        for (size_t i = 0; i < n; i++)
            rebase(&first[i], w->data, g->data_offset);
    }
    return MOERUN_OK;
}

void weights_free(struct moerun_model *m) {
    if (!m->w)
        return;
    const moerun_allocator *a = m->params.allocator;
    if (m->w->map)
        munmap(m->w->map, (size_t)m->w->map_bytes);
    else
        mr_free(a, m->w->data);
    mr_free(a, m->w->layers);
    mr_free(a, m->w);
    m->w = NULL;
}
