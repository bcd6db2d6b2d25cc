/* Sampler: greedy, seeding and reset, the distribution at temperature 1 against softmax,
 * top-k / top-p / min-p keep exactly the expected sets, temperature orders the entropy,
 * the repetition penalty and its window, parameter validation, NaN / inf logits, a large
 * vocabulary. Logits are fresh random data each run (MOERUN_TEST_SEED replays a run). */
#include "testutil.h"

#include "moerun.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

static struct tu_rng rng;

static int setup_rng(void **state) {
    (void)state;
    tu_rng_init(&rng, tu_seed());
    return 0;
}

/* params with every filter off at temperature t and a seed from the run's random source */
static moerun_sampler_params plain_params(float temp) {
    moerun_sampler_params p;
    moerun_sampler_params_init(&p);
    p.temp = temp;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.0f;
    p.repeat_penalty = 1.0f;
    p.seed = tu_rng_u64(&rng) >> 1; /* never MOERUN_SEED_RANDOM */
    return p;
}

static moerun_sampler *make(const moerun_sampler_params *p, uint32_t n_vocab) {
    moerun_sampler *s = NULL;
    assert_int_equal(moerun_sampler_create(p, n_vocab, &s), MOERUN_OK);
    assert_non_null(s);
    return s;
}

/* counts[id] += draws of id over n_draw samples (does not accept them) */
static void draw_counts(moerun_sampler *s, const float *logits, uint32_t n_vocab, int n_draw,
                        uint32_t *counts) {
    memset(counts, 0, n_vocab * sizeof(*counts));
    for (int i = 0; i < n_draw; i++) {
        int32_t t = moerun_sampler_sample(s, logits);
        assert_true(t >= 0 && (uint32_t)t < n_vocab);
        counts[t]++;
    }
}

/* float64 softmax of logits / temp */
static void softmax_ref(const float *logits, uint32_t n, double temp, double *prob) {
    double max = -INFINITY, sum = 0.0;
    for (uint32_t i = 0; i < n; i++)
        max = fmax(max, (double)logits[i]);
    for (uint32_t i = 0; i < n; i++) {
        prob[i] = exp(((double)logits[i] - max) / temp);
        sum += prob[i];
    }
    for (uint32_t i = 0; i < n; i++)
        prob[i] /= sum;
}

static const float *sort_key;
static int by_logit_desc(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    if (sort_key[x] != sort_key[y])
        return sort_key[x] > sort_key[y] ? -1 : 1;
    return x < y ? -1 : 1;
}

/* ids ordered by logit descending (then id) */
static uint32_t *order_ref(const float *logits, uint32_t n) {
    uint32_t *ord = malloc(n * sizeof(*ord));
    assert_non_null(ord);
    for (uint32_t i = 0; i < n; i++)
        ord[i] = i;
    sort_key = logits;
    qsort(ord, n, sizeof(*ord), by_logit_desc);
    return ord;
}

static double entropy_of(const uint32_t *counts, uint32_t n, int n_draw) {
    double h = 0.0;
    for (uint32_t i = 0; i < n; i++) {
        if (counts[i]) {
            double q = (double)counts[i] / n_draw;
            h -= q * log(q);
        }
    }
    return h;
}

/* ---- tests ---------------------------------------------------------------------------------- */

static void test_defaults(void **state) {
    (void)state;
    moerun_sampler_params p;
    moerun_sampler_params_init(&p);
    assert_int_equal(p.struct_size, sizeof(p));
    assert_true(p.temp == 0.8f && p.top_k == 40 && p.top_p == 0.95f && p.min_p == 0.05f);
    assert_true(p.repeat_penalty == 1.0f && p.repeat_last_n == 64);
    assert_true(p.seed == MOERUN_SEED_RANDOM);
    moerun_sampler_destroy(NULL); /* no-op */

    /* NULL params = defaults; two random seeds give different sequences on a flat vocabulary */
    enum { N = 1000, DRAWS = 200 };
    float *logits = calloc(N, sizeof(float));
    assert_non_null(logits);
    moerun_sampler *a = NULL, *b = NULL;
    assert_int_equal(moerun_sampler_create(NULL, N, &a), MOERUN_OK);
    p.top_k = 0;
    p.min_p = 0.0f;
    p.top_p = 1.0f;
    b = make(&p, N);
    int same = 0;
    for (int i = 0; i < DRAWS; i++) {
        int32_t ta = moerun_sampler_sample(a, logits), tb = moerun_sampler_sample(b, logits);
        assert_true(ta >= 0 && ta < N && tb >= 0 && tb < N);
        same += ta == tb;
    }
    assert_true(same < DRAWS / 4);
    moerun_sampler_destroy(a);
    moerun_sampler_destroy(b);
    free(logits);
}

static void test_invalid_params(void **state) {
    (void)state;
    moerun_sampler *s = (moerun_sampler *)&s;
    moerun_sampler_params p;
#define EXPECT_BAD(stmt, field, n_vocab)                                                           \
    do {                                                                                           \
        moerun_sampler_params_init(&p);                                                            \
        stmt;                                                                                      \
        s = (moerun_sampler *)&s;                                                                  \
        assert_int_equal(moerun_sampler_create(&p, (n_vocab), &s), MOERUN_ERR_INVALID_ARG);        \
        assert_null(s);                                                                            \
        assert_non_null(strstr(moerun_errmsg(), field));                                           \
    } while (0)

    EXPECT_BAD(p.temp = NAN, "temp", 10);
    EXPECT_BAD(p.temp = INFINITY, "temp", 10);
    EXPECT_BAD(p.temp = -INFINITY, "temp", 10);
    EXPECT_BAD(p.top_k = -1, "top_k", 10);
    EXPECT_BAD(p.top_p = 0.0f, "top_p", 10);
    EXPECT_BAD(p.top_p = -0.5f, "top_p", 10);
    EXPECT_BAD(p.top_p = 1.0001f, "top_p", 10);
    EXPECT_BAD(p.top_p = NAN, "top_p", 10);
    EXPECT_BAD(p.min_p = -0.01f, "min_p", 10);
    EXPECT_BAD(p.min_p = 1.5f, "min_p", 10);
    EXPECT_BAD(p.min_p = NAN, "min_p", 10);
    EXPECT_BAD(p.repeat_penalty = 0.0f, "repeat_penalty", 10);
    EXPECT_BAD(p.repeat_penalty = -1.0f, "repeat_penalty", 10);
    EXPECT_BAD(p.repeat_penalty = NAN, "repeat_penalty", 10);
    EXPECT_BAD(p.repeat_penalty = INFINITY, "repeat_penalty", 10);
    EXPECT_BAD(p.repeat_last_n = -1, "repeat_last_n", 10);
    EXPECT_BAD(p.repeat_last_n = INT32_MAX, "repeat_last_n", 10);
    EXPECT_BAD((void)0, "n_vocab", 0);
    EXPECT_BAD((void)0, "n_vocab", (1u << 24) + 1);
    EXPECT_BAD(p.struct_size = 0, "params", 10);
#undef EXPECT_BAD

    /* edges that are valid */
    moerun_sampler_params_init(&p);
    p.top_p = 1.0f;
    p.min_p = 1.0f;
    p.temp = -3.0f;
    p.repeat_last_n = 0;
    p.top_k = INT32_MAX;
    s = make(&p, 1);
    float one = 0.5f;
    assert_int_equal(moerun_sampler_sample(s, &one), 0);
    moerun_sampler_accept(s, 0); /* window 0: nothing recorded, no crash */
    moerun_sampler_destroy(s);

    assert_int_equal(moerun_sampler_create(NULL, 10, NULL), MOERUN_ERR_INVALID_ARG);
    assert_int_equal(moerun_sampler_sample(NULL, &one), MOERUN_ERR_INVALID_ARG);
    s = make(NULL, 4);
    assert_int_equal(moerun_sampler_sample(s, NULL), MOERUN_ERR_INVALID_ARG);
    moerun_sampler_destroy(s);
    moerun_sampler_accept(NULL, 1);
    moerun_sampler_reset(NULL);
}

static void test_greedy(void **state) {
    (void)state;
    enum { N = 3000 };
    float *l = malloc(N * sizeof(float));
    assert_non_null(l);
    for (int trial = 0; trial < 20; trial++) {
        moerun_sampler_params p = plain_params(trial % 2 ? 0.0f : -1.0f);
        p.top_k = (int32_t)(tu_rng_u64(&rng) % 50); /* filters do not matter to greedy */
        moerun_sampler *s = make(&p, N);
        tu_fill_normal(&rng, l, N, 3.0f);
        uint32_t best = 0;
        for (uint32_t i = 1; i < N; i++)
            best = l[i] > l[best] ? i : best;
        assert_int_equal(moerun_sampler_sample(s, l), (int32_t)best);
        /* ties: the same maximum at two (three) places picks the lowest id */
        uint32_t a = (uint32_t)(tu_rng_u64(&rng) % N), b = (uint32_t)(tu_rng_u64(&rng) % N);
        l[a] = l[b] = l[best] + 1.0f;
        l[N - 1] = l[a];
        assert_int_equal(moerun_sampler_sample(s, l), (int32_t)(a < b ? a : b));
        moerun_sampler_destroy(s);
    }
    /* greedy applies the repetition penalty first */
    moerun_sampler_params p = plain_params(0.0f);
    p.repeat_penalty = 1.5f;
    moerun_sampler *s = make(&p, 4);
    float g[4] = {1.0f, 2.0f, 1.9f, -5.0f};
    assert_int_equal(moerun_sampler_sample(s, g), 1);
    moerun_sampler_accept(s, 1); /* 2.0 / 1.5 < 1.9 */
    assert_int_equal(moerun_sampler_sample(s, g), 2);
    moerun_sampler_accept(s, 2); /* 1.9 / 1.5 = 1.27 > 1.0: still 1 vs 2: 1.33 > 1.27 */
    assert_int_equal(moerun_sampler_sample(s, g), 1);
    moerun_sampler_destroy(s);
    free(l);
}

static void test_seed_and_reset(void **state) {
    (void)state;
    enum { N = 200, DRAWS = 300 };
    float *l = malloc(N * sizeof(float));
    int32_t *seq = malloc(DRAWS * sizeof(int32_t));
    assert_non_null(l);
    assert_non_null(seq);
    tu_fill_normal(&rng, l, N, 0.5f);
    moerun_sampler_params p;
    moerun_sampler_params_init(&p);
    p.top_k = 100;
    p.top_p = 0.99f;
    p.min_p = 0.01f;
    p.temp = 1.2f;
    p.repeat_penalty = 1.3f;
    p.repeat_last_n = 16;
    p.seed = tu_rng_u64(&rng) >> 1;
    moerun_sampler *a = make(&p, N), *b = make(&p, N);
    p.seed ^= 1;
    moerun_sampler *c = make(&p, N);
    int same_c = 0;
    for (int i = 0; i < DRAWS; i++) {
        int32_t ta = moerun_sampler_sample(a, l);
        int32_t tb = moerun_sampler_sample(b, l);
        int32_t tc = moerun_sampler_sample(c, l);
        assert_true(ta >= 0 && tc >= 0);
        assert_int_equal(ta, tb);
        same_c += ta == tc;
        seq[i] = ta;
        moerun_sampler_accept(a, ta);
        moerun_sampler_accept(b, tb);
        moerun_sampler_accept(c, tc);
    }
    assert_true(same_c < DRAWS / 4);
    /* reset: the same seed and an empty history repeat the run exactly */
    moerun_sampler_reset(a);
    for (int i = 0; i < DRAWS; i++) {
        int32_t t = moerun_sampler_sample(a, l);
        assert_int_equal(t, seq[i]);
        moerun_sampler_accept(a, t);
    }
    /* the logits are not modified */
    float *copy = malloc(N * sizeof(float));
    assert_non_null(copy);
    memcpy(copy, l, N * sizeof(float));
    moerun_sampler_sample(a, l);
    assert_memory_equal(copy, l, N * sizeof(float));
    free(copy);
    moerun_sampler_destroy(a);
    moerun_sampler_destroy(b);
    moerun_sampler_destroy(c);
    free(seq);
    free(l);
}

static void test_matches_softmax(void **state) {
    (void)state;
    enum { N = 24, DRAWS = 200000 };
    float l[N];
    double prob[N];
    uint32_t counts[N];
    tu_fill_normal(&rng, l, N, 1.0f);
    l[3] = -INFINITY; /* never drawn */
    moerun_sampler_params p = plain_params(1.0f);
    moerun_sampler *s = make(&p, N);
    draw_counts(s, l, N, DRAWS, counts);
    softmax_ref(l, N, 1.0, prob);
    double chi2 = 0.0;
    int dof = -1;
    for (int i = 0; i < N; i++) {
        if (prob[i] == 0.0) {
            assert_int_equal(counts[i], 0);
            continue;
        }
        double e = prob[i] * DRAWS;
        chi2 += ((double)counts[i] - e) * ((double)counts[i] - e) / e;
        dof++;
    }
    /* mean dof (22), sd sqrt(2 dof) ~ 6.6: 8 sd above the mean fails about never by chance, while a
     * wrong distribution (e.g. temp applied twice) gives thousands */
    assert_true(chi2 < dof + 8.0 * sqrt(2.0 * dof));
    moerun_sampler_destroy(s);
}

static void test_top_k(void **state) {
    (void)state;
    enum { N = 2000, DRAWS = 4000 };
    float *l = malloc(N * sizeof(float));
    uint32_t *counts = malloc(N * sizeof(uint32_t));
    assert_non_null(l);
    assert_non_null(counts);
    for (int trial = 0; trial < 6; trial++) {
        tu_fill_normal(&rng, l, N, 2.0f);
        if (trial == 1) { /* ties at the boundary: lower ids win */
            for (int i = 0; i < N; i++)
                l[i] = (float)(i % 7);
        }
        uint32_t *ord = order_ref(l, N);
        const int32_t k = trial == 0 ? 1 : 1 + (int32_t)(tu_rng_u64(&rng) % 12);
        moerun_sampler_params p = plain_params(k == 1 ? 1.0f : 50.0f); /* flat within the k */
        p.top_k = k;
        moerun_sampler *s = make(&p, N);
        draw_counts(s, l, N, DRAWS, counts);
        for (int32_t r = 0; r < N; r++) {
            if (r < k)
                assert_true(counts[ord[r]] > 0); /* every kept token is reached */
            else
                assert_int_equal(counts[ord[r]], 0); /* never outside the k */
        }
        moerun_sampler_destroy(s);
        free(ord);
    }
    /* top-k = 1 is greedy at any temperature */
    for (int trial = 0; trial < 50; trial++) {
        tu_fill_normal(&rng, l, N, 1.0f);
        uint32_t best = 0;
        for (uint32_t i = 1; i < N; i++)
            best = l[i] > l[best] ? i : best;
        moerun_sampler_params p = plain_params(5.0f);
        p.top_k = 1;
        moerun_sampler *s = make(&p, N);
        assert_int_equal(moerun_sampler_sample(s, l), (int32_t)best);
        moerun_sampler_destroy(s);
    }
    free(counts);
    free(l);
}

/* Number of tokens top-p keeps for p (float64 reference: smallest prefix with cum >= p). */
static uint32_t top_p_ref(const float *l, const uint32_t *ord, uint32_t n, double *prob, double p) {
    softmax_ref(l, n, 1.0, prob);
    double cum = 0.0;
    for (uint32_t r = 0; r < n; r++) {
        cum += prob[ord[r]];
        if (cum >= p)
            return r + 1;
    }
    return n;
}

static void test_top_p(void **state) {
    (void)state;
    const uint32_t sizes[] = {50, 3000, 3000, 8000};
    for (size_t trial = 0; trial < sizeof(sizes) / sizeof(sizes[0]); trial++) {
        const uint32_t n = sizes[trial];
        float *l = malloc(n * sizeof(float));
        double *prob = malloc(n * sizeof(double));
        uint32_t *counts = malloc(n * sizeof(uint32_t));
        assert_true(l && prob && counts);
        /* trial 1: peaked (the kept set fits the first 256); 2, 3: flat (it does not) */
        tu_fill_normal(&rng, l, n, trial == 1 ? 4.0f : 0.3f);
        uint32_t *ord = order_ref(l, n);
        softmax_ref(l, n, 1.0, prob);
        /* p halfway between two cumulative sums, so rounding cannot move the boundary */
        uint32_t want = trial == 0 ? 1 + (uint32_t)(tu_rng_u64(&rng) % (n - 2))
                                   : (trial == 1 ? 12 : (trial == 2 ? 600 : 5000));
        double cum_prev = 0.0;
        for (uint32_t r = 0; r + 1 < want; r++)
            cum_prev += prob[ord[r]];
        double cum_at = cum_prev + prob[ord[want - 1]];
        double top_p = 0.5 * (cum_prev + cum_at);
        assert_int_equal(top_p_ref(l, ord, n, prob, top_p), want);
        moerun_sampler_params p = plain_params(100.0f); /* near flat over the kept set */
        p.top_p = (float)top_p;
        /* float rounding of p may only move it within (cum_prev, cum_at] */
        assert_true((double)p.top_p > cum_prev && (double)p.top_p <= cum_at);
        moerun_sampler *s = make(&p, n);
        const int draws = want <= 50 ? 3000 : (n > 5000 ? 600 : 2000);
        draw_counts(s, l, n, draws, counts);
        uint32_t reached = 0;
        for (uint32_t r = 0; r < n; r++) {
            if (r >= want)
                assert_int_equal(counts[ord[r]], 0);
            else
                reached += counts[ord[r]] > 0;
        }
        if (want <= 50)
            assert_int_equal(reached, want);
        else
            assert_true(reached > (want < (uint32_t)draws ? want : (uint32_t)draws) / 2);
        moerun_sampler_destroy(s);

        /* a tiny p keeps only the most likely token */
        p.top_p = 1e-7f;
        s = make(&p, n);
        for (int i = 0; i < 20; i++)
            assert_int_equal(moerun_sampler_sample(s, l), (int32_t)ord[0]);
        moerun_sampler_destroy(s);
        free(ord);
        free(counts);
        free(prob);
        free(l);
    }
}

static void test_min_p(void **state) {
    (void)state;
    enum { N = 400, DRAWS = 6000 };
    float l[N];
    uint32_t counts[N];
    for (int trial = 0; trial < 5; trial++) {
        tu_fill_normal(&rng, l, N, 2.0f);
        uint32_t *ord = order_ref(l, N);
        /* min_p so that exactly `want` tokens satisfy p >= min_p * p_max: threshold in log
         * space halfway between two neighbours */
        uint32_t want = 1 + (uint32_t)(tu_rng_u64(&rng) % 30);
        double gap_hi = (double)l[ord[want - 1]] - l[ord[0]];
        double gap_lo = (double)l[ord[want]] - l[ord[0]];
        if (gap_hi - gap_lo < 1e-3) { /* too close to call in float: skip this draw */
            free(ord);
            continue;
        }
        moerun_sampler_params p = plain_params(100.0f);
        p.min_p = (float)exp(0.5 * (gap_hi + gap_lo));
        moerun_sampler *s = make(&p, N);
        draw_counts(s, l, N, DRAWS, counts);
        for (uint32_t r = 0; r < N; r++) {
            if (r < want)
                assert_true(counts[ord[r]] > 0);
            else
                assert_int_equal(counts[ord[r]], 0);
        }
        moerun_sampler_destroy(s);
        /* min_p = 1 keeps only the maximum */
        p.min_p = 1.0f;
        s = make(&p, N);
        for (int i = 0; i < 20; i++)
            assert_int_equal(moerun_sampler_sample(s, l), (int32_t)ord[0]);
        moerun_sampler_destroy(s);
        free(ord);
    }
}

static void test_temperature_entropy(void **state) {
    (void)state;
    enum { N = 32, DRAWS = 40000 };
    float l[N];
    uint32_t counts[N];
    double prob[N];
    tu_fill_normal(&rng, l, N, 2.0f);
    const float temps[] = {0.25f, 0.5f, 1.0f, 2.0f, 4.0f};
    double prev = -1.0;
    for (size_t i = 0; i < sizeof(temps) / sizeof(temps[0]); i++) {
        moerun_sampler_params p = plain_params(temps[i]);
        moerun_sampler *s = make(&p, N);
        draw_counts(s, l, N, DRAWS, counts);
        double h = entropy_of(counts, N, DRAWS);
        /* and close to the entropy of softmax(l / t) */
        softmax_ref(l, N, temps[i], prob);
        double h_ref = 0.0;
        for (int j = 0; j < N; j++)
            h_ref -= prob[j] > 0 ? prob[j] * log(prob[j]) : 0.0;
        assert_true(fabs(h - h_ref) < 0.05);
        assert_true(h > prev);
        prev = h;
        moerun_sampler_destroy(s);
    }
}

static void test_repeat_penalty(void **state) {
    (void)state;
    enum { N = 8, DRAWS = 100000 };
    float l[N];
    uint32_t counts[N];
    double prob[N];
    const float base = 0.5f + (float)tu_rng_uniform(&rng); /* all equal, positive */
    for (int i = 0; i < N; i++)
        l[i] = base;
    l[5] = -base; /* a negative logit: multiplied */
    moerun_sampler_params p = plain_params(1.0f);
    p.repeat_penalty = 2.0f;
    p.repeat_last_n = 4;
    moerun_sampler *s = make(&p, N);

    /* expected frequencies with tokens 3 and 5 penalised once each */
    float lp[N];
    memcpy(lp, l, sizeof(l));
    lp[3] = base / 2.0f;
    lp[5] = -base * 2.0f;
    softmax_ref(lp, N, 1.0, prob);

    moerun_sampler_accept(s, 3);
    moerun_sampler_accept(s, 3); /* repeats in the window count once */
    moerun_sampler_accept(s, 5);
    moerun_sampler_accept(s, -1); /* out of range: ignored */
    moerun_sampler_accept(s, N);
    draw_counts(s, l, N, DRAWS, counts);
    for (int i = 0; i < N; i++) {
        double e = prob[i] * DRAWS, sd = sqrt(prob[i] * (1.0 - prob[i]) * DRAWS);
        assert_true(fabs((double)counts[i] - e) < 5.0 * sd + 1.0);
    }
    assert_true(counts[3] < counts[0]);

    /* four more tokens push 3 and 5 out of the window of 4: back to the plain softmax */
    for (int t = 0; t < 4; t++)
        moerun_sampler_accept(s, t == 3 ? 7 : t); /* 0, 1, 2, 7 */
    memcpy(lp, l, sizeof(l));
    for (int t = 0; t < 3; t++)
        lp[t] = base / 2.0f;
    lp[7] = base / 2.0f;
    softmax_ref(lp, N, 1.0, prob);
    draw_counts(s, l, N, DRAWS, counts);
    for (int i = 0; i < N; i++) {
        double e = prob[i] * DRAWS, sd = sqrt(prob[i] * (1.0 - prob[i]) * DRAWS);
        assert_true(fabs((double)counts[i] - e) < 5.0 * sd + 1.0);
    }
    assert_true(counts[3] > counts[0]);

    /* reset forgets the history */
    moerun_sampler_reset(s);
    softmax_ref(l, N, 1.0, prob);
    draw_counts(s, l, N, DRAWS, counts);
    for (int i = 0; i < N; i++) {
        double e = prob[i] * DRAWS, sd = sqrt(prob[i] * (1.0 - prob[i]) * DRAWS);
        assert_true(fabs((double)counts[i] - e) < 5.0 * sd + 1.0);
    }
    moerun_sampler_destroy(s);
}

static void test_nonfinite(void **state) {
    (void)state;
    enum { N = 64 };
    float l[N];
    uint32_t counts[N];
    for (int temp_i = 0; temp_i < 2; temp_i++) {
        moerun_sampler_params p = plain_params(temp_i ? 1.0f : 0.0f);
        moerun_sampler *s = make(&p, N);
        /* NaN is -inf: never chosen, even where it would be the largest */
        tu_fill_normal(&rng, l, N, 1.0f);
        for (int i = 0; i < N; i += 3)
            l[i] = NAN;
        draw_counts(s, l, N, 5000, counts);
        for (int i = 0; i < N; i += 3)
            assert_int_equal(counts[i], 0);
        /* everything NaN or -inf: an error */
        for (int i = 0; i < N; i++)
            l[i] = i % 2 ? NAN : -INFINITY;
        assert_int_equal(moerun_sampler_sample(s, l), MOERUN_ERR_INVALID_ARG);
        for (int i = 0; i < N; i++)
            l[i] = NAN;
        assert_int_equal(moerun_sampler_sample(s, l), MOERUN_ERR_INVALID_ARG);
        /* one finite logit among NaNs is the answer */
        l[41] = -1e30f;
        assert_int_equal(moerun_sampler_sample(s, l), 41);
        /* +inf wins over every finite logit; two +inf share */
        tu_fill_normal(&rng, l, N, 1.0f);
        l[17] = INFINITY;
        l[9] = NAN;
        assert_int_equal(moerun_sampler_sample(s, l), 17);
        l[50] = INFINITY;
        draw_counts(s, l, N, 400, counts);
        assert_int_equal(counts[17] + counts[50], 400);
        if (temp_i)
            assert_true(counts[17] > 0 && counts[50] > 0);
        else
            assert_int_equal(counts[17], 400);
        moerun_sampler_destroy(s);
    }
}

static void test_large_vocab(void **state) {
    (void)state;
    enum { N = 150000, DRAWS = 200 };
    float *l = malloc(N * sizeof(float));
    double *prob = malloc(N * sizeof(double));
    assert_true(l && prob);
    tu_fill_normal(&rng, l, N, 3.0f);
    uint32_t *ord = order_ref(l, N);
    uint32_t *rank = malloc(N * sizeof(uint32_t));
    assert_non_null(rank);
    for (uint32_t r = 0; r < N; r++)
        rank[ord[r]] = r;

    /* the defaults: repetition penalty on as well, the tokens fed back */
    moerun_sampler_params p;
    moerun_sampler_params_init(&p);
    p.seed = tu_rng_u64(&rng) >> 1;
    p.repeat_penalty = 1.1f;
    moerun_sampler *s = make(&p, N);
    for (int i = 0; i < DRAWS; i++) {
        int32_t t = moerun_sampler_sample(s, l);
        assert_true(t >= 0 && t < N);
        assert_true(rank[t] < 40 + 64); /* the penalty can lift at most 64 others into the 40 */
        moerun_sampler_accept(s, t);
    }
    moerun_sampler_destroy(s);

    /* top-k off, top-p on: a sort of the whole vocabulary may be needed */
    p = plain_params(1.0f);
    p.top_p = 0.9f;
    uint32_t want = top_p_ref(l, ord, N, prob, 0.9);
    s = make(&p, N);
    for (int i = 0; i < DRAWS / 10; i++) {
        int32_t t = moerun_sampler_sample(s, l);
        assert_true(t >= 0 && rank[t] < want + 2); /* +2: p rounded to float */
    }
    moerun_sampler_destroy(s);
    free(rank);
    free(ord);
    free(prob);
    free(l);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_invalid_params),
        cmocka_unit_test(test_greedy),
        cmocka_unit_test(test_seed_and_reset),
        cmocka_unit_test(test_matches_softmax),
        cmocka_unit_test(test_top_k),
        cmocka_unit_test(test_top_p),
        cmocka_unit_test(test_min_p),
        cmocka_unit_test(test_temperature_entropy),
        cmocka_unit_test(test_repeat_penalty),
        cmocka_unit_test(test_nonfinite),
        cmocka_unit_test(test_large_vocab),
    };
    return cmocka_run_group_tests(tests, setup_rng, NULL);
}
