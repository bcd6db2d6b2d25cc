/* GGUF v2/v3 reader and writer (internal).
 *
 * The reader takes nothing on trust: every count, length, offset and size is checked against
 * the file's size before it is used, and no allocation is sized from a value in the file
 * before that check. Errors return a negative moerun status with a message naming the key or
 * tensor and the byte offset (moerun_errmsg()).
 *
 * File layout (all little-endian):
 *   u32 magic "GGUF", u32 version, u64 n_tensors, u64 n_kv,
 *   n_kv x { string key, u32 type, value },
 *   n_tensors x { string name, u32 n_dims, u64 ne[n_dims], u32 type, u64 offset },
 *   padding to general.alignment (default 32), tensor data (offsets relative to its start).
 *   string = u64 length + bytes (no NUL); array = u32 elem_type + u64 n + n values.
 */
#ifndef MOERUN_GGUF_H
#define MOERUN_GGUF_H

#include "moerun.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define GGUF_MAGIC             0x46554747u /* "GGUF" little-endian */
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_DIMS          4
#define GGUF_MAX_NESTING       16 /* arrays of arrays, levels */

enum gguf_vtype {
    GGUF_VT_U8 = 0,
    GGUF_VT_I8 = 1,
    GGUF_VT_U16 = 2,
    GGUF_VT_I16 = 3,
    GGUF_VT_U32 = 4,
    GGUF_VT_I32 = 5,
    GGUF_VT_F32 = 6,
    GGUF_VT_BOOL = 7,
    GGUF_VT_STRING = 8,
    GGUF_VT_ARRAY = 9,
    GGUF_VT_U64 = 10,
    GGUF_VT_I64 = 11,
    GGUF_VT_F64 = 12,
    GGUF_VT_COUNT
};

struct gguf_str {
    const char *ptr; /* NUL-terminated copy; may contain embedded NULs, len is authoritative */
    uint64_t len;
};

struct gguf_value;

struct gguf_array {
    enum gguf_vtype elem_type;
    uint64_t n;
    /* elements, by elem_type: scalars packed as in the file (uint8_t[], int32_t[], float[],
     * bool as uint8_t[], ...), strings as struct gguf_str[], arrays as struct gguf_value[] */
    const void *data;
};

struct gguf_value {
    enum gguf_vtype type;
    union {
        uint64_t u64; /* U8, U16, U32, U64, BOOL (0/1) */
        int64_t i64;  /* I8, I16, I32, I64 */
        double f64;   /* F32, F64 */
        struct gguf_str str;
        struct gguf_array arr;
    } v;
};

struct gguf_kv {
    struct gguf_str key;
    struct gguf_value value;
    uint64_t offset; /* byte offset of the key in the file, for messages */
};

struct gguf_tensor {
    struct gguf_str name;
    uint32_t n_dims;            /* 1..4 */
    uint64_t ne[GGUF_MAX_DIMS]; /* elements per dim, ne[0] fastest; unused dims are 1 */
    int type;                   /* moerun_type / ggml_type id, known (mr_type_info != NULL) */
    uint64_t offset;            /* absolute byte offset of the data in the file */
    uint64_t nbytes;            /* bytes of data, from type and shape */
    uint64_t n_elements;        /* product of ne */
    uint64_t info_offset;       /* byte offset of the tensor info in the file, for messages */
};

struct gguf_ctx {
    uint32_t version;
    uint32_t alignment;
    uint64_t file_size;
    uint64_t data_offset; /* absolute start of the tensor data section */
    uint64_t n_kv;
    struct gguf_kv *kv;
    uint64_t n_tensors;
    struct gguf_tensor *tensors;
    /* private: arena and lookup tables owned by the context */
    void *priv;
};

/* Where bytes come from: a file descriptor (pread) or a memory buffer (tests, fuzzing). */
struct gguf_source {
    int fd;          /* >= 0: read with pread from this descriptor */
    const void *mem; /* fd < 0: read from this buffer */
    uint64_t size;   /* bytes available (the file's size) */
};

/* Parse and validate. Returns MOERUN_OK and *out, or an error with *out = NULL.
 * a may be NULL (system allocator). Memory use is bounded by a small multiple of the
 * header's size in the file. */
int gguf_open_source(const struct gguf_source *src, const moerun_allocator *a,
                     struct gguf_ctx **out);
int gguf_open_file(const char *path, const moerun_allocator *a, struct gguf_ctx **out);
void gguf_close(struct gguf_ctx *ctx); /* NULL is a no-op */

/* Lookups: the index, or -1 when absent. */
int64_t gguf_find_key(const struct gguf_ctx *ctx, const char *key);
int64_t gguf_find_tensor(const struct gguf_ctx *ctx, const char *name);
const struct gguf_kv *gguf_get_kv(const struct gguf_ctx *ctx, const char *key); /* or NULL */
const struct gguf_tensor *gguf_get_tensor(const struct gguf_ctx *ctx, const char *name);

/* Typed getters. Integers convert between integer types when the value fits (else
 * MOERUN_ERR_FORMAT naming the key); floats accept F32/F64. Return MOERUN_OK,
 * MOERUN_ERR_FORMAT (wrong type or out of range), or 1 when the key is absent and
 * *out is left unchanged (so defaults can be preset). */
int gguf_get_u32(const struct gguf_ctx *ctx, const char *key, uint32_t *out);
int gguf_get_u64(const struct gguf_ctx *ctx, const char *key, uint64_t *out);
int gguf_get_i64(const struct gguf_ctx *ctx, const char *key, int64_t *out);
int gguf_get_f32(const struct gguf_ctx *ctx, const char *key, float *out);
int gguf_get_bool(const struct gguf_ctx *ctx, const char *key, bool *out);
int gguf_get_str(const struct gguf_ctx *ctx, const char *key, struct gguf_str *out);
int gguf_get_arr(const struct gguf_ctx *ctx, const char *key, struct gguf_array *out);

/* Render a value as text (arrays abbreviated); snprintf return convention. */
int gguf_value_format(const struct gguf_value *v, char *buf, size_t size);
const char *gguf_vtype_name(enum gguf_vtype t);
/* Bytes of one value of type t in the file: the scalar's size; for a string or an array, the
 * least it can take (its length / type and count fields); 0 for an unknown type. */
uint64_t gguf_vtype_size(uint32_t t);

/* ---------------------------------------------------------------------------------------------
 * Writer: metadata and tensor infos first, then tensor data streamed in the order the
 * tensors were added (so a 30 GB model never sits in memory).
 *
 *   struct gguf_writer *w; gguf_writer_create(a, &w);
 *   gguf_writer_set_str(w, "general.architecture", "llama"); ...
 *   gguf_writer_add_tensor(w, "token_embd.weight", MOERUN_TYPE_Q8_0, 2, ne);  ...
 *   gguf_writer_begin(w, fd);                 // header, metadata, tensor infos, padding
 *   gguf_writer_write_data(w, bytes, n);      // any chunking; padding between tensors added
 *   gguf_writer_finish(w);                    // checks every tensor got all its bytes
 *   gguf_writer_destroy(w);
 * ------------------------------------------------------------------------------------------- */

struct gguf_writer;

int gguf_writer_create(const moerun_allocator *a, struct gguf_writer **out);
void gguf_writer_destroy(struct gguf_writer *w); /* NULL is a no-op */

/* Version 3 by default; 2 is accepted for tests. */
int gguf_writer_set_version(struct gguf_writer *w, uint32_t version);

/* Metadata; a key set twice is an error. Values are copied. "general.alignment" set with
 * gguf_writer_set_u32 changes the alignment used for the data section. */
int gguf_writer_set_value(struct gguf_writer *w, const char *key, const struct gguf_value *v);
int gguf_writer_set_u32(struct gguf_writer *w, const char *key, uint32_t v);
int gguf_writer_set_i32(struct gguf_writer *w, const char *key, int32_t v);
int gguf_writer_set_u64(struct gguf_writer *w, const char *key, uint64_t v);
int gguf_writer_set_f32(struct gguf_writer *w, const char *key, float v);
int gguf_writer_set_bool(struct gguf_writer *w, const char *key, bool v);
int gguf_writer_set_str(struct gguf_writer *w, const char *key, const char *v);
/* array of scalars: elem_type a scalar type, data packed as in struct gguf_array */
int gguf_writer_set_arr(struct gguf_writer *w, const char *key, enum gguf_vtype elem_type,
                        const void *data, uint64_t n);
int gguf_writer_set_arr_str(struct gguf_writer *w, const char *key, const char *const *strs,
                            uint64_t n);

/* Tensor info; ne[0] is the fastest dimension and a multiple of the type's block size. */
int gguf_writer_add_tensor(struct gguf_writer *w, const char *name, int type, uint32_t n_dims,
                           const uint64_t *ne);

/* Writes to fd from its current position (expected 0). */
int gguf_writer_begin(struct gguf_writer *w, int fd);
int gguf_writer_write_data(struct gguf_writer *w, const void *data, uint64_t n);
int gguf_writer_finish(struct gguf_writer *w);

#endif /* MOERUN_GGUF_H */
