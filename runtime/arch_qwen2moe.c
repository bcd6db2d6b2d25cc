/* Qwen2-MoE / Qwen1.5-MoE: q/k/v biases, a shared expert behind a sigmoid gate, no top-k
 * renormalisation. */
#include "arch.h"

const struct mr_arch mr_arch_qwen2moe = {
    .name = "qwen2moe",
    .rope = MR_ROPE_NEOX,
    .qk_norm = MR_QK_NORM_NONE,
    .qkv_bias = true,
    .shared_expert = true,
    .norm_topk = false,
};
