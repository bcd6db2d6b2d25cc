/* Offloading internals shared by offload.c (sections, resident parts, the CPU's host tier)
 * and offload_gpu.c (the GPU tier, the pinned host stage). */
#ifndef MOERUN_OFFLOAD_IMPL_H
#define MOERUN_OFFLOAD_IMPL_H

#include "offload.h"
#include "scheduler.h"
#include "tiers.h"

#include <pthread.h>

struct stage;
struct tier_device;
struct mr_backend;

struct mr_offload {
    struct tier_host *host; /* CPU: the slots; GPU: the pinned stage's region */
    struct tier_nvme *nvme;
    struct sched *sched;            /* the slots compute reads from: host (CPU) or GPU memory */
    struct sched_section *sections; /* [L + L*E] */
    uint32_t n_sections;
    uint32_t n_layer, n_expert;
    struct mr_layer *dense_at; /* [L]: data = offset of the tensor in its slot */
    uint64_t (*expert_at)[3];  /* [L*E]: offsets of gate, up, down in the slot */
    uint8_t *resident;         /* host: embeddings, output, routers and their norms (CPU), or
                                  the embeddings alone (GPU) */
    uint64_t resident_bytes;
    int prefetch_layers;
    int prefetch;                     /* moerun_prefetch */
    struct tier_nvme_stats nvme_base; /* the NVMe counters at the last reset */
    pthread_mutex_t run_lock;
    const moerun_allocator *a;

    /* with a GPU (device CUDA or SIM) */
    struct mr_backend *be;      /* the model's root instance */
    struct tier_device *dev;    /* the GPU tier: one allocation */
    struct stage *stage;        /* pinned host slots between the file and the GPU */
    bool host_registered;       /* the stage's region is pinned */
    void *dev_resident;         /* routers, norms, output in GPU memory (reserved from dev) */
    struct mr_weights *cw;      /* the weights with resident pointers into GPU memory */
    struct mr_layer *cw_layers; /* [L] behind cw */
    int32_t *dense_slot;        /* [L] GPU slot of each acquired dense part */
    int32_t *expert_slot;       /* [E] GPU slot of each handed-out expert of the current layer */
};

#define OFFLOAD_FIELD(l, off) ((struct mr_weight *)((uint8_t *)(l) + (off)))

/* Bytes of a whole tensor. */
uint64_t offload_tensor_bytes(const struct mr_weight *w);

/* The tensors every token needs, kept resident: with embeddings, the token embeddings (and a
 * tied output once, with them); the output norm and output; each layer's router and its norm
 * (predictions never wait). Into list (offload_resident_max entries); returns the count. */
size_t offload_resident_max(uint32_t n_layer);
size_t offload_resident_list(struct mr_weights *w, bool embeddings, struct mr_weight **list);

/* Pieces of a buffer of tensors are rounded up to 64 bytes. */
static inline uint64_t offload_piece_bytes(uint64_t b) {
    return (b + 63) & ~(uint64_t)63;
}

/* Read the n tensors of list (data: their file offsets) from path, with preads, into one new
 * allocation *buf of *bytes: tensor i at the sum of the earlier pieces. The weights are not
 * changed. Returns MOERUN_OK or an error (then *buf may still need mr_free). */
int offload_read_tensors(const struct mr_offload *o, const char *path,
                         struct mr_weight *const *list, size_t n, uint8_t **buf, uint64_t *bytes);

/* The NVMe reader's load() for a section into host memory dst (struct sched_loader). */
int offload_read_section(void *ctx, const struct sched_section *sec, void *dst, uint64_t tag);

/* "N bytes (M MiB)" */
void offload_fmt_bytes(char *buf, size_t size, uint64_t b);

/* offload_gpu.c: the GPU tier and the stage (o->sections, o->resident already set up). */
int offload_gpu_open(struct mr_offload *o, struct moerun_model *m, const char *path);
void offload_gpu_close(struct mr_offload *o);
/* The compute stream waits for the upload into the slot at base (*slot: which, for release);
 * release: the compute stream marks the slot free once the ops enqueued so far are done. */
int offload_gpu_acquire(struct mr_offload *o, const void *base, int32_t *slot);
void offload_gpu_release(struct mr_offload *o, int32_t slot);
void offload_gpu_get_stats(const struct mr_offload *o, moerun_stats *st);
/* For prefetch's AUTO mode: ns per byte of uploads (0 below 1 MiB uploaded), and the share of
 * GPU loads the host tier missed (read from the file first). */
void offload_gpu_load_figures(const struct mr_offload *o, double *copy_ns_per_byte,
                              double *miss_share);
void offload_gpu_reset_stats(struct mr_offload *o);

#endif /* MOERUN_OFFLOAD_IMPL_H */
