/* CUDA backend operations (internal, C linkage): the products and layer parts of
 * docs/architectures.md on device buffers.
 *
 * Conventions:
 *  - Device buffers are plain device pointers (cuda_alloc / cudaMalloc). Weights are GGML blocks
 *    exactly as in the file (runtime/cpu/quants.h); activations, norms and the KV cache F32.
 *  - stream is a cudaStream_t passed as void * (NULL = the default stream), so that C callers
 *    need no CUDA headers. Every op is asynchronous on its stream unless it says otherwise.
 *  - Every function returns MOERUN_OK or a negative MOERUN_ERR_* with a message (mr_err):
 *    MOERUN_ERR_INVALID_ARG / ERR_UNSUPPORTED for bad shapes or types (nothing launched),
 *    MOERUN_ERR_BACKEND for a CUDA or cuBLAS failure, naming the kernel or call. A fault inside
 *    a kernel surfaces at the next synchronising call (cuda_stream_sync, cuda_download).
 *    Nothing aborts.
 *  - Thread-safety: the ops keep no state; calls on one stream from several threads must be
 *    serialised by the caller, as must uses of one cuBLAS handle.
 */
#ifndef MOERUN_CUDA_OPS_H
#define MOERUN_CUDA_OPS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* --- memory and streams --------------------------------------------------------------------- */

/* *out = bytes of device memory (bytes 0: *out = NULL). Returns MOERUN_OK or ERR_BACKEND. */
int cuda_alloc(size_t bytes, void **out);
void cuda_free(void *p); /* NULL is a no-op */

/* Host -> device and device -> host copies of bytes, ordered on stream. Synchronous: both return
 * when the copy is complete (and cuda_download reports earlier failures on the stream). */
int cuda_upload(void *dst, const void *src, size_t bytes, void *stream);
int cuda_download(void *dst, const void *src, size_t bytes, void *stream);

int cuda_stream_create(void **out);
void cuda_stream_destroy(void *stream); /* NULL is a no-op */
/* Wait for the work on stream; a kernel fault comes back here as ERR_BACKEND. */
int cuda_stream_sync(void *stream);

/* cuBLAS handle for cuda_matmul. */
int cuda_cublas_create(void **out);
void cuda_cublas_destroy(void *cublas); /* NULL is a no-op */

/* --- products (quant.cu, gemm.cu) ---------------------------------------------------------- */

/* The checks every product makes of a weight matrix: type supported (MOERUN_ERR_UNSUPPORTED
 * otherwise), rows >= 0, k a positive multiple of the type's block size, w aligned as below
 * (MOERUN_ERR_INVALID_ARG otherwise); fn names the caller in the message. Launches nothing. */
int cuda_check_weights(const char *fn, int type, int64_t rows, int64_t k, const void *w);

/* Bytes of one row of k elements of type (0 for an unsupported type or a partial block). */
int64_t cuda_row_bytes(int type, int64_t k);

/* y[rows] = W[rows][k] . x[k] for W of type F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K or Q6_K
 * (moerun_type), k a multiple of the type's block size. One warp per row, x staged in shared
 * memory (swizzled against bank conflicts), each weight byte read once; x stays F32 (no rounding
 * to the companion type), sums F32 in a fixed order (deterministic). Alignment of w: 16 bytes for
 * Q4_K and Q5_K, 4 for F32, 2 for the others (what GGUF data and cudaMalloc give). Returns
 * MOERUN_OK, ERR_UNSUPPORTED (type), ERR_INVALID_ARG, ERR_BACKEND. */
int cuda_matvec(int type, int64_t rows, int64_t k, const void *w, const float *x, float *y,
                void *stream);

/* Y[n][rows] = X[n][k] . W[rows][k]^T as n matrix-vector products fused: passes of up to 8
 * columns, each reading W once and multiplying every column with each weight; per column the
 * same arithmetic as cuda_matvec (F32 x, F32 sums). n = 0 does nothing. Returns as
 * cuda_matvec. */
int cuda_matvec_n(int type, int64_t rows, int64_t k, const void *w, int64_t n, const float *x,
                  float *y, void *stream);

/* dst[n] (IEEE half, raw) = the n elements of src (type as above; n a multiple of the block
 * size) dequantized and rounded to nearest. Returns as cuda_matvec. */
int cuda_dequant_f16(int type, int64_t n, const void *src, void *dst, void *stream);

/* Scratch for cuda_matmul: X as F16 ([n][k]) and all of W as F16 ([rows][k]), each 256-byte
 * aligned; cuda_matmul_x_bytes is the X part alone. 0 for an empty shape. */
size_t cuda_matmul_scratch_bytes(int64_t rows, int64_t k, int64_t n);
size_t cuda_matmul_x_bytes(int64_t k, int64_t n);

/* Y[n][rows] = X[n][k] . W[rows][k]^T through cublasGemmEx with F32 accumulation and output:
 *  - F32 weights: F32 inputs (no TF32, no staging: scratch unused);
 *  - F16 weights: used in place, X rounded to F16 in scratch;
 *  - the others: X rounded to F16 at the start of scratch, then W dequantized to F16 after it in
 *    chunks of as many rows as the rest of scratch holds (at least one row: k * 2 bytes; over
 *    64, a multiple of 64, so that every chunk's part of Y stays 256-byte aligned), one GEMM per
 *    chunk.
 * scratch: 256-byte aligned device memory of scratch_bytes (cuda_matmul_scratch_bytes(rows, k,
 * n) is enough for one chunk); cublas from cuda_cublas_create, its stream set to stream. F16
 * rounding bounds the error near 2^-11 relative per factor; values past the F16 range (65504)
 * overflow. Returns as cuda_matvec (ERR_INVALID_ARG for too little scratch). */
int cuda_matmul_ws(void *cublas, int type, int64_t rows, int64_t k, const void *w, int64_t n,
                   const float *x, float *y, void *scratch, size_t scratch_bytes, void *stream);

/* cuda_matmul_ws with scratch of cuda_matmul_scratch_bytes(rows, k, n) bytes. */
int cuda_matmul(void *cublas, int type, int64_t rows, int64_t k, const void *w, int64_t n,
                const float *x, float *y, void *scratch_f16, void *stream);

/* Point the cuBLAS handle's work at stream. Returns MOERUN_OK or ERR_BACKEND. */
int cuda_cublas_set_stream(void *cublas, void *stream);

/* --- layer parts (ops.cu) --------------------------------------------------------------------- */

/* out[r][i] = x[r][i] / sqrt(mean_i(x[r]^2) + eps) * w[i] for n_rows rows of n (w: [n]; a
 * per-head norm is n_rows = n_tok * heads, n = hd). out may equal x. */
int cuda_rmsnorm(float *out, const float *x, const float *w, int64_t n_rows, int64_t n, float eps,
                 void *stream);

enum cuda_rope_style {
    CUDA_ROPE_NORM = 0, /* pairs (x[2i], x[2i+1]): llama/Mixtral */
    CUDA_ROPE_NEOX = 1, /* pairs (x[i], x[i + n_rot/2]): qwen2moe, qwen3moe, olmoe */
};

/* In place on x[n_tok][n_head * hd]: token t at position pos0 + t; the first n_rot (even,
 * <= hd) dims of each head rotated by theta_i = pos * base^(-2i/n_rot) (angles in double). */
int cuda_rope(float *x, int64_t n_tok, int n_head, int hd, int n_rot, int64_t pos0, float base,
              enum cuda_rope_style style, void *stream);

/* Router: for each of n_tok rows of logits[n_tok][E] (1 <= E <= 256): p = softmax(logits) into
 * probs[n_tok][E] when probs is not NULL (probs may equal logits: each row is read whole before
 * it is written); with k > 0 (k <= 32, k <= E), sel[t][0..k) = the k largest p (descending,
 * lowest index first on ties), sel_w[t][j] = p[sel], divided by their sum when renorm (summed in
 * pick order); k = 0 only writes probs (sel, sel_w unused). One warp per token. Returns
 * MOERUN_OK, ERR_UNSUPPORTED (E > 256 or k > 32), ERR_INVALID_ARG (k > E, nothing to write). */
int cuda_softmax_topk(const float *logits, int64_t n_tok, int E, int k, bool renorm, float *probs,
                      int32_t *sel, float *sel_w, void *stream);

/* out[i] = silu(g[i]) * u[i] over n values, silu(z) = z / (1 + e^-z). out may alias g or u. */
int cuda_swiglu(float *out, const float *g, const float *u, int64_t n, void *stream);

/* y[i] += x[i] over n values. */
int cuda_add(float *y, const float *x, int64_t n, void *stream);

/* The MoE plumbing. All sizes are counts of floats; n == 0 (or d == 0) does nothing. The index
 * arrays are device memory and must hold valid rows (they are not checked on the device);
 * results are written, never accumulated with atomics, so every op is deterministic. */

/* y[r][i] += b[i] for n_rows rows of n (biases). */
int cuda_add_rows(float *y, const float *b, int64_t n_rows, int64_t n, void *stream);

/* dst[i][:] = src[idx[i]][:] for n rows of d (dst [n][d], src [*][d], idx [n]). */
int cuda_gather_rows(float *dst, const float *src, const int32_t *idx, int64_t n, int64_t d,
                     void *stream);

/* dst[idx[i]][:] = src[i][:] * scale[idx[i]] for n rows of d (src [n][d]; dst [*][d] and
 * scale [*] indexed by idx [n], whose entries must be distinct: rows are written, not summed). */
int cuda_scatter_scaled(float *dst, const float *src, const int32_t *idx, const float *scale,
                        int64_t n, int64_t d, void *stream);

/* y[t][:] = slots[t][0][:] + slots[t][1][:] + ... + slots[t][k-1][:], added in that order (k = 0:
 * zeros), for n_tok rows of d (slots [n_tok][k][d], y [n_tok][d], not overlapping). */
int cuda_sum_slots(float *y, const float *slots, int64_t n_tok, int k, int64_t d, void *stream);

/* y[t][i] += x[t][i] * sigmoid(g[t]) for n_tok rows of d (g [n_tok]: one gate per token, the
 * shared expert's). The product and the sum are rounded separately (no fused multiply-add), as
 * on the CPU. */
int cuda_add_gated(float *y, const float *x, const float *g, int64_t n_tok, int64_t d,
                   void *stream);

/* Attention of one query token: q[n_head * hd]; caches [n_ctx][n_head_kv * hd] F32 holding the
 * keys and values of positions 0 .. n_keys - 1 (the token's own included); query head j uses
 * KV head j / (n_head / n_head_kv); o[n_head * hd] = softmax(q.k / sqrt(hd)) . v.
 * hd <= 256, n_head_kv divides n_head. */
int cuda_attention_decode(const float *q, const float *k_cache, const float *v_cache, float *o,
                          int n_head, int n_head_kv, int hd, int64_t n_keys, void *stream);

/* Causal attention of a batch: q[n_tok][n_head * hd] for tokens at positions pos0 .. pos0 +
 * n_tok - 1, whose keys and values are already in the caches (positions 0 .. pos0 + n_tok - 1);
 * token t attends positions 0 .. pos0 + t. o as q. Tiled: a block takes 16 queries of one head
 * and walks the keys in tiles of 32 through shared memory. hd <= 256. */
int cuda_attention_prompt(const float *q, const float *k_cache, const float *v_cache, float *o,
                          int64_t n_tok, int64_t pos0, int n_head, int n_head_kv, int hd,
                          void *stream);

#ifdef __cplusplus
}
#endif

#endif /* MOERUN_CUDA_OPS_H */
