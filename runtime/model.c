/* Models: open a GGUF file, read the hyper-parameters under the architecture's key prefix,
 * and summarise the tensors (bytes by type, expert bytes per layer). */
#include "model.h"
#include "backend.h"
#ifdef MOERUN_HAVE_CUDA
#include "cuda_backend.h"
#endif
#include "gguf.h"
#include "internal.h"
#include "tokenizer.h"
#include "types.h"
#include "offload.h"
#include "weights.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void moerun_model_params_init(moerun_model_params *p) {
    memset(p, 0, sizeof(*p));
    p->struct_size = sizeof(*p);
    p->policy = MOERUN_POLICY_LRU;
    p->prefetch = MOERUN_PREFETCH_AUTO;
    p->prefetch_layers = 1;
    p->direct_io = 1;
}

/* <arch>.<suffix> as u32; absent keys leave *out unchanged. */
static int arch_u32(const struct gguf_ctx *g, const char *arch, const char *suffix, uint32_t *out) {
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    int rc = gguf_get_u32(g, key, out);
    return rc < 0 ? rc : MOERUN_OK;
}

static int arch_f32(const struct gguf_ctx *g, const char *arch, const char *suffix, float *out) {
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    int rc = gguf_get_f32(g, key, out);
    return rc < 0 ? rc : MOERUN_OK;
}

static int read_hparams(moerun_model *m) {
    const struct gguf_ctx *g = m->gguf;
    moerun_model_info *in = &m->info;
    struct gguf_str s;
    int rc = gguf_get_str(g, "general.architecture", &s);
    if (rc < 0)
        return rc;
    if (rc == 1)
        return mr_err(MOERUN_ERR_FORMAT, "model: the file has no general.architecture");
    if (s.len == 0 || s.len >= sizeof(in->arch) || memchr(s.ptr, '\0', s.len))
        return mr_err(MOERUN_ERR_FORMAT, "model: general.architecture is not a valid name");
    memcpy(in->arch, s.ptr, s.len);
    in->arch[s.len] = '\0';
    rc = gguf_get_str(g, "general.name", &s);
    if (rc < 0)
        return rc;
    if (rc == MOERUN_OK)
        snprintf(in->name, sizeof(in->name), "%.*s", (int)MR_MIN(s.len, sizeof(in->name) - 1),
                 s.ptr);

    const char *a = in->arch;
    in->rope_freq_base = 10000.0f;
    const struct {
        const char *suffix;
        uint32_t *out;
    } u32s[] = {
        {"context_length", &in->n_ctx_train},
        {"embedding_length", &in->n_embd},
        {"block_count", &in->n_layer},
        {"feed_forward_length", &in->n_ff},
        {"expert_feed_forward_length", &in->n_ff_exp},
        {"attention.head_count", &in->n_head},
        {"attention.head_count_kv", &in->n_head_kv},
        {"rope.dimension_count", &in->n_rot},
        {"expert_count", &in->n_expert},
        {"expert_used_count", &in->n_expert_used},
        {"vocab_size", &in->n_vocab},
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(u32s) && rc >= 0; i++)
        rc = arch_u32(g, a, u32s[i].suffix, u32s[i].out);
    if (rc >= 0)
        rc = arch_f32(g, a, "rope.freq_base", &in->rope_freq_base);
    if (rc >= 0)
        rc = arch_f32(g, a, "attention.layer_norm_rms_epsilon", &in->rms_eps);
    if (rc < 0)
        return rc;
    if (in->n_head_kv == 0)
        in->n_head_kv = in->n_head;
    if (in->n_rot == 0 && in->n_head != 0)
        in->n_rot = in->n_embd / in->n_head;

    /* the vocabulary size: the tokenizer's list, else the embedding matrix */
    struct gguf_array tokens;
    rc = gguf_get_arr(g, "tokenizer.ggml.tokens", &tokens);
    if (rc < 0)
        return rc;
    if (rc == MOERUN_OK) {
        if (tokens.n > UINT32_MAX)
            return mr_err(MOERUN_ERR_FORMAT, "model: tokenizer.ggml.tokens has %llu entries",
                          (unsigned long long)tokens.n);
        in->n_vocab = (uint32_t)tokens.n;
    } else {
        const struct gguf_tensor *t = gguf_get_tensor(g, "token_embd.weight");
        if (t && t->n_dims >= 2 && t->ne[1] <= UINT32_MAX && in->n_vocab == 0)
            in->n_vocab = (uint32_t)t->ne[1];
    }
    return MOERUN_OK;
}

/* "blk.<il>.<rest>": the layer index, or -1. */
static int64_t tensor_layer(const char *name, const char **rest) {
    if (strncmp(name, "blk.", 4) != 0)
        return -1;
    char *end;
    unsigned long long il = strtoull(name + 4, &end, 10);
    if (end == name + 4 || *end != '.' || il > UINT32_MAX)
        return -1;
    *rest = end + 1;
    return (int64_t)il;
}

static bool is_expert_tensor(const char *rest) {
    static const char *const names[] = {"ffn_gate_exps.weight", "ffn_up_exps.weight",
                                        "ffn_down_exps.weight"};
    for (size_t i = 0; i < MR_ARRAY_LEN(names); i++) {
        if (strcmp(rest, names[i]) == 0)
            return true;
    }
    return false;
}

static int summarise_tensors(moerun_model *m) {
    const struct gguf_ctx *g = m->gguf;
    moerun_model_info *in = &m->info;
    /* every layer has tensors: a block_count beyond the tensor count (itself bounded by the
     * file's size) is not a model, and must not size an allocation. A file without tensors
     * (vocabulary only) has no per-layer figures. */
    if (g->n_tensors > 0 && in->n_layer > g->n_tensors)
        return mr_err(MOERUN_ERR_FORMAT, "model: block_count %u but the file has %llu tensors",
                      in->n_layer, (unsigned long long)g->n_tensors);
    if (in->n_layer > 0 && g->n_tensors > 0) {
        m->layers = mr_calloc(m->params.allocator, in->n_layer, sizeof(*m->layers));
        if (!m->layers)
            return mr_err(MOERUN_ERR_NOMEM, "model: out of memory for %u layers", in->n_layer);
    }
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const struct gguf_tensor *t = &g->tensors[i];
        m->type_tensors[t->type]++;
        m->type_bytes[t->type] += t->nbytes;
        in->tensor_bytes += t->nbytes;
        const char *rest;
        int64_t il = tensor_layer(t->name.ptr, &rest);
        if (il < 0 || !is_expert_tensor(rest))
            continue;
        if ((uint64_t)il >= in->n_layer)
            return mr_err(MOERUN_ERR_FORMAT,
                          "model: tensor '%s' at offset %llu: layer %lld but block_count is %u",
                          t->name.ptr, (unsigned long long)t->info_offset, (long long)il,
                          in->n_layer);
        if (t->n_dims != 3 || t->ne[2] == 0)
            return mr_err(MOERUN_ERR_FORMAT,
                          "model: tensor '%s' at offset %llu: expert tensors have 3 dimensions "
                          "[n_in][n_out][n_expert]",
                          t->name.ptr, (unsigned long long)t->info_offset);
        if (in->n_expert && t->ne[2] != in->n_expert)
            return mr_err(MOERUN_ERR_FORMAT,
                          "model: tensor '%s' at offset %llu: %llu experts but expert_count is %u",
                          t->name.ptr, (unsigned long long)t->info_offset,
                          (unsigned long long)t->ne[2], in->n_expert);
        m->layers[il].all_bytes += t->nbytes;
        m->layers[il].one_bytes += t->nbytes / t->ne[2];
        in->expert_bytes += t->nbytes;
        if (in->n_ff_exp == 0 && strcmp(rest, "ffn_gate_exps.weight") == 0 &&
            t->ne[1] <= UINT32_MAX)
            in->n_ff_exp = (uint32_t)t->ne[1];
    }
    return MOERUN_OK;
}

int moerun_device_count(int device) {
    if (device == MOERUN_DEVICE_CPU || device == MOERUN_DEVICE_SIM)
        return 1;
#ifdef MOERUN_HAVE_CUDA
    int n = 0;
    if (device == MOERUN_DEVICE_CUDA && cuda_device_count(&n) == MOERUN_OK)
        return n;
#endif
    return 0;
}

/* The device sessions compute on: its root instance (the tiers use it; sessions clone it). */
static int backend_open(moerun_model *m) {
    const moerun_model_params *p = &m->params;
    if (p->device < MOERUN_DEVICE_CPU || p->device > MOERUN_DEVICE_SIM)
        return mr_err(MOERUN_ERR_INVALID_ARG, "model: unknown device %d", p->device);
    if (p->device != MOERUN_DEVICE_CPU && p->use_mmap)
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "model: use_mmap computes from the page cache on the CPU; it does not "
                      "combine with a GPU");
    static const enum mr_backend_kind kinds[] = {MR_BACKEND_CPU, MR_BACKEND_CUDA, MR_BACKEND_SIM};
    struct mr_backend_config cfg = {
        .kind = kinds[p->device],
        .device = p->gpu_index,
        .n_threads = 1, /* sessions make their own pools */
        .allocator = p->allocator,
    };
    int rc = mr_backend_create(&cfg, &m->be);
    if (rc == MOERUN_OK && p->device != MOERUN_DEVICE_CPU)
        mr_log_info("model: computing on %s", m->be->ops->describe(m->be));
    return rc;
}

int moerun_model_open(const char *path, const moerun_model_params *params, moerun_model **out) {
    mr_err_clear();
    if (!out)
        return mr_err(MOERUN_ERR_INVALID_ARG, "moerun_model_open: out is NULL");
    *out = NULL;
    if (!path)
        return mr_err(MOERUN_ERR_INVALID_ARG, "moerun_model_open: path is NULL");
    moerun_model_params defaults;
    moerun_model_params_init(&defaults);
    int rc = mr_params_merge(&defaults, sizeof(defaults), params, "moerun_model_open");
    if (rc != MOERUN_OK)
        return rc;

    moerun_model *m = mr_calloc(defaults.allocator, 1, sizeof(*m));
    if (!m)
        return mr_err(MOERUN_ERR_NOMEM, "model: out of memory");
    m->params = defaults;
    rc = gguf_open_file(path, m->params.allocator, &m->gguf);
    if (rc == MOERUN_OK)
        rc = read_hparams(m);
    if (rc == MOERUN_OK)
        rc = summarise_tensors(m);
    if (rc == MOERUN_OK) {
        rc = vocab_load(m->gguf, m->params.allocator, &m->vocab);
        if (rc == 1)
            rc = MOERUN_OK; /* no tokenizer: token ids only */
    }
    if (rc == MOERUN_OK && !m->params.metadata_only)
        rc = backend_open(m);
    if (rc == MOERUN_OK && !m->params.metadata_only)
        rc = weights_load(m, path);
    if (rc == MOERUN_OK && m->w && !m->cw)
        m->cw = m->w;
    if (rc != MOERUN_OK) {
        moerun_model_close(m);
        return rc;
    }
    const struct gguf_ctx *g = m->gguf;
    m->info.struct_size = sizeof(m->info);
    m->info.gguf_version = g->version;
    m->info.alignment = g->alignment;
    m->info.file_bytes = g->file_size;
    m->info.data_offset = g->data_offset;
    m->info.n_kv = g->n_kv;
    m->info.n_tensors = g->n_tensors;
    *out = m;
    return MOERUN_OK;
}

void moerun_model_close(moerun_model *m) {
    if (!m)
        return;
    const moerun_allocator *a = m->params.allocator;
    offload_close(m);
    weights_free(m);
    mr_backend_destroy(m->be);
    vocab_free(m->vocab);
    gguf_close(m->gguf);
    mr_free(a, m->layers);
    mr_free(a, m);
}

int moerun_model_get_info(const moerun_model *m, moerun_model_info *info) {
    if (!m || !info || info->struct_size < sizeof(size_t))
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "moerun_model_get_info: NULL argument or struct_size not set");
    size_t n = MR_MIN(info->struct_size, sizeof(*info));
    memcpy(info, &m->info, n);
    info->struct_size = n;
    return MOERUN_OK;
}

int moerun_model_type_bytes(const moerun_model *m, int type, uint64_t *n_tensors, uint64_t *bytes) {
    if (!m || !mr_type_info(type))
        return mr_err(MOERUN_ERR_INVALID_ARG, "moerun_model_type_bytes: bad model or type %d",
                      type);
    if (n_tensors)
        *n_tensors = m->type_tensors[type];
    if (bytes)
        *bytes = m->type_bytes[type];
    return MOERUN_OK;
}

int moerun_model_layer_expert_bytes(const moerun_model *m, uint32_t il, uint64_t *all_experts,
                                    uint64_t *one_expert) {
    if (!m)
        return mr_err(MOERUN_ERR_INVALID_ARG, "moerun_model_layer_expert_bytes: model is NULL");
    if (il >= m->info.n_layer)
        return mr_err(MOERUN_ERR_RANGE, "layer %u out of range (the model has %u)", il,
                      m->info.n_layer);
    if (all_experts)
        *all_experts = m->layers ? m->layers[il].all_bytes : 0;
    if (one_expert)
        *one_expert = m->layers ? m->layers[il].one_bytes : 0;
    return MOERUN_OK;
}

const char *moerun_model_meta_key(const moerun_model *m, uint64_t i) {
    if (!m || i >= m->gguf->n_kv)
        return NULL;
    return m->gguf->kv[i].key.ptr;
}

int moerun_model_meta_value_str(const moerun_model *m, uint64_t i, char *buf, size_t size) {
    if (!m || i >= m->gguf->n_kv)
        return mr_err(MOERUN_ERR_RANGE, "metadata index out of range");
    return gguf_value_format(&m->gguf->kv[i].value, buf, size);
}

int moerun_model_get_stats(const moerun_model *m, moerun_stats *stats) {
    if (!m || !stats || stats->struct_size < sizeof(size_t))
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "moerun_model_get_stats: NULL argument or struct_size not set");
    if (m->offload) {
        offload_get_stats(m->offload, stats);
        return MOERUN_OK;
    }
    size_t n = MR_MIN(stats->struct_size, sizeof(*stats));
    memset(stats, 0, n);
    stats->struct_size = n;
    return MOERUN_OK;
}

void moerun_model_reset_stats(moerun_model *m) {
    if (m && m->offload)
        offload_reset_stats(m->offload);
}
