/* Weights (internal): hyper-parameters, tensors bound to their roles with checked shapes, and
 * their data. */
#ifndef MOERUN_WEIGHTS_H
#define MOERUN_WEIGHTS_H

#include "arch.h"
#include "gguf.h"

#include <stddef.h>
#include <stdint.h>

struct moerun_model;

struct mr_hparams {
    uint32_t n_vocab;
    uint32_t n_embd;        /* d */
    uint32_t n_layer;       /* L */
    uint32_t n_head;        /* H */
    uint32_t n_head_kv;     /* H_kv, divides H */
    uint32_t head_dim;      /* hd */
    uint32_t n_rot;         /* RoPE dimensions of each head, even, <= hd */
    uint32_t n_expert;      /* E */
    uint32_t n_expert_used; /* k */
    uint32_t n_ff_exp;      /* f: expert FFN width */
    uint32_t n_ff_shexp;    /* f_sh: shared expert width (0 = none) */
    uint32_t n_ctx_train;
    float rms_eps;
    float rope_base;
};

/* A tensor in its role. A matrix is rows x row elements (GGUF ne1 x ne0); expert tensors hold
 * ne2 = E such matrices back to back. */
struct mr_weight {
    const uint8_t *data;   /* NULL = absent (an optional tensor) */
    int type;              /* moerun_type */
    uint64_t ne[4];        /* GGUF shape, ne[0] fastest */
    uint64_t row_bytes;    /* bytes of one row of ne[0] elements */
    uint64_t matrix_bytes; /* bytes of one [ne1][ne0] matrix (one expert's) */
};

struct mr_layer {
    struct mr_weight attn_norm;   /* [d] F32 */
    struct mr_weight wq;          /* [d, H*hd] */
    struct mr_weight wk, wv;      /* [d, H_kv*hd] */
    struct mr_weight wo;          /* [H*hd, d] */
    struct mr_weight bq;          /* [H*hd] F32, qkv_bias */
    struct mr_weight bk, bv;      /* [H_kv*hd] F32, qkv_bias */
    struct mr_weight q_norm;      /* [hd] or [H*hd] F32, qk_norm */
    struct mr_weight k_norm;      /* [hd] or [H_kv*hd] F32, qk_norm */
    struct mr_weight ffn_norm;    /* [d] F32 */
    struct mr_weight router;      /* [d, E] */
    struct mr_weight gate_exps;   /* [d, f, E] */
    struct mr_weight up_exps;     /* [d, f, E] */
    struct mr_weight down_exps;   /* [f, d, E] */
    struct mr_weight sh_gate_inp; /* [d], shared_expert */
    struct mr_weight sh_gate;     /* [d, f_sh] */
    struct mr_weight sh_up;       /* [d, f_sh] */
    struct mr_weight sh_down;     /* [f_sh, d] */
};

struct mr_weights {
    const struct mr_arch *arch;
    struct mr_hparams hp;
    struct mr_weight tok_embd;    /* [d, n_vocab] */
    struct mr_weight output_norm; /* [d] F32 */
    struct mr_weight output;      /* [d, n_vocab]; tok_embd when tied */
    struct mr_layer *layers;      /* [L] */
    uint8_t *data;                /* the file's tensor data section, resident */
    uint64_t data_bytes;
    void *map; /* with use_mmap: the whole file, mapped */
    uint64_t map_bytes;
};

/* Read the hyper-parameters of the model's architecture, bind and check every tensor, and read
 * the tensor data. Returns MOERUN_OK and m->w, or an error naming the key or tensor. */
int weights_load(struct moerun_model *m, const char *path);
void weights_free(struct moerun_model *m);

/* Row r of expert e of an expert tensor (or of a plain matrix with e = 0). */
static inline const uint8_t *mr_weight_rows(const struct mr_weight *w, uint64_t e, uint64_t r) {
    return w->data + e * w->matrix_bytes + r * w->row_bytes;
}

#endif /* MOERUN_WEIGHTS_H */
