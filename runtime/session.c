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

/* The byte size of every scratch buffer, laid out in one arena (256-byte aligned pieces). */
struct layout {
    size_t offset;
};

static void *take(struct layout *lay, uint8_t *base, size_t bytes) {
    size_t at = lay->offset;
    lay->offset += (bytes + 255) & ~(size_t)255;
    return base ? base + at : NULL;
}

/* What the products of the model need of a backend workspace for n_batch tokens. */
static void workspace_need(const struct mr_weights *w, uint32_t n_batch, uint32_t n_ctx,
                           struct mr_workspace_need *need) {
    memset(need, 0, sizeof(*need));
    need->n_batch = n_batch;
    need->n_ctx = n_ctx;
    const size_t count = sizeof(struct mr_layer) / sizeof(struct mr_weight);
    for (uint32_t il = 0; il <= w->hp.n_layer; il++) {
        /* every layer's tensors, then the output matrix */
        const struct mr_weight *first = il < w->hp.n_layer ? &w->layers[il].attn_norm : &w->output;
        for (size_t i = 0; i < (il < w->hp.n_layer ? count : 1); i++) {
            const struct mr_weight *t = &first[i];
            if (!t->row_bytes || (t->ne[1] <= 1 && t->type == MOERUN_TYPE_F32 && t->ne[2] <= 1))
                continue; /* absent, or a vector (norms, biases) */
            need->types |= (uint64_t)1 << t->type;
            need->max_k = MR_MAX(need->max_k, (int64_t)t->ne[0]);
            need->max_rows = MR_MAX(need->max_rows, (int64_t)t->ne[1]);
            need->max_elements = MR_MAX(need->max_elements, (int64_t)(t->ne[0] * t->ne[1]));
        }
    }
}

/* Lay out (base NULL: only measure) the caches and the backend scratch; returns the bytes. */
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
    b->probs = take(&lay, base, nb * E * f);
    b->sel = take(&lay, base, nb * K * sizeof(int32_t));
    b->pred = take(&lay, base, nb * E * f); /* right after sel, as in the host's layout */
    b->sel_w = take(&lay, base, nb * K * f);
    b->tok_of = take(&lay, base, nb * K * sizeof(int32_t));
    b->row_of = take(&lay, base, nb * K * sizeof(int32_t));
    b->xe = take(&lay, base, nb * d * f);
    b->ge = take(&lay, base, nb * ff * f);
    b->ue = take(&lay, base, nb * ff * f);
    b->de = take(&lay, base, nb * d * f);
    b->slots = take(&lay, base, nb * K * d * f);
    b->sh_g = take(&lay, base, nb * f);
    b->logits = s->be->host_memory ? NULL : take(&lay, base, (size_t)s->n_logits * hp->n_vocab * f);
    b->ws = take(&lay, base, s->ws_bytes);
    return lay.offset;
}

/* The same for the host side. */
static size_t lay_out_host(struct moerun_session *s, uint8_t *base) {
    const struct mr_hparams *hp = &s->w->hp;
    const size_t nb = s->n_batch, E = hp->n_expert, K = hp->n_expert_used;
    struct layout lay = {0};
    struct mr_host_scratch *h = &s->hs;
    h->x = take(&lay, base, nb * hp->n_embd * sizeof(float));
    h->sel = take(&lay, base, nb * K * sizeof(int32_t));
    h->pred = take(&lay, base, nb * E * sizeof(float)); /* right after sel, as on the device */
    h->sel_w = take(&lay, base, nb * K * sizeof(float));
    h->route_start = take(&lay, base, (E + 1) * sizeof(uint32_t));
    h->route_rows = take(&lay, base, nb * K * sizeof(uint32_t));
    h->tok_of = take(&lay, base, nb * K * sizeof(int32_t));
    h->need = take(&lay, base, E * sizeof(int32_t));
    return lay.offset;
}

uint64_t session_backend_bytes(const struct mr_weights *w, struct mr_backend *be, uint32_t n_ctx,
                               uint32_t n_batch) {
    struct moerun_session s;
    memset(&s, 0, sizeof(s));
    s.w = w;
    s.be = be;
    s.n_ctx = n_ctx;
    s.n_batch = MR_MIN(n_batch, n_ctx);
    s.n_logits = be->host_memory ? s.n_batch : MR_MIN(s.n_batch, 32u);
    struct mr_workspace_need need;
    workspace_need(w, s.n_batch, n_ctx, &need);
    s.ws_bytes = be->ops->workspace_bytes(be, &need);
    return lay_out(&s, NULL);
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
    s->w = model->cw;
    s->n_ctx = n_ctx;
    s->n_batch = n_batch;
    s->n_threads = n_threads;
    if ((rc = model->be->ops->clone(model->be, n_threads, &s->be)) != MOERUN_OK)
        goto fail;
    s->n_logits = s->be->host_memory ? n_batch : MR_MIN(n_batch, 32u);
    struct mr_workspace_need need;
    workspace_need(s->w, n_batch, n_ctx, &need);
    s->ws_bytes = s->be->ops->workspace_bytes(s->be, &need);

    size_t bytes = lay_out(s, NULL);
    if (model->offload && offload_has_device(model->offload)) {
        rc = offload_device_reserve(model->offload, bytes, &s->arena);
        if (rc != MOERUN_OK)
            goto fail;
        s->arena_tier = true;
    } else if ((rc = s->be->ops->alloc(s->be, bytes, &s->arena)) != MOERUN_OK) {
        rc = mr_err(rc,
                    "session: cannot allocate %zu bytes for the KV cache (%u tokens) and "
                    "scratch: %s",
                    bytes, n_ctx, moerun_errmsg());
        goto fail;
    }
    lay_out(s, s->arena);
    s->be->ops->set_workspace(s->be, s->s.ws, s->ws_bytes);
    bytes = (lay_out_host(s, NULL) + 4095) & ~(size_t)4095;
    if (!(s->host_arena = mr_alloc(a, bytes, 4096))) {
        rc = mr_err(MOERUN_ERR_NOMEM, "session: cannot allocate %zu bytes of host scratch", bytes);
        goto fail;
    }
    lay_out_host(s, s->host_arena);
    /* pinned, so the per-layer uploads and downloads of a GPU need no staging (CPU: nothing) */
    if (s->be->ops->host_register(s->be, s->host_arena, bytes) == MOERUN_OK)
        s->host_pinned = true;
    else
        mr_log_warn("session: host scratch not pinned (%s): copies to the GPU are staged",
                    moerun_errmsg());
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
    if (s->arena_tier)
        offload_device_unreserve(s->model->offload, s->arena);
    else if (s->be)
        s->be->ops->free(s->be, s->arena);
    if (s->host_pinned)
        s->be->ops->host_unregister(s->be, s->host_arena);
    mr_backend_destroy(s->be);
    mr_free(a, s->host_arena);
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
