/* The CUDA backend's memory, streams, events and callbacks through its ops table
 * (runtime/backend.h, cuda/backend.cu): instances and clones, allocation, upload, copy and
 * download, the copy stream ordered against the compute stream by events, host callbacks, and
 * errors as statuses (unsupported and invalid arguments, no workspace, no such device). The ops
 * themselves are test_cuda_backend. Exits 77 (skip) where there is no device. */
#include "cuda_test_util.h"

#include "backend.h"
#include "moerun.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static struct mr_backend *root, *gpu; /* from ctu_setup: gpu a clone of root, as a session has */

static int group_setup(void **state) {
    (void)state;
    return ctu_setup(&root, &gpu, NULL);
}

/* --- memory, streams, events --------------------------------------------------------------- */

static void test_instance_and_memory(void **state) {
    (void)state;
    assert_int_equal(gpu->ops->version, MR_BACKEND_VERSION);
    assert_string_equal(gpu->ops->name, "cuda");
    assert_int_equal(gpu->kind, MR_BACKEND_CUDA);
    assert_false(gpu->host_memory);
    assert_true(strncmp(gpu->ops->describe(gpu), "cuda:0 ", 7) == 0);
    assert_string_equal(gpu->ops->describe(gpu), root->ops->describe(root));
    uint64_t total = 0, free_now = 0;
    assert_int_equal(gpu->ops->mem_info(gpu, &total, &free_now), MOERUN_OK);
    assert_true(total > 0 && free_now > 0 && free_now <= total);

    void *p = (void *)&p;
    assert_int_equal(gpu->ops->alloc(gpu, 0, &p), MOERUN_OK);
    assert_null(p);
    gpu->ops->free(gpu, NULL);

    /* upload, then the source is reused at once; copy; download */
    const size_t n = 1 << 20;
    float *h = ctu_host_normal(n, 1.0f), *keep = malloc(n * 4);
    assert_non_null(keep);
    memcpy(keep, h, n * 4);
    float *a = ctu_put(gpu, NULL, n * 4), *b = ctu_put(gpu, NULL, n * 4);
    assert_true((uintptr_t)a % 256 == 0 && (uintptr_t)b % 256 == 0);
    assert_int_equal(gpu->ops->upload(gpu, a, h, n * 4), MOERUN_OK);
    assert_int_equal(gpu->ops->sync(gpu, MR_STREAM_COMPUTE), MOERUN_OK); /* then h may change */
    memset(h, 0xFF, n * 4);
    assert_int_equal(gpu->ops->copy(gpu, b, a, n * 4), MOERUN_OK);
    assert_int_equal(gpu->ops->download(gpu, h, b, n * 4), MOERUN_OK);
    assert_memory_equal(h, keep, n * 4);

    /* a second clone shares the memory of the first; destroyed on its own */
    struct mr_backend *other = NULL;
    assert_int_equal(root->ops->clone(root, 2, &other), MOERUN_OK);
    memset(h, 0, n * 4);
    assert_int_equal(other->ops->download(other, h, a, n * 4), MOERUN_OK);
    assert_memory_equal(h, keep, n * 4);
    ctu_be_destroy(other);

    /* an allocation no device has: an error with a message, and the instance still works */
    p = (void *)&p;
    assert_int_equal(gpu->ops->alloc(gpu, (uint64_t)1 << 60, &p), MOERUN_ERR_BACKEND);
    assert_null(p);
    assert_non_null(strstr(moerun_errmsg(), "cudaMalloc"));
    assert_int_equal(gpu->ops->add(gpu, a, b, (int64_t)n), MOERUN_OK);
    assert_int_equal(gpu->ops->sync(gpu, MR_STREAM_COMPUTE), MOERUN_OK);
    assert_int_equal(gpu->ops->sync(gpu, MR_STREAM_COPY), MOERUN_OK);
    gpu->ops->free(gpu, a), gpu->ops->free(gpu, b);
    free(h), free(keep);
}

struct cb_state {
    float *src; /* the copy's pinned source: the callback may reuse it */
    size_t n;
    volatile int ran;
};

static void overwrite_source(void *arg) {
    struct cb_state *s = arg;
    for (size_t i = 0; i < s->n; i++) /* only safe once the copy has completed */
        s->src[i] = -1.0f;
    s->ran = 1;
}

static void test_copy_stream_and_events(void **state) {
    (void)state;
    const size_t n = (size_t)16 << 20; /* 64 MiB: long enough that a misordering would show */
    float *pinned = NULL;
    assert_int_equal(posix_memalign((void **)&pinned, 4096, n * 4), 0);
    float *x = ctu_host_normal(1 << 16, 1.0f);
    for (size_t i = 0; i < n; i++)
        pinned[i] = x[i & 0xFFFF];
    assert_int_equal(gpu->ops->host_register(gpu, pinned, n * 4), MOERUN_OK);

    float *dst = ctu_put(gpu, NULL, n * 4), *y = ctu_poison(gpu, n);
    assert_int_equal(gpu->ops->upload(gpu, y, pinned, n * 4), MOERUN_OK); /* y = x */
    assert_int_equal(gpu->ops->sync(gpu, MR_STREAM_COMPUTE), MOERUN_OK);  /* pinned may change */
    struct mr_event *ev = NULL, *never = NULL;
    assert_int_equal(gpu->ops->event_create(gpu, &ev), MOERUN_OK);
    assert_int_equal(gpu->ops->event_create(gpu, &never), MOERUN_OK);
    /* copy stream: copy, record, then a callback that overwrites the source */
    struct cb_state cb = {pinned, n, 0};
    assert_int_equal(gpu->ops->copy_async(gpu, dst, pinned, n * 4), MOERUN_OK);
    assert_int_equal(gpu->ops->record(gpu, MR_STREAM_COPY, ev), MOERUN_OK);
    assert_int_equal(gpu->ops->callback(gpu, MR_STREAM_COPY, overwrite_source, &cb), MOERUN_OK);
    /* compute stream: wait for the copy, then y += dst (= 2x); a never-recorded event is done */
    assert_int_equal(gpu->ops->wait(gpu, MR_STREAM_COMPUTE, never), MOERUN_OK);
    assert_int_equal(gpu->ops->wait(gpu, MR_STREAM_COMPUTE, ev), MOERUN_OK);
    assert_int_equal(gpu->ops->add(gpu, y, dst, (int64_t)n), MOERUN_OK);
    float *got = ctu_get(gpu, y, n);
    for (size_t i = 0; i < n; i++)
        if (got[i] != 2.0f * x[i & 0xFFFF])
            fail_msg("element %zu after the event: %g, want %g", i, (double)got[i],
                     2.0 * x[i & 0xFFFF]);
    assert_int_equal(gpu->ops->sync(gpu, MR_STREAM_COPY), MOERUN_OK);
    assert_int_equal(cb.ran, 1);
    free(got);
    got = ctu_get(gpu, dst, n); /* the copy read the source before the callback overwrote it */
    for (size_t i = 0; i < n; i++)
        if (got[i] != x[i & 0xFFFF])
            fail_msg("copied element %zu: %g, want %g", i, (double)got[i], (double)x[i & 0xFFFF]);
    /* events re-recorded on the compute stream, waited on by the copy stream */
    assert_int_equal(gpu->ops->record(gpu, MR_STREAM_COMPUTE, ev), MOERUN_OK);
    assert_int_equal(gpu->ops->wait(gpu, MR_STREAM_COPY, ev), MOERUN_OK);
    assert_int_equal(gpu->ops->sync(gpu, MR_STREAM_COPY), MOERUN_OK);
    assert_int_equal(gpu->ops->record(gpu, MR_STREAM_COPY, NULL), MOERUN_ERR_INVALID_ARG);
    gpu->ops->event_destroy(gpu, ev);
    gpu->ops->event_destroy(gpu, never);
    gpu->ops->event_destroy(gpu, NULL);
    gpu->ops->free(gpu, dst), gpu->ops->free(gpu, y);
    gpu->ops->host_unregister(gpu, pinned);
    free(pinned), free(got), free(x);
}

/* --- errors -------------------------------------------------------------------------------- */

static void test_errors(void **state) {
    (void)state;
    float *zeros = calloc(1 << 14, sizeof(float)); /* written: compute-sanitizer's initcheck */
    assert_non_null(zeros);
    float *buf = ctu_put(gpu, zeros, 1 << 16);
    free(zeros);
    /* unknown and activation-only weight types: ERR_UNSUPPORTED, nothing launched */
    assert_int_equal(gpu->ops->matmul(gpu, MOERUN_TYPE_Q8_K, 4, 256, buf, 1, buf, buf),
                     MOERUN_ERR_UNSUPPORTED);
    assert_int_equal(gpu->ops->matmul(gpu, 99, 4, 256, buf, 3, buf, buf), MOERUN_ERR_UNSUPPORTED);
    assert_int_equal(gpu->ops->matmul(gpu, MOERUN_TYPE_Q4_K, 4, 300, buf, 1, buf, buf),
                     MOERUN_ERR_INVALID_ARG);
    assert_int_equal(gpu->ops->softmax_topk(gpu, buf, 1, 300, 2, true, buf, (int32_t *)buf, buf),
                     MOERUN_ERR_UNSUPPORTED);
    assert_int_equal(gpu->ops->softmax_topk(gpu, buf, 1, 16, 17, true, buf, (int32_t *)buf, buf),
                     MOERUN_ERR_INVALID_ARG);
    assert_int_equal(gpu->ops->attention(gpu, buf, buf, buf, buf, 2, 0, 4, 4, 512),
                     MOERUN_ERR_UNSUPPORTED);
    assert_int_equal(gpu->ops->attention(gpu, buf, buf, buf, buf, 1, 0, 6, 4, 64),
                     MOERUN_ERR_INVALID_ARG);
    assert_int_equal(gpu->ops->rope(gpu, buf, 1, 1, 64, 63, 0, 1e4f, MR_ROPE_MODE_NEOX),
                     MOERUN_ERR_INVALID_ARG);
    assert_int_equal(gpu->ops->rope(gpu, buf, 1, 1, 64, 64, 0, 1e4f, (enum mr_rope_mode)7),
                     MOERUN_ERR_INVALID_ARG);
    assert_int_equal(gpu->ops->sync(gpu, (enum mr_stream)5), MOERUN_ERR_INVALID_ARG);

    /* the cuBLAS path needs the workspace: an instance without one says so; F32 needs none and
     * the fused widths none either */
    struct mr_backend *bare = NULL;
    assert_int_equal(root->ops->clone(root, 0, &bare), MOERUN_OK);
    assert_int_equal(bare->ops->matmul(bare, MOERUN_TYPE_Q4_K, 4, 256, buf, 9, buf, buf),
                     MOERUN_ERR_INVALID_ARG);
    assert_non_null(strstr(moerun_errmsg(), "workspace"));
    assert_int_equal(bare->ops->matmul(bare, MOERUN_TYPE_F32, 4, 256, buf, 9, buf, buf + 4096),
                     MOERUN_OK);
    assert_int_equal(bare->ops->matmul(bare, MOERUN_TYPE_Q4_K, 4, 256, buf, 8, buf, buf + 4096),
                     MOERUN_OK);
    assert_int_equal(bare->ops->sync(bare, MR_STREAM_COMPUTE), MOERUN_OK);
    ctu_be_destroy(bare);
    const struct mr_workspace_need small = {.n_batch = 8, .max_k = 4096, .types = ~0};
    assert_int_equal(gpu->ops->workspace_bytes(gpu, &small), 0);

    /* no such device: an error with a message, not a crash */
    struct mr_backend *none = (struct mr_backend *)&none;
    const struct mr_backend_config cfg = {.kind = MR_BACKEND_CUDA, .device = 1000};
    assert_int_equal(mr_backend_cuda_create(&cfg, &none), MOERUN_ERR_BACKEND);
    assert_null(none);
    assert_non_null(strstr(moerun_errmsg(), "no CUDA device"));
    assert_int_equal(gpu->ops->sync(gpu, MR_STREAM_COMPUTE), MOERUN_OK);
    gpu->ops->free(gpu, buf);
}

int main(void) {
    if (!ctu_device_present())
        return TU_SKIP;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_instance_and_memory),
        cmocka_unit_test(test_copy_stream_and_events),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, group_setup, ctu_teardown);
}
