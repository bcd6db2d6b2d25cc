/* moe-run's reporting (moe-run-report.c): the model summary, JSON pieces, logits files, routing
 * traces and tier statistics. The tool links only the public API. */
#ifndef MOE_RUN_H
#define MOE_RUN_H

#include "moerun.h"

#include <stdint.h>
#include <stdio.h>

/* A growing byte buffer; failed is set (and further puts ignored) when memory runs out. */
struct buf {
    char *data;
    size_t len, cap;
    int failed;
};
void buf_put(struct buf *b, const void *p, size_t n);

/* --info / --meta. Returns 0, or -1 when the summary cannot be read. */
int print_info(const char *path, const moerun_model *m, int meta);

void json_ids(FILE *f, const int32_t *ids, size_t n);
void json_string(FILE *f, const char *s, size_t n);

/* --logits-out: n floats, little-endian. Returns 0 or -1 (with a message on stderr). */
int write_logits(const char *path, const float *x, size_t n);

/* --trace-out: one JSON object per token and layer, token-major. The library reports routing in
 * execution order (a prompt batch layer by layer), so each decode call's records are held and
 * written sorted by (token, layer) by trace_flush when the call returns. */
struct trace_rec {
    uint32_t pos, layer;
    size_t at, len; /* the line in text */
};

struct trace {
    FILE *f;
    struct trace_rec *recs;
    size_t n, cap;
    struct buf text;
    int failed;
};

void trace_route(void *user, uint32_t pos, uint32_t layer, const int32_t *experts,
                 const float *weights, uint32_t k);
/* Write the held records sorted; 0, or -1 on a write or memory failure. */
int trace_flush(struct trace *t);

/* The tier figures of the decode phase: JSON members (json) or text lines. */
void print_tier_stats(FILE *f, int json, const moerun_stats *st, uint64_t prompt_bytes,
                      size_t n_gen, double gen_ms);

#endif /* MOE_RUN_H */
