// CUDA device discovery. Every CUDA status becomes a moerun status with a message.
#include "cuda_backend.h"

#include "cuda_util.cuh"

#include <string.h>

extern "C" int cuda_device_count(int *n) {
    *n = 0;
    cudaError_t e = cudaGetDeviceCount(n);
    if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) {
        cudaGetLastError(); // clear the sticky status
        *n = 0;
        return MOERUN_OK;
    }
    if (e != cudaSuccess) {
        *n = 0;
        return cuda_util_err(e, "cudaGetDeviceCount");
    }
    return MOERUN_OK;
}

extern "C" int cuda_device_describe(int dev, char *name, unsigned long name_size,
                                    unsigned long long *mem) {
    cudaDeviceProp prop;
    cudaError_t e = cudaGetDeviceProperties(&prop, dev);
    if (e != cudaSuccess)
        return cuda_util_err(e, "cudaGetDeviceProperties");
    if (name && name_size) {
        strncpy(name, prop.name, name_size - 1);
        name[name_size - 1] = '\0';
    }
    if (mem)
        *mem = prop.totalGlobalMem;
    return MOERUN_OK;
}
