/* OLMoE: RMSNorm over the whole q and k projections, no top-k renormalisation. */
#include "arch.h"

const struct mr_arch mr_arch_olmoe = {
    .name = "olmoe",
    .rope = MR_ROPE_NEOX,
    .qk_norm = MR_QK_NORM_FULL,
    .qkv_bias = false,
    .shared_expert = false,
    .norm_topk = false,
};
