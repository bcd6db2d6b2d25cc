/* Helpers the benchmarks share (bench_matvec, bench_gpu): a monotonic clock and the median of
 * repeated timings. Header-only: the benchmarks do not link the test library. */
#ifndef MOERUN_BENCH_UTIL_H
#define MOERUN_BENCH_UTIL_H

#include <stdlib.h>
#include <time.h>

/* Monotonic time, seconds. */
static inline double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of v[0..n) (n >= 1); sorts v in place. */
static inline double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

#endif /* MOERUN_BENCH_UTIL_H */
