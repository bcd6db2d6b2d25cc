/* The CUDA backend's ops through its ops table (runtime/backend.h, cuda/backend.cu): every op
 * against a float64 reference on fresh random data (seed printed; MOERUN_TEST_SEED replays it)
 * and against the CPU backend; outputs poisoned with NaN first, so every element must be written.
 * Memory, streams, events, callbacks and errors are test_cuda_streams. Exits 77 (skip) where
 * there is no device.
 *
 * Normalised errors ||y - ref|| / ||ref|| (ref in float64) and their bounds:
 *  - matmul, n <= 8 (fused matvec, x kept F32, F32 sums): 1e-5 for every weight type (the
 *    reference uses the same dequantized weights, so only F32 summation is left);
 *  - matmul, n > 8 (cuBLAS): F32 weights 1e-5 (F32 GEMM); F16 weights 1e-3 (x rounded to F16,
 *    2^-11); the other types 2e-3 (x and the dequantized weights rounded to F16);
 *  - rmsnorm, rope, attention, router, swiglu, add_gated: 1e-5; add, add_rows, gather_rows,
 *    scatter_scaled: 1e-7, sum_slots 1e-6 (F32 sums of up to 8 slots) against float64, and the
 *    four bit-identical to the CPU backend (the same F32 operations in the same order).
 * Against the CPU backend: F32 weights 1e-5 directly; otherwise the CPU's own error (it rounds x
 * to its dot products' companion type) is measured against the same reference and the bound is
 * the GPU's bound plus it (triangle inequality). */
#include "cuda_test_util.h"

#include "backend.h"
#include "cpu/quants.h"
#include "internal.h"
#include "types.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOL_FUSED    1e-5
#define TOL_GEMM_F32 1e-5
#define TOL_GEMM_F16 1e-3
#define TOL_GEMM_Q   2e-3
#define TOL_OPS      1e-5
#define TOL_EXACT    1e-7

static struct mr_backend *gpu, *cpu; /* from ctu_setup: gpu a clone of the CUDA backend */

static int group_setup(void **state) {
    (void)state;
    return ctu_setup(NULL, &gpu, &cpu);
}

/* --- checks -------------------------------------------------------------------------------- */

static double check_rel(const char *what, const float *got, const double *ref, size_t n,
                        double tol) {
    const double err = tu_rel_l2(got, ref, n);
    if (!(err <= tol))
        fail_msg("%s: normalised error %.3g > %.3g", what, err, tol);
    return err;
}

/* the GPU against the CPU backend: within tol_gpu plus the CPU's own error against ref */
static void check_vs_cpu(const char *what, const float *g, const float *c, const double *ref,
                         size_t n, double tol_gpu) {
    double *cd = malloc(n * sizeof(double));
    assert_non_null(cd);
    for (size_t i = 0; i < n; i++)
        cd[i] = c[i];
    const double e_cpu = tu_rel_l2(c, ref, n), err = tu_rel_l2(g, cd, n);
    const double tol = tol_gpu + 1.01 * e_cpu + 1e-9;
    if (!(err <= tol))
        fail_msg("%s: GPU vs CPU normalised error %.3g > %.3g (CPU vs float64 %.3g)", what, err,
                 tol, e_cpu);
    free(cd);
}

static void check_identical(const char *what, const float *g, const float *c, size_t n) {
    if (memcmp(g, c, n * sizeof(float)) != 0)
        for (size_t i = 0; i < n; i++)
            if (memcmp(&g[i], &c[i], sizeof(float)))
                fail_msg("%s: element %zu: GPU %.9g, CPU %.9g (must be identical)", what, i,
                         (double)g[i], (double)c[i]);
}

static double *host_ref(size_t n) {
    double *r = malloc(n * sizeof(double) + 1);
    assert_non_null(r);
    return r;
}

/* --- products ------------------------------------------------------------------------------ */

static double gpu_bound(int type, int64_t n) {
    if (n <= 8)
        return TOL_FUSED;
    if (type == MOERUN_TYPE_F32)
        return TOL_GEMM_F32;
    return type == MOERUN_TYPE_F16 ? TOL_GEMM_F16 : TOL_GEMM_Q;
}

static void matmul_case(int type, int64_t rows, int64_t k, int64_t n) {
    uint64_t row_bytes;
    assert_true(mr_type_nbytes(type, (uint64_t)k, &row_bytes));
    const size_t wbytes = (size_t)row_bytes * (size_t)rows;
    uint8_t *wq = malloc(wbytes);
    float *deq = malloc(sizeof(float) * (size_t)(rows * k));
    assert_true(wq && deq);
    for (int64_t r = 0; r < rows; r++) { /* rows of different scales */
        float *f =
            ctu_host_normal((size_t)k, (float)(0.02 * (1.0 + 3.0 * tu_rng_uniform(&ctu_rng))));
        cpu_ref_from_float(type, f, wq + (size_t)r * row_bytes, k);
        cpu_ref_to_float(type, wq + (size_t)r * row_bytes, deq + r * k, k);
        free(f);
    }
    float *x = ctu_host_normal((size_t)(n * k), 1.0f);
    double *ref = host_ref((size_t)(n * rows));
    for (int64_t c = 0; c < n; c++)
        for (int64_t r = 0; r < rows; r++) {
            double s = 0.0;
            for (int64_t i = 0; i < k; i++)
                s += (double)deq[r * k + i] * (double)x[c * k + i];
            ref[c * rows + r] = s;
        }
    char what[96];
    snprintf(what, sizeof(what), "matmul %s rows %lld k %lld n %lld", mr_type_info(type)->name,
             (long long)rows, (long long)k, (long long)n);
    const size_t ny = (size_t)(n * rows);

    void *dw = ctu_put(gpu, wq, wbytes);
    float *dx = ctu_put(gpu, x, sizeof(float) * (size_t)(n * k)), *dy = ctu_poison(gpu, ny);
    assert_int_equal(gpu->ops->matmul(gpu, type, rows, k, dw, n, dx, dy), MOERUN_OK);
    float *yg = ctu_get(gpu, dy, ny);
    check_rel(what, yg, ref, ny, gpu_bound(type, n));

    void *cw = ctu_put(cpu, wq, wbytes);
    float *cx = ctu_put(cpu, x, sizeof(float) * (size_t)(n * k)), *cy = ctu_poison(cpu, ny);
    assert_int_equal(cpu->ops->matmul(cpu, type, rows, k, cw, n, cx, cy), MOERUN_OK);
    float *yc = ctu_get(cpu, cy, ny);
    if (type == MOERUN_TYPE_F32) { /* both exact F32 products: the golden cases' bound */
        double *cd = host_ref(ny);
        for (size_t i = 0; i < ny; i++)
            cd[i] = yc[i];
        check_rel(what, yg, cd, ny, 1e-5);
        free(cd);
    } else {
        check_vs_cpu(what, yg, yc, ref, ny, gpu_bound(type, n));
    }
    gpu->ops->free(gpu, dw), gpu->ops->free(gpu, dx), gpu->ops->free(gpu, dy);
    cpu->ops->free(cpu, cw), cpu->ops->free(cpu, cx), cpu->ops->free(cpu, cy);
    free(yg), free(yc), free(wq), free(deq), free(x), free(ref);
}

static void test_matmul_every_type(void **state) {
    (void)state;
    /* rows not multiples of 8 or 32; k of one K-block, a few, past the 1024- and 4096-element
     * tiles; n = 1 (matvec), 3 (fused), 37 (cuBLAS, chunked: the workspace holds 100000 W
     * elements) */
    static const int64_t shapes[][2] = {{67, 256}, {129, 1280}, {300, 4096}};
    static const int64_t ns[] = {1, 3, 37};
    for (size_t t = 0; t < MR_ARRAY_LEN(ctu_all_types); t++)
        for (size_t s = 0; s < MR_ARRAY_LEN(shapes); s++)
            for (size_t i = 0; i < MR_ARRAY_LEN(ns); i++)
                matmul_case(ctu_all_types[t], shapes[s][0], shapes[s][1], ns[i]);
}

static void test_matmul_thresholds(void **state) {
    (void)state;
    /* both sides of the fused / cuBLAS switch, every fused kernel width (1, 2, 4, 8 columns),
     * passes of 8 columns, float types with k not a multiple of the vector width */
    static const int64_t ns[] = {2, 4, 5, 8, 9, 16, 64};
    for (size_t i = 0; i < MR_ARRAY_LEN(ns); i++) {
        matmul_case(MOERUN_TYPE_Q4_K, 45, 512, ns[i]);
        matmul_case(MOERUN_TYPE_Q6_K, 45, 512, ns[i]);
        matmul_case(MOERUN_TYPE_F32, 45, 260, ns[i]);
        matmul_case(MOERUN_TYPE_Q8_0, 45, 512, ns[i]);
    }
    matmul_case(MOERUN_TYPE_F32, 13, 261, 3);
    matmul_case(MOERUN_TYPE_F16, 13, 262, 5);
    matmul_case(MOERUN_TYPE_BF16, 13, 1001, 3);
    matmul_case(MOERUN_TYPE_Q8_0, 1, 32, 1);
}

/* --- layer parts --------------------------------------------------------------------------- */

static void test_rmsnorm(void **state) {
    (void)state;
    static const int64_t shapes[][2] = {{5, 2051}, {24, 128}, {1, 7}};
    for (size_t c = 0; c < MR_ARRAY_LEN(shapes); c++) {
        const int64_t rows = shapes[c][0], n = shapes[c][1];
        const size_t nx = (size_t)(rows * n);
        const float eps = 1e-6f;
        float *x = ctu_host_normal(nx, 2.0f), *w = ctu_host_normal((size_t)n, 1.0f);
        double *ref = host_ref(nx);
        for (int64_t r = 0; r < rows; r++) {
            double ss = 0.0;
            for (int64_t i = 0; i < n; i++)
                ss += (double)x[r * n + i] * x[r * n + i];
            const double scale = 1.0 / sqrt(ss / (double)n + eps);
            for (int64_t i = 0; i < n; i++)
                ref[r * n + i] = x[r * n + i] * scale * w[i];
        }
        float *dx = ctu_put(gpu, x, nx * 4), *dw = ctu_put(gpu, w, (size_t)n * 4),
              *dout = ctu_poison(gpu, nx);
        assert_int_equal(gpu->ops->rmsnorm(gpu, dout, dx, dw, rows, n, eps), MOERUN_OK);
        float *y = ctu_get(gpu, dout, nx);
        check_rel("rmsnorm", y, ref, nx, TOL_OPS);
        assert_int_equal(gpu->ops->rmsnorm(gpu, dx, dx, dw, rows, n, eps),
                         MOERUN_OK); /* in place */
        float *y2 = ctu_get(gpu, dx, nx);
        check_rel("rmsnorm in place", y2, ref, nx, TOL_OPS);
        float *cx = ctu_put(cpu, x, nx * 4), *cw = ctu_put(cpu, w, (size_t)n * 4);
        assert_int_equal(cpu->ops->rmsnorm(cpu, cx, cx, cw, rows, n, eps), MOERUN_OK);
        check_vs_cpu("rmsnorm", y, cx, ref, nx, TOL_OPS);
        gpu->ops->free(gpu, dx), gpu->ops->free(gpu, dw), gpu->ops->free(gpu, dout);
        cpu->ops->free(cpu, cx), cpu->ops->free(cpu, cw);
        free(x), free(w), free(ref), free(y), free(y2);
    }
}

static void test_rope(void **state) {
    (void)state;
    const int64_t n_tok = 5, pos0 = 37;
    const int n_head = 3, hd = 80, n_rot = 64;
    const float base = 1e6f;
    const size_t n = (size_t)(n_tok * n_head * hd);
    for (int mode = MR_ROPE_MODE_NORM; mode <= MR_ROPE_MODE_NEOX; mode++) {
        float *x = ctu_host_normal(n, 1.0f);
        double *ref = host_ref(n);
        for (size_t i = 0; i < n; i++)
            ref[i] = x[i];
        for (int64_t t = 0; t < n_tok; t++)
            for (int h = 0; h < n_head; h++) {
                double *v = ref + (size_t)(t * n_head + h) * hd;
                for (int i = 0; i < n_rot / 2; i++) {
                    const double th = (double)(pos0 + t) * pow(base, -2.0 * i / n_rot);
                    const int a = mode == MR_ROPE_MODE_NEOX ? i : 2 * i;
                    const int b = mode == MR_ROPE_MODE_NEOX ? i + n_rot / 2 : 2 * i + 1;
                    const double x0 = v[a], x1 = v[b];
                    v[a] = x0 * cos(th) - x1 * sin(th);
                    v[b] = x0 * sin(th) + x1 * cos(th);
                }
            }
        float *dx = ctu_put(gpu, x, n * 4);
        assert_int_equal(gpu->ops->rope(gpu, dx, n_tok, n_head, hd, n_rot, pos0, base, mode),
                         MOERUN_OK);
        float *y = ctu_get(gpu, dx, n);
        check_rel(mode ? "rope neox" : "rope norm", y, ref, n, TOL_OPS);
        for (size_t i = 0; i < n; i++) /* dims past n_rot are left exactly as they were */
            if (i % (size_t)hd >= (size_t)n_rot)
                assert_true(y[i] == x[i]);
        float *cx = ctu_put(cpu, x, n * 4);
        assert_int_equal(cpu->ops->rope(cpu, cx, n_tok, n_head, hd, n_rot, pos0, base, mode),
                         MOERUN_OK);
        check_vs_cpu("rope", y, cx, ref, n, TOL_OPS);
        gpu->ops->free(gpu, dx), cpu->ops->free(cpu, cx);
        free(x), free(ref), free(y);
    }
}

/* float64 causal attention of n_tok queries at pos0 .. over the caches */
static void attention_ref(const float *q, const float *kc, const float *vc, int64_t n_tok,
                          int64_t pos0, int H, int Hkv, int hd, double *out) {
    const int64_t kvd = (int64_t)Hkv * hd;
    double *s = host_ref((size_t)(pos0 + n_tok));
    for (int64_t t = 0; t < n_tok; t++)
        for (int h = 0; h < H; h++) {
            const float *qh = q + (t * H + h) * hd;
            const int kvh = h / (H / Hkv);
            const int64_t n_keys = pos0 + t + 1;
            double mx = -INFINITY, sum = 0.0;
            for (int64_t p = 0; p < n_keys; p++) {
                double d = 0.0;
                for (int i = 0; i < hd; i++)
                    d += (double)qh[i] * kc[p * kvd + kvh * hd + i];
                s[p] = d / sqrt((double)hd);
                mx = fmax(mx, s[p]);
            }
            for (int64_t p = 0; p < n_keys; p++)
                sum += s[p] = exp(s[p] - mx);
            for (int i = 0; i < hd; i++) {
                double o = 0.0;
                for (int64_t p = 0; p < n_keys; p++)
                    o += s[p] / sum * vc[p * kvd + kvh * hd + i];
                out[(t * H + h) * hd + i] = o;
            }
        }
    free(s);
}

static void test_attention(void **state) {
    (void)state;
    static const int cases[][5] = {/* n_head, n_head_kv, hd, n_tok, pos0 */
                                   {8, 2, 128, 1, 256}, {6, 6, 72, 1, 0},   {4, 1, 256, 1, 39},
                                   {6, 2, 64, 17, 0},   {4, 4, 80, 40, 45}, {8, 1, 256, 3, 100},
                                   {2, 2, 128, 2, 0}};
    for (size_t c = 0; c < MR_ARRAY_LEN(cases); c++) {
        const int H = cases[c][0], Hkv = cases[c][1], hd = cases[c][2];
        const int64_t n_tok = cases[c][3], pos0 = cases[c][4];
        const int64_t kvd = (int64_t)Hkv * hd, filled = pos0 + n_tok;
        const size_t nq = (size_t)(n_tok * H * hd), nc = (size_t)(CTU_N_CTX * kvd);
        float *q = ctu_host_normal(nq, 1.5f), *kc = ctu_host_normal(nc, 1.5f),
              *vc = ctu_host_normal(nc, 1.5f);
        for (size_t i = (size_t)(filled * kvd); i < nc; i++) /* never read past the filled rows */
            kc[i] = vc[i] = NAN;
        double *ref = host_ref(nq);
        attention_ref(q, kc, vc, n_tok, pos0, H, Hkv, hd, ref);
        float *dq = ctu_put(gpu, q, nq * 4), *dk = ctu_put(gpu, kc, nc * 4),
              *dv = ctu_put(gpu, vc, nc * 4);
        float *dout = ctu_poison(gpu, nq);
        assert_int_equal(gpu->ops->attention(gpu, dq, dk, dv, dout, n_tok, pos0, H, Hkv, hd),
                         MOERUN_OK);
        float *y = ctu_get(gpu, dout, nq);
        char what[80];
        snprintf(what, sizeof(what), "attention %d/%d heads hd %d, %lld tokens at %lld", H, Hkv, hd,
                 (long long)n_tok, (long long)pos0);
        check_rel(what, y, ref, nq, TOL_OPS);
        float *cq = ctu_put(cpu, q, nq * 4), *ck = ctu_put(cpu, kc, nc * 4),
              *cv = ctu_put(cpu, vc, nc * 4);
        float *cout = ctu_poison(cpu, nq);
        assert_int_equal(cpu->ops->attention(cpu, cq, ck, cv, cout, n_tok, pos0, H, Hkv, hd),
                         MOERUN_OK);
        check_vs_cpu(what, y, cout, ref, nq, TOL_OPS);
        gpu->ops->free(gpu, dq), gpu->ops->free(gpu, dk), gpu->ops->free(gpu, dv);
        gpu->ops->free(gpu, dout);
        cpu->ops->free(cpu, cq), cpu->ops->free(cpu, ck), cpu->ops->free(cpu, cv);
        cpu->ops->free(cpu, cout);
        free(q), free(kc), free(vc), free(ref), free(y);
    }
}

static void topk_case(int64_t n_tok, int E, int k, bool renorm, bool in_place) {
    const size_t np = (size_t)(n_tok * E), ns = (size_t)(n_tok * (k ? k : 1));
    float *lg = ctu_host_normal(np, 3.0f);
    double *pref = host_ref(np);
    for (int64_t t = 0; t < n_tok; t++) {
        double mx = -INFINITY, sum = 0.0;
        for (int e = 0; e < E; e++)
            mx = fmax(mx, lg[t * E + e]);
        for (int e = 0; e < E; e++)
            sum += pref[t * E + e] = exp(lg[t * E + e] - mx);
        for (int e = 0; e < E; e++)
            pref[t * E + e] /= sum;
    }
    struct mr_backend *bes[2] = {gpu, cpu};
    float *probs[2], *sw[2];
    int32_t *sel[2];
    for (int b = 0; b < 2; b++) {
        struct mr_backend *be = bes[b];
        float *dl = ctu_put(be, lg, np * 4), *dp = in_place ? dl : ctu_poison(be, np);
        float *dw = ctu_poison(be, ns);
        int32_t *ds = (int32_t *)ctu_poison(be, ns);
        assert_int_equal(be->ops->softmax_topk(be, dl, n_tok, E, k, renorm, dp, ds, dw), MOERUN_OK);
        probs[b] = ctu_get(be, dp, np);
        sel[b] = malloc(ns * sizeof(int32_t));
        sw[b] = malloc(ns * sizeof(float));
        assert_true(sel[b] && sw[b]);
        if (k > 0) {
            free(sw[b]);
            sw[b] = ctu_get(be, dw, ns);
            assert_int_equal(be->ops->download(be, sel[b], ds, ns * 4), MOERUN_OK);
        }
        be->ops->free(be, dl), be->ops->free(be, dw), be->ops->free(be, ds);
        if (!in_place)
            be->ops->free(be, dp);
    }
    check_rel("router probabilities", probs[0], pref, np, TOL_OPS);
    check_vs_cpu("router probabilities", probs[0], probs[1], pref, np, TOL_OPS);
    for (int64_t t = 0; t < n_tok; t++) {
        const double *p = pref + t * E;
        double picked = 0.0;
        for (int j = 0; j < k; j++)
            picked += p[sel[0][t * k + j]];
        for (int j = 0; j < k; j++) {
            const int32_t s = sel[0][t * k + j];
            assert_true(s >= 0 && s < E);
            /* the CPU's pick, or one of equal probability (a near-tie the two backends'
             * roundings may order differently) */
            const int32_t sc = sel[1][t * k + j];
            if (sc != s && !(fabs(p[sc] - p[s]) <= 1e-6 * p[s]))
                fail_msg("topk token %lld pick %d: GPU %d (p %g), CPU %d (p %g)", (long long)t, j,
                         s, p[s], sc, p[sc]);
            for (int e = 0; e < E; e++) /* descending; nothing unpicked above a pick */
                if (p[e] > p[s] * (1.0 + 1e-6)) {
                    bool taken = false;
                    for (int i = 0; i < j; i++)
                        taken |= sel[0][t * k + i] == e;
                    if (!taken)
                        fail_msg("topk token %lld pick %d: expert %d (p %g) above it", (long long)t,
                                 j, e, p[e]);
                }
            const double want = p[s] / (renorm ? picked : 1.0);
            if (!(fabs(sw[0][t * k + j] - want) <= 1e-5 * want + 1e-9))
                fail_msg("topk token %lld pick %d: weight %g, want %g", (long long)t, j,
                         (double)sw[0][t * k + j], want);
        }
    }
    for (int b = 0; b < 2; b++)
        free(probs[b]), free(sel[b]), free(sw[b]);
    free(lg), free(pref);
}

/* Exact ties (logits of 4 values: equal logits, bit-equal probabilities on each backend): the
 * contract's tie rule, lowest index first, fixes the picks, so GPU and CPU must agree exactly. */
static void topk_ties_case(int64_t n_tok, int E, int k) {
    const size_t np = (size_t)(n_tok * E), ns = (size_t)(n_tok * k);
    float *lg = malloc(np * sizeof(float));
    assert_non_null(lg);
    for (size_t i = 0; i < np; i++)
        lg[i] = (float)(tu_rng_u64(&ctu_rng) % 4);
    struct mr_backend *bes[2] = {gpu, cpu};
    int32_t *sel[2];
    for (int b = 0; b < 2; b++) {
        struct mr_backend *be = bes[b];
        float *dl = ctu_put(be, lg, np * 4), *dw = ctu_poison(be, ns);
        int32_t *ds = (int32_t *)ctu_poison(be, ns);
        assert_int_equal(be->ops->softmax_topk(be, dl, n_tok, E, k, true, dl, ds, dw), MOERUN_OK);
        sel[b] = malloc(ns * sizeof(int32_t));
        assert_non_null(sel[b]);
        assert_int_equal(be->ops->download(be, sel[b], ds, ns * 4), MOERUN_OK);
        be->ops->free(be, dl), be->ops->free(be, dw), be->ops->free(be, ds);
    }
    for (size_t i = 0; i < ns; i++) {
        assert_true(sel[0][i] >= 0 && sel[0][i] < E && sel[1][i] >= 0 && sel[1][i] < E);
        const float *l = lg + i / (size_t)k * (size_t)E;
        if (sel[0][i] != sel[1][i])
            fail_msg("topk ties token %zu pick %zu: GPU %d (logit %g), CPU %d (logit %g)",
                     i / (size_t)k, i % (size_t)k, sel[0][i], (double)l[sel[0][i]], sel[1][i],
                     (double)l[sel[1][i]]);
    }
    free(sel[0]), free(sel[1]), free(lg);
}

static void test_softmax_topk(void **state) {
    (void)state;
    topk_ties_case(11, 60, 8);
    topk_ties_case(3, 256, 32);
    topk_case(13, 60, 4, false, false);
    topk_case(13, 60, 4, true, true);
    topk_case(3, 256, 8, true, false);
    topk_case(17, 128, 8, false, true);
    topk_case(5, 33, 1, false, false);
    topk_case(2, 64, 32, true, false); /* the widest k */
    topk_case(9, 128, 0, false, true); /* softmax only, in place */
    topk_case(4, 7, 0, false, false);
}

/* --- elementwise and the MoE plumbing ------------------------------------------------------ */

static void test_swiglu_add(void **state) {
    (void)state;
    const size_t n = 100003;
    float *g = ctu_host_normal(n, 3.0f), *u = ctu_host_normal(n, 1.0f);
    double *ref = host_ref(n);
    for (size_t i = 0; i < n; i++)
        ref[i] = (double)g[i] / (1.0 + exp(-(double)g[i])) * u[i];
    float *dg = ctu_put(gpu, g, n * 4), *du = ctu_put(gpu, u, n * 4), *dout = ctu_poison(gpu, n);
    assert_int_equal(gpu->ops->swiglu(gpu, dout, dg, du, (int64_t)n), MOERUN_OK);
    float *y = ctu_get(gpu, dout, n);
    check_rel("swiglu", y, ref, n, TOL_OPS);
    float *cg = ctu_put(cpu, g, n * 4), *cu = ctu_put(cpu, u, n * 4);
    assert_int_equal(cpu->ops->swiglu(cpu, cg, cg, cu, (int64_t)n), MOERUN_OK); /* out = g */
    check_vs_cpu("swiglu", y, cg, ref, n, TOL_OPS);
    free(y);
    for (size_t i = 0; i < n; i++)
        ref[i] = (double)u[i] + (double)g[i];
    assert_int_equal(gpu->ops->add(gpu, du, dg, (int64_t)n), MOERUN_OK);
    y = ctu_get(gpu, du, n);
    check_rel("add", y, ref, n, TOL_EXACT);
    for (size_t i = 0; i < n; i++)
        assert_true(y[i] == u[i] + g[i]);
    gpu->ops->free(gpu, dg), gpu->ops->free(gpu, du), gpu->ops->free(gpu, dout);
    cpu->ops->free(cpu, cg), cpu->ops->free(cpu, cu);
    free(g), free(u), free(ref), free(y);
}

/* one plumbing op on both backends, compared with ref (float64) and with each other */
enum plumb { P_ADD_ROWS, P_GATHER, P_SCATTER, P_SUM_SLOTS, P_ADD_GATED };

static void plumb_case(enum plumb op, int64_t n_tok, int k, int64_t d) {
    const int64_t rows = n_tok * k; /* slots: [n_tok][k][d] */
    const size_t ns = (size_t)(rows * d), ny = (size_t)(n_tok * d);
    float *src = ctu_host_normal(ns, 1.0f), *y0 = ctu_host_normal(ns, 1.0f);
    float *g = ctu_host_normal((size_t)rows, 2.0f), *bias = ctu_host_normal((size_t)d, 1.0f);
    int32_t *idx = malloc(sizeof(int32_t) * (size_t)rows);
    assert_non_null(idx);
    for (int64_t i = 0; i < rows; i++) /* a random permutation: distinct rows */
        idx[i] = (int32_t)i;
    for (int64_t i = rows - 1; i > 0; i--) {
        const int64_t j = (int64_t)(tu_rng_u64(&ctu_rng) % (uint64_t)(i + 1));
        const int32_t t = idx[i];
        idx[i] = idx[j], idx[j] = t;
    }
    size_t nout = ns;
    double *ref = host_ref(ns);
    const char *name = "";
    switch (op) {
    case P_ADD_ROWS: /* y0 [rows][d] += bias */
        name = "add_rows";
        for (size_t i = 0; i < ns; i++)
            ref[i] = (double)(y0[i] + bias[i % (size_t)d]);
        break;
    case P_GATHER: /* out[i] = src[idx[i]] */
        name = "gather_rows";
        for (int64_t i = 0; i < rows; i++)
            for (int64_t c = 0; c < d; c++)
                ref[i * d + c] = src[idx[i] * d + c];
        break;
    case P_SCATTER: /* out[idx[i]] = src[i] * g[idx[i]] */
        name = "scatter_scaled";
        for (int64_t i = 0; i < rows; i++)
            for (int64_t c = 0; c < d; c++)
                ref[idx[i] * d + c] = (double)src[i * d + c] * g[idx[i]];
        break;
    case P_SUM_SLOTS: /* out[t] = sum_j src[t][j] */
        name = "sum_slots";
        nout = ny;
        for (int64_t t = 0; t < n_tok; t++)
            for (int64_t c = 0; c < d; c++) {
                double s = 0.0;
                for (int j = 0; j < k; j++)
                    s += src[(t * k + j) * d + c];
                ref[t * d + c] = s;
            }
        break;
    case P_ADD_GATED: /* y0[t] += src[t] * sigmoid(g[t]) for n_tok rows */
        name = "add_gated";
        nout = ny;
        for (int64_t t = 0; t < n_tok; t++)
            for (int64_t c = 0; c < d; c++)
                ref[t * d + c] =
                    y0[t * d + c] + (double)src[t * d + c] / (1.0 + exp(-(double)g[t]));
        break;
    }
    struct mr_backend *bes[2] = {gpu, cpu};
    float *out[2];
    for (int b = 0; b < 2; b++) {
        struct mr_backend *be = bes[b];
        float *ds = ctu_put(be, src, ns * 4), *dg = ctu_put(be, g, (size_t)rows * 4);
        float *db = ctu_put(be, bias, (size_t)d * 4);
        int32_t *di = ctu_put(be, idx, (size_t)rows * 4);
        float *dy =
            op == P_ADD_ROWS || op == P_ADD_GATED ? ctu_put(be, y0, ns * 4) : ctu_poison(be, ns);
        int rc = MOERUN_ERR_INTERNAL;
        switch (op) {
        case P_ADD_ROWS:
            rc = be->ops->add_rows(be, dy, db, rows, d);
            break;
        case P_GATHER:
            rc = be->ops->gather_rows(be, dy, ds, di, rows, d);
            break;
        case P_SCATTER:
            rc = be->ops->scatter_scaled(be, dy, ds, di, dg, rows, d);
            break;
        case P_SUM_SLOTS:
            rc = be->ops->sum_slots(be, dy, ds, n_tok, k, d);
            break;
        case P_ADD_GATED:
            rc = be->ops->add_gated(be, dy, ds, dg, n_tok, d);
            break;
        }
        assert_int_equal(rc, MOERUN_OK);
        out[b] = ctu_get(be, dy, nout);
        be->ops->free(be, ds), be->ops->free(be, dg), be->ops->free(be, db);
        be->ops->free(be, di), be->ops->free(be, dy);
    }
    char what[80];
    snprintf(what, sizeof(what), "%s: %lld tokens x %d slots of %lld", name, (long long)n_tok, k,
             (long long)d);
    if (op == P_ADD_GATED) { /* expf may differ by an ulp between the two */
        check_rel(what, out[0], ref, nout, TOL_OPS);
        check_vs_cpu(what, out[0], out[1], ref, nout, TOL_OPS);
    } else {
        check_rel(what, out[0], ref, nout, op == P_SUM_SLOTS ? 1e-6 : TOL_EXACT);
        check_identical(what, out[0], out[1], nout);
    }
    free(out[0]), free(out[1]);
    free(src), free(y0), free(g), free(bias), free(idx), free(ref);
}

static void test_plumbing(void **state) {
    (void)state;
    for (int op = P_ADD_ROWS; op <= P_ADD_GATED; op++) {
        plumb_case((enum plumb)op, 7, 8, 2048);
        plumb_case((enum plumb)op, 1, 1, 5);
        plumb_case((enum plumb)op, 33, 4, 1000);
    }
    /* n == 0 does nothing, pointers unused */
    assert_int_equal(gpu->ops->add_rows(gpu, NULL, NULL, 0, 16), MOERUN_OK);
    assert_int_equal(gpu->ops->gather_rows(gpu, NULL, NULL, NULL, 0, 16), MOERUN_OK);
    assert_int_equal(gpu->ops->scatter_scaled(gpu, NULL, NULL, NULL, NULL, 0, 16), MOERUN_OK);
    assert_int_equal(gpu->ops->sum_slots(gpu, NULL, NULL, 0, 8, 16), MOERUN_OK);
    assert_int_equal(gpu->ops->add_gated(gpu, NULL, NULL, NULL, 0, 16), MOERUN_OK);
    assert_int_equal(gpu->ops->add(gpu, NULL, NULL, 0), MOERUN_OK);
    assert_int_equal(gpu->ops->swiglu(gpu, NULL, NULL, NULL, 0), MOERUN_OK);
    assert_int_equal(gpu->ops->matmul(gpu, MOERUN_TYPE_Q4_K, 16, 256, NULL, 0, NULL, NULL),
                     MOERUN_OK);
    assert_int_equal(gpu->ops->attention(gpu, NULL, NULL, NULL, NULL, 0, 0, 4, 4, 64), MOERUN_OK);
    assert_int_equal(gpu->ops->sync(gpu, MR_STREAM_COMPUTE), MOERUN_OK);
}

int main(void) {
    if (!ctu_device_present())
        return TU_SKIP;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul_every_type), cmocka_unit_test(test_matmul_thresholds),
        cmocka_unit_test(test_rmsnorm),           cmocka_unit_test(test_rope),
        cmocka_unit_test(test_attention),         cmocka_unit_test(test_softmax_topk),
        cmocka_unit_test(test_swiglu_add),        cmocka_unit_test(test_plumbing),
    };
    return cmocka_run_group_tests(tests, group_setup, ctu_teardown);
}
