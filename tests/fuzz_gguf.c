/* libFuzzer target over the GGUF reader: open from memory, look up every key and tensor by
 * name, run every getter and the formatter on every value, close. */
#include "gguf.h"

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* an exact-size copy, so reads past the end are caught by ASan */
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy)
        return 0;
    memcpy(copy, data, size);
    struct gguf_source src = {.fd = -1, .mem = copy, .size = size};
    struct gguf_ctx *ctx = NULL;
    if (gguf_open_source(&src, NULL, &ctx) != MOERUN_OK) {
        free(copy);
        return 0;
    }
    char buf[512];
    for (uint64_t i = 0; i < ctx->n_kv; i++) {
        const struct gguf_kv *kv = &ctx->kv[i];
        /* keys with embedded NULs are found by their prefix, or not at all */
        int64_t j = gguf_find_key(ctx, kv->key.ptr);
        if (strlen(kv->key.ptr) == kv->key.len && j != (int64_t)i)
            abort();
        uint32_t u32;
        uint64_t u64;
        int64_t i64;
        float f32;
        bool b;
        struct gguf_str s;
        struct gguf_array a;
        (void)gguf_get_u32(ctx, kv->key.ptr, &u32);
        (void)gguf_get_u64(ctx, kv->key.ptr, &u64);
        (void)gguf_get_i64(ctx, kv->key.ptr, &i64);
        (void)gguf_get_f32(ctx, kv->key.ptr, &f32);
        (void)gguf_get_bool(ctx, kv->key.ptr, &b);
        (void)gguf_get_str(ctx, kv->key.ptr, &s);
        (void)gguf_get_arr(ctx, kv->key.ptr, &a);
        int n = gguf_value_format(&kv->value, buf, sizeof(buf));
        if (n < 0 || strlen(buf) != (size_t)(n < (int)sizeof(buf) ? n : (int)sizeof(buf) - 1))
            abort();
        (void)gguf_value_format(&kv->value, buf, 7);
    }
    for (uint64_t i = 0; i < ctx->n_tensors; i++) {
        const struct gguf_tensor *t = &ctx->tensors[i];
        int64_t j = gguf_find_tensor(ctx, t->name.ptr);
        if (strlen(t->name.ptr) == t->name.len && j != (int64_t)i)
            abort();
        if (t->offset < ctx->data_offset || t->offset + t->nbytes > size ||
            t->offset % ctx->alignment != 0)
            abort();
    }
    (void)gguf_get_kv(ctx, "general.architecture");
    (void)gguf_get_tensor(ctx, "token_embd.weight");
    gguf_close(ctx);
    free(copy);
    return 0;
}
