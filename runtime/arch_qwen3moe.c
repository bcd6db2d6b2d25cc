/* Qwen3-MoE: per-head RMSNorm of q and k, many experts, top-k renormalised, no shared expert. */
#include "arch.h"

const struct mr_arch mr_arch_qwen3moe = {
    .name = "qwen3moe",
    .rope = MR_ROPE_NEOX,
    .qk_norm = MR_QK_NORM_HEAD,
    .qkv_bias = false,
    .shared_expert = false,
    .norm_topk = true,
};
