/* A float64 reference forward pass (see ref_forward.h), llama2.c style: a config, the weights
 * (every one dequantized to double), a run state, and one function per layer part, following
 * docs/architectures.md. It shares only the GGUF reader and the scalar dequantizers with the
 * engine. */
#include "ref_forward.h"

#include "cpu/quants.h"
#include "gguf.h"
#include "moerun.h"
#include "types.h"

#include <fcntl.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum ref_arch { REF_LLAMA, REF_QWEN2MOE, REF_QWEN3MOE, REF_OLMOE };

struct ref_config {
    enum ref_arch arch;
    uint32_t d;       /* n_embd */
    uint32_t n_layer; /* L */
    uint32_t n_head;  /* H */
    uint32_t n_kv;    /* H_kv */
    uint32_t hd;      /* head size */
    uint32_t n_rot;   /* rotated dims of a head */
    uint32_t n_exp;   /* E */
    uint32_t k;       /* experts used */
    uint32_t f;       /* expert FFN width (from the tensors) */
    uint32_t f_sh;    /* shared-expert FFN width (qwen2moe) */
    uint32_t n_vocab;
    double eps;
    double base; /* RoPE */
};

/* One weight in double: [ne2][ne1][ne0], rows of ne0. */
struct ref_mat {
    double *w;
    uint64_t ne0, ne1, ne2;
    int type; /* the stored type (for the companion type of the inputs) */
};

struct ref_layer {
    struct ref_mat attn_norm;               /* [d] */
    struct ref_mat wq, wk, wv;              /* [d, H*hd], [d, H_kv*hd] x2 */
    struct ref_mat bq, bk, bv;              /* qwen2moe biases */
    struct ref_mat q_norm, k_norm;          /* qwen3moe [hd]; olmoe [H*hd], [H_kv*hd] */
    struct ref_mat wo;                      /* [H*hd, d] */
    struct ref_mat ffn_norm;                /* [d] */
    struct ref_mat router;                  /* [d, E] */
    struct ref_mat gate, up, down;          /* [d, f, E], [d, f, E], [f, d, E] */
    struct ref_mat sh_inp;                  /* qwen2moe: [d] */
    struct ref_mat sh_gate, sh_up, sh_down; /* [d, f_sh] x2, [f_sh, d] */
};

struct ref_weights {
    struct ref_mat tok_embd; /* [d, n_vocab] */
    struct ref_mat out_norm; /* [d] */
    struct ref_mat out;      /* [d, n_vocab] (token_embd when tied) */
    struct ref_layer *layers;
};

struct ref_state {
    double *x, *h, *q, *k, *v, *att, *o, *y; /* activations of one token */
    double *g, *u, *r;                       /* expert FFN and router */
    double *xr;                              /* a rounded matrix input */
    float *tf;                               /* float scratch for rounding */
    void *tq;                                /* quantized scratch for rounding */
    double *kcache, *vcache;                 /* [L][n][H_kv*hd] */
};

struct ref_ctx {
    struct ref_config c;
    struct ref_weights w;
    struct ref_state s;
    int round_acts;
    size_t n_ctx;
    double min_gap; /* between the k-th and (k+1)-th router logit */
};

/* --- loading -------------------------------------------------------------------------------- */

static int ref_fail(int rc, const char *what, const char *name) {
    fprintf(stderr, "ref_forward: %s%s%s%s\n", what, name ? " '" : "", name ? name : "",
            name ? "'" : "");
    return rc;
}

static int get_u32(const struct gguf_ctx *g, const char *arch, const char *suffix, uint32_t *out,
                   bool required) {
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    int rc = gguf_get_u32(g, key, out);
    if (rc < 0 || (rc == 1 && required))
        return ref_fail(MOERUN_ERR_FORMAT, "missing or bad key", key);
    return MOERUN_OK;
}

static int get_f32(const struct gguf_ctx *g, const char *arch, const char *suffix, double *out,
                   bool required) {
    char key[128];
    float v = 0;
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    int rc = gguf_get_f32(g, key, &v);
    if (rc < 0 || (rc == 1 && required))
        return ref_fail(MOERUN_ERR_FORMAT, "missing or bad key", key);
    if (rc == MOERUN_OK)
        *out = v;
    return MOERUN_OK;
}

static int read_config(const struct gguf_ctx *g, struct ref_config *c) {
    struct gguf_str arch;
    if (gguf_get_str(g, "general.architecture", &arch) != MOERUN_OK)
        return ref_fail(MOERUN_ERR_FORMAT, "no general.architecture", NULL);
    static const struct {
        const char *name;
        enum ref_arch arch;
    } archs[] = {{"llama", REF_LLAMA},
                 {"qwen2moe", REF_QWEN2MOE},
                 {"qwen3moe", REF_QWEN3MOE},
                 {"olmoe", REF_OLMOE}};
    size_t ai = 0;
    while (ai < sizeof(archs) / sizeof(archs[0]) && strcmp(archs[ai].name, arch.ptr) != 0)
        ai++;
    if (ai == sizeof(archs) / sizeof(archs[0]))
        return ref_fail(MOERUN_ERR_UNSUPPORTED, "unknown architecture", arch.ptr);
    c->arch = archs[ai].arch;
    const char *a = arch.ptr;
    int rc = get_u32(g, a, "embedding_length", &c->d, true);
    if (rc == MOERUN_OK)
        rc = get_u32(g, a, "block_count", &c->n_layer, true);
    if (rc == MOERUN_OK)
        rc = get_u32(g, a, "attention.head_count", &c->n_head, true);
    if (rc == MOERUN_OK)
        rc = get_u32(g, a, "expert_count", &c->n_exp, true);
    if (rc == MOERUN_OK)
        rc = get_u32(g, a, "expert_used_count", &c->k, true);
    if (rc == MOERUN_OK)
        rc = get_f32(g, a, "attention.layer_norm_rms_epsilon", &c->eps, true);
    if (rc != MOERUN_OK)
        return rc;
    if (c->d == 0 || c->n_head == 0 || c->k == 0 || c->k > c->n_exp)
        return ref_fail(MOERUN_ERR_FORMAT, "bad hyper-parameters", NULL);
    c->n_kv = c->n_head;
    c->hd = c->d / c->n_head;
    c->base = 10000.0;
    rc = get_u32(g, a, "attention.head_count_kv", &c->n_kv, false);
    if (rc == MOERUN_OK)
        rc = get_u32(g, a, "attention.key_length", &c->hd, false);
    if (rc == MOERUN_OK)
        rc = get_f32(g, a, "rope.freq_base", &c->base, false);
    c->n_rot = c->hd;
    if (rc == MOERUN_OK)
        rc = get_u32(g, a, "rope.dimension_count", &c->n_rot, false);
    if (rc != MOERUN_OK)
        return rc;
    if (c->n_kv == 0 || c->n_head % c->n_kv != 0 || c->hd == 0 || c->n_rot % 2 != 0 ||
        c->n_rot > c->hd)
        return ref_fail(MOERUN_ERR_FORMAT, "bad attention hyper-parameters", NULL);
    struct gguf_array toks;
    c->n_vocab = 0;
    if (gguf_get_arr(g, "tokenizer.ggml.tokens", &toks) == MOERUN_OK)
        c->n_vocab = (uint32_t)toks.n;
    else if (gguf_get_tensor(g, "token_embd.weight"))
        c->n_vocab = (uint32_t)gguf_get_tensor(g, "token_embd.weight")->ne[1];
    const struct gguf_tensor *gate = gguf_get_tensor(g, "blk.0.ffn_gate_exps.weight");
    const struct gguf_tensor *shexp = gguf_get_tensor(g, "blk.0.ffn_gate_shexp.weight");
    if (!gate)
        return ref_fail(MOERUN_ERR_FORMAT, "missing tensor", "blk.0.ffn_gate_exps.weight");
    c->f = (uint32_t)gate->ne[1];
    c->f_sh = shexp ? (uint32_t)shexp->ne[1] : 0;
    if (c->arch == REF_QWEN2MOE && !shexp)
        return ref_fail(MOERUN_ERR_FORMAT, "missing tensor", "blk.0.ffn_gate_shexp.weight");
    return MOERUN_OK;
}

/* Read tensor name (of shape [ne0, ne1, ne2]; trailing 1s may be absent) and dequantize it. */
static int load(int fd, const struct gguf_ctx *g, const char *name, uint64_t ne0, uint64_t ne1,
                uint64_t ne2, struct ref_mat *m) {
    const struct gguf_tensor *t = gguf_get_tensor(g, name);
    if (!t)
        return ref_fail(MOERUN_ERR_FORMAT, "missing tensor", name);
    if (t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != ne2 || t->ne[3] != 1) {
        fprintf(stderr,
                "ref_forward: tensor '%s' is [%llu, %llu, %llu], expected [%llu, %llu, %llu]\n",
                name, (unsigned long long)t->ne[0], (unsigned long long)t->ne[1],
                (unsigned long long)t->ne[2], (unsigned long long)ne0, (unsigned long long)ne1,
                (unsigned long long)ne2);
        return MOERUN_ERR_FORMAT;
    }
    if (!cpu_ref_kernels(t->type))
        return ref_fail(MOERUN_ERR_UNSUPPORTED, "unsupported weight type of", name);
    uint8_t *raw = malloc(t->nbytes);
    float *f = malloc(t->n_elements * sizeof(float));
    m->w = malloc(t->n_elements * sizeof(double));
    int rc = MOERUN_OK;
    if (!raw || !f || !m->w) {
        rc = ref_fail(MOERUN_ERR_NOMEM, "out of memory for", name);
        goto out;
    }
    for (uint64_t done = 0; done < t->nbytes;) {
        ssize_t r = pread(fd, raw + done, t->nbytes - done, (off_t)(t->offset + done));
        if (r <= 0) {
            rc = ref_fail(MOERUN_ERR_IO, "cannot read", name);
            goto out;
        }
        done += (uint64_t)r;
    }
    cpu_ref_to_float(t->type, raw, f, (int64_t)t->n_elements);
    for (uint64_t i = 0; i < t->n_elements; i++)
        m->w[i] = f[i];
    m->ne0 = ne0;
    m->ne1 = ne1;
    m->ne2 = ne2;
    m->type = t->type;
out:
    free(f);
    free(raw);
    return rc;
}

static int load_layer(int fd, const struct gguf_ctx *g, const struct ref_config *c, uint32_t il,
                      struct ref_layer *l) {
    const uint64_t d = c->d, dq = (uint64_t)c->n_head * c->hd, dkv = (uint64_t)c->n_kv * c->hd;
    const uint64_t f = c->f, fsh = c->f_sh, ne = c->n_exp;
    const bool qwen2 = c->arch == REF_QWEN2MOE, qwen3 = c->arch == REF_QWEN3MOE;
    const bool olmoe = c->arch == REF_OLMOE;
    const struct {
        const char *suffix;
        bool present;
        struct ref_mat *m;
        uint64_t ne0, ne1, ne2;
    } parts[] = {
        {"attn_norm.weight", true, &l->attn_norm, d, 1, 1},
        {"attn_q.weight", true, &l->wq, d, dq, 1},
        {"attn_k.weight", true, &l->wk, d, dkv, 1},
        {"attn_v.weight", true, &l->wv, d, dkv, 1},
        {"attn_q.bias", qwen2, &l->bq, dq, 1, 1},
        {"attn_k.bias", qwen2, &l->bk, dkv, 1, 1},
        {"attn_v.bias", qwen2, &l->bv, dkv, 1, 1},
        {"attn_q_norm.weight", qwen3, &l->q_norm, c->hd, 1, 1},
        {"attn_k_norm.weight", qwen3, &l->k_norm, c->hd, 1, 1},
        {"attn_q_norm.weight", olmoe, &l->q_norm, dq, 1, 1},
        {"attn_k_norm.weight", olmoe, &l->k_norm, dkv, 1, 1},
        {"attn_output.weight", true, &l->wo, dq, d, 1},
        {"ffn_norm.weight", true, &l->ffn_norm, d, 1, 1},
        {"ffn_gate_inp.weight", true, &l->router, d, ne, 1},
        {"ffn_gate_exps.weight", true, &l->gate, d, f, ne},
        {"ffn_up_exps.weight", true, &l->up, d, f, ne},
        {"ffn_down_exps.weight", true, &l->down, f, d, ne},
        {"ffn_gate_inp_shexp.weight", qwen2, &l->sh_inp, d, 1, 1},
        {"ffn_gate_shexp.weight", qwen2, &l->sh_gate, d, fsh, 1},
        {"ffn_up_shexp.weight", qwen2, &l->sh_up, d, fsh, 1},
        {"ffn_down_shexp.weight", qwen2, &l->sh_down, fsh, d, 1},
    };
    char name[96];
    for (size_t i = 0; i < sizeof(parts) / sizeof(parts[0]); i++) {
        if (!parts[i].present)
            continue;
        snprintf(name, sizeof(name), "blk.%u.%s", il, parts[i].suffix);
        int rc = load(fd, g, name, parts[i].ne0, parts[i].ne1, parts[i].ne2, parts[i].m);
        if (rc != MOERUN_OK)
            return rc;
    }
    return MOERUN_OK;
}

static int load_weights(int fd, const struct gguf_ctx *g, struct ref_ctx *x) {
    const struct ref_config *c = &x->c;
    int rc = load(fd, g, "token_embd.weight", c->d, c->n_vocab, 1, &x->w.tok_embd);
    if (rc == MOERUN_OK)
        rc = load(fd, g, "output_norm.weight", c->d, 1, 1, &x->w.out_norm);
    if (rc == MOERUN_OK && gguf_get_tensor(g, "output.weight"))
        rc = load(fd, g, "output.weight", c->d, c->n_vocab, 1, &x->w.out);
    if (rc != MOERUN_OK)
        return rc;
    x->w.layers = calloc(c->n_layer, sizeof(*x->w.layers));
    if (!x->w.layers)
        return ref_fail(MOERUN_ERR_NOMEM, "out of memory", NULL);
    for (uint32_t il = 0; il < c->n_layer && rc == MOERUN_OK; il++)
        rc = load_layer(fd, g, c, il, &x->w.layers[il]);
    return rc;
}

static int alloc_state(struct ref_ctx *x) {
    const struct ref_config *c = &x->c;
    struct ref_state *s = &x->s;
    const size_t dq = (size_t)c->n_head * c->hd, dkv = (size_t)c->n_kv * c->hd;
    size_t wide = c->d;
    wide = dq > wide ? dq : wide;
    wide = c->f > wide ? c->f : wide;
    wide = c->f_sh > wide ? c->f_sh : wide;
    s->x = calloc(c->d, sizeof(double));
    s->h = calloc(c->d, sizeof(double));
    s->q = calloc(dq, sizeof(double));
    s->k = calloc(dkv, sizeof(double));
    s->v = calloc(dkv, sizeof(double));
    s->att = calloc(x->n_ctx, sizeof(double));
    s->o = calloc(dq, sizeof(double));
    s->y = calloc(c->d, sizeof(double));
    s->g = calloc(wide, sizeof(double));
    s->u = calloc(wide, sizeof(double));
    s->r = calloc(c->n_exp, sizeof(double));
    s->xr = calloc(wide, sizeof(double));
    s->tf = calloc(wide, sizeof(float));
    s->tq = calloc(wide, sizeof(float) * 2); /* any companion type fits in 8 bytes/value */
    s->kcache = calloc((size_t)c->n_layer * x->n_ctx * dkv, sizeof(double));
    s->vcache = calloc((size_t)c->n_layer * x->n_ctx * dkv, sizeof(double));
    if (!s->x || !s->h || !s->q || !s->k || !s->v || !s->att || !s->o || !s->y || !s->g || !s->u ||
        !s->r || !s->xr || !s->tf || !s->tq || !s->kcache || !s->vcache)
        return ref_fail(MOERUN_ERR_NOMEM, "out of memory for the run state", NULL);
    return MOERUN_OK;
}

static void free_mat(struct ref_mat *m) {
    free(m->w);
    m->w = NULL;
}

static void free_ctx(struct ref_ctx *x) {
    if (x->w.layers) {
        for (uint32_t il = 0; il < x->c.n_layer; il++) {
            struct ref_layer *l = &x->w.layers[il];
            struct ref_mat *all[] = {&l->attn_norm, &l->wq,      &l->wk,     &l->wv,     &l->bq,
                                     &l->bk,        &l->bv,      &l->q_norm, &l->k_norm, &l->wo,
                                     &l->ffn_norm,  &l->router,  &l->gate,   &l->up,     &l->down,
                                     &l->sh_inp,    &l->sh_gate, &l->sh_up,  &l->sh_down};
            for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
                free_mat(all[i]);
        }
        free(x->w.layers);
    }
    free_mat(&x->w.tok_embd);
    free_mat(&x->w.out_norm);
    free_mat(&x->w.out);
    struct ref_state *s = &x->s;
    double *d[] = {s->x, s->h, s->q, s->k,  s->v, s->att,    s->o,     s->y,
                   s->g, s->u, s->r, s->xr, NULL, s->kcache, s->vcache};
    for (size_t i = 0; i < sizeof(d) / sizeof(d[0]); i++)
        free(d[i]);
    free(s->tf);
    free(s->tq);
}

/* --- the layer parts ------------------------------------------------------------------------ */

static void rmsnorm(double *out, const double *x, const double *w, size_t n, double eps) {
    double ss = 0;
    for (size_t i = 0; i < n; i++)
        ss += x[i] * x[i];
    const double scale = 1.0 / sqrt(ss / (double)n + eps);
    for (size_t i = 0; i < n; i++)
        out[i] = x[i] * scale * w[i];
}

/* The input of a product with m as llama.cpp sees it: rounded to m's companion type. */
static const double *matmul_input(struct ref_ctx *x, const struct ref_mat *m, const double *in) {
    if (!x->round_acts)
        return in;
    const int vdt = cpu_ref_kernels(m->type)->vec_dot_type;
    const int64_t n = (int64_t)m->ne0;
    for (int64_t i = 0; i < n; i++)
        x->s.tf[i] = (float)in[i];
    if (vdt != MOERUN_TYPE_F32) {
        cpu_ref_from_float(vdt, x->s.tf, x->s.tq, n);
        cpu_ref_to_float(vdt, x->s.tq, x->s.tf, n);
    }
    for (int64_t i = 0; i < n; i++)
        x->s.xr[i] = x->s.tf[i];
    return x->s.xr;
}

/* out[ne1] = m[e] in: the rows of matrix e of a [ne0, ne1, ne2] weight */
static void matvec(struct ref_ctx *x, double *out, const struct ref_mat *m, uint64_t e,
                   const double *in) {
    const double *xin = matmul_input(x, m, in);
    const double *w = m->w + e * m->ne0 * m->ne1;
    for (uint64_t r = 0; r < m->ne1; r++) {
        double sum = 0;
        for (uint64_t i = 0; i < m->ne0; i++)
            sum += w[r * m->ne0 + i] * xin[i];
        out[r] = sum;
    }
}

static void add_bias(double *v, const struct ref_mat *b) {
    if (b->w)
        for (uint64_t i = 0; i < b->ne0; i++)
            v[i] += b->w[i];
}

/* Rotate each head of v (n_heads of hd) at position pos. */
static void rope(const struct ref_config *c, double *v, uint32_t n_heads, uint32_t pos) {
    const bool neox = c->arch != REF_LLAMA;
    const uint32_t half = c->n_rot / 2;
    for (uint32_t hh = 0; hh < n_heads; hh++) {
        double *head = v + (size_t)hh * c->hd;
        for (uint32_t i = 0; i < half; i++) {
            const double theta = pos * pow(c->base, -2.0 * i / c->n_rot);
            const double cs = cos(theta), sn = sin(theta);
            double *a = neox ? &head[i] : &head[2 * i];
            double *b = neox ? &head[i + half] : &head[2 * i + 1];
            const double a0 = *a, b0 = *b;
            *a = a0 * cs - b0 * sn;
            *b = a0 * sn + b0 * cs;
        }
    }
}

/* q, k and v of the token at pos into the state and the cache of layer il. */
static void qkv(struct ref_ctx *x, uint32_t il, uint32_t pos) {
    const struct ref_config *c = &x->c;
    const struct ref_layer *l = &x->w.layers[il];
    struct ref_state *s = &x->s;
    const size_t dkv = (size_t)c->n_kv * c->hd;
    matvec(x, s->q, &l->wq, 0, s->h);
    matvec(x, s->k, &l->wk, 0, s->h);
    matvec(x, s->v, &l->wv, 0, s->h);
    add_bias(s->q, &l->bq);
    add_bias(s->k, &l->bk);
    add_bias(s->v, &l->bv);
    if (c->arch == REF_OLMOE) {
        rmsnorm(s->q, s->q, l->q_norm.w, (size_t)c->n_head * c->hd, c->eps);
        rmsnorm(s->k, s->k, l->k_norm.w, dkv, c->eps);
    } else if (c->arch == REF_QWEN3MOE) {
        for (uint32_t hh = 0; hh < c->n_head; hh++)
            rmsnorm(s->q + (size_t)hh * c->hd, s->q + (size_t)hh * c->hd, l->q_norm.w, c->hd,
                    c->eps);
        for (uint32_t hh = 0; hh < c->n_kv; hh++)
            rmsnorm(s->k + (size_t)hh * c->hd, s->k + (size_t)hh * c->hd, l->k_norm.w, c->hd,
                    c->eps);
    }
    rope(c, s->q, c->n_head, pos);
    rope(c, s->k, c->n_kv, pos);
    double *kc = s->kcache + ((size_t)il * x->n_ctx + pos) * dkv;
    double *vc = s->vcache + ((size_t)il * x->n_ctx + pos) * dkv;
    memcpy(kc, s->k, dkv * sizeof(double));
    memcpy(vc, s->v, dkv * sizeof(double));
}

/* Causal attention of every query head over positions 0..pos; s->o gets the heads' outputs. */
static void attention(struct ref_ctx *x, uint32_t il, uint32_t pos) {
    const struct ref_config *c = &x->c;
    struct ref_state *s = &x->s;
    const size_t dkv = (size_t)c->n_kv * c->hd;
    const uint32_t group = c->n_head / c->n_kv;
    const double scale = 1.0 / sqrt((double)c->hd);
    const double *kc = s->kcache + (size_t)il * x->n_ctx * dkv;
    const double *vc = s->vcache + (size_t)il * x->n_ctx * dkv;
    for (uint32_t j = 0; j < c->n_head; j++) {
        const double *qj = s->q + (size_t)j * c->hd;
        const size_t kvo = (size_t)(j / group) * c->hd;
        double mx = -INFINITY, sum = 0;
        for (uint32_t t = 0; t <= pos; t++) {
            double dot = 0;
            for (uint32_t i = 0; i < c->hd; i++)
                dot += qj[i] * kc[t * dkv + kvo + i];
            s->att[t] = dot * scale;
            mx = s->att[t] > mx ? s->att[t] : mx;
        }
        for (uint32_t t = 0; t <= pos; t++) {
            s->att[t] = exp(s->att[t] - mx);
            sum += s->att[t];
        }
        double *oj = s->o + (size_t)j * c->hd;
        for (uint32_t i = 0; i < c->hd; i++)
            oj[i] = 0;
        for (uint32_t t = 0; t <= pos; t++)
            for (uint32_t i = 0; i < c->hd; i++)
                oj[i] += s->att[t] / sum * vc[t * dkv + kvo + i];
    }
}

static double silu(double z) {
    return z / (1.0 + exp(-z));
}

/* y += w * down(silu(gate h) * (up h)) for expert e of the given matrices */
static void ffn(struct ref_ctx *x, const struct ref_mat *gate, const struct ref_mat *up,
                const struct ref_mat *down, uint64_t e, double w) {
    struct ref_state *s = &x->s;
    const uint64_t f = gate->ne1;
    matvec(x, s->g, gate, e, s->h);
    matvec(x, s->u, up, e, s->h);
    for (uint64_t i = 0; i < f; i++)
        s->g[i] = silu(s->g[i]) * s->u[i];
    matvec(x, s->u, down, e, s->g); /* s->u: [d] now */
    for (uint64_t i = 0; i < down->ne1; i++)
        s->y[i] += w * s->u[i];
}

/* The MoE block: router, top-k, experts (and qwen2moe's shared expert) into s->y. */
static void moe(struct ref_ctx *x, uint32_t il) {
    const struct ref_config *c = &x->c;
    const struct ref_layer *l = &x->w.layers[il];
    struct ref_state *s = &x->s;
    matvec(x, s->r, &l->router, 0, s->h);
    double mx = -INFINITY, sum = 0;
    for (uint32_t e = 0; e < c->n_exp; e++)
        mx = s->r[e] > mx ? s->r[e] : mx;
    for (uint32_t e = 0; e < c->n_exp; e++) {
        s->r[e] = exp(s->r[e] - mx);
        sum += s->r[e];
    }
    for (uint32_t e = 0; e < c->n_exp; e++)
        s->r[e] /= sum;
    /* top k: descending, the lowest index first on ties */
    uint32_t sel[64 * 16];
    double wsel[64 * 16], wsum = 0;
    for (uint32_t j = 0; j < c->k; j++) {
        uint32_t best = UINT32_MAX;
        for (uint32_t e = 0; e < c->n_exp; e++) {
            bool taken = false;
            for (uint32_t t = 0; t < j; t++)
                taken = taken || sel[t] == e;
            if (!taken && (best == UINT32_MAX || s->r[e] > s->r[best]))
                best = e;
        }
        sel[j] = best;
        wsel[j] = s->r[best];
        wsum += wsel[j];
    }
    if (c->k < c->n_exp) {
        double next = -1; /* the largest probability not chosen */
        for (uint32_t e = 0; e < c->n_exp; e++) {
            bool taken = false;
            for (uint32_t t = 0; t < c->k; t++)
                taken = taken || sel[t] == e;
            next = !taken && s->r[e] > next ? s->r[e] : next;
        }
        const double gap = log(wsel[c->k - 1] / next); /* = the difference of the logits */
        x->min_gap = gap < x->min_gap ? gap : x->min_gap;
    }
    const bool renorm = c->arch == REF_LLAMA || c->arch == REF_QWEN3MOE;
    for (uint32_t i = 0; i < c->d; i++)
        s->y[i] = 0;
    for (uint32_t j = 0; j < c->k; j++)
        ffn(x, &l->gate, &l->up, &l->down, sel[j], renorm ? wsel[j] / wsum : wsel[j]);
    if (c->arch == REF_QWEN2MOE) {
        double z;
        matvec(x, &z, &l->sh_inp, 0, s->h);
        ffn(x, &l->sh_gate, &l->sh_up, &l->sh_down, 0, 1.0 / (1.0 + exp(-z)));
    }
}

/* One token through every layer, its logits into out[n_vocab]. */
static void forward_token(struct ref_ctx *x, int32_t token, uint32_t pos, double *out) {
    const struct ref_config *c = &x->c;
    struct ref_state *s = &x->s;
    memcpy(s->x, x->w.tok_embd.w + (size_t)token * c->d, c->d * sizeof(double));
    for (uint32_t il = 0; il < c->n_layer; il++) {
        const struct ref_layer *l = &x->w.layers[il];
        rmsnorm(s->h, s->x, l->attn_norm.w, c->d, c->eps);
        qkv(x, il, pos);
        attention(x, il, pos);
        matvec(x, s->y, &l->wo, 0, s->o);
        for (uint32_t i = 0; i < c->d; i++)
            s->x[i] += s->y[i];
        rmsnorm(s->h, s->x, l->ffn_norm.w, c->d, c->eps);
        moe(x, il);
        for (uint32_t i = 0; i < c->d; i++)
            s->x[i] += s->y[i];
    }
    rmsnorm(s->h, s->x, x->w.out_norm.w, c->d, c->eps);
    matvec(x, out, x->w.out.w ? &x->w.out : &x->w.tok_embd, 0, s->h);
}

/* --- entry points ----------------------------------------------------------------------------
 */

int ref_forward(const char *gguf_path, const int32_t *tokens, size_t n, int round_acts,
                double *logits) {
    return ref_forward_gap(gguf_path, tokens, n, round_acts, logits, NULL);
}

int ref_forward_gap(const char *gguf_path, const int32_t *tokens, size_t n, int round_acts,
                    double *logits, double *min_router_gap) {
    struct ref_ctx x;
    memset(&x, 0, sizeof(x));
    x.round_acts = round_acts;
    x.min_gap = INFINITY;
    x.n_ctx = n;
    struct gguf_ctx *g = NULL;
    int fd = -1;
    int rc = gguf_open_file(gguf_path, NULL, &g);
    if (rc != MOERUN_OK) {
        fprintf(stderr, "ref_forward: %s: %s\n", gguf_path, moerun_errmsg());
        return rc;
    }
    x.c.n_layer = 0;
    rc = read_config(g, &x.c);
    if (rc != MOERUN_OK)
        goto out;
    if (x.c.k > 64 * 16) {
        rc = ref_fail(MOERUN_ERR_UNSUPPORTED, "too many experts per token", NULL);
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || (uint32_t)tokens[i] >= x.c.n_vocab) {
            rc = ref_fail(MOERUN_ERR_RANGE, "token id out of range", NULL);
            goto out;
        }
    }
    fd = open(gguf_path, O_RDONLY);
    if (fd < 0) {
        rc = ref_fail(MOERUN_ERR_IO, "cannot open", gguf_path);
        goto out;
    }
    rc = load_weights(fd, g, &x);
    if (rc == MOERUN_OK)
        rc = alloc_state(&x);
    for (size_t i = 0; i < n && rc == MOERUN_OK; i++)
        forward_token(&x, tokens[i], (uint32_t)i, logits + i * x.c.n_vocab);
    if (rc == MOERUN_OK && min_router_gap)
        *min_router_gap = x.min_gap;
out:
    if (fd >= 0)
        close(fd);
    free_ctx(&x);
    gguf_close(g);
    return rc;
}

uint32_t ref_n_vocab(const char *gguf_path) {
    struct gguf_ctx *g = NULL;
    struct ref_config c;
    memset(&c, 0, sizeof(c));
    if (gguf_open_file(gguf_path, NULL, &g) != MOERUN_OK)
        return 0;
    uint32_t nv = read_config(g, &c) == MOERUN_OK ? c.n_vocab : 0;
    gguf_close(g);
    return nv;
}
