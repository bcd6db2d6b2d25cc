/* moe-run reporting: the model summary, JSON output, logits files, routing traces, tier
 * statistics. */
#include "moe-run.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static void print_size(FILE *f, uint64_t bytes) {
    if (bytes >= (1ull << 30))
        fprintf(f, "%.2f GiB", (double)bytes / (1ull << 30));
    else if (bytes >= (1ull << 20))
        fprintf(f, "%.2f MiB", (double)bytes / (1ull << 20));
    else if (bytes >= (1ull << 10))
        fprintf(f, "%.2f KiB", (double)bytes / (1ull << 10));
    else
        fprintf(f, "%llu B", (unsigned long long)bytes);
}

int print_info(const char *path, const moerun_model *m, int meta) {
    moerun_model_info in = {.struct_size = sizeof(in)};
    if (moerun_model_get_info(m, &in) != MOERUN_OK)
        return -1;
    printf("file          %s\n", path);
    printf("size          ");
    print_size(stdout, in.file_bytes);
    printf(" (GGUF v%u, %llu metadata keys, alignment %u, data at %llu)\n", in.gguf_version,
           (unsigned long long)in.n_kv, in.alignment, (unsigned long long)in.data_offset);
    printf("architecture  %s%s%s\n", in.arch, in.name[0] ? ", " : "", in.name);
    printf("vocab         %u\n", in.n_vocab);
    printf("context       %u (trained)\n", in.n_ctx_train);
    printf("embedding     %u\n", in.n_embd);
    printf("layers        %u\n", in.n_layer);
    printf("heads         %u query, %u key/value", in.n_head, in.n_head_kv);
    if (in.n_head)
        printf(" (head size %u, rope dims %u)", in.n_embd / in.n_head, in.n_rot);
    printf("\n");
    printf("rope base     %g\n", in.rope_freq_base);
    printf("rms eps       %g\n", in.rms_eps);
    if (in.n_expert)
        printf("experts       %u per layer, %u used per token, expert FFN %u\n", in.n_expert,
               in.n_expert_used, in.n_ff_exp);
    else
        printf("experts       none (dense model)\n");
    if (in.n_ff && in.n_ff != in.n_ff_exp) /* Mixtral files give the expert width here too */
        printf("FFN           %u (feed_forward_length)\n", in.n_ff);
    printf("tensors       %llu, ", (unsigned long long)in.n_tensors);
    print_size(stdout, in.tensor_bytes);
    printf("\n");
    for (int t = 0; t < 64; t++) {
        uint64_t n = 0, bytes = 0;
        if (!moerun_type_name(t) || moerun_model_type_bytes(m, t, &n, &bytes) != MOERUN_OK ||
            n == 0)
            continue;
        printf("  %-8s    %6llu tensors, ", moerun_type_name(t), (unsigned long long)n);
        print_size(stdout, bytes);
        printf("%s\n", moerun_type_is_supported(t) ? "" : " (not supported for compute)");
    }
    if (in.expert_bytes) {
        printf("expert bytes  ");
        print_size(stdout, in.expert_bytes);
        printf(" (%.1f%% of the tensor data)\n", 100.0 * in.expert_bytes / in.tensor_bytes);
        for (uint32_t il = 0; il < in.n_layer; il++) {
            uint64_t all = 0, one = 0;
            moerun_model_layer_expert_bytes(m, il, &all, &one);
            printf("  layer %-4u  ", il);
            print_size(stdout, all);
            if (one) {
                printf(" = %llu x ", (unsigned long long)(all / one));
                print_size(stdout, one);
            }
            printf("\n");
        }
    }
    if (meta) {
        printf("metadata\n");
        for (uint64_t i = 0; i < in.n_kv; i++) {
            char val[256];
            moerun_model_meta_value_str(m, i, val, sizeof(val));
            printf("  %-40s %s\n", moerun_model_meta_key(m, i), val);
        }
    }
    return 0;
}

/* A growable byte buffer; on allocation failure it keeps what it has and sets failed. */

void buf_put(struct buf *b, const void *p, size_t n) {
    if (b->failed)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d) {
            b->failed = 1;
            return;
        }
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void json_ids(FILE *f, const int32_t *ids, size_t n) {
    fputc('[', f);
    for (size_t i = 0; i < n; i++)
        fprintf(f, "%s%d", i ? "," : "", ids[i]);
    fputc(']', f);
}

/* A JSON string from UTF-8 text (valid: the detokenizer guarantees it). */
void json_string(FILE *f, const char *s, size_t n) {
    fputc('"', f);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        switch (c) {
        case '"':
            fputs("\\\"", f);
            break;
        case '\\':
            fputs("\\\\", f);
            break;
        case '\n':
            fputs("\\n", f);
            break;
        case '\r':
            fputs("\\r", f);
            break;
        case '\t':
            fputs("\\t", f);
            break;
        default:
            if (c < 0x20 || c == 0x7f)
                fprintf(f, "\\u%04x", c);
            else
                fputc(c, f);
        }
    }
    fputc('"', f);
}

/* Write n floats as little-endian float32. 0 or -1 (message). */
int write_logits(const char *path, const float *x, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) {
        fprintf(stderr, "moe-run: cannot write %s: %s\n", path, strerror(errno));
        return -1;
    }
    const uint32_t one = 1;
    int little = *(const unsigned char *)&one == 1;
    size_t written = 0;
    if (little) {
        written = fwrite(x, sizeof(float), n, f);
    } else {
        for (; written < n; written++) {
            uint32_t u;
            memcpy(&u, &x[written], 4);
            unsigned char b[4] = {(unsigned char)u, (unsigned char)(u >> 8),
                                  (unsigned char)(u >> 16), (unsigned char)(u >> 24)};
            if (fwrite(b, 1, 4, f) != 4)
                break;
        }
    }
    if (fclose(f) != 0 || written != n) {
        fprintf(stderr, "moe-run: cannot write %s: %s\n", path, strerror(errno));
        return -1;
    }
    return 0;
}

void trace_route(void *user, uint32_t pos, uint32_t layer, const int32_t *experts,
                 const float *weights, uint32_t k) {
    struct trace *t = user;
    char line[64 + 32 * 64];
    int len = snprintf(line, sizeof(line), "{\"token\":%u,\"layer\":%u,\"experts\":[", pos, layer);
    for (uint32_t i = 0; i < k && len < (int)sizeof(line) - 64; i++)
        len += snprintf(line + len, sizeof(line) - (size_t)len, "%s%d", i ? "," : "", experts[i]);
    len += snprintf(line + len, sizeof(line) - (size_t)len, "],\"weights\":[");
    for (uint32_t i = 0; i < k && len < (int)sizeof(line) - 32; i++)
        len += snprintf(line + len, sizeof(line) - (size_t)len, "%s%.6g", i ? "," : "", weights[i]);
    len += snprintf(line + len, sizeof(line) - (size_t)len, "]}\n");
    if (len >= (int)sizeof(line) || t->failed) {
        t->failed = 1;
        return;
    }
    if (t->n == t->cap) {
        size_t cap = t->cap ? 2 * t->cap : 1024;
        struct trace_rec *r = realloc(t->recs, cap * sizeof(*r));
        if (!r) {
            t->failed = 1;
            return;
        }
        t->recs = r;
        t->cap = cap;
    }
    t->recs[t->n++] = (struct trace_rec){pos, layer, t->text.len, (size_t)len};
    buf_put(&t->text, line, (size_t)len);
}

static int trace_rec_cmp(const void *a, const void *b) {
    const struct trace_rec *x = a, *y = b;
    if (x->pos != y->pos)
        return x->pos < y->pos ? -1 : 1;
    return x->layer < y->layer ? -1 : x->layer > y->layer;
}

/* Write the held records sorted; 0 or -1 on a write or memory failure. */
int trace_flush(struct trace *t) {
    if (!t->f)
        return 0;
    if (t->failed || t->text.failed)
        return -1;
    qsort(t->recs, t->n, sizeof(*t->recs), trace_rec_cmp);
    for (size_t i = 0; i < t->n; i++)
        fwrite(t->text.data + t->recs[i].at, 1, t->recs[i].len, t->f);
    t->n = 0;
    t->text.len = 0;
    return ferror(t->f) ? -1 : 0;
}

/* The tier figures of the decode phase: as JSON members, or as text on stderr. */
void print_tier_stats(FILE *f, int json, const moerun_stats *st, uint64_t prompt_bytes,
                      size_t n_gen, double gen_ms) {
    const uint64_t need = st->expert_hits + st->expert_misses;
    const double per_tok = n_gen ? (double)st->nvme_bytes_read / n_gen : 0;
    const double hit = need ? (double)st->expert_hits / need : 0;
    const double busy_ms = st->nvme_busy_ns / 1e6;
    if (json) {
        fprintf(f,
                ",\"tiers\":{\"host_bytes\":%llu,\"dense_slots\":%u,\"expert_slots\":%u,"
                "\"direct_io\":%s,\"prompt_bytes_read\":%llu,\"bytes_read\":%llu,"
                "\"bytes_per_token\":%.0f,\"expert_hits\":%llu,\"expert_misses\":%llu,"
                "\"hit_rate\":%.4f,\"dense_hits\":%llu,\"dense_misses\":%llu,"
                "\"prefetch_issued\":%llu,\"prefetch_used\":%llu,\"prefetch_cancelled\":%llu,"
                "\"predicted\":%llu,\"prediction_precision\":%.4f,\"prediction_recall\":%.4f,"
                "\"prefetch_skipped\":%llu,\"prefetch_on\":%s,\"layer_compute_ms\":%.3f,"
                "\"wrong_load_ms\":%.3f,\"stall_ms\":%.3f,"
                "\"read_busy_ms\":%.3f,\"read_gbps\":%.3f,\"layer_hits\":[",
                (unsigned long long)st->host_bytes, st->slots_dense, st->slots_expert,
                st->direct_io ? "true" : "false", (unsigned long long)prompt_bytes,
                (unsigned long long)st->nvme_bytes_read, per_tok,
                (unsigned long long)st->expert_hits, (unsigned long long)st->expert_misses, hit,
                (unsigned long long)st->dense_hits, (unsigned long long)st->dense_misses,
                (unsigned long long)st->prefetch_issued, (unsigned long long)st->prefetch_used,
                (unsigned long long)st->prefetch_cancelled, (unsigned long long)st->predicted,
                st->prediction_precision, st->prediction_recall,
                (unsigned long long)st->prefetch_skipped, st->prefetch_on ? "true" : "false",
                st->layer_compute_ns / 1e6, st->wrong_load_ns / 1e6, st->stall_ns / 1e6, busy_ms,
                st->read_gbps);
        for (uint32_t l = 0; l < st->n_layer; l++)
            fprintf(f, "%s%llu", l ? "," : "", (unsigned long long)st->layer_hits[l]);
        fprintf(f, "],\"layer_misses\":[");
        for (uint32_t l = 0; l < st->n_layer; l++)
            fprintf(f, "%s%llu", l ? "," : "", (unsigned long long)st->layer_misses[l]);
        fprintf(f, "]");
        if (st->gpu_bytes)
            fprintf(f,
                    ",\"gpu_bytes\":%llu,\"gpu_bytes_copied\":%llu,\"copy_bytes_per_token\":%.0f,"
                    "\"copy_busy_ms\":%.3f,\"copy_gbps\":%.3f,\"host_hits\":%llu,"
                    "\"host_misses\":%llu",
                    (unsigned long long)st->gpu_bytes, (unsigned long long)st->gpu_bytes_copied,
                    n_gen ? (double)st->gpu_bytes_copied / n_gen : 0.0, st->gpu_copy_busy_ns / 1e6,
                    st->copy_gbps, (unsigned long long)st->host_hits,
                    (unsigned long long)st->host_misses);
        fprintf(f, "}");
        return;
    }
    /* with a GPU the slots are the GPU's, and the host tier stages the file's bytes */
    if (st->gpu_bytes)
        fprintf(f,
                "moe-run: tiers: GPU %.1f MiB (%u dense slots, %u expert slots), pinned host "
                "%.1f MiB, O_DIRECT %s\n"
                "moe-run: decode copied %.1f MiB to the GPU (%.2f MiB/token) at %.2f GB/s while "
                "copying (%.0f ms busy); pinned host hits %llu, misses %llu\n",
                st->gpu_bytes / 1048576.0, st->slots_dense, st->slots_expert,
                st->host_bytes / 1048576.0, st->direct_io ? "on" : "off",
                st->gpu_bytes_copied / 1048576.0,
                n_gen ? st->gpu_bytes_copied / 1048576.0 / n_gen : 0.0, st->copy_gbps,
                st->gpu_copy_busy_ns / 1e6, (unsigned long long)st->host_hits,
                (unsigned long long)st->host_misses);
    else
        fprintf(f, "moe-run: tiers: host %.1f MiB (%u dense slots, %u expert slots), O_DIRECT %s\n",
                st->host_bytes / 1048576.0, st->slots_dense, st->slots_expert,
                st->direct_io ? "on" : "off");
    fprintf(f,
            "moe-run: prompt read %.1f MiB; decode read %.1f MiB (%.2f MiB/token), read %.2f "
            "GB/s while reading (%.0f ms busy of %.0f ms)\n"
            "moe-run: experts: %llu hits, %llu misses (hit rate %.1f%%); dense %llu hits, %llu "
            "misses\n",
            prompt_bytes / 1048576.0, st->nvme_bytes_read / 1048576.0, per_tok / 1048576.0,
            st->read_gbps, busy_ms, gen_ms, (unsigned long long)st->expert_hits,
            (unsigned long long)st->expert_misses, 100.0 * hit, (unsigned long long)st->dense_hits,
            (unsigned long long)st->dense_misses);
    if (st->predicted) {
        fprintf(f,
                "moe-run: prediction precision %.1f%%, recall %.1f%%; prefetched %llu, used %llu, "
                "cancelled %llu; stalled %.1f ms\n",
                100.0 * st->prediction_precision, 100.0 * st->prediction_recall,
                (unsigned long long)st->prefetch_issued, (unsigned long long)st->prefetch_used,
                (unsigned long long)st->prefetch_cancelled, st->stall_ns / 1e6);
        if (st->wrong_load_ns || st->prefetch_skipped) /* prefetch auto, past its warm-up */
            fprintf(f,
                    "moe-run: prefetch auto: %s now, %llu predictions not acted on; a layer "
                    "computes in %.2f ms, a prediction's wrong experts load in %.2f ms\n",
                    st->prefetch_on ? "on" : "off", (unsigned long long)st->prefetch_skipped,
                    st->layer_compute_ns / 1e6, st->wrong_load_ns / 1e6);
    } else {
        fprintf(f,
                "moe-run: no predictions (every section has a slot of its own); stalled %.1f ms\n",
                st->stall_ns / 1e6);
    }
    fprintf(f, "moe-run: per layer hits/misses:");
    for (uint32_t l = 0; l < st->n_layer; l++)
        fprintf(f, " %llu/%llu", (unsigned long long)st->layer_hits[l],
                (unsigned long long)st->layer_misses[l]);
    fprintf(f, "\n");
}
