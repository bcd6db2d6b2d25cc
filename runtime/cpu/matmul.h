/* CPU matrix-vector and matrix-matrix products over weights of any supported type, and the
 * thread pool that runs them (internal).
 *
 * Weights W are [rows][k] in the weight type (row-major: row r is k elements, k / blck
 * blocks, as a GGML tensor with ne0 = k, ne1 = rows). Activations are float32.
 */
#ifndef MOERUN_CPU_MATMUL_H
#define MOERUN_CPU_MATMUL_H

#include "quants.h"

#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------------------------------------
 * Thread pool: n_threads workers (the caller's thread is worker 0), created once; each
 * cpu_pool_run() runs fn(arg, ith, nth) on every worker and returns when all have finished.
 * Workers spin briefly between jobs, then sleep, so back-to-back small jobs (decode) are cheap
 * and an idle pool costs nothing.
 * ------------------------------------------------------------------------------------------- */

struct cpu_pool;
typedef void (*cpu_task_fn)(void *arg, int ith, int nth);

/* n_threads <= 0: one per online core. Returns MOERUN_OK or an error (thread creation). */
int cpu_pool_create(int n_threads, struct cpu_pool **out);
void cpu_pool_destroy(struct cpu_pool *pool); /* NULL is a no-op */
int cpu_pool_size(const struct cpu_pool *pool);
/* Not reentrant: one run at a time per pool. pool may be NULL (runs fn(arg, 0, 1)). */
void cpu_pool_run(struct cpu_pool *pool, cpu_task_fn fn, void *arg);

/* ---------------------------------------------------------------------------------------------
 * Products. Scratch for the converted activations comes from the caller (no allocation on the
 * hot path): cpu_act_bytes() tells how much.
 * ------------------------------------------------------------------------------------------- */

/* Bytes to hold n rows of k activations converted to the companion type of weight type. */
size_t cpu_act_bytes(int type, int64_t k, int64_t n);

/* y[rows] = W[rows][k] . x[k]. k a multiple of the type's block size. */
int cpu_matvec(struct cpu_pool *pool, enum cpu_isa isa, int type, int64_t rows, int64_t k,
               const void *w, const float *x, float *y, void *scratch);

/* Y[n][rows] = X[n][k] . W[rows][k]^T: each weight row is read once for all n inputs. */
int cpu_matmul(struct cpu_pool *pool, enum cpu_isa isa, int type, int64_t rows, int64_t k,
               const void *w, int64_t n, const float *x, float *y, void *scratch);

#endif /* MOERUN_CPU_MATMUL_H */
