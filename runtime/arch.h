/* Architectures (internal): what differs between the MoE decoders moerun runs. The forward pass
 * (forward.c) is one decoder; an architecture is a descriptor of its options, and adding one is
 * a small arch_<name>.c plus a line in arch.c. The computation is in docs/architectures.md. */
#ifndef MOERUN_ARCH_H
#define MOERUN_ARCH_H

#include <stdbool.h>

enum mr_rope_style {
    MR_ROPE_NORM, /* rotate adjacent pairs (x[2i], x[2i+1]) */
    MR_ROPE_NEOX, /* rotate halves (x[i], x[i + n_rot/2]) */
};

enum mr_qk_norm {
    MR_QK_NORM_NONE,
    MR_QK_NORM_HEAD, /* RMSNorm of each head of q and k, weights [head_dim] (Qwen3-MoE) */
    MR_QK_NORM_FULL, /* RMSNorm of the whole q and k projections (OLMoE) */
};

struct mr_arch {
    const char *name;        /* general.architecture */
    enum mr_rope_style rope; /* RoPE pairing */
    enum mr_qk_norm qk_norm; /* normalisation of q and k before RoPE */
    bool qkv_bias;           /* attn_{q,k,v}.bias */
    bool shared_expert;      /* ffn_{gate,up,down}_shexp with a sigmoid gate (Qwen2-MoE) */
    bool norm_topk;          /* renormalise the chosen experts' weights to sum 1 */
};

extern const struct mr_arch mr_arch_llama;
extern const struct mr_arch mr_arch_qwen2moe;
extern const struct mr_arch mr_arch_qwen3moe;
extern const struct mr_arch mr_arch_olmoe;

/* The descriptor for general.architecture, or NULL when moerun does not run it. */
const struct mr_arch *mr_arch_find(const char *name);

#endif /* MOERUN_ARCH_H */
