/* GGUF reader and writer: round trips of every value type, getters, formatting, hostile
 * files (each rejected with a message and bounded memory), writer errors, golden files.
 *
 *   test_gguf                      run the tests
 *   test_gguf --write-corpus DIR   write a handful of small valid GGUF files (fuzzing seeds) */
#include "testutil.h"

#include "gguf.h"
#include "internal.h"
#include "types.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* --- counting allocator --------------------------------------------------------------------- */

struct counter {
    size_t cur, peak;
    uint64_t n_allocs;
    uint64_t fail_after; /* allocations that succeed before failures start; UINT64_MAX = never */
};

#define CNT_HDR 16

static void *cnt_alloc(size_t size, size_t align, void *ud) {
    struct counter *c = ud;
    if (c->n_allocs >= c->fail_after)
        return NULL;
    c->n_allocs++;
    size_t hdr = align > CNT_HDR ? align : CNT_HDR;
    void *raw = NULL;
    if (size > SIZE_MAX - hdr || posix_memalign(&raw, hdr, size + hdr) != 0)
        return NULL;
    unsigned char *p = (unsigned char *)raw + hdr;
    memcpy(p - 16, &size, sizeof(size));
    memcpy(p - 8, &hdr, sizeof(hdr));
    c->cur += size;
    if (c->cur > c->peak)
        c->peak = c->cur;
    return p;
}

static void cnt_free(void *ptr, void *ud) {
    struct counter *c = ud;
    if (!ptr)
        return;
    unsigned char *p = ptr;
    size_t size, hdr;
    memcpy(&size, p - 16, sizeof(size));
    memcpy(&hdr, p - 8, sizeof(hdr));
    c->cur -= size;
    free(p - hdr);
}

static moerun_allocator counting(struct counter *c) {
    memset(c, 0, sizeof(*c));
    c->fail_after = UINT64_MAX;
    moerun_allocator a = {cnt_alloc, cnt_free, c};
    return a;
}

/* --- raw byte builder for hostile files ---------------------------------------------------- */

struct rb {
    unsigned char *p;
    size_t n, cap;
};

static void rb_bytes(struct rb *b, const void *d, size_t n) {
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n)
            cap *= 2;
        b->p = realloc(b->p, cap);
        assert_non_null(b->p);
        b->cap = cap;
    }
    if (n)
        memcpy(b->p + b->n, d, n);
    b->n += n;
}

static void rb_u32(struct rb *b, uint32_t v) {
    rb_bytes(b, &v, 4);
}

static void rb_u64(struct rb *b, uint64_t v) {
    rb_bytes(b, &v, 8);
}

static void rb_str(struct rb *b, const char *s) {
    rb_u64(b, strlen(s));
    rb_bytes(b, s, strlen(s));
}

static void rb_zeros(struct rb *b, size_t n) {
    static const unsigned char z[256];
    while (n > 0) {
        size_t c = MR_MIN(n, sizeof(z));
        rb_bytes(b, z, c);
        n -= c;
    }
}

static void rb_pad(struct rb *b, size_t align) {
    rb_zeros(b, (align - b->n % align) % align);
}

static void rb_header(struct rb *b, uint32_t version, uint64_t n_tensors, uint64_t n_kv) {
    rb_u32(b, GGUF_MAGIC);
    rb_u32(b, version);
    rb_u64(b, n_tensors);
    rb_u64(b, n_kv);
}

static void rb_kv_u32(struct rb *b, const char *key, uint32_t v) {
    rb_str(b, key);
    rb_u32(b, GGUF_VT_U32);
    rb_u32(b, v);
}

static void rb_tensor(struct rb *b, const char *name, uint32_t n_dims, const uint64_t *ne,
                      uint32_t type, uint64_t offset) {
    rb_str(b, name);
    rb_u32(b, n_dims);
    for (uint32_t d = 0; d < n_dims; d++)
        rb_u64(b, ne[d]);
    rb_u32(b, type);
    rb_u64(b, offset);
}

/* --- helpers -------------------------------------------------------------------------------- */

static struct tu_rng rng;

static int setup_rng(void **state) {
    (void)state;
    tu_rng_init(&rng, tu_seed());
    return 0;
}

static uint64_t rnd(uint64_t n) {
    return n ? tu_rng_u64(&rng) % n : 0;
}

/* Open from memory with a counting allocator; check the memory bound and that everything
 * is freed again on failure. */
static int open_mem_counted(const void *buf, size_t n, struct counter *c, struct gguf_ctx **ctx) {
    moerun_allocator a = counting(c);
    struct gguf_source src = {.fd = -1, .mem = buf, .size = n};
    int st = gguf_open_source(&src, &a, ctx);
    if (c->peak >= 16 * n + 65536)
        fail_msg("peak memory %zu bytes for a %zu-byte file (status %d: %s)", c->peak, n, st,
                 moerun_errmsg());
    if (st != MOERUN_OK)
        assert_int_equal(c->cur, 0);
    return st;
}

/* The file must be rejected with MOERUN_ERR_FORMAT and a message containing needle. */
static void expect_reject(const void *buf, size_t n, const char *needle) {
    struct counter c;
    struct gguf_ctx *ctx = (struct gguf_ctx *)&c; /* must be reset to NULL */
    mr_err_clear();
    int st = open_mem_counted(buf, n, &c, &ctx);
    if (st != MOERUN_ERR_FORMAT)
        fail_msg("expected a format error containing '%s', got %d (%s)", needle, st,
                 moerun_errmsg());
    assert_null(ctx);
    const char *msg = moerun_errmsg();
    assert_true(strlen(msg) > 0);
    if (needle && !strstr(msg, needle))
        fail_msg("message '%s' lacks '%s'", msg, needle);
}

static void rb_reject(struct rb *b, const char *needle) {
    expect_reject(b->p, b->n, needle);
    free(b->p);
    memset(b, 0, sizeof(*b));
}

/* Read a file the writer made. */
static unsigned char *slurp(const char *path, size_t *n) {
    unsigned char *buf = tu_read_file(path, n);
    assert_non_null(buf);
    return buf;
}

static int open_tmp(const char *path) {
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    assert_true(fd >= 0);
    return fd;
}

/* --- value model for round trips ------------------------------------------------------------ */

static bool value_equal(const struct gguf_value *a, const struct gguf_value *b);

static bool str_equal(const struct gguf_str *a, const struct gguf_str *b) {
    return a->len == b->len && (a->len == 0 || memcmp(a->ptr, b->ptr, a->len) == 0) &&
           a->ptr[a->len] == '\0';
}

static size_t scalar_size(enum gguf_vtype t) {
    static const size_t sz[GGUF_VT_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    return sz[t];
}

static bool value_equal(const struct gguf_value *a, const struct gguf_value *b) {
    if (a->type != b->type)
        return false;
    switch (a->type) {
    case GGUF_VT_STRING:
        return str_equal(&a->v.str, &b->v.str);
    case GGUF_VT_ARRAY: {
        const struct gguf_array *x = &a->v.arr, *y = &b->v.arr;
        if (x->elem_type != y->elem_type || x->n != y->n)
            return false;
        if (x->n == 0)
            return true;
        if (x->elem_type == GGUF_VT_STRING) {
            for (uint64_t i = 0; i < x->n; i++)
                if (!str_equal(&((const struct gguf_str *)x->data)[i],
                               &((const struct gguf_str *)y->data)[i]))
                    return false;
            return true;
        }
        if (x->elem_type == GGUF_VT_ARRAY) {
            for (uint64_t i = 0; i < x->n; i++)
                if (!value_equal(&((const struct gguf_value *)x->data)[i],
                                 &((const struct gguf_value *)y->data)[i]))
                    return false;
            return true;
        }
        return memcmp(x->data, y->data, x->n * scalar_size(x->elem_type)) == 0;
    }
    case GGUF_VT_F32:
    case GGUF_VT_F64:
        return memcmp(&a->v.f64, &b->v.f64, 8) == 0;
    case GGUF_VT_I8:
    case GGUF_VT_I16:
    case GGUF_VT_I32:
    case GGUF_VT_I64:
        return a->v.i64 == b->v.i64;
    default:
        return a->v.u64 == b->v.u64;
    }
}

/* A random scalar of type t as the reader would present it. */
static struct gguf_value random_scalar(enum gguf_vtype t) {
    struct gguf_value v = {.type = t};
    uint64_t r = tu_rng_u64(&rng);
    bool edge = rnd(4) == 0; /* extremes a quarter of the time */
    switch (t) {
    case GGUF_VT_U8:
        v.v.u64 = edge ? UINT8_MAX : (uint8_t)r;
        break;
    case GGUF_VT_I8:
        v.v.i64 = edge ? INT8_MIN : (int8_t)r;
        break;
    case GGUF_VT_U16:
        v.v.u64 = edge ? UINT16_MAX : (uint16_t)r;
        break;
    case GGUF_VT_I16:
        v.v.i64 = edge ? INT16_MIN : (int16_t)r;
        break;
    case GGUF_VT_U32:
        v.v.u64 = edge ? UINT32_MAX : (uint32_t)r;
        break;
    case GGUF_VT_I32:
        v.v.i64 = edge ? INT32_MIN : (int32_t)r;
        break;
    case GGUF_VT_U64:
        v.v.u64 = edge ? UINT64_MAX : r;
        break;
    case GGUF_VT_I64:
        v.v.i64 = edge ? INT64_MIN : (int64_t)r;
        break;
    case GGUF_VT_F32:
        v.v.f64 = (float)(tu_rng_normal(&rng) * 1e3);
        break;
    case GGUF_VT_F64:
        v.v.f64 = tu_rng_normal(&rng) * 1e-7;
        break;
    case GGUF_VT_BOOL:
        v.v.u64 = r & 1;
        break;
    default:
        fail();
    }
    return v;
}

static const enum gguf_vtype scalar_types[] = {
    GGUF_VT_U8,  GGUF_VT_I8,   GGUF_VT_U16, GGUF_VT_I16, GGUF_VT_U32, GGUF_VT_I32,
    GGUF_VT_F32, GGUF_VT_BOOL, GGUF_VT_U64, GGUF_VT_I64, GGUF_VT_F64,
};

/* Everything a round-trip file holds, kept to compare with what is read back. */
struct model_kv {
    char key[64];
    struct gguf_value v;
};

struct model_tensor {
    char name[64];
    int type;
    uint32_t n_dims;
    uint64_t ne[4];
    unsigned char *data;
    uint64_t nbytes;
};

struct model {
    struct model_kv kv[96];
    int n_kv;
    struct model_tensor t[12];
    int n_t;
    void *blobs[256]; /* arrays owned by the model */
    int n_blobs;
};

static void *model_keep(struct model *m, void *p) {
    assert_true(m->n_blobs < (int)MR_ARRAY_LEN(m->blobs));
    m->blobs[m->n_blobs++] = p;
    return p;
}

static void model_free(struct model *m) {
    for (int i = 0; i < m->n_blobs; i++)
        free(m->blobs[i]);
    for (int i = 0; i < m->n_t; i++)
        free(m->t[i].data);
}

static void model_add(struct model *m, const char *key, struct gguf_value v) {
    assert_true(m->n_kv < (int)MR_ARRAY_LEN(m->kv));
    snprintf(m->kv[m->n_kv].key, sizeof(m->kv[0].key), "%s", key);
    m->kv[m->n_kv].v = v;
    m->n_kv++;
}

static struct gguf_value make_arr(enum gguf_vtype et, uint64_t n, const void *data) {
    struct gguf_value v = {.type = GGUF_VT_ARRAY};
    v.v.arr.elem_type = et;
    v.v.arr.n = n;
    v.v.arr.data = data;
    return v;
}

static struct gguf_value random_scalar_array(struct model *m, enum gguf_vtype et, uint64_t n) {
    size_t sz = scalar_size(et);
    unsigned char *d = model_keep(m, malloc(n * sz + 1));
    for (uint64_t i = 0; i < n; i++) {
        struct gguf_value x = random_scalar(et);
        uint8_t u8 = (uint8_t)x.v.u64;
        uint16_t u16 = (uint16_t)x.v.u64;
        uint32_t u32 = (uint32_t)x.v.u64;
        float f = (float)x.v.f64;
        switch (sz) {
        case 1:
            memcpy(d + i, &u8, 1);
            break;
        case 2:
            memcpy(d + 2 * i, &u16, 2);
            break;
        case 4:
            if (et == GGUF_VT_F32)
                memcpy(d + 4 * i, &f, 4);
            else
                memcpy(d + 4 * i, &u32, 4);
            break;
        default:
            memcpy(d + 8 * i, &x.v, 8);
        }
    }
    return make_arr(et, n, d);
}

static struct gguf_str random_str(struct model *m, uint64_t max_len) {
    static const char *const pieces[] = {"a", "Z", "é", "日本", "✓", " ", "\n", "\"", "<s>"};
    uint64_t n = rnd(max_len + 1);
    char *s = model_keep(m, malloc(n * 8 + 1));
    uint64_t len = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (rnd(10) == 0) {
            s[len++] = '\0'; /* embedded NUL */
            continue;
        }
        const char *p = pieces[rnd(MR_ARRAY_LEN(pieces))];
        memcpy(s + len, p, strlen(p));
        len += strlen(p);
    }
    s[len] = '\0';
    struct gguf_str r = {s, len};
    return r;
}

/* Fill a model with every value type, nested arrays and a few tensors. */
static void model_build(struct model *m, bool with_tensors) {
    memset(m, 0, sizeof(*m));
    char key[64];
    for (size_t i = 0; i < MR_ARRAY_LEN(scalar_types); i++) {
        snprintf(key, sizeof(key), "scalar.%s", gguf_vtype_name(scalar_types[i]));
        model_add(m, key, random_scalar(scalar_types[i]));
        snprintf(key, sizeof(key), "array.%s", gguf_vtype_name(scalar_types[i]));
        model_add(m, key, random_scalar_array(m, scalar_types[i], rnd(40)));
        snprintf(key, sizeof(key), "empty.%s", gguf_vtype_name(scalar_types[i]));
        model_add(m, key, make_arr(scalar_types[i], 0, NULL));
    }
    struct gguf_value s = {.type = GGUF_VT_STRING};
    s.v.str.ptr = "";
    s.v.str.len = 0;
    model_add(m, "str.empty", s);
    s.v.str.ptr = "héllo wörld ✓ 日本語";
    s.v.str.len = strlen(s.v.str.ptr);
    model_add(m, "str.utf8", s);
    s.v.str.ptr = "a\0b\0";
    s.v.str.len = 4;
    model_add(m, "str.nul", s);
    s.v.str = random_str(m, 200);
    model_add(m, "str.random", s);

    uint64_t ns = 1 + rnd(30);
    struct gguf_str *strs = model_keep(m, malloc(ns * sizeof(*strs)));
    for (uint64_t i = 0; i < ns; i++)
        strs[i] = random_str(m, 6);
    model_add(m, "array.strings", make_arr(GGUF_VT_STRING, ns, strs));

    /* array of arrays of u32 (one empty), of strings, an empty array of arrays, 3 levels */
    struct gguf_value *nu = model_keep(m, malloc(4 * sizeof(*nu)));
    for (int i = 0; i < 4; i++)
        nu[i] = random_scalar_array(m, GGUF_VT_U32, i == 2 ? 0 : 1 + rnd(10));
    model_add(m, "nested.u32", make_arr(GGUF_VT_ARRAY, 4, nu));
    struct gguf_value *nstr = model_keep(m, malloc(3 * sizeof(*nstr)));
    for (int i = 0; i < 3; i++) {
        uint64_t k = rnd(5);
        struct gguf_str *ss = model_keep(m, malloc((k + 1) * sizeof(*ss)));
        for (uint64_t j = 0; j < k; j++)
            ss[j] = random_str(m, 5);
        nstr[i] = make_arr(GGUF_VT_STRING, k, ss);
    }
    model_add(m, "nested.strings", make_arr(GGUF_VT_ARRAY, 3, nstr));
    model_add(m, "nested.empty", make_arr(GGUF_VT_ARRAY, 0, NULL));
    struct gguf_value *lvl2 = model_keep(m, malloc(2 * sizeof(*lvl2)));
    for (int i = 0; i < 2; i++) {
        struct gguf_value *lvl3 = model_keep(m, malloc(2 * sizeof(*lvl3)));
        lvl3[0] = random_scalar_array(m, GGUF_VT_I16, 3);
        lvl3[1] = random_scalar_array(m, GGUF_VT_F64, 2);
        lvl2[i] = make_arr(GGUF_VT_ARRAY, 2, lvl3);
    }
    model_add(m, "nested.deep", make_arr(GGUF_VT_ARRAY, 2, lvl2));

    if (!with_tensors)
        return;
    static const int types[] = {MOERUN_TYPE_F32,  MOERUN_TYPE_F16,  MOERUN_TYPE_Q8_0,
                                MOERUN_TYPE_Q4_0, MOERUN_TYPE_Q4_K, MOERUN_TYPE_Q6_K,
                                MOERUN_TYPE_BF16, MOERUN_TYPE_Q5_K};
    for (int i = 0; i < 8; i++) {
        struct model_tensor *t = &m->t[m->n_t++];
        snprintf(t->name, sizeof(t->name), "blk.%d.weight", i);
        t->type = types[i];
        t->n_dims = 1 + (uint32_t)(i % 4);
        const struct mr_type_info *ti = mr_type_info(t->type);
        uint64_t n_el = 1;
        for (uint32_t d = 0; d < 4; d++) {
            t->ne[d] = d >= t->n_dims ? 1 : d == 0 ? ti->blck * (1 + rnd(3)) : 1 + rnd(3);
            n_el *= t->ne[d];
        }
        assert_true(mr_type_nbytes(t->type, n_el, &t->nbytes));
        t->data = malloc(t->nbytes);
        for (uint64_t j = 0; j < t->nbytes; j++)
            t->data[j] = (unsigned char)tu_rng_u64(&rng);
    }
}

/* Write the model with the writer; data in random-sized chunks. Returns the file's path. */
static const char *model_write(const struct model *m, uint32_t version, uint32_t alignment) {
    static char path[4096];
    snprintf(path, sizeof(path), "%s", tu_tmp_path(".gguf"));
    struct counter c;
    moerun_allocator a = counting(&c);
    struct gguf_writer *w = NULL;
    assert_int_equal(gguf_writer_create(&a, &w), MOERUN_OK);
    assert_int_equal(gguf_writer_set_version(w, version), MOERUN_OK);
    if (alignment)
        assert_int_equal(gguf_writer_set_u32(w, "general.alignment", alignment), MOERUN_OK);
    for (int i = 0; i < m->n_kv; i++) {
        int st = gguf_writer_set_value(w, m->kv[i].key, &m->kv[i].v);
        if (st != MOERUN_OK)
            fail_msg("set_value %s: %s", m->kv[i].key, moerun_errmsg());
    }
    for (int i = 0; i < m->n_t; i++)
        assert_int_equal(
            gguf_writer_add_tensor(w, m->t[i].name, m->t[i].type, m->t[i].n_dims, m->t[i].ne),
            MOERUN_OK);
    int fd = open_tmp(path);
    assert_int_equal(gguf_writer_begin(w, fd), MOERUN_OK);
    for (int i = 0; i < m->n_t; i++) {
        uint64_t done = 0;
        while (done < m->t[i].nbytes) {
            uint64_t want = 1 + rnd(300);
            uint64_t c2 = MR_MIN(m->t[i].nbytes - done, want);
            assert_int_equal(gguf_writer_write_data(w, m->t[i].data + done, c2), MOERUN_OK);
            done += c2;
        }
    }
    assert_int_equal(gguf_writer_finish(w), MOERUN_OK);
    gguf_writer_destroy(w);
    assert_int_equal(c.cur, 0);
    close(fd);
    return path;
}

static void model_check(const struct model *m, const struct gguf_ctx *ctx,
                        const unsigned char *file, size_t file_size, uint32_t version,
                        uint32_t alignment) {
    assert_int_equal(ctx->version, version);
    assert_int_equal(ctx->alignment, alignment ? alignment : GGUF_DEFAULT_ALIGNMENT);
    assert_int_equal(ctx->file_size, file_size);
    assert_int_equal(ctx->data_offset % ctx->alignment, 0);
    assert_int_equal(ctx->n_kv, (uint64_t)m->n_kv + (alignment ? 1 : 0));
    for (int i = 0; i < m->n_kv; i++) {
        const struct gguf_kv *kv = gguf_get_kv(ctx, m->kv[i].key);
        if (!kv)
            fail_msg("key %s missing", m->kv[i].key);
        if (!value_equal(&kv->value, &m->kv[i].v))
            fail_msg("key %s differs after the round trip", m->kv[i].key);
        char buf[512];
        int n = gguf_value_format(&kv->value, buf, sizeof(buf));
        assert_true(n >= 0);
    }
    assert_int_equal(ctx->n_tensors, (uint64_t)m->n_t);
    for (int i = 0; i < m->n_t; i++) {
        const struct model_tensor *mt = &m->t[i];
        int64_t idx = gguf_find_tensor(ctx, mt->name);
        assert_int_equal(idx, i); /* file order is the order of adding */
        const struct gguf_tensor *t = &ctx->tensors[idx];
        assert_int_equal(t->type, mt->type);
        assert_int_equal(t->n_dims, mt->n_dims);
        for (int d = 0; d < 4; d++)
            assert_int_equal(t->ne[d], mt->ne[d]);
        assert_int_equal(t->nbytes, mt->nbytes);
        assert_int_equal(t->offset % ctx->alignment, 0);
        assert_true(t->offset >= ctx->data_offset);
        assert_true(t->offset + t->nbytes <= file_size);
        assert_memory_equal(file + t->offset, mt->data, mt->nbytes);
    }
    assert_int_equal(gguf_find_tensor(ctx, "no.such.tensor"), -1);
    assert_null(gguf_get_kv(ctx, "no.such.key"));
    assert_int_equal(gguf_find_key(ctx, "str.nul"), gguf_find_key(ctx, "str.nul"));
}

static void roundtrip(uint32_t version, uint32_t alignment) {
    struct model m;
    model_build(&m, true);
    const char *path = model_write(&m, version, alignment);
    size_t n;
    unsigned char *file = slurp(path, &n);

    /* memory source */
    struct counter c;
    struct gguf_ctx *ctx = NULL;
    assert_int_equal(open_mem_counted(file, n, &c, &ctx), MOERUN_OK);
    model_check(&m, ctx, file, n, version, alignment);
    gguf_close(ctx);
    assert_int_equal(c.cur, 0);

    /* fd source, and by path */
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    assert_true(fd >= 0);
    struct gguf_source src = {.fd = fd, .mem = NULL, .size = n};
    moerun_allocator a = counting(&c);
    assert_int_equal(gguf_open_source(&src, &a, &ctx), MOERUN_OK);
    model_check(&m, ctx, file, n, version, alignment);
    gguf_close(ctx);
    assert_int_equal(c.cur, 0);
    close(fd);
    assert_int_equal(gguf_open_file(path, NULL, &ctx), MOERUN_OK);
    model_check(&m, ctx, file, n, version, alignment);
    gguf_close(ctx);

    free(file);
    unlink(path);
    model_free(&m);
}

static void test_roundtrip_v3(void **state) {
    (void)state;
    roundtrip(3, 0);
}

static void test_roundtrip_v2(void **state) {
    (void)state;
    roundtrip(2, 0);
}

static void test_roundtrip_alignment(void **state) {
    (void)state;
    roundtrip(3, 64);
    roundtrip(3, 4096);
    roundtrip(2, 1);
}

/* Data written in one call covering all tensors, and no tensors at all. */
static void test_writer_streaming(void **state) {
    (void)state;
    struct model m;
    model_build(&m, true);
    const char *path = tu_tmp_path(".gguf");
    struct gguf_writer *w = NULL;
    assert_int_equal(gguf_writer_create(NULL, &w), MOERUN_OK);
    for (int i = 0; i < m.n_t; i++)
        assert_int_equal(
            gguf_writer_add_tensor(w, m.t[i].name, m.t[i].type, m.t[i].n_dims, m.t[i].ne),
            MOERUN_OK);
    uint64_t total = 0;
    for (int i = 0; i < m.n_t; i++)
        total += m.t[i].nbytes;
    unsigned char *all = malloc(total);
    for (int i = 0, off = 0; i < m.n_t; off += (int)m.t[i].nbytes, i++)
        memcpy(all + off, m.t[i].data, m.t[i].nbytes);
    int fd = open_tmp(path);
    assert_int_equal(gguf_writer_begin(w, fd), MOERUN_OK);
    assert_int_equal(gguf_writer_write_data(w, all, total), MOERUN_OK);
    assert_int_equal(gguf_writer_write_data(w, all, 1), MOERUN_ERR_INVALID_ARG); /* too much */
    assert_int_equal(gguf_writer_finish(w), MOERUN_OK);
    gguf_writer_destroy(w);
    close(fd);
    struct gguf_ctx *ctx = NULL;
    assert_int_equal(gguf_open_file(path, NULL, &ctx), MOERUN_OK);
    size_t n;
    unsigned char *file = slurp(path, &n);
    for (int i = 0; i < m.n_t; i++)
        assert_memory_equal(file + ctx->tensors[i].offset, m.t[i].data, m.t[i].nbytes);
    gguf_close(ctx);
    free(file);
    free(all);
    unlink(path);

    /* metadata only */
    assert_int_equal(gguf_writer_create(NULL, &w), MOERUN_OK);
    assert_int_equal(gguf_writer_set_str(w, "general.architecture", "llama"), MOERUN_OK);
    fd = open_tmp(path);
    assert_int_equal(gguf_writer_begin(w, fd), MOERUN_OK);
    assert_int_equal(gguf_writer_finish(w), MOERUN_OK);
    gguf_writer_destroy(w);
    close(fd);
    assert_int_equal(gguf_open_file(path, NULL, &ctx), MOERUN_OK);
    assert_int_equal(ctx->n_tensors, 0);
    assert_int_equal(ctx->n_kv, 1);
    gguf_close(ctx);
    unlink(path);
    model_free(&m);
}

/* --- getters -------------------------------------------------------------------------------- */

static void test_getters(void **state) {
    (void)state;
    uint32_t u8 = 1 + (uint32_t)rnd(255);
    int64_t i8 = -1 - (int64_t)rnd(128);
    uint64_t big = ((uint64_t)1 << 32) + rnd(1u << 20);
    int32_t small = (int32_t)rnd(1000);
    float f = (float)tu_rng_normal(&rng);
    double d = tu_rng_normal(&rng);
    struct gguf_writer *w = NULL;
    assert_int_equal(gguf_writer_create(NULL, &w), MOERUN_OK);
    struct gguf_value v = {.type = GGUF_VT_U8, .v.u64 = u8};
    assert_int_equal(gguf_writer_set_value(w, "u8", &v), MOERUN_OK);
    v.type = GGUF_VT_I8;
    v.v.i64 = i8;
    assert_int_equal(gguf_writer_set_value(w, "i8", &v), MOERUN_OK);
    assert_int_equal(gguf_writer_set_u64(w, "big", big), MOERUN_OK);
    assert_int_equal(gguf_writer_set_u64(w, "huge", UINT64_MAX), MOERUN_OK);
    assert_int_equal(gguf_writer_set_i32(w, "small", small), MOERUN_OK);
    assert_int_equal(gguf_writer_set_f32(w, "f", f), MOERUN_OK);
    v.type = GGUF_VT_F64;
    v.v.f64 = d;
    assert_int_equal(gguf_writer_set_value(w, "d", &v), MOERUN_OK);
    assert_int_equal(gguf_writer_set_bool(w, "b", true), MOERUN_OK);
    assert_int_equal(gguf_writer_set_str(w, "s", "text"), MOERUN_OK);
    const char *strs[] = {"x", "", "zz"};
    assert_int_equal(gguf_writer_set_arr_str(w, "as", strs, 3), MOERUN_OK);
    const char *path = tu_tmp_path(".gguf");
    int fd = open_tmp(path);
    assert_int_equal(gguf_writer_begin(w, fd), MOERUN_OK);
    assert_int_equal(gguf_writer_finish(w), MOERUN_OK);
    gguf_writer_destroy(w);
    close(fd);
    struct gguf_ctx *ctx = NULL;
    assert_int_equal(gguf_open_file(path, NULL, &ctx), MOERUN_OK);
    unlink(path);

    uint32_t o32 = 12345;
    uint64_t o64 = 777;
    int64_t oi = -9;
    float of = -1.5f;
    bool ob = false;
    struct gguf_str os = {NULL, 0};
    struct gguf_array oa = {0};
    /* absent: 1, output unchanged */
    assert_int_equal(gguf_get_u32(ctx, "nope", &o32), 1);
    assert_int_equal(o32, 12345);
    assert_int_equal(gguf_get_u64(ctx, "nope", &o64), 1);
    assert_int_equal(o64, 777);
    assert_int_equal(gguf_get_i64(ctx, "nope", &oi), 1);
    assert_int_equal(oi, -9);
    assert_int_equal(gguf_get_f32(ctx, "nope", &of), 1);
    assert_true(of == -1.5f);
    assert_int_equal(gguf_get_bool(ctx, "nope", &ob), 1);
    assert_int_equal(gguf_get_str(ctx, "nope", &os), 1);
    assert_null(os.ptr);
    assert_int_equal(gguf_get_arr(ctx, "nope", &oa), 1);
    /* conversions */
    assert_int_equal(gguf_get_u32(ctx, "u8", &o32), MOERUN_OK);
    assert_int_equal(o32, u8);
    assert_int_equal(gguf_get_i64(ctx, "i8", &oi), MOERUN_OK);
    assert_int_equal(oi, i8);
    assert_int_equal(gguf_get_u32(ctx, "small", &o32), MOERUN_OK);
    assert_int_equal(o32, (uint32_t)small);
    assert_int_equal(gguf_get_u64(ctx, "big", &o64), MOERUN_OK);
    assert_int_equal(o64, big);
    assert_int_equal(gguf_get_i64(ctx, "big", &oi), MOERUN_OK);
    assert_int_equal(oi, (int64_t)big);
    /* out of range, wrong type: error naming the key, output unchanged */
    o32 = 4242;
    assert_int_equal(gguf_get_u32(ctx, "big", &o32), MOERUN_ERR_FORMAT);
    assert_non_null(strstr(moerun_errmsg(), "'big'"));
    assert_int_equal(o32, 4242);
    assert_int_equal(gguf_get_u32(ctx, "i8", &o32), MOERUN_ERR_FORMAT);
    assert_non_null(strstr(moerun_errmsg(), "'i8'"));
    assert_int_equal(gguf_get_u64(ctx, "i8", &o64), MOERUN_ERR_FORMAT);
    assert_int_equal(gguf_get_i64(ctx, "huge", &oi), MOERUN_ERR_FORMAT);
    assert_int_equal(gguf_get_u32(ctx, "s", &o32), MOERUN_ERR_FORMAT);
    assert_int_equal(gguf_get_u32(ctx, "b", &o32), MOERUN_ERR_FORMAT);
    assert_int_equal(gguf_get_f32(ctx, "u8", &of), MOERUN_ERR_FORMAT);
    assert_int_equal(gguf_get_bool(ctx, "u8", &ob), MOERUN_ERR_FORMAT);
    assert_int_equal(gguf_get_str(ctx, "as", &os), MOERUN_ERR_FORMAT);
    assert_int_equal(gguf_get_arr(ctx, "s", &oa), MOERUN_ERR_FORMAT);
    assert_non_null(strstr(moerun_errmsg(), "'s'"));
    /* floats, bool, string, array */
    assert_int_equal(gguf_get_f32(ctx, "f", &of), MOERUN_OK);
    assert_true(of == f);
    assert_int_equal(gguf_get_f32(ctx, "d", &of), MOERUN_OK);
    assert_true(of == (float)d);
    assert_int_equal(gguf_get_bool(ctx, "b", &ob), MOERUN_OK);
    assert_true(ob);
    assert_int_equal(gguf_get_str(ctx, "s", &os), MOERUN_OK);
    assert_int_equal(os.len, 4);
    assert_string_equal(os.ptr, "text");
    assert_int_equal(gguf_get_arr(ctx, "as", &oa), MOERUN_OK);
    assert_int_equal(oa.elem_type, GGUF_VT_STRING);
    assert_int_equal(oa.n, 3);
    assert_string_equal(((const struct gguf_str *)oa.data)[2].ptr, "zz");
    assert_int_equal(((const struct gguf_str *)oa.data)[1].len, 0);
    gguf_close(ctx);
    gguf_close(NULL);
}

/* --- formatting ----------------------------------------------------------------------------- */

static void check_format(const struct gguf_value *v, const char *expect_prefix) {
    char buf[1024];
    int n = gguf_value_format(v, buf, sizeof(buf));
    assert_true(n > 0 && n < (int)sizeof(buf));
    assert_int_equal(strlen(buf), (size_t)n);
    if (strncmp(buf, expect_prefix, strlen(expect_prefix)) != 0)
        fail_msg("formatted '%s', expected it to start with '%s'", buf, expect_prefix);
    /* snprintf convention: the length without a buffer, truncation keeps a prefix */
    assert_int_equal(gguf_value_format(v, NULL, 0), n);
    for (size_t cut = 1; cut < (size_t)n + 2; cut += 1 + rnd(7)) {
        char small[1024];
        memset(small, 'X', sizeof(small));
        assert_int_equal(gguf_value_format(v, small, cut), n);
        assert_int_equal(strlen(small), MR_MIN(cut - 1, (size_t)n));
        assert_memory_equal(small, buf, strlen(small));
    }
}

static void test_value_format(void **state) {
    (void)state;
    uint32_t k = (uint32_t)rnd(100000);
    char expect[160];
    struct gguf_value v = {.type = GGUF_VT_U32, .v.u64 = k};
    snprintf(expect, sizeof(expect), "%" PRIu32, k);
    check_format(&v, expect);
    v.type = GGUF_VT_I64;
    v.v.i64 = -(int64_t)k - 1;
    snprintf(expect, sizeof(expect), "%" PRId64, v.v.i64);
    check_format(&v, expect);
    v.type = GGUF_VT_BOOL;
    v.v.u64 = 1;
    check_format(&v, "true");
    v.type = GGUF_VT_F32;
    v.v.f64 = 0.5;
    check_format(&v, "0.5");
    v.type = GGUF_VT_STRING;
    v.v.str.ptr = "say \"hi\"\n";
    v.v.str.len = strlen(v.v.str.ptr);
    check_format(&v, "\"say \\\"hi\\\"\\n\"");
    char longs[300];
    memset(longs, 'q', sizeof(longs));
    v.v.str.ptr = longs;
    v.v.str.len = sizeof(longs);
    char buf[512];
    gguf_value_format(&v, buf, sizeof(buf));
    assert_true(strlen(buf) < 100); /* truncated */
    assert_non_null(strstr(buf, "...\""));

    uint64_t n = 10 + rnd(40000);
    struct gguf_str *toks = malloc(n * sizeof(*toks));
    char(*names)[24] = malloc(n * 24);
    for (uint64_t i = 0; i < n; i++) {
        snprintf(names[i], 24, "t%" PRIu64, i);
        toks[i].ptr = names[i];
        toks[i].len = strlen(names[i]);
    }
    v = make_arr(GGUF_VT_STRING, n, toks);
    snprintf(expect, sizeof(expect), "[STRING; %" PRIu64 "] \"t0\", \"t1\", \"t2\"", n);
    check_format(&v, expect);
    gguf_value_format(&v, buf, sizeof(buf));
    assert_non_null(strstr(buf, ", ..."));
    assert_true(strlen(buf) < 200);
    free(toks);
    free(names);

    uint32_t nums[3] = {7, 8, 9};
    struct gguf_value inner[2] = {make_arr(GGUF_VT_U32, 3, nums), make_arr(GGUF_VT_U32, 0, NULL)};
    v = make_arr(GGUF_VT_ARRAY, 2, inner);
    check_format(&v, "[ARRAY; 2] ([U32; 3] 7, 8, 9), ([U32; 0])");
    assert_string_equal(gguf_vtype_name(GGUF_VT_STRING), "STRING");
    assert_string_equal(gguf_vtype_name((enum gguf_vtype)99), "?");
}

/* --- hostile files -------------------------------------------------------------------------- */

/* A small valid file from the writer: a few keys of each kind and three tensors. */
static unsigned char *small_valid(size_t *n, uint32_t version) {
    struct gguf_writer *w = NULL;
    assert_int_equal(gguf_writer_create(NULL, &w), MOERUN_OK);
    assert_int_equal(gguf_writer_set_version(w, version), MOERUN_OK);
    assert_int_equal(gguf_writer_set_str(w, "general.architecture", "llama"), MOERUN_OK);
    assert_int_equal(gguf_writer_set_u32(w, "llama.block_count", 2), MOERUN_OK);
    assert_int_equal(gguf_writer_set_f32(w, "llama.rope.freq_base", 10000.f), MOERUN_OK);
    const char *toks[] = {"<unk>", "<s>", "</s>", "a"};
    assert_int_equal(gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", toks, 4), MOERUN_OK);
    float scores[4] = {0, -1, -2, -3};
    assert_int_equal(gguf_writer_set_arr(w, "tokenizer.ggml.scores", GGUF_VT_F32, scores, 4),
                     MOERUN_OK);
    uint32_t in[2] = {1, 2};
    struct gguf_value inner[2] = {make_arr(GGUF_VT_U32, 2, in), make_arr(GGUF_VT_U32, 0, NULL)};
    struct gguf_value nested = make_arr(GGUF_VT_ARRAY, 2, inner);
    assert_int_equal(gguf_writer_set_value(w, "test.nested", &nested), MOERUN_OK);
    uint64_t ne1[2] = {32, 2}, ne2[1] = {8}, ne3[3] = {32, 1, 2};
    assert_int_equal(gguf_writer_add_tensor(w, "a", MOERUN_TYPE_Q8_0, 2, ne1), MOERUN_OK);
    assert_int_equal(gguf_writer_add_tensor(w, "b", MOERUN_TYPE_F32, 1, ne2), MOERUN_OK);
    assert_int_equal(gguf_writer_add_tensor(w, "c", MOERUN_TYPE_F16, 3, ne3), MOERUN_OK);
    const char *path = tu_tmp_path(".gguf");
    int fd = open_tmp(path);
    assert_int_equal(gguf_writer_begin(w, fd), MOERUN_OK);
    unsigned char data[68 + 32 + 128];
    for (size_t i = 0; i < sizeof(data); i++)
        data[i] = (unsigned char)tu_rng_u64(&rng);
    assert_int_equal(gguf_writer_write_data(w, data, sizeof(data)), MOERUN_OK);
    assert_int_equal(gguf_writer_finish(w), MOERUN_OK);
    gguf_writer_destroy(w);
    close(fd);
    unsigned char *buf = slurp(path, n);
    unlink(path);
    return buf;
}

static void test_truncated(void **state) {
    (void)state;
    size_t n;
    unsigned char *file = small_valid(&n, 3);
    struct counter c;
    struct gguf_ctx *ctx = NULL;
    assert_int_equal(open_mem_counted(file, n, &c, &ctx), MOERUN_OK);
    gguf_close(ctx);
    for (size_t k = 0; k < n; k++) {
        unsigned char *cut = malloc(k ? k : 1); /* exact size, so ASan sees overreads */
        memcpy(cut, file, k);
        expect_reject(cut, k, NULL);
        free(cut);
    }
    /* the same through a file descriptor whose size is cut short */
    const char *path = tu_tmp_path(".gguf");
    int fd = open_tmp(path);
    assert_int_equal(write(fd, file, n), (ssize_t)n);
    for (int i = 0; i < 40; i++) {
        size_t k = rnd(n);
        struct gguf_source src = {.fd = fd, .mem = NULL, .size = k};
        moerun_allocator a = counting(&c);
        ctx = (struct gguf_ctx *)&c;
        assert_int_equal(gguf_open_source(&src, &a, &ctx), MOERUN_ERR_FORMAT);
        assert_null(ctx);
        assert_int_equal(c.cur, 0);
    }
    /* a descriptor claiming more bytes than the file has: an I/O error, not a crash */
    struct gguf_source src = {.fd = fd, .mem = NULL, .size = n + 100000};
    int st = gguf_open_source(&src, NULL, &ctx);
    assert_true(st == MOERUN_ERR_IO || st == MOERUN_ERR_FORMAT);
    assert_true(strlen(moerun_errmsg()) > 0);
    /* a truncated file by path */
    assert_int_equal(ftruncate(fd, (off_t)(n / 2)), 0);
    assert_int_equal(gguf_open_file(path, NULL, &ctx), MOERUN_ERR_FORMAT);
    close(fd);
    unlink(path);
    assert_int_equal(gguf_open_file(path, NULL, &ctx), MOERUN_ERR_IO); /* gone */
    assert_non_null(strstr(moerun_errmsg(), path));
    free(file);
}

/* Random byte flips of a valid file: accepted or rejected, never a crash or a big allocation. */
static void test_bitflips(void **state) {
    (void)state;
    size_t n;
    unsigned char *file = small_valid(&n, 3);
    unsigned char *mut = malloc(n);
    for (int iter = 0; iter < 3000; iter++) {
        memcpy(mut, file, n);
        int flips = 1 + (int)rnd(4);
        for (int f = 0; f < flips; f++)
            mut[rnd(n)] ^= (unsigned char)(1u << rnd(8));
        struct counter c;
        struct gguf_ctx *ctx = NULL;
        int st = open_mem_counted(mut, n, &c, &ctx);
        if (st == MOERUN_OK) {
            for (uint64_t i = 0; i < ctx->n_kv; i++) {
                char buf[256];
                gguf_value_format(&ctx->kv[i].value, buf, sizeof(buf));
            }
            gguf_close(ctx);
            assert_int_equal(c.cur, 0);
        } else {
            assert_int_equal(st, MOERUN_ERR_FORMAT);
            assert_true(strlen(moerun_errmsg()) > 0);
        }
    }
    free(mut);
    free(file);
}

static void test_bad_header(void **state) {
    (void)state;
    size_t n;
    unsigned char *file = small_valid(&n, 3);
    unsigned char *m = malloc(n);
    memcpy(m, file, n);
    m[0] = 'X';
    expect_reject(m, n, "magic");
    static const struct {
        uint32_t version;
        const char *needle;
    } versions[] = {{1, "version 1"},
                    {4, "version 4"},
                    {0, "version 0"},
                    {0x03000000u, "big-endian"},
                    {0x02000000u, "big-endian"}};
    for (size_t i = 0; i < MR_ARRAY_LEN(versions); i++) {
        memcpy(m, file, n);
        memcpy(m + 4, &versions[i].version, 4);
        expect_reject(m, n, versions[i].needle);
    }
    /* huge counts */
    uint64_t huge[] = {UINT64_MAX, (uint64_t)1 << 60, (uint64_t)1 << 32, n};
    for (size_t i = 0; i < MR_ARRAY_LEN(huge); i++) {
        memcpy(m, file, n);
        memcpy(m + 8, &huge[i], 8); /* n_tensors */
        expect_reject(m, n, NULL);
        memcpy(m, file, n);
        memcpy(m + 16, &huge[i], 8); /* n_kv */
        expect_reject(m, n, NULL);
    }
    free(m);
    free(file);

    struct rb b = {0};
    rb_u32(&b, GGUF_MAGIC);
    rb_u32(&b, 3);
    rb_u64(&b, 0);
    rb_reject(&b, "past the end"); /* header cut inside n_kv */
}

static void test_bad_metadata(void **state) {
    (void)state;
    struct rb b = {0};
    /* huge string lengths: key, value */
    rb_header(&b, 3, 0, 1);
    rb_u64(&b, (uint64_t)1 << 62);
    rb_zeros(&b, 64);
    rb_reject(&b, "exceeds the file");
    rb_header(&b, 3, 0, 1);
    rb_str(&b, "general.name");
    rb_u32(&b, GGUF_VT_STRING);
    rb_u64(&b, UINT64_MAX);
    rb_zeros(&b, 64);
    rb_reject(&b, "key 'general.name'");
    /* huge array counts, scalar and string elements */
    static const uint32_t ets[] = {GGUF_VT_U32, GGUF_VT_STRING, GGUF_VT_ARRAY, GGUF_VT_U8};
    for (size_t i = 0; i < MR_ARRAY_LEN(ets); i++) {
        rb_header(&b, 3, 0, 1);
        rb_str(&b, "tokenizer.ggml.tokens");
        rb_u32(&b, GGUF_VT_ARRAY);
        rb_u32(&b, ets[i]);
        rb_u64(&b, (uint64_t)1 << 40);
        rb_zeros(&b, 1000);
        rb_reject(&b, "key 'tokenizer.ggml.tokens'");
    }
    /* an array whose count fits exactly but whose strings run past the end */
    rb_header(&b, 3, 0, 1);
    rb_str(&b, "k");
    rb_u32(&b, GGUF_VT_ARRAY);
    rb_u32(&b, GGUF_VT_STRING);
    rb_u64(&b, 4);
    for (int i = 0; i < 4; i++)
        rb_u64(&b, 5);
    rb_reject(&b, "exceeds");
    /* nesting too deep */
    rb_header(&b, 3, 0, 1);
    rb_str(&b, "deep");
    rb_u32(&b, GGUF_VT_ARRAY);
    for (int i = 0; i < 40; i++) {
        rb_u32(&b, GGUF_VT_ARRAY);
        rb_u64(&b, 1);
    }
    rb_u32(&b, GGUF_VT_U8);
    rb_u64(&b, 0);
    rb_reject(&b, "nested");
    /* unknown value types, element types; empty key; bool not 0/1 */
    uint32_t bad_types[] = {13, 1000, UINT32_MAX};
    for (size_t i = 0; i < MR_ARRAY_LEN(bad_types); i++) {
        rb_header(&b, 3, 0, 1);
        rb_str(&b, "k");
        rb_u32(&b, bad_types[i]);
        rb_zeros(&b, 16);
        rb_reject(&b, "unknown value type");
        rb_header(&b, 3, 0, 1);
        rb_str(&b, "k");
        rb_u32(&b, GGUF_VT_ARRAY);
        rb_u32(&b, bad_types[i]);
        rb_u64(&b, 0);
        rb_reject(&b, "element type");
    }
    rb_header(&b, 3, 0, 1);
    rb_str(&b, "");
    rb_u32(&b, GGUF_VT_U32);
    rb_u32(&b, 1);
    rb_reject(&b, "empty key");
    rb_header(&b, 3, 0, 1);
    rb_str(&b, "flag");
    rb_u32(&b, GGUF_VT_BOOL);
    rb_zeros(&b, 1);
    b.p[b.n - 1] = 2;
    rb_reject(&b, "bool");
    /* duplicate keys */
    rb_header(&b, 3, 0, 3);
    rb_kv_u32(&b, "a.key", 1);
    rb_kv_u32(&b, "b.key", 1);
    rb_kv_u32(&b, "a.key", 2);
    rb_reject(&b, "duplicate key");
    /* alignment: zero, not a power of two, wrong types */
    uint32_t bad_align[] = {0, 48, 3, 0x80000001u};
    for (size_t i = 0; i < MR_ARRAY_LEN(bad_align); i++) {
        rb_header(&b, 3, 0, 1);
        rb_kv_u32(&b, "general.alignment", bad_align[i]);
        rb_reject(&b, "general.alignment");
    }
    rb_header(&b, 3, 0, 1);
    rb_str(&b, "general.alignment");
    rb_u32(&b, GGUF_VT_U64);
    rb_u64(&b, 32);
    rb_reject(&b, "must be a U32");
    rb_header(&b, 3, 0, 1);
    rb_str(&b, "general.alignment");
    rb_u32(&b, GGUF_VT_STRING);
    rb_str(&b, "32");
    rb_reject(&b, "must be a U32");
}

/* One tensor info (after one alignment key when align != 0), padding and data_bytes of data. */
static void one_tensor(struct rb *b, uint32_t align, const char *name, uint32_t n_dims,
                       const uint64_t *ne, uint32_t type, uint64_t offset, size_t data_bytes) {
    rb_header(b, 3, 1, align ? 1 : 0);
    if (align)
        rb_kv_u32(b, "general.alignment", align);
    rb_tensor(b, name, n_dims, ne, type, offset);
    rb_pad(b, align ? align : 32);
    rb_zeros(b, data_bytes);
}

static void test_bad_tensors(void **state) {
    (void)state;
    struct rb b = {0};
    uint64_t ne16[1] = {16};
    /* a valid baseline built the same way */
    one_tensor(&b, 0, "t", 1, ne16, MOERUN_TYPE_F32, 0, 64);
    struct counter c;
    struct gguf_ctx *ctx = NULL;
    assert_int_equal(open_mem_counted(b.p, b.n, &c, &ctx), MOERUN_OK);
    assert_int_equal(ctx->tensors[0].nbytes, 64);
    assert_int_equal(ctx->tensors[0].offset, ctx->data_offset);
    gguf_close(ctx);
    free(b.p);
    memset(&b, 0, sizeof(b));

    one_tensor(&b, 0, "t", 1, ne16, MOERUN_TYPE_F32, 1 << 20, 64);
    rb_reject(&b, "past the end");
    one_tensor(&b, 0, "t", 1, ne16, MOERUN_TYPE_F32, UINT64_MAX - 31, 64);
    rb_reject(&b, "past the end");
    one_tensor(&b, 0, "t", 1, ne16, MOERUN_TYPE_F32, 8, 64);
    rb_reject(&b, "alignment");
    one_tensor(&b, 64, "t", 1, ne16, MOERUN_TYPE_F32, 32, 128);
    rb_reject(&b, "alignment");
    one_tensor(&b, 0, "t", 1, ne16, MOERUN_TYPE_F32, 0, 63); /* tensor past the end of file */
    rb_reject(&b, "past the end");
    one_tensor(&b, 0, "t", 1, ne16, 5, 0, 64);
    rb_reject(&b, "unknown tensor type 5");
    one_tensor(&b, 0, "t", 1, ne16, 1000, 0, 64);
    rb_reject(&b, "unknown tensor type 1000");
    one_tensor(&b, 0, "t", 1, ne16, MOERUN_TYPE_Q8_0, 0, 64);
    rb_reject(&b, "block size");
    uint64_t ne_k[1] = {128};
    one_tensor(&b, 0, "t", 1, ne_k, MOERUN_TYPE_Q4_K, 0, 1024);
    rb_reject(&b, "block size");
    uint64_t ne5[5] = {16, 1, 1, 1, 1};
    one_tensor(&b, 0, "t", 0, ne5, MOERUN_TYPE_F32, 0, 64);
    rb_reject(&b, "n_dims 0");
    one_tensor(&b, 0, "t", 5, ne5, MOERUN_TYPE_F32, 0, 64);
    rb_reject(&b, "n_dims 5");
    uint64_t ne_zero[2] = {16, 0};
    one_tensor(&b, 0, "t", 2, ne_zero, MOERUN_TYPE_F32, 0, 64);
    rb_reject(&b, "ne[1]");
    uint64_t ne_big[3] = {(uint64_t)1 << 32, (uint64_t)1 << 32, (uint64_t)1 << 32};
    one_tensor(&b, 0, "t", 3, ne_big, MOERUN_TYPE_F32, 0, 64);
    rb_reject(&b, "overflow");
    uint64_t ne_neg[1] = {UINT64_MAX};
    one_tensor(&b, 0, "t", 1, ne_neg, MOERUN_TYPE_F32, 0, 64);
    rb_reject(&b, "ne[0]");
    uint64_t ne_bytes[2] = {(uint64_t)1 << 40, (uint64_t)1 << 22}; /* 2^62 elements, 2^64 B */
    one_tensor(&b, 0, "t", 2, ne_bytes, MOERUN_TYPE_F32, 0, 64);
    rb_reject(&b, "overflows");
    one_tensor(&b, 0, "", 1, ne16, MOERUN_TYPE_F32, 0, 64);
    rb_reject(&b, "empty tensor name");

    /* overlapping tensors, duplicate names */
    rb_header(&b, 3, 2, 0);
    rb_tensor(&b, "x", 1, ne16, MOERUN_TYPE_F32, 64);
    rb_tensor(&b, "y", 1, ne16, MOERUN_TYPE_F32, 32);
    rb_pad(&b, 32);
    rb_zeros(&b, 128);
    rb_reject(&b, "overlaps");
    rb_header(&b, 3, 2, 0);
    rb_tensor(&b, "x", 1, ne16, MOERUN_TYPE_F32, 0);
    rb_tensor(&b, "x", 1, ne16, MOERUN_TYPE_F32, 64);
    rb_pad(&b, 32);
    rb_zeros(&b, 128);
    rb_reject(&b, "duplicate tensor");
    /* both fine apart: the same data, not overlapping */
    rb_header(&b, 3, 2, 0);
    rb_tensor(&b, "x", 1, ne16, MOERUN_TYPE_F32, 64);
    rb_tensor(&b, "y", 1, ne16, MOERUN_TYPE_F32, 0);
    rb_pad(&b, 32);
    rb_zeros(&b, 128);
    assert_int_equal(open_mem_counted(b.p, b.n, &c, &ctx), MOERUN_OK);
    assert_int_equal(gguf_find_tensor(ctx, "y"), 1);
    gguf_close(ctx);
    free(b.p);
}

/* Every allocation failing in turn: MOERUN_ERR_NOMEM, nothing leaked. */
static void test_nomem(void **state) {
    (void)state;
    size_t n;
    unsigned char *file = small_valid(&n, 3);
    for (uint64_t k = 0;; k++) {
        struct counter c;
        moerun_allocator a = counting(&c);
        c.fail_after = k;
        struct gguf_source src = {.fd = -1, .mem = file, .size = n};
        struct gguf_ctx *ctx = NULL;
        int st = gguf_open_source(&src, &a, &ctx);
        if (st == MOERUN_OK) {
            assert_true(k > 0);
            gguf_close(ctx);
            assert_int_equal(c.cur, 0);
            break;
        }
        assert_int_equal(st, MOERUN_ERR_NOMEM);
        assert_int_equal(c.cur, 0);
        assert_true(k < 1000);
    }
    /* the writer too */
    for (uint64_t k = 0;; k++) {
        struct counter c;
        moerun_allocator a = counting(&c);
        c.fail_after = k;
        struct gguf_writer *w = NULL;
        int st = gguf_writer_create(&a, &w);
        const char *strs[] = {"a", "b"};
        uint64_t ne[1] = {32};
        if (st == MOERUN_OK)
            st = gguf_writer_set_str(w, "k", "v");
        if (st == MOERUN_OK)
            st = gguf_writer_set_arr_str(w, "s", strs, 2);
        if (st == MOERUN_OK)
            st = gguf_writer_add_tensor(w, "t", MOERUN_TYPE_F32, 1, ne);
        gguf_writer_destroy(w);
        assert_int_equal(c.cur, 0);
        if (st == MOERUN_OK)
            break;
        assert_int_equal(st, MOERUN_ERR_NOMEM);
        assert_true(k < 1000);
    }
    free(file);
}

/* --- writer errors -------------------------------------------------------------------------- */

static void test_writer_errors(void **state) {
    (void)state;
    struct gguf_writer *w = NULL;
    uint64_t ne[2] = {32, 2};
    assert_int_equal(gguf_writer_create(NULL, &w), MOERUN_OK);
    assert_int_equal(gguf_writer_set_version(w, 1), MOERUN_ERR_INVALID_ARG);
    assert_int_equal(gguf_writer_set_u32(w, "k", 1), MOERUN_OK);
    assert_int_equal(gguf_writer_set_u32(w, "k", 2), MOERUN_ERR_INVALID_ARG);
    assert_non_null(strstr(moerun_errmsg(), "'k'"));
    assert_int_equal(gguf_writer_set_u32(w, "", 2), MOERUN_ERR_INVALID_ARG);
    assert_int_equal(gguf_writer_set_u32(w, "general.alignment", 48), MOERUN_ERR_INVALID_ARG);
    assert_int_equal(gguf_writer_set_u32(w, "general.alignment", 0), MOERUN_ERR_INVALID_ARG);
    assert_int_equal(gguf_writer_set_u64(w, "general.alignment", 64), MOERUN_ERR_INVALID_ARG);
    struct gguf_value v = {.type = GGUF_VT_U8, .v.u64 = 256};
    assert_int_equal(gguf_writer_set_value(w, "u8", &v), MOERUN_ERR_INVALID_ARG);
    v.type = GGUF_VT_I16;
    v.v.i64 = -40000;
    assert_int_equal(gguf_writer_set_value(w, "i16", &v), MOERUN_ERR_INVALID_ARG);
    v.type = (enum gguf_vtype)77;
    assert_int_equal(gguf_writer_set_value(w, "bad", &v), MOERUN_ERR_INVALID_ARG);
    struct gguf_value not_arr = {.type = GGUF_VT_U32, .v.u64 = 1};
    v = make_arr(GGUF_VT_ARRAY, 1, &not_arr);
    assert_int_equal(gguf_writer_set_value(w, "bad", &v), MOERUN_ERR_INVALID_ARG);
    assert_int_equal(gguf_writer_set_arr(w, "bad", GGUF_VT_STRING, NULL, 0),
                     MOERUN_ERR_INVALID_ARG);
    /* the failed calls left nothing behind: "bad" and "u8" can still be set */
    v.type = GGUF_VT_U8;
    v.v.u64 = 255;
    assert_int_equal(gguf_writer_set_value(w, "u8", &v), MOERUN_OK);
    assert_int_equal(gguf_writer_set_str(w, "bad", "ok"), MOERUN_OK);

    assert_int_equal(gguf_writer_add_tensor(w, "t", MOERUN_TYPE_Q8_0, 2, ne), MOERUN_OK);
    assert_int_equal(gguf_writer_add_tensor(w, "t", MOERUN_TYPE_Q8_0, 2, ne),
                     MOERUN_ERR_INVALID_ARG);
    assert_int_equal(gguf_writer_add_tensor(w, "u", MOERUN_TYPE_Q8_0, 0, ne),
                     MOERUN_ERR_INVALID_ARG);
    assert_int_equal(gguf_writer_add_tensor(w, "u", MOERUN_TYPE_Q8_0, 5, ne),
                     MOERUN_ERR_INVALID_ARG);
    assert_int_equal(gguf_writer_add_tensor(w, "u", 5, 2, ne), MOERUN_ERR_INVALID_ARG);
    uint64_t ne_bad[1] = {16};
    assert_int_equal(gguf_writer_add_tensor(w, "u", MOERUN_TYPE_Q8_0, 1, ne_bad),
                     MOERUN_ERR_INVALID_ARG);
    /* alignment after a tensor would move offsets already handed out */
    assert_int_equal(gguf_writer_set_u32(w, "general.alignment", 64), MOERUN_ERR_INVALID_ARG);
    assert_int_equal(gguf_writer_write_data(w, "x", 1), MOERUN_ERR_INVALID_ARG); /* not begun */
    const char *path = tu_tmp_path(".gguf");
    int fd = open_tmp(path);
    assert_int_equal(gguf_writer_begin(w, fd), MOERUN_OK);
    assert_int_equal(gguf_writer_set_u32(w, "late", 1), MOERUN_ERR_INVALID_ARG);
    unsigned char data[68] = {0};
    assert_int_equal(gguf_writer_write_data(w, data, 10), MOERUN_OK);
    assert_int_equal(gguf_writer_finish(w), MOERUN_ERR_INVALID_ARG);
    assert_non_null(strstr(moerun_errmsg(), "'t' got 10 of its 68 bytes"));
    assert_int_equal(gguf_writer_write_data(w, data, 58), MOERUN_OK);
    assert_int_equal(gguf_writer_finish(w), MOERUN_OK);
    gguf_writer_destroy(w);
    close(fd);
    unlink(path);
    gguf_writer_destroy(NULL);

    /* write errors: a read-only descriptor, a full device */
    assert_int_equal(gguf_writer_create(NULL, &w), MOERUN_OK);
    fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    assert_true(fd >= 0);
    assert_int_equal(gguf_writer_begin(w, fd), MOERUN_ERR_IO);
    assert_non_null(strstr(moerun_errmsg(), "errno"));
    assert_int_equal(gguf_writer_finish(w), MOERUN_ERR_IO); /* sticky */
    close(fd);
    gguf_writer_destroy(w);
    fd = open("/dev/full", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        assert_int_equal(gguf_writer_create(NULL, &w), MOERUN_OK);
        assert_int_equal(gguf_writer_set_str(w, "k", "v"), MOERUN_OK);
        assert_int_equal(gguf_writer_begin(w, fd), MOERUN_ERR_IO);
        assert_non_null(strstr(moerun_errmsg(), strerror(ENOSPC)));
        gguf_writer_destroy(w);
        close(fd);
    }
}

/* --- golden files --------------------------------------------------------------------------- */

static void check_golden_file(const char *path, const char *arch_expect, bool model,
                              uint64_t n_vocab) {
    struct counter c;
    moerun_allocator a = counting(&c);
    struct gguf_ctx *ctx = NULL;
    int st = gguf_open_file(path, &a, &ctx);
    if (st != MOERUN_OK)
        fail_msg("%s: %s", path, moerun_errmsg());
    struct gguf_str arch = {NULL, 0};
    assert_int_equal(gguf_get_str(ctx, "general.architecture", &arch), MOERUN_OK);
    assert_true(arch.len > 0);
    if (arch_expect)
        assert_string_equal(arch.ptr, arch_expect);
    struct gguf_array toks;
    assert_int_equal(gguf_get_arr(ctx, "tokenizer.ggml.tokens", &toks), MOERUN_OK);
    assert_int_equal(toks.elem_type, GGUF_VT_STRING);
    assert_true(toks.n > 0);
    if (n_vocab)
        assert_int_equal(toks.n, n_vocab);
    if (model) {
        assert_true(ctx->n_tensors > 0);
        const struct gguf_tensor *te = gguf_get_tensor(ctx, "token_embd.weight");
        assert_non_null(te);
        assert_int_equal(te->ne[1], toks.n);
    }
    for (uint64_t i = 0; i < ctx->n_kv; i++) {
        char buf[256];
        assert_true(gguf_value_format(&ctx->kv[i].value, buf, sizeof(buf)) > 0);
    }
    gguf_close(ctx);
    assert_int_equal(c.cur, 0);
}

static void test_golden(void **state) {
    (void)state;
    const char *probe = tu_shared_path("golden/mixtral-f16.gguf");
    if (!probe) {
        skip();
        return;
    }
    char dir[2048];
    snprintf(dir, sizeof(dir), "%s", probe);
    *strrchr(dir, '/') = '\0';
    char path[8192];
    int n_models = 0, n_vocab_files = 0;
    /* models listed in the manifest: arch and n_vocab */
    snprintf(path, sizeof(path), "%s/MANIFEST.tsv", dir);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    char line[4096];
    assert_non_null(fgets(line, sizeof(line), f)); /* header */
    while (fgets(line, sizeof(line), f)) {
        char name[256], arch[64], types[1024];
        unsigned long long n_vocab;
        if (sscanf(line, "%255[^\t]\t%63[^\t]\t%1023[^\t]\t%llu", name, arch, types, &n_vocab) != 4)
            continue;
        snprintf(path, sizeof(path), "%s/%s.gguf", dir, name);
        check_golden_file(path, arch, true, n_vocab);
        n_models++;
    }
    fclose(f);
    assert_true(n_models > 0);
    /* every .gguf in the folder and in vocab/ */
    const char *subdirs[] = {"", "/vocab"};
    for (int s = 0; s < 2; s++) {
        char d[4096];
        snprintf(d, sizeof(d), "%s%s", dir, subdirs[s]);
        DIR *dd = opendir(d);
        if (!dd)
            continue;
        struct dirent *e;
        while ((e = readdir(dd))) {
            size_t len = strlen(e->d_name);
            if (len < 5 || strcmp(e->d_name + len - 5, ".gguf") != 0)
                continue;
            snprintf(path, sizeof(path), "%s/%s", d, e->d_name);
            check_golden_file(path, NULL, s == 0, 0);
            n_vocab_files += s == 1;
        }
        closedir(dd);
    }
    print_message("golden: %d models from the manifest, %d vocab files\n", n_models, n_vocab_files);
}

/* --- corpus for fuzzing --------------------------------------------------------------------- */

static int write_corpus(const char *dir) {
    tu_rng_init(&rng, tu_seed());
    for (int i = 0; i < 6; i++) {
        size_t n;
        unsigned char *buf;
        if (i < 2) {
            buf = small_valid(&n, i == 0 ? 3 : 2);
        } else {
            struct model m;
            model_build(&m, i >= 4);
            const char *p = model_write(&m, 3, i == 5 ? 64 : 0);
            buf = slurp(p, &n);
            unlink(p);
            model_free(&m);
        }
        char path[4096];
        snprintf(path, sizeof(path), "%s/seed-%d.gguf", dir, i);
        FILE *f = fopen(path, "wb");
        if (!f || fwrite(buf, 1, n, f) != n) {
            fprintf(stderr, "cannot write %s: %s\n", path, strerror(errno));
            return 1;
        }
        fclose(f);
        free(buf);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "--write-corpus") == 0)
        return write_corpus(argv[2]);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_v3),
        cmocka_unit_test(test_roundtrip_v2),
        cmocka_unit_test(test_roundtrip_alignment),
        cmocka_unit_test(test_writer_streaming),
        cmocka_unit_test(test_getters),
        cmocka_unit_test(test_value_format),
        cmocka_unit_test(test_truncated),
        cmocka_unit_test(test_bitflips),
        cmocka_unit_test(test_bad_header),
        cmocka_unit_test(test_bad_metadata),
        cmocka_unit_test(test_bad_tensors),
        cmocka_unit_test(test_nomem),
        cmocka_unit_test(test_writer_errors),
        cmocka_unit_test(test_golden),
    };
    return cmocka_run_group_tests(tests, setup_rng, NULL);
}
