/* CPU matrix-vector and matrix-matrix products over weights of any supported type.
 *
 * Both convert the float32 activations to the weight type's companion type once (into the
 * caller's scratch), then compute every output with the type's vec_dot kernel, so a matmul
 * column is bit-identical to the matvec of that input. All per-type work is in the kernel
 * table (quants.h); nothing here allocates.
 */
#include "matmul.h"
#include "internal.h"
#include "types.h"

#include <stdbool.h>
#include <stdint.h>

/* matmul tiling: a tile of weight rows (about MM_TILE_BYTES, MM_TILE_MIN..MM_TILE_MAX rows)
 * stays in L1/L2 while a chunk of activation rows (about MM_CHUNK_BYTES) passes over it */
#define MM_TILE_BYTES  (32u * 1024u)
#define MM_TILE_MIN    4
#define MM_TILE_MAX    16
#define MM_CHUNK_BYTES (256u * 1024u)

/* One product, as the workers see it. */
struct mm_job {
    const struct cpu_type_kernels *kw; /* weight type's kernels (vec_dot) */
    cpu_from_float_fn from_float;      /* companion type's quantizer; NULL: use x as it is */
    int64_t rows, k, n;
    const uint8_t *w; /* [rows][w_row bytes] */
    size_t w_row;
    const float *x;    /* [n][k] float32 */
    const uint8_t *xq; /* [n][x_row bytes], companion type */
    uint8_t *xq_mut;
    size_t x_row;
    float *y; /* [n][rows] */
};

/* Product checks shared by matvec and matmul. Fills the job's type fields. */
static int mm_check(const char *what, enum cpu_isa isa, int type, int64_t rows, int64_t k,
                    const void *w, int64_t n, const float *x, const float *y, const void *scratch,
                    struct mm_job *job) {
    if ((int)isa < 0 || isa >= CPU_ISA_COUNT)
        return mr_err(MOERUN_ERR_INVALID_ARG, "%s: instruction set %d unknown", what, (int)isa);
    if (!cpu_isa_available(isa))
        return mr_err(MOERUN_ERR_UNSUPPORTED, "%s: this CPU lacks the %s instruction set", what,
                      cpu_isa_name(isa));
    const struct mr_type_info *ti = mr_type_info(type);
    const struct cpu_type_kernels *kw = cpu_kernels(isa, type);
    if (!ti || !kw || !kw->vec_dot)
        return mr_err(MOERUN_ERR_UNSUPPORTED, "%s: weight type %d (%s) has no CPU kernels", what,
                      type, ti ? ti->name : "unknown");
    const struct mr_type_info *ta = mr_type_info(kw->vec_dot_type);
    const struct cpu_type_kernels *ka = cpu_kernels(isa, kw->vec_dot_type);
    if (!ta || !ka || (!ka->from_float && kw->vec_dot_type != MOERUN_TYPE_F32))
        return mr_err(MOERUN_ERR_INTERNAL, "%s: %s's activation type %d has no quantizer", what,
                      ti->name, kw->vec_dot_type);
    if (rows < 0 || n < 0 || k <= 0)
        return mr_err(MOERUN_ERR_INVALID_ARG, "%s: bad shape rows=%lld k=%lld n=%lld (%s weights)",
                      what, (long long)rows, (long long)k, (long long)n, ti->name);
    if (k % ti->blck != 0 || k % ta->blck != 0)
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "%s: k=%lld is not a multiple of the %s block size (%u)", what, (long long)k,
                      ti->name, MR_MAX(ti->blck, ta->blck));
    uint64_t w_row, x_row, total;
    if (!mr_type_nbytes(type, (uint64_t)k, &w_row) ||
        !mr_type_nbytes(kw->vec_dot_type, (uint64_t)k, &x_row) ||
        mr_mul_overflow_u64(w_row, (uint64_t)rows, &total) || total > SIZE_MAX ||
        mr_mul_overflow_u64(x_row, (uint64_t)n, &total) || total > SIZE_MAX ||
        mr_mul_overflow_u64((uint64_t)k, (uint64_t)n, &total) || total > SIZE_MAX / 4 ||
        mr_mul_overflow_u64((uint64_t)rows, (uint64_t)n, &total) || total > SIZE_MAX / 4)
        return mr_err(MOERUN_ERR_INVALID_ARG, "%s: shape rows=%lld k=%lld n=%lld overflows", what,
                      (long long)rows, (long long)k, (long long)n);
    const bool direct = kw->vec_dot_type == MOERUN_TYPE_F32;
    if (!w || !x || !y || (!scratch && !direct))
        return mr_err(MOERUN_ERR_INVALID_ARG, "%s: NULL %s", what,
                      !w   ? "weights"
                      : !x ? "input"
                      : !y ? "output"
                           : "scratch");

    job->kw = kw;
    job->from_float = direct ? NULL : ka->from_float;
    job->rows = rows;
    job->k = k;
    job->n = n;
    job->w = w;
    job->w_row = (size_t)w_row;
    job->x = x;
    job->xq = direct ? (const uint8_t *)x : (const uint8_t *)scratch;
    job->xq_mut = direct ? NULL : (uint8_t *)scratch;
    job->x_row = (size_t)x_row;
    job->y = (float *)y;
    return MOERUN_OK;
}

size_t cpu_act_bytes(int type, int64_t k, int64_t n) {
    const struct cpu_type_kernels *kw = cpu_kernels(CPU_ISA_SCALAR, type);
    uint64_t row, total;
    if (!kw || k < 0 || n < 0 || !mr_type_nbytes(kw->vec_dot_type, (uint64_t)k, &row) ||
        mr_mul_overflow_u64(row, (uint64_t)n, &total) || total > SIZE_MAX)
        return 0;
    return (size_t)total;
}

/* [lo, hi) of the ith of nth balanced contiguous parts of count items */
static void mm_split(int64_t count, int ith, int nth, int64_t *lo, int64_t *hi) {
    *lo = count * ith / nth;
    *hi = count * (ith + 1) / nth;
}

static void mm_convert_task(void *arg, int ith, int nth) {
    struct mm_job *job = arg;
    int64_t c0, c1;
    mm_split(job->n, ith, nth, &c0, &c1);
    for (int64_t c = c0; c < c1; c++)
        job->from_float(job->x + c * job->k, job->xq_mut + (size_t)c * job->x_row, job->k);
}

static void mv_task(void *arg, int ith, int nth) {
    const struct mm_job *job = arg;
    const cpu_vec_dot_fn dot = job->kw->vec_dot;
    int64_t r0, r1;
    mm_split(job->rows, ith, nth, &r0, &r1);
    for (int64_t r = r0; r < r1; r++)
        dot(job->k, &job->y[r], job->w + (size_t)r * job->w_row, job->xq);
}

int cpu_matvec(struct cpu_pool *pool, enum cpu_isa isa, int type, int64_t rows, int64_t k,
               const void *w, const float *x, float *y, void *scratch) {
    struct mm_job job;
    int rc = mm_check("cpu_matvec", isa, type, rows, k, w, 1, x, y, scratch, &job);
    if (rc != MOERUN_OK)
        return rc;
    if (job.from_float)
        job.from_float(x, job.xq_mut, k); /* one row: cheaper than waking the pool twice */
    if (rows > 0)
        cpu_pool_run(rows >= 2 * cpu_pool_size(pool) ? pool : NULL, mv_task, &job);
    return MOERUN_OK;
}

/* Rows per tile: about MM_TILE_BYTES of weights, clamped to [MM_TILE_MIN, MM_TILE_MAX]. */
static int64_t mm_tile_rows(size_t w_row) {
    size_t t = MM_TILE_BYTES / (w_row ? w_row : 1);
    return (int64_t)MR_MAX(MM_TILE_MIN, MR_MIN(MM_TILE_MAX, t));
}

/* Y[c][r] for r in [r0, r1), c in [c0, c1): tiles of weight rows, each reused for a
 * cache-sized chunk of activation rows before the next tile is read. */
static void mm_block(const struct mm_job *job, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    const cpu_vec_dot_fn dot = job->kw->vec_dot;
    const int64_t tile = mm_tile_rows(job->w_row);
    const int64_t chunk = MR_MAX(1, (int64_t)(MM_CHUNK_BYTES / job->x_row));
    for (int64_t t0 = r0; t0 < r1; t0 += tile) {
        const int64_t t1 = MR_MIN(r1, t0 + tile);
        for (int64_t b0 = c0; b0 < c1; b0 += chunk) {
            const int64_t b1 = MR_MIN(c1, b0 + chunk);
            for (int64_t c = b0; c < b1; c++) {
                const uint8_t *xc = job->xq + (size_t)c * job->x_row;
                float *yc = job->y + c * job->rows;
                for (int64_t r = t0; r < t1; r++)
                    dot(job->k, &yc[r], job->w + (size_t)r * job->w_row, xc);
            }
        }
    }
}

static void mm_task(void *arg, int ith, int nth) {
    const struct mm_job *job = arg;
    const int64_t tile = mm_tile_rows(job->w_row);
    if (job->rows >= (int64_t)nth * tile || job->n < nth) {
        /* split the weight rows: each thread reads its own weights once */
        int64_t r0, r1;
        mm_split(job->rows, ith, nth, &r0, &r1);
        mm_block(job, r0, r1, 0, job->n);
    } else {
        /* few rows, many inputs: split the inputs, every thread reads all (few) weights */
        int64_t c0, c1;
        mm_split(job->n, ith, nth, &c0, &c1);
        mm_block(job, 0, job->rows, c0, c1);
    }
}

int cpu_matmul(struct cpu_pool *pool, enum cpu_isa isa, int type, int64_t rows, int64_t k,
               const void *w, int64_t n, const float *x, float *y, void *scratch) {
    struct mm_job job;
    int rc = mm_check("cpu_matmul", isa, type, rows, k, w, n, x, y, scratch, &job);
    if (rc != MOERUN_OK)
        return rc;
    if (n == 0 || rows == 0)
        return MOERUN_OK;
    if (job.from_float)
        cpu_pool_run(n >= 2 ? pool : NULL, mm_convert_task, &job);
    cpu_pool_run(pool, mm_task, &job);
    return MOERUN_OK;
}
