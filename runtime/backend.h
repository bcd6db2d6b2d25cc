/* The backend interface (internal): one ops table, ggml-backend style, behind which the CPU and
 * the CUDA backends sit. The forward pass computes through it and the tiers move weights
 * through it, so one scheduler drives either.
 *
 * Model:
 *  - A backend instance (struct mr_backend) computes on one device with two ordered queues
 *    ("streams"): MR_STREAM_COMPUTE, on which every compute op runs, and MR_STREAM_COPY, on
 *    which host -> device uploads of weights run. Work on one stream runs in the order it was
 *    enqueued; the two streams are ordered against each other only by events.
 *  - Pointers passed to ops are backend memory (device memory from alloc, or for the CPU
 *    backend any host memory). Weights are GGML blocks exactly as in the file; activations,
 *    norms and the KV cache are F32.
 *  - Every op returns MOERUN_OK or a negative MOERUN_ERR_* with a message (mr_err). A device
 *    fault may surface at a later call on the same stream (download, sync). Nothing aborts.
 *  - Instances: mr_backend_create makes a root instance per device (at model open: the tiers
 *    use it). Each session clones it (shares the device, its streams and memory; owns its
 *    thread pool and its workspace). Calls on one instance are not thread-safe; sessions of a
 *    model that share a device stream take turns (the engine's offload lock).
 *
 * The CPU backend runs compute ops synchronously on the calling thread (with its pool); its
 * copy stream is synchronous too unless it is the "sim" device, which keeps weights in its
 * own allocation and runs the copy stream on a thread, so that the GPU tier's path (events,
 * asynchronous uploads, slot reuse) is exercised without a GPU.
 */
#ifndef MOERUN_BACKEND_H
#define MOERUN_BACKEND_H

#include "moerun.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MR_BACKEND_VERSION 1u

enum mr_backend_kind {
    MR_BACKEND_CPU = 0,  /* host memory, the CPU computes */
    MR_BACKEND_CUDA = 1, /* one CUDA device */
    MR_BACKEND_SIM = 2,  /* the CPU computing from a separate "device" allocation, with an
                            asynchronous copy stream: the GPU path without a GPU (tests) */
};

enum mr_stream {
    MR_STREAM_COMPUTE = 0,
    MR_STREAM_COPY = 1,
};

enum mr_rope_mode {
    MR_ROPE_MODE_NORM = 0, /* pairs (x[2i], x[2i+1]): llama/Mixtral */
    MR_ROPE_MODE_NEOX = 1, /* pairs (x[i], x[i + n_rot/2]): qwen2moe, qwen3moe, olmoe */
};

struct mr_backend;
struct mr_event; /* a point in a stream's work; opaque */

/* Called on a backend thread once the work enqueued before it on its stream has completed.
 * It must not call into the backend; it may take locks and submit I/O. */
typedef void (*mr_host_fn)(void *arg);

struct mr_backend_config {
    enum mr_backend_kind kind;
    int device;                        /* CUDA device index */
    int n_threads;                     /* CPU threads for compute; <= 0: one per core */
    const moerun_allocator *allocator; /* host allocations (NULL = malloc) */
};

/* Sizes an instance's workspace must cover (the largest of each over the model). */
struct mr_workspace_need {
    uint32_t n_batch;     /* tokens per forward call */
    uint32_t n_ctx;       /* positions of the KV cache */
    int64_t max_k;        /* largest k (input width) of any product */
    int64_t max_rows;     /* largest rows of any product */
    int64_t max_elements; /* largest rows * k of any weight matrix used in a product */
    uint64_t types;       /* bit (1 << moerun_type) for each weight type used in products */
};

struct mr_backend_ops {
    uint32_t version; /* MR_BACKEND_VERSION */
    const char *name; /* "cpu", "cuda", "sim" */

    /* --- instances ------------------------------------------------------------------------- */
    /* A new instance on the same device (streams, memory and events shared), with its own
     * workspace and, for the CPU, its own pool of n_threads (<= 0: the parent's count). */
    int (*clone)(struct mr_backend *be, int n_threads, struct mr_backend **out);
    void (*destroy)(struct mr_backend *be); /* clones before their root */
    /* A line describing the device ("cpu: AVX-512, 8 threads", "cuda:0 NVIDIA H100 ...").
     * Valid while the instance lives. */
    const char *(*describe)(struct mr_backend *be);
    /* Device memory: total and free now (CPU: 0 and 0 = unknown). */
    int (*mem_info)(struct mr_backend *be, uint64_t *total, uint64_t *free_now);

    /* --- memory ---------------------------------------------------------------------------- */
    /* bytes of device memory, 256-byte aligned (4096 for the CPU and sim); *out NULL for 0. */
    int (*alloc)(struct mr_backend *be, uint64_t bytes, void **out);
    void (*free)(struct mr_backend *be, void *p); /* NULL is a no-op */
    /* Page-lock host memory so copies from it are asynchronous and at full link speed (CPU,
     * sim: nothing to do). p and bytes page-aligned. */
    int (*host_register)(struct mr_backend *be, void *p, uint64_t bytes);
    void (*host_unregister)(struct mr_backend *be, void *p);
    /* Host -> device on the compute stream, asynchronous: src must stay unchanged until a later
     * download or sync of the compute stream returns (pinned src, see host_register, lets the
     * copy overlap the host; from pageable memory the call may wait). */
    int (*upload)(struct mr_backend *be, void *dst, const void *src, uint64_t bytes);
    /* Device -> host on the compute stream; returns when the bytes are in dst (and reports a
     * fault of earlier work on the stream). */
    int (*download)(struct mr_backend *be, void *dst, const void *src, uint64_t bytes);
    /* Device -> device on the compute stream. */
    int (*copy)(struct mr_backend *be, void *dst, const void *src, uint64_t bytes);
    /* Wait for all work on the stream. */
    int (*sync)(struct mr_backend *be, enum mr_stream stream);

    /* --- the copy stream and events -------------------------------------------------------- */
    int (*event_create)(struct mr_backend *be, struct mr_event **out);
    void (*event_destroy)(struct mr_backend *be, struct mr_event *ev); /* NULL is a no-op */
    /* Host (registered) -> device on the copy stream, asynchronous: src must stay valid and
     * unchanged until a later callback on the copy stream runs. */
    int (*copy_async)(struct mr_backend *be, void *dst, const void *src, uint64_t bytes);
    /* Record ev at the current end of stream's work (re-recording moves it). An event never
     * recorded counts as completed. */
    int (*record)(struct mr_backend *be, enum mr_stream stream, struct mr_event *ev);
    /* Make stream's later work wait until ev's recorded work has completed. */
    int (*wait)(struct mr_backend *be, enum mr_stream stream, struct mr_event *ev);
    /* Run fn(arg) once the stream's work enqueued so far has completed (see mr_host_fn). */
    int (*callback)(struct mr_backend *be, enum mr_stream stream, mr_host_fn fn, void *arg);

    /* --- compute (compute stream) ---------------------------------------------------------- */
    /* Bytes of workspace for need (products' converted activations or F16 staging, attention
     * scores); then set_workspace gives the instance that much backend memory, laid out for
     * the need of its last workspace_bytes call, which its ops use from then on. */
    uint64_t (*workspace_bytes)(struct mr_backend *be, const struct mr_workspace_need *need);
    void (*set_workspace)(struct mr_backend *be, void *ws, uint64_t bytes);

    /* Y[n][rows] = X[n][k] . W[rows][k]^T, W of any supported moerun_type in GGML blocks
     * (k a multiple of its block size), n = 1 a matrix-vector product. */
    int (*matmul)(struct mr_backend *be, int type, int64_t rows, int64_t k, const void *w,
                  int64_t n, const float *x, float *y);
    /* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w for n_rows rows of n; out may equal x. */
    int (*rmsnorm)(struct mr_backend *be, float *out, const float *x, const float *w,
                   int64_t n_rows, int64_t n, float eps);
    /* In place on x[n_tok][n_head * hd]: token t at position pos0 + t, the first n_rot dims of
     * each head rotated by pos * base^(-2i / n_rot). */
    int (*rope)(struct mr_backend *be, float *x, int64_t n_tok, int n_head, int hd, int n_rot,
                int64_t pos0, float base, enum mr_rope_mode mode);
    /* Causal attention: q[n_tok][n_head * hd] of tokens at pos0 .., whose keys and values are
     * in the caches ([n_ctx][n_head_kv * hd], rows 0 .. pos0 + n_tok - 1); token t attends
     * rows 0 .. pos0 + t; query head j uses KV head j / (n_head / n_head_kv); scale
     * 1/sqrt(hd). o as q. */
    int (*attention)(struct mr_backend *be, const float *q, const float *k_cache,
                     const float *v_cache, float *o, int64_t n_tok, int64_t pos0, int n_head,
                     int n_head_kv, int hd);
    /* For each of n_tok rows of logits[n_tok][E]: p = softmax (into probs, which may be
     * logits); with k > 0 the k largest (descending, lowest index first on ties) into sel[t][k]
     * and their p into sel_w[t][k], divided by their sum when renorm. */
    int (*softmax_topk)(struct mr_backend *be, float *logits, int64_t n_tok, int E, int k,
                        bool renorm, float *probs, int32_t *sel, float *sel_w);
    /* out[i] = silu(g[i]) * u[i]; out may alias g. */
    int (*swiglu)(struct mr_backend *be, float *out, const float *g, const float *u, int64_t n);
    /* y[i] += x[i] over n. */
    int (*add)(struct mr_backend *be, float *y, const float *x, int64_t n);
    /* y[r][i] += b[i] for n_rows rows of n (biases). */
    int (*add_rows)(struct mr_backend *be, float *y, const float *b, int64_t n_rows, int64_t n);
    /* dst[i] = src[idx[i]] for n rows of d (idx in backend memory). */
    int (*gather_rows)(struct mr_backend *be, float *dst, const float *src, const int32_t *idx,
                       int64_t n, int64_t d);
    /* dst[idx[i]] = src[i] * scale[idx[i]] for n rows of d (idx, scale in backend memory). */
    int (*scatter_scaled)(struct mr_backend *be, float *dst, const float *src, const int32_t *idx,
                          const float *scale, int64_t n, int64_t d);
    /* y[t] = slots[t][0] + slots[t][1] + ... + slots[t][k-1], summed in that order, for n_tok
     * rows of d (slots [n_tok][k][d]; k = 0 gives zeros). */
    int (*sum_slots)(struct mr_backend *be, float *y, const float *slots, int64_t n_tok, int k,
                     int64_t d);
    /* y[t] += x[t] * sigmoid(g[t]) for n_tok rows of d, one gate g[t] per token (g: [n_tok];
     * the shared expert's gate). */
    int (*add_gated)(struct mr_backend *be, float *y, const float *x, const float *g, int64_t n_tok,
                     int64_t d);
};

struct mr_backend {
    const struct mr_backend_ops *ops;
    enum mr_backend_kind kind;
    bool host_memory; /* backend memory is host memory the CPU can read (CPU backend) */
};

/* The root instance for cfg. Returns MOERUN_OK, MOERUN_ERR_UNSUPPORTED (CUDA not built in),
 * MOERUN_ERR_BACKEND (no device, driver error) with a message, MOERUN_ERR_NOMEM. */
int mr_backend_create(const struct mr_backend_config *cfg, struct mr_backend **out);
void mr_backend_destroy(struct mr_backend *be); /* NULL is a no-op */

/* The implementations' constructors (mr_backend_create picks one). */
int mr_backend_cpu_create(const struct mr_backend_config *cfg, struct mr_backend **out);
int mr_backend_sim_create(const struct mr_backend_config *cfg, struct mr_backend **out);
int mr_backend_cuda_create(const struct mr_backend_config *cfg, struct mr_backend **out);

#endif /* MOERUN_BACKEND_H */
