/* Sessions: usable (the engine is in). One sequence over a shared model: its KV cache and
 * the forward pass's scratch, allocated at creation; decode checks its input, then runs the
 * forward pass in batches of at most n_batch tokens. */
#include "session.h"
#include "internal.h"
#include "model.h"
#include "offload.h"

#include <string.h>
#include <unistd.h>

void moerun_session_params_init(moerun_session_params *p) {
    memset(p, 0, sizeof(*p));
    p->struct_size = sizeof(*p);
}

/* The byte size of every scratch buffer, laid out in one arena (64-byte aligned pieces). */
struct layout {
    size_t offset;
};

static void *take(struct layout *lay, uint8_t *base, size_t bytes) {
    size_t at = lay->offset;
    lay->offset += (bytes + 63) & ~(size_t)63;
    return base ? base + at : NULL;
}

/* Largest activation scratch any product of the model needs for n tokens. */
static size_t act_bytes(const struct mr_weights *w, uint32_t n) {
    size_t max = cpu_act_bytes(w->output.type, (int64_t)w->output.ne[0], n);
    for (uint32_t il = 0; il < w->hp.n_layer; il++) {
        const struct mr_weight *first = &w->layers[il].attn_norm;
        size_t count = sizeof(struct mr_layer) / sizeof(struct mr_weight);
        for (size_t i = 0; i < count; i++) {
            if (first[i].data && first[i].type != MOERUN_TYPE_F32)
                max = MR_MAX(max, cpu_act_bytes(first[i].type, (int64_t)first[i].ne[0], n));
        }
    }
    return max;
}

/* Lay out (base NULL: only measure) the caches and scratch; returns the total bytes. */
static size_t lay_out(struct moerun_session *s, uint8_t *base) {
    const struct mr_hparams *hp = &s->w->hp;
    const size_t nb = s->n_batch, d = hp->n_embd, hd = hp->head_dim;
    const size_t qd = (size_t)hp->n_head * hd, kvd = (size_t)hp->n_head_kv * hd;
    const size_t E = hp->n_expert, K = hp->n_expert_used;
    const size_t ff = MR_MAX(hp->n_ff_exp, hp->n_ff_shexp), f = sizeof(float);
    struct layout lay = {0};
    struct mr_scratch *b = &s->s;
    s->k_cache = take(&lay, base, (size_t)hp->n_layer * s->n_ctx * kvd * f);
    s->v_cache = take(&lay, base, (size_t)hp->n_layer * s->n_ctx * kvd * f);
    b->x = take(&lay, base, nb * d * f);
    b->h = take(&lay, base, nb * d * f);
    b->q = take(&lay, base, nb * qd * f);
    b->k = take(&lay, base, nb * kvd * f);
    b->v = take(&lay, base, nb * kvd * f);
    b->att = take(&lay, base, nb * qd * f);
    b->scores = take(&lay, base, (size_t)s->n_threads * s->n_ctx * f);
    b->rope = take(&lay, base, nb * hp->n_rot * f);
    b->probs = take(&lay, base, nb * E * f);
    b->sel = take(&lay, base, nb * K * sizeof(int32_t));
    b->sel_w = take(&lay, base, nb * K * f);
    b->route_start = take(&lay, base, (E + 1) * sizeof(uint32_t));
    b->route_rows = take(&lay, base, nb * K * sizeof(uint32_t));
    b->xe = take(&lay, base, nb * d * f);
    b->ge = take(&lay, base, nb * ff * f);
    b->ue = take(&lay, base, nb * ff * f);
    b->de = take(&lay, base, nb * d * f);
    b->slots = take(&lay, base, nb * K * d * f);
    b->sh_g = take(&lay, base, nb * f);
    b->pred = take(&lay, base, nb * E * f);
    b->need = take(&lay, base, E * sizeof(int32_t));
    b->act = take(&lay, base, act_bytes(s->w, s->n_batch));
    return lay.offset;
}

int moerun_session_create(moerun_model *model, const moerun_session_params *params,
                          moerun_session **out) {
    mr_err_clear();
    if (!out)
        return mr_err(MOERUN_ERR_INVALID_ARG, "moerun_session_create: out is NULL");
    *out = NULL;
    if (!model)
        return mr_err(MOERUN_ERR_INVALID_ARG, "moerun_session_create: model is NULL");
    if (!model->w)
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "moerun_session_create: the model was opened metadata-only");
    moerun_session_params p;
    moerun_session_params_init(&p);
    int rc = mr_params_merge(&p, sizeof(p), params, "moerun_session_create");
    if (rc != MOERUN_OK)
        return rc;
    const struct mr_hparams *hp = &model->w->hp;
    const moerun_allocator *a = model->params.allocator;
    uint32_t n_ctx = p.n_ctx ? p.n_ctx : MR_MIN(hp->n_ctx_train, 4096u);
    if (n_ctx > (1u << 24))
        return mr_err(MOERUN_ERR_INVALID_ARG, "session: n_ctx %u is too large", n_ctx);
    uint32_t n_batch = p.n_batch ? p.n_batch : 512;
    n_batch = MR_MIN(n_batch, n_ctx);
    int n_threads = p.n_threads ? p.n_threads : model->params.n_threads;
    if (n_threads <= 0) {
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = cores > 0 ? (int)MR_MIN(cores, 512) : 1;
    }

    moerun_session *s = mr_calloc(a, 1, sizeof(*s));
    if (!s)
        return mr_err(MOERUN_ERR_NOMEM, "session: out of memory");
    s->model = model;
    s->w = model->w;
    s->n_ctx = n_ctx;
    s->n_batch = n_batch;
    s->n_threads = n_threads;
    s->isa = cpu_isa_best();
    rc = cpu_pool_create(n_threads, &s->pool);
    if (rc != MOERUN_OK)
        goto fail;
    size_t bytes = lay_out(s, NULL);
    s->arena = mr_alloc(a, bytes, 64);
    if (!s->arena) {
        rc = mr_err(MOERUN_ERR_NOMEM,
                    "session: cannot allocate %zu bytes for the KV cache (%u tokens) and scratch",
                    bytes, n_ctx);
        goto fail;
    }
    lay_out(s, s->arena);
    *out = s;
    return MOERUN_OK;
fail:
    moerun_session_destroy(s);
    return rc;
}

void moerun_session_destroy(moerun_session *s) {
    if (!s)
        return;
    const moerun_allocator *a = s->model->params.allocator;
    cpu_pool_destroy(s->pool);
    mr_free(a, s->arena);
    mr_free(a, s);
}

int moerun_session_decode(moerun_session *s, const int32_t *tokens, size_t n, float *logits,
                          int logits_all) {
    mr_err_clear();
    if (!s || (!tokens && n))
        return mr_err(MOERUN_ERR_INVALID_ARG, "moerun_session_decode: NULL argument");
    if (n == 0)
        return MOERUN_OK;
    const uint32_t n_vocab = s->w->hp.n_vocab;
    for (size_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || (uint32_t)tokens[i] >= n_vocab)
            return mr_err(MOERUN_ERR_RANGE, "token %zu: id %d is out of range (vocabulary of %u)",
                          i, tokens[i], n_vocab);
    }
    if (n > s->n_ctx - s->n_past)
        return mr_err(MOERUN_ERR_RANGE,
                      "%zu tokens do not fit in the context: %u of %u positions are used", n,
                      s->n_past, s->n_ctx);
    const uint32_t n_past0 = s->n_past;
    struct mr_offload *o = s->model->offload;
    if (o) /* one forward pass at a time through the tiers */
        offload_lock(o);
    int rc = MOERUN_OK;
    for (size_t done = 0; done < n && rc == MOERUN_OK;) {
        const uint32_t chunk = (uint32_t)MR_MIN(n - done, (size_t)s->n_batch);
        const bool last = done + chunk == n;
        float *out = NULL;
        if (logits && logits_all)
            out = logits + done * n_vocab;
        else if (logits && last)
            out = logits;
        rc = forward_batch(s, tokens + done, chunk, out, logits_all);
        if (rc != MOERUN_OK) {
            s->n_past = n_past0; /* the positions written past it are overwritten later */
            break;
        }
        s->n_past += chunk;
        done += chunk;
    }
    if (o)
        offload_unlock(o);
    return rc;
}

void moerun_session_set_route_callback(moerun_session *s, moerun_route_fn fn, void *user_data) {
    if (!s)
        return;
    s->route_fn = fn;
    s->route_user = user_data;
}

uint32_t moerun_session_n_past(const moerun_session *s) {
    return s ? s->n_past : 0;
}

uint32_t moerun_session_n_ctx(const moerun_session *s) {
    return s ? s->n_ctx : 0;
}

void moerun_session_reset(moerun_session *s) {
    if (s)
        s->n_past = 0;
}
