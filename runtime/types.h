/* GGML weight type table: block size and bytes per block for every type GGUF files hold. */
#ifndef MOERUN_TYPES_H
#define MOERUN_TYPES_H

#include <stdbool.h>
#include <stdint.h>

#define MR_TYPE_COUNT 40 /* type ids are < MR_TYPE_COUNT */

struct mr_type_info {
    const char *name;   /* GGML name, "Q4_K" */
    uint32_t blck;      /* elements per block */
    uint32_t type_size; /* bytes per block */
    bool supported;     /* the CPU kernels compute with it */
};

/* The entry for a type id, or NULL when the id is not a GGML type. */
const struct mr_type_info *mr_type_info(int type);

/* Bytes of n elements of type (n a multiple of the block size); false when the type is
 * unknown, n is not a whole number of blocks, or the size overflows. */
bool mr_type_nbytes(int type, uint64_t n, uint64_t *bytes);

#endif /* MOERUN_TYPES_H */
