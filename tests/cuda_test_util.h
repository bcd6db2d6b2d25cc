/* The CUDA backend tests' shared setup and helpers (test_cuda_backend, test_cuda_streams;
 * test_cuda_ops uses the device check): the device check that makes them skip, the backends they
 * run on (a CUDA backend, a clone of it with a workspace as a session has, and the CPU backend with
 * a workspace to compare with), and backend memory filled from the host, poisoned with NaN, or read
 * back. Errors fail the running test (CMocka asserts). */
#ifndef MOERUN_CUDA_TEST_UTIL_H
#define MOERUN_CUDA_TEST_UTIL_H

#include "testutil.h"

#include "backend.h"

#include <stdbool.h>
#include <stddef.h>

#define CTU_N_CTX   512 /* the workspaces' context, tokens */
#define CTU_N_TYPES 8

extern const int ctu_all_types[CTU_N_TYPES]; /* every weight type, the workspaces' too */
extern struct tu_rng ctu_rng;                /* seeded with tu_seed() by ctu_setup */

/* True when cuda_device_count finds a device; otherwise says why on stderr (the backend's
 * message names the driver and runtime versions) and the program exits TU_SKIP. */
bool ctu_device_present(void);

/* A CMocka group setup's work: seeds ctu_rng, creates the CUDA backend (*root), a clone of it
 * (*gpu) and the CPU backend (*cpu), the last two with a workspace for ctu_all_types, CTU_N_CTX
 * and 64-token batches (max_elements smaller than the larger test matrices: the GPU's GEMM path
 * dequantizes them in several chunks of rows). Any out-pointer may be NULL. Returns 0, or -1
 * with a message on stderr. */
int ctu_setup(struct mr_backend **root, struct mr_backend **gpu, struct mr_backend **cpu);
/* The CMocka group teardown: frees what ctu_setup made (the clone before its root). */
int ctu_teardown(void **state);

/* (mr_backend_destroy is in the library, not linked here); NULL is a no-op */
void ctu_be_destroy(struct mr_backend *be);

/* bytes of backend memory holding a copy of host (NULL: uninitialised) */
void *ctu_put(struct mr_backend *be, const void *host, size_t bytes);
/* n floats of NaN in backend memory: every element must be written */
float *ctu_poison(struct mr_backend *be, size_t n);
/* download n floats (after the stream's work), all finite; malloc'd */
float *ctu_get(struct mr_backend *be, const float *d, size_t n);
/* n floats N(0, scale^2) from ctu_rng; malloc'd */
float *ctu_host_normal(size_t n, float scale);

#endif /* MOERUN_CUDA_TEST_UTIL_H */
