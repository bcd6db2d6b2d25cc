/* CUDA ops (cuda/ops.h) against float64 references on fresh random data: matvec and
 * dequantize-to-F16 for every weight type, the cuBLAS F16 product, RMSNorm, RoPE, router top-k,
 * SwiGLU, add, attention (decode and prompt, GQA); outputs poisoned with NaN before each run so
 * every element must be written; bad arguments and CUDA failures come back as statuses.
 * Exits 77 (skip) where there is no CUDA device. */
#include "testutil.h"

#include "cuda_test_util.h"

#include "backend.h"
#include "cpu/quants.h"
#include "cuda_backend.h"
#include "internal.h"
#include "ops.h"
#include "types.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Normalised error bounds ||gpu - ref|| / ||ref||, ref in float64. The matvec reference is the
 * float64 dot of the dequantized weights with the unrounded x (the GPU keeps x in F32), so the
 * only error left is F32 summation: the bounds are the brief's, loose for what they measure.
 * The F16 GEMM rounds W and X to F16 (2^-11 each). */
#define TOL_F32   1e-5
#define TOL_HALF  1e-3 /* F16, BF16 weights */
#define TOL_QUANT 1e-4
#define TOL_GEMM  5e-3
#define TOL_OPS   1e-5 /* norms, rope, router, swiglu, add, attention */

static struct tu_rng rng;
static void *stream, *cublas;

static const int all_types[] = {MOERUN_TYPE_F32,  MOERUN_TYPE_F16,  MOERUN_TYPE_BF16,
                                MOERUN_TYPE_Q8_0, MOERUN_TYPE_Q4_0, MOERUN_TYPE_Q4_K,
                                MOERUN_TYPE_Q5_K, MOERUN_TYPE_Q6_K};

static double type_tol(int type) {
    if (type == MOERUN_TYPE_F32)
        return TOL_F32;
    if (type == MOERUN_TYPE_F16 || type == MOERUN_TYPE_BF16)
        return TOL_HALF;
    return TOL_QUANT;
}

static int group_setup(void **state) {
    (void)state;
    tu_rng_init(&rng, tu_seed());
    if (cuda_stream_create(&stream) != MOERUN_OK || cuda_cublas_create(&cublas) != MOERUN_OK) {
        fprintf(stderr, "setup: %s\n", moerun_errmsg());
        return -1;
    }
    return 0;
}

static int group_teardown(void **state) {
    (void)state;
    cuda_cublas_destroy(cublas);
    cuda_stream_destroy(stream);
    return 0;
}

/* --- helpers ------------------------------------------------------------------------------- */

static void *dev_copy(const void *host, size_t bytes) {
    void *d = NULL;
    assert_int_equal(cuda_alloc(bytes, &d), MOERUN_OK);
    assert_int_equal(cuda_upload(d, host, bytes, stream), MOERUN_OK);
    return d;
}

/* n floats of NaN on the device (or written over d when not NULL) */
static float *dev_poison(float *d, size_t n) {
    float *h = malloc(n * sizeof(float));
    assert_non_null(h);
    for (size_t i = 0; i < n; i++)
        h[i] = NAN;
    if (!d)
        assert_int_equal(cuda_alloc(n * sizeof(float), (void **)&d), MOERUN_OK);
    assert_int_equal(cuda_upload(d, h, n * sizeof(float), stream), MOERUN_OK);
    free(h);
    return d;
}

/* run's result: synchronise, download n floats, check all finite (written) */
static float *dev_fetch(const float *d, size_t n) {
    assert_int_equal(cuda_stream_sync(stream), MOERUN_OK);
    float *h = malloc(n * sizeof(float) + 1);
    assert_non_null(h);
    assert_int_equal(cuda_download(h, d, n * sizeof(float), stream), MOERUN_OK);
    for (size_t i = 0; i < n; i++)
        if (!isfinite(h[i]))
            fail_msg("element %zu of %zu not written (or not finite): %g", i, n, (double)h[i]);
    return h;
}

static void check_rel(const char *what, const float *got, const double *ref, size_t n, double tol) {
    const double err = tu_rel_l2(got, ref, n);
    if (!(err <= tol))
        fail_msg("%s: normalised error %.3g > %.3g", what, err, tol);
}

/* Random weights [rows][k] of a type (quantized by the scalar reference) and their values. */
struct weights {
    size_t bytes;
    uint8_t *q;
    float *deq;
};

static void weights_make(struct weights *wt, int type, int64_t rows, int64_t k) {
    uint64_t row_bytes;
    assert_true(mr_type_nbytes(type, (uint64_t)k, &row_bytes));
    wt->bytes = (size_t)row_bytes * (size_t)rows;
    wt->q = malloc(wt->bytes + 1);
    wt->deq = malloc(sizeof(float) * (size_t)(rows * k));
    float *f = malloc(sizeof(float) * (size_t)k);
    assert_true(wt->q && wt->deq && f);
    for (int64_t r = 0; r < rows; r++) {
        tu_fill_normal(&rng, f, (size_t)k, (float)(0.02 * (1.0 + 3.0 * tu_rng_uniform(&rng))));
        cpu_ref_from_float(type, f, wt->q + (size_t)r * row_bytes, k);
        cpu_ref_to_float(type, wt->q + (size_t)r * row_bytes, wt->deq + r * k, k);
    }
    free(f);
}

static void weights_free(struct weights *wt) {
    free(wt->q);
    free(wt->deq);
}

/* --- products ------------------------------------------------------------------------------ */

static void matvec_case(int type, int64_t rows, int64_t k) {
    struct weights wt;
    weights_make(&wt, type, rows, k);
    float *x = malloc(sizeof(float) * (size_t)k);
    double *ref = malloc(sizeof(double) * (size_t)rows);
    assert_true(x && ref);
    tu_fill_normal(&rng, x, (size_t)k, 1.0f);
    for (int64_t r = 0; r < rows; r++) {
        double s = 0.0;
        for (int64_t i = 0; i < k; i++)
            s += (double)wt.deq[r * k + i] * (double)x[i];
        ref[r] = s;
    }
    void *dw = dev_copy(wt.q, wt.bytes);
    float *dx = dev_copy(x, sizeof(float) * (size_t)k);
    float *dy = dev_poison(NULL, (size_t)rows);
    assert_int_equal(cuda_matvec(type, rows, k, dw, dx, dy, stream), MOERUN_OK);
    float *y = dev_fetch(dy, (size_t)rows);
    char what[96];
    snprintf(what, sizeof(what), "matvec %s rows %lld k %lld", mr_type_info(type)->name,
             (long long)rows, (long long)k);
    check_rel(what, y, ref, (size_t)rows, type_tol(type));
    free(y);
    cuda_free(dw);
    cuda_free(dx);
    cuda_free(dy);
    free(x);
    free(ref);
    weights_free(&wt);
}

static void test_matvec_every_type(void **state) {
    (void)state;
    /* rows not a multiple of the 8 rows of a block; k of one block row, several, and past the
     * 4096-element shared-memory tile */
    static const int64_t rows[] = {1, 37, 67};
    static const int64_t ks[] = {256, 768, 4352};
    for (size_t t = 0; t < MR_ARRAY_LEN(all_types); t++)
        for (size_t i = 0; i < MR_ARRAY_LEN(rows); i++)
            matvec_case(all_types[t], rows[i], ks[(t + i) % MR_ARRAY_LEN(ks)]);
    for (size_t t = 0; t < MR_ARRAY_LEN(all_types); t++)
        matvec_case(all_types[t], 9, 4352);
    /* float types with k not a multiple of the vector width: the scalar path */
    matvec_case(MOERUN_TYPE_F32, 13, 4099);
    matvec_case(MOERUN_TYPE_F16, 13, 259);
    matvec_case(MOERUN_TYPE_BF16, 13, 1001);
}

static void test_dequant_f16(void **state) {
    (void)state;
    const int64_t rows = 5, k = 512, n = rows * k;
    for (size_t t = 0; t < MR_ARRAY_LEN(all_types); t++) {
        const int type = all_types[t];
        struct weights wt;
        weights_make(&wt, type, rows, k);
        void *dw = dev_copy(wt.q, wt.bytes);
        mr_fp16 *h = malloc(sizeof(mr_fp16) * (size_t)n);
        assert_non_null(h);
        for (int64_t i = 0; i < n; i++)
            h[i] = 0x7E00; /* F16 NaN: every element must be written */
        void *dh = dev_copy(h, sizeof(mr_fp16) * (size_t)n);
        assert_int_equal(cuda_dequant_f16(type, n, dw, dh, stream), MOERUN_OK);
        assert_int_equal(cuda_stream_sync(stream), MOERUN_OK);
        assert_int_equal(cuda_download(h, dh, sizeof(mr_fp16) * (size_t)n, stream), MOERUN_OK);
        for (int64_t i = 0; i < n; i++) {
            const float got = mr_fp16_to_fp32(h[i]), want = wt.deq[i];
            /* within one F16 step of the exact value (the kernel may fuse a multiply-add) */
            if (!(fabsf(got - want) <= fabsf(want) * 0x1p-10f + 1e-7f))
                fail_msg("dequant_f16 %s element %lld: %g, want %g", mr_type_info(type)->name,
                         (long long)i, (double)got, (double)want);
        }
        free(h);
        cuda_free(dw);
        cuda_free(dh);
        weights_free(&wt);
    }
}

/* ref[c][r] = W[r] . X[c] in float64 over the dequantized weights, for n columns. */
static void matmul_ref(const struct weights *wt, const float *x, int64_t n, int64_t rows, int64_t k,
                       double *ref) {
    for (int64_t c = 0; c < n; c++)
        for (int64_t r = 0; r < rows; r++) {
            double s = 0.0;
            for (int64_t i = 0; i < k; i++)
                s += (double)wt->deq[r * k + i] * (double)x[c * k + i];
            ref[c * rows + r] = s;
        }
}

static void test_matmul_f16_gemm(void **state) {
    (void)state;
    static const int64_t ns[] = {1, 3, 17};
    const int64_t rows = 37, k = 512;
    for (size_t t = 0; t < MR_ARRAY_LEN(all_types); t++) {
        const int type = all_types[t];
        const int64_t n = ns[t % MR_ARRAY_LEN(ns)];
        struct weights wt;
        weights_make(&wt, type, rows, k);
        float *x = malloc(sizeof(float) * (size_t)(n * k));
        double *ref = malloc(sizeof(double) * (size_t)(n * rows));
        assert_true(x && ref);
        tu_fill_normal(&rng, x, (size_t)(n * k), 1.0f);
        matmul_ref(&wt, x, n, rows, k, ref);
        void *dw = dev_copy(wt.q, wt.bytes), *scratch = NULL;
        float *dx = dev_copy(x, sizeof(float) * (size_t)(n * k));
        float *dy = dev_poison(NULL, (size_t)(n * rows));
        const size_t sb = cuda_matmul_scratch_bytes(rows, k, n);
        assert_true(sb >= sizeof(uint16_t) * (size_t)((rows + n) * k));
        assert_int_equal(cuda_alloc(sb, &scratch), MOERUN_OK);
        assert_int_equal(cuda_matmul(cublas, type, rows, k, dw, n, dx, dy, scratch, stream),
                         MOERUN_OK);
        float *y = dev_fetch(dy, (size_t)(n * rows));
        char what[64];
        snprintf(what, sizeof(what), "matmul %s n %lld", mr_type_info(type)->name, (long long)n);
        check_rel(what, y, ref, (size_t)(n * rows), TOL_GEMM);
        free(y);
        cuda_free(scratch);
        cuda_free(dw);
        cuda_free(dx);
        cuda_free(dy);
        free(x);
        free(ref);
        weights_free(&wt);
    }
}

/* The batched matvec (passes of up to 8 columns) and the cuBLAS product with a scratch that holds
 * only a few rows of W (several dequantize + GEMM chunks): Y[n][rows] against float64. */
static void batched_case(int type, int64_t rows, int64_t k, int64_t n, size_t scratch_bytes) {
    struct weights wt;
    weights_make(&wt, type, rows, k);
    float *x = malloc(sizeof(float) * (size_t)(n * k));
    double *ref = malloc(sizeof(double) * (size_t)(n * rows));
    assert_true(x && ref);
    tu_fill_normal(&rng, x, (size_t)(n * k), 1.0f);
    matmul_ref(&wt, x, n, rows, k, ref);
    void *dw = dev_copy(wt.q, wt.bytes), *scratch = NULL;
    float *dx = dev_copy(x, sizeof(float) * (size_t)(n * k));
    float *dy = dev_poison(NULL, (size_t)(n * rows));
    char what[96];
    if (scratch_bytes == 0) {
        assert_int_equal(cuda_matvec_n(type, rows, k, dw, n, dx, dy, stream), MOERUN_OK);
        snprintf(what, sizeof(what), "matvec_n %s rows %lld k %lld n %lld",
                 mr_type_info(type)->name, (long long)rows, (long long)k, (long long)n);
    } else {
        assert_int_equal(cuda_alloc(scratch_bytes, &scratch), MOERUN_OK);
        assert_int_equal(
            cuda_matmul_ws(cublas, type, rows, k, dw, n, dx, dy, scratch, scratch_bytes, stream),
            MOERUN_OK);
        snprintf(what, sizeof(what), "matmul_ws %s rows %lld k %lld n %lld, %zu scratch bytes",
                 mr_type_info(type)->name, (long long)rows, (long long)k, (long long)n,
                 scratch_bytes);
    }
    float *y = dev_fetch(dy, (size_t)(n * rows));
    /* the fused kernel keeps x in F32 whatever the type; cuBLAS rounds to F16 but F32 */
    const double tol = scratch_bytes == 0 || type == MOERUN_TYPE_F32 ? TOL_F32 : TOL_GEMM;
    check_rel(what, y, ref, (size_t)(n * rows), tol);
    free(y);
    cuda_free(scratch);
    cuda_free(dw);
    cuda_free(dx);
    cuda_free(dy);
    free(x);
    free(ref);
    weights_free(&wt);
}

static void test_batched_products(void **state) {
    (void)state;
    static const int64_t ns[] = {2, 3, 4, 7, 8, 11, 19};
    for (size_t t = 0; t < MR_ARRAY_LEN(all_types); t++)
        for (size_t i = 0; i < MR_ARRAY_LEN(ns); i++)
            batched_case(all_types[t], 37 + (int64_t)i, 768, ns[(t + i) % MR_ARRAY_LEN(ns)], 0);
    batched_case(MOERUN_TYPE_F32, 13, 4099, 5, 0); /* scalar F32 path, past the tile */
    /* chunks: X (n k halves) plus 5 rows of W, so 67 rows take 14 passes, the last of 2 rows */
    for (size_t t = 0; t < MR_ARRAY_LEN(all_types); t++) {
        const int64_t k = 512, n = 12;
        const size_t sb = cuda_matmul_x_bytes(k, n) + 5 * (size_t)k * 2;
        batched_case(all_types[t], 67, k, n, sb);
    }
}

/* --- layer parts --------------------------------------------------------------------------- */

static void test_rmsnorm(void **state) {
    (void)state;
    static const int64_t shapes[][2] = {{5, 2051}, {24, 128}, {1, 7}};
    for (size_t c = 0; c < MR_ARRAY_LEN(shapes); c++) {
        const int64_t rows = shapes[c][0], n = shapes[c][1];
        const float eps = 1e-6f;
        float *x = malloc(sizeof(float) * (size_t)(rows * n)), *w = malloc(sizeof(float) * n);
        double *ref = malloc(sizeof(double) * (size_t)(rows * n));
        assert_true(x && w && ref);
        tu_fill_normal(&rng, x, (size_t)(rows * n), 2.0f);
        tu_fill_normal(&rng, w, (size_t)n, 1.0f);
        for (int64_t r = 0; r < rows; r++) {
            double ss = 0.0;
            for (int64_t i = 0; i < n; i++)
                ss += (double)x[r * n + i] * x[r * n + i];
            const double scale = 1.0 / sqrt(ss / (double)n + eps);
            for (int64_t i = 0; i < n; i++)
                ref[r * n + i] = x[r * n + i] * scale * w[i];
        }
        float *dx = dev_copy(x, sizeof(float) * (size_t)(rows * n));
        float *dw = dev_copy(w, sizeof(float) * (size_t)n);
        float *dout = dev_poison(NULL, (size_t)(rows * n));
        assert_int_equal(cuda_rmsnorm(dout, dx, dw, rows, n, eps, stream), MOERUN_OK);
        float *y = dev_fetch(dout, (size_t)(rows * n));
        check_rel("rmsnorm", y, ref, (size_t)(rows * n), TOL_OPS);
        free(y);
        /* in place */
        assert_int_equal(cuda_rmsnorm(dx, dx, dw, rows, n, eps, stream), MOERUN_OK);
        y = dev_fetch(dx, (size_t)(rows * n));
        check_rel("rmsnorm in place", y, ref, (size_t)(rows * n), TOL_OPS);
        free(y);
        cuda_free(dx);
        cuda_free(dw);
        cuda_free(dout);
        free(x);
        free(w);
        free(ref);
    }
}

static void test_rope(void **state) {
    (void)state;
    const int64_t n_tok = 5, pos0 = 37;
    const int n_head = 3, hd = 80, n_rot = 64;
    const float base = 1e6f;
    const size_t n = (size_t)(n_tok * n_head * hd);
    for (int style = CUDA_ROPE_NORM; style <= CUDA_ROPE_NEOX; style++) {
        float *x = malloc(sizeof(float) * n);
        double *ref = malloc(sizeof(double) * n);
        assert_true(x && ref);
        tu_fill_normal(&rng, x, n, 1.0f);
        for (size_t i = 0; i < n; i++)
            ref[i] = x[i];
        for (int64_t t = 0; t < n_tok; t++)
            for (int h = 0; h < n_head; h++) {
                double *v = ref + (size_t)(t * n_head + h) * hd;
                for (int i = 0; i < n_rot / 2; i++) {
                    const double th = (double)(pos0 + t) * pow(base, -2.0 * i / n_rot);
                    const int a = style == CUDA_ROPE_NEOX ? i : 2 * i;
                    const int b = style == CUDA_ROPE_NEOX ? i + n_rot / 2 : 2 * i + 1;
                    const double x0 = v[a], x1 = v[b];
                    v[a] = x0 * cos(th) - x1 * sin(th);
                    v[b] = x0 * sin(th) + x1 * cos(th);
                }
            }
        float *dx = dev_copy(x, sizeof(float) * n);
        assert_int_equal(cuda_rope(dx, n_tok, n_head, hd, n_rot, pos0, base, style, stream),
                         MOERUN_OK);
        float *y = dev_fetch(dx, n);
        check_rel(style == CUDA_ROPE_NEOX ? "rope neox" : "rope norm", y, ref, n, TOL_OPS);
        for (size_t i = 0; i < n; i++) /* dims past n_rot are left exactly as they were */
            if (i % (size_t)hd >= (size_t)n_rot)
                assert_true(y[i] == x[i]);
        free(y);
        cuda_free(dx);
        free(x);
        free(ref);
    }
}

static void topk_case(int64_t n_tok, int E, int k, bool renorm) {
    float *lg = malloc(sizeof(float) * (size_t)(n_tok * E));
    double *p = malloc(sizeof(double) * (size_t)E);
    double *pall = malloc(sizeof(double) * (size_t)(n_tok * E));
    assert_true(lg && p && pall);
    tu_fill_normal(&rng, lg, (size_t)(n_tok * E), 3.0f);
    float *dl = dev_copy(lg, sizeof(float) * (size_t)(n_tok * E));
    float *dp = dev_poison(NULL, (size_t)(n_tok * E));
    float *dw = dev_poison(NULL, (size_t)(n_tok * k));
    int32_t *ds = (int32_t *)dev_poison(NULL, (size_t)(n_tok * k));
    assert_int_equal(cuda_softmax_topk(dl, n_tok, E, k, renorm, dp, ds, dw, stream), MOERUN_OK);
    float *probs = dev_fetch(dp, (size_t)(n_tok * E));
    float *sw = dev_fetch(dw, (size_t)(n_tok * k));
    int32_t *sel = malloc(sizeof(int32_t) * (size_t)(n_tok * k));
    assert_non_null(sel);
    assert_int_equal(cuda_download(sel, ds, sizeof(int32_t) * (size_t)(n_tok * k), stream),
                     MOERUN_OK);
    for (int64_t t = 0; t < n_tok; t++) {
        const float *l = lg + t * E;
        double mx = -INFINITY, sum = 0.0;
        for (int e = 0; e < E; e++)
            mx = fmax(mx, l[e]);
        for (int e = 0; e < E; e++)
            sum += p[e] = exp(l[e] - mx);
        for (int e = 0; e < E; e++)
            pall[t * E + e] = p[e] /= sum;
        /* the k-th largest reference probability */
        double kth = INFINITY;
        double picked_sum = 0.0;
        for (int j = 0; j < k; j++) {
            const int32_t s = sel[t * k + j];
            assert_true(s >= 0 && s < E);
            for (int i = 0; i < j; i++)
                assert_true(sel[t * k + i] != s); /* distinct */
            if (j > 0)                            /* descending */
                assert_true(p[s] <= p[sel[t * k + j - 1]] + 1e-6);
            picked_sum += p[s];
            kth = fmin(kth, p[s]);
        }
        int above = 0; /* no unpicked expert clearly above a picked one */
        for (int e = 0; e < E; e++)
            above += p[e] > kth + 1e-6;
        assert_true(above <= k - 1);
        for (int j = 0; j < k; j++) {
            const double want = p[sel[t * k + j]] / (renorm ? picked_sum : 1.0);
            if (!(fabs(sw[t * k + j] - want) <= 1e-5 * want + 1e-7))
                fail_msg("topk token %lld pick %d: weight %g, want %g", (long long)t, j,
                         (double)sw[t * k + j], want);
        }
    }
    check_rel("router probabilities", probs, pall, (size_t)(n_tok * E), TOL_OPS);
    free(probs);
    free(sw);
    free(sel);
    cuda_free(dl);
    cuda_free(dp);
    cuda_free(dw);
    cuda_free(ds);
    free(lg);
    free(p);
    free(pall);
}

/* Exact ties: logits drawn from 4 values, so equal logits give bit-equal probabilities and the
 * picks are fixed by the tie rule alone: larger logit first, the lower index among equals. */
static void topk_ties_case(int64_t n_tok, int E, int k) {
    const size_t np = (size_t)(n_tok * E), ns = (size_t)(n_tok * k);
    float *lg = malloc(sizeof(float) * np);
    int32_t *sel = malloc(sizeof(int32_t) * ns);
    assert_true(lg && sel);
    for (size_t i = 0; i < np; i++)
        lg[i] = (float)(tu_rng_u64(&rng) % 4);
    float *dl = dev_copy(lg, sizeof(float) * np);
    float *dw = dev_poison(NULL, ns);
    int32_t *ds = (int32_t *)dev_poison(NULL, ns);
    assert_int_equal(cuda_softmax_topk(dl, n_tok, E, k, true, dl, ds, dw, stream), MOERUN_OK);
    float *sw = dev_fetch(dw, ns);
    assert_int_equal(cuda_download(sel, ds, sizeof(int32_t) * ns, stream), MOERUN_OK);
    for (int64_t t = 0; t < n_tok; t++) {
        const float *l = lg + t * E;
        int j = 0;
        for (int v = 3; v >= 0 && j < k; v--)
            for (int e = 0; e < E && j < k; e++)
                if (l[e] == (float)v) {
                    if (sel[t * k + j] != e)
                        fail_msg("topk ties token %lld pick %d: expert %d, want %d (logit %d)",
                                 (long long)t, j, sel[t * k + j], e, v);
                    j++;
                }
        for (j = 1; j < k; j++) /* equal logits, bit-equal weights */
            if (l[sel[t * k + j]] == l[sel[t * k + j - 1]] && sw[t * k + j] != sw[t * k + j - 1])
                fail_msg("topk ties token %lld: weights %g and %g of equal logits", (long long)t,
                         (double)sw[t * k + j - 1], (double)sw[t * k + j]);
    }
    free(sw);
    free(sel);
    free(lg);
    cuda_free(dl);
    cuda_free(dw);
    cuda_free(ds);
}

static void test_softmax_topk(void **state) {
    (void)state;
    topk_ties_case(11, 60, 8);
    topk_ties_case(3, 256, 32);
    topk_ties_case(4, 9, 9);
    topk_case(13, 60, 4, false);
    topk_case(13, 60, 4, true);
    topk_case(3, 256, 8, true);
    topk_case(1, 8, 2, true);
    topk_case(17, 128, 8, false);
    topk_case(5, 33, 1, false);
    topk_case(2, 96, 32, true);
}

static void test_swiglu_add(void **state) {
    (void)state;
    const size_t n = 100003;
    float *g = malloc(sizeof(float) * n), *u = malloc(sizeof(float) * n);
    double *ref = malloc(sizeof(double) * n);
    assert_true(g && u && ref);
    tu_fill_normal(&rng, g, n, 3.0f);
    tu_fill_normal(&rng, u, n, 1.0f);
    for (size_t i = 0; i < n; i++)
        ref[i] = (double)g[i] / (1.0 + exp(-(double)g[i])) * u[i];
    float *dg = dev_copy(g, sizeof(float) * n), *du = dev_copy(u, sizeof(float) * n);
    float *dout = dev_poison(NULL, n);
    assert_int_equal(cuda_swiglu(dout, dg, du, (int64_t)n, stream), MOERUN_OK);
    float *y = dev_fetch(dout, n);
    check_rel("swiglu", y, ref, n, TOL_OPS);
    free(y);
    for (size_t i = 0; i < n; i++)
        ref[i] = (double)u[i] + (double)g[i];
    assert_int_equal(cuda_add(du, dg, (int64_t)n, stream), MOERUN_OK);
    y = dev_fetch(du, n);
    check_rel("add", y, ref, n, 1e-7);
    free(y);
    cuda_free(dg);
    cuda_free(du);
    cuda_free(dout);
    free(g);
    free(u);
    free(ref);
}

/* float64 attention of query q (head j) over keys 0 .. n_keys - 1 */
static void attention_ref(const float *q, const float *kc, const float *vc, int n_head,
                          int n_head_kv, int hd, int64_t n_keys, double *out) {
    const int64_t kvd = (int64_t)n_head_kv * hd;
    double *s = malloc(sizeof(double) * (size_t)n_keys);
    assert_non_null(s);
    for (int h = 0; h < n_head; h++) {
        const int kvh = h / (n_head / n_head_kv);
        double mx = -INFINITY, sum = 0.0;
        for (int64_t p = 0; p < n_keys; p++) {
            double d = 0.0;
            for (int i = 0; i < hd; i++)
                d += (double)q[h * hd + i] * kc[p * kvd + kvh * hd + i];
            s[p] = d / sqrt((double)hd);
            mx = fmax(mx, s[p]);
        }
        for (int64_t p = 0; p < n_keys; p++)
            sum += s[p] = exp(s[p] - mx);
        for (int i = 0; i < hd; i++) {
            double o = 0.0;
            for (int64_t p = 0; p < n_keys; p++)
                o += s[p] / sum * vc[p * kvd + kvh * hd + i];
            out[h * hd + i] = o;
        }
    }
    free(s);
}

/* KV caches [n_ctx][n_head_kv * hd]: random up to n_filled, NaN after (must never be read) */
static void make_cache(float *c, int64_t n_ctx, int64_t n_filled, int64_t kvd) {
    tu_fill_normal(&rng, c, (size_t)(n_filled * kvd), 1.5f);
    for (int64_t i = n_filled * kvd; i < n_ctx * kvd; i++)
        c[i] = NAN;
}

static void test_attention_decode(void **state) {
    (void)state;
    static const int cases[][4] = {/* n_head, n_head_kv, hd, n_keys */
                                   {8, 2, 128, 257},
                                   {6, 6, 72, 1},
                                   {4, 1, 256, 40}};
    for (size_t c = 0; c < MR_ARRAY_LEN(cases); c++) {
        const int H = cases[c][0], Hkv = cases[c][1], hd = cases[c][2];
        const int64_t n_keys = cases[c][3], n_ctx = n_keys + 19, kvd = (int64_t)Hkv * hd;
        float *q = malloc(sizeof(float) * (size_t)(H * hd));
        float *kc = malloc(sizeof(float) * (size_t)(n_ctx * kvd));
        float *vc = malloc(sizeof(float) * (size_t)(n_ctx * kvd));
        double *ref = malloc(sizeof(double) * (size_t)(H * hd));
        assert_true(q && kc && vc && ref);
        tu_fill_normal(&rng, q, (size_t)(H * hd), 1.5f);
        make_cache(kc, n_ctx, n_keys, kvd);
        make_cache(vc, n_ctx, n_keys, kvd);
        attention_ref(q, kc, vc, H, Hkv, hd, n_keys, ref);
        float *dq = dev_copy(q, sizeof(float) * (size_t)(H * hd));
        float *dk = dev_copy(kc, sizeof(float) * (size_t)(n_ctx * kvd));
        float *dv = dev_copy(vc, sizeof(float) * (size_t)(n_ctx * kvd));
        float *dout = dev_poison(NULL, (size_t)(H * hd));
        assert_int_equal(cuda_attention_decode(dq, dk, dv, dout, H, Hkv, hd, n_keys, stream),
                         MOERUN_OK);
        float *y = dev_fetch(dout, (size_t)(H * hd));
        check_rel("attention decode", y, ref, (size_t)(H * hd), TOL_OPS);
        free(y);
        cuda_free(dq);
        cuda_free(dk);
        cuda_free(dv);
        cuda_free(dout);
        free(q);
        free(kc);
        free(vc);
        free(ref);
    }
}

static void test_attention_prompt(void **state) {
    (void)state;
    static const int cases[][5] = {/* n_head, n_head_kv, hd, n_tok, pos0 */
                                   {6, 2, 64, 17, 0},
                                   {4, 4, 80, 40, 45},
                                   {8, 1, 256, 3, 100},
                                   {2, 2, 128, 1, 0}};
    for (size_t c = 0; c < MR_ARRAY_LEN(cases); c++) {
        const int H = cases[c][0], Hkv = cases[c][1], hd = cases[c][2];
        const int64_t n_tok = cases[c][3], pos0 = cases[c][4];
        const int64_t n_ctx = pos0 + n_tok + 33, kvd = (int64_t)Hkv * hd, qd = (int64_t)H * hd;
        const size_t nq = (size_t)(n_tok * qd);
        float *q = malloc(sizeof(float) * nq);
        float *kc = malloc(sizeof(float) * (size_t)(n_ctx * kvd));
        float *vc = malloc(sizeof(float) * (size_t)(n_ctx * kvd));
        double *ref = malloc(sizeof(double) * nq);
        assert_true(q && kc && vc && ref);
        tu_fill_normal(&rng, q, nq, 1.5f);
        make_cache(kc, n_ctx, pos0 + n_tok, kvd);
        make_cache(vc, n_ctx, pos0 + n_tok, kvd);
        for (int64_t t = 0; t < n_tok; t++) /* causal: token t sees 0 .. pos0 + t */
            attention_ref(q + t * qd, kc, vc, H, Hkv, hd, pos0 + t + 1, ref + t * qd);
        float *dq = dev_copy(q, sizeof(float) * nq);
        float *dk = dev_copy(kc, sizeof(float) * (size_t)(n_ctx * kvd));
        float *dv = dev_copy(vc, sizeof(float) * (size_t)(n_ctx * kvd));
        float *dout = dev_poison(NULL, nq);
        assert_int_equal(cuda_attention_prompt(dq, dk, dv, dout, n_tok, pos0, H, Hkv, hd, stream),
                         MOERUN_OK);
        float *y = dev_fetch(dout, nq);
        char what[64];
        snprintf(what, sizeof(what), "attention prompt hd %d n_tok %lld", hd, (long long)n_tok);
        check_rel(what, y, ref, nq, TOL_OPS);
        free(y);
        cuda_free(dq);
        cuda_free(dk);
        cuda_free(dv);
        cuda_free(dout);
        free(q);
        free(kc);
        free(vc);
        free(ref);
    }
}

/* --- failures ------------------------------------------------------------------------------ */

static void test_bad_arguments(void **state) {
    (void)state;
    float *buf = dev_poison(NULL, 1024); /* 4096 bytes, written: compute-sanitizer's initcheck */
    /* activation-only / unknown types, k not a whole number of blocks, misaligned K-quants */
    assert_int_equal(cuda_matvec(MOERUN_TYPE_Q8_K, 1, 256, buf, buf, buf, stream),
                     MOERUN_ERR_UNSUPPORTED);
    assert_true(strstr(moerun_errmsg(), "cuda_matvec") != NULL);
    assert_int_equal(cuda_matvec(MOERUN_TYPE_Q4_K, 1, 300, buf, buf, buf, stream),
                     MOERUN_ERR_INVALID_ARG);
    assert_int_equal(cuda_matvec(MOERUN_TYPE_Q4_K, 1, 256, (char *)buf + 2, buf, buf, stream),
                     MOERUN_ERR_INVALID_ARG);
    /* past the kernel's limits: unsupported; k > E or nothing to write: invalid */
    assert_int_equal(cuda_softmax_topk(buf, 1, 300, 2, true, NULL, (int32_t *)buf, buf, stream),
                     MOERUN_ERR_UNSUPPORTED);
    assert_int_equal(cuda_softmax_topk(buf, 1, 64, 33, true, NULL, (int32_t *)buf, buf, stream),
                     MOERUN_ERR_UNSUPPORTED);
    assert_int_equal(cuda_softmax_topk(buf, 1, 16, 17, true, NULL, (int32_t *)buf, buf, stream),
                     MOERUN_ERR_INVALID_ARG);
    assert_int_equal(cuda_softmax_topk(buf, 1, 16, 0, true, NULL, NULL, NULL, stream),
                     MOERUN_ERR_INVALID_ARG);
    /* a scratch that holds less than X and one row of W */
    assert_int_equal(
        cuda_matmul_ws(cublas, MOERUN_TYPE_Q4_K, 4, 256, buf, 2, buf, buf, buf, 1024, stream),
        MOERUN_ERR_INVALID_ARG);
    assert_int_equal(cuda_attention_decode(buf, buf, buf, buf, 6, 4, 64, 1, stream),
                     MOERUN_ERR_INVALID_ARG);
    assert_int_equal(cuda_attention_prompt(buf, buf, buf, buf, 1, 0, 4, 4, 512, stream),
                     MOERUN_ERR_UNSUPPORTED);
    assert_int_equal(cuda_rope(buf, 1, 1, 64, 63, 0, 1e4f, CUDA_ROPE_NEOX, stream),
                     MOERUN_ERR_INVALID_ARG);
    /* a CUDA failure (an allocation no device has) is an error with a message */
    void *huge = (void *)&huge;
    assert_int_equal(cuda_alloc((size_t)1 << 60, &huge), MOERUN_ERR_BACKEND);
    assert_null(huge);
    assert_true(strstr(moerun_errmsg(), "cudaMalloc") != NULL);
    /* the stream still works after it */
    assert_int_equal(cuda_add(buf, buf, 16, stream), MOERUN_OK);
    assert_int_equal(cuda_stream_sync(stream), MOERUN_OK);
    cuda_free(buf);
}

/* LAST: a kernel fault on an invalid weight pointer comes back as MOERUN_ERR_BACKEND with a
 * message, not an abort. The fault is sticky: the context is unusable afterwards. */
static void test_kernel_fault_is_a_status(void **state) {
    (void)state;
    float *buf = NULL;
    assert_int_equal(cuda_alloc(4096, (void **)&buf), MOERUN_OK);
    const void *bad = (const void *)(uintptr_t)0x1000;
    int rc = cuda_matvec(MOERUN_TYPE_F32, 64, 256, bad, buf, buf, stream);
    if (rc == MOERUN_OK)
        rc = cuda_stream_sync(stream);
    assert_int_equal(rc, MOERUN_ERR_BACKEND);
    assert_true(strstr(moerun_errmsg(), "cuda") != NULL);
    fprintf(stderr, "expected failure: %s\n", moerun_errmsg());
    cuda_free(buf);
}

int main(void) {
    if (!ctu_device_present())
        return TU_SKIP;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matvec_every_type),
        cmocka_unit_test(test_dequant_f16),
        cmocka_unit_test(test_matmul_f16_gemm),
        cmocka_unit_test(test_batched_products),
        cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_rope),
        cmocka_unit_test(test_softmax_topk),
        cmocka_unit_test(test_swiglu_add),
        cmocka_unit_test(test_attention_decode),
        cmocka_unit_test(test_attention_prompt),
        cmocka_unit_test(test_bad_arguments),
        cmocka_unit_test(test_kernel_fault_is_a_status), /* must stay last */
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
