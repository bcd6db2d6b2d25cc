// Layer parts on the GPU (docs/architectures.md): memory and stream helpers, RMSNorm, RoPE,
// router softmax + top-k, SwiGLU, residual add, the MoE plumbing (bias rows, gather, scaled
// scatter, slot sums, gated add), attention for one token and for a prompt batch. No kernel
// uses atomics: every output element is written by one thread in a fixed order.
#include "ops.h"

#include "cuda_util.cuh"

#include <math.h>
#include <stdio.h>

namespace {

constexpr int EW_THREADS = 256;       // elementwise kernels
constexpr int NORM_THREADS = 256;     // one block per row
constexpr int TOPK_MAX_E = 256;       // experts
constexpr int TOPK_MAX_K = CUDA_WARP; // experts used (lane j keeps pick j)
constexpr int TOPK_WARPS = 4;         // tokens per block
constexpr int ATT_MAX_HD = 256;       // head size
constexpr int ATT_HD_LANE = ATT_MAX_HD / CUDA_WARP;
constexpr int DEC_WARPS = 8; // decode: warps per head, keys dealt round-robin
constexpr int PR_BQ = 16;    // prompt: queries per block
constexpr int PR_BK = 32;    // prompt: keys per tile (one per lane)
constexpr int PR_WARPS = 4;  // prompt: warps per block, PR_BQ / PR_WARPS queries each

unsigned ew_blocks(int64_t n) {
    return cuda_util_stride_blocks(n, EW_THREADS); // grid-stride beyond
}

// Row-wise kernels: grid.y walks the rows (stride gridDim.y), grid.x the d columns of a row
// (stride gridDim.x * blockDim.x). n_rows > 0 and d > 0.
dim3 row_grid(int64_t n_rows, int64_t d) {
    const int64_t bx = (d + EW_THREADS - 1) / EW_THREADS;
    return dim3((unsigned)(bx > 1024 ? 1024 : bx),
                (unsigned)(n_rows > CUDA_GRID_YZ_MAX ? CUDA_GRID_YZ_MAX : n_rows));
}

__device__ __forceinline__ int64_t col0() {
    return (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t col_step() {
    return (int64_t)gridDim.x * blockDim.x;
}

// --- elementwise -------------------------------------------------------------------------------

__global__ void swiglu_kernel(float *out, const float *g, const float *u, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const float z = g[i];
        out[i] = z / (1.0f + expf(-z)) * u[i];
    }
}

__global__ void add_kernel(float *y, const float *x, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] += x[i];
}

// --- MoE plumbing: row-wise -------------------------------------------------------------------

__global__ void add_rows_kernel(float *y, const float *__restrict__ b, int64_t n_rows, int64_t d) {
    for (int64_t i = blockIdx.y; i < n_rows; i += gridDim.y)
        for (int64_t c = col0(); c < d; c += col_step())
            y[i * d + c] += b[c];
}

__global__ void gather_rows_kernel(float *__restrict__ dst, const float *__restrict__ src,
                                   const int32_t *__restrict__ idx, int64_t n, int64_t d) {
    for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
        const float *sr = src + (int64_t)idx[i] * d;
        for (int64_t c = col0(); c < d; c += col_step())
            dst[i * d + c] = sr[c];
    }
}

__global__ void scatter_scaled_kernel(float *__restrict__ dst, const float *__restrict__ src,
                                      const int32_t *__restrict__ idx,
                                      const float *__restrict__ scale, int64_t n, int64_t d) {
    for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
        const int64_t row = idx[i];
        const float sc = scale[row];
        for (int64_t c = col0(); c < d; c += col_step())
            dst[row * d + c] = src[i * d + c] * sc;
    }
}

// y[t] = slots[t][0] + ... + slots[t][k-1], left to right (the CPU's order: the same sums).
__global__ void sum_slots_kernel(float *__restrict__ y, const float *__restrict__ slots,
                                 int64_t n_tok, int k, int64_t d) {
    for (int64_t t = blockIdx.y; t < n_tok; t += gridDim.y) {
        const float *st = slots + t * k * d;
        for (int64_t c = col0(); c < d; c += col_step()) {
            float acc = k > 0 ? st[c] : 0.0f;
            for (int j = 1; j < k; j++)
                acc += st[j * d + c];
            y[t * d + c] = acc;
        }
    }
}

// y[t] += x[t] * sigmoid(g[t]): the gate as the CPU computes it, product and sum rounded
// separately (no contraction into a fused multiply-add).
__global__ void add_gated_kernel(float *y, const float *__restrict__ x, const float *__restrict__ g,
                                 int64_t n_tok, int64_t d) {
    for (int64_t t = blockIdx.y; t < n_tok; t += gridDim.y) {
        const float gate = 1.0f / (1.0f + expf(-g[t]));
        for (int64_t c = col0(); c < d; c += col_step())
            y[t * d + c] = __fadd_rn(y[t * d + c], __fmul_rn(x[t * d + c], gate));
    }
}

// --- RMSNorm: one block per row ----------------------------------------------------------------

__global__ void __launch_bounds__(NORM_THREADS)
    rmsnorm_kernel(float *out, const float *x, const float *__restrict__ w, int64_t n, float eps) {
    __shared__ float part[NORM_THREADS / CUDA_WARP];
    const float *xr = x + (int64_t)blockIdx.x * n;
    float *orow = out + (int64_t)blockIdx.x * n;
    float s = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        s += xr[i] * xr[i];
    s = cuda_util_warp_sum(s);
    if (threadIdx.x % CUDA_WARP == 0)
        part[threadIdx.x / CUDA_WARP] = s;
    __syncthreads();
    float tot = 0.0f;
    for (int i = 0; i < NORM_THREADS / CUDA_WARP; i++)
        tot += part[i];
    const float scale = rsqrtf(tot / (float)n + eps);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        orow[i] = xr[i] * scale * w[i];
}

// --- RoPE: one thread per rotated pair ---------------------------------------------------------

__global__ void rope_kernel(float *x, int64_t n_pairs, int n_head, int hd, int n_rot, int64_t pos0,
                            double log_base, int neox) {
    const int half = n_rot / 2;
    for (int64_t p = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; p < n_pairs;
         p += (int64_t)gridDim.x * blockDim.x) {
        const int i = (int)(p % half);
        const int64_t th = p / half; // token * n_head + head
        const int64_t t = th / n_head;
        float *v = x + th * hd;
        const double theta = (double)(pos0 + t) * exp(-2.0 * i / n_rot * log_base);
        double sn, cs;
        sincos(theta, &sn, &cs);
        const float c = (float)cs, s = (float)sn;
        const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
        const float x0 = v[a], x1 = v[b];
        v[a] = x0 * c - x1 * s;
        v[b] = x0 * s + x1 * c;
    }
}

// --- router: one warp per token; lane l holds experts l, l + 32, ... ---------------------------

// logits is not __restrict__: probs may be the same rows (each lane reads its experts of the row
// into registers before the first store, and touches no other lane's).
__global__ void softmax_topk_kernel(const float *logits, int64_t n_tok, int E, int k, int renorm,
                                    float *probs, int32_t *sel, float *sel_w) {
    constexpr int PER = TOPK_MAX_E / CUDA_WARP;
    const int lane = (int)threadIdx.x % CUDA_WARP;
    const int64_t t = (int64_t)blockIdx.x * TOPK_WARPS + threadIdx.x / CUDA_WARP;
    if (t >= n_tok)
        return; // whole warps leave together
    const float *l = logits + t * E;
    float v[PER];
    float mx = -INFINITY;
#pragma unroll
    for (int c = 0; c < PER; c++) {
        const int e = lane + CUDA_WARP * c;
        v[c] = e < E ? l[e] : -INFINITY;
        mx = fmaxf(mx, v[c]);
    }
    mx = cuda_util_warp_max(mx);
    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < PER; c++) {
        const int e = lane + CUDA_WARP * c;
        v[c] = e < E ? expf(v[c] - mx) : 0.0f;
        sum += v[c];
    }
    const float inv = 1.0f / cuda_util_warp_sum(sum);
#pragma unroll
    for (int c = 0; c < PER; c++) {
        const int e = lane + CUDA_WARP * c;
        v[c] *= inv;
        if (probs && e < E)
            probs[t * E + e] = v[c];
    }
    // k rounds of arg-max; taken experts drop to -1 (probabilities are >= 0). Lane j keeps
    // the j-th pick.
    float my_w = 0.0f, wsum = 0.0f;
    int my_i = 0;
    for (int j = 0; j < k; j++) {
        float bv = -1.0f;
        int bi = INT32_MAX;
#pragma unroll
        for (int c = 0; c < PER; c++) {
            const int e = lane + CUDA_WARP * c;
            if (e < E && v[c] > bv) // increasing e: the first of equals stays
                bv = v[c], bi = e;
        }
#pragma unroll
        for (int o = CUDA_WARP / 2; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi))
                bv = ov, bi = oi;
        }
        if (bi % CUDA_WARP == lane)
#pragma unroll
            for (int c = 0; c < PER; c++)
                if (c == bi / CUDA_WARP)
                    v[c] = -1.0f;
        if (lane == j)
            my_w = bv, my_i = bi;
        wsum += bv;
    }
    if (lane < k) {
        sel[t * k + lane] = my_i;
        sel_w[t * k + lane] = renorm ? my_w / wsum : my_w;
    }
}

// --- attention -----------------------------------------------------------------------------------

// Online softmax state of one query row, the lane's share of the head's dims (lane + 32 c).
struct att_row {
    float m, l;
    float acc[ATT_HD_LANE];
};

__device__ __forceinline__ void att_row_init(att_row &r) {
    r.m = -INFINITY, r.l = 0.0f;
#pragma unroll
    for (int c = 0; c < ATT_HD_LANE; c++)
        r.acc[c] = 0.0f;
}

// Decode: block = one query head, DEC_WARPS warps; warp w takes keys w, w + DEC_WARPS, ...
// Per key the warp forms q.k with a warp sum and updates its own running softmax; the warps'
// states are merged at the end through shared memory.
__global__ void __launch_bounds__(DEC_WARPS *CUDA_WARP)
    attention_decode_kernel(const float *__restrict__ q, const float *__restrict__ kc,
                            const float *__restrict__ vc, float *__restrict__ o, int group, int hd,
                            int64_t kv_stride, int64_t n_keys, float scale) {
    __shared__ float sm_m[DEC_WARPS], sm_l[DEC_WARPS];
    __shared__ float sm_acc[DEC_WARPS][ATT_MAX_HD];
    const int head = (int)blockIdx.x, kvh = head / group;
    const int warp = (int)threadIdx.x / CUDA_WARP, lane = (int)threadIdx.x % CUDA_WARP;
    float qr[ATT_HD_LANE];
#pragma unroll
    for (int c = 0; c < ATT_HD_LANE; c++) {
        const int d = lane + CUDA_WARP * c;
        qr[c] = d < hd ? q[(int64_t)head * hd + d] * scale : 0.0f;
    }
    att_row r;
    att_row_init(r);
    for (int64_t p = warp; p < n_keys; p += DEC_WARPS) {
        const float *kp = kc + p * kv_stride + (int64_t)kvh * hd;
        const float *vp = vc + p * kv_stride + (int64_t)kvh * hd;
        float s = 0.0f;
#pragma unroll
        for (int c = 0; c < ATT_HD_LANE; c++) {
            const int d = lane + CUDA_WARP * c;
            if (d < hd)
                s += qr[c] * kp[d];
        }
        s = cuda_util_warp_sum(s);
        const float m_new = fmaxf(r.m, s);
        const float corr = expf(r.m - m_new), pw = expf(s - m_new);
        r.l = r.l * corr + pw;
#pragma unroll
        for (int c = 0; c < ATT_HD_LANE; c++) {
            const int d = lane + CUDA_WARP * c;
            r.acc[c] = r.acc[c] * corr + (d < hd ? pw * vp[d] : 0.0f);
        }
        r.m = m_new;
    }
    if (lane == 0)
        sm_m[warp] = r.m, sm_l[warp] = r.l;
#pragma unroll
    for (int c = 0; c < ATT_HD_LANE; c++) {
        const int d = lane + CUDA_WARP * c;
        if (d < hd)
            sm_acc[warp][d] = r.acc[c];
    }
    __syncthreads();
    float m = -INFINITY;
    for (int w = 0; w < DEC_WARPS; w++)
        m = fmaxf(m, sm_m[w]);
    float l = 0.0f;
    for (int w = 0; w < DEC_WARPS; w++)
        l += sm_m[w] == -INFINITY ? 0.0f : sm_l[w] * expf(sm_m[w] - m);
    for (int d = (int)threadIdx.x; d < hd; d += (int)blockDim.x) {
        float a = 0.0f;
        for (int w = 0; w < DEC_WARPS; w++)
            a += sm_m[w] == -INFINITY ? 0.0f : sm_acc[w][d] * expf(sm_m[w] - m);
        o[(int64_t)head * hd + d] = a / l;
    }
}

// Prompt: block (query tile, head). Q tile [PR_BQ][hd], then per key tile K [PR_BK][hd + 1]
// (padded: lane j reads row j at the same d without bank conflicts) and V [PR_BK][hd] in shared
// memory. Warp w owns queries w, w + PR_WARPS, ...; for each, lane j scores key j of the tile,
// the warp updates that query's running softmax and accumulates p_j v_j with p_j broadcast by
// shuffle. Keys past the query (causal) or past the cache's filled positions score -inf and are
// loaded as zeros (never read from the cache).
__global__ void __launch_bounds__(PR_WARPS *CUDA_WARP)
    attention_prompt_kernel(const float *__restrict__ q, const float *__restrict__ kc,
                            const float *__restrict__ vc, float *__restrict__ o, int64_t n_tok,
                            int64_t pos0, int n_head, int group, int hd, int64_t kv_stride,
                            float scale) {
    extern __shared__ float sm[];
    float *qs = sm;                    // [PR_BQ][hd]
    float *ks = qs + PR_BQ * hd;       // [PR_BK][hd + 1]
    float *vs = ks + PR_BK * (hd + 1); // [PR_BK][hd]
    const int head = (int)blockIdx.y, kvh = head / group;
    const int warp = (int)threadIdx.x / CUDA_WARP, lane = (int)threadIdx.x % CUDA_WARP;
    const int64_t t0 = (int64_t)blockIdx.x * PR_BQ;
    const int nq = (int)(n_tok - t0 < PR_BQ ? n_tok - t0 : PR_BQ);
    const int64_t q_stride = (int64_t)n_head * hd;
    for (int i = (int)threadIdx.x; i < PR_BQ * hd; i += (int)blockDim.x) {
        const int r = i / hd, d = i % hd;
        qs[i] = r < nq ? q[(t0 + r) * q_stride + (int64_t)head * hd + d] * scale : 0.0f;
    }
    constexpr int ROWS = PR_BQ / PR_WARPS;
    att_row st[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; i++)
        att_row_init(st[i]);
    const int64_t n_keys = pos0 + t0 + nq; // the last query's keys: 0 .. pos0 + t0 + nq - 1
    for (int64_t k0 = 0; k0 < n_keys; k0 += PR_BK) {
        __syncthreads(); // Q loaded / the previous tile no longer read
        for (int i = (int)threadIdx.x; i < PR_BK * hd; i += (int)blockDim.x) {
            const int j = i / hd, d = i % hd;
            const int64_t p = k0 + j;
            const int64_t off = p * kv_stride + (int64_t)kvh * hd + d;
            ks[j * (hd + 1) + d] = p < n_keys ? kc[off] : 0.0f;
            vs[j * hd + d] = p < n_keys ? vc[off] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < ROWS; i++) {
            const int r = warp + PR_WARPS * i;
            if (r >= nq)
                continue;                       // warp-uniform
            const int64_t last = pos0 + t0 + r; // this query's last key
            if (k0 > last)
                continue;
            const float *qr = qs + r * hd;
            const float *kr = ks + lane * (hd + 1);
            float s = 0.0f;
            for (int d = 0; d < hd; d++)
                s += qr[d] * kr[d];
            if (k0 + lane > last)
                s = -INFINITY;
            att_row &a = st[i];
            const float m_new = fmaxf(a.m, cuda_util_warp_max(s));
            const float corr = expf(a.m - m_new), pw = expf(s - m_new);
            a.l = a.l * corr + cuda_util_warp_sum(pw);
            a.m = m_new;
#pragma unroll
            for (int c = 0; c < ATT_HD_LANE; c++)
                a.acc[c] *= corr;
            for (int j = 0; j < PR_BK; j++) {
                const float pj = __shfl_sync(0xffffffffu, pw, j);
                const float *vr = vs + j * hd;
#pragma unroll
                for (int c = 0; c < ATT_HD_LANE; c++) {
                    const int d = lane + CUDA_WARP * c;
                    if (d < hd)
                        a.acc[c] += pj * vr[d];
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < ROWS; i++) {
        const int r = warp + PR_WARPS * i;
        if (r >= nq)
            continue;
        const float inv = 1.0f / st[i].l;
#pragma unroll
        for (int c = 0; c < ATT_HD_LANE; c++) {
            const int d = lane + CUDA_WARP * c;
            if (d < hd)
                o[(t0 + r) * q_stride + (int64_t)head * hd + d] = st[i].acc[c] * inv;
        }
    }
}

int check_heads(const char *fn, int n_head, int n_head_kv, int hd) {
    if (n_head <= 0 || n_head_kv <= 0 || n_head % n_head_kv != 0)
        return mr_err(MOERUN_ERR_INVALID_ARG, "%s: %d query heads over %d KV heads", fn, n_head,
                      n_head_kv);
    if (hd <= 0 || hd > ATT_MAX_HD)
        return mr_err(MOERUN_ERR_UNSUPPORTED, "%s: head size %d (1 .. %d supported)", fn, hd,
                      ATT_MAX_HD);
    return MOERUN_OK;
}

} // namespace

// --- memory and streams --------------------------------------------------------------------------

extern "C" int cuda_alloc(size_t bytes, void **out) {
    *out = NULL;
    if (bytes == 0)
        return MOERUN_OK;
    cudaError_t e = cudaMalloc(out, bytes);
    if (e != cudaSuccess) {
        *out = NULL;
        char what[64];
        snprintf(what, sizeof(what), "cudaMalloc of %zu bytes", bytes);
        return cuda_util_err(e, what);
    }
    return MOERUN_OK;
}

// A failure here (after a fault) has no one to report to: cleared, so that the next launch check
// does not report it against an innocent kernel.
extern "C" void cuda_free(void *p) {
    if (p && cudaFree(p) != cudaSuccess)
        (void)cudaGetLastError();
}

extern "C" int cuda_upload(void *dst, const void *src, size_t bytes, void *stream) {
    cudaStream_t st = cuda_util_stream(stream);
    cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, st);
    if (e != cudaSuccess)
        return cuda_util_err(e, "cudaMemcpyAsync (upload)");
    e = cudaStreamSynchronize(st);
    if (e != cudaSuccess)
        return cuda_util_err(e, "cudaStreamSynchronize (upload)");
    return MOERUN_OK;
}

extern "C" int cuda_download(void *dst, const void *src, size_t bytes, void *stream) {
    cudaStream_t st = cuda_util_stream(stream);
    cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, st);
    if (e != cudaSuccess)
        return cuda_util_err(e, "cudaMemcpyAsync (download)");
    e = cudaStreamSynchronize(st);
    if (e != cudaSuccess)
        return cuda_util_err(e, "cudaStreamSynchronize (download)");
    return MOERUN_OK;
}

extern "C" int cuda_stream_create(void **out) {
    cudaStream_t s = NULL;
    *out = NULL;
    cudaError_t e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    if (e != cudaSuccess)
        return cuda_util_err(e, "cudaStreamCreate");
    *out = s;
    return MOERUN_OK;
}

extern "C" void cuda_stream_destroy(void *stream) {
    if (stream && cudaStreamDestroy(cuda_util_stream(stream)) != cudaSuccess)
        (void)cudaGetLastError(); // as cuda_free
}

extern "C" int cuda_stream_sync(void *stream) {
    cudaError_t e = cudaStreamSynchronize(cuda_util_stream(stream));
    if (e != cudaSuccess)
        return cuda_util_err(e, "cudaStreamSynchronize");
    return MOERUN_OK;
}

// --- layer parts ---------------------------------------------------------------------------------

extern "C" int cuda_rmsnorm(float *out, const float *x, const float *w, int64_t n_rows, int64_t n,
                            float eps, void *stream) {
    if (n_rows < 0 || n <= 0 || n_rows > INT32_MAX)
        return mr_err(MOERUN_ERR_INVALID_ARG, "cuda_rmsnorm: %lld rows of %lld", (long long)n_rows,
                      (long long)n);
    if (n_rows == 0)
        return MOERUN_OK;
    rmsnorm_kernel<<<(unsigned)n_rows, NORM_THREADS, 0, cuda_util_stream(stream)>>>(out, x, w, n,
                                                                                    eps);
    cuda_util_check_launch("rmsnorm");
    return MOERUN_OK;
}

extern "C" int cuda_rope(float *x, int64_t n_tok, int n_head, int hd, int n_rot, int64_t pos0,
                         float base, enum cuda_rope_style style, void *stream) {
    if (n_tok < 0 || n_head <= 0 || hd <= 0 || n_rot <= 0 || n_rot % 2 || n_rot > hd || pos0 < 0 ||
        !(base > 0.0f) || (style != CUDA_ROPE_NORM && style != CUDA_ROPE_NEOX))
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "cuda_rope: n_tok %lld, heads %d, hd %d, n_rot %d, pos0 %lld, base %g, "
                      "style %d",
                      (long long)n_tok, n_head, hd, n_rot, (long long)pos0, (double)base,
                      (int)style);
    const int64_t n_pairs = n_tok * n_head * (n_rot / 2);
    if (n_pairs == 0)
        return MOERUN_OK;
    rope_kernel<<<ew_blocks(n_pairs), EW_THREADS, 0, cuda_util_stream(stream)>>>(
        x, n_pairs, n_head, hd, n_rot, pos0, log((double)base), style == CUDA_ROPE_NEOX);
    cuda_util_check_launch("rope");
    return MOERUN_OK;
}

extern "C" int cuda_softmax_topk(const float *logits, int64_t n_tok, int E, int k, bool renorm,
                                 float *probs, int32_t *sel, float *sel_w, void *stream) {
    if (E > TOPK_MAX_E || k > TOPK_MAX_K)
        return mr_err(MOERUN_ERR_UNSUPPORTED,
                      "cuda_softmax_topk: %d experts, %d used (the kernel takes E <= %d, k <= %d)",
                      E, k, TOPK_MAX_E, TOPK_MAX_K);
    if (n_tok < 0 || E <= 0 || k < 0 || k > E || (k == 0 && !probs) || (k > 0 && (!sel || !sel_w)))
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "cuda_softmax_topk: %lld tokens, %d experts, %d used, probs %p, sel %p, "
                      "sel_w %p",
                      (long long)n_tok, E, k, (void *)probs, (void *)sel, (void *)sel_w);
    const int64_t blocks = (n_tok + TOPK_WARPS - 1) / TOPK_WARPS;
    if (blocks == 0)
        return MOERUN_OK;
    if (blocks > CUDA_GRID_X_MAX)
        return mr_err(MOERUN_ERR_INVALID_ARG, "cuda_softmax_topk: %lld tokens", (long long)n_tok);
    softmax_topk_kernel<<<(unsigned)blocks, TOPK_WARPS * CUDA_WARP, 0, cuda_util_stream(stream)>>>(
        logits, n_tok, E, k, renorm ? 1 : 0, probs, sel, sel_w);
    cuda_util_check_launch("softmax_topk");
    return MOERUN_OK;
}

extern "C" int cuda_swiglu(float *out, const float *g, const float *u, int64_t n, void *stream) {
    if (n < 0)
        return mr_err(MOERUN_ERR_INVALID_ARG, "cuda_swiglu: n %lld", (long long)n);
    if (n == 0)
        return MOERUN_OK;
    swiglu_kernel<<<ew_blocks(n), EW_THREADS, 0, cuda_util_stream(stream)>>>(out, g, u, n);
    cuda_util_check_launch("swiglu");
    return MOERUN_OK;
}

extern "C" int cuda_add(float *y, const float *x, int64_t n, void *stream) {
    if (n < 0)
        return mr_err(MOERUN_ERR_INVALID_ARG, "cuda_add: n %lld", (long long)n);
    if (n == 0)
        return MOERUN_OK;
    add_kernel<<<ew_blocks(n), EW_THREADS, 0, cuda_util_stream(stream)>>>(y, x, n);
    cuda_util_check_launch("add");
    return MOERUN_OK;
}

// --- MoE plumbing ------------------------------------------------------------------------------

namespace {

int check_rows(const char *fn, int64_t n_rows, int64_t d, bool *empty) {
    if (n_rows < 0 || d < 0)
        return mr_err(MOERUN_ERR_INVALID_ARG, "%s: %lld rows of %lld", fn, (long long)n_rows,
                      (long long)d);
    *empty = n_rows == 0 || d == 0;
    return MOERUN_OK;
}

} // namespace

extern "C" int cuda_add_rows(float *y, const float *b, int64_t n_rows, int64_t n, void *stream) {
    bool empty = true;
    int rc = check_rows("cuda_add_rows", n_rows, n, &empty);
    if (rc || empty)
        return rc;
    add_rows_kernel<<<row_grid(n_rows, n), EW_THREADS, 0, cuda_util_stream(stream)>>>(y, b, n_rows,
                                                                                      n);
    cuda_util_check_launch("add_rows");
    return MOERUN_OK;
}

extern "C" int cuda_gather_rows(float *dst, const float *src, const int32_t *idx, int64_t n,
                                int64_t d, void *stream) {
    bool empty = true;
    int rc = check_rows("cuda_gather_rows", n, d, &empty);
    if (rc || empty)
        return rc;
    gather_rows_kernel<<<row_grid(n, d), EW_THREADS, 0, cuda_util_stream(stream)>>>(dst, src, idx,
                                                                                    n, d);
    cuda_util_check_launch("gather_rows");
    return MOERUN_OK;
}

extern "C" int cuda_scatter_scaled(float *dst, const float *src, const int32_t *idx,
                                   const float *scale, int64_t n, int64_t d, void *stream) {
    bool empty = true;
    int rc = check_rows("cuda_scatter_scaled", n, d, &empty);
    if (rc || empty)
        return rc;
    scatter_scaled_kernel<<<row_grid(n, d), EW_THREADS, 0, cuda_util_stream(stream)>>>(
        dst, src, idx, scale, n, d);
    cuda_util_check_launch("scatter_scaled");
    return MOERUN_OK;
}

extern "C" int cuda_sum_slots(float *y, const float *slots, int64_t n_tok, int k, int64_t d,
                              void *stream) {
    bool empty = true;
    int rc = check_rows("cuda_sum_slots", n_tok, d, &empty);
    if (rc || empty)
        return rc;
    if (k < 0)
        return mr_err(MOERUN_ERR_INVALID_ARG, "cuda_sum_slots: %d slots", k);
    sum_slots_kernel<<<row_grid(n_tok, d), EW_THREADS, 0, cuda_util_stream(stream)>>>(y, slots,
                                                                                      n_tok, k, d);
    cuda_util_check_launch("sum_slots");
    return MOERUN_OK;
}

extern "C" int cuda_add_gated(float *y, const float *x, const float *g, int64_t n_tok, int64_t d,
                              void *stream) {
    bool empty = true;
    int rc = check_rows("cuda_add_gated", n_tok, d, &empty);
    if (rc || empty)
        return rc;
    add_gated_kernel<<<row_grid(n_tok, d), EW_THREADS, 0, cuda_util_stream(stream)>>>(y, x, g,
                                                                                      n_tok, d);
    cuda_util_check_launch("add_gated");
    return MOERUN_OK;
}

// --- attention -----------------------------------------------------------------------------------

extern "C" int cuda_attention_decode(const float *q, const float *k_cache, const float *v_cache,
                                     float *o, int n_head, int n_head_kv, int hd, int64_t n_keys,
                                     void *stream) {
    int rc = check_heads("cuda_attention_decode", n_head, n_head_kv, hd);
    if (rc)
        return rc;
    if (n_keys <= 0)
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "cuda_attention_decode: %lld keys (the token's own "
                      "must be cached)",
                      (long long)n_keys);
    attention_decode_kernel<<<(unsigned)n_head, DEC_WARPS * CUDA_WARP, 0,
                              cuda_util_stream(stream)>>>(
        q, k_cache, v_cache, o, n_head / n_head_kv, hd, (int64_t)n_head_kv * hd, n_keys,
        1.0f / sqrtf((float)hd));
    cuda_util_check_launch("attention_decode");
    return MOERUN_OK;
}

extern "C" int cuda_attention_prompt(const float *q, const float *k_cache, const float *v_cache,
                                     float *o, int64_t n_tok, int64_t pos0, int n_head,
                                     int n_head_kv, int hd, void *stream) {
    int rc = check_heads("cuda_attention_prompt", n_head, n_head_kv, hd);
    if (rc)
        return rc;
    const int64_t tiles = (n_tok + PR_BQ - 1) / PR_BQ;
    if (n_tok < 0 || pos0 < 0 || tiles > INT32_MAX || n_head > 65535)
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "cuda_attention_prompt: %lld tokens at %lld, %d heads", (long long)n_tok,
                      (long long)pos0, n_head);
    if (tiles == 0)
        return MOERUN_OK;
    const size_t smem =
        sizeof(float) * ((size_t)PR_BQ * hd + (size_t)PR_BK * (hd + 1) + (size_t)PR_BK * hd);
    if (smem > 48 * 1024) { // beyond the default: opt in (every sm_80+ device allows ~99 KiB)
        cudaError_t e = cudaFuncSetAttribute(
            attention_prompt_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess)
            return cuda_util_err(e, "cudaFuncSetAttribute (attention_prompt shared memory)");
    }
    dim3 grid((unsigned)tiles, (unsigned)n_head);
    attention_prompt_kernel<<<grid, PR_WARPS * CUDA_WARP, smem, cuda_util_stream(stream)>>>(
        q, k_cache, v_cache, o, n_tok, pos0, n_head, n_head / n_head_kv, hd,
        (int64_t)n_head_kv * hd, 1.0f / sqrtf((float)hd));
    cuda_util_check_launch("attention_prompt");
    return MOERUN_OK;
}
