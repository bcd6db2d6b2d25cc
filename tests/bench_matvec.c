/* bench_matvec: memory bandwidth of this machine, then matvec (decode) speed per weight type
 * as weight bytes read per second and as a fraction of that bandwidth, and matmul (prompt)
 * speed in GFLOP/s. A benchmark, not a test: ctest does not run it.
 *
 *   bench_matvec [-t N] [--rows R] [--k K] [--reps N] [--type T] [--isa I] [--n N]
 *                [--mm-rows R] [--bw-mib M]
 *
 * Weights are random floats quantized with the type's from_float; several weight buffers
 * (together more than twice the last-level cache) are used in rotation so every product reads
 * its weights from memory.
 */
#include "bench_util.h"

#include "cpu/matmul.h"
#include "internal.h"
#include "types.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void *xalloc(size_t bytes) {
    void *p = mr_alloc(NULL, bytes, 4096);
    if (!p) {
        fprintf(stderr, "bench_matvec: out of memory (%zu bytes)\n", bytes);
        exit(1);
    }
    return p;
}

/* ----- memory bandwidth ----- */

struct bw_job {
    const uint64_t *src; /* read: [words] */
    uint8_t *dst;        /* copy: [bytes] from csrc */
    const uint8_t *csrc;
    size_t words, bytes;
    uint64_t sums[256];
};

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
/* [lo, hi) words summed with 32-byte loads, four independent accumulators */
__attribute__((target("avx2"))) static uint64_t sum_words_avx2(const uint64_t *src, size_t lo,
                                                               size_t hi) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    size_t i = lo;
    for (; i + 16 <= hi; i += 16) {
        a0 = _mm256_add_epi64(a0, _mm256_loadu_si256((const __m256i *)(src + i)));
        a1 = _mm256_add_epi64(a1, _mm256_loadu_si256((const __m256i *)(src + i + 4)));
        a2 = _mm256_add_epi64(a2, _mm256_loadu_si256((const __m256i *)(src + i + 8)));
        a3 = _mm256_add_epi64(a3, _mm256_loadu_si256((const __m256i *)(src + i + 12)));
    }
    __m256i a = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, a);
    uint64_t s = lanes[0] + lanes[1] + lanes[2] + lanes[3];
    for (; i < hi; i++)
        s += src[i];
    return s;
}
#endif

static void bw_read_task(void *p, int ith, int nth) {
    struct bw_job *j = p;
    size_t lo = j->words * (size_t)ith / (size_t)nth, hi = j->words * (size_t)(ith + 1) / nth;
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2")) {
        j->sums[ith % 256] = sum_words_avx2(j->src, lo, hi);
        return;
    }
#endif
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
    size_t i = lo;
    for (; i + 8 <= hi; i += 8) {
        a0 += j->src[i];
        a1 += j->src[i + 1];
        a2 += j->src[i + 2];
        a3 += j->src[i + 3];
        a4 += j->src[i + 4];
        a5 += j->src[i + 5];
        a6 += j->src[i + 6];
        a7 += j->src[i + 7];
    }
    for (; i < hi; i++)
        a0 += j->src[i];
    j->sums[ith % 256] = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
}

static void bw_copy_task(void *p, int ith, int nth) {
    struct bw_job *j = p;
    size_t lo = j->bytes * (size_t)ith / (size_t)nth, hi = j->bytes * (size_t)(ith + 1) / nth;
    memcpy(j->dst + lo, j->csrc + lo, hi - lo);
}

struct bw_result {
    double read_gbs, copy_gbs; /* copy counts bytes read + written */
};

static struct bw_result measure_bandwidth(struct cpu_pool *pool, uint8_t *buf, size_t bytes,
                                          int reps) {
    struct bw_job j;
    memset(&j, 0, sizeof(j));
    j.src = (const uint64_t *)buf;
    j.words = bytes / 8;
    j.csrc = buf;
    j.dst = buf + bytes / 2;
    j.bytes = bytes / 2;
    double t[64];
    reps = MR_MIN(reps, 64);
    struct bw_result r;
    cpu_pool_run(pool, bw_read_task, &j); /* warm up */
    for (int i = 0; i < reps; i++) {
        double t0 = now_s();
        cpu_pool_run(pool, bw_read_task, &j);
        t[i] = now_s() - t0;
    }
    r.read_gbs = (double)bytes / median(t, reps) / 1e9;
    cpu_pool_run(pool, bw_copy_task, &j);
    for (int i = 0; i < reps; i++) {
        double t0 = now_s();
        cpu_pool_run(pool, bw_copy_task, &j);
        t[i] = now_s() - t0;
    }
    r.copy_gbs = 2.0 * (double)(bytes / 2) / median(t, reps) / 1e9;
    uint64_t s = 0;
    for (int i = 0; i < 256; i++)
        s += j.sums[i];
    volatile uint64_t sink = s;
    (void)sink;
    return r;
}

/* ----- products ----- */

static void usage(void) {
    fprintf(stderr,
            "usage: bench_matvec [-t N] [--rows R] [--k K] [--reps N] [--type T] [--isa I]\n"
            "                    [--n N] [--mm-rows R] [--bw-mib M]\n"
            "  -t N        threads for the second column (default 2; the first is 1)\n"
            "  --rows R    matvec rows (default 14336)\n"
            "  --k K       row length (default 4096)\n"
            "  --reps N    timed repetitions, median reported (default 7, at least 5)\n"
            "  --type T    one weight type (F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K)\n"
            "  --isa I     scalar, avx2 or avx512 (default: the best this CPU runs)\n"
            "  --n N       matmul inputs (default 64; 0 skips matmul)\n"
            "  --mm-rows R matmul rows (default 4096)\n"
            "  --bw-mib M  bandwidth buffer in MiB (default 1024)\n");
}

static long parse_long(const char *s, const char *what) {
    char *end;
    long v = strtol(s, &end, 0);
    if (*s == '\0' || *end != '\0' || v < 0) {
        fprintf(stderr, "bench_matvec: bad %s '%s'\n", what, s);
        exit(2);
    }
    return v;
}

static size_t llc_bytes(void) {
#ifdef _SC_LEVEL3_CACHE_SIZE
    long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (l3 > 0)
        return (size_t)l3;
#endif
    return 32u << 20;
}

/* n_buf buffers of rows x k of type, each filled with copies of a quantized random block */
static uint8_t **make_weights(const struct cpu_type_kernels *kt, int type, int64_t rows, int64_t k,
                              size_t row_bytes, int n_buf) {
    const int64_t seed_rows = MR_MIN(rows, 64);
    float *f = xalloc(sizeof(float) * (size_t)k);
    uint8_t *seed = xalloc(row_bytes * (size_t)seed_rows);
    uint64_t s = 0x9e3779b97f4a7c15ull ^ (uint64_t)type;
    for (int64_t r = 0; r < seed_rows; r++) {
        for (int64_t i = 0; i < k; i++) {
            /* sum of 4 uniforms: roughly normal */
            double u = 0;
            for (int m = 0; m < 4; m++) {
                s = s * 6364136223846793005ull + 1442695040888963407ull;
                u += (double)(s >> 11) * 0x1.0p-53;
            }
            f[i] = (float)((u - 2.0) * 0.03);
        }
        kt->from_float(f, seed + (size_t)r * row_bytes, k);
    }
    uint8_t **bufs = xalloc(sizeof(uint8_t *) * (size_t)n_buf);
    for (int b = 0; b < n_buf; b++) {
        bufs[b] = xalloc(row_bytes * (size_t)rows);
        for (int64_t r = 0; r < rows; r += seed_rows) {
            int64_t m = MR_MIN(seed_rows, rows - r);
            memcpy(bufs[b] + (size_t)r * row_bytes, seed, (size_t)m * row_bytes);
        }
    }
    mr_free(NULL, seed);
    mr_free(NULL, f);
    return bufs;
}

static void free_weights(uint8_t **bufs, int n_buf) {
    for (int b = 0; b < n_buf; b++)
        mr_free(NULL, bufs[b]);
    mr_free(NULL, bufs);
}

int main(int argc, char **argv) {
    int threads = 2, reps = 7, only_type = -1;
    int64_t rows = 14336, k = 4096, mm_n = 64, mm_rows = 4096;
    long bw_mib = 1024;
    enum cpu_isa isa = cpu_isa_best();
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage();
            return 0;
        }
        if (!v) {
            usage();
            return 2;
        }
        i++;
        if (strcmp(a, "-t") == 0) {
            threads = (int)parse_long(v, "thread count");
        } else if (strcmp(a, "--rows") == 0) {
            rows = parse_long(v, "rows");
        } else if (strcmp(a, "--k") == 0) {
            k = parse_long(v, "k");
        } else if (strcmp(a, "--reps") == 0) {
            reps = (int)parse_long(v, "reps");
        } else if (strcmp(a, "--n") == 0) {
            mm_n = parse_long(v, "n");
        } else if (strcmp(a, "--mm-rows") == 0) {
            mm_rows = parse_long(v, "mm-rows");
        } else if (strcmp(a, "--bw-mib") == 0) {
            bw_mib = parse_long(v, "bw-mib");
        } else if (strcmp(a, "--type") == 0) {
            only_type = moerun_type_from_name(v);
            if (only_type < 0 || !moerun_type_is_supported(only_type)) {
                fprintf(stderr, "bench_matvec: unsupported type '%s'\n", v);
                return 2;
            }
        } else if (strcmp(a, "--isa") == 0) {
            int found = 0;
            for (int s = 0; s < CPU_ISA_COUNT; s++) {
                if (strcmp(v, cpu_isa_name((enum cpu_isa)s)) == 0) {
                    isa = (enum cpu_isa)s;
                    found = 1;
                }
            }
            if (!found || !cpu_isa_available(isa)) {
                fprintf(stderr, "bench_matvec: instruction set '%s' unknown or not on this CPU\n",
                        v);
                return 2;
            }
        } else {
            usage();
            return 2;
        }
    }
    if (threads < 1)
        threads = 1;
    reps = MR_MAX(5, MR_MIN(reps, 64));
    if (rows < 1 || k < 1 || bw_mib < 16) {
        fprintf(stderr, "bench_matvec: rows, k must be positive, --bw-mib at least 16\n");
        return 2;
    }

    struct cpu_pool *pool_n = NULL;
    if (threads > 1 && cpu_pool_create(threads, &pool_n) != MOERUN_OK) {
        fprintf(stderr, "bench_matvec: %s\n", moerun_errmsg());
        return 1;
    }
    const int t_list[2] = {1, threads};
    struct cpu_pool *p_list[2] = {NULL, pool_n};
    const int n_t = threads > 1 ? 2 : 1;

    /* memory bandwidth */
    size_t bw_bytes = (size_t)bw_mib << 20;
    uint8_t *bw_buf = xalloc(bw_bytes);
    for (size_t i = 0; i < bw_bytes; i++)
        bw_buf[i] = (uint8_t)(i * 131u >> 3);
    struct bw_result bw[2];
    printf("memory bandwidth: %ld MiB buffer, median of %d\n", bw_mib, reps);
    printf("  threads  read GB/s  copy GB/s (read+write)\n");
    for (int ti = 0; ti < n_t; ti++) {
        bw[ti] = measure_bandwidth(p_list[ti], bw_buf, bw_bytes, reps);
        printf("  %7d  %9.1f  %9.1f\n", t_list[ti], bw[ti].read_gbs, bw[ti].copy_gbs);
    }
    mr_free(NULL, bw_buf);

    static const int all_types[] = {MOERUN_TYPE_F32,  MOERUN_TYPE_F16,  MOERUN_TYPE_BF16,
                                    MOERUN_TYPE_Q8_0, MOERUN_TYPE_Q4_0, MOERUN_TYPE_Q4_K,
                                    MOERUN_TYPE_Q5_K, MOERUN_TYPE_Q6_K};
    const size_t llc = llc_bytes();
    printf("\nmatvec %lld x %lld, isa %s, median of %d passes over buffers totalling > 2x LLC "
           "(%zu MiB)\n",
           (long long)rows, (long long)k, cpu_isa_name(isa), reps, llc >> 20);
    printf("  %-5s %9s", "type", "MiB");
    for (int ti = 0; ti < n_t; ti++)
        printf("   t=%-2d ms   GB/s  %%bw", t_list[ti]);
    printf("\n");
    for (size_t ty = 0; ty < MR_ARRAY_LEN(all_types); ty++) {
        const int type = all_types[ty];
        if (only_type >= 0 && type != only_type)
            continue;
        const struct cpu_type_kernels *kt = cpu_kernels(isa, type);
        uint64_t row_bytes;
        if (!kt || !kt->from_float || !mr_type_nbytes(type, (uint64_t)k, &row_bytes) ||
            k % (int64_t)mr_type_info(kt->vec_dot_type)->blck != 0) {
            printf("  %-5s (skipped: no kernels or k not a whole number of blocks)\n",
                   moerun_type_name(type));
            continue;
        }
        const size_t w_bytes = (size_t)row_bytes * (size_t)rows;
        const int n_buf = (int)MR_MAX(2, (2 * llc + w_bytes) / w_bytes + 1);
        uint8_t **bufs = make_weights(kt, type, rows, k, (size_t)row_bytes, n_buf);
        float *x = xalloc(sizeof(float) * (size_t)k);
        float *y = xalloc(sizeof(float) * (size_t)rows);
        for (int64_t i = 0; i < k; i++)
            x[i] = (float)sin((double)i * 0.37);
        void *scratch = xalloc(MR_MAX(1, cpu_act_bytes(type, k, 1)));
        printf("  %-5s %9.1f", moerun_type_name(type), (double)w_bytes / (1 << 20));
        for (int ti = 0; ti < n_t; ti++) {
            /* a sample is one pass over every buffer: its mean per matvec */
            double t[64];
            for (int i = -1; i < reps; i++) {
                double t0 = now_s();
                for (int b = 0; b < n_buf; b++) {
                    if (cpu_matvec(p_list[ti], isa, type, rows, k, bufs[b], x, y, scratch) !=
                        MOERUN_OK) {
                        fprintf(stderr, "bench_matvec: %s\n", moerun_errmsg());
                        return 1;
                    }
                }
                if (i >= 0)
                    t[i] = (now_s() - t0) / n_buf;
            }
            double med = median(t, reps);
            double gbs = (double)w_bytes / med / 1e9;
            printf("   %8.3f %6.1f %4.0f", med * 1e3, gbs, 100.0 * gbs / bw[ti].read_gbs);
        }
        printf("\n");
        fflush(stdout);
        mr_free(NULL, scratch);
        mr_free(NULL, y);
        mr_free(NULL, x);
        free_weights(bufs, n_buf);
    }

    if (mm_n > 0) {
        printf("\nmatmul %lld x %lld, n = %lld inputs, isa %s, median of %d\n", (long long)mm_rows,
               (long long)k, (long long)mm_n, cpu_isa_name(isa), reps);
        printf("  %-5s", "type");
        for (int ti = 0; ti < n_t; ti++)
            printf("   t=%-2d ms  GFLOP/s", t_list[ti]);
        printf("\n");
        for (size_t ty = 0; ty < MR_ARRAY_LEN(all_types); ty++) {
            const int type = all_types[ty];
            if (only_type >= 0 && type != only_type)
                continue;
            const struct cpu_type_kernels *kt = cpu_kernels(isa, type);
            uint64_t row_bytes;
            if (!kt || !kt->from_float || !mr_type_nbytes(type, (uint64_t)k, &row_bytes) ||
                k % (int64_t)mr_type_info(kt->vec_dot_type)->blck != 0)
                continue;
            uint8_t **bufs = make_weights(kt, type, mm_rows, k, (size_t)row_bytes, 1);
            float *x = xalloc(sizeof(float) * (size_t)(k * mm_n));
            float *y = xalloc(sizeof(float) * (size_t)(mm_rows * mm_n));
            for (int64_t i = 0; i < k * mm_n; i++)
                x[i] = (float)sin((double)i * 0.37);
            void *scratch = xalloc(MR_MAX(1, cpu_act_bytes(type, k, mm_n)));
            printf("  %-5s", moerun_type_name(type));
            for (int ti = 0; ti < n_t; ti++) {
                double t[64];
                for (int i = -1; i < reps; i++) {
                    double t0 = now_s();
                    int e =
                        cpu_matmul(p_list[ti], isa, type, mm_rows, k, bufs[0], mm_n, x, y, scratch);
                    double dt = now_s() - t0;
                    if (e != MOERUN_OK) {
                        fprintf(stderr, "bench_matvec: %s\n", moerun_errmsg());
                        return 1;
                    }
                    if (i >= 0)
                        t[i] = dt;
                }
                double med = median(t, reps);
                printf("   %8.2f %8.1f", med * 1e3,
                       2.0 * (double)mm_rows * (double)k * (double)mm_n / med / 1e9);
            }
            printf("\n");
            fflush(stdout);
            mr_free(NULL, scratch);
            mr_free(NULL, y);
            mr_free(NULL, x);
            free_weights(bufs, 1);
        }
    }
    cpu_pool_destroy(pool_n);
    return 0;
}
