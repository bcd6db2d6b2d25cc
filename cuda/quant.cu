// Weight products on the GPU: fused dequantize-and-multiply matrix-vector kernels for every
// supported GGML type, and dequantize-to-F16 (for the cuBLAS path in gemm.cu).
//
// Each type is described by a "traits" struct: a block of blck elements in bytes bytes, cut into
// units (the work of one thread: 8 to 32 elements, read with as few loads as the block's
// alignment allows). unit(b, s, f) decodes unit s of the block at b and calls f(e, v) for each of
// its elements (e the index in the block, v the dequantized value). The matvec kernel gives each
// row to a warp whose lanes walk the row's units; the dequantize kernel gives a unit to a thread.
//
// Shared-memory swizzle: the lanes of a warp decode units of different blocks at the same time,
// and the element e each reads at one instruction sits at a multiple of 8..32 floats apart from
// its neighbours' (Q4_K: lanes of one block read elements 16 apart, blocks are 256 apart), so a
// plain x tile in shared memory puts up to 16 lanes on one bank. The tile is stored permuted:
// element i at i ^ swz(i / 32), a permutation of the low 5 bits (the bank) within each 32-float
// row, with swz chosen per type so that the 32 lanes' elements at one instruction land on 32
// distinct banks (the derivation is at each swz). Correctness does not depend on that choice:
// writer and readers apply the same bijection.
#include "ops.h"

#include "cuda_util.cuh"

#include <cuda_fp16.h>

#include <string.h>

namespace {

constexpr int MV_WARPS = 8;     // rows (warps) per block
constexpr int MV_TILE = 4096;   // x elements staged in shared memory per pass, one column (16 KiB)
constexpr int MV_MAX_COLS = 8;  // columns of x per pass of the batched matvec
constexpr int DQ_THREADS = 256; // threads per block of the dequantize kernel

// The decoders are host-callable too, so that the layouts can be checked without a device.
#define QD __host__ __device__ __forceinline__
#ifdef __CUDA_ARCH__
#define QD_UNROLL _Pragma("unroll")
#else
#define QD_UNROLL
#endif

QD float h2f(uint16_t h) {
    return __half2float(__ushort_as_half(h));
}
QD float bf2f(uint16_t h) {
#ifdef __CUDA_ARCH__
    return __uint_as_float((uint32_t)h << 16);
#else
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
#endif
}
QD uint16_t ld16(const uint8_t *p) {
    return *reinterpret_cast<const uint16_t *>(p);
}
// a 32-bit word from a 2-byte aligned address
QD uint32_t ld32_a2(const uint8_t *p) {
    return (uint32_t)ld16(p) | ((uint32_t)ld16(p + 2) << 16);
}
QD uint32_t byte_of(const uint32_t *w, int j) {
    return (w[j >> 2] >> (8 * (j & 3))) & 0xFFu;
}

// --- float types: VEC elements per unit (vector loads when the rows allow, else 1) ---------------

template <int VEC> struct tr_f32 {
    static constexpr int blck = VEC, bytes = 4 * VEC, units = 1;
    // VEC 4: lane l reads elements 4l + e of its row of 128 = 4 rows of 32; row & 3 = l / 8
    // flips bits 0-1, bits 2-4 are l % 8: distinct banks. VEC 1: consecutive already.
    QD static int swz(int row) {
        return VEC == 4 ? (row & 3) : 0;
    }
    template <class F> QD static void unit(const uint8_t *b, int, F &&f) {
        if constexpr (VEC == 4) {
            const float4 v = *reinterpret_cast<const float4 *>(b);
            f(0, v.x);
            f(1, v.y);
            f(2, v.z);
            f(3, v.w);
        } else {
            f(0, *reinterpret_cast<const float *>(b));
        }
    }
};

template <int VEC, bool BF> struct tr_h16 {
    static constexpr int blck = VEC, bytes = 2 * VEC, units = 1;
    // VEC 8: lane l reads element 8l + e, row = l / 4 (mod 8) flips bits 0-2, bits 3-4 = l % 4.
    QD static int swz(int row) {
        return VEC == 8 ? (row & 7) : 0;
    }
    QD static float cvt(uint16_t h) {
        return BF ? bf2f(h) : h2f(h);
    }
    template <class F> QD static void unit(const uint8_t *b, int, F &&f) {
        if constexpr (VEC == 8) {
            const uint4 v = *reinterpret_cast<const uint4 *>(b);
            const uint32_t w[4] = {v.x, v.y, v.z, v.w};
            QD_UNROLL
            for (int j = 0; j < 4; j++) {
                f(2 * j, cvt((uint16_t)(w[j] & 0xFFFFu)));
                f(2 * j + 1, cvt((uint16_t)(w[j] >> 16)));
            }
        } else {
            f(0, cvt(ld16(b)));
        }
    }
};

// --- Q8_0: {fp16 d; int8 qs[32]}, 34 bytes; unit s = quants 8s .. 8s+7 -------------------------

struct tr_q8_0 {
    static constexpr int blck = 32, bytes = 34, units = 4;
    // lane l: block l / 4 (one row each), unit s = l % 4 reads 8s + j: bits 3-4 = s, bits 0-2 =
    // j ^ (block & 7).
    QD static int swz(int row) {
        return row & 7;
    }
    template <class F> QD static void unit(const uint8_t *b, int s, F &&f) {
        const float d = h2f(ld16(b));
        const uint32_t w[2] = {ld32_a2(b + 2 + 8 * s), ld32_a2(b + 6 + 8 * s)};
        QD_UNROLL
        for (int j = 0; j < 8; j++)
            f(8 * s + j, d * (float)(int8_t)byte_of(w, j));
    }
};

// --- Q4_0: {fp16 d; uint8 qs[16]}, 18 bytes; byte j: low nibble element j, high j + 16 --------

struct tr_q4_0 {
    static constexpr int blck = 32, bytes = 18, units = 4;
    // lane l: block l / 4, unit s = l % 4 reads 4s + j (+16): bits 2-3 = s; the block's low
    // three bits flip bits 0, 1 and 4.
    QD static int swz(int row) {
        return (row & 3) | ((row & 4) << 2);
    }
    template <class F> QD static void unit(const uint8_t *b, int s, F &&f) {
        const float d = h2f(ld16(b));
        const uint32_t w[1] = {ld32_a2(b + 2 + 4 * s)};
        QD_UNROLL
        for (int j = 0; j < 4; j++) {
            const int q = (int)byte_of(w, j);
            f(4 * s + j, d * (float)((q & 0xF) - 8));
            f(4 * s + j + 16, d * (float)((q >> 4) - 8));
        }
    }
};

// --- K-quants ------------------------------------------------------------------------------------

// 6-bit scale and min of sub-block j from the 12 packed bytes (as quants_ref.c kq_scale_min)
QD void kq_scale_min(const uint32_t *sc, int j, float *s, float *m) {
    if (j < 4) {
        *s = (float)(byte_of(sc, j) & 63);
        *m = (float)(byte_of(sc, j + 4) & 63);
    } else {
        *s = (float)((byte_of(sc, j + 4) & 0xF) | ((byte_of(sc, j - 4) >> 6) << 4));
        *m = (float)((byte_of(sc, j + 4) >> 4) | ((byte_of(sc, j) >> 6) << 4));
    }
}

// Q4_K: {fp16 d, dmin; scales[12]; qs[128]}, 144 bytes (16-byte multiple: qs read as uint4).
// Unit i (0..7): c = i/2, l0 = 16 (i%2); qs[32c + l0 + j] low nibble = element 64c + l0 + j
// (sub-block 2c), high nibble = element 64c + 32 + l0 + j (sub-block 2c + 1).
// Q5_K: {d, dmin; scales[12]; qh[32]; qs[128]}, 176 bytes: as Q4_K with bit 2c / 2c + 1 of
// qh[l0 + j] as the fifth bit.
template <bool Q5> struct tr_qk45 {
    static constexpr int blck = 256, bytes = Q5 ? 176 : 144, units = 8;
    // lane l: block b = l / 8 (mod 4), unit i = l % 8 reads 64c + 16 (i%2) + j (+32), c = i / 2:
    // rows 8b + 2c (+1); bit 4 = i % 2 and (row / 2) % 16 = 4b + c flips bits 0-3.
    QD static int swz(int row) {
        return (row >> 1) & 15;
    }
    template <class F> QD static void unit(const uint8_t *b, int i, F &&f) {
        const uint32_t dd = *reinterpret_cast<const uint32_t *>(b);
        const float d = h2f((uint16_t)(dd & 0xFFFFu)), dmin = h2f((uint16_t)(dd >> 16));
        const uint32_t *sp = reinterpret_cast<const uint32_t *>(b + 4);
        const uint32_t sc[3] = {sp[0], sp[1], sp[2]};
        const int c = i >> 1, l0 = 16 * (i & 1);
        float s1, m1, s2, m2;
        kq_scale_min(sc, 2 * c, &s1, &m1);
        kq_scale_min(sc, 2 * c + 1, &s2, &m2);
        const float d1 = d * s1, d2 = d * s2, n1 = dmin * m1, n2 = dmin * m2;
        const uint4 qv = *reinterpret_cast<const uint4 *>(b + (Q5 ? 48 : 16) + 16 * i);
        const uint32_t q[4] = {qv.x, qv.y, qv.z, qv.w};
        uint32_t h[4] = {0, 0, 0, 0};
        if constexpr (Q5) {
            const uint4 hv = *reinterpret_cast<const uint4 *>(b + 16 + l0);
            h[0] = hv.x, h[1] = hv.y, h[2] = hv.z, h[3] = hv.w;
        }
        QD_UNROLL
        for (int j = 0; j < 16; j++) {
            const int qb = (int)byte_of(q, j);
            int lo = qb & 0xF, hi = qb >> 4;
            if constexpr (Q5) {
                const int hb = (int)byte_of(h, j);
                lo |= ((hb >> (2 * c)) & 1) << 4;
                hi |= ((hb >> (2 * c + 1)) & 1) << 4;
            }
            f(64 * c + l0 + j, d1 * (float)lo - n1);
            f(64 * c + 32 + l0 + j, d2 * (float)hi - n2);
        }
    }
};

// Q6_K: {ql[128]; qh[64]; int8 scales[16]; fp16 d}, 210 bytes (2-byte aligned). Unit i (0..7):
// half h = i/4, l0 = 8 (i%4), l = l0 .. l0+7; with A = ql[64h + l], B = ql[64h + 32 + l],
// H = qh[32h + l]: element 128h + l = A low | H bits 0-1, +32: B low | bits 2-3, +64: A high |
// bits 4-5, +96: B high | bits 6-7; minus 32; scale of element e = scales[e / 16].
struct tr_q6_k {
    static constexpr int blck = 256, bytes = 210, units = 8;
    // lane l: block b = l / 8 (mod 4), unit i = l % 8 reads 128h + 8 (i%4) + j + 32m, h = i / 4:
    // rows 8b + 4h + m; bits 3-4 = i % 4 and (row / 4) % 8 = 2b + h flips bits 0-2.
    QD static int swz(int row) {
        return (row >> 2) & 7;
    }
    template <class F> QD static void unit(const uint8_t *b, int i, F &&f) {
        const int h = i >> 2, l0 = 8 * (i & 3);
        const uint8_t *pa = b + 64 * h + l0, *pb = pa + 32, *ph = b + 128 + 32 * h + l0;
        const uint32_t A[2] = {ld32_a2(pa), ld32_a2(pa + 4)};
        const uint32_t B[2] = {ld32_a2(pb), ld32_a2(pb + 4)};
        const uint32_t H[2] = {ld32_a2(ph), ld32_a2(ph + 4)};
        const float d = h2f(ld16(b + 208));
        const int8_t *sc = reinterpret_cast<const int8_t *>(b + 192) + 8 * h + (l0 >> 4);
        const float d0 = d * (float)sc[0], d1 = d * (float)sc[2], d2 = d * (float)sc[4],
                    d3 = d * (float)sc[6];
        const int e0 = 128 * h + l0;
        QD_UNROLL
        for (int j = 0; j < 8; j++) {
            const int a = (int)byte_of(A, j), bb = (int)byte_of(B, j), hh = (int)byte_of(H, j);
            f(e0 + j, d0 * (float)(((a & 0xF) | ((hh & 3) << 4)) - 32));
            f(e0 + 32 + j, d1 * (float)(((bb & 0xF) | (((hh >> 2) & 3) << 4)) - 32));
            f(e0 + 64 + j, d2 * (float)(((a >> 4) | (((hh >> 4) & 3) << 4)) - 32));
            f(e0 + 96 + j, d3 * (float)(((bb >> 4) | (((hh >> 6) & 3) << 4)) - 32));
        }
    }
};

// --- kernels -------------------------------------------------------------------------------------

// Columns of x per pass and the x tile (elements per column) staged per pass: NC * tile * 4 bytes
// of shared memory, 16 KiB for one column, 32 KiB for more. Every tile is a multiple of every
// blck (256) and holds at least 1024 elements, 32 units of the largest kind, one per lane.
__host__ __device__ constexpr int mv_tile(int nc) {
    return nc == 1 ? MV_TILE : 2 * MV_TILE / nc;
}

// Y[c][r] = W[r] . X[c] for the n_cols (<= NC) columns of X [n_cols][k]; Y [n_cols][rows]. Warp w
// of block b takes row b * MV_WARPS + w. The columns pass through shared memory in tiles of
// mv_tile(NC) elements (swizzled, see the top), read once per block for MV_WARPS rows; each
// weight is read once and multiplies all NC columns. Sums in F32 in a fixed order (per lane, then
// the warp's butterfly): deterministic. Columns n_cols .. NC - 1 are zeros and are not stored.
template <class Q, int NC>
__global__ void __launch_bounds__(MV_WARPS *CUDA_WARP)
    matvec_kernel(const uint8_t *__restrict__ w, const float *__restrict__ x, float *__restrict__ y,
                  int64_t rows, int64_t k, int64_t row_bytes, int n_cols) {
    constexpr int TILE = mv_tile(NC);
    __shared__ float4 xs4[NC * TILE / 4];
    float *xs = reinterpret_cast<float *>(xs4);
    const int warp = (int)threadIdx.x / CUDA_WARP, lane = (int)threadIdx.x % CUDA_WARP;
    const int64_t r = (int64_t)blockIdx.x * MV_WARPS + warp;
    const uint8_t *row = w + (r < rows ? r : 0) * row_bytes;
    float sum[NC];
#pragma unroll
    for (int c = 0; c < NC; c++)
        sum[c] = 0.0f;
    for (int64_t t0 = 0; t0 < k; t0 += TILE) {
        const int n = (int)(k - t0 < TILE ? k - t0 : TILE);
        __syncthreads(); // the previous tile is no longer read
#pragma unroll
        for (int c = 0; c < NC; c++)
            for (int i = (int)threadIdx.x; i < n; i += (int)blockDim.x)
                xs[c * TILE + (i ^ Q::swz(i >> 5))] = c < n_cols ? x[c * k + t0 + i] : 0.0f;
        __syncthreads();
        if (r >= rows)
            continue;
        const uint8_t *tb = row + (t0 / Q::blck) * Q::bytes;
        const int nu = (n / Q::blck) * Q::units;
#pragma unroll 2 // two units' loads in flight per lane (and no spill on F32x4)
        for (int u = lane; u < nu; u += CUDA_WARP) {
            const int blk = u / Q::units, s = u % Q::units;
            const int xb = blk * Q::blck;
            Q::unit(tb + (int64_t)blk * Q::bytes, s, [&](int e, float v) {
                const int i = xb + e, j = i ^ Q::swz(i >> 5);
#pragma unroll
                for (int c = 0; c < NC; c++)
                    sum[c] += v * xs[c * TILE + j];
            });
        }
    }
#pragma unroll
    for (int c = 0; c < NC; c++) {
        const float t = cuda_util_warp_sum(sum[c]); // every lane holds the same total
        if (r < rows && lane == c && c < n_cols)
            y[c * rows + r] = t;
    }
}

// dst[i] = half(src[i]): one unit per thread, grid-stride.
template <class Q>
__global__ void dequant_f16_kernel(const uint8_t *__restrict__ src, __half *__restrict__ dst,
                                   int64_t n_units) {
    for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < n_units;
         u += (int64_t)gridDim.x * blockDim.x) {
        const int64_t blk = u / Q::units;
        const int s = (int)(u % Q::units);
        __half *o = dst + blk * Q::blck;
        Q::unit(src + blk * Q::bytes, s, [&](int e, float v) { o[e] = __float2half_rn(v); });
    }
}

template <class Q, int NC>
int launch_matvec_nc(const char *name, int64_t rows, int64_t k, const void *w, int n_cols,
                     const float *x, float *y, cudaStream_t st) {
    const int64_t blocks = (rows + MV_WARPS - 1) / MV_WARPS;
    const int64_t row_bytes = k / Q::blck * Q::bytes;
    matvec_kernel<Q, NC><<<(unsigned)blocks, MV_WARPS * CUDA_WARP, 0, st>>>(
        static_cast<const uint8_t *>(w), x, y, rows, k, row_bytes, n_cols);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return cuda_util_err(e, name);
    return MOERUN_OK;
}

// The n columns in passes of at most MV_MAX_COLS, each pass on the narrowest kernel that holds it.
template <class Q>
int launch_matvec(const char *name, int64_t rows, int64_t k, const void *w, int64_t n,
                  const float *x, float *y, cudaStream_t st) {
    if ((rows + MV_WARPS - 1) / MV_WARPS > CUDA_GRID_X_MAX)
        return mr_err(MOERUN_ERR_INVALID_ARG, "cuda_matvec: %lld rows is too many",
                      (long long)rows);
    for (int64_t c0 = 0; c0 < n; c0 += MV_MAX_COLS) {
        const int nc = (int)(n - c0 < MV_MAX_COLS ? n - c0 : MV_MAX_COLS);
        const float *xc = x + c0 * k;
        float *yc = y + c0 * rows;
        int rc;
        if (nc == 1)
            rc = launch_matvec_nc<Q, 1>(name, rows, k, w, nc, xc, yc, st);
        else if (nc == 2)
            rc = launch_matvec_nc<Q, 2>(name, rows, k, w, nc, xc, yc, st);
        else if (nc <= 4)
            rc = launch_matvec_nc<Q, 4>(name, rows, k, w, nc, xc, yc, st);
        else
            rc = launch_matvec_nc<Q, MV_MAX_COLS>(name, rows, k, w, nc, xc, yc, st);
        if (rc)
            return rc;
    }
    return MOERUN_OK;
}

template <class Q>
int launch_dequant(const char *name, int64_t n, const void *src, void *dst, cudaStream_t st) {
    const int64_t n_units = n / Q::blck * Q::units;
    int64_t blocks = (n_units + DQ_THREADS - 1) / DQ_THREADS;
    if (blocks > 65536)
        blocks = 65536; // grid-stride beyond
    dequant_f16_kernel<Q><<<(unsigned)blocks, DQ_THREADS, 0, st>>>(
        static_cast<const uint8_t *>(src), static_cast<__half *>(dst), n_units);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return cuda_util_err(e, name);
    return MOERUN_OK;
}

struct type_desc {
    int type;
    const char *name;
    int blck;  // elements per block
    int bytes; // bytes per block
    int align; // required alignment of the weights, bytes
};

const type_desc type_descs[] = {
    {MOERUN_TYPE_F32, "F32", 1, 4, 4},        {MOERUN_TYPE_F16, "F16", 1, 2, 2},
    {MOERUN_TYPE_BF16, "BF16", 1, 2, 2},      {MOERUN_TYPE_Q8_0, "Q8_0", 32, 34, 2},
    {MOERUN_TYPE_Q4_0, "Q4_0", 32, 18, 2},    {MOERUN_TYPE_Q4_K, "Q4_K", 256, 144, 16},
    {MOERUN_TYPE_Q5_K, "Q5_K", 256, 176, 16}, {MOERUN_TYPE_Q6_K, "Q6_K", 256, 210, 2},
};

// The checks shared by both entry points; returns the type's entry through *out.
int check_args(const char *fn, int type, int64_t rows, int64_t k, const void *w,
               const type_desc **out) {
    const type_desc *d = nullptr;
    for (const type_desc &t : type_descs)
        if (t.type == type)
            d = &t;
    if (!d)
        return mr_err(MOERUN_ERR_UNSUPPORTED, "%s: weight type %d has no CUDA kernel", fn, type);
    if (rows < 0 || k <= 0 || k % d->blck != 0)
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "%s: %s shape rows %lld, k %lld (k must be a positive multiple of %d)", fn,
                      d->name, (long long)rows, (long long)k, d->blck);
    if ((uintptr_t)w % (uintptr_t)d->align != 0)
        return mr_err(MOERUN_ERR_INVALID_ARG, "%s: %s weights at %p are not %d-byte aligned", fn,
                      d->name, w, d->align);
    *out = d;
    return MOERUN_OK;
}

} // namespace

extern "C" int cuda_check_weights(const char *fn, int type, int64_t rows, int64_t k,
                                  const void *w) {
    const type_desc *d;
    return check_args(fn, type, rows, k, w, &d);
}

extern "C" int64_t cuda_row_bytes(int type, int64_t k) {
    for (const type_desc &t : type_descs)
        if (t.type == type)
            return k % t.blck == 0 ? k / t.blck * t.bytes : 0;
    return 0;
}

extern "C" int cuda_matvec_n(int type, int64_t rows, int64_t k, const void *w, int64_t n,
                             const float *x, float *y, void *stream) {
    const type_desc *d;
    int rc = check_args("cuda_matvec", type, rows, k, w, &d);
    if (rc)
        return rc;
    if (n < 0)
        return mr_err(MOERUN_ERR_INVALID_ARG, "cuda_matvec: %lld columns", (long long)n);
    if (rows == 0 || n == 0)
        return MOERUN_OK;
    cudaStream_t st = cuda_util_stream(stream);
    // float types: 16-byte vector loads when every row starts 16-byte aligned
    const bool aligned = (uintptr_t)w % 16 == 0;
    switch (type) {
    case MOERUN_TYPE_F32:
        if (aligned && k % 4 == 0)
            return launch_matvec<tr_f32<4>>("matvec_f32x4", rows, k, w, n, x, y, st);
        return launch_matvec<tr_f32<1>>("matvec_f32", rows, k, w, n, x, y, st);
    case MOERUN_TYPE_F16:
        if (aligned && k % 8 == 0)
            return launch_matvec<tr_h16<8, false>>("matvec_f16x8", rows, k, w, n, x, y, st);
        return launch_matvec<tr_h16<1, false>>("matvec_f16", rows, k, w, n, x, y, st);
    case MOERUN_TYPE_BF16:
        if (aligned && k % 8 == 0)
            return launch_matvec<tr_h16<8, true>>("matvec_bf16x8", rows, k, w, n, x, y, st);
        return launch_matvec<tr_h16<1, true>>("matvec_bf16", rows, k, w, n, x, y, st);
    case MOERUN_TYPE_Q8_0:
        return launch_matvec<tr_q8_0>("matvec_q8_0", rows, k, w, n, x, y, st);
    case MOERUN_TYPE_Q4_0:
        return launch_matvec<tr_q4_0>("matvec_q4_0", rows, k, w, n, x, y, st);
    case MOERUN_TYPE_Q4_K:
        return launch_matvec<tr_qk45<false>>("matvec_q4_K", rows, k, w, n, x, y, st);
    case MOERUN_TYPE_Q5_K:
        return launch_matvec<tr_qk45<true>>("matvec_q5_K", rows, k, w, n, x, y, st);
    case MOERUN_TYPE_Q6_K:
        return launch_matvec<tr_q6_k>("matvec_q6_K", rows, k, w, n, x, y, st);
    }
    return mr_err(MOERUN_ERR_INTERNAL, "cuda_matvec: type %d in the table but not dispatched",
                  type);
}

extern "C" int cuda_matvec(int type, int64_t rows, int64_t k, const void *w, const float *x,
                           float *y, void *stream) {
    return cuda_matvec_n(type, rows, k, w, 1, x, y, stream);
}

extern "C" int cuda_dequant_f16(int type, int64_t n, const void *src, void *dst, void *stream) {
    const type_desc *d;
    int rc = check_args("cuda_dequant_f16", type, 1, n, src, &d);
    if (rc)
        return rc;
    cudaStream_t st = cuda_util_stream(stream);
    switch (type) {
    case MOERUN_TYPE_F32:
        return launch_dequant<tr_f32<1>>("dequant_f16_f32", n, src, dst, st);
    case MOERUN_TYPE_F16:
        return launch_dequant<tr_h16<1, false>>("dequant_f16_f16", n, src, dst, st);
    case MOERUN_TYPE_BF16:
        return launch_dequant<tr_h16<1, true>>("dequant_f16_bf16", n, src, dst, st);
    case MOERUN_TYPE_Q8_0:
        return launch_dequant<tr_q8_0>("dequant_f16_q8_0", n, src, dst, st);
    case MOERUN_TYPE_Q4_0:
        return launch_dequant<tr_q4_0>("dequant_f16_q4_0", n, src, dst, st);
    case MOERUN_TYPE_Q4_K:
        return launch_dequant<tr_qk45<false>>("dequant_f16_q4_K", n, src, dst, st);
    case MOERUN_TYPE_Q5_K:
        return launch_dequant<tr_qk45<true>>("dequant_f16_q5_K", n, src, dst, st);
    case MOERUN_TYPE_Q6_K:
        return launch_dequant<tr_q6_k>("dequant_f16_q6_K", n, src, dst, st);
    }
    return mr_err(MOERUN_ERR_INTERNAL, "cuda_dequant_f16: type %d in the table but not dispatched",
                  type);
}
