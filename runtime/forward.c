/* The forward pass: one MoE decoder for every architecture (docs/architectures.md), a batch of
 * tokens at a time. Prompts go through in batches (each expert's weights read once for all the
 * tokens routed to it); decoding is the same code with one token. Nothing is allocated here. */
#include "internal.h"
#include "model.h"
#include "offload.h"
#include "session.h"

#include <math.h>
#include <string.h>

/* --- elementwise parts ---------------------------------------------------------------------- */

/* out = x / sqrt(mean(x^2) + eps) * w over n values (as ggml: squares summed in double). */
static void rmsnorm(float *out, const float *x, const float *w, uint32_t n, float eps) {
    double sum = 0.0;
    for (uint32_t i = 0; i < n; i++)
        sum += (double)(x[i] * x[i]);
    const float mean = (float)(sum / n);
    const float scale = 1.0f / sqrtf(mean + eps);
    for (uint32_t i = 0; i < n; i++)
        out[i] = (x[i] * scale) * w[i];
}

/* The cos and sin of each RoPE angle at position pos (theta advanced by repeated products,
 * as ggml does). */
static void rope_angles(float *cs, uint32_t pos, uint32_t n_rot, float base) {
    const float theta_scale = powf(base, -2.0f / (float)n_rot);
    float theta = (float)pos;
    for (uint32_t i = 0; i < n_rot / 2; i++) {
        cs[i] = cosf(theta);
        cs[n_rot / 2 + i] = sinf(theta);
        theta *= theta_scale;
    }
}

/* Rotate the first n_rot dims of each of n_heads heads of size hd. */
static void rope(float *x, uint32_t n_heads, uint32_t hd, uint32_t n_rot, const float *cs,
                 enum mr_rope_style style) {
    const uint32_t half = n_rot / 2;
    for (uint32_t hh = 0; hh < n_heads; hh++) {
        float *v = x + (size_t)hh * hd;
        for (uint32_t i = 0; i < half; i++) {
            const float c = cs[i], s = cs[half + i];
            const uint32_t a = style == MR_ROPE_NORM ? 2 * i : i;
            const uint32_t b = style == MR_ROPE_NORM ? 2 * i + 1 : i + half;
            const float x0 = v[a], x1 = v[b];
            v[a] = x0 * c - x1 * s;
            v[b] = x0 * s + x1 * c;
        }
    }
}

/* In-place softmax of n values (max subtracted, sum in double). */
static void softmax(float *x, uint32_t n) {
    float max = -INFINITY;
    for (uint32_t i = 0; i < n; i++)
        max = x[i] > max ? x[i] : max;
    double sum = 0.0;
    for (uint32_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    const float inv = (float)(1.0 / sum);
    for (uint32_t i = 0; i < n; i++)
        x[i] *= inv;
}

static inline float silu(float x) {
    return x / (1.0f + expf(-x));
}

static void add_bias(float *y, const struct mr_weight *b, uint32_t n_tok, uint32_t n) {
    if (!b->data)
        return;
    const float *bias = (const float *)b->data;
    for (uint32_t t = 0; t < n_tok; t++)
        for (uint32_t i = 0; i < n; i++)
            y[(size_t)t * n + i] += bias[i];
}

/* --- products ------------------------------------------------------------------------------- */

/* y[n][rows] = x[n][k] . M^T for a matrix m of w's type and shape (rows = ne1, k = ne0). */
static int matmul_at(struct moerun_session *s, const struct mr_weight *w, const uint8_t *m,
                     uint32_t n, const float *x, float *y) {
    const int64_t rows = (int64_t)w->ne[1], k = (int64_t)w->ne[0];
    if (n == 1)
        return cpu_matvec(s->pool, s->isa, w->type, rows, k, m, x, y, s->s.act);
    return cpu_matmul(s->pool, s->isa, w->type, rows, k, m, n, x, y, s->s.act);
}

/* The same with matrix e of w in memory. */
static int matmul(struct moerun_session *s, const struct mr_weight *w, uint64_t e, uint32_t n,
                  const float *x, float *y) {
    return matmul_at(s, w, mr_weight_rows(w, e, 0), n, x, y);
}

/* --- attention ------------------------------------------------------------------------------ */

struct attn_job {
    struct moerun_session *s;
    const float *k_cache, *v_cache; /* this layer's */
    uint32_t n, pos0;
    cpu_vec_dot_fn dot_f32;
};

/* One (token, head) pair per task: scores over the cached positions, softmax, weighted sum. */
static void attention_task(void *arg, int ith, int nth) {
    const struct attn_job *j = arg;
    const struct moerun_session *s = j->s;
    const struct mr_hparams *hp = &s->w->hp;
    const uint32_t hd = hp->head_dim, H = hp->n_head, kvd = hp->n_head_kv * hd;
    const uint32_t group = H / hp->n_head_kv;
    const float scale = 1.0f / sqrtf((float)hd);
    float *scores = s->s.scores + (size_t)ith * s->n_ctx;
    for (uint32_t task = (uint32_t)ith; task < j->n * H; task += (uint32_t)nth) {
        const uint32_t t = task / H, head = task % H, kvh = head / group;
        const uint32_t n_keys = j->pos0 + t + 1; /* causal: positions 0 .. pos */
        const float *q = s->s.q + (size_t)t * H * hd + (size_t)head * hd;
        for (uint32_t p = 0; p < n_keys; p++) {
            float dot;
            j->dot_f32(hd, &dot, q, j->k_cache + (size_t)p * kvd + (size_t)kvh * hd);
            scores[p] = dot * scale;
        }
        softmax(scores, n_keys);
        float *o = s->s.att + (size_t)t * H * hd + (size_t)head * hd;
        memset(o, 0, hd * sizeof(float));
        for (uint32_t p = 0; p < n_keys; p++) {
            const float a = scores[p];
            const float *v = j->v_cache + (size_t)p * kvd + (size_t)kvh * hd;
            for (uint32_t i = 0; i < hd; i++)
                o[i] += a * v[i];
        }
    }
}

static int attention_block(struct moerun_session *s, const struct mr_layer *l, uint32_t il,
                           uint32_t n) {
    const struct mr_weights *w = s->w;
    const struct mr_hparams *hp = &w->hp;
    struct mr_scratch *b = &s->s;
    const uint32_t d = hp->n_embd, hd = hp->head_dim, qd = hp->n_head * hd;
    const uint32_t kvd = hp->n_head_kv * hd;
    int rc;

    for (uint32_t t = 0; t < n; t++)
        rmsnorm(b->h + (size_t)t * d, b->x + (size_t)t * d, (const float *)l->attn_norm.data, d,
                hp->rms_eps);
    if ((rc = matmul(s, &l->wq, 0, n, b->h, b->q)) || (rc = matmul(s, &l->wk, 0, n, b->h, b->k)) ||
        (rc = matmul(s, &l->wv, 0, n, b->h, b->v)))
        return rc;
    add_bias(b->q, &l->bq, n, qd);
    add_bias(b->k, &l->bk, n, kvd);
    add_bias(b->v, &l->bv, n, kvd);

    const enum mr_qk_norm qk = w->arch->qk_norm;
    const float *qn = (const float *)l->q_norm.data, *kn = (const float *)l->k_norm.data;
    for (uint32_t t = 0; t < n; t++) {
        float *q = b->q + (size_t)t * qd, *k = b->k + (size_t)t * kvd;
        if (qk == MR_QK_NORM_FULL) {
            rmsnorm(q, q, qn, qd, hp->rms_eps);
            rmsnorm(k, k, kn, kvd, hp->rms_eps);
        } else if (qk == MR_QK_NORM_HEAD) {
            for (uint32_t hh = 0; hh < hp->n_head; hh++)
                rmsnorm(q + (size_t)hh * hd, q + (size_t)hh * hd, qn, hd, hp->rms_eps);
            for (uint32_t hh = 0; hh < hp->n_head_kv; hh++)
                rmsnorm(k + (size_t)hh * hd, k + (size_t)hh * hd, kn, hd, hp->rms_eps);
        }
        const float *cs = b->rope + (size_t)t * hp->n_rot;
        rope(q, hp->n_head, hd, hp->n_rot, cs, w->arch->rope);
        rope(k, hp->n_head_kv, hd, hp->n_rot, cs, w->arch->rope);
    }

    float *kc = s->k_cache + (size_t)il * s->n_ctx * kvd;
    float *vc = s->v_cache + (size_t)il * s->n_ctx * kvd;
    memcpy(kc + (size_t)s->n_past * kvd, b->k, (size_t)n * kvd * sizeof(float));
    memcpy(vc + (size_t)s->n_past * kvd, b->v, (size_t)n * kvd * sizeof(float));

    struct attn_job job = {s, kc, vc, n, s->n_past, cpu_kernels(s->isa, MOERUN_TYPE_F32)->vec_dot};
    cpu_pool_run(s->pool, attention_task, &job);

    if ((rc = matmul(s, &l->wo, 0, n, b->att, b->h)))
        return rc;
    for (size_t i = 0; i < (size_t)n * d; i++)
        b->x[i] += b->h[i];
    return MOERUN_OK;
}

/* --- experts -------------------------------------------------------------------------------- */

/* Router: probabilities, the k chosen experts and their weights; rows grouped by expert. */
static int route(struct moerun_session *s, const struct mr_layer *l, uint32_t n) {
    const struct mr_hparams *hp = &s->w->hp;
    struct mr_scratch *b = &s->s;
    const uint32_t E = hp->n_expert, K = hp->n_expert_used;
    int rc = matmul(s, &l->router, 0, n, b->h, b->probs);
    if (rc)
        return rc;
    memset(b->route_start, 0, (E + 1) * sizeof(uint32_t));
    for (uint32_t t = 0; t < n; t++) {
        float *p = b->probs + (size_t)t * E;
        softmax(p, E);
        int32_t *sel = b->sel + (size_t)t * K;
        float *sw = b->sel_w + (size_t)t * K;
        float sum = 0.0f;
        for (uint32_t j = 0; j < K; j++) {
            int32_t best = -1;
            for (uint32_t e = 0; e < E; e++) {
                bool taken = false;
                for (uint32_t i = 0; i < j; i++)
                    taken |= sel[i] == (int32_t)e;
                if (!taken && (best < 0 || p[e] > p[best]))
                    best = (int32_t)e;
            }
            sel[j] = best;
            sw[j] = p[best];
            sum += p[best];
            b->route_start[best + 1]++;
        }
        if (s->w->arch->norm_topk)
            for (uint32_t j = 0; j < K; j++)
                sw[j] /= sum;
    }
    for (uint32_t e = 0; e < E; e++)
        b->route_start[e + 1] += b->route_start[e];
    /* fill each expert's rows in token order (route_start[e] is advanced, then restored) */
    for (uint32_t t = 0; t < n; t++)
        for (uint32_t j = 0; j < K; j++)
            b->route_rows[b->route_start[b->sel[t * K + j]]++] = t * K + j;
    for (uint32_t e = E; e > 0; e--)
        b->route_start[e] = b->route_start[e - 1];
    b->route_start[0] = 0;
    return MOERUN_OK;
}

/* out[c][d] = down(silu(gate x) * up x) for the c rows of xe: the three matrices at p, of the
 * types and shapes of the layer's experts (or of its shared expert). */
static int swiglu(struct moerun_session *s, const struct mr_layer *l, bool shared,
                  const struct mr_expert_ptrs *p, uint32_t c, float *out) {
    struct mr_scratch *b = &s->s;
    const struct mr_weight *gate = shared ? &l->sh_gate : &l->gate_exps;
    const struct mr_weight *up = shared ? &l->sh_up : &l->up_exps;
    const struct mr_weight *down = shared ? &l->sh_down : &l->down_exps;
    const uint32_t f = (uint32_t)gate->ne[1];
    int rc;
    if ((rc = matmul_at(s, gate, p->gate, c, b->xe, b->ge)) ||
        (rc = matmul_at(s, up, p->up, c, b->xe, b->ue)))
        return rc;
    for (size_t i = 0; i < (size_t)c * f; i++)
        b->ge[i] = silu(b->ge[i]) * b->ue[i];
    return matmul_at(s, down, p->down, c, b->ge, out);
}

/* Expert e of layer l over the tokens routed to it: gather their inputs, run it, and put each
 * weighted output in its token's slot. */
static int expert_apply(struct moerun_session *s, const struct mr_layer *l, int32_t e,
                        const struct mr_expert_ptrs *p) {
    struct mr_scratch *b = &s->s;
    const uint32_t d = s->w->hp.n_embd, K = s->w->hp.n_expert_used;
    const uint32_t r0 = b->route_start[e], c = b->route_start[e + 1] - r0;
    for (uint32_t i = 0; i < c; i++) {
        const uint32_t t = b->route_rows[r0 + i] / K;
        memcpy(b->xe + (size_t)i * d, b->h + (size_t)t * d, d * sizeof(float));
    }
    int rc = swiglu(s, l, false, p, c, b->de);
    if (rc != MOERUN_OK)
        return rc;
    for (uint32_t i = 0; i < c; i++) {
        const uint32_t row = b->route_rows[r0 + i];
        const float wt = b->sel_w[row];
        float *dst = b->slots + (size_t)row * d;
        const float *src = b->de + (size_t)i * d;
        for (uint32_t j = 0; j < d; j++)
            dst[j] = src[j] * wt;
    }
    return MOERUN_OK;
}

/* The experts the batch chose, through the tiers: request them all first, so their reads go
 * ahead of any prefetch for later layers. */
static int experts_request(struct moerun_session *s, uint32_t il) {
    struct mr_scratch *b = &s->s;
    uint32_t n_need = 0;
    for (uint32_t e = 0; e < s->w->hp.n_expert; e++)
        if (b->route_start[e + 1] != b->route_start[e])
            b->need[n_need++] = (int32_t)e;
    return offload_experts_request(s->model->offload, il, b->need, n_need);
}

/* Every expert the batch chose: from memory, or through the tiers as each arrives (in any
 * order: the outputs are summed in slot order afterwards). */
static int experts_run(struct moerun_session *s, uint32_t il) {
    const struct mr_layer *l = &s->w->layers[il];
    struct mr_scratch *b = &s->s;
    struct mr_offload *o = s->model->offload;
    int rc = MOERUN_OK;
    if (!o) {
        for (uint32_t e = 0; e < s->w->hp.n_expert; e++) {
            if (b->route_start[e + 1] == b->route_start[e])
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

/* Predict the experts of the next layers from this layer's hidden state (x, before its
 * experts): their routers after their norms, averaged over the batch. Routers and their norms
 * are resident, so this never waits. */
static int predict_ahead(struct moerun_session *s, uint32_t il, uint32_t n) {
    struct mr_offload *o = s->model->offload;
    const struct mr_hparams *hp = &s->w->hp;
    struct mr_scratch *b = &s->s;
    const uint32_t d = hp->n_embd, E = hp->n_expert;
    const uint32_t ahead = (uint32_t)offload_prefetch_layers(o);
    for (uint32_t j = 1; j <= ahead && il + j < hp->n_layer; j++) {
        const struct mr_layer *next = &s->w->layers[il + j];
        for (uint32_t t = 0; t < n; t++)
            rmsnorm(b->xe + (size_t)t * d, b->x + (size_t)t * d, (const float *)next->ffn_norm.data,
                    d, hp->rms_eps);
        int rc = matmul(s, &next->router, 0, n, b->xe, b->pred);
        if (rc != MOERUN_OK)
            return rc;
        for (uint32_t t = 0; t < n; t++)
            softmax(b->pred + (size_t)t * E, E);
        for (uint32_t t = 1; t < n; t++)
            for (uint32_t e = 0; e < E; e++)
                b->pred[e] += b->pred[(size_t)t * E + e];
        for (uint32_t e = 0; e < E && n > 1; e++)
            b->pred[e] /= (float)n;
        offload_predict(o, il + j, b->pred);
    }
    return MOERUN_OK;
}

static int moe_block(struct moerun_session *s, const struct mr_layer *dense, uint32_t il,
                     uint32_t n) {
    const struct mr_weights *w = s->w;
    const struct mr_hparams *hp = &w->hp;
    const struct mr_layer *l = &w->layers[il]; /* router, its norm, expert shapes: resident */
    struct mr_scratch *b = &s->s;
    const uint32_t d = hp->n_embd, K = hp->n_expert_used;
    int rc;

    for (uint32_t t = 0; t < n; t++)
        rmsnorm(b->h + (size_t)t * d, b->x + (size_t)t * d, (const float *)l->ffn_norm.data, d,
                hp->rms_eps);
    if ((rc = route(s, l, n)))
        return rc;
    if (s->route_fn)
        for (uint32_t t = 0; t < n; t++)
            s->route_fn(s->route_user, s->n_past + t, il, b->sel + (size_t)t * K,
                        b->sel_w + (size_t)t * K, K);
    /* through the tiers: this layer's reads first, then the prediction's for later layers,
     * which go to the loader as it idles (and overlap the experts computed below) */
    if (s->model->offload && ((rc = experts_request(s, il)) || (rc = predict_ahead(s, il, n))))
        return rc;
    if ((rc = experts_run(s, il)))
        return rc;

    /* y = the experts' outputs summed in slot order, so the order experts were computed in
     * never changes the result */
    float *y = b->de;
    for (uint32_t t = 0; t < n; t++) {
        float *yt = y + (size_t)t * d;
        memcpy(yt, b->slots + (size_t)t * K * d, d * sizeof(float));
        for (uint32_t j = 1; j < K; j++) {
            const float *src = b->slots + ((size_t)t * K + j) * d;
            for (uint32_t i = 0; i < d; i++)
                yt[i] += src[i];
        }
    }

    if (w->arch->shared_expert) {
        /* the shared expert (in the dense part) writes to b->slots, now free */
        float *sh = b->slots;
        const struct mr_expert_ptrs p = {dense->sh_gate.data, dense->sh_up.data,
                                         dense->sh_down.data};
        memcpy(b->xe, b->h, (size_t)n * d * sizeof(float));
        if ((rc = matmul(s, &dense->sh_gate_inp, 0, n, b->h, b->sh_g)) ||
            (rc = swiglu(s, dense, true, &p, n, sh)))
            return rc;
        for (uint32_t t = 0; t < n; t++) {
            const float g = 1.0f / (1.0f + expf(-b->sh_g[t]));
            for (uint32_t i = 0; i < d; i++)
                y[(size_t)t * d + i] += sh[(size_t)t * d + i] * g;
        }
    }
    for (size_t i = 0; i < (size_t)n * d; i++)
        b->x[i] += y[i];
    return MOERUN_OK;
}

/* --- the whole pass ------------------------------------------------------------------------- */

int forward_batch(struct moerun_session *s, const int32_t *tokens, uint32_t n, float *logits,
                  int logits_all) {
    const struct mr_weights *w = s->w;
    const struct mr_hparams *hp = &w->hp;
    struct mr_scratch *b = &s->s;
    const uint32_t d = hp->n_embd;
    MOERUN_ASSERT(n >= 1 && n <= s->n_batch && s->n_past + n <= s->n_ctx);

    const cpu_to_float_fn emb = cpu_kernels(s->isa, w->tok_embd.type)->to_float;
    for (uint32_t t = 0; t < n; t++) {
        emb(mr_weight_rows(&w->tok_embd, 0, (uint64_t)tokens[t]), b->x + (size_t)t * d, d);
        rope_angles(b->rope + (size_t)t * hp->n_rot, s->n_past + t, hp->n_rot, hp->rope_base);
    }
    int rc = MOERUN_OK;
    struct mr_offload *o = s->model->offload;
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
    if (rc != MOERUN_OK || !logits)
        return rc;

    /* logits of every token, or of the last */
    const uint32_t first = logits_all ? 0 : n - 1, count = n - first;
    for (uint32_t t = first; t < n; t++)
        rmsnorm(b->h + (size_t)(t - first) * d, b->x + (size_t)t * d,
                (const float *)w->output_norm.data, d, hp->rms_eps);
    return matmul(s, &w->output, 0, count, b->h, logits);
}
