// Helpers shared by the CUDA sources (private to cuda/): CUDA and cuBLAS statuses to moerun
// statuses, stream casts, warp reductions.
#ifndef MOERUN_CUDA_UTIL_CUH
#define MOERUN_CUDA_UTIL_CUH

extern "C" {
#include "internal.h"
}

#include <cuda_runtime.h>

#include <stdint.h>

// A failed CUDA call as MOERUN_ERR_BACKEND naming the call and file:line. The runtime keeps the
// status of a failed call as its "last error" until cudaGetLastError reads it, and the next
// launch check would report it again against an innocent kernel: read (clear) it here. A sticky
// error (a kernel fault) stays whatever is cleared: every later call reports it.
static inline int cuda_util_fail(cudaError_t e, const char *what, const char *file, int line) {
    (void)cudaGetLastError();
    return mr_err(MOERUN_ERR_BACKEND, "cuda: %s: %s (%s:%d)", what, cudaGetErrorString(e), file,
                  line);
}

#define cuda_util_err(e, what) cuda_util_fail((e), (what), __FILE__, __LINE__)

// After a launch: a launch failure returns MOERUN_ERR_BACKEND from the enclosing function.
#define cuda_util_check_launch(kernel)                                                             \
    do {                                                                                           \
        cudaError_t e_ = cudaGetLastError();                                                       \
        if (e_ != cudaSuccess)                                                                     \
            return cuda_util_err(e_, "kernel " kernel);                                            \
    } while (0)

#define CUDA_WARP 32

// Grid limits every launch is checked against (the x dimension allows 2^31 - 1 blocks; the
// grid-stride kernels stop at CUDA_GRID_STRIDE_MAX and loop).
#define CUDA_GRID_X_MAX      2147483647LL
#define CUDA_GRID_YZ_MAX     65535LL
#define CUDA_GRID_STRIDE_MAX 65536LL

static inline cudaStream_t cuda_util_stream(void *s) {
    return (cudaStream_t)s;
}

// Blocks of threads for a grid-stride loop over n items (n > 0): at most CUDA_GRID_STRIDE_MAX.
static inline unsigned cuda_util_stride_blocks(int64_t n, int threads) {
    const int64_t b = (n + threads - 1) / threads;
    return (unsigned)(b > CUDA_GRID_STRIDE_MAX ? CUDA_GRID_STRIDE_MAX : b);
}

static __device__ __forceinline__ float cuda_util_warp_sum(float v) {
#pragma unroll
    for (int o = CUDA_WARP / 2; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

static __device__ __forceinline__ float cuda_util_warp_max(float v) {
#pragma unroll
    for (int o = CUDA_WARP / 2; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

#endif // MOERUN_CUDA_UTIL_CUH
