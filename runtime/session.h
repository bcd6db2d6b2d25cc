/* Sessions (internal): one sequence's KV cache and the scratch of the forward pass, all
 * allocated when the session is made. */
#ifndef MOERUN_SESSION_H
#define MOERUN_SESSION_H

#include "backend.h"
#include "weights.h"

#include <stdbool.h>
#include <stdint.h>

/* Activations of up to n_batch tokens (shapes per token), in backend memory. */
struct mr_scratch {
    float *x;        /* [nb][d] residual stream */
    float *h;        /* [nb][d] normalised input of a block */
    float *q;        /* [nb][H*hd] */
    float *k;        /* [nb][H_kv*hd] */
    float *v;        /* [nb][H_kv*hd] */
    float *att;      /* [nb][H*hd] attention output */
    float *probs;    /* [nb][E] router probabilities */
    int32_t *sel;    /* [nb][k] chosen experts */
    float *sel_w;    /* [nb][k] their weights */
    int32_t *tok_of; /* [nb * k] the token of each routed row, grouped by expert */
    int32_t *row_of; /* [nb * k] the row (token * k + slot) of each, grouped by expert */
    float *xe;       /* [nb][d] inputs gathered for one expert */
    float *ge;       /* [nb][max(f, f_sh)] gate projection, then the activation */
    float *ue;       /* [nb][max(f, f_sh)] up projection */
    float *de;       /* [nb][d] down projection */
    float *slots;    /* [nb][k][d] weighted expert outputs, summed in slot order */
    float *sh_g;     /* [nb] shared expert gate */
    float *pred;     /* [nb][E] predicted router probabilities of a later layer; sel and pred
                        are laid out alike here and in mr_host_scratch, so one download from
                        sel brings both */
    float *logits;   /* [n_logits][n_vocab] (a backend without host memory) */
    void *ws;        /* the backend's workspace */
};

/* The host side of the routing and the inputs, in host memory. */
struct mr_host_scratch {
    float *x;              /* [nb][d] embeddings before their upload */
    int32_t *sel;          /* [nb][k] */
    float *sel_w;          /* [nb][k] */
    uint32_t *route_start; /* [E + 1] start of each expert's rows in route_rows */
    uint32_t *route_rows;  /* [nb * k] token * k + slot, grouped by expert */
    int32_t *tok_of;       /* [nb * k] route_rows / k */
    float *pred;           /* [nb][E] */
    int32_t *need;         /* [E] the experts a layer needs */
};

struct moerun_session {
    struct moerun_model *model;
    const struct mr_weights *w; /* as the backend sees them (device pointers on a GPU) */
    uint32_t n_ctx;
    uint32_t n_batch;
    uint32_t n_logits; /* rows of s.logits: logits are computed this many tokens at a time */
    uint32_t n_past;
    int n_threads;
    struct mr_backend *be; /* this session's instance (a clone of the model's) */
    float *k_cache;        /* [L][n_ctx][H_kv*hd] */
    float *v_cache;        /* [L][n_ctx][H_kv*hd] */
    struct mr_scratch s;
    struct mr_host_scratch hs;
    uint64_t ws_bytes;        /* of s.ws */
    void *arena;              /* backend memory behind the caches and s */
    bool arena_tier;          /* arena is from the GPU tier's budget (else from be->alloc) */
    void *host_arena;         /* host memory behind hs */
    bool host_pinned;         /* host_arena is registered with the backend */
    moerun_route_fn route_fn; /* routing trace callback, or NULL */
    void *route_user;
};

/* Backend memory a session of n_ctx positions and n_batch tokens needs on be (its KV cache
 * and scratch): what the GPU tier reserves for sessions. */
uint64_t session_backend_bytes(const struct mr_weights *w, struct mr_backend *be, uint32_t n_ctx,
                               uint32_t n_batch);

/* Evaluate n <= n_batch tokens at positions n_past..; logits: NULL, the last token's
 * [n_vocab], or with logits_all every token's [n][n_vocab]. Does not advance n_past. */
int forward_batch(struct moerun_session *s, const int32_t *tokens, uint32_t n, float *logits,
                  int logits_all);

#endif /* MOERUN_SESSION_H */
