/* Sessions (internal): one sequence's KV cache and the scratch of the forward pass, all
 * allocated when the session is made. */
#ifndef MOERUN_SESSION_H
#define MOERUN_SESSION_H

#include "cpu/matmul.h"
#include "weights.h"

#include <stdint.h>

/* Activations of up to n_batch tokens (shapes per token). */
struct mr_scratch {
    float *x;              /* [nb][d] residual stream */
    float *h;              /* [nb][d] normalised input of a block */
    float *q;              /* [nb][H*hd] */
    float *k;              /* [nb][H_kv*hd] */
    float *v;              /* [nb][H_kv*hd] */
    float *att;            /* [nb][H*hd] attention output */
    float *scores;         /* [n_threads][n_ctx] */
    float *rope;           /* [nb][n_rot]: cos of n_rot/2 angles, then their sin */
    float *probs;          /* [nb][E] router probabilities */
    int32_t *sel;          /* [nb][k] chosen experts */
    float *sel_w;          /* [nb][k] their weights */
    uint32_t *route_start; /* [E + 1] start of each expert's rows in route_rows */
    uint32_t *route_rows;  /* [nb * k] token * k + slot, grouped by expert */
    float *xe;             /* [nb][d] inputs gathered for one expert */
    float *ge;             /* [nb][max(f, f_sh)] gate projection, then the activation */
    float *ue;             /* [nb][max(f, f_sh)] up projection */
    float *de;             /* [nb][d] down projection */
    float *slots;          /* [nb][k][d] weighted expert outputs, summed in slot order */
    float *sh_g;           /* [nb] shared expert gate */
    float *pred;           /* [nb][E] predicted router probabilities of a later layer */
    int32_t *need;         /* [E] the experts a layer needs */
    void *act;             /* activations converted for the products (cpu_act_bytes) */
};

struct moerun_session {
    struct moerun_model *model;
    const struct mr_weights *w;
    uint32_t n_ctx;
    uint32_t n_batch;
    uint32_t n_past;
    int n_threads;
    enum cpu_isa isa;
    struct cpu_pool *pool;
    float *k_cache; /* [L][n_ctx][H_kv*hd] */
    float *v_cache; /* [L][n_ctx][H_kv*hd] */
    struct mr_scratch s;
    void *arena;              /* one allocation behind the caches and the scratch */
    moerun_route_fn route_fn; /* routing trace callback, or NULL */
    void *route_user;
};

/* Evaluate n <= n_batch tokens at positions n_past..; logits: NULL, the last token's
 * [n_vocab], or with logits_all every token's [n][n_vocab]. Does not advance n_past. */
int forward_batch(struct moerun_session *s, const int32_t *tokens, uint32_t n, float *logits,
                  int logits_all);

#endif /* MOERUN_SESSION_H */
