// Helpers shared by the CUDA sources (private to cuda/): CUDA statuses to moerun statuses.
#ifndef MOERUN_CUDA_UTIL_CUH
#define MOERUN_CUDA_UTIL_CUH

extern "C" {
#include "internal.h"
}

#include <cuda_runtime.h>

#include <stdint.h>

// A CUDA status as MOERUN_ERR_BACKEND, naming the call or kernel and file:line.
#define cuda_util_err(e, what)                                                                     \
    mr_err(MOERUN_ERR_BACKEND, "cuda: %s: %s (%s:%d)", (what), cudaGetErrorString(e), __FILE__,    \
           __LINE__)

// After a launch: a launch failure returns MOERUN_ERR_BACKEND from the enclosing function.
#define cuda_util_check_launch(kernel)                                                             \
    do {                                                                                           \
        cudaError_t e_ = cudaGetLastError();                                                       \
        if (e_ != cudaSuccess)                                                                     \
            return cuda_util_err(e_, "kernel " kernel);                                            \
    } while (0)

#define CUDA_WARP 32

static inline cudaStream_t cuda_util_stream(void *s) {
    return (cudaStream_t)s;
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
