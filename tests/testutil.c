#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

uint64_t tu_seed(void) {
    static uint64_t seed;
    static int have;
    if (!have) {
        const char *env = getenv("MOERUN_TEST_SEED");
        if (env && *env) {
            seed = strtoull(env, NULL, 0);
        } else {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            seed = (uint64_t)ts.tv_sec * 1000000007ull ^ (uint64_t)ts.tv_nsec ^
                   ((uint64_t)getpid() << 32);
        }
        have = 1;
        fprintf(stderr, "test seed: MOERUN_TEST_SEED=%llu\n", (unsigned long long)seed);
    }
    return seed;
}

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void tu_rng_init(struct tu_rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&seed);
}

static uint64_t rotl(uint64_t x, int k) {
    return (x << k) | (x >> (64 - k));
}

uint64_t tu_rng_u64(struct tu_rng *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double tu_rng_uniform(struct tu_rng *r) {
    return (double)(tu_rng_u64(r) >> 11) * 0x1.0p-53;
}

double tu_rng_normal(struct tu_rng *r) {
    double u1 = tu_rng_uniform(r), u2 = tu_rng_uniform(r);
    if (u1 < 1e-300)
        u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

void tu_fill_normal(struct tu_rng *r, float *x, size_t n, float scale) {
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(tu_rng_normal(r) * scale);
}

struct tu_rng tu_main_rng;

int tu_rng_setup(void **state) {
    (void)state;
    tu_rng_init(&tu_main_rng, tu_seed());
    return 0;
}

uint32_t tu_rnd(uint32_t n) {
    return (uint32_t)(tu_rng_u64(&tu_main_rng) % n);
}

void tu_random_set(uint32_t n_all, uint32_t n, int32_t *set) {
    int32_t all[64];
    for (uint32_t i = 0; i < n_all; i++)
        all[i] = (int32_t)i;
    for (uint32_t i = 0; i < n; i++) { /* a partial Fisher-Yates shuffle */
        uint32_t j = i + tu_rnd(n_all - i);
        int32_t t = all[i];
        all[i] = all[j];
        all[j] = t;
        set[i] = all[i];
    }
}

bool tu_contains(const char *hay, const char *needle) {
    return hay && strstr(hay, needle) != NULL;
}

double tu_rel_l2(const float *a, const double *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += b[i] * b[i];
    }
    if (den == 0)
        return num == 0 ? 0 : INFINITY;
    return sqrt(num / den);
}

double tu_max_rel_l2(const float *a, const double *b, size_t rows, size_t n) {
    double worst = 0;
    for (size_t r = 0; r < rows; r++) {
        const double e = tu_rel_l2(a + r * n, b + r * n, n);
        worst = e > worst || isnan(e) ? e : worst;
    }
    return worst;
}

double tu_max_rel_l2_ff(const float *a, const float *b, size_t rows, size_t n) {
    double worst = 0;
    double *bd = malloc(n * sizeof(double));
    assert_non_null(bd);
    for (size_t r = 0; r < rows; r++) {
        for (size_t i = 0; i < n; i++)
            bd[i] = b[r * n + i];
        const double e = tu_rel_l2(a + r * n, bd, n);
        worst = e > worst || isnan(e) ? e : worst;
    }
    free(bd);
    return worst;
}

const char *tu_shared_path(const char *rel) {
    static char buf[4096];
    const char *dir = getenv("MOERUN_SHARED_DIR");
    if (!dir || !*dir)
        dir = MOERUN_SHARED_DIR;
    snprintf(buf, sizeof(buf), "%s/%s", dir, rel);
    if (access(buf, R_OK) != 0)
        return NULL;
    return buf;
}

const char *tu_tmp_path(const char *suffix) {
    static char buf[4096];
    static unsigned counter;
    snprintf(buf, sizeof(buf), "%s/tmp-test-%d-%u%s", MOERUN_BUILD_DIR, (int)getpid(), counter++,
             suffix ? suffix : "");
    return buf;
}

void *tu_read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    if (fseek(f, 0, SEEK_END) != 0) {
        fclose(f);
        return NULL;
    }
    long n = ftell(f);
    rewind(f);
    char *buf = n >= 0 ? malloc((size_t)n + 1) : NULL; /* NUL-terminated for text */
    if (buf && n > 0 && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    if (buf)
        buf[n] = '\0';
    fclose(f);
    if (buf && size)
        *size = (size_t)n;
    return buf;
}
