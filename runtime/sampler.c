/* Sampler: repetition penalty -> top-k -> top-p -> min-p -> temperature -> seeded draw, the
 * order of llama.cpp's default chain; greedy (argmax after the penalty) when temp <= 0.
 *
 * All buffers are sized for n_vocab in create, so sampling allocates nothing. Candidates are
 * (logit, id) pairs ordered by logit descending, then id ascending (a total order, so every
 * selection and sort is deterministic). Top-k selects with a bounded heap (O(n log k)); top-p
 * without top-k first sorts only the best 256 and falls back to a full sort when those do not
 * reach p. Probabilities are computed in double. The random source is xoshiro256** seeded
 * through splitmix64, so a seed gives the same tokens on every machine. */
#include "internal.h"

#include <float.h>
#include <math.h>
#include <string.h>
#include <time.h>

#if defined(__linux__)
#include <sys/random.h>
#endif

#define SAMPLER_MAX_VOCAB     (1u << 24)
#define SAMPLER_MAX_LAST_N    (1 << 20)
#define SAMPLER_TOP_P_PREFIX  256  /* top-p without top-k: sort this many first */
#define SAMPLER_TOP_P_PARTIAL 1024 /* ... when there are more candidates than this */

struct sampler_cand {
    float logit;
    uint32_t id;
};

struct moerun_sampler {
    moerun_sampler_params params; /* validated copy */
    uint32_t n_vocab;
    uint64_t seed;             /* the seed in use (drawn once for MOERUN_SEED_RANDOM) */
    uint64_t rng[4];           /* xoshiro256** state */
    struct sampler_cand *cand; /* [n_vocab] working candidates */
    double *weight;            /* [n_vocab] unnormalised probabilities of the candidates */
    uint8_t *seen;             /* [n_vocab] marks while applying the penalty; all zero between */
    int32_t *hist;             /* [repeat_last_n] ring of accepted tokens */
    uint32_t hist_len;         /* valid entries in hist */
    uint32_t hist_pos;         /* next slot to write */
};

/* ---- random numbers ----------------------------------------------------------------------- */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void rng_seed(uint64_t s[4], uint64_t seed) {
    for (int i = 0; i < 4; i++)
        s[i] = splitmix64(&seed);
}

static uint64_t rotl64(uint64_t x, int k) {
    return (x << k) | (x >> (64 - k));
}

static uint64_t rng_next(uint64_t s[4]) {
    const uint64_t result = rotl64(s[1] * 5, 7) * 9;
    const uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return result;
}

/* [0, 1) with 53 random bits */
static double rng_uniform(uint64_t s[4]) {
    return (double)(rng_next(s) >> 11) * 0x1.0p-53;
}

static uint64_t draw_random_seed(const void *salt) {
    uint64_t v = 0;
#if defined(__linux__)
    if (getrandom(&v, sizeof(v), GRND_NONBLOCK) == (ssize_t)sizeof(v))
        return v;
#endif
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t x = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    x ^= (uint64_t)(uintptr_t)salt;
    return splitmix64(&x);
}

/* ---- candidate ordering ------------------------------------------------------------------- */

/* a comes before b: larger logit, then smaller id */
static bool cand_before(const struct sampler_cand *a, const struct sampler_cand *b) {
    return a->logit > b->logit || (a->logit == b->logit && a->id < b->id);
}

static void cand_swap(struct sampler_cand *a, struct sampler_cand *b) {
    struct sampler_cand t = *a;
    *a = *b;
    *b = t;
}

/* Heap whose root is the candidate that comes last (the worst kept). */
static void heap_sift_down(struct sampler_cand *h, size_t n, size_t i) {
    for (;;) {
        size_t l = 2 * i + 1, worst = i;
        if (l < n && cand_before(&h[worst], &h[l]))
            worst = l;
        if (l + 1 < n && cand_before(&h[worst], &h[l + 1]))
            worst = l + 1;
        if (worst == i)
            return;
        cand_swap(&h[i], &h[worst]);
        i = worst;
    }
}

/* Move the best k of c[0..n) to c[0..k), in order (best first); the rest stay in c[k..n).
 * 1 <= k <= n. O(n log k). */
static void cand_select_sorted(struct sampler_cand *c, size_t n, size_t k) {
    for (size_t i = k / 2; i-- > 0;)
        heap_sift_down(c, k, i);
    for (size_t i = k; i < n; i++) {
        if (cand_before(&c[i], &c[0])) {
            cand_swap(&c[i], &c[0]);
            heap_sift_down(c, k, 0);
        }
    }
    /* heapsort: moving the worst to the end leaves the best first */
    for (size_t m = k; m > 1; m--) {
        cand_swap(&c[0], &c[m - 1]);
        heap_sift_down(c, m - 1, 0);
    }
}

/* ---- public API --------------------------------------------------------------------------- */

void moerun_sampler_params_init(moerun_sampler_params *p) {
    if (!p)
        return;
    memset(p, 0, sizeof(*p));
    p->struct_size = sizeof(*p);
    p->temp = 0.8f;
    p->top_k = 40;
    p->top_p = 0.95f;
    p->min_p = 0.05f;
    p->repeat_penalty = 1.0f;
    p->repeat_last_n = 64;
    p->seed = MOERUN_SEED_RANDOM;
}

static int check_params(const moerun_sampler_params *p, uint32_t n_vocab) {
    if (!isfinite(p->temp))
        return mr_err(MOERUN_ERR_INVALID_ARG, "sampler: temp must be finite (got %g)",
                      (double)p->temp);
    if (p->top_k < 0)
        return mr_err(MOERUN_ERR_INVALID_ARG, "sampler: top_k must be >= 0 (got %d)",
                      (int)p->top_k);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return mr_err(MOERUN_ERR_INVALID_ARG, "sampler: top_p must be in (0, 1] (got %g)",
                      (double)p->top_p);
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f))
        return mr_err(MOERUN_ERR_INVALID_ARG, "sampler: min_p must be in [0, 1] (got %g)",
                      (double)p->min_p);
    if (!(p->repeat_penalty > 0.0f) || !isfinite(p->repeat_penalty))
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "sampler: repeat_penalty must be finite and > 0 (got %g)",
                      (double)p->repeat_penalty);
    if (p->repeat_last_n < 0 || p->repeat_last_n > SAMPLER_MAX_LAST_N)
        return mr_err(MOERUN_ERR_INVALID_ARG, "sampler: repeat_last_n must be in [0, %d] (got %d)",
                      SAMPLER_MAX_LAST_N, (int)p->repeat_last_n);
    if (n_vocab < 1 || n_vocab > SAMPLER_MAX_VOCAB)
        return mr_err(MOERUN_ERR_INVALID_ARG, "sampler: n_vocab must be in [1, %u] (got %u)",
                      SAMPLER_MAX_VOCAB, n_vocab);
    return MOERUN_OK;
}

int moerun_sampler_create(const moerun_sampler_params *params, uint32_t n_vocab,
                          moerun_sampler **out) {
    mr_err_clear();
    if (!out)
        return mr_err(MOERUN_ERR_INVALID_ARG, "moerun_sampler_create: out is NULL");
    *out = NULL;
    moerun_sampler_params p;
    moerun_sampler_params_init(&p);
    int rc = mr_params_merge(&p, sizeof(p), params, "moerun_sampler_create");
    if (rc == MOERUN_OK)
        rc = check_params(&p, n_vocab);
    if (rc != MOERUN_OK)
        return rc;

    moerun_sampler *s = mr_calloc(NULL, 1, sizeof(*s));
    if (!s)
        return mr_err(MOERUN_ERR_NOMEM, "sampler: out of memory");
    s->params = p;
    s->n_vocab = n_vocab;
    s->cand = mr_calloc(NULL, n_vocab, sizeof(*s->cand));
    s->weight = mr_calloc(NULL, n_vocab, sizeof(*s->weight));
    s->seen = mr_calloc(NULL, n_vocab, sizeof(*s->seen));
    if (p.repeat_last_n > 0)
        s->hist = mr_calloc(NULL, (size_t)p.repeat_last_n, sizeof(*s->hist));
    if (!s->cand || !s->weight || !s->seen || (p.repeat_last_n > 0 && !s->hist)) {
        moerun_sampler_destroy(s);
        return mr_err(MOERUN_ERR_NOMEM, "sampler: out of memory for a vocabulary of %u", n_vocab);
    }
    s->seed = p.seed == MOERUN_SEED_RANDOM ? draw_random_seed(s) : p.seed;
    rng_seed(s->rng, s->seed);
    *out = s;
    return MOERUN_OK;
}

void moerun_sampler_destroy(moerun_sampler *s) {
    if (!s)
        return;
    mr_free(NULL, s->hist);
    mr_free(NULL, s->seen);
    mr_free(NULL, s->weight);
    mr_free(NULL, s->cand);
    mr_free(NULL, s);
}

void moerun_sampler_accept(moerun_sampler *s, int32_t token) {
    if (!s || token < 0 || (uint32_t)token >= s->n_vocab || s->params.repeat_last_n <= 0)
        return;
    uint32_t cap = (uint32_t)s->params.repeat_last_n;
    s->hist[s->hist_pos] = token;
    s->hist_pos = s->hist_pos + 1 == cap ? 0 : s->hist_pos + 1;
    if (s->hist_len < cap)
        s->hist_len++;
}

void moerun_sampler_reset(moerun_sampler *s) {
    if (!s)
        return;
    s->hist_len = 0;
    s->hist_pos = 0;
    rng_seed(s->rng, s->seed);
}

/* Fill cand[0..n_vocab) in id order: NaN -> -inf, +inf -> FLT_MAX, then the penalty once per
 * distinct recent token (finite logits stay finite). */
static void load_logits(moerun_sampler *s, const float *logits) {
    struct sampler_cand *c = s->cand;
    for (uint32_t i = 0; i < s->n_vocab; i++) {
        float l = logits[i];
        if (isnan(l))
            l = -INFINITY;
        else if (l == INFINITY)
            l = FLT_MAX;
        c[i].logit = l;
        c[i].id = i;
    }
    const float pen = s->params.repeat_penalty;
    if (pen == 1.0f || s->hist_len == 0)
        return;
    for (uint32_t j = 0; j < s->hist_len; j++) {
        int32_t t = s->hist[j];
        if (s->seen[t])
            continue;
        s->seen[t] = 1;
        float l = c[t].logit;
        if (l == -INFINITY)
            continue;
        l = l > 0.0f ? l / pen : l * pen;
        c[t].logit = fmaxf(-FLT_MAX, fminf(FLT_MAX, l));
    }
    for (uint32_t j = 0; j < s->hist_len; j++)
        s->seen[s->hist[j]] = 0;
}

/* Keep the smallest best-first prefix whose probability reaches top_p (at least one). Returns
 * the new count; c[0..result) is sorted on return. */
static size_t apply_top_p(struct sampler_cand *c, size_t n, bool sorted, double top_p) {
    double max = c[0].logit;
    if (!sorted) {
        for (size_t i = 1; i < n; i++)
            max = fmax(max, (double)c[i].logit);
    }
    double sum = 0.0;
    for (size_t i = 0; i < n; i++)
        sum += exp((double)c[i].logit - max);
    const double target = top_p * sum;
    size_t m = n;
    if (!sorted && n > SAMPLER_TOP_P_PARTIAL) {
        m = SAMPLER_TOP_P_PREFIX;
        cand_select_sorted(c, n, m);
    } else if (!sorted) {
        cand_select_sorted(c, n, n);
    }
    double cum = 0.0;
    for (size_t i = 0; i < m; i++) {
        cum += exp((double)c[i].logit - max);
        if (cum >= target)
            return i + 1;
    }
    if (m < n) { /* the prefix was not enough: sort the rest too and go on */
        cand_select_sorted(c + m, n - m, n - m);
        for (size_t i = m; i < n; i++) {
            cum += exp((double)c[i].logit - max);
            if (cum >= target)
                return i + 1;
        }
    }
    return n; /* rounding kept the sum just under p: keep everything */
}

int32_t moerun_sampler_sample(moerun_sampler *s, const float *logits) {
    if (!s || !logits)
        return mr_err(MOERUN_ERR_INVALID_ARG, "moerun_sampler_sample: NULL %s",
                      !s ? "sampler" : "logits");
    const moerun_sampler_params *p = &s->params;
    struct sampler_cand *c = s->cand;
    load_logits(s, logits);

    if (p->temp <= 0.0f) { /* greedy: the first best, so the lowest id on ties */
        uint32_t best = 0;
        for (uint32_t i = 1; i < s->n_vocab; i++) {
            if (c[i].logit > c[best].logit)
                best = i;
        }
        if (c[best].logit == -INFINITY)
            return mr_err(MOERUN_ERR_INVALID_ARG, "sampler: every logit is -inf or NaN");
        return (int32_t)best;
    }

    /* candidates: the finite logits, still in id order */
    size_t n = 0;
    for (uint32_t i = 0; i < s->n_vocab; i++) {
        if (c[i].logit != -INFINITY)
            c[n++] = c[i];
    }
    if (n == 0)
        return mr_err(MOERUN_ERR_INVALID_ARG, "sampler: every logit is -inf or NaN");
    bool sorted = false;

    if (p->top_k > 0 && (size_t)p->top_k < n) {
        cand_select_sorted(c, n, (size_t)p->top_k);
        n = (size_t)p->top_k;
        sorted = true;
    }
    if (p->top_p < 1.0f && n > 1) {
        n = apply_top_p(c, n, sorted, p->top_p);
        sorted = true;
    }
    if (p->min_p > 0.0f && n > 1) { /* p_i >= min_p * p_max  <=>  l_i - l_max >= log(min_p) */
        double max = c[0].logit;
        if (!sorted) {
            for (size_t i = 1; i < n; i++)
                max = fmax(max, (double)c[i].logit);
        }
        const double floor_l = log((double)p->min_p);
        size_t kept = 0;
        for (size_t i = 0; i < n; i++) {
            if ((double)c[i].logit - max >= floor_l)
                c[kept++] = c[i]; /* keeps the order, so sorted stays true */
        }
        n = kept; /* the maximum itself always passes */
    }

    /* temperature, softmax, draw */
    double max = c[0].logit;
    for (size_t i = 1; i < n; i++)
        max = fmax(max, (double)c[i].logit);
    const double inv_t = 1.0 / (double)p->temp;
    double sum = 0.0;
    for (size_t i = 0; i < n; i++) {
        double w = exp(((double)c[i].logit - max) * inv_t);
        s->weight[i] = w;
        sum += w;
    }
    const double u = rng_uniform(s->rng) * sum;
    double cum = 0.0;
    size_t pick = n;
    for (size_t i = 0; i < n; i++) {
        cum += s->weight[i];
        if (u < cum) {
            pick = i;
            break;
        }
    }
    if (pick == n) { /* rounding: u landed on the total; take the last with weight */
        pick = n - 1;
        while (pick > 0 && s->weight[pick] == 0.0)
            pick--;
    }
    return (int32_t)c[pick].id;
}
