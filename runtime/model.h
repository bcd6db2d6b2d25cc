/* The model object shared by the runtime's files (internal). */
#ifndef MOERUN_MODEL_H
#define MOERUN_MODEL_H

#include "gguf.h"
#include "internal.h"
#include "types.h"

struct mr_vocab;
struct mr_weights;
struct mr_offload;

struct layer_experts {
    uint64_t all_bytes; /* every expert of the layer's *_exps tensors */
    uint64_t one_bytes; /* one expert: its slice of each *_exps tensor */
};

struct moerun_model {
    moerun_model_params params;
    struct gguf_ctx *gguf;
    moerun_model_info info;
    uint64_t type_tensors[MR_TYPE_COUNT];
    uint64_t type_bytes[MR_TYPE_COUNT];
    struct layer_experts *layers; /* [info.n_layer] */
    struct mr_vocab *vocab;       /* NULL when the file has no tokenizer */
    struct mr_weights *w;         /* NULL when opened metadata-only */
    struct mr_offload *offload;   /* the tiers; NULL without a host budget (all resident) */
    struct mr_backend *be;        /* the device sessions compute on (their instances are clones) */
    const struct mr_weights *cw;  /* the weights as that device sees them: w, or on a GPU a copy
                                     pointing at device memory (tok_embd stays on the host) */
};

#endif /* MOERUN_MODEL_H */
