/* CPU products and thread pool: every supported weight type on every instruction set this CPU
 * runs, against float64 references on fresh random data; matmul against matvec bit for bit
 * with 1, 2 and 3 threads; SIMD against scalar; bad arguments; the pool's job accounting. */
#include "testutil.h"

#include "cpu/matmul.h"
#include "internal.h"
#include "types.h"

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Relative L2 tolerances. tol_orig: against the dequantized weights times the original
 * float32 x, so it covers the rounding of x to the companion type. Measured with 37 rows over
 * 150 seeds (mean / worst): F32 4e-8 / 6e-8, F16 2e-4 / 4.4e-4, BF16 1.6e-3 / 3.3e-3,
 * Q8_0 and Q4_0 (x as Q8_0) 5.5e-3 / 1.15e-2, K-quants (x as Q8_K) 7.2e-3 / 1.6e-2; set at
 * about twice the worst. tol_same applies to a reference that rounds x the same way (measured
 * below 2e-7). */
struct mm_type_case {
    int type;
    double tol_orig;
};

static const struct mm_type_case type_cases[] = {
    {MOERUN_TYPE_F32, 1e-6},    {MOERUN_TYPE_F16, 1e-3},    {MOERUN_TYPE_BF16, 1e-2},
    {MOERUN_TYPE_Q8_0, 2.5e-2}, {MOERUN_TYPE_Q4_0, 2.5e-2}, {MOERUN_TYPE_Q4_K, 3e-2},
    {MOERUN_TYPE_Q5_K, 3e-2},   {MOERUN_TYPE_Q6_K, 3e-2},
};

#define TOL_SAME 1e-5 /* against the same activation rounding; SIMD against scalar */

static struct cpu_pool *pools[4]; /* pools[t]: t threads (pools[1] is NULL = caller only) */
static struct tu_rng rng;

static int group_setup(void **state) {
    (void)state;
    tu_rng_init(&rng, tu_seed());
    pools[1] = NULL;
    if (cpu_pool_create(2, &pools[2]) != MOERUN_OK || cpu_pool_create(3, &pools[3]) != MOERUN_OK)
        return -1;
    return 0;
}

static int group_teardown(void **state) {
    (void)state;
    cpu_pool_destroy(pools[2]);
    cpu_pool_destroy(pools[3]);
    return 0;
}

/* Random weights of a type: normal floats quantized by the scalar reference, and their
 * dequantized values (what the reference dots with). */
struct mm_weights {
    int type;
    int64_t rows, k;
    size_t row_bytes;
    uint8_t *q; /* [rows][row_bytes] */
    float *deq; /* [rows][k] */
};

static void weights_make(struct mm_weights *wt, int type, int64_t rows, int64_t k) {
    uint64_t row_bytes;
    assert_true(mr_type_nbytes(type, (uint64_t)k, &row_bytes));
    wt->type = type;
    wt->rows = rows;
    wt->k = k;
    wt->row_bytes = row_bytes;
    wt->q = malloc(row_bytes * (size_t)rows + 1);
    wt->deq = malloc(sizeof(float) * (size_t)(rows * k) + 1);
    float *f = malloc(sizeof(float) * (size_t)k);
    assert_non_null(wt->q);
    assert_non_null(wt->deq);
    assert_non_null(f);
    for (int64_t r = 0; r < rows; r++) {
        /* rows of different magnitude, as real weights have */
        tu_fill_normal(&rng, f, (size_t)k, (float)(0.02 * (1.0 + 3.0 * tu_rng_uniform(&rng))));
        cpu_ref_from_float(type, f, wt->q + (size_t)r * row_bytes, k);
        cpu_ref_to_float(type, wt->q + (size_t)r * row_bytes, wt->deq + r * k, k);
    }
    free(f);
}

static void weights_free(struct mm_weights *wt) {
    free(wt->q);
    free(wt->deq);
}

/* x rounded to the companion type of weight type and back (scalar reference conversions). */
static void round_activations(int type, const float *x, float *xr, int64_t k) {
    const struct cpu_type_kernels *kw = cpu_kernels(CPU_ISA_SCALAR, type);
    assert_non_null(kw);
    size_t bytes = cpu_act_bytes(type, k, 1);
    assert_true(bytes > 0);
    uint8_t *tmp = malloc(bytes);
    assert_non_null(tmp);
    cpu_ref_from_float(kw->vec_dot_type, x, tmp, k);
    const struct cpu_type_kernels *ka = cpu_kernels(CPU_ISA_SCALAR, kw->vec_dot_type);
    if (ka && ka->to_float) {
        ka->to_float(tmp, xr, k);
    } else {
        /* Q8_K is activation-only and may have no to_float: value = d * q */
        assert_int_equal(kw->vec_dot_type, MOERUN_TYPE_Q8_K);
        const block_q8_K *b = (const block_q8_K *)tmp;
        for (int64_t i = 0; i < k; i++)
            xr[i] = b[i / QK_K].d * (float)b[i / QK_K].qs[i % QK_K];
    }
    free(tmp);
}

/* ref[c][r] = sum_j deq[r][j] * x[c][j] in float64; mag (may be NULL) the same sum of
 * |deq[r][j] * x[c][j]|, the scale of the float rounding a kernel may make on that output */
static void reference(const struct mm_weights *wt, int64_t n, const float *x, double *ref,
                      double *mag) {
    for (int64_t c = 0; c < n; c++) {
        for (int64_t r = 0; r < wt->rows; r++) {
            const float *wr = wt->deq + r * wt->k;
            const float *xc = x + c * wt->k;
            double s = 0, a = 0;
            for (int64_t j = 0; j < wt->k; j++) {
                s += (double)wr[j] * (double)xc[j];
                a += fabs((double)wr[j] * (double)xc[j]);
            }
            ref[c * wt->rows + r] = s;
            if (mag)
                mag[c * wt->rows + r] = a;
        }
    }
}

/* ||y - ref|| / ||mag||: relative L2 error that stays meaningful for a few outputs whose dot
 * products cancel (where ||ref|| alone can be tiny) */
static double rel_l2_cond(const float *y, const double *ref, const double *mag, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += ((double)y[i] - ref[i]) * ((double)y[i] - ref[i]);
        den += mag[i] * mag[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static int64_t type_blck(int type) {
    const struct cpu_type_kernels *kw = cpu_kernels(CPU_ISA_SCALAR, type);
    assert_non_null(kw);
    int64_t b = mr_type_info(type)->blck, a = mr_type_info(kw->vec_dot_type)->blck;
    return b > a ? b : a;
}

/* k of one block and of many blocks (odd counts where the block is a single element) */
static void k_choices(int type, int64_t ks[2]) {
    int64_t blck = type_blck(type);
    ks[0] = blck;
    ks[1] = blck == 1 ? 1003 : blck >= 256 ? 16 * blck : 37 * blck;
}

/* matvec of every ISA against the float64 references, and SIMD against scalar */
static void test_matvec_accuracy(void **state) {
    const struct mm_type_case *tc = *state;
    const int type = tc->type;
    int64_t ks[2];
    k_choices(type, ks);
    for (int ki = 0; ki < 2; ki++) {
        const int64_t k = ks[ki], rows = 37;
        struct mm_weights wt;
        weights_make(&wt, type, rows, k);
        float *x = malloc(sizeof(float) * (size_t)k);
        float *xr = malloc(sizeof(float) * (size_t)k);
        float *y = malloc(sizeof(float) * (size_t)rows);
        float *y_scalar = malloc(sizeof(float) * (size_t)rows);
        double *ref_orig = malloc(sizeof(double) * (size_t)rows);
        double *ref_same = malloc(sizeof(double) * (size_t)rows);
        double *yd = malloc(sizeof(double) * (size_t)rows);
        void *scratch = malloc(cpu_act_bytes(type, k, 1));
        assert_true(x && xr && y && y_scalar && ref_orig && ref_same && yd && scratch);
        tu_fill_normal(&rng, x, (size_t)k, 1.0f);
        round_activations(type, x, xr, k);
        reference(&wt, 1, x, ref_orig, NULL);
        reference(&wt, 1, xr, ref_same, NULL);

        assert_int_equal(
            cpu_matvec(NULL, CPU_ISA_SCALAR, type, rows, k, wt.q, x, y_scalar, scratch), MOERUN_OK);
        for (int isa = 0; isa < CPU_ISA_COUNT; isa++) {
            if (!cpu_isa_available((enum cpu_isa)isa))
                continue;
            for (int t = 1; t <= 3; t++) {
                memset(y, 0xff, sizeof(float) * (size_t)rows);
                assert_int_equal(
                    cpu_matvec(pools[t], (enum cpu_isa)isa, type, rows, k, wt.q, x, y, scratch),
                    MOERUN_OK);
                double e_orig = tu_rel_l2(y, ref_orig, (size_t)rows);
                double e_same = tu_rel_l2(y, ref_same, (size_t)rows);
                for (int64_t r = 0; r < rows; r++)
                    yd[r] = y_scalar[r];
                double e_scalar = tu_rel_l2(y, yd, (size_t)rows);
                if (e_orig > tc->tol_orig || e_same > TOL_SAME || e_scalar > TOL_SAME || t == 1)
                    print_message("matvec %-4s %-6s k=%-5lld t=%d: rel L2 %.2e (orig x, tol "
                                  "%.0e) %.2e (rounded x) %.2e (vs scalar)\n",
                                  mr_type_info(type)->name, cpu_isa_name((enum cpu_isa)isa),
                                  (long long)k, t, e_orig, tc->tol_orig, e_same, e_scalar);
                assert_true(e_orig <= tc->tol_orig);
                assert_true(e_same <= TOL_SAME);
                assert_true(e_scalar <= TOL_SAME);
            }
        }
        free(x);
        free(xr);
        free(y);
        free(y_scalar);
        free(ref_orig);
        free(ref_same);
        free(yd);
        free(scratch);
        weights_free(&wt);
    }
}

/* matmul: each column bit-equal to the matvec of that input, for 1, 2, 3 threads; odd shapes */
static void test_matmul_columns(void **state) {
    const struct mm_type_case *tc = *state;
    const int type = tc->type;
    static const int64_t row_choices[] = {1, 5, 37, 70};
    static const int64_t n_choices[] = {1, 3, 17};
    int64_t ks[2];
    k_choices(type, ks);
    for (int ki = 0; ki < 2; ki++) {
        const int64_t k = ks[ki];
        for (size_t ri = 0; ri < MR_ARRAY_LEN(row_choices); ri++) {
            const int64_t rows = row_choices[ri];
            struct mm_weights wt;
            weights_make(&wt, type, rows, k);
            const int64_t n_max = 17;
            float *x = malloc(sizeof(float) * (size_t)(n_max * k));
            float *xr = malloc(sizeof(float) * (size_t)(n_max * k));
            float *y = malloc(sizeof(float) * (size_t)(n_max * rows));
            float *y1 = malloc(sizeof(float) * (size_t)(n_max * rows));
            float *yv = malloc(sizeof(float) * (size_t)rows);
            double *ref = malloc(sizeof(double) * (size_t)(n_max * rows));
            double *mag = malloc(sizeof(double) * (size_t)(n_max * rows));
            void *scratch = malloc(cpu_act_bytes(type, k, n_max));
            assert_true(x && xr && y && y1 && yv && ref && mag && scratch);
            tu_fill_normal(&rng, x, (size_t)(n_max * k), 1.0f);
            for (int64_t c = 0; c < n_max; c++)
                round_activations(type, x + c * k, xr + c * k, k);
            reference(&wt, n_max, xr, ref, mag);
            for (int isa = 0; isa < CPU_ISA_COUNT; isa++) {
                if (!cpu_isa_available((enum cpu_isa)isa))
                    continue;
                for (size_t ni = 0; ni < MR_ARRAY_LEN(n_choices); ni++) {
                    const int64_t n = n_choices[ni];
                    for (int t = 1; t <= 3; t++) {
                        float *out = t == 1 ? y1 : y;
                        memset(out, 0xff, sizeof(float) * (size_t)(n * rows));
                        assert_int_equal(cpu_matmul(pools[t], (enum cpu_isa)isa, type, rows, k,
                                                    wt.q, n, x, out, scratch),
                                         MOERUN_OK);
                        if (t > 1) {
                            assert_memory_equal(y, y1, sizeof(float) * (size_t)(n * rows));
                            continue;
                        }
                        double e = rel_l2_cond(y1, ref, mag, (size_t)(n * rows));
                        if (e > TOL_SAME)
                            print_message("matmul %s %s rows=%lld k=%lld n=%lld: rel L2 %.2e\n",
                                          mr_type_info(type)->name, cpu_isa_name((enum cpu_isa)isa),
                                          (long long)rows, (long long)k, (long long)n, e);
                        assert_true(e <= TOL_SAME);
                        for (int64_t c = 0; c < n; c++) {
                            assert_int_equal(cpu_matvec(pools[1 + (int)(c % 3)], (enum cpu_isa)isa,
                                                        type, rows, k, wt.q, x + c * k, yv,
                                                        scratch),
                                             MOERUN_OK);
                            assert_memory_equal(yv, y1 + c * rows, sizeof(float) * (size_t)rows);
                        }
                    }
                }
            }
            free(x);
            free(xr);
            free(y);
            free(y1);
            free(yv);
            free(ref);
            free(mag);
            free(scratch);
            weights_free(&wt);
        }
    }
}

static void test_bad_args(void **state) {
    (void)state;
    const int64_t k = 256, rows = 4, n = 2;
    uint8_t w[4 * 144];
    float x[2 * 256], y[2 * 4];
    uint8_t scratch[2 * 292];
    memset(w, 0, sizeof(w));
    memset(x, 0, sizeof(x));
    const int t = MOERUN_TYPE_Q4_K;
    assert_true(cpu_act_bytes(t, k, n) == sizeof(scratch));
    assert_true(cpu_act_bytes(MOERUN_TYPE_F32, 10, 3) == 120);
    assert_true(cpu_act_bytes(3 /* Q4_1 */, 32, 1) == 0);
    assert_true(cpu_act_bytes(-1, 32, 1) == 0);
    assert_true(cpu_act_bytes(999, 32, 1) == 0);

    /* sanity: the valid call works */
    assert_int_equal(cpu_matvec(NULL, CPU_ISA_SCALAR, t, rows, k, w, x, y, scratch), MOERUN_OK);
    assert_int_equal(cpu_matmul(NULL, CPU_ISA_SCALAR, t, rows, k, w, n, x, y, scratch), MOERUN_OK);

    struct {
        int expect;
        int isa, type;
        int64_t rows, k, n;
        const void *w;
        const float *x;
        float *y;
        void *scratch;
    } bad[] = {
        {MOERUN_ERR_INVALID_ARG, 0, t, rows, k, n, NULL, x, y, scratch},
        {MOERUN_ERR_INVALID_ARG, 0, t, rows, k, n, w, NULL, y, scratch},
        {MOERUN_ERR_INVALID_ARG, 0, t, rows, k, n, w, x, NULL, scratch},
        {MOERUN_ERR_INVALID_ARG, 0, t, rows, k, n, w, x, y, NULL},
        {MOERUN_ERR_INVALID_ARG, 0, t, rows, 100, n, w, x, y, scratch},
        {MOERUN_ERR_INVALID_ARG, 0, MOERUN_TYPE_Q4_0, rows, 48, n, w, x, y, scratch},
        {MOERUN_ERR_INVALID_ARG, 0, t, rows, 0, n, w, x, y, scratch},
        {MOERUN_ERR_INVALID_ARG, 0, t, -1, k, n, w, x, y, scratch},
        {MOERUN_ERR_INVALID_ARG, 0, t, rows, k, -1, w, x, y, scratch},
        {MOERUN_ERR_INVALID_ARG, 0, t, INT64_MAX / 2, k, n, w, x, y, scratch},
        {MOERUN_ERR_INVALID_ARG, CPU_ISA_COUNT, t, rows, k, n, w, x, y, scratch},
        {MOERUN_ERR_INVALID_ARG, -1, t, rows, k, n, w, x, y, scratch},
        {MOERUN_ERR_UNSUPPORTED, 0, 3 /* Q4_1 */, rows, k, n, w, x, y, scratch},
        {MOERUN_ERR_UNSUPPORTED, 0, MOERUN_TYPE_Q8_K, rows, k, n, w, x, y, scratch},
        {MOERUN_ERR_UNSUPPORTED, 0, 999, rows, k, n, w, x, y, scratch},
        {MOERUN_ERR_UNSUPPORTED, 0, -7, rows, k, n, w, x, y, scratch},
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(bad); i++) {
        mr_err_clear();
        int rc = cpu_matmul(NULL, (enum cpu_isa)bad[i].isa, bad[i].type, bad[i].rows, bad[i].k,
                            bad[i].w, bad[i].n, bad[i].x, bad[i].y, bad[i].scratch);
        if (rc != bad[i].expect)
            print_message("bad case %zu: matmul returned %d, expected %d\n", i, rc, bad[i].expect);
        assert_int_equal(rc, bad[i].expect);
        assert_true(strlen(moerun_errmsg()) > 0);
        if (bad[i].n != 2)
            continue;
        mr_err_clear();
        rc = cpu_matvec(NULL, (enum cpu_isa)bad[i].isa, bad[i].type, bad[i].rows, bad[i].k,
                        bad[i].w, bad[i].x, bad[i].y, bad[i].scratch);
        assert_int_equal(rc, bad[i].expect);
        assert_true(strlen(moerun_errmsg()) > 0);
    }
    /* F32 reads x directly: no scratch needed */
    float wf[4 * 8] = {0}, xf[8] = {0}, yf[4];
    assert_int_equal(cpu_matvec(NULL, CPU_ISA_SCALAR, MOERUN_TYPE_F32, 4, 8, wf, xf, yf, NULL),
                     MOERUN_OK);
    /* an instruction set this CPU lacks is refused, not executed */
    for (int isa = 0; isa < CPU_ISA_COUNT; isa++) {
        if (!cpu_isa_available((enum cpu_isa)isa))
            assert_int_equal(cpu_matvec(NULL, (enum cpu_isa)isa, t, rows, k, w, x, y, scratch),
                             MOERUN_ERR_UNSUPPORTED);
    }
    struct cpu_pool *p = (struct cpu_pool *)1;
    assert_int_equal(cpu_pool_create(1 << 20, &p), MOERUN_ERR_INVALID_ARG);
    assert_int_equal(cpu_pool_create(2, NULL), MOERUN_ERR_INVALID_ARG);
    cpu_pool_destroy(NULL);
}

/* ----- thread pool ----- */

#define POOL_JOBS 10000

struct count_arg {
    int nth;
    atomic_int bad_any; /* any worker saw a wrong ith/nth */
    long counts[64];    /* counts[ith]: jobs run by worker ith (plain: one writer each) */
    long job_sum[64];   /* sum of the job numbers each worker saw */
    long job;           /* the current job number (written by the caller between runs) */
};

static void count_task(void *p, int ith, int nth) {
    struct count_arg *a = p;
    if (nth != a->nth || ith < 0 || ith >= nth) {
        atomic_store(&a->bad_any, 1);
        return;
    }
    a->counts[ith]++;
    a->job_sum[ith] += a->job;
}

static void run_counted(struct cpu_pool *pool, int nth, long jobs, int sleep_us) {
    struct count_arg a;
    memset(&a, 0, sizeof(a));
    a.nth = nth;
    atomic_init(&a.bad_any, 0);
    for (long j = 0; j < jobs; j++) {
        a.job = j;
        cpu_pool_run(pool, count_task, &a);
        if (sleep_us) {
            struct timespec ts = {0, sleep_us * 1000L};
            nanosleep(&ts, NULL);
        }
    }
    assert_int_equal(atomic_load(&a.bad_any), 0);
    for (int i = 0; i < nth; i++) {
        assert_int_equal(a.counts[i], jobs);
        assert_int_equal(a.job_sum[i], jobs * (jobs - 1) / 2);
    }
}

static void test_pool_jobs(void **state) {
    (void)state;
    assert_int_equal(cpu_pool_size(NULL), 1);
    run_counted(NULL, 1, 100, 0);
    for (int t = 2; t <= 3; t++) {
        assert_int_equal(cpu_pool_size(pools[t]), t);
        run_counted(pools[t], t, POOL_JOBS, 0);
        /* jobs far apart: the workers have gone to sleep and must be woken */
        run_counted(pools[t], t, 5, 2000);
    }
    /* create/destroy cycles, including one that never ran a job and the default size */
    for (int i = 0; i < 20; i++) {
        struct cpu_pool *p = NULL;
        assert_int_equal(cpu_pool_create(i % 2 ? 4 : 1, &p), MOERUN_OK);
        assert_non_null(p);
        if (i % 3)
            run_counted(p, cpu_pool_size(p), 50, 0);
        cpu_pool_destroy(p);
    }
    struct cpu_pool *p = NULL;
    assert_int_equal(cpu_pool_create(0, &p), MOERUN_OK);
    assert_true(cpu_pool_size(p) >= 1);
    if (cpu_pool_size(p) <= 64)
        run_counted(p, cpu_pool_size(p), 100, 0);
    cpu_pool_destroy(p);
}

int main(void) {
    tu_seed();
    enum { N_TYPES = MR_ARRAY_LEN(type_cases) };
    struct CMUnitTest tests[2 * N_TYPES + 2];
    char names[2 * N_TYPES][48];
    size_t nt = 0;
    for (size_t i = 0; i < N_TYPES; i++) {
        const char *tn = mr_type_info(type_cases[i].type)->name;
        snprintf(names[2 * i], sizeof(names[0]), "matvec_accuracy_%s", tn);
        snprintf(names[2 * i + 1], sizeof(names[0]), "matmul_columns_%s", tn);
        tests[nt++] = (struct CMUnitTest){names[2 * i], test_matvec_accuracy, NULL, NULL,
                                          (void *)&type_cases[i]};
        tests[nt++] = (struct CMUnitTest){names[2 * i + 1], test_matmul_columns, NULL, NULL,
                                          (void *)&type_cases[i]};
    }
    tests[nt++] = (struct CMUnitTest)cmocka_unit_test(test_bad_args);
    tests[nt++] = (struct CMUnitTest)cmocka_unit_test(test_pool_jobs);
    return _cmocka_run_group_tests("matmul", tests, nt, group_setup, group_teardown);
}
