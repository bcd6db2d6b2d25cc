/* bench_gpu: the links and the compute of a backend device (CUDA by default): pinned
 * host -> device copy bandwidth on the copy stream (and pageable, for comparison), device
 * memory bandwidth (device-to-device copies), then matrix-vector (decode) speed per weight type
 * as weight bytes read per second and as a fraction of that bandwidth, and matrix-matrix
 * (prompt) GFLOP/s. A benchmark, not a test: ctest does not run it.
 *
 *   bench_gpu [--device cuda|sim] [--gpu N] [--mib M] [--rows R] [--k K] [--n N] [--reps N]
 *             [--type T]
 */
#include "bench_util.h"

#include "backend.h"
#include "cpu/quants.h"
#include "internal.h"
#include "types.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void check(int rc, const char *what) {
    if (rc != MOERUN_OK) {
        fprintf(stderr, "bench_gpu: %s: %s (%s)\n", what, moerun_errmsg(), moerun_status_str(rc));
        exit(1);
    }
}

static long parse_long(const char *s, const char *what) {
    char *end;
    long v = strtol(s, &end, 0);
    if (*s == '\0' || *end != '\0' || v < 1) {
        fprintf(stderr, "bench_gpu: bad %s '%s'\n", what, s);
        exit(2);
    }
    return v;
}

/* Host -> device: bytes in pieces of 64 MiB on the copy stream (pinned) or with upload
 * (pageable); GB/s, median of reps. */
static double h2d_gbps(struct mr_backend *be, void *dev, void *host, uint64_t bytes, int pinned,
                       int reps) {
    const uint64_t piece = 64ull << 20;
    double t[64];
    for (int r = 0; r < reps; r++) {
        double t0 = now_s();
        for (uint64_t at = 0; at < bytes; at += piece) {
            const uint64_t n = bytes - at < piece ? bytes - at : piece;
            if (pinned)
                check(be->ops->copy_async(be, (uint8_t *)dev + at, (uint8_t *)host + at, n),
                      "copy_async");
            else
                check(be->ops->upload(be, (uint8_t *)dev + at, (uint8_t *)host + at, n), "upload");
        }
        check(be->ops->sync(be, pinned ? MR_STREAM_COPY : MR_STREAM_COMPUTE), "sync");
        t[r] = now_s() - t0;
    }
    return (double)bytes / median(t, reps) / 1e9;
}

int main(int argc, char **argv) {
    struct mr_backend_config cfg = {.kind = MR_BACKEND_CUDA, .n_threads = 0};
    long mib = 1024, reps = 7;
    int64_t rows = 14336, k = 4096, n_mm = 64;
    int only = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            fprintf(stderr, "usage: bench_gpu [--device cuda|sim] [--gpu N] [--mib M] [--rows R] "
                            "[--k K] [--n N] [--reps N] [--type T]\n");
            return 2;
        }
        i++;
        if (!strcmp(a, "--device"))
            cfg.kind = !strcmp(v, "sim") ? MR_BACKEND_SIM : MR_BACKEND_CUDA;
        else if (!strcmp(a, "--gpu"))
            cfg.device = atoi(v);
        else if (!strcmp(a, "--mib"))
            mib = parse_long(v, "MiB");
        else if (!strcmp(a, "--rows"))
            rows = parse_long(v, "rows");
        else if (!strcmp(a, "--k"))
            k = parse_long(v, "k");
        else if (!strcmp(a, "--n"))
            n_mm = parse_long(v, "n");
        else if (!strcmp(a, "--reps"))
            reps = parse_long(v, "reps");
        else if (!strcmp(a, "--type") && (only = moerun_type_from_name(v)) < 0) {
            fprintf(stderr, "bench_gpu: unknown type '%s'\n", v);
            return 2;
        }
    }
    reps = reps < 5 ? 5 : reps > 64 ? 64 : reps;
    struct mr_backend *be = NULL;
    check(mr_backend_create(&cfg, &be), "backend");
    printf("device: %s\n", be->ops->describe(be));

    /* links: pinned and pageable host -> device, device memory */
    const uint64_t bytes = (uint64_t)mib << 20;
    uint8_t *host = mr_alloc(NULL, bytes, 4096);
    void *dev = NULL, *dev2 = NULL;
    if (!host) {
        fprintf(stderr, "bench_gpu: out of host memory\n");
        return 1;
    }
    memset(host, 0x5a, bytes);
    check(be->ops->alloc(be, bytes, &dev), "alloc");
    check(be->ops->alloc(be, bytes, &dev2), "alloc");
    const double pageable = h2d_gbps(be, dev, host, bytes, 0, (int)reps);
    check(be->ops->host_register(be, host, bytes), "host_register");
    const double pinned = h2d_gbps(be, dev, host, bytes, 1, (int)reps);
    be->ops->host_unregister(be, host);
    double t[64];
    for (int r = 0; r < reps; r++) {
        double t0 = now_s();
        check(be->ops->copy(be, dev2, dev, bytes), "copy");
        check(be->ops->sync(be, MR_STREAM_COMPUTE), "sync");
        t[r] = now_s() - t0;
    }
    const double dev_gbps = 2.0 * (double)bytes / median(t, (int)reps) / 1e9;
    printf("host -> device, %ld MiB in 64 MiB copies, median of %ld: pinned %.1f GB/s, pageable "
           "%.1f GB/s\n",
           mib, reps, pinned, pageable);
    printf("device memory: copy %.1f GB/s (read + write)\n", dev_gbps);
    be->ops->free(be, dev2);

    /* products: weights rotated through buffers filling the device allocation */
    struct mr_workspace_need need = {.n_batch = (uint32_t)n_mm,
                                     .n_ctx = 1,
                                     .max_k = k,
                                     .max_rows = rows,
                                     .max_elements = rows * k,
                                     .types = ~(uint64_t)0 >> 1};
    const uint64_t ws_bytes = be->ops->workspace_bytes(be, &need);
    void *ws = NULL, *x = NULL, *y = NULL;
    check(be->ops->alloc(be, ws_bytes, &ws), "alloc");
    be->ops->set_workspace(be, ws, ws_bytes);
    check(be->ops->alloc(be, (uint64_t)n_mm * (uint64_t)(k > rows ? k : rows) * 4, &x), "alloc");
    check(be->ops->alloc(be, (uint64_t)n_mm * (uint64_t)rows * 4, &y), "alloc");
    float *xf = malloc((size_t)n_mm * (size_t)k * sizeof(float));
    for (int64_t i = 0; i < n_mm * k; i++)
        xf[i] = (float)((i * 2654435761u % 1000) / 1000.0 - 0.5);
    check(be->ops->upload(be, x, xf, (uint64_t)n_mm * (uint64_t)k * 4), "upload");
    static const int types[] = {MOERUN_TYPE_F32,  MOERUN_TYPE_F16,  MOERUN_TYPE_BF16,
                                MOERUN_TYPE_Q8_0, MOERUN_TYPE_Q4_0, MOERUN_TYPE_Q4_K,
                                MOERUN_TYPE_Q5_K, MOERUN_TYPE_Q6_K};
    printf("\nmatvec %lld x %lld (weights rotated through %ld MiB), matmul n = %lld\n",
           (long long)rows, (long long)k, mib, (long long)n_mm);
    printf("  %-5s %8s %9s %9s %6s %11s\n", "type", "MiB", "mv us", "GB/s", "%bw", "mm GFLOP/s");
    const struct cpu_type_kernels *kf = NULL;
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
        const int type = types[ti];
        uint64_t row_bytes;
        if ((only >= 0 && type != only) || !mr_type_nbytes(type, (uint64_t)k, &row_bytes))
            continue;
        kf = cpu_kernels(cpu_isa_best(), type);
        const uint64_t w_bytes = row_bytes * (uint64_t)rows;
        const int n_buf = (int)(bytes / w_bytes) < 1 ? 1 : (int)(bytes / w_bytes);
        /* one quantized matrix, copied into every buffer of dev */
        uint8_t *w = malloc(w_bytes);
        kf->from_float(xf, w, k); /* row 0 from x, then repeated: content does not matter */
        for (int64_t r = 1; r < rows; r++)
            memcpy(w + r * row_bytes, w, row_bytes);
        for (int b = 0; b < n_buf; b++)
            check(be->ops->upload(be, (uint8_t *)dev + b * w_bytes, w, w_bytes), "upload");
        check(be->ops->sync(be, MR_STREAM_COMPUTE), "sync"); /* w is read until then */
        free(w);
        for (int r = 0; r < reps; r++) {
            double t0 = now_s();
            for (int b = 0; b < n_buf; b++)
                check(be->ops->matmul(be, type, rows, k, (uint8_t *)dev + b * w_bytes, 1, x, y),
                      "matvec");
            check(be->ops->sync(be, MR_STREAM_COMPUTE), "sync");
            t[r] = (now_s() - t0) / n_buf;
        }
        const double mv = median(t, (int)reps);
        for (int r = 0; r < reps; r++) {
            double t0 = now_s();
            check(be->ops->matmul(be, type, rows, k, dev, n_mm, x, y), "matmul");
            check(be->ops->sync(be, MR_STREAM_COMPUTE), "sync");
            t[r] = now_s() - t0;
        }
        const double mm = median(t, (int)reps);
        printf("  %-5s %8.1f %9.1f %9.1f %5.0f%% %11.0f\n", moerun_type_name(type),
               w_bytes / 1048576.0, mv * 1e6, w_bytes / mv / 1e9,
               100.0 * w_bytes / mv / 1e9 / dev_gbps * 2,
               2.0 * (double)rows * (double)k * (double)n_mm / mm / 1e9);
    }
    printf("(%%bw: weight bytes read per second over half the device copy rate, i.e. its read "
           "bandwidth)\n");
    free(xf);
    be->ops->free(be, y);
    be->ops->free(be, x);
    be->ops->free(be, ws);
    be->ops->free(be, dev);
    mr_free(NULL, host);
    mr_backend_destroy(be);
    return 0;
}
