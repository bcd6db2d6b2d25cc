/* GGUF v2/v3 reader: parse, validate against the file's size, index by name.
 *
 * Every count and length read from the file is checked against the bytes left in it before
 * anything is allocated from it, so memory stays within a small multiple of the file's size.
 * All strings, arrays and tables live in one arena owned by the context. */
#include "gguf.h"
#include "internal.h"
#include "types.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdalign.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the GGUF reader assumes a little-endian host"
#endif

#define GGUF_READ_BUF     (64u << 10)             /* pread buffer for fd sources, bytes */
#define ARENA_CHUNK       (16u << 10)             /* arena chunk for small allocations, bytes */
#define ARENA_DEDICATED   (4u << 10)              /* allocations above this get their own chunk */
#define GGUF_MIN_KV_BYTES (8 + 1 + 4 + 1)         /* key length, 1-byte key, type, u8 */
#define GGUF_MIN_TI_BYTES (8 + 1 + 4 + 8 + 4 + 8) /* name, n_dims, ne[0], type, offset */
#define GGUF_MAX_ITEMS    (UINT32_MAX - 1u)       /* hash tables index with uint32_t */

/* --- arena ---------------------------------------------------------------------------------- */

struct arena_chunk {
    struct arena_chunk *next;
    size_t used, cap;
    alignas(16) unsigned char data[];
};

struct gguf_priv {
    moerun_allocator alloc; /* copy of the caller's allocator (alloc == NULL: system) */
    struct arena_chunk *chunks;
    uint32_t *kv_hash; /* index + 1, 0 = empty; kv_hash_cap entries, a power of two */
    uint64_t kv_hash_cap;
    uint32_t *t_hash;
    uint64_t t_hash_cap;
};

struct gguf_ctx_full {
    struct gguf_ctx pub;
    struct gguf_priv priv;
};

static const moerun_allocator *priv_alloc(const struct gguf_priv *pv) {
    return pv->alloc.alloc ? &pv->alloc : NULL;
}

/* n bytes aligned to align (<= 16) from the arena, or NULL. */
static void *arena_alloc(struct gguf_priv *pv, size_t n, size_t align) {
    struct arena_chunk *c = pv->chunks;
    if (n == 0)
        n = 1;
    if (n <= ARENA_DEDICATED && c && c->cap >= ARENA_CHUNK) {
        size_t at = (c->used + align - 1) & ~(align - 1);
        if (at <= c->cap && c->cap - at >= n) {
            c->used = at + n;
            return c->data + at;
        }
    }
    size_t cap = n > ARENA_DEDICATED ? n : ARENA_CHUNK;
    if (cap > SIZE_MAX - sizeof(struct arena_chunk))
        return NULL;
    struct arena_chunk *nc = mr_alloc(priv_alloc(pv), sizeof(*nc) + cap, 16);
    if (!nc)
        return NULL;
    nc->cap = cap;
    nc->used = n;
    if (n > ARENA_DEDICATED && c) {
        /* keep filling the current small-object chunk */
        nc->next = c->next;
        c->next = nc;
    } else {
        nc->next = c;
        pv->chunks = nc;
    }
    return nc->data;
}

static void arena_free_all(struct gguf_priv *pv) {
    struct arena_chunk *c = pv->chunks;
    while (c) {
        struct arena_chunk *next = c->next;
        mr_free(priv_alloc(pv), c);
        c = next;
    }
    pv->chunks = NULL;
}

/* --- hashing -------------------------------------------------------------------------------- */

static uint64_t hash_bytes(const char *s, uint64_t len) {
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */
    for (uint64_t i = 0; i < len; i++) {
        h ^= (unsigned char)s[i];
        h *= 0x100000001b3ull;
    }
    return h ^ (h >> 29);
}

static uint64_t hash_cap_for(uint64_t n) {
    uint64_t cap = 8;
    while (cap < 2 * n)
        cap <<= 1;
    return cap;
}

/* Index of name in a table of strings (get_name(i) gives entry i), or -1. */
static int64_t hash_find(const uint32_t *table, uint64_t cap,
                         const struct gguf_str *(*get)(const struct gguf_ctx *, uint32_t),
                         const struct gguf_ctx *ctx, const char *name, uint64_t len) {
    if (!table)
        return -1;
    uint64_t mask = cap - 1;
    for (uint64_t h = hash_bytes(name, len) & mask;; h = (h + 1) & mask) {
        uint32_t e = table[h];
        if (e == 0)
            return -1;
        const struct gguf_str *s = get(ctx, e - 1);
        if (s->len == len && memcmp(s->ptr, name, len) == 0)
            return (int64_t)(e - 1);
    }
}

/* Insert entry idx; returns the index of an equal entry already there, else -1. */
static int64_t hash_insert(uint32_t *table, uint64_t cap,
                           const struct gguf_str *(*get)(const struct gguf_ctx *, uint32_t),
                           const struct gguf_ctx *ctx, uint32_t idx) {
    const struct gguf_str *key = get(ctx, idx);
    uint64_t mask = cap - 1;
    for (uint64_t h = hash_bytes(key->ptr, key->len) & mask;; h = (h + 1) & mask) {
        uint32_t e = table[h];
        if (e == 0) {
            table[h] = idx + 1;
            return -1;
        }
        const struct gguf_str *s = get(ctx, e - 1);
        if (s->len == key->len && memcmp(s->ptr, key->ptr, key->len) == 0)
            return (int64_t)(e - 1);
    }
}

static const struct gguf_str *kv_name(const struct gguf_ctx *ctx, uint32_t i) {
    return &ctx->kv[i].key;
}

static const struct gguf_str *tensor_name(const struct gguf_ctx *ctx, uint32_t i) {
    return &ctx->tensors[i].name;
}

/* --- the parser ----------------------------------------------------------------------------- */

struct parser {
    const struct gguf_source *src;
    struct gguf_ctx *ctx;
    struct gguf_priv *pv;
    uint64_t pos, size;
    unsigned char *buf; /* fd sources: bytes [buf_off, buf_off + buf_len) of the file */
    uint64_t buf_off;
    size_t buf_len, buf_cap;
    char where[192]; /* "key 'general.name' at offset 123", for messages */
};

/* A name safe to print: at most 64 bytes, non-printable bytes as '?'. */
static void printable(char *dst, size_t size, const char *s, uint64_t len) {
    size_t n = 0;
    for (uint64_t i = 0; i < len && n + 4 < size; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (i == 64) {
            memcpy(dst + n, "...", 3);
            n += 3;
            break;
        }
        dst[n++] = (ch >= 0x20 && ch < 0x7f) || ch >= 0x80 ? (char)ch : '?';
    }
    dst[n] = '\0';
}

static void human_size(char *dst, size_t size, uint64_t n) {
    if (n >= (1ull << 30))
        snprintf(dst, size, "%.1f GB", (double)n / (1ull << 30));
    else if (n >= (1ull << 20))
        snprintf(dst, size, "%.1f MB", (double)n / (1ull << 20));
    else if (n >= (1ull << 10))
        snprintf(dst, size, "%.1f KB", (double)n / (1ull << 10));
    else
        snprintf(dst, size, "%" PRIu64 " bytes", n);
}

static int fmt_err(struct parser *p, const char *fmt, ...) MR_PRINTF(2, 3);
static int fmt_err(struct parser *p, const char *fmt, ...) {
    char msg[320];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    return mr_err(MOERUN_ERR_FORMAT, "gguf: %s: %s", p->where, msg);
}

static int err_truncated(struct parser *p, const char *what, uint64_t need) {
    char fs[32];
    human_size(fs, sizeof(fs), p->size);
    return fmt_err(
        p, "%s needs %" PRIu64 " bytes at offset %" PRIu64 ", past the end of the file (%s)", what,
        need, p->pos, fs);
}

static int err_nomem(struct parser *p, uint64_t bytes) {
    return mr_err(MOERUN_ERR_NOMEM, "gguf: %s: out of memory allocating %" PRIu64 " bytes",
                  p->where, bytes);
}

static uint64_t bytes_left(const struct parser *p) {
    return p->size - p->pos;
}

static int pread_all(struct parser *p, void *dst, size_t n, uint64_t off) {
    unsigned char *d = dst;
    while (n > 0) {
        ssize_t r = pread(p->src->fd, d, n, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            char what[96];
            snprintf(what, sizeof(what), "gguf: read at offset %" PRIu64, off);
            int e = errno;
            int st = mr_err_errno(e, what);
            return st == MOERUN_ERR_NOMEM ? st : MOERUN_ERR_IO;
        }
        if (r == 0)
            return mr_err(MOERUN_ERR_IO,
                          "gguf: read at offset %" PRIu64 ": unexpected end of file (the file "
                          "is shorter than its size of %" PRIu64 " bytes)",
                          off, p->size);
        d += r;
        n -= (size_t)r;
        off += (uint64_t)r;
    }
    return MOERUN_OK;
}

/* Copy n bytes at the current position to dst (n already checked against bytes_left). */
static int rd(struct parser *p, void *dst, uint64_t n) {
    MOERUN_ASSERT(n <= bytes_left(p));
    if (n == 0)
        return MOERUN_OK;
    if (p->src->fd < 0) {
        memcpy(dst, (const unsigned char *)p->src->mem + p->pos, n);
        p->pos += n;
        return MOERUN_OK;
    }
    unsigned char *d = dst;
    while (n > 0) {
        if (p->pos >= p->buf_off && p->pos < p->buf_off + p->buf_len) {
            size_t in = (size_t)MR_MIN(n, p->buf_off + p->buf_len - p->pos);
            memcpy(d, p->buf + (p->pos - p->buf_off), in);
            d += in;
            n -= in;
            p->pos += in;
            continue;
        }
        if (n >= p->buf_cap) { /* large reads bypass the buffer */
            int st = pread_all(p, d, n, p->pos);
            if (st < 0)
                return st;
            p->pos += n;
            return MOERUN_OK;
        }
        size_t fill = (size_t)MR_MIN((uint64_t)p->buf_cap, bytes_left(p));
        int st = pread_all(p, p->buf, fill, p->pos);
        if (st < 0)
            return st;
        p->buf_off = p->pos;
        p->buf_len = fill;
    }
    return MOERUN_OK;
}

static int rd_u32(struct parser *p, const char *what, uint32_t *v) {
    if (bytes_left(p) < 4)
        return err_truncated(p, what, 4);
    return rd(p, v, 4);
}

static int rd_u64(struct parser *p, const char *what, uint64_t *v) {
    if (bytes_left(p) < 8)
        return err_truncated(p, what, 8);
    return rd(p, v, 8);
}

/* A string: u64 length + bytes, copied NUL-terminated into the arena. */
static int rd_str(struct parser *p, const char *what, struct gguf_str *s) {
    uint64_t len;
    int st = rd_u64(p, what, &len);
    if (st < 0)
        return st;
    if (len > bytes_left(p)) {
        char fs[32];
        human_size(fs, sizeof(fs), p->size);
        return fmt_err(p, "%s of %" PRIu64 " bytes at offset %" PRIu64 " exceeds the file (%s)",
                       what, len, p->pos - 8, fs);
    }
    char *d = arena_alloc(p->pv, (size_t)len + 1, 1);
    if (!d)
        return err_nomem(p, len + 1);
    st = rd(p, d, len);
    if (st < 0)
        return st;
    d[len] = '\0';
    s->ptr = d;
    s->len = len;
    return MOERUN_OK;
}

/* Bytes of one element in the file: exact for scalars, the minimum for strings and arrays. */
uint64_t gguf_vtype_size(uint32_t t) {
    switch (t) {
    case GGUF_VT_U8:
    case GGUF_VT_I8:
    case GGUF_VT_BOOL:
        return 1;
    case GGUF_VT_U16:
    case GGUF_VT_I16:
        return 2;
    case GGUF_VT_U32:
    case GGUF_VT_I32:
    case GGUF_VT_F32:
        return 4;
    case GGUF_VT_U64:
    case GGUF_VT_I64:
    case GGUF_VT_F64:
    case GGUF_VT_STRING:
        return 8;
    case GGUF_VT_ARRAY:
        return 4 + 8;
    }
    return 0;
}

static bool vtype_is_scalar(uint32_t t) {
    return t < GGUF_VT_COUNT && t != GGUF_VT_STRING && t != GGUF_VT_ARRAY;
}

static int parse_value(struct parser *p, uint32_t type, int depth, struct gguf_value *out);

/* An array body: u32 elem_type, u64 n, n elements. depth counts this array's level. */
static int parse_array(struct parser *p, int depth, struct gguf_value *out) {
    uint64_t at = p->pos;
    if (depth > GGUF_MAX_NESTING)
        return fmt_err(p, "array at offset %" PRIu64 " nested deeper than %d levels", at,
                       GGUF_MAX_NESTING);
    uint32_t et;
    uint64_t n;
    int st = rd_u32(p, "array element type", &et);
    if (st < 0)
        return st;
    if (et >= GGUF_VT_COUNT)
        return fmt_err(p, "array at offset %" PRIu64 " has unknown element type %" PRIu32, at, et);
    if ((st = rd_u64(p, "array length", &n)) < 0)
        return st;
    uint64_t esz = gguf_vtype_size(et);
    if (n > bytes_left(p) / esz) {
        char fs[32];
        human_size(fs, sizeof(fs), p->size);
        return fmt_err(p,
                       "array of %" PRIu64 " %s at offset %" PRIu64
                       " exceeds the file (%s; at least %" PRIu64 " bytes each)",
                       n, gguf_vtype_name((enum gguf_vtype)et), at, fs, esz);
    }
    out->type = GGUF_VT_ARRAY;
    out->v.arr.elem_type = (enum gguf_vtype)et;
    out->v.arr.n = n;
    out->v.arr.data = NULL;
    if (vtype_is_scalar(et)) {
        void *d = arena_alloc(p->pv, (size_t)(n * esz), esz > 8 ? 8 : (size_t)esz);
        if (!d)
            return err_nomem(p, n * esz);
        if ((st = rd(p, d, n * esz)) < 0)
            return st;
        if (et == GGUF_VT_BOOL) {
            const uint8_t *b = d;
            for (uint64_t i = 0; i < n; i++)
                if (b[i] > 1)
                    return fmt_err(p, "bool array element %" PRIu64 " is %u, not 0 or 1", i, b[i]);
        }
        out->v.arr.data = d;
    } else if (et == GGUF_VT_STRING) {
        struct gguf_str *s = arena_alloc(p->pv, (size_t)(n * sizeof(*s)), alignof(struct gguf_str));
        if (!s)
            return err_nomem(p, n * sizeof(*s));
        for (uint64_t i = 0; i < n; i++)
            if ((st = rd_str(p, "array string", &s[i])) < 0)
                return st;
        out->v.arr.data = s;
    } else {
        struct gguf_value *vs =
            arena_alloc(p->pv, (size_t)(n * sizeof(*vs)), alignof(struct gguf_value));
        if (!vs)
            return err_nomem(p, n * sizeof(*vs));
        for (uint64_t i = 0; i < n; i++)
            if ((st = parse_value(p, GGUF_VT_ARRAY, depth + 1, &vs[i])) < 0)
                return st;
        out->v.arr.data = vs;
    }
    return MOERUN_OK;
}

static int parse_value(struct parser *p, uint32_t type, int depth, struct gguf_value *out) {
    int st;
    out->type = (enum gguf_vtype)type;
    if (type == GGUF_VT_STRING)
        return rd_str(p, "string value", &out->v.str);
    if (type == GGUF_VT_ARRAY)
        return parse_array(p, depth, out);
    uint64_t sz = gguf_vtype_size(type);
    unsigned char b[8];
    if (sz > bytes_left(p))
        return err_truncated(p, gguf_vtype_name((enum gguf_vtype)type), sz);
    if ((st = rd(p, b, sz)) < 0)
        return st;
    uint8_t u8;
    int8_t i8;
    uint16_t u16;
    int16_t i16;
    uint32_t u32;
    int32_t i32;
    float f32;
    switch (type) {
    case GGUF_VT_U8:
        memcpy(&u8, b, 1);
        out->v.u64 = u8;
        break;
    case GGUF_VT_BOOL:
        if (b[0] > 1)
            return fmt_err(p, "bool value is %u, not 0 or 1", b[0]);
        out->v.u64 = b[0];
        break;
    case GGUF_VT_I8:
        memcpy(&i8, b, 1);
        out->v.i64 = i8;
        break;
    case GGUF_VT_U16:
        memcpy(&u16, b, 2);
        out->v.u64 = u16;
        break;
    case GGUF_VT_I16:
        memcpy(&i16, b, 2);
        out->v.i64 = i16;
        break;
    case GGUF_VT_U32:
        memcpy(&u32, b, 4);
        out->v.u64 = u32;
        break;
    case GGUF_VT_I32:
        memcpy(&i32, b, 4);
        out->v.i64 = i32;
        break;
    case GGUF_VT_F32:
        memcpy(&f32, b, 4);
        out->v.f64 = f32;
        break;
    case GGUF_VT_U64:
        memcpy(&out->v.u64, b, 8);
        break;
    case GGUF_VT_I64:
        memcpy(&out->v.i64, b, 8);
        break;
    case GGUF_VT_F64:
        memcpy(&out->v.f64, b, 8);
        break;
    default:
        return MOERUN_ERR_INTERNAL;
    }
    return MOERUN_OK;
}

static int parse_header(struct parser *p, uint64_t *n_tensors, uint64_t *n_kv) {
    struct gguf_ctx *ctx = p->ctx;
    uint32_t magic, version;
    int st;
    snprintf(p->where, sizeof(p->where), "header at offset 0");
    if ((st = rd_u32(p, "magic", &magic)) < 0)
        return st;
    if (magic != GGUF_MAGIC)
        return fmt_err(p, "bad magic 0x%08" PRIx32 " (expected \"GGUF\"): not a GGUF file", magic);
    if ((st = rd_u32(p, "version", &version)) < 0)
        return st;
    if (version == 1)
        return fmt_err(p, "version 1 (the pre-2023 format) is not supported; convert the file "
                          "to GGUF v3");
    if (version == 0x02000000u || version == 0x03000000u)
        return fmt_err(p,
                       "version %" PRIu32 " byte-swapped: a big-endian GGUF file, not "
                       "supported",
                       __builtin_bswap32(version));
    if (version != 2 && version != 3)
        return fmt_err(p, "unsupported version %" PRIu32 " (2 and 3 are supported)", version);
    ctx->version = version;
    if ((st = rd_u64(p, "tensor count", n_tensors)) < 0)
        return st;
    if ((st = rd_u64(p, "metadata count", n_kv)) < 0)
        return st;
    uint64_t left = bytes_left(p);
    char fs[32];
    human_size(fs, sizeof(fs), p->size);
    if (*n_kv > left / GGUF_MIN_KV_BYTES || *n_kv > GGUF_MAX_ITEMS)
        return fmt_err(p, "%" PRIu64 " metadata pairs cannot fit in the file (%s)", *n_kv, fs);
    if (*n_tensors > left / GGUF_MIN_TI_BYTES || *n_tensors > GGUF_MAX_ITEMS)
        return fmt_err(p, "%" PRIu64 " tensor infos cannot fit in the file (%s)", *n_tensors, fs);
    if (*n_kv * GGUF_MIN_KV_BYTES + *n_tensors * GGUF_MIN_TI_BYTES > left)
        return fmt_err(p,
                       "%" PRIu64 " metadata pairs and %" PRIu64
                       " tensor infos cannot fit in the file (%s)",
                       *n_kv, *n_tensors, fs);
    return MOERUN_OK;
}

static int parse_kvs(struct parser *p, uint64_t n_kv) {
    struct gguf_ctx *ctx = p->ctx;
    struct gguf_priv *pv = p->pv;
    int st;
    ctx->kv = arena_alloc(pv, (size_t)(n_kv * sizeof(*ctx->kv)), alignof(struct gguf_kv));
    if (!ctx->kv)
        return err_nomem(p, n_kv * sizeof(*ctx->kv));
    pv->kv_hash_cap = hash_cap_for(n_kv);
    pv->kv_hash = arena_alloc(pv, (size_t)(pv->kv_hash_cap * 4), 4);
    if (!pv->kv_hash)
        return err_nomem(p, pv->kv_hash_cap * 4);
    memset(pv->kv_hash, 0, (size_t)(pv->kv_hash_cap * 4));
    for (uint64_t i = 0; i < n_kv; i++) {
        struct gguf_kv *kv = &ctx->kv[i];
        memset(kv, 0, sizeof(*kv));
        kv->offset = p->pos;
        snprintf(p->where, sizeof(p->where), "metadata pair %" PRIu64 " at offset %" PRIu64, i,
                 kv->offset);
        if ((st = rd_str(p, "key", &kv->key)) < 0)
            return st;
        if (kv->key.len == 0)
            return fmt_err(p, "empty key");
        char name[80];
        printable(name, sizeof(name), kv->key.ptr, kv->key.len);
        snprintf(p->where, sizeof(p->where), "key '%s' at offset %" PRIu64, name, kv->offset);
        ctx->n_kv = i + 1; /* the table below may look at entries up to i */
        int64_t dup = hash_insert(pv->kv_hash, pv->kv_hash_cap, kv_name, ctx, (uint32_t)i);
        if (dup >= 0)
            return fmt_err(p, "duplicate key (first at offset %" PRIu64 ")", ctx->kv[dup].offset);
        uint32_t type;
        if ((st = rd_u32(p, "value type", &type)) < 0)
            return st;
        if (type >= GGUF_VT_COUNT)
            return fmt_err(p, "unknown value type %" PRIu32, type);
        if ((st = parse_value(p, type, 1, &kv->value)) < 0)
            return st;
    }
    ctx->n_kv = n_kv;
    return MOERUN_OK;
}

static int parse_alignment(struct parser *p) {
    struct gguf_ctx *ctx = p->ctx;
    ctx->alignment = GGUF_DEFAULT_ALIGNMENT;
    int64_t i = gguf_find_key(ctx, "general.alignment");
    if (i < 0)
        return MOERUN_OK;
    const struct gguf_kv *kv = &ctx->kv[i];
    snprintf(p->where, sizeof(p->where), "key 'general.alignment' at offset %" PRIu64, kv->offset);
    if (kv->value.type != GGUF_VT_U32)
        return fmt_err(p, "must be a U32, found %s", gguf_vtype_name(kv->value.type));
    uint64_t a = kv->value.v.u64;
    if (a == 0 || (a & (a - 1)) != 0)
        return fmt_err(p, "alignment %" PRIu64 " is not a power of two", a);
    ctx->alignment = (uint32_t)a;
    return MOERUN_OK;
}

static int parse_tensor_infos(struct parser *p, uint64_t n_tensors) {
    struct gguf_ctx *ctx = p->ctx;
    struct gguf_priv *pv = p->pv;
    int st;
    ctx->tensors =
        arena_alloc(pv, (size_t)(n_tensors * sizeof(*ctx->tensors)), alignof(struct gguf_tensor));
    if (!ctx->tensors)
        return err_nomem(p, n_tensors * sizeof(*ctx->tensors));
    pv->t_hash_cap = hash_cap_for(n_tensors);
    pv->t_hash = arena_alloc(pv, (size_t)(pv->t_hash_cap * 4), 4);
    if (!pv->t_hash)
        return err_nomem(p, pv->t_hash_cap * 4);
    memset(pv->t_hash, 0, (size_t)(pv->t_hash_cap * 4));
    for (uint64_t i = 0; i < n_tensors; i++) {
        struct gguf_tensor *t = &ctx->tensors[i];
        memset(t, 0, sizeof(*t));
        t->info_offset = p->pos;
        snprintf(p->where, sizeof(p->where), "tensor %" PRIu64 " at offset %" PRIu64, i,
                 t->info_offset);
        if ((st = rd_str(p, "tensor name", &t->name)) < 0)
            return st;
        if (t->name.len == 0)
            return fmt_err(p, "empty tensor name");
        char name[80];
        printable(name, sizeof(name), t->name.ptr, t->name.len);
        snprintf(p->where, sizeof(p->where), "tensor '%s' at offset %" PRIu64, name,
                 t->info_offset);
        ctx->n_tensors = i + 1;
        int64_t dup = hash_insert(pv->t_hash, pv->t_hash_cap, tensor_name, ctx, (uint32_t)i);
        if (dup >= 0)
            return fmt_err(p, "duplicate tensor name (first at offset %" PRIu64 ")",
                           ctx->tensors[dup].info_offset);
        if ((st = rd_u32(p, "n_dims", &t->n_dims)) < 0)
            return st;
        if (t->n_dims < 1 || t->n_dims > GGUF_MAX_DIMS)
            return fmt_err(p, "n_dims %" PRIu32 " is not in 1..%d", t->n_dims, GGUF_MAX_DIMS);
        uint64_t n_el = 1;
        for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) {
            t->ne[d] = 1;
            if (d >= t->n_dims)
                continue;
            if ((st = rd_u64(p, "dimension", &t->ne[d])) < 0)
                return st;
            if (t->ne[d] == 0 || t->ne[d] > INT64_MAX)
                return fmt_err(p, "ne[%" PRIu32 "] = %" PRIu64 " is not in 1..2^63-1", d, t->ne[d]);
            if (mr_mul_overflow_u64(n_el, t->ne[d], &n_el) || n_el > INT64_MAX)
                return fmt_err(p, "element count overflows (ne[0..%" PRIu32 "] product > 2^63)", d);
        }
        t->n_elements = n_el;
        uint32_t type;
        if ((st = rd_u32(p, "tensor type", &type)) < 0)
            return st;
        const struct mr_type_info *ti = type < INT32_MAX ? mr_type_info((int)type) : NULL;
        if (!ti)
            return fmt_err(p, "unknown tensor type %" PRIu32, type);
        t->type = (int)type;
        if (t->ne[0] % ti->blck != 0)
            return fmt_err(p, "ne[0] = %" PRIu64 " is not a multiple of the %s block size %" PRIu32,
                           t->ne[0], ti->name, ti->blck);
        if (!mr_type_nbytes(t->type, n_el, &t->nbytes))
            return fmt_err(p, "byte size of %" PRIu64 " %s elements overflows", n_el, ti->name);
        if ((st = rd_u64(p, "tensor offset", &t->offset)) < 0)
            return st;
        if (t->offset % ctx->alignment != 0)
            return fmt_err(p, "data offset %" PRIu64 " is not a multiple of the alignment %" PRIu32,
                           t->offset, ctx->alignment);
    }
    ctx->n_tensors = n_tensors;
    return MOERUN_OK;
}

struct span {
    uint64_t begin, end;
    uint64_t idx;
};

static int span_cmp(const void *a, const void *b) {
    const struct span *x = a, *y = b;
    return x->begin < y->begin ? -1 : x->begin > y->begin ? 1 : 0;
}

/* Data offsets: inside the file, no two tensors overlapping. */
static int check_tensor_data(struct parser *p) {
    struct gguf_ctx *ctx = p->ctx;
    uint64_t rem = p->pos % ctx->alignment;
    if (mr_add_overflow_u64(p->pos, rem ? ctx->alignment - rem : 0, &ctx->data_offset))
        return MOERUN_ERR_INTERNAL; /* pos <= size, alignment <= 2^31: cannot happen */
    if (ctx->n_tensors == 0)
        return MOERUN_OK;
    char fs[32];
    human_size(fs, sizeof(fs), p->size);
    for (uint64_t i = 0; i < ctx->n_tensors; i++) {
        struct gguf_tensor *t = &ctx->tensors[i];
        char name[80];
        printable(name, sizeof(name), t->name.ptr, t->name.len);
        snprintf(p->where, sizeof(p->where), "tensor '%s' at offset %" PRIu64, name,
                 t->info_offset);
        uint64_t abs, end;
        if (mr_add_overflow_u64(ctx->data_offset, t->offset, &abs) ||
            mr_add_overflow_u64(abs, t->nbytes, &end) || end > p->size)
            return fmt_err(p,
                           "data [%" PRIu64 ", +%" PRIu64 ") at data offset %" PRIu64
                           " runs past the end of the file (%s)",
                           t->offset, t->nbytes, ctx->data_offset, fs);
        t->offset = abs;
    }
    struct span *sp =
        arena_alloc(p->pv, (size_t)(ctx->n_tensors * sizeof(*sp)), alignof(struct span));
    if (!sp)
        return err_nomem(p, ctx->n_tensors * sizeof(*sp));
    for (uint64_t i = 0; i < ctx->n_tensors; i++) {
        sp[i].begin = ctx->tensors[i].offset;
        sp[i].end = ctx->tensors[i].offset + ctx->tensors[i].nbytes;
        sp[i].idx = i;
    }
    qsort(sp, (size_t)ctx->n_tensors, sizeof(*sp), span_cmp);
    for (uint64_t i = 1; i < ctx->n_tensors; i++) {
        if (sp[i].begin < sp[i - 1].end) {
            const struct gguf_tensor *a = &ctx->tensors[sp[i - 1].idx];
            const struct gguf_tensor *b = &ctx->tensors[sp[i].idx];
            char na[80], nb[80];
            printable(na, sizeof(na), a->name.ptr, a->name.len);
            printable(nb, sizeof(nb), b->name.ptr, b->name.len);
            return mr_err(MOERUN_ERR_FORMAT,
                          "gguf: tensor '%s' at offset %" PRIu64 ": data [%" PRIu64 ", %" PRIu64
                          ") overlaps tensor '%s' [%" PRIu64 ", %" PRIu64 ")",
                          nb, b->info_offset, sp[i].begin, sp[i].end, na, sp[i - 1].begin,
                          sp[i - 1].end);
        }
    }
    return MOERUN_OK;
}

int gguf_open_source(const struct gguf_source *src, const moerun_allocator *a,
                     struct gguf_ctx **out) {
    if (!out)
        return mr_err(MOERUN_ERR_INVALID_ARG, "gguf: out is NULL");
    *out = NULL;
    if (!src || (src->fd < 0 && !src->mem && src->size > 0))
        return mr_err(MOERUN_ERR_INVALID_ARG, "gguf: no source");
    struct gguf_ctx_full *full = mr_alloc(a, sizeof(*full), 0);
    if (!full)
        return mr_err(MOERUN_ERR_NOMEM, "gguf: out of memory");
    memset(full, 0, sizeof(*full));
    if (a)
        full->priv.alloc = *a;
    struct gguf_ctx *ctx = &full->pub;
    ctx->priv = &full->priv;
    ctx->file_size = src->size;
    ctx->alignment = GGUF_DEFAULT_ALIGNMENT;
    struct parser p = {.src = src, .ctx = ctx, .pv = &full->priv, .size = src->size};
    int st = MOERUN_OK;
    if (src->fd >= 0) {
        p.buf_cap = (size_t)MR_MIN((uint64_t)GGUF_READ_BUF, MR_MAX(src->size, 1));
        p.buf = mr_alloc(a, p.buf_cap, 0);
        if (!p.buf) {
            st = mr_err(MOERUN_ERR_NOMEM, "gguf: out of memory");
            goto out_free;
        }
    }
    uint64_t n_tensors, n_kv;
    if ((st = parse_header(&p, &n_tensors, &n_kv)) < 0)
        goto out_free;
    if ((st = parse_kvs(&p, n_kv)) < 0)
        goto out_free;
    snprintf(p.where, sizeof(p.where), "alignment");
    if ((st = parse_alignment(&p)) < 0)
        goto out_free;
    if ((st = parse_tensor_infos(&p, n_tensors)) < 0)
        goto out_free;
    if ((st = check_tensor_data(&p)) < 0)
        goto out_free;
    mr_free(a, p.buf);
    *out = ctx;
    return MOERUN_OK;

out_free:
    mr_free(a, p.buf);
    gguf_close(ctx);
    return st;
}

int gguf_open_file(const char *path, const moerun_allocator *a, struct gguf_ctx **out) {
    if (!out)
        return mr_err(MOERUN_ERR_INVALID_ARG, "gguf: out is NULL");
    *out = NULL;
    if (!path)
        return mr_err(MOERUN_ERR_INVALID_ARG, "gguf: path is NULL");
    char what[512];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(what, sizeof(what), "gguf: open '%s'", path);
        return mr_err_errno(errno, what);
    }
    struct stat sb;
    int st;
    if (fstat(fd, &sb) != 0) {
        snprintf(what, sizeof(what), "gguf: stat '%s'", path);
        st = mr_err_errno(errno, what);
        goto out_close;
    }
    struct gguf_source src = {.fd = fd, .mem = NULL, .size = (uint64_t)sb.st_size};
    st = gguf_open_source(&src, a, out);
out_close:
    close(fd);
    return st;
}

void gguf_close(struct gguf_ctx *ctx) {
    if (!ctx)
        return;
    struct gguf_ctx_full *full = (struct gguf_ctx_full *)ctx;
    moerun_allocator alloc = full->priv.alloc;
    arena_free_all(&full->priv);
    mr_free(alloc.alloc ? &alloc : NULL, full);
}

/* --- lookups and getters -------------------------------------------------------------------- */

int64_t gguf_find_key(const struct gguf_ctx *ctx, const char *key) {
    if (!ctx || !key)
        return -1;
    const struct gguf_priv *pv = ctx->priv;
    return hash_find(pv->kv_hash, pv->kv_hash_cap, kv_name, ctx, key, strlen(key));
}

int64_t gguf_find_tensor(const struct gguf_ctx *ctx, const char *name) {
    if (!ctx || !name)
        return -1;
    const struct gguf_priv *pv = ctx->priv;
    return hash_find(pv->t_hash, pv->t_hash_cap, tensor_name, ctx, name, strlen(name));
}

const struct gguf_kv *gguf_get_kv(const struct gguf_ctx *ctx, const char *key) {
    int64_t i = gguf_find_key(ctx, key);
    return i < 0 ? NULL : &ctx->kv[i];
}

const struct gguf_tensor *gguf_get_tensor(const struct gguf_ctx *ctx, const char *name) {
    int64_t i = gguf_find_tensor(ctx, name);
    return i < 0 ? NULL : &ctx->tensors[i];
}

static int err_type(const struct gguf_kv *kv, const char *want) {
    char name[80];
    printable(name, sizeof(name), kv->key.ptr, kv->key.len);
    return mr_err(MOERUN_ERR_FORMAT, "gguf: key '%s' at offset %" PRIu64 ": expected %s, found %s",
                  name, kv->offset, want, gguf_vtype_name(kv->value.type));
}

static bool vtype_is_signed(enum gguf_vtype t) {
    return t == GGUF_VT_I8 || t == GGUF_VT_I16 || t == GGUF_VT_I32 || t == GGUF_VT_I64;
}

static bool vtype_is_unsigned(enum gguf_vtype t) {
    return t == GGUF_VT_U8 || t == GGUF_VT_U16 || t == GGUF_VT_U32 || t == GGUF_VT_U64;
}

/* Integer value of kv in [lo, hi] (as signed/unsigned 64-bit pairs): 1 when absent. */
static int get_int(const struct gguf_ctx *ctx, const char *key, bool want_signed, int64_t lo,
                   uint64_t hi, const char *want, const struct gguf_kv **kv_out, uint64_t *u_out,
                   int64_t *i_out) {
    const struct gguf_kv *kv = gguf_get_kv(ctx, key);
    if (!kv)
        return 1;
    *kv_out = kv;
    enum gguf_vtype t = kv->value.type;
    bool ok;
    if (vtype_is_unsigned(t)) {
        uint64_t u = kv->value.v.u64;
        ok = u <= hi;
        *u_out = u;
        *i_out = (int64_t)u;
    } else if (vtype_is_signed(t)) {
        int64_t i = kv->value.v.i64;
        ok = i >= lo && (i < 0 || (uint64_t)i <= hi);
        *u_out = (uint64_t)i;
        *i_out = i;
    } else {
        return err_type(kv, want);
    }
    if (!ok) {
        char name[80], val[32];
        printable(name, sizeof(name), kv->key.ptr, kv->key.len);
        if (vtype_is_signed(t))
            snprintf(val, sizeof(val), "%" PRId64, kv->value.v.i64);
        else
            snprintf(val, sizeof(val), "%" PRIu64, kv->value.v.u64);
        return mr_err(MOERUN_ERR_FORMAT,
                      "gguf: key '%s' at offset %" PRIu64 ": %s value %s does not fit in %s", name,
                      kv->offset, gguf_vtype_name(t), val, want);
    }
    (void)want_signed;
    return MOERUN_OK;
}

int gguf_get_u32(const struct gguf_ctx *ctx, const char *key, uint32_t *out) {
    const struct gguf_kv *kv;
    uint64_t u = 0;
    int64_t i = 0;
    int st = get_int(ctx, key, false, 0, UINT32_MAX, "u32", &kv, &u, &i);
    if (st == MOERUN_OK)
        *out = (uint32_t)u;
    return st;
}

int gguf_get_u64(const struct gguf_ctx *ctx, const char *key, uint64_t *out) {
    const struct gguf_kv *kv;
    uint64_t u = 0;
    int64_t i = 0;
    int st = get_int(ctx, key, false, 0, UINT64_MAX, "u64", &kv, &u, &i);
    if (st == MOERUN_OK)
        *out = u;
    return st;
}

int gguf_get_i64(const struct gguf_ctx *ctx, const char *key, int64_t *out) {
    const struct gguf_kv *kv;
    uint64_t u = 0;
    int64_t i = 0;
    int st = get_int(ctx, key, true, INT64_MIN, INT64_MAX, "i64", &kv, &u, &i);
    if (st == MOERUN_OK)
        *out = i;
    return st;
}

int gguf_get_f32(const struct gguf_ctx *ctx, const char *key, float *out) {
    const struct gguf_kv *kv = gguf_get_kv(ctx, key);
    if (!kv)
        return 1;
    if (kv->value.type != GGUF_VT_F32 && kv->value.type != GGUF_VT_F64)
        return err_type(kv, "F32 or F64");
    *out = (float)kv->value.v.f64;
    return MOERUN_OK;
}

int gguf_get_bool(const struct gguf_ctx *ctx, const char *key, bool *out) {
    const struct gguf_kv *kv = gguf_get_kv(ctx, key);
    if (!kv)
        return 1;
    if (kv->value.type != GGUF_VT_BOOL)
        return err_type(kv, "BOOL");
    *out = kv->value.v.u64 != 0;
    return MOERUN_OK;
}

int gguf_get_str(const struct gguf_ctx *ctx, const char *key, struct gguf_str *out) {
    const struct gguf_kv *kv = gguf_get_kv(ctx, key);
    if (!kv)
        return 1;
    if (kv->value.type != GGUF_VT_STRING)
        return err_type(kv, "STRING");
    *out = kv->value.v.str;
    return MOERUN_OK;
}

int gguf_get_arr(const struct gguf_ctx *ctx, const char *key, struct gguf_array *out) {
    const struct gguf_kv *kv = gguf_get_kv(ctx, key);
    if (!kv)
        return 1;
    if (kv->value.type != GGUF_VT_ARRAY)
        return err_type(kv, "ARRAY");
    *out = kv->value.v.arr;
    return MOERUN_OK;
}
