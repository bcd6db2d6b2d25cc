/* Shared test helpers: a seeded random source, float64 comparisons, paths. */
#ifndef MOERUN_TESTUTIL_H
#define MOERUN_TESTUTIL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <setjmp.h> /* cmocka.h needs these first */
#include <stdint.h>
#include <cmocka.h>

/* The run's seed: MOERUN_TEST_SEED from the environment, else drawn from the clock; printed
 * once so a failure can be replayed. Fresh random data on every run. */
uint64_t tu_seed(void);

/* xoshiro256** state */
struct tu_rng {
    uint64_t s[4];
};
void tu_rng_init(struct tu_rng *r, uint64_t seed);
uint64_t tu_rng_u64(struct tu_rng *r);
double tu_rng_uniform(struct tu_rng *r); /* [0, 1) */
double tu_rng_normal(struct tu_rng *r);  /* N(0, 1) */
void tu_fill_normal(struct tu_rng *r, float *x, size_t n, float scale);

/* The test program's own random source, seeded with tu_seed() by tu_rng_setup, a CMocka group
 * setup: cmocka_run_group_tests(tests, tu_rng_setup, NULL). */
extern struct tu_rng tu_main_rng;
int tu_rng_setup(void **state);
uint32_t tu_rnd(uint32_t n); /* [0, n) from tu_main_rng; n > 0 */
/* set[0..n) = n distinct values of [0, n_all) in random order, from tu_main_rng; n <= n_all
 * <= 64. */
void tu_random_set(uint32_t n_all, uint32_t n, int32_t *set);

/* hay is not NULL and holds needle (an error message names what it should). */
bool tu_contains(const char *hay, const char *needle);

/* ||a - b|| / ||b|| over n values (b in float64); 0 when both are zero. */
double tu_rel_l2(const float *a, const double *b, size_t n);
/* The largest tu_rel_l2 over rows rows of n (NaN when a row has one); b as float in _ff. */
double tu_max_rel_l2(const float *a, const double *b, size_t rows, size_t n);
double tu_max_rel_l2_ff(const float *a, const float *b, size_t rows, size_t n);

/* Path of the shared folder's file rel ("golden/MANIFEST.tsv"), or NULL when the shared folder
 * is absent (tests that need it skip). Returns a static buffer. */
const char *tu_shared_path(const char *rel);

/* A fresh temporary file path in the build tree (unique per process and call). */
const char *tu_tmp_path(const char *suffix);

/* Read a whole file into a malloc'd buffer with a NUL after its end; NULL on failure. */
void *tu_read_file(const char *path, size_t *size);

#define TU_SKIP 77

#endif /* MOERUN_TESTUTIL_H */
