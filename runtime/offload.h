/* Offloading (internal): the engine's side of the tiers. With a host budget, the weights
 * stay in the model file: the small parts every token needs (embeddings, output, routers and
 * their norms) are read once into resident memory; each layer's dense part and each expert are
 * sections that the scheduler moves through host slots, read by the NVMe tier. */
#ifndef MOERUN_OFFLOAD_H
#define MOERUN_OFFLOAD_H

#include "weights.h"

#include <stdbool.h>
#include <stdint.h>

struct moerun_model;
struct mr_offload;

/* An expert's three matrices, row 0 of each. */
struct mr_expert_ptrs {
    const uint8_t *gate, *up, *down;
};

/* Set up the tiers for m (its tensors bound, data holding file offsets): read the resident
 * parts, lay out the sections, create the host tier, the NVMe tier and the scheduler.
 * Returns MOERUN_OK, or MOERUN_ERR_BUDGET naming the minimum host budget. */
int offload_open(struct moerun_model *m, const char *path);
void offload_close(struct moerun_model *m);

/* One forward pass at a time uses the tiers (sessions of one model take turns). */
void offload_lock(struct mr_offload *o);
void offload_unlock(struct mr_offload *o);

/* Layer il's dense part, resident: *view is the layer with every pointer valid (dense ones in
 * the slot, resident ones as they are). Release when the layer's attention is done. */
int offload_layer_acquire(struct mr_offload *o, uint32_t il, struct mr_layer *view);
void offload_layer_release(struct mr_offload *o, uint32_t il);

/* The experts layer il needs now; then each as it becomes resident, in any order. */
int offload_experts_request(struct mr_offload *o, uint32_t il, const int32_t *experts, uint32_t n);
/* MOERUN_OK with *expert and *p, 1 when all were handed out, or a load error. */
int offload_experts_next(struct mr_offload *o, uint32_t il, int32_t *expert,
                         struct mr_expert_ptrs *p);
void offload_expert_release(struct mr_offload *o, uint32_t il, int32_t expert);

/* Predicted router probabilities of layer il (n_expert of them). */
void offload_predict(struct mr_offload *o, uint32_t il, const float *probs);

/* How many layers ahead predictions are wanted: 0 when every section has its own slot (all of
 * the model fits: nothing to prefetch, and no prediction statistics). */
int offload_prefetch_layers(const struct mr_offload *o);

/* With a GPU tier: whether there is one, and backend memory from its budget for a session's
 * KV cache and scratch (MOERUN_ERR_BUDGET naming what is left), given back with unreserve. */
bool offload_has_device(const struct mr_offload *o);
int offload_device_reserve(struct mr_offload *o, uint64_t bytes, void **out);
void offload_device_unreserve(struct mr_offload *o, void *p);

void offload_get_stats(const struct mr_offload *o, moerun_stats *out);
void offload_reset_stats(struct mr_offload *o);

#endif /* MOERUN_OFFLOAD_H */
