/* Mixtral: GGUF architecture "llama" with experts. */
#include "arch.h"

const struct mr_arch mr_arch_llama = {
    .name = "llama",
    .rope = MR_ROPE_NORM,
    .qk_norm = MR_QK_NORM_NONE,
    .qkv_bias = false,
    .shared_expert = false,
    .norm_topk = true,
};
