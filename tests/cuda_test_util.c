/* The CUDA backend tests' shared setup and helpers: see cuda_test_util.h. */
#include "cuda_test_util.h"

#include "cuda_backend.h"
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

const int ctu_all_types[CTU_N_TYPES] = {MOERUN_TYPE_F32,  MOERUN_TYPE_F16,  MOERUN_TYPE_BF16,
                                        MOERUN_TYPE_Q8_0, MOERUN_TYPE_Q4_0, MOERUN_TYPE_Q4_K,
                                        MOERUN_TYPE_Q5_K, MOERUN_TYPE_Q6_K};
struct tu_rng ctu_rng;

static struct mr_backend *root, *gpu, *cpu; /* gpu: a clone of root, as a session has */
static void *gpu_ws, *cpu_ws;

bool ctu_device_present(void) {
    int n = 0;
    const int rc = cuda_device_count(&n);
    if (rc == MOERUN_OK && n > 0)
        return true;
    if (rc == MOERUN_OK) { /* the backend's message names the driver and runtime versions */
        const struct mr_backend_config cfg = {.kind = MR_BACKEND_CUDA};
        struct mr_backend *be = NULL;
        if (mr_backend_cuda_create(&cfg, &be) == MOERUN_OK) /* cannot happen with no device */
            be->ops->destroy(be);
    }
    fprintf(stderr, "no CUDA device: skipping (%s)\n", moerun_errmsg());
    return false;
}

/* The workspace need of both backends. max_elements is smaller than the larger test matrices on
 * purpose: the GPU's GEMM path then dequantizes them in several chunks of rows. */
static struct mr_workspace_need ws_need(void) {
    struct mr_workspace_need need = {
        .n_batch = 64, .n_ctx = CTU_N_CTX, .max_k = 4096, .max_rows = 1024, .max_elements = 100000};
    for (size_t t = 0; t < MR_ARRAY_LEN(ctu_all_types); t++)
        need.types |= 1 << ctu_all_types[t];
    return need;
}

void ctu_be_destroy(struct mr_backend *be) {
    if (be)
        be->ops->destroy(be);
}

int ctu_setup(struct mr_backend **root_out, struct mr_backend **gpu_out,
              struct mr_backend **cpu_out) {
    tu_rng_init(&ctu_rng, tu_seed());
    struct mr_backend_config cfg = {.kind = MR_BACKEND_CUDA, .device = 0, .n_threads = 4};
    const struct mr_workspace_need need = ws_need();
    if (mr_backend_cuda_create(&cfg, &root) || root->ops->clone(root, 0, &gpu) ||
        root->ops->alloc(gpu, gpu->ops->workspace_bytes(gpu, &need), &gpu_ws)) {
        fprintf(stderr, "setup (cuda): %s\n", moerun_errmsg());
        return -1;
    }
    gpu->ops->set_workspace(gpu, gpu_ws, gpu->ops->workspace_bytes(gpu, &need));
    cfg.kind = MR_BACKEND_CPU;
    if (mr_backend_cpu_create(&cfg, &cpu) ||
        cpu->ops->alloc(cpu, cpu->ops->workspace_bytes(cpu, &need), &cpu_ws)) {
        fprintf(stderr, "setup (cpu): %s\n", moerun_errmsg());
        return -1;
    }
    cpu->ops->set_workspace(cpu, cpu_ws, cpu->ops->workspace_bytes(cpu, &need));
    fprintf(stderr, "%s; compared with %s\n", gpu->ops->describe(gpu), cpu->ops->describe(cpu));
    if (root_out)
        *root_out = root;
    if (gpu_out)
        *gpu_out = gpu;
    if (cpu_out)
        *cpu_out = cpu;
    return 0;
}

int ctu_teardown(void **state) {
    (void)state;
    if (gpu)
        gpu->ops->free(gpu, gpu_ws);
    ctu_be_destroy(gpu); /* the clone before its root */
    ctu_be_destroy(root);
    if (cpu)
        cpu->ops->free(cpu, cpu_ws);
    ctu_be_destroy(cpu);
    return 0;
}

void *ctu_put(struct mr_backend *be, const void *host, size_t bytes) {
    void *d = NULL;
    assert_int_equal(be->ops->alloc(be, bytes, &d), MOERUN_OK);
    if (host) { /* upload is asynchronous: host stays unchanged until a sync */
        assert_int_equal(be->ops->upload(be, d, host, bytes), MOERUN_OK);
        assert_int_equal(be->ops->sync(be, MR_STREAM_COMPUTE), MOERUN_OK);
    }
    return d;
}

float *ctu_poison(struct mr_backend *be, size_t n) {
    float *h = malloc(n * sizeof(float));
    assert_non_null(h);
    for (size_t i = 0; i < n; i++)
        h[i] = NAN;
    float *d = ctu_put(be, h, n * sizeof(float));
    free(h);
    return d;
}

float *ctu_get(struct mr_backend *be, const float *d, size_t n) {
    float *h = malloc(n * sizeof(float) + 1);
    assert_non_null(h);
    assert_int_equal(be->ops->download(be, h, d, n * sizeof(float)), MOERUN_OK);
    for (size_t i = 0; i < n; i++)
        if (!isfinite(h[i]))
            fail_msg("%s: element %zu of %zu not written (or not finite): %g", be->ops->name, i, n,
                     (double)h[i]);
    return h;
}

float *ctu_host_normal(size_t n, float scale) {
    float *x = malloc(n * sizeof(float) + 1);
    assert_non_null(x);
    tu_fill_normal(&ctu_rng, x, n, scale);
    return x;
}
