// Batched products: W dequantized to F16, X rounded to F16, one cublasGemmEx with F32
// accumulation (prompt batches and experts with several routed tokens). The only cuBLAS use.
#include "ops.h"

#include "cuda_util.cuh"

#include <cublas_v2.h>
#include <cuda_fp16.h>

namespace {

constexpr size_t SCRATCH_ALIGN = 256;
constexpr int CVT_THREADS = 256;

#define cublas_err(s, what)                                                                        \
    mr_err(MOERUN_ERR_BACKEND, "cublas: %s: %s (%s:%d)", (what), cublasGetStatusString(s),         \
           __FILE__, __LINE__)

size_t round_up(size_t v) {
    return (v + SCRATCH_ALIGN - 1) / SCRATCH_ALIGN * SCRATCH_ALIGN;
}

__global__ void f32_to_f16_kernel(const float *__restrict__ x, __half *__restrict__ y, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] = __float2half_rn(x[i]);
}

} // namespace

extern "C" int cuda_cublas_create(void **out) {
    cublasHandle_t h = NULL;
    *out = NULL;
    cublasStatus_t s = cublasCreate(&h);
    if (s != CUBLAS_STATUS_SUCCESS)
        return cublas_err(s, "cublasCreate");
    *out = h;
    return MOERUN_OK;
}

extern "C" void cuda_cublas_destroy(void *cublas) {
    if (cublas)
        cublasDestroy(static_cast<cublasHandle_t>(cublas));
}

extern "C" size_t cuda_matmul_scratch_bytes(int64_t rows, int64_t k, int64_t n) {
    if (rows <= 0 || k <= 0 || n <= 0)
        return 0;
    return round_up((size_t)rows * (size_t)k * sizeof(__half)) +
           round_up((size_t)n * (size_t)k * sizeof(__half));
}

extern "C" int cuda_matmul(void *cublas, int type, int64_t rows, int64_t k, const void *w,
                           int64_t n, const float *x, float *y, void *scratch_f16, void *stream) {
    if (!cublas || rows < 0 || k <= 0 || n < 0 || rows > INT32_MAX || k > INT32_MAX ||
        n > INT32_MAX)
        return mr_err(MOERUN_ERR_INVALID_ARG, "cuda_matmul: rows %lld, k %lld, n %lld%s",
                      (long long)rows, (long long)k, (long long)n,
                      cublas ? "" : " (no cuBLAS handle)");
    if (rows == 0 || n == 0)
        return MOERUN_OK;
    cudaStream_t st = cuda_util_stream(stream);
    __half *wh = static_cast<__half *>(scratch_f16);
    __half *xh = reinterpret_cast<__half *>(static_cast<char *>(scratch_f16) +
                                            round_up((size_t)rows * (size_t)k * sizeof(__half)));
    const __half *wa = wh;
    if (type == MOERUN_TYPE_F16 && (uintptr_t)w % 2 == 0) {
        wa = static_cast<const __half *>(w); // already F16
    } else {
        int rc = cuda_dequant_f16(type, rows * k, w, wh, stream);
        if (rc)
            return rc;
    }
    const int64_t nx = n * k;
    int64_t blocks = (nx + CVT_THREADS - 1) / CVT_THREADS;
    f32_to_f16_kernel<<<(unsigned)(blocks > 65536 ? 65536 : blocks), CVT_THREADS, 0, st>>>(x, xh,
                                                                                           nx);
    cuda_util_check_launch("f32_to_f16");

    // Column-major view: Y^T (rows x n, ld rows) = op(W^T as stored, k x rows)^T . X^T (k x n)
    cublasHandle_t h = static_cast<cublasHandle_t>(cublas);
    cublasStatus_t s = cublasSetStream(h, st);
    if (s != CUBLAS_STATUS_SUCCESS)
        return cublas_err(s, "cublasSetStream");
    const float alpha = 1.0f, beta = 0.0f;
    s = cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, (int)rows, (int)n, (int)k, &alpha, wa, CUDA_R_16F,
                     (int)k, xh, CUDA_R_16F, (int)k, &beta, y, CUDA_R_32F, (int)rows,
                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS)
        return cublas_err(s, "cublasGemmEx");
    return MOERUN_OK;
}
