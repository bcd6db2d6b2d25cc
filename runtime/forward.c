/* The forward pass: one MoE decoder for every architecture (docs/architectures.md), a batch of
 * tokens at a time, computed through the session's backend (runtime/backend.h), so the same
 * code runs on the CPU and on a GPU. Prompts go through in batches (each expert's weights
 * read once for all the tokens routed to it); decoding is the same code with one token.
 * The routing decisions come back to the host (the scheduler needs them); everything else
 * stays in backend memory. Nothing is allocated here. */
#include "cpu/quants.h"
#include "internal.h"
#include "model.h"
#include "offload.h"
#include "session.h"

#include <string.h>

#define OPS(s) ((s)->be->ops)

/* y[n][rows] = x[n][k] . M^T for a matrix m of w's type and shape (rows = ne1, k = ne0). */
static int matmul_at(struct moerun_session *s, const struct mr_weight *w, const void *m, uint32_t n,
                     const float *x, float *y) {
    return OPS(s)->matmul(s->be, w->type, (int64_t)w->ne[1], (int64_t)w->ne[0], m, n, x, y);
}

static int matmul(struct moerun_session *s, const struct mr_weight *w, uint32_t n, const float *x,
                  float *y) {
    return matmul_at(s, w, w->data, n, x, y);
}

static int add_bias(struct moerun_session *s, float *y, const struct mr_weight *b, uint32_t n_tok,
                    uint32_t n) {
    return b->data ? OPS(s)->add_rows(s->be, y, (const float *)b->data, n_tok, n) : MOERUN_OK;
}

static int rmsnorm(struct moerun_session *s, float *out, const float *x, const struct mr_weight *w,
                   int64_t n_rows, int64_t n) {
    return OPS(s)->rmsnorm(s->be, out, x, (const float *)w->data, n_rows, n, s->w->hp.rms_eps);
}

/* --- attention ------------------------------------------------------------------------------ */

static int attention_block(struct moerun_session *s, const struct mr_layer *l, uint32_t il,
                           uint32_t n) {
    const struct mr_weights *w = s->w;
    const struct mr_hparams *hp = &w->hp;
    const struct mr_backend_ops *ops = OPS(s);
    struct mr_backend *be = s->be;
    struct mr_scratch *b = &s->s;
    const uint32_t d = hp->n_embd, hd = hp->head_dim, H = hp->n_head, Hkv = hp->n_head_kv;
    const uint32_t qd = H * hd, kvd = Hkv * hd;
    const enum mr_rope_mode rope =
        w->arch->rope == MR_ROPE_NORM ? MR_ROPE_MODE_NORM : MR_ROPE_MODE_NEOX;
    float *kc = s->k_cache + (size_t)il * s->n_ctx * kvd;
    float *vc = s->v_cache + (size_t)il * s->n_ctx * kvd;
    int rc;

    if ((rc = rmsnorm(s, b->h, b->x, &l->attn_norm, n, d)) ||
        (rc = matmul(s, &l->wq, n, b->h, b->q)) || (rc = matmul(s, &l->wk, n, b->h, b->k)) ||
        (rc = matmul(s, &l->wv, n, b->h, b->v)) || (rc = add_bias(s, b->q, &l->bq, n, qd)) ||
        (rc = add_bias(s, b->k, &l->bk, n, kvd)) || (rc = add_bias(s, b->v, &l->bv, n, kvd)))
        return rc;
    if (w->arch->qk_norm == MR_QK_NORM_FULL) {
        if ((rc = rmsnorm(s, b->q, b->q, &l->q_norm, n, qd)) ||
            (rc = rmsnorm(s, b->k, b->k, &l->k_norm, n, kvd)))
            return rc;
    } else if (w->arch->qk_norm == MR_QK_NORM_HEAD) {
        if ((rc = rmsnorm(s, b->q, b->q, &l->q_norm, (int64_t)n * H, hd)) ||
            (rc = rmsnorm(s, b->k, b->k, &l->k_norm, (int64_t)n * Hkv, hd)))
            return rc;
    }
    if ((rc = ops->rope(be, b->q, n, (int)H, (int)hd, (int)hp->n_rot, s->n_past, hp->rope_base,
                        rope)) ||
        (rc = ops->rope(be, b->k, n, (int)Hkv, (int)hd, (int)hp->n_rot, s->n_past, hp->rope_base,
                        rope)))
        return rc;
    /* the batch's keys and values into the cache, then attention over it */
    const uint64_t kv_bytes = (uint64_t)n * kvd * sizeof(float);
    if ((rc = ops->copy(be, kc + (size_t)s->n_past * kvd, b->k, kv_bytes)) ||
        (rc = ops->copy(be, vc + (size_t)s->n_past * kvd, b->v, kv_bytes)) ||
        (rc = ops->attention(be, b->q, kc, vc, b->att, n, s->n_past, (int)H, (int)Hkv, (int)hd)) ||
        (rc = matmul(s, &l->wo, n, b->att, b->h)))
        return rc;
    return ops->add(be, b->x, b->h, (int64_t)n * d);
}

/* --- experts -------------------------------------------------------------------------------- */

/* Router: probabilities, the k chosen experts and their weights (enqueued). */
static int route_enqueue(struct moerun_session *s, const struct mr_layer *l, uint32_t n) {
    const struct mr_hparams *hp = &s->w->hp;
    struct mr_scratch *b = &s->s;
    int rc = matmul(s, &l->router, n, b->h, b->probs);
    return rc ? rc
              : OPS(s)->softmax_topk(s->be, b->probs, n, (int)hp->n_expert, (int)hp->n_expert_used,
                                     s->w->arch->norm_topk, b->probs, b->sel, b->sel_w);
}

/* The routing on the host (with the prediction enqueued after it, when with_pred: one
 * download brings both): the rows of the batch grouped by expert (route_start, route_rows),
 * and their tokens and rows uploaded for the gathers and scatters. */
static int route_collect(struct moerun_session *s, const struct mr_layer *l, uint32_t n,
                         bool with_pred) {
    const struct mr_hparams *hp = &s->w->hp;
    const struct mr_backend_ops *ops = OPS(s);
    struct mr_scratch *b = &s->s;
    struct mr_host_scratch *hs = &s->hs;
    const uint32_t E = hp->n_expert, K = hp->n_expert_used;
    const uint64_t sel_bytes = (uint64_t)n * K * sizeof(int32_t);
    const uint64_t down = with_pred ? (uint64_t)((uint8_t *)hs->pred - (uint8_t *)hs->sel) +
                                          (uint64_t)n * E * sizeof(float)
                                    : sel_bytes;
    int rc;
    if ((rc = ops->download(s->be, hs->sel, b->sel, down)) ||
        (s->route_fn &&
         (rc = ops->download(s->be, hs->sel_w, b->sel_w, (uint64_t)n * K * sizeof(float)))))
        return rc;
    memset(hs->route_start, 0, (E + 1) * sizeof(uint32_t));
    for (uint32_t i = 0; i < n * K; i++) {
        if (hs->sel[i] < 0 || (uint32_t)hs->sel[i] >= E) /* a device fault, not a user error */
            return mr_err(MOERUN_ERR_BACKEND, "router: expert %d chosen of %u", hs->sel[i], E);
        hs->route_start[hs->sel[i] + 1]++;
    }
    for (uint32_t e = 0; e < E; e++)
        hs->route_start[e + 1] += hs->route_start[e];
    /* each expert's rows in token order (route_start[e] advanced, then restored) */
    for (uint32_t r = 0; r < n * K; r++)
        hs->route_rows[hs->route_start[hs->sel[r]]++] = r;
    for (uint32_t e = E; e > 0; e--)
        hs->route_start[e] = hs->route_start[e - 1];
    hs->route_start[0] = 0;
    for (uint32_t i = 0; i < n * K; i++)
        hs->tok_of[i] = (int32_t)(hs->route_rows[i] / K);
    if ((rc = ops->upload(s->be, b->tok_of, hs->tok_of, sel_bytes)) ||
        (rc = ops->upload(s->be, b->row_of, hs->route_rows, sel_bytes)))
        return rc;
    if (s->route_fn)
        for (uint32_t t = 0; t < n; t++)
            s->route_fn(s->route_user, s->n_past + t, (uint32_t)(l - s->w->layers),
                        hs->sel + (size_t)t * K, hs->sel_w + (size_t)t * K, K);
    return MOERUN_OK;
}

/* out[c][d] = down(silu(gate x) * up x) for the c rows of x: the three matrices at p, of the
 * types and shapes of the layer's experts (or of its shared expert). */
static int swiglu(struct moerun_session *s, const struct mr_layer *l, bool shared,
                  const struct mr_expert_ptrs *p, uint32_t c, const float *x, float *out) {
    struct mr_scratch *b = &s->s;
    const struct mr_weight *gate = shared ? &l->sh_gate : &l->gate_exps;
    const struct mr_weight *up = shared ? &l->sh_up : &l->up_exps;
    const struct mr_weight *down = shared ? &l->sh_down : &l->down_exps;
    const uint32_t f = (uint32_t)gate->ne[1];
    int rc;
    if ((rc = matmul_at(s, gate, p->gate, c, x, b->ge)) ||
        (rc = matmul_at(s, up, p->up, c, x, b->ue)) ||
        (rc = OPS(s)->swiglu(s->be, b->ge, b->ge, b->ue, (int64_t)c * f)))
        return rc;
    return matmul_at(s, down, p->down, c, b->ge, out);
}

/* Expert e of layer l over the tokens routed to it: gather their inputs, run it, and put each
 * weighted output in its row's slot. */
static int expert_apply(struct moerun_session *s, const struct mr_layer *l, int32_t e,
                        const struct mr_expert_ptrs *p) {
    struct mr_scratch *b = &s->s;
    const uint32_t d = s->w->hp.n_embd;
    const uint32_t r0 = s->hs.route_start[e], c = s->hs.route_start[e + 1] - r0;
    int rc;
    if ((rc = OPS(s)->gather_rows(s->be, b->xe, b->h, b->tok_of + r0, c, d)) ||
        (rc = swiglu(s, l, false, p, c, b->xe, b->de)))
        return rc;
    return OPS(s)->scatter_scaled(s->be, b->slots, b->de, b->row_of + r0, b->sel_w, c, d);
}

/* The experts the batch chose, through the tiers: request them all first, so their reads go
 * ahead of any prefetch for later layers. */
static int experts_request(struct moerun_session *s, uint32_t il) {
    struct mr_host_scratch *hs = &s->hs;
    uint32_t n_need = 0;
    for (uint32_t e = 0; e < s->w->hp.n_expert; e++)
        if (hs->route_start[e + 1] != hs->route_start[e])
            hs->need[n_need++] = (int32_t)e;
    return offload_experts_request(s->model->offload, il, hs->need, n_need);
}

/* Every expert the batch chose: from memory, or through the tiers as each arrives (in any
 * order: the outputs are summed in slot order afterwards). */
static int experts_run(struct moerun_session *s, uint32_t il) {
    const struct mr_layer *l = &s->w->layers[il];
    struct mr_offload *o = s->model->offload;
    int rc = MOERUN_OK;
    if (!o) {
        for (uint32_t e = 0; e < s->w->hp.n_expert; e++) {
            if (s->hs.route_start[e + 1] == s->hs.route_start[e])
                continue;
            const struct mr_expert_ptrs p = {mr_weight_rows(&l->gate_exps, e, 0),
                                             mr_weight_rows(&l->up_exps, e, 0),
                                             mr_weight_rows(&l->down_exps, e, 0)};
            if ((rc = expert_apply(s, l, (int32_t)e, &p)) != MOERUN_OK)
                return rc;
        }
        return MOERUN_OK;
    }
    int32_t e;
    struct mr_expert_ptrs p;
    while ((rc = offload_experts_next(o, il, &e, &p)) == MOERUN_OK) {
        rc = expert_apply(s, l, e, &p);
        offload_expert_release(o, il, e);
        if (rc != MOERUN_OK)
            return rc;
    }
    return rc == 1 ? MOERUN_OK : rc;
}

/* The prediction of layer il's experts from the hidden state x: its router after its norm
 * (resident: this never waits for a load), into s.pred (enqueued). */
static int predict_enqueue(struct moerun_session *s, uint32_t il, uint32_t n) {
    const struct mr_hparams *hp = &s->w->hp;
    const struct mr_layer *l = &s->w->layers[il];
    struct mr_scratch *b = &s->s;
    int rc;
    if ((rc = rmsnorm(s, b->xe, b->x, &l->ffn_norm, n, hp->n_embd)) ||
        (rc = matmul(s, &l->router, n, b->xe, b->pred)))
        return rc;
    return OPS(s)->softmax_topk(s->be, b->pred, n, (int)hp->n_expert, 0, false, b->pred, NULL,
                                NULL);
}

/* Hand the downloaded prediction (hs.pred), averaged over the batch, to the scheduler. */
static void predict_apply(struct moerun_session *s, uint32_t il, uint32_t n) {
    const uint32_t E = s->w->hp.n_expert;
    float *pred = s->hs.pred;
    for (uint32_t t = 1; t < n; t++)
        for (uint32_t e = 0; e < E; e++)
            pred[e] += pred[(size_t)t * E + e];
    for (uint32_t e = 0; e < E && n > 1; e++)
        pred[e] /= (float)n;
    offload_predict(s->model->offload, il, pred);
}

/* Predict layers first .. last (inclusive, capped at the last layer), one at a time. */
static int predict(struct moerun_session *s, uint32_t first, uint32_t last, uint32_t n) {
    const uint32_t E = s->w->hp.n_expert;
    for (uint32_t il = first; il <= last && il < s->w->hp.n_layer; il++) {
        int rc;
        if ((rc = predict_enqueue(s, il, n)) ||
            (rc = OPS(s)->download(s->be, s->hs.pred, s->s.pred, (uint64_t)n * E * sizeof(float))))
            return rc;
        predict_apply(s, il, n);
    }
    return MOERUN_OK;
}

static int moe_block(struct moerun_session *s, const struct mr_layer *dense, uint32_t il,
                     uint32_t n) {
    const struct mr_weights *w = s->w;
    const struct mr_hparams *hp = &w->hp;
    const struct mr_backend_ops *ops = OPS(s);
    const struct mr_layer *l = &w->layers[il]; /* router, its norm, expert shapes: resident */
    struct mr_scratch *b = &s->s;
    const uint32_t d = hp->n_embd, K = hp->n_expert_used;
    int rc;

    /* the routing, and the next layer's prediction from the same hidden state enqueued behind
     * it, so that one wait for the device brings both */
    struct mr_offload *o = s->model->offload;
    const uint32_t ahead = o ? (uint32_t)offload_prefetch_layers(o) : 0;
    const bool next = ahead && il + 1 < hp->n_layer;
    if ((rc = rmsnorm(s, b->h, b->x, &l->ffn_norm, n, d)) || (rc = route_enqueue(s, l, n)) ||
        (next && (rc = predict_enqueue(s, il + 1, n))) || (rc = route_collect(s, l, n, next)))
        return rc;
    /* through the tiers: this layer's reads first, then the predictions' for later layers,
     * which go to the loader as it idles (and overlap the experts computed below) */
    if (o && (rc = experts_request(s, il)))
        return rc;
    if (next)
        predict_apply(s, il + 1, n);
    if (ahead > 1 && (rc = predict(s, il + 2, il + ahead, n)))
        return rc;
    if ((rc = experts_run(s, il)))
        return rc;

    /* y = the experts' outputs summed in slot order, so the order experts were computed in
     * never changes the result */
    float *y = b->de;
    if ((rc = ops->sum_slots(s->be, y, b->slots, n, (int)K, d)))
        return rc;
    if (w->arch->shared_expert) {
        /* the shared expert (in the dense part) writes to b->slots, now free */
        const struct mr_expert_ptrs p = {dense->sh_gate.data, dense->sh_up.data,
                                         dense->sh_down.data};
        if ((rc = matmul(s, &dense->sh_gate_inp, n, b->h, b->sh_g)) ||
            (rc = swiglu(s, dense, true, &p, n, b->h, b->slots)) ||
            (rc = ops->add_gated(s->be, y, b->slots, b->sh_g, n, d)))
            return rc;
    }
    return ops->add(s->be, b->x, y, (int64_t)n * d);
}

/* --- the whole pass ------------------------------------------------------------------------- */

/* Logits of tokens first .. n - 1 into out ([n - first][n_vocab], host memory), a chunk of
 * n_logits rows at a time through backend memory (directly into out on host memory). */
static int output_logits(struct moerun_session *s, uint32_t first, uint32_t n, float *out) {
    const struct mr_weights *w = s->w;
    const uint32_t d = w->hp.n_embd, V = w->hp.n_vocab;
    struct mr_scratch *b = &s->s;
    int rc = MOERUN_OK;
    for (uint32_t t = first; t < n && rc == MOERUN_OK;) {
        const uint32_t c = MR_MIN(n - t, s->n_logits);
        float *dst = out + (size_t)(t - first) * V;
        float *y = s->be->host_memory ? dst : b->logits;
        if ((rc = rmsnorm(s, b->h, b->x + (size_t)t * d, &w->output_norm, c, d)) ||
            (rc = matmul(s, &w->output, c, b->h, y)))
            break;
        if (!s->be->host_memory)
            rc = OPS(s)->download(s->be, dst, y, (uint64_t)c * V * sizeof(float));
        t += c;
    }
    return rc;
}

int forward_batch(struct moerun_session *s, const int32_t *tokens, uint32_t n, float *logits,
                  int logits_all) {
    const struct mr_weights *w = s->w;
    const struct mr_hparams *hp = &w->hp;
    const uint32_t d = hp->n_embd;
    MOERUN_ASSERT(n >= 1 && n <= s->n_batch && s->n_past + n <= s->n_ctx);

    /* embeddings on the host (the table stays there), then into the residual stream */
    const cpu_to_float_fn emb = cpu_kernels(cpu_isa_best(), w->tok_embd.type)->to_float;
    for (uint32_t t = 0; t < n; t++)
        emb(mr_weight_rows(&w->tok_embd, 0, (uint64_t)tokens[t]), s->hs.x + (size_t)t * d, d);
    int rc = OPS(s)->upload(s->be, s->s.x, s->hs.x, (uint64_t)n * d * sizeof(float));
    struct mr_offload *o = s->model->offload;
    /* the first layers have no earlier layer to be predicted from: predict them from the
     * embeddings (before attention), so their experts can load while layer 0's attention runs */
    const uint32_t ahead = o ? (uint32_t)offload_prefetch_layers(o) : 0;
    if (ahead && rc == MOERUN_OK)
        rc = predict(s, 0, ahead - 1, n);
    for (uint32_t il = 0; il < hp->n_layer && rc == MOERUN_OK; il++) {
        struct mr_layer view;
        const struct mr_layer *l = &w->layers[il];
        if (o) { /* the layer's dense part through the ring */
            if ((rc = offload_layer_acquire(o, il, &view)) != MOERUN_OK)
                break;
            l = &view;
        }
        rc = attention_block(s, l, il, n);
        if (rc == MOERUN_OK)
            rc = moe_block(s, l, il, n);
        if (o)
            offload_layer_release(o, il);
    }
    if (rc == MOERUN_OK && logits)
        rc = output_logits(s, logits_all ? 0 : n - 1, n, logits);
    else if (rc == MOERUN_OK)
        rc = OPS(s)->sync(s->be, MR_STREAM_COMPUTE);
    return rc;
}
