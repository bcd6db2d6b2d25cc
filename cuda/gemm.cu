// Batched products through cuBLAS (prompt batches, experts with many routed tokens), the only
// cuBLAS use: W dequantized to F16 (F16 weights used in place) in chunks of rows, X rounded to
// F16, cublasGemmEx with F32 accumulation and output; F32 weights in F32 throughout.
#include "ops.h"

#include "cuda_util.cuh"

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>

namespace {

// cuBLAS is loaded when the first handle is made, not linked: a build with CUDA then starts, and
// runs on the CPU, on machines without the CUDA libraries, and its address space holds
// libcublas's few hundred MiB only when a GPU is used.
struct cublas_api {
    decltype(&cublasCreate_v2) create;
    decltype(&cublasDestroy_v2) destroy;
    decltype(&cublasSetStream_v2) set_stream;
    decltype(&cublasSetMathMode) set_math_mode;
    cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                              const void *, const void *, cudaDataType, int, const void *,
                              cudaDataType, int, const void *, void *, cudaDataType, int,
                              cublasComputeType_t, cublasGemmAlgo_t); // the C symbol

    decltype(&cublasGetStatusString) status_string;
    char error[256];
};
cublas_api api;
pthread_once_t api_once = PTHREAD_ONCE_INIT;

void api_load() {
    // the major version this was compiled against first, then any
    char soname[64];
    snprintf(soname, sizeof(soname), "libcublas.so.%d", CUBLAS_VER_MAJOR);
    void *lib = dlopen(soname, RTLD_NOW | RTLD_LOCAL);
    if (!lib)
        lib = dlopen("libcublas.so", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        const char *e = dlerror();
        snprintf(api.error, sizeof(api.error), "cannot load %s: %s", soname, e ? e : "?");
        return;
    }
    api.create = reinterpret_cast<decltype(api.create)>(dlsym(lib, "cublasCreate_v2"));
    api.destroy = reinterpret_cast<decltype(api.destroy)>(dlsym(lib, "cublasDestroy_v2"));
    api.set_stream = reinterpret_cast<decltype(api.set_stream)>(dlsym(lib, "cublasSetStream_v2"));
    api.set_math_mode =
        reinterpret_cast<decltype(api.set_math_mode)>(dlsym(lib, "cublasSetMathMode"));
    api.gemm_ex = reinterpret_cast<decltype(api.gemm_ex)>(dlsym(lib, "cublasGemmEx"));
    api.status_string =
        reinterpret_cast<decltype(api.status_string)>(dlsym(lib, "cublasGetStatusString"));
    if (!api.create || !api.destroy || !api.set_stream || !api.set_math_mode || !api.gemm_ex ||
        !api.status_string) {
        snprintf(api.error, sizeof(api.error), "%s lacks a function moerun uses", soname);
        api.create = nullptr; // not usable (the library stays loaded: others may hold it)
    }
}

#undef cublasCreate
#undef cublasDestroy
#undef cublasSetStream
#define cublasCreate          api.create
#define cublasDestroy         api.destroy
#define cublasSetStream       api.set_stream
#define cublasSetMathMode     api.set_math_mode
#define cublasGemmEx          api.gemm_ex
#define cublasGetStatusString api.status_string

constexpr size_t SCRATCH_ALIGN = 256;
constexpr int CVT_THREADS = 256;
constexpr int64_t CHUNK_ROWS = 64; // W chunks of a multiple of this many rows (when more than one)

int cublas_fail(cublasStatus_t s, const char *what, const char *file, int line) {
    (void)cudaGetLastError(); // a CUDA status cuBLAS left behind is this failure's, not the next's
    return mr_err(MOERUN_ERR_BACKEND, "cublas: %s: %s (%s:%d)", what, cublasGetStatusString(s),
                  file, line);
}
#define cublas_err(s, what) cublas_fail((s), (what), __FILE__, __LINE__)

size_t round_up(size_t v) {
    return (v + SCRATCH_ALIGN - 1) / SCRATCH_ALIGN * SCRATCH_ALIGN;
}

__global__ void f32_to_f16_kernel(const float *__restrict__ x, __half *__restrict__ y, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] = __float2half_rn(x[i]);
}

// Y^T (m x n, column-major, ld ldc) = A^T . B where A is k x m column-major (W's rows as stored,
// row-major [m][k]) and B is k x n column-major (X [n][k] row-major): Y[c][r] = W[r] . X[c].
int gemm(cublasHandle_t h, int64_t m, int64_t n, int64_t k, const void *a, const void *b,
         cudaDataType_t ab_type, float *y, int64_t ldc) {
    const float alpha = 1.0f, beta = 0.0f;
    cublasStatus_t s = cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, (int)m, (int)n, (int)k, &alpha, a,
                                    ab_type, (int)k, b, ab_type, (int)k, &beta, y, CUDA_R_32F,
                                    (int)ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS)
        return cublas_err(s, "cublasGemmEx");
    return MOERUN_OK;
}

} // namespace

extern "C" int cuda_cublas_create(void **out) {
    cublasHandle_t h = NULL;
    *out = NULL;
    pthread_once(&api_once, api_load);
    if (!api.create)
        return mr_err(MOERUN_ERR_BACKEND, "cublas: %s", api.error);
    cublasStatus_t s = cublasCreate(&h);
    if (s != CUBLAS_STATUS_SUCCESS)
        return cublas_err(s, "cublasCreate");
    // the default math mode: no TF32 for the F32 products (their results must match the CPU's)
    s = cublasSetMathMode(h, CUBLAS_DEFAULT_MATH);
    if (s != CUBLAS_STATUS_SUCCESS) {
        cublasDestroy(h);
        return cublas_err(s, "cublasSetMathMode");
    }
    *out = h;
    return MOERUN_OK;
}

extern "C" void cuda_cublas_destroy(void *cublas) {
    if (cublas)
        cublasDestroy(static_cast<cublasHandle_t>(cublas));
}

extern "C" int cuda_cublas_set_stream(void *cublas, void *stream) {
    cublasStatus_t s =
        cublasSetStream(static_cast<cublasHandle_t>(cublas), cuda_util_stream(stream));
    if (s != CUBLAS_STATUS_SUCCESS)
        return cublas_err(s, "cublasSetStream");
    return MOERUN_OK;
}

extern "C" size_t cuda_matmul_scratch_bytes(int64_t rows, int64_t k, int64_t n) {
    if (rows <= 0 || k <= 0 || n <= 0)
        return 0;
    return cuda_matmul_x_bytes(k, n) + round_up((size_t)rows * (size_t)k * sizeof(__half));
}

extern "C" size_t cuda_matmul_x_bytes(int64_t k, int64_t n) {
    if (k <= 0 || n <= 0)
        return 0;
    return round_up((size_t)n * (size_t)k * sizeof(__half));
}

extern "C" int cuda_matmul_ws(void *cublas, int type, int64_t rows, int64_t k, const void *w,
                              int64_t n, const float *x, float *y, void *scratch,
                              size_t scratch_bytes, void *stream) {
    if (!cublas || rows < 0 || n < 0 || rows > INT32_MAX || k > INT32_MAX || n > INT32_MAX)
        return mr_err(MOERUN_ERR_INVALID_ARG, "cuda_matmul: rows %lld, k %lld, n %lld%s",
                      (long long)rows, (long long)k, (long long)n,
                      cublas ? "" : " (no cuBLAS handle)");
    int rc = cuda_check_weights("cuda_matmul", type, rows, k, w);
    if (rc)
        return rc;
    if (rows == 0 || n == 0)
        return MOERUN_OK;
    cudaStream_t st = cuda_util_stream(stream);
    cublasHandle_t h = static_cast<cublasHandle_t>(cublas);
    if ((rc = cuda_cublas_set_stream(cublas, stream)))
        return rc;
    if (type == MOERUN_TYPE_F32) // exact F32 products: no staging
        return gemm(h, rows, n, k, w, x, CUDA_R_32F, y, rows);

    // scratch: [X as F16: n][k], 256-byte aligned | [W as F16: chunk rows][k]
    const size_t xb = cuda_matmul_x_bytes(k, n);
    const size_t row_h = (size_t)k * sizeof(__half);
    if ((uintptr_t)scratch % SCRATCH_ALIGN != 0 || scratch_bytes < xb ||
        (type != MOERUN_TYPE_F16 && scratch_bytes - xb < row_h))
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "cuda_matmul: scratch of %zu bytes at %p (256-byte aligned, at least %zu "
                      "for n %lld, k %lld) is too small",
                      scratch_bytes, scratch, xb + (type == MOERUN_TYPE_F16 ? 0 : row_h),
                      (long long)n, (long long)k);
    __half *xh = static_cast<__half *>(scratch);
    const int64_t nx = n * k;
    f32_to_f16_kernel<<<cuda_util_stride_blocks(nx, CVT_THREADS), CVT_THREADS, 0, st>>>(x, xh, nx);
    cuda_util_check_launch("f32_to_f16");
    if (type == MOERUN_TYPE_F16) // already F16 (2-byte aligned: checked)
        return gemm(h, rows, n, k, w, xh, CUDA_R_16F, y, rows);

    __half *wh = reinterpret_cast<__half *>(static_cast<char *>(scratch) + xb);
    int64_t chunk = (int64_t)((scratch_bytes - xb) / row_h); // rows per pass, >= 1
    if (chunk < rows && chunk > CHUNK_ROWS)
        chunk -= chunk % CHUNK_ROWS; // y + r0 stays 256-byte aligned: cuBLAS's vector kernels
    const int64_t row_bytes = cuda_row_bytes(type, k); // > 0: the weights were checked
    // The chunk reuses wh: its dequantize is ordered on st after the previous chunk's GEMM.
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
        const int64_t m = rows - r0 < chunk ? rows - r0 : chunk;
        const uint8_t *wr = static_cast<const uint8_t *>(w) + r0 * row_bytes;
        if ((rc = cuda_dequant_f16(type, m * k, wr, wh, stream)) ||
            (rc = gemm(h, m, n, k, wh, xh, CUDA_R_16F, y + r0, rows)))
            return rc;
    }
    return MOERUN_OK;
}

extern "C" int cuda_matmul(void *cublas, int type, int64_t rows, int64_t k, const void *w,
                           int64_t n, const float *x, float *y, void *scratch_f16, void *stream) {
    return cuda_matmul_ws(cublas, type, rows, k, w, n, x, y, scratch_f16,
                          cuda_matmul_scratch_bytes(rows, k, n), stream);
}
