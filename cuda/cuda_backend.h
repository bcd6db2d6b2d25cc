/* CUDA backend (internal, C linkage). */
#ifndef MOERUN_CUDA_BACKEND_H
#define MOERUN_CUDA_BACKEND_H

#ifdef __cplusplus
extern "C" {
#endif

/* Number of usable CUDA devices in *n (0 when there is no device or no driver: that is not
 * an error). Returns MOERUN_OK or MOERUN_ERR_BACKEND with the CUDA error in the message. */
int cuda_device_count(int *n);

/* Name and memory of device dev. Returns MOERUN_OK or MOERUN_ERR_BACKEND. */
int cuda_device_describe(int dev, char *name, unsigned long name_size, unsigned long long *mem);

#ifdef __cplusplus
}
#endif

#endif /* MOERUN_CUDA_BACKEND_H */
