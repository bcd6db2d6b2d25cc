/* The backend ops table, for the cpu and the sim backend alike: every compute op against a
 * float64 reference (or, for the data-movement ops, bit for bit against a plain float loop) on
 * fresh random data that passes through backend memory (upload in, download out), computed on
 * a clone of the root instance. Then the sim backend's copy stream: events, ordering,
 * callbacks on its thread, a full ring, 1000 random interleavings against a checker, and
 * destroy with work queued. */
#include "testutil.h"

#include "backend.h"
#include "cpu/quants.h"
#include "internal.h"
#include "types.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int (*be_create_fn)(const struct mr_backend_config *cfg, struct mr_backend **out);

struct be_case {
    const char *name;
    enum mr_backend_kind kind;
    be_create_fn create;
};

static const struct be_case be_cases[] = {
    {"cpu", MR_BACKEND_CPU, mr_backend_cpu_create},
    {"sim", MR_BACKEND_SIM, mr_backend_sim_create},
};

/* Normalised error bounds ||y - ref|| / ||ref|| against float64. Products: against the
 * dequantized weights and the unrounded x, so they include the rounding of x to the companion
 * type; test_matmul's bounds, about twice the worst measured here over 200 seeds (worst of
 * n = 1, 3, 37: F32 1.6e-7, F16 4.4e-4, BF16 3.5e-3, Q8_0 9.1e-3, Q4_0 1.0e-2, Q4_K 1.4e-2,
 * Q5_K 1.5e-2, Q6_K 1.3e-2). The others: the worst over the same 200 seeds in the comment,
 * the bound a few times above. */
static const struct {
    int type;
    double tol;
} mm_types[] = {
    {MOERUN_TYPE_F32, 1e-6},    {MOERUN_TYPE_F16, 1e-3},    {MOERUN_TYPE_BF16, 1e-2},
    {MOERUN_TYPE_Q8_0, 2.5e-2}, {MOERUN_TYPE_Q4_0, 2.5e-2}, {MOERUN_TYPE_Q4_K, 3e-2},
    {MOERUN_TYPE_Q5_K, 3e-2},   {MOERUN_TYPE_Q6_K, 3e-2},
};
#define TOL_RMSNORM   5e-7 /* worst 9.3e-8 */
#define TOL_ROPE      3e-5 /* positions 1 .. 602; worst 7.4e-6 */
#define TOL_ATTENTION 1e-6 /* worst 1.4e-7 */
#define TOL_SOFTMAX   5e-7 /* probs and selected weights; worst 1.0e-7 */
#define TOL_SWIGLU    5e-7 /* worst 7.7e-8 */

#define MM_K    512 /* a multiple of every block size (256 for the K-quants) */
#define MM_ROWS 29
#define MAX_N   37 /* the largest batch of the products */
#define N_CTX   64 /* KV cache positions */

static struct tu_rng rng;

/* --- fixture: a root, a clone that computes, its workspace, and backend buffers ------------- */

struct fx {
    const struct be_case *bc;
    struct mr_backend *root, *be; /* be: a clone of root */
    const struct mr_backend_ops *ops;
    void *ws;
    void *bufs[64]; /* backend memory, freed at teardown */
    int n_bufs;
    void *host[64]; /* host memory, freed at teardown */
    int n_host;
};

static int fx_setup(void **state) {
    const struct be_case *bc = *state;
    struct fx *f = calloc(1, sizeof(*f));
    if (!f)
        return -1;
    f->bc = bc;
    struct mr_backend_config cfg = {.kind = bc->kind, .n_threads = 3};
    if (bc->create(&cfg, &f->root) != MOERUN_OK ||
        f->root->ops->clone(f->root, 2, &f->be) != MOERUN_OK)
        return -1;
    f->ops = f->be->ops;
    if (f->ops->version != MR_BACKEND_VERSION || f->be->kind != bc->kind ||
        strcmp(f->ops->name, bc->name) != 0 || f->be->host_memory != (bc->kind == MR_BACKEND_CPU))
        return -1;
    struct mr_workspace_need need = {.n_batch = MAX_N,
                                     .n_ctx = N_CTX,
                                     .max_k = MM_K,
                                     .max_rows = MM_ROWS,
                                     .max_elements = (int64_t)MM_ROWS * MM_K};
    for (size_t i = 0; i < MR_ARRAY_LEN(mm_types); i++)
        need.types |= (uint64_t)1 << mm_types[i].type;
    uint64_t bytes = f->ops->workspace_bytes(f->be, &need);
    if (f->ops->alloc(f->be, bytes, &f->ws) != MOERUN_OK)
        return -1;
    f->ops->set_workspace(f->be, f->ws, bytes);
    *state = f;
    return 0;
}

static int fx_teardown(void **state) {
    struct fx *f = *state;
    f->ops->sync(f->be, MR_STREAM_COPY); /* a failed test may leave copies queued */
    for (int i = 0; i < f->n_bufs; i++)
        f->ops->free(f->be, f->bufs[i]);
    f->ops->free(f->be, f->ws);
    f->ops->destroy(f->be); /* clone before root */
    f->ops->destroy(f->root);
    for (int i = 0; i < f->n_host; i++)
        mr_free(NULL, f->host[i]);
    free(f);
    return 0;
}

/* Zeroed host memory, page-aligned (host_register's condition), freed at teardown. */
static void *hnew(struct fx *f, size_t bytes) {
    assert_true(f->n_host < (int)MR_ARRAY_LEN(f->host));
    void *p = f->host[f->n_host++] = mr_alloc(NULL, bytes, 4096);
    assert_non_null(p);
    return memset(p, 0, bytes);
}
#define FNEW(n) ((float *)hnew(f, sizeof(float) * (size_t)(n)))
#define DNEW(n) ((double *)hnew(f, sizeof(double) * (size_t)(n)))

/* n floats drawn from N(0, scale^2) */
static float *hrand(struct fx *f, size_t n, float scale) {
    float *p = FNEW(n);
    tu_fill_normal(&rng, p, n, scale);
    return p;
}

/* Backend memory of bytes holding a copy of host (NULL: all bytes 0xFF, a NaN in every float,
 * so that an output the op fails to write shows). */
static void *dev_in(struct fx *f, const void *host, size_t bytes) {
    void *d = NULL;
    assert_true(f->n_bufs < (int)MR_ARRAY_LEN(f->bufs));
    assert_int_equal(f->ops->alloc(f->be, bytes, &d), MOERUN_OK);
    assert_true(d && (uintptr_t)d % 4096 == 0);
    f->bufs[f->n_bufs++] = d;
    if (!host)
        host = memset(hnew(f, bytes), 0xff, bytes);
    assert_int_equal(f->ops->upload(f->be, d, host, bytes), MOERUN_OK);
    return d;
}

static void dev_out(struct fx *f, void *host, const void *d, size_t bytes) {
    assert_int_equal(f->ops->download(f->be, host, d, bytes), MOERUN_OK);
}

/* The bytes of backend memory d equal want's. */
static void dev_expect(struct fx *f, const void *d, const void *want, size_t bytes) {
    void *got = hnew(f, bytes);
    dev_out(f, got, d, bytes);
    assert_memory_equal(got, want, bytes);
}

static void check_err(const char *what, const struct fx *f, const float *y, const double *ref,
                      size_t n, double tol) {
    double e = tu_rel_l2(y, ref, n);
    if (!(e <= tol))
        print_message("%s %s: normalised error %.3e > %.1e\n", f->bc->name, what, e, tol);
    assert_true(e <= tol);
}

/* --- products ------------------------------------------------------------------------------- */

static void test_matmul(void **state) {
    struct fx *f = *state;
    const int ns[] = {1, 3, MAX_N};
    float *wf = FNEW(MM_ROWS * MM_K), *deq = FNEW(MM_ROWS * MM_K);
    float *x = FNEW(MAX_N * MM_K), *y = FNEW(MAX_N * MM_ROWS);
    double *ref = DNEW(MAX_N * MM_ROWS);
    for (size_t ti = 0; ti < MR_ARRAY_LEN(mm_types); ti++) {
        const int type = mm_types[ti].type;
        uint64_t row_bytes;
        assert_true(mr_type_nbytes(type, MM_K, &row_bytes));
        uint8_t *q = hnew(f, (size_t)row_bytes * MM_ROWS);
        for (int r = 0; r < MM_ROWS; r++) {
            float *wr = wf + (size_t)r * MM_K;
            tu_fill_normal(&rng, wr, MM_K, (float)(0.02 * (1.0 + 3.0 * tu_rng_uniform(&rng))));
            cpu_ref_from_float(type, wr, q + (size_t)r * row_bytes, MM_K);
            cpu_ref_to_float(type, q + (size_t)r * row_bytes, deq + (size_t)r * MM_K, MM_K);
        }
        const void *dw = dev_in(f, q, (size_t)row_bytes * MM_ROWS);
        for (size_t ni = 0; ni < MR_ARRAY_LEN(ns); ni++) {
            const int n = ns[ni];
            tu_fill_normal(&rng, x, (size_t)n * MM_K, 1.0f);
            for (int c = 0; c < n; c++)
                for (int r = 0; r < MM_ROWS; r++) {
                    double s = 0;
                    for (int j = 0; j < MM_K; j++)
                        s += (double)deq[r * MM_K + j] * x[c * MM_K + j];
                    ref[c * MM_ROWS + r] = s;
                }
            float *dx = dev_in(f, x, sizeof(float) * n * MM_K);
            float *dy = dev_in(f, NULL, sizeof(float) * n * MM_ROWS);
            assert_int_equal(f->ops->matmul(f->be, type, MM_ROWS, MM_K, dw, n, dx, dy), MOERUN_OK);
            dev_out(f, y, dy, sizeof(float) * n * MM_ROWS);
            char what[48];
            snprintf(what, sizeof(what), "matmul %s n=%d", mr_type_info(type)->name, n);
            check_err(what, f, y, ref, (size_t)n * MM_ROWS, mm_types[ti].tol);
        }
    }
}

/* --- norms, rope, attention, routing, activations ------------------------------------------- */

static void test_rmsnorm(void **state) {
    struct fx *f = *state;
    enum { R = 5, N = 300 };
    const float eps = 1e-5f;
    float *x = hrand(f, R * N, 3), *w = hrand(f, N, 1), *y = FNEW(R * N);
    double *ref = DNEW(R * N);
    for (int r = 0; r < R; r++) {
        double ss = 0;
        for (int i = 0; i < N; i++)
            ss += (double)x[r * N + i] * x[r * N + i];
        const double s = 1.0 / sqrt(ss / N + eps);
        for (int i = 0; i < N; i++)
            ref[r * N + i] = x[r * N + i] * s * w[i];
    }
    float *dx = dev_in(f, x, sizeof(float) * R * N), *dw = dev_in(f, w, sizeof(float) * N);
    float *dy = dev_in(f, NULL, sizeof(float) * R * N);
    assert_int_equal(f->ops->rmsnorm(f->be, dy, dx, dw, R, N, eps), MOERUN_OK);
    dev_out(f, y, dy, sizeof(float) * R * N);
    check_err("rmsnorm", f, y, ref, R * N, TOL_RMSNORM);
    /* in place: the same values */
    assert_int_equal(f->ops->rmsnorm(f->be, dx, dx, dw, R, N, eps), MOERUN_OK);
    dev_expect(f, dx, y, sizeof(float) * R * N);
}

static void test_rope(void **state) {
    struct fx *f = *state;
    enum { T = 3, H = 4, HD = 64 };
    const float base = 10000.0f;
    float *x = FNEW(T * H * HD), *y = FNEW(T * H * HD);
    double *ref = DNEW(T * H * HD);
    for (int mode = 0; mode < 2; mode++) {
        for (int n_rot = HD / 2; n_rot <= HD; n_rot += HD / 2) {
            const int64_t pos0 = 1 + (int64_t)(tu_rng_u64(&rng) % 600);
            tu_fill_normal(&rng, x, T * H * HD, 1.0f);
            for (int t = 0; t < T; t++)
                for (int h = 0; h < H; h++) {
                    const float *v = x + (t * H + h) * HD;
                    double *o = ref + (t * H + h) * HD;
                    for (int i = 0; i < HD; i++)
                        o[i] = v[i];
                    for (int i = 0; i < n_rot / 2; i++) {
                        const double th = (double)(pos0 + t) * pow(base, -2.0 * i / n_rot);
                        const int a = mode == MR_ROPE_MODE_NORM ? 2 * i : i;
                        const int b = mode == MR_ROPE_MODE_NORM ? 2 * i + 1 : i + n_rot / 2;
                        o[a] = v[a] * cos(th) - v[b] * sin(th);
                        o[b] = v[a] * sin(th) + v[b] * cos(th);
                    }
                }
            float *dx = dev_in(f, x, sizeof(float) * T * H * HD);
            assert_int_equal(
                f->ops->rope(f->be, dx, T, H, HD, n_rot, pos0, base, (enum mr_rope_mode)mode),
                MOERUN_OK);
            dev_out(f, y, dx, sizeof(float) * T * H * HD);
            char what[48];
            snprintf(what, sizeof(what), "rope mode %d n_rot %d pos0 %lld", mode, n_rot,
                     (long long)pos0);
            check_err(what, f, y, ref, T * H * HD, TOL_ROPE);
            for (int t = 0; t < T * H; t++) /* dimensions past n_rot untouched */
                assert_memory_equal(y + t * HD + n_rot, x + t * HD + n_rot,
                                    sizeof(float) * (HD - n_rot));
        }
    }
}

static void test_attention(void **state) {
    struct fx *f = *state;
    enum { H = 8, HKV = 2, HD = 64, KVD = HKV * HD };
    const int64_t shapes[][2] = {{1, 0}, {1, 9}, {5, 0}, {6, 17}}; /* n_tok, pos0 */
    float *q = FNEW(8 * H * HD), *o = FNEW(8 * H * HD);
    float *kc = FNEW(N_CTX * KVD), *vc = FNEW(N_CTX * KVD);
    double *ref = DNEW(8 * H * HD), *sc = DNEW(N_CTX);
    for (size_t si = 0; si < MR_ARRAY_LEN(shapes); si++) {
        const int64_t n_tok = shapes[si][0], pos0 = shapes[si][1];
        const int64_t n_pos = pos0 + n_tok;
        tu_fill_normal(&rng, q, (size_t)n_tok * H * HD, 1.0f);
        tu_fill_normal(&rng, kc, N_CTX * KVD, 1.0f);
        tu_fill_normal(&rng, vc, N_CTX * KVD, 1.0f);
        for (int64_t i = n_pos * KVD; i < N_CTX * KVD; i++)
            kc[i] = vc[i] = NAN; /* rows past the last position are never read */
        for (int64_t t = 0; t < n_tok; t++)
            for (int h = 0; h < H; h++) {
                const int kvh = h / (H / HKV);
                const float *qh = q + (t * H + h) * HD;
                double mx = -INFINITY, sum = 0;
                for (int64_t p = 0; p <= pos0 + t; p++) {
                    double d = 0;
                    for (int i = 0; i < HD; i++)
                        d += (double)qh[i] * kc[p * KVD + kvh * HD + i];
                    sc[p] = d / sqrt((double)HD);
                    mx = fmax(mx, sc[p]);
                }
                for (int64_t p = 0; p <= pos0 + t; p++)
                    sum += (sc[p] = exp(sc[p] - mx));
                double *oh = ref + (t * H + h) * HD;
                for (int i = 0; i < HD; i++) {
                    double a = 0;
                    for (int64_t p = 0; p <= pos0 + t; p++)
                        a += sc[p] / sum * vc[p * KVD + kvh * HD + i];
                    oh[i] = a;
                }
            }
        const size_t qb = sizeof(float) * (size_t)n_tok * H * HD;
        float *dq = dev_in(f, q, qb), *dout = dev_in(f, NULL, qb);
        float *dk = dev_in(f, kc, sizeof(float) * N_CTX * KVD);
        float *dv = dev_in(f, vc, sizeof(float) * N_CTX * KVD);
        assert_int_equal(f->ops->attention(f->be, dq, dk, dv, dout, n_tok, pos0, H, HKV, HD),
                         MOERUN_OK);
        dev_out(f, o, dout, qb);
        char what[48];
        snprintf(what, sizeof(what), "attention n_tok %lld pos0 %lld", (long long)n_tok,
                 (long long)pos0);
        check_err(what, f, o, ref, (size_t)n_tok * H * HD, TOL_ATTENTION);
    }
}

static void test_softmax_topk(void **state) {
    struct fx *f = *state;
    enum { T = 4, E = 24, KMAX = 6 };
    float *lg = FNEW(T * E), *p = FNEW(T * E), *sw = FNEW(T * KMAX);
    double *ref = DNEW(T * E), *ref_w = DNEW(T * KMAX);
    int32_t sel[T * KMAX], ref_sel[T * KMAX];
    const int ks[] = {0, 1, 4, KMAX};
    for (size_t ki = 0; ki < MR_ARRAY_LEN(ks); ki++) {
        for (int renorm = 0; renorm < 2; renorm++) {
            const int k = ks[ki];
            /* logits on a grid of 1/8 from 9 values: many ties, distinct values far apart */
            for (int i = 0; i < T * E; i++)
                lg[i] = (float)((int)(tu_rng_u64(&rng) % 9) - 4) / 8.0f;
            for (int t = 0; t < T; t++) {
                double mx = -INFINITY, sum = 0;
                for (int e = 0; e < E; e++)
                    mx = fmax(mx, lg[t * E + e]);
                for (int e = 0; e < E; e++)
                    sum += (ref[t * E + e] = exp(lg[t * E + e] - mx));
                for (int e = 0; e < E; e++)
                    ref[t * E + e] /= sum;
                /* the k largest, lowest index first on ties: a stable selection */
                bool taken[E] = {0};
                double wsum = 0;
                for (int j = 0; j < k; j++) {
                    int best = -1;
                    for (int e = 0; e < E; e++)
                        if (!taken[e] && (best < 0 || lg[t * E + e] > lg[t * E + best]))
                            best = e;
                    taken[best] = true;
                    ref_sel[t * k + j] = best;
                    wsum += (ref_w[t * k + j] = ref[t * E + best]);
                }
                for (int j = 0; renorm && j < k; j++)
                    ref_w[t * k + j] /= wsum;
            }
            float *dl = dev_in(f, lg, sizeof(float) * T * E);
            float *dp = (ki + renorm) % 2 ? dl : dev_in(f, NULL, sizeof(float) * T * E);
            int32_t *ds = k ? dev_in(f, NULL, sizeof(int32_t) * T * k) : NULL;
            float *dw = k ? dev_in(f, NULL, sizeof(float) * T * k) : NULL;
            assert_int_equal(f->ops->softmax_topk(f->be, dl, T, E, k, renorm, dp, ds, dw),
                             MOERUN_OK);
            dev_out(f, p, dp, sizeof(float) * T * E);
            check_err(dp == dl ? "softmax in place" : "softmax", f, p, ref, T * E, TOL_SOFTMAX);
            if (k == 0)
                continue;
            dev_out(f, sel, ds, sizeof(int32_t) * T * k);
            dev_out(f, sw, dw, sizeof(float) * T * k);
            assert_memory_equal(sel, ref_sel, sizeof(int32_t) * T * k);
            check_err(renorm ? "topk weights renorm" : "topk weights", f, sw, ref_w, (size_t)T * k,
                      TOL_SOFTMAX);
        }
    }
}

static void test_swiglu(void **state) {
    struct fx *f = *state;
    enum { N = 1000 };
    float *g = hrand(f, N, 3), *u = hrand(f, N, 1), *y = FNEW(N);
    double *ref = DNEW(N);
    for (int i = 0; i < N; i++)
        ref[i] = g[i] / (1.0 + exp(-(double)g[i])) * u[i];
    float *dg = dev_in(f, g, sizeof(float) * N), *du = dev_in(f, u, sizeof(float) * N);
    float *dy = dev_in(f, NULL, sizeof(float) * N);
    assert_int_equal(f->ops->swiglu(f->be, dy, dg, du, N), MOERUN_OK);
    dev_out(f, y, dy, sizeof(float) * N);
    check_err("swiglu", f, y, ref, N, TOL_SWIGLU);
    assert_int_equal(f->ops->swiglu(f->be, dg, dg, du, N), MOERUN_OK); /* out aliases g */
    dev_expect(f, dg, y, sizeof(float) * N);
}

/* --- data movement: bit for bit against plain float loops ----------------------------------- */

static void test_exact_ops(void **state) {
    struct fx *f = *state;
    enum { T = 5, D = 67, K = 3, NS = 12 };
    const size_t yb = sizeof(float) * T * D;
    float *y = hrand(f, T * D, 1), *x = hrand(f, T * D, 1), *b = hrand(f, D, 1);
    float *g = hrand(f, T, 2), *slots = hrand(f, T * K * D, 1), *src = hrand(f, NS * D, 1);
    float *big = hrand(f, NS * 2 * D, 1), *scale = hrand(f, NS * 2, 1), *want = FNEW(NS * 2 * D);
    int32_t idx[NS * 2]; /* the first NS: distinct rows of 2 * NS, in random order */
    for (int i = 0; i < NS * 2; i++)
        idx[i] = i;
    for (int i = NS * 2 - 1; i > 0; i--) {
        const int j = (int)(tu_rng_u64(&rng) % (uint64_t)(i + 1));
        const int32_t tmp = idx[i];
        idx[i] = idx[j], idx[j] = tmp;
    }
    float *dy = dev_in(f, y, yb), *dx = dev_in(f, x, yb);
    assert_int_equal(f->ops->add(f->be, dy, dx, T * D), MOERUN_OK);
    for (int i = 0; i < T * D; i++)
        want[i] = y[i] + x[i];
    dev_expect(f, dy, want, yb);

    dy = dev_in(f, y, yb);
    assert_int_equal(f->ops->add_rows(f->be, dy, dev_in(f, b, sizeof(float) * D), T, D), MOERUN_OK);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < D; i++)
            want[t * D + i] = y[t * D + i] + b[i];
    dev_expect(f, dy, want, yb);

    dy = dev_in(f, y, yb);
    assert_int_equal(f->ops->add_gated(f->be, dy, dx, dev_in(f, g, sizeof(float) * T), T, D),
                     MOERUN_OK);
    for (int t = 0; t < T; t++) {
        const float s = 1.0f / (1.0f + expf(-g[t]));
        for (int i = 0; i < D; i++)
            want[t * D + i] = y[t * D + i] + x[t * D + i] * s;
    }
    dev_expect(f, dy, want, yb);

    dy = dev_in(f, NULL, yb);
    float *dslots = dev_in(f, slots, sizeof(float) * T * K * D);
    assert_int_equal(f->ops->sum_slots(f->be, dy, dslots, T, K, D), MOERUN_OK);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < D; i++) {
            float s = slots[(t * K) * D + i];
            for (int j = 1; j < K; j++)
                s += slots[(t * K + j) * D + i];
            want[t * D + i] = s;
        }
    dev_expect(f, dy, want, yb);

    /* gather_rows: NS of the 2 * NS rows of big */
    int32_t *didx = dev_in(f, idx, sizeof(int32_t) * NS);
    float *dbig = dev_in(f, big, sizeof(float) * NS * 2 * D);
    float *dg = dev_in(f, NULL, sizeof(float) * NS * D);
    assert_int_equal(f->ops->gather_rows(f->be, dg, dbig, didx, NS, D), MOERUN_OK);
    for (int i = 0; i < NS; i++)
        memcpy(want + i * D, big + idx[i] * D, sizeof(float) * D);
    dev_expect(f, dg, want, sizeof(float) * NS * D);

    /* scatter_scaled: the NS rows of src into rows of big; the others untouched */
    float *dsrc = dev_in(f, src, sizeof(float) * NS * D);
    float *dscale = dev_in(f, scale, sizeof(float) * NS * 2);
    assert_int_equal(f->ops->scatter_scaled(f->be, dbig, dsrc, didx, dscale, NS, D), MOERUN_OK);
    memcpy(want, big, sizeof(float) * NS * 2 * D);
    for (int i = 0; i < NS; i++)
        for (int j = 0; j < D; j++)
            want[idx[i] * D + j] = src[i * D + j] * scale[idx[i]];
    dev_expect(f, dbig, want, sizeof(float) * NS * 2 * D);
}

/* --- events and the copy stream ------------------------------------------------------------- */

/* A gate a copy-stream callback waits at until another thread opens it, after delay_ms. */
struct gate {
    atomic_int open;
    long delay_ms;
};

static void sleep_us(long us) {
    struct timespec ts = {us / 1000000, us % 1000000 * 1000L};
    nanosleep(&ts, NULL);
}

static void gate_pass(void *arg) { /* mr_host_fn: on the copy stream */
    struct gate *gt = arg;
    while (!atomic_load(&gt->open))
        sleep_us(100);
}

static void *gate_opener(void *arg) {
    struct gate *gt = arg;
    sleep_us(gt->delay_ms * 1000);
    atomic_store(&gt->open, 1);
    return NULL;
}

static uint8_t *host_pattern(struct fx *f, size_t bytes) {
    uint8_t *h = hnew(f, bytes);
    for (size_t i = 0; i < bytes; i += 8) {
        uint64_t v = tu_rng_u64(&rng);
        memcpy(h + i, &v, MR_MIN(8, bytes - i));
    }
    return h;
}

/* wait(COMPUTE) blocks until a record(COPY) behind a held-up stream completes, and then sees the
 * bytes; wait(COPY) on a compute record orders a later copy after the compute work. */
static void test_events(void **state) {
    struct fx *f = *state;
    const struct mr_backend_ops *o = f->ops;
    enum { BYTES = 1 << 20 };
    uint8_t *h = host_pattern(f, BYTES), *back = hnew(f, BYTES);
    assert_int_equal(o->host_register(f->be, h, BYTES), MOERUN_OK);
    uint8_t *d = dev_in(f, NULL, BYTES);
    struct mr_event *ev = NULL, *never = NULL;
    assert_int_equal(o->event_create(f->be, &ev), MOERUN_OK);
    assert_int_equal(o->event_create(f->root, &never), MOERUN_OK);
    assert_int_equal(o->wait(f->be, MR_STREAM_COMPUTE, never), MOERUN_OK); /* never recorded */

    struct gate gt = {.delay_ms = f->bc->kind == MR_BACKEND_SIM ? 50 : 0};
    pthread_t opener;
    if (f->bc->kind == MR_BACKEND_SIM) /* the CPU runs the callback at once: open it first */
        assert_int_equal(pthread_create(&opener, NULL, gate_opener, &gt), 0);
    else
        gate_opener(&gt);
    assert_int_equal(o->callback(f->be, MR_STREAM_COPY, gate_pass, &gt), MOERUN_OK);
    for (int off = 0; off < BYTES; off += BYTES / 8)
        assert_int_equal(o->copy_async(f->be, d + off, h + off, BYTES / 8), MOERUN_OK);
    assert_int_equal(o->record(f->be, MR_STREAM_COPY, ev), MOERUN_OK);
    assert_int_equal(o->wait(f->be, MR_STREAM_COMPUTE, ev), MOERUN_OK);
    const int waited = atomic_load(&gt.open);
    dev_out(f, back, d, BYTES);
    if (f->bc->kind == MR_BACKEND_SIM)
        pthread_join(opener, NULL); /* before any assertion leaves the test */
    assert_int_equal(waited, 1);    /* the wait did wait */
    assert_memory_equal(back, h, BYTES);

    /* compute writes d; record on compute; the copy stream waits for it, then overwrites */
    memset(back, 0, BYTES);
    assert_int_equal(o->upload(f->be, d, back, BYTES), MOERUN_OK);
    assert_int_equal(o->record(f->be, MR_STREAM_COMPUTE, ev), MOERUN_OK);
    assert_int_equal(o->wait(f->be, MR_STREAM_COPY, ev), MOERUN_OK);
    assert_int_equal(o->copy_async(f->be, d, h, BYTES / 2), MOERUN_OK);
    assert_int_equal(o->sync(f->be, MR_STREAM_COPY), MOERUN_OK);
    dev_out(f, back, d, BYTES);
    assert_memory_equal(back, h, BYTES / 2);
    for (int i = BYTES / 2; i < BYTES; i++)
        assert_int_equal(back[i], 0);

    o->event_destroy(f->be, ev);
    o->event_destroy(f->be, never);
    o->event_destroy(f->be, NULL);
    o->host_unregister(f->be, h);
}

/* A callback on the copy stream runs after the copies before it, on another thread. */
struct cb_check {
    const uint8_t *dev, *want;
    size_t bytes;
    pthread_t caller;
    atomic_int ran, ok, other_thread;
};

static void cb_check_fn(void *arg) {
    struct cb_check *c = arg;
    atomic_store(&c->ok, memcmp(c->dev, c->want, c->bytes) == 0);
    atomic_store(&c->other_thread, !pthread_equal(pthread_self(), c->caller));
    atomic_fetch_add(&c->ran, 1);
}

static void test_callback(void **state) {
    struct fx *f = *state;
    enum { BYTES = 256 << 10 };
    uint8_t *h = host_pattern(f, BYTES), *d = dev_in(f, NULL, BYTES);
    struct cb_check c = {.dev = d, .want = h, .bytes = BYTES, .caller = pthread_self()};
    atomic_init(&c.ran, 0), atomic_init(&c.ok, 0), atomic_init(&c.other_thread, 0);
    for (int off = 0; off < BYTES; off += 4096)
        assert_int_equal(f->ops->copy_async(f->be, d + off, h + off, 4096), MOERUN_OK);
    assert_int_equal(f->ops->callback(f->be, MR_STREAM_COPY, cb_check_fn, &c), MOERUN_OK);
    assert_int_equal(f->ops->sync(f->be, MR_STREAM_COPY), MOERUN_OK);
    assert_int_equal(atomic_load(&c.ran), 1);
    assert_int_equal(atomic_load(&c.ok), 1);
    assert_int_equal(atomic_load(&c.other_thread), 1);
}

/* More operations than the ring holds behind a held-up stream: the enqueuer waits for room. */
static void test_ring_full(void **state) {
    struct fx *f = *state;
    enum { N = 5000, CHUNK = 64 };
    uint8_t *h = host_pattern(f, N * CHUNK), *d = dev_in(f, NULL, N * CHUNK);
    uint8_t *back = hnew(f, N * CHUNK);
    struct gate gt = {.delay_ms = 200};
    pthread_t opener;
    assert_int_equal(pthread_create(&opener, NULL, gate_opener, &gt), 0);
    assert_int_equal(f->ops->callback(f->be, MR_STREAM_COPY, gate_pass, &gt), MOERUN_OK);
    int rc = MOERUN_OK;
    for (int i = 0; i < N && rc == MOERUN_OK; i++)
        rc = f->ops->copy_async(f->be, d + i * CHUNK, h + i * CHUNK, CHUNK);
    const int blocked = atomic_load(&gt.open); /* it could not have queued them all before */
    pthread_join(opener, NULL);                /* before any assertion leaves the test */
    assert_int_equal(rc, MOERUN_OK);
    assert_int_equal(f->ops->sync(f->be, MR_STREAM_COPY), MOERUN_OK);
    assert_int_equal(blocked, 1);
    dev_out(f, back, d, N * CHUNK);
    assert_memory_equal(back, h, N * CHUNK);
}

/* Random interleavings of copies, records and waits on either stream, callbacks, syncs and
 * event re-creation. Copy i writes region i (a random length, the rest of the region stays
 * zero); the checker knows how many copies preceded each record and callback and checks that
 * those regions hold their bytes whenever the stream says they must. */
#define IL_STEPS   1000
#define IL_REGIONS 600
#define IL_REGION  512
#define IL_EVENTS  4

struct il {
    const uint8_t *host;
    const uint8_t *dev;
    uint32_t len[IL_REGIONS];
    pthread_t caller;
    atomic_int next_cb, bad;
};

struct il_cb {
    struct il *il;
    int index, upto; /* its place among the callbacks; copies before it */
};

static bool il_regions_ok(const struct il *il, const uint8_t *dev, int from, int upto) {
    static const uint8_t zero[IL_REGION];
    for (int r = from; r < upto; r++) {
        const uint8_t *dr = dev + (size_t)r * IL_REGION;
        if (memcmp(dr, il->host + (size_t)r * IL_REGION, il->len[r]) != 0 ||
            memcmp(dr + il->len[r], zero, IL_REGION - il->len[r]) != 0)
            return false;
    }
    return true;
}

static void il_cb_fn(void *arg) {
    const struct il_cb *c = arg;
    struct il *il = c->il;
    if (c->index % 3 == 0)
        sleep_us(300); /* hold the stream up so that the caller runs ahead of it */
    if (atomic_fetch_add(&il->next_cb, 1) != c->index ||
        pthread_equal(pthread_self(), il->caller) || !il_regions_ok(il, il->dev, 0, c->upto))
        atomic_fetch_add(&il->bad, 1);
}

static void test_interleavings(void **state) {
    struct fx *f = *state;
    const struct mr_backend_ops *o = f->ops;
    struct mr_backend *be = f->be;
    const size_t bytes = (size_t)IL_REGIONS * IL_REGION;
    static struct il il; /* static: queued callbacks name it even if an assertion ends the test */
    memset(&il, 0, sizeof(il));
    il.caller = pthread_self();
    atomic_init(&il.next_cb, 0), atomic_init(&il.bad, 0);
    uint8_t *h = host_pattern(f, bytes), *back = hnew(f, bytes);
    il.host = h;
    il.dev = dev_in(f, back, bytes); /* zeros */
    uint8_t *d = (uint8_t *)il.dev;
    struct il_cb *cbs = hnew(f, IL_STEPS * sizeof(*cbs));
    struct mr_event *ev[IL_EVENTS];
    int ev_upto[IL_EVENTS] = {0}; /* copies known complete once the event is */
    for (int i = 0; i < IL_EVENTS; i++)
        assert_int_equal(o->event_create(be, &ev[i]), MOERUN_OK);
    int n_copies = 0, n_cbs = 0, known = 0; /* known: copies the caller knows complete */
    for (int step = 0; step < IL_STEPS; step++) {
        const int roll = (int)(tu_rng_u64(&rng) % 100), e = (int)(tu_rng_u64(&rng) % IL_EVENTS);
        int check_upto = -1;
        if (roll < 40) {
            if (n_copies == IL_REGIONS)
                continue;
            const int r = n_copies++;
            il.len[r] = 1 + (uint32_t)(tu_rng_u64(&rng) % IL_REGION);
            assert_int_equal(
                o->copy_async(be, d + (size_t)r * IL_REGION, h + (size_t)r * IL_REGION, il.len[r]),
                MOERUN_OK);
        } else if (roll < 52) {
            assert_int_equal(o->record(be, MR_STREAM_COPY, ev[e]), MOERUN_OK);
            ev_upto[e] = n_copies;
        } else if (roll < 60) {
            assert_int_equal(o->record(be, MR_STREAM_COMPUTE, ev[e]), MOERUN_OK);
            ev_upto[e] = known; /* the compute stream promises nothing about copies */
        } else if (roll < 75) {
            assert_int_equal(o->wait(be, MR_STREAM_COMPUTE, ev[e]), MOERUN_OK);
            check_upto = ev_upto[e];
        } else if (roll < 83) {
            assert_int_equal(o->wait(be, MR_STREAM_COPY, ev[e]), MOERUN_OK);
        } else if (roll < 93) {
            cbs[n_cbs] = (struct il_cb){&il, n_cbs, n_copies};
            assert_int_equal(o->callback(be, MR_STREAM_COPY, il_cb_fn, &cbs[n_cbs]), MOERUN_OK);
            n_cbs++;
        } else if (roll < 97) {
            assert_int_equal(o->sync(be, MR_STREAM_COPY), MOERUN_OK);
            check_upto = n_copies;
        } else {
            o->event_destroy(be, ev[e]); /* perhaps with its record still queued */
            assert_int_equal(o->event_create(be, &ev[e]), MOERUN_OK);
            ev_upto[e] = 0;
        }
        if (check_upto >
            known) { /* download only what must be complete: the rest may be in flight */
            const size_t off = (size_t)known * IL_REGION;
            dev_out(f, back + off, d + off, (size_t)(check_upto - known) * IL_REGION);
            if (!il_regions_ok(&il, back, known, check_upto))
                fail_msg("step %d: regions %d..%d incomplete after the stream said done", step,
                         known, check_upto - 1);
            known = check_upto;
        }
    }
    assert_int_equal(o->sync(be, MR_STREAM_COPY), MOERUN_OK);
    dev_out(f, back, d, bytes);
    assert_true(il_regions_ok(&il, back, 0, n_copies));
    assert_true(il_regions_ok(&il, back, n_copies, IL_REGIONS)); /* len 0: still zero */
    assert_int_equal(atomic_load(&il.next_cb), n_cbs);
    assert_int_equal(atomic_load(&il.bad), 0);
    for (int i = 0; i < IL_EVENTS; i++)
        o->event_destroy(be, ev[i]);
}

/* Destroy drains the copy stream: work still queued (behind a slow callback) runs first. */
static void slow_fn(void *arg) {
    (void)arg;
    sleep_us(20000);
}

static void test_destroy_queued(void **state) {
    struct fx *f = *state; /* for its host memory: the instances here are this test's own */
    enum { BYTES = 64 << 10 };
    struct mr_backend_config cfg = {.kind = MR_BACKEND_SIM, .n_threads = 1};
    struct mr_backend *be = NULL;
    assert_int_equal(mr_backend_sim_create(&cfg, &be), MOERUN_OK);
    uint8_t *h = host_pattern(f, BYTES), *d = NULL;
    assert_int_equal(be->ops->alloc(be, BYTES, (void **)&d), MOERUN_OK);
    if (!getenv("MOERUN_SIM_POISON")) /* new device memory is poisoned */
        for (int i = 0; i < BYTES; i += 4093)
            assert_int_equal(d[i], 0xA5);
    struct cb_check c = {.dev = d, .want = h, .bytes = BYTES, .caller = pthread_self()};
    atomic_init(&c.ran, 0), atomic_init(&c.ok, 0), atomic_init(&c.other_thread, 0);
    struct mr_event *ev = NULL;
    assert_int_equal(be->ops->event_create(be, &ev), MOERUN_OK);
    assert_int_equal(be->ops->callback(be, MR_STREAM_COPY, slow_fn, NULL), MOERUN_OK);
    assert_int_equal(be->ops->record(be, MR_STREAM_COPY, ev), MOERUN_OK);
    be->ops->event_destroy(be, ev); /* its record still queued: waits for it */
    assert_int_equal(be->ops->callback(be, MR_STREAM_COPY, slow_fn, NULL), MOERUN_OK);
    for (int off = 0; off < BYTES; off += 1024)
        assert_int_equal(be->ops->copy_async(be, d + off, h + off, 1024), MOERUN_OK);
    assert_int_equal(be->ops->callback(be, MR_STREAM_COPY, cb_check_fn, &c), MOERUN_OK);
    be->ops->destroy(be); /* d still allocated: destroy frees it */
    assert_int_equal(atomic_load(&c.ran), 1);
    assert_int_equal(atomic_load(&c.ok), 1);

    /* and an idle one, and a clone destroyed before its root */
    assert_int_equal(mr_backend_sim_create(&cfg, &be), MOERUN_OK);
    struct mr_backend *cl = NULL;
    assert_int_equal(be->ops->clone(be, 0, &cl), MOERUN_OK);
    assert_ptr_equal(cl->ops, be->ops);
    assert_int_equal(cl->ops->alloc(cl, 0, (void **)&d), MOERUN_OK);
    assert_null(d);
    cl->ops->free(cl, NULL);
    cl->ops->destroy(cl);
    be->ops->destroy(be);
}

int main(void) {
    tu_rng_init(&rng, tu_seed());
    static const struct {
        const char *name;
        CMUnitTestFunction fn;
        bool sim_only;
    } ops_tests[] = {
        {"matmul", test_matmul, false},
        {"rmsnorm", test_rmsnorm, false},
        {"rope", test_rope, false},
        {"attention", test_attention, false},
        {"softmax_topk", test_softmax_topk, false},
        {"swiglu", test_swiglu, false},
        {"exact_ops", test_exact_ops, false},
        {"events", test_events, false},
        {"callback", test_callback, true},
        {"ring_full", test_ring_full, true},
        {"interleavings", test_interleavings, true},
        {"destroy_queued", test_destroy_queued, true},
    };
    enum { N_OPS = MR_ARRAY_LEN(ops_tests), N_BE = MR_ARRAY_LEN(be_cases) };
    struct CMUnitTest tests[N_OPS * N_BE];
    char names[N_OPS * N_BE][48];
    size_t nt = 0;
    for (size_t b = 0; b < N_BE; b++)
        for (size_t i = 0; i < N_OPS; i++) {
            if (ops_tests[i].sim_only && be_cases[b].kind != MR_BACKEND_SIM)
                continue;
            snprintf(names[nt], sizeof(names[0]), "%s_%s", ops_tests[i].name, be_cases[b].name);
            tests[nt] = (struct CMUnitTest){names[nt], ops_tests[i].fn, fx_setup, fx_teardown,
                                            (void *)&be_cases[b]};
            nt++;
        }
    return _cmocka_run_group_tests("backend", tests, nt, NULL, NULL);
}
