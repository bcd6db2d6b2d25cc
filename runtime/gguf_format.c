/* GGUF values rendered as text, for `moe-run --meta` and error messages: strings quoted,
 * escaped and cut, arrays abbreviated. */
#include "gguf.h"
#include "internal.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

const char *gguf_vtype_name(enum gguf_vtype t) {
    static const char *const names[GGUF_VT_COUNT] = {
        [GGUF_VT_U8] = "U8",       [GGUF_VT_I8] = "I8",     [GGUF_VT_U16] = "U16",
        [GGUF_VT_I16] = "I16",     [GGUF_VT_U32] = "U32",   [GGUF_VT_I32] = "I32",
        [GGUF_VT_F32] = "F32",     [GGUF_VT_BOOL] = "BOOL", [GGUF_VT_STRING] = "STRING",
        [GGUF_VT_ARRAY] = "ARRAY", [GGUF_VT_U64] = "U64",   [GGUF_VT_I64] = "I64",
        [GGUF_VT_F64] = "F64",
    };
    if ((unsigned)t >= GGUF_VT_COUNT)
        return "?";
    return names[t];
}

#define FMT_STR_MAX   60 /* characters of a string shown before "..." */
#define FMT_ARR_SHOWN 8  /* array elements shown */

struct sbuf {
    char *buf;
    size_t size;
    size_t len; /* characters the full text needs */
};

static void sb_putc(struct sbuf *s, char c) {
    if (s->len + 1 < s->size)
        s->buf[s->len] = c;
    s->len++;
}

static void sb_printf(struct sbuf *s, const char *fmt, ...) MR_PRINTF(2, 3);
static void sb_printf(struct sbuf *s, const char *fmt, ...) {
    char tmp[64];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    for (int i = 0; i < n && i < (int)sizeof(tmp) - 1; i++)
        sb_putc(s, tmp[i]);
}

static void sb_str(struct sbuf *s, const struct gguf_str *str) {
    sb_putc(s, '"');
    for (uint64_t i = 0; i < str->len; i++) {
        if (i == FMT_STR_MAX) {
            sb_printf(s, "...");
            break;
        }
        unsigned char c = (unsigned char)str->ptr[i];
        if (c == '"' || c == '\\') {
            sb_putc(s, '\\');
            sb_putc(s, (char)c);
        } else if (c == '\n') {
            sb_printf(s, "\\n");
        } else if (c < 0x20 || c == 0x7f) {
            sb_printf(s, "\\x%02x", c);
        } else {
            sb_putc(s, (char)c);
        }
    }
    sb_putc(s, '"');
}

static void sb_scalar(struct sbuf *s, enum gguf_vtype t, const void *p) {
    uint8_t u8;
    int8_t i8;
    uint16_t u16;
    int16_t i16;
    uint32_t u32;
    int32_t i32;
    uint64_t u64;
    int64_t i64;
    float f32;
    double f64;
    switch (t) {
    case GGUF_VT_U8:
        memcpy(&u8, p, 1);
        sb_printf(s, "%u", u8);
        break;
    case GGUF_VT_I8:
        memcpy(&i8, p, 1);
        sb_printf(s, "%d", i8);
        break;
    case GGUF_VT_BOOL:
        memcpy(&u8, p, 1);
        sb_printf(s, "%s", u8 ? "true" : "false");
        break;
    case GGUF_VT_U16:
        memcpy(&u16, p, 2);
        sb_printf(s, "%u", u16);
        break;
    case GGUF_VT_I16:
        memcpy(&i16, p, 2);
        sb_printf(s, "%d", i16);
        break;
    case GGUF_VT_U32:
        memcpy(&u32, p, 4);
        sb_printf(s, "%" PRIu32, u32);
        break;
    case GGUF_VT_I32:
        memcpy(&i32, p, 4);
        sb_printf(s, "%" PRId32, i32);
        break;
    case GGUF_VT_F32:
        memcpy(&f32, p, 4);
        sb_printf(s, "%g", (double)f32);
        break;
    case GGUF_VT_U64:
        memcpy(&u64, p, 8);
        sb_printf(s, "%" PRIu64, u64);
        break;
    case GGUF_VT_I64:
        memcpy(&i64, p, 8);
        sb_printf(s, "%" PRId64, i64);
        break;
    case GGUF_VT_F64:
        memcpy(&f64, p, 8);
        sb_printf(s, "%g", f64);
        break;
    default:
        sb_printf(s, "?");
        break;
    }
}

static void sb_value(struct sbuf *s, const struct gguf_value *v, int depth);

static void sb_array(struct sbuf *s, const struct gguf_array *a, int depth) {
    sb_printf(s, "[%s; %" PRIu64 "]", gguf_vtype_name(a->elem_type), a->n);
    if (depth > GGUF_MAX_NESTING || !a->data)
        return;
    uint64_t shown = MR_MIN(a->n, (uint64_t)FMT_ARR_SHOWN);
    for (uint64_t i = 0; i < shown; i++) {
        sb_printf(s, "%s", i ? ", " : " ");
        if (a->elem_type == GGUF_VT_STRING) {
            sb_str(s, &((const struct gguf_str *)a->data)[i]);
        } else if (a->elem_type == GGUF_VT_ARRAY) {
            sb_putc(s, '(');
            sb_value(s, &((const struct gguf_value *)a->data)[i], depth + 1);
            sb_putc(s, ')');
        } else {
            size_t esz = (size_t)gguf_vtype_size(a->elem_type);
            sb_scalar(s, a->elem_type, (const unsigned char *)a->data + i * esz);
        }
    }
    if (a->n > shown)
        sb_printf(s, ", ...");
}

static void sb_value(struct sbuf *s, const struct gguf_value *v, int depth) {
    uint8_t u8;
    uint16_t u16;
    uint32_t u32;
    int8_t i8;
    int16_t i16;
    int32_t i32;
    float f32;
    switch (v->type) {
    case GGUF_VT_STRING:
        sb_str(s, &v->v.str);
        return;
    case GGUF_VT_ARRAY:
        sb_array(s, &v->v.arr, depth);
        return;
    case GGUF_VT_U8:
    case GGUF_VT_BOOL:
        u8 = (uint8_t)v->v.u64;
        sb_scalar(s, v->type, &u8);
        return;
    case GGUF_VT_U16:
        u16 = (uint16_t)v->v.u64;
        sb_scalar(s, v->type, &u16);
        return;
    case GGUF_VT_U32:
        u32 = (uint32_t)v->v.u64;
        sb_scalar(s, v->type, &u32);
        return;
    case GGUF_VT_I8:
        i8 = (int8_t)v->v.i64;
        sb_scalar(s, v->type, &i8);
        return;
    case GGUF_VT_I16:
        i16 = (int16_t)v->v.i64;
        sb_scalar(s, v->type, &i16);
        return;
    case GGUF_VT_I32:
        i32 = (int32_t)v->v.i64;
        sb_scalar(s, v->type, &i32);
        return;
    case GGUF_VT_F32:
        f32 = (float)v->v.f64;
        sb_scalar(s, v->type, &f32);
        return;
    case GGUF_VT_U64:
    case GGUF_VT_I64:
    case GGUF_VT_F64:
        sb_scalar(s, v->type, &v->v);
        return;
    default:
        sb_printf(s, "?");
        return;
    }
}

/* Strings quoted (escaped, cut after 60 characters with "..."); arrays as
 * `[STRING; 32000] "<unk>", "<s>", ...` with their first 8 elements, nested arrays in (). */
int gguf_value_format(const struct gguf_value *v, char *buf, size_t size) {
    struct sbuf s = {.buf = buf, .size = buf ? size : 0, .len = 0};
    if (!v)
        return mr_err(MOERUN_ERR_INVALID_ARG, "gguf: value is NULL");
    sb_value(&s, v, 1);
    if (s.size > 0)
        s.buf[MR_MIN(s.len, s.size - 1)] = '\0';
    return s.len > INT32_MAX ? INT32_MAX : (int)s.len;
}
