/* GGUF writer: metadata and tensor infos, then tensor data streamed in the order the tensors
 * were added, zero padding to the alignment before the data section and between tensors. */
#include "gguf.h"
#include "internal.h"
#include "types.h"

#include <errno.h>
#include <inttypes.h>
#include <stdalign.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the GGUF writer assumes a little-endian host"
#endif

#define GGUF_MAX_NESTING 16 /* as the reader accepts */

enum writer_state { W_SETUP, W_DATA, W_DONE, W_FAILED };

struct wbuf {
    unsigned char *p;
    size_t len, cap;
};

struct wkey {
    char *s;
    size_t len;
};

struct wtensor {
    char *name;
    size_t name_len;
    uint32_t n_dims;
    uint64_t ne[GGUF_MAX_DIMS];
    int type;
    uint64_t offset; /* relative to the data section */
    uint64_t nbytes;
};

struct gguf_writer {
    moerun_allocator alloc; /* alloc == NULL: system */
    uint32_t version;
    uint32_t alignment;
    enum writer_state state;
    int fail_status;
    struct wbuf meta; /* serialized key/value pairs */
    uint64_t n_kv;
    struct wkey *keys; /* for duplicate checks */
    size_t keys_cap;
    struct wtensor *tensors;
    uint64_t n_tensors, tensors_cap;
    uint64_t data_size; /* bytes of the data section so far (end of the last tensor) */
    /* streaming */
    int fd;
    uint64_t file_pos; /* bytes written to fd */
    uint64_t data_pos; /* position inside the data section */
    uint64_t cur;      /* tensor receiving data */
};

static const moerun_allocator *w_alloc(const struct gguf_writer *w) {
    return w->alloc.alloc ? &w->alloc : NULL;
}

/* Grow *p (of *cap elements of esz bytes) to hold at least need elements. */
static int grow(struct gguf_writer *w, void **p, size_t *cap, size_t need, size_t esz) {
    if (need <= *cap)
        return MOERUN_OK;
    size_t ncap = *cap ? *cap : 16;
    while (ncap < need) {
        if (ncap > SIZE_MAX / 2)
            return mr_err(MOERUN_ERR_NOMEM, "gguf writer: out of memory");
        ncap *= 2;
    }
    size_t bytes;
    if (__builtin_mul_overflow(ncap, esz, &bytes))
        return mr_err(MOERUN_ERR_NOMEM, "gguf writer: out of memory");
    void *np = mr_alloc(w_alloc(w), bytes, 0);
    if (!np)
        return mr_err(MOERUN_ERR_NOMEM, "gguf writer: out of memory (%zu bytes)", bytes);
    if (*p)
        memcpy(np, *p, *cap * esz);
    mr_free(w_alloc(w), *p);
    *p = np;
    *cap = ncap;
    return MOERUN_OK;
}

static int wb_put(struct gguf_writer *w, struct wbuf *b, const void *data, size_t n) {
    if (n > SIZE_MAX - b->len)
        return mr_err(MOERUN_ERR_NOMEM, "gguf writer: out of memory");
    void *p = b->p;
    int st = grow(w, &p, &b->cap, b->len + n, 1);
    b->p = p;
    if (st < 0)
        return st;
    if (n)
        memcpy(b->p + b->len, data, n);
    b->len += n;
    return MOERUN_OK;
}

static int wb_u32(struct gguf_writer *w, struct wbuf *b, uint32_t v) {
    return wb_put(w, b, &v, 4);
}

static int wb_u64(struct gguf_writer *w, struct wbuf *b, uint64_t v) {
    return wb_put(w, b, &v, 8);
}

static int wb_str(struct gguf_writer *w, struct wbuf *b, const char *s, uint64_t len) {
    int st = wb_u64(w, b, len);
    if (st < 0)
        return st;
    if (len > SIZE_MAX)
        return mr_err(MOERUN_ERR_NOMEM, "gguf writer: string too long");
    return wb_put(w, b, s, (size_t)len);
}

int gguf_writer_create(const moerun_allocator *a, struct gguf_writer **out) {
    if (!out)
        return mr_err(MOERUN_ERR_INVALID_ARG, "gguf writer: out is NULL");
    *out = NULL;
    struct gguf_writer *w = mr_alloc(a, sizeof(*w), 0);
    if (!w)
        return mr_err(MOERUN_ERR_NOMEM, "gguf writer: out of memory");
    memset(w, 0, sizeof(*w));
    if (a)
        w->alloc = *a;
    w->version = 3;
    w->alignment = GGUF_DEFAULT_ALIGNMENT;
    w->state = W_SETUP;
    w->fd = -1;
    *out = w;
    return MOERUN_OK;
}

void gguf_writer_destroy(struct gguf_writer *w) {
    if (!w)
        return;
    moerun_allocator copy = w->alloc;
    const moerun_allocator *a = copy.alloc ? &copy : NULL;
    for (uint64_t i = 0; i < w->n_kv; i++)
        mr_free(a, w->keys[i].s);
    mr_free(a, w->keys);
    for (uint64_t i = 0; i < w->n_tensors; i++)
        mr_free(a, w->tensors[i].name);
    mr_free(a, w->tensors);
    mr_free(a, w->meta.p);
    mr_free(a, w);
}

static int check_setup(const struct gguf_writer *w, const char *what) {
    if (!w)
        return mr_err(MOERUN_ERR_INVALID_ARG, "gguf writer: %s: writer is NULL", what);
    if (w->state != W_SETUP)
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "gguf writer: %s: only allowed before gguf_writer_begin", what);
    return MOERUN_OK;
}

int gguf_writer_set_version(struct gguf_writer *w, uint32_t version) {
    int st = check_setup(w, "set_version");
    if (st < 0)
        return st;
    if (version != 2 && version != 3)
        return mr_err(MOERUN_ERR_INVALID_ARG, "gguf writer: version %" PRIu32 " (2 or 3 only)",
                      version);
    w->version = version;
    return MOERUN_OK;
}

/* Serialize the body of a value of type t (no type tag). */
static int put_value(struct gguf_writer *w, const char *key, const struct gguf_value *v, int depth);

/* Bytes of a scalar value; 0 for strings and arrays. */
static size_t scalar_size(enum gguf_vtype t) {
    return t == GGUF_VT_STRING || t == GGUF_VT_ARRAY ? 0 : (size_t)gguf_vtype_size(t);
}

static int put_array(struct gguf_writer *w, const char *key, const struct gguf_array *a,
                     int depth) {
    int st;
    if (depth > GGUF_MAX_NESTING)
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "gguf writer: key '%s': arrays nested deeper than %d levels", key,
                      GGUF_MAX_NESTING);
    if ((unsigned)a->elem_type >= GGUF_VT_COUNT)
        return mr_err(MOERUN_ERR_INVALID_ARG, "gguf writer: key '%s': array element type %d", key,
                      (int)a->elem_type);
    if (a->n > 0 && !a->data)
        return mr_err(MOERUN_ERR_INVALID_ARG, "gguf writer: key '%s': array data is NULL", key);
    if ((st = wb_u32(w, &w->meta, (uint32_t)a->elem_type)) < 0 ||
        (st = wb_u64(w, &w->meta, a->n)) < 0)
        return st;
    size_t esz = scalar_size(a->elem_type);
    if (esz) {
        if (a->n > SIZE_MAX / esz)
            return mr_err(MOERUN_ERR_NOMEM, "gguf writer: key '%s': array too large", key);
        if (a->elem_type == GGUF_VT_BOOL) {
            const uint8_t *b = a->data;
            for (uint64_t i = 0; i < a->n; i++) {
                uint8_t x = b[i] != 0;
                if ((st = wb_put(w, &w->meta, &x, 1)) < 0)
                    return st;
            }
            return MOERUN_OK;
        }
        return wb_put(w, &w->meta, a->data, (size_t)(a->n * esz));
    }
    if (a->elem_type == GGUF_VT_STRING) {
        const struct gguf_str *s = a->data;
        for (uint64_t i = 0; i < a->n; i++) {
            if (s[i].len > 0 && !s[i].ptr)
                return mr_err(MOERUN_ERR_INVALID_ARG,
                              "gguf writer: key '%s': string %" PRIu64 " is NULL", key, i);
            if ((st = wb_str(w, &w->meta, s[i].ptr, s[i].len)) < 0)
                return st;
        }
        return MOERUN_OK;
    }
    const struct gguf_value *vs = a->data;
    for (uint64_t i = 0; i < a->n; i++) {
        if (vs[i].type != GGUF_VT_ARRAY)
            return mr_err(MOERUN_ERR_INVALID_ARG,
                          "gguf writer: key '%s': element %" PRIu64 " of an array of arrays is %s",
                          key, i, gguf_vtype_name(vs[i].type));
        if ((st = put_array(w, key, &vs[i].v.arr, depth + 1)) < 0)
            return st;
    }
    return MOERUN_OK;
}

static int put_value(struct gguf_writer *w, const char *key, const struct gguf_value *v,
                     int depth) {
    const char *range = NULL;
    union {
        uint8_t u8;
        int8_t i8;
        uint16_t u16;
        int16_t i16;
        uint32_t u32;
        int32_t i32;
        float f32;
        uint64_t u64;
    } x;
    switch (v->type) {
    case GGUF_VT_U8:
        x.u8 = (uint8_t)v->v.u64;
        range = v->v.u64 > UINT8_MAX ? "U8" : NULL;
        break;
    case GGUF_VT_BOOL:
        x.u8 = v->v.u64 != 0;
        break;
    case GGUF_VT_I8:
        x.i8 = (int8_t)v->v.i64;
        range = v->v.i64 < INT8_MIN || v->v.i64 > INT8_MAX ? "I8" : NULL;
        break;
    case GGUF_VT_U16:
        x.u16 = (uint16_t)v->v.u64;
        range = v->v.u64 > UINT16_MAX ? "U16" : NULL;
        break;
    case GGUF_VT_I16:
        x.i16 = (int16_t)v->v.i64;
        range = v->v.i64 < INT16_MIN || v->v.i64 > INT16_MAX ? "I16" : NULL;
        break;
    case GGUF_VT_U32:
        x.u32 = (uint32_t)v->v.u64;
        range = v->v.u64 > UINT32_MAX ? "U32" : NULL;
        break;
    case GGUF_VT_I32:
        x.i32 = (int32_t)v->v.i64;
        range = v->v.i64 < INT32_MIN || v->v.i64 > INT32_MAX ? "I32" : NULL;
        break;
    case GGUF_VT_F32:
        x.f32 = (float)v->v.f64;
        break;
    case GGUF_VT_U64:
    case GGUF_VT_I64:
    case GGUF_VT_F64:
        memcpy(&x.u64, &v->v, 8);
        break;
    case GGUF_VT_STRING:
        if (v->v.str.len > 0 && !v->v.str.ptr)
            return mr_err(MOERUN_ERR_INVALID_ARG, "gguf writer: key '%s': string is NULL", key);
        return wb_str(w, &w->meta, v->v.str.ptr, v->v.str.len);
    case GGUF_VT_ARRAY:
        return put_array(w, key, &v->v.arr, depth);
    default:
        return mr_err(MOERUN_ERR_INVALID_ARG, "gguf writer: key '%s': unknown value type %d", key,
                      (int)v->type);
    }
    if (range)
        return mr_err(MOERUN_ERR_INVALID_ARG, "gguf writer: key '%s': value out of range for %s",
                      key, range);
    return wb_put(w, &w->meta, &x, scalar_size(v->type));
}

int gguf_writer_set_value(struct gguf_writer *w, const char *key, const struct gguf_value *v) {
    int st = check_setup(w, "set_value");
    if (st < 0)
        return st;
    if (!key || !*key || !v)
        return mr_err(MOERUN_ERR_INVALID_ARG, "gguf writer: empty key or NULL value");
    size_t klen = strlen(key);
    for (uint64_t i = 0; i < w->n_kv; i++)
        if (w->keys[i].len == klen && memcmp(w->keys[i].s, key, klen) == 0)
            return mr_err(MOERUN_ERR_INVALID_ARG, "gguf writer: key '%s' set twice", key);
    bool is_align = strcmp(key, "general.alignment") == 0;
    if (is_align) {
        if (v->type != GGUF_VT_U32)
            return mr_err(MOERUN_ERR_INVALID_ARG,
                          "gguf writer: general.alignment must be a U32, not %s",
                          gguf_vtype_name(v->type));
        if (v->v.u64 == 0 || v->v.u64 > UINT32_MAX || (v->v.u64 & (v->v.u64 - 1)) != 0)
            return mr_err(MOERUN_ERR_INVALID_ARG,
                          "gguf writer: general.alignment %" PRIu64 " is not a power of two",
                          v->v.u64);
        if (w->n_tensors > 0)
            return mr_err(MOERUN_ERR_INVALID_ARG,
                          "gguf writer: general.alignment must be set before adding tensors");
    }
    void *kp = w->keys;
    st = grow(w, &kp, &w->keys_cap, (size_t)w->n_kv + 1, sizeof(struct wkey));
    w->keys = kp;
    if (st < 0)
        return st;
    char *kcopy = mr_alloc(w_alloc(w), klen + 1, 1);
    if (!kcopy)
        return mr_err(MOERUN_ERR_NOMEM, "gguf writer: out of memory");
    memcpy(kcopy, key, klen + 1);
    size_t saved = w->meta.len;
    if ((st = wb_str(w, &w->meta, key, klen)) < 0 ||
        (st = wb_u32(w, &w->meta, (uint32_t)v->type)) < 0 || (st = put_value(w, key, v, 1)) < 0) {
        w->meta.len = saved;
        mr_free(w_alloc(w), kcopy);
        return st;
    }
    w->keys[w->n_kv].s = kcopy;
    w->keys[w->n_kv].len = klen;
    w->n_kv++;
    if (is_align)
        w->alignment = (uint32_t)v->v.u64;
    return MOERUN_OK;
}

int gguf_writer_set_u32(struct gguf_writer *w, const char *key, uint32_t v) {
    struct gguf_value x = {.type = GGUF_VT_U32, .v.u64 = v};
    return gguf_writer_set_value(w, key, &x);
}

int gguf_writer_set_i32(struct gguf_writer *w, const char *key, int32_t v) {
    struct gguf_value x = {.type = GGUF_VT_I32, .v.i64 = v};
    return gguf_writer_set_value(w, key, &x);
}

int gguf_writer_set_u64(struct gguf_writer *w, const char *key, uint64_t v) {
    struct gguf_value x = {.type = GGUF_VT_U64, .v.u64 = v};
    return gguf_writer_set_value(w, key, &x);
}

int gguf_writer_set_f32(struct gguf_writer *w, const char *key, float v) {
    struct gguf_value x = {.type = GGUF_VT_F32, .v.f64 = v};
    return gguf_writer_set_value(w, key, &x);
}

int gguf_writer_set_bool(struct gguf_writer *w, const char *key, bool v) {
    struct gguf_value x = {.type = GGUF_VT_BOOL, .v.u64 = v};
    return gguf_writer_set_value(w, key, &x);
}

int gguf_writer_set_str(struct gguf_writer *w, const char *key, const char *v) {
    if (!v)
        return mr_err(MOERUN_ERR_INVALID_ARG, "gguf writer: key '%s': string is NULL",
                      key ? key : "(null)");
    struct gguf_value x = {.type = GGUF_VT_STRING, .v.str = {v, strlen(v)}};
    return gguf_writer_set_value(w, key, &x);
}

int gguf_writer_set_arr(struct gguf_writer *w, const char *key, enum gguf_vtype elem_type,
                        const void *data, uint64_t n) {
    if (!scalar_size(elem_type))
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "gguf writer: key '%s': set_arr takes scalar element types, not %s",
                      key ? key : "(null)", gguf_vtype_name(elem_type));
    struct gguf_value x = {.type = GGUF_VT_ARRAY, .v.arr = {elem_type, n, data}};
    return gguf_writer_set_value(w, key, &x);
}

int gguf_writer_set_arr_str(struct gguf_writer *w, const char *key, const char *const *strs,
                            uint64_t n) {
    int st = check_setup(w, "set_arr_str");
    if (st < 0)
        return st;
    if (n > 0 && !strs)
        return mr_err(MOERUN_ERR_INVALID_ARG, "gguf writer: key '%s': strings are NULL",
                      key ? key : "(null)");
    if (n > SIZE_MAX / sizeof(struct gguf_str))
        return mr_err(MOERUN_ERR_NOMEM, "gguf writer: out of memory");
    struct gguf_str *s = mr_alloc(w_alloc(w), (size_t)n * sizeof(*s), 0);
    if (!s)
        return mr_err(MOERUN_ERR_NOMEM, "gguf writer: out of memory");
    for (uint64_t i = 0; i < n; i++) {
        s[i].ptr = strs[i];
        s[i].len = strs[i] ? strlen(strs[i]) : 0;
        if (!strs[i]) {
            mr_free(w_alloc(w), s);
            return mr_err(MOERUN_ERR_INVALID_ARG,
                          "gguf writer: key '%s': string %" PRIu64 " is NULL", key ? key : "(null)",
                          i);
        }
    }
    struct gguf_value x = {.type = GGUF_VT_ARRAY, .v.arr = {GGUF_VT_STRING, n, s}};
    st = gguf_writer_set_value(w, key, &x);
    mr_free(w_alloc(w), s);
    return st;
}

int gguf_writer_add_tensor(struct gguf_writer *w, const char *name, int type, uint32_t n_dims,
                           const uint64_t *ne) {
    int st = check_setup(w, "add_tensor");
    if (st < 0)
        return st;
    if (!name || !*name || !ne)
        return mr_err(MOERUN_ERR_INVALID_ARG, "gguf writer: tensor with empty name or no shape");
    size_t nlen = strlen(name);
    for (uint64_t i = 0; i < w->n_tensors; i++)
        if (w->tensors[i].name_len == nlen && memcmp(w->tensors[i].name, name, nlen) == 0)
            return mr_err(MOERUN_ERR_INVALID_ARG, "gguf writer: tensor '%s' added twice", name);
    if (n_dims < 1 || n_dims > GGUF_MAX_DIMS)
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "gguf writer: tensor '%s': n_dims %" PRIu32 " is not in 1..%d", name, n_dims,
                      GGUF_MAX_DIMS);
    const struct mr_type_info *ti = mr_type_info(type);
    if (!ti)
        return mr_err(MOERUN_ERR_INVALID_ARG, "gguf writer: tensor '%s': unknown type %d", name,
                      type);
    uint64_t n_el = 1;
    for (uint32_t d = 0; d < n_dims; d++) {
        if (ne[d] == 0 || mr_mul_overflow_u64(n_el, ne[d], &n_el) || n_el > INT64_MAX)
            return mr_err(MOERUN_ERR_INVALID_ARG,
                          "gguf writer: tensor '%s': bad shape (ne[%" PRIu32 "] = %" PRIu64 ")",
                          name, d, ne[d]);
    }
    uint64_t nbytes, offset, end;
    if (ne[0] % ti->blck != 0 || !mr_type_nbytes(type, n_el, &nbytes))
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "gguf writer: tensor '%s': ne[0] = %" PRIu64
                      " is not a multiple of the %s block size %" PRIu32,
                      name, ne[0], ti->name, ti->blck);
    uint64_t rem = w->data_size % w->alignment;
    if (mr_add_overflow_u64(w->data_size, rem ? w->alignment - rem : 0, &offset) ||
        mr_add_overflow_u64(offset, nbytes, &end) || end > INT64_MAX)
        return mr_err(MOERUN_ERR_INVALID_ARG, "gguf writer: tensor '%s': data size overflows",
                      name);
    void *p = w->tensors;
    size_t cap = (size_t)w->tensors_cap;
    if ((st = grow(w, &p, &cap, (size_t)w->n_tensors + 1, sizeof(struct wtensor))) < 0)
        return st;
    w->tensors = p;
    w->tensors_cap = cap;
    char *copy = mr_alloc(w_alloc(w), nlen + 1, 1);
    if (!copy)
        return mr_err(MOERUN_ERR_NOMEM, "gguf writer: out of memory");
    memcpy(copy, name, nlen + 1);
    struct wtensor *t = &w->tensors[w->n_tensors];
    memset(t, 0, sizeof(*t));
    t->name = copy;
    t->name_len = nlen;
    t->n_dims = n_dims;
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++)
        t->ne[d] = d < n_dims ? ne[d] : 1;
    t->type = type;
    t->offset = offset;
    t->nbytes = nbytes;
    w->data_size = end;
    w->n_tensors++;
    return MOERUN_OK;
}

/* --- streaming ------------------------------------------------------------------------------ */

static int fail(struct gguf_writer *w, int st) {
    w->state = W_FAILED;
    w->fail_status = st;
    return st;
}

static int write_all(struct gguf_writer *w, const void *data, uint64_t n) {
    const unsigned char *p = data;
    while (n > 0) {
        size_t chunk = (size_t)MR_MIN(n, (uint64_t)1 << 30);
        ssize_t r = write(w->fd, p, chunk);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            int e = errno;
            char buf[128];
            const char *text = strerror_r(e, buf, sizeof(buf));
            return fail(w, mr_err(MOERUN_ERR_IO,
                                  "gguf writer: write at file offset %" PRIu64 ": %s (errno %d)",
                                  w->file_pos, text, e));
        }
        if (r == 0)
            return fail(w, mr_err(MOERUN_ERR_IO,
                                  "gguf writer: write at file offset %" PRIu64 " wrote nothing",
                                  w->file_pos));
        p += r;
        n -= (uint64_t)r;
        w->file_pos += (uint64_t)r;
    }
    return MOERUN_OK;
}

static int write_zeros(struct gguf_writer *w, uint64_t n) {
    static const unsigned char zeros[4096];
    while (n > 0) {
        uint64_t c = MR_MIN(n, (uint64_t)sizeof(zeros));
        int st = write_all(w, zeros, c);
        if (st < 0)
            return st;
        n -= c;
    }
    return MOERUN_OK;
}

int gguf_writer_begin(struct gguf_writer *w, int fd) {
    int st = check_setup(w, "begin");
    if (st < 0)
        return st;
    if (fd < 0)
        return mr_err(MOERUN_ERR_INVALID_ARG, "gguf writer: bad file descriptor %d", fd);
    struct wbuf h = {0};
    if ((st = wb_u32(w, &h, GGUF_MAGIC)) < 0 || (st = wb_u32(w, &h, w->version)) < 0 ||
        (st = wb_u64(w, &h, w->n_tensors)) < 0 || (st = wb_u64(w, &h, w->n_kv)) < 0 ||
        (st = wb_put(w, &h, w->meta.p, w->meta.len)) < 0)
        goto out_free;
    for (uint64_t i = 0; i < w->n_tensors; i++) {
        const struct wtensor *t = &w->tensors[i];
        if ((st = wb_str(w, &h, t->name, t->name_len)) < 0 || (st = wb_u32(w, &h, t->n_dims)) < 0)
            goto out_free;
        for (uint32_t d = 0; d < t->n_dims; d++)
            if ((st = wb_u64(w, &h, t->ne[d])) < 0)
                goto out_free;
        if ((st = wb_u32(w, &h, (uint32_t)t->type)) < 0 || (st = wb_u64(w, &h, t->offset)) < 0)
            goto out_free;
    }
    w->fd = fd;
    w->state = W_DATA;
    w->file_pos = 0;
    if ((st = write_all(w, h.p, h.len)) < 0)
        goto out_free;
    uint64_t rem = w->file_pos % w->alignment;
    if (rem && (st = write_zeros(w, w->alignment - rem)) < 0)
        goto out_free;
    w->data_pos = 0;
    w->cur = 0;
out_free:
    mr_free(w_alloc(w), h.p);
    return st;
}

static int check_data_state(struct gguf_writer *w, const char *what) {
    if (!w)
        return mr_err(MOERUN_ERR_INVALID_ARG, "gguf writer: %s: writer is NULL", what);
    if (w->state == W_FAILED)
        return mr_err(w->fail_status, "gguf writer: %s: an earlier write failed", what);
    if (w->state != W_DATA)
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "gguf writer: %s: only allowed between begin and finish", what);
    return MOERUN_OK;
}

int gguf_writer_write_data(struct gguf_writer *w, const void *data, uint64_t n) {
    int st = check_data_state(w, "write_data");
    if (st < 0)
        return st;
    if (n > 0 && !data)
        return mr_err(MOERUN_ERR_INVALID_ARG, "gguf writer: write_data: data is NULL");
    const unsigned char *p = data;
    while (n > 0) {
        if (w->cur >= w->n_tensors)
            return mr_err(MOERUN_ERR_INVALID_ARG,
                          "gguf writer: %" PRIu64 " bytes of data beyond the last tensor", n);
        const struct wtensor *t = &w->tensors[w->cur];
        if (w->data_pos < t->offset) {
            if ((st = write_zeros(w, t->offset - w->data_pos)) < 0)
                return st;
            w->data_pos = t->offset;
        }
        uint64_t c = MR_MIN(n, t->offset + t->nbytes - w->data_pos);
        if ((st = write_all(w, p, c)) < 0)
            return st;
        p += c;
        n -= c;
        w->data_pos += c;
        if (w->data_pos == t->offset + t->nbytes)
            w->cur++;
    }
    return MOERUN_OK;
}

int gguf_writer_finish(struct gguf_writer *w) {
    int st = check_data_state(w, "finish");
    if (st < 0)
        return st;
    if (w->cur < w->n_tensors) {
        const struct wtensor *t = &w->tensors[w->cur];
        uint64_t got = w->data_pos > t->offset ? w->data_pos - t->offset : 0;
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "gguf writer: tensor '%s' got %" PRIu64 " of its %" PRIu64 " bytes (%" PRIu64
                      " of %" PRIu64 " tensors complete)",
                      t->name, got, t->nbytes, w->cur, w->n_tensors);
    }
    w->state = W_DONE;
    return MOERUN_OK;
}
