/* The CPU backend's instance (internal): shared with the sim backend, which computes with the
 * same ops from its own "device" allocation. */
#ifndef MOERUN_CPU_BACKEND_CPU_H
#define MOERUN_CPU_BACKEND_CPU_H

#include "backend.h"
#include "matmul.h"

struct cpu_backend {
    struct mr_backend base;
    struct cpu_backend *root; /* the instance this one was cloned from (itself for a root) */
    const moerun_allocator *a;
    struct cpu_pool *pool;
    enum cpu_isa isa;
    int n_threads;
    uint8_t *ws; /* workspace: converted activations, then [n_threads][n_ctx] scores */
    uint64_t ws_bytes;
    uint64_t act_bytes;    /* of ws: the products' converted activations */
    uint32_t scores_n_ctx; /* of ws: positions each thread's scores hold */
    char desc[96];
};

/* The CPU ops table (compute ops and synchronous memory and copy ops). */
extern const struct mr_backend_ops cpu_backend_ops;

/* Fill c (ops, pool of n_threads, description) as a root instance; cpu_backend_fini undoes
 * it. Returns MOERUN_OK or an error from the pool. */
int cpu_backend_init(struct cpu_backend *c, const struct mr_backend_ops *ops,
                     enum mr_backend_kind kind, int n_threads, const moerun_allocator *a);
void cpu_backend_fini(struct cpu_backend *c);

#endif /* MOERUN_CPU_BACKEND_CPU_H */
