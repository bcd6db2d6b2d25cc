/* The CPU backend: the ops table over host memory. Products and attention run on the
 * instance's thread pool with the best SIMD kernels of this CPU; the elementwise parts on the
 * calling thread. Memory and copy ops are synchronous (the copy stream is the caller's thread),
 * so events are always complete. */
#include "backend_cpu.h"
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define CPU(be) ((struct cpu_backend *)(be))

/* --- instances ------------------------------------------------------------------------------ */

int cpu_backend_init(struct cpu_backend *c, const struct mr_backend_ops *ops,
                     enum mr_backend_kind kind, int n_threads, const moerun_allocator *a) {
    memset(c, 0, sizeof(*c));
    c->base.ops = ops;
    c->base.kind = kind;
    c->base.host_memory = kind == MR_BACKEND_CPU;
    c->root = c;
    c->a = a;
    c->isa = cpu_isa_best();
    int rc = cpu_pool_create(n_threads, &c->pool);
    if (rc != MOERUN_OK)
        return rc;
    c->n_threads = cpu_pool_size(c->pool);
    snprintf(c->desc, sizeof(c->desc), "%s: %s, %d threads", ops->name, cpu_isa_name(c->isa),
             c->n_threads);
    return MOERUN_OK;
}

void cpu_backend_fini(struct cpu_backend *c) {
    cpu_pool_destroy(c->pool);
    c->pool = NULL;
}

int mr_backend_cpu_create(const struct mr_backend_config *cfg, struct mr_backend **out) {
    *out = NULL;
    struct cpu_backend *c = mr_calloc(cfg->allocator, 1, sizeof(*c));
    if (!c)
        return mr_err(MOERUN_ERR_NOMEM, "cpu backend: out of memory");
    int rc = cpu_backend_init(c, &cpu_backend_ops, MR_BACKEND_CPU, cfg->n_threads, cfg->allocator);
    if (rc != MOERUN_OK) {
        mr_free(cfg->allocator, c);
        return rc;
    }
    *out = &c->base;
    return MOERUN_OK;
}

/* A clone shares the root's ops (so a sim clone stays a sim instance) and device. */
static int cpu_clone(struct mr_backend *be, int n_threads, struct mr_backend **out) {
    struct cpu_backend *p = CPU(be);
    *out = NULL;
    struct cpu_backend *c = mr_calloc(p->a, 1, sizeof(*c));
    if (!c)
        return mr_err(MOERUN_ERR_NOMEM, "cpu backend: out of memory");
    int rc = cpu_backend_init(c, be->ops, be->kind, n_threads > 0 ? n_threads : p->n_threads, p->a);
    if (rc != MOERUN_OK) {
        mr_free(p->a, c);
        return rc;
    }
    c->root = p->root;
    *out = &c->base;
    return MOERUN_OK;
}

static void cpu_destroy(struct mr_backend *be) {
    struct cpu_backend *c = CPU(be);
    cpu_backend_fini(c);
    mr_free(c->a, c);
}

static const char *cpu_describe(struct mr_backend *be) {
    return CPU(be)->desc;
}

static int cpu_mem_info(struct mr_backend *be, uint64_t *total, uint64_t *free_now) {
    (void)be;
    *total = 0;
    *free_now = 0;
    return MOERUN_OK;
}

/* --- memory and copies ---------------------------------------------------------------------- */

static int cpu_alloc(struct mr_backend *be, uint64_t bytes, void **out) {
    *out = NULL;
    if (bytes == 0)
        return MOERUN_OK;
    if (bytes > SIZE_MAX / 2 || !(*out = mr_alloc(CPU(be)->a, (size_t)bytes, 4096)))
        return mr_err(MOERUN_ERR_NOMEM, "%s backend: cannot allocate %llu bytes", be->ops->name,
                      (unsigned long long)bytes);
    return MOERUN_OK;
}

static void cpu_free(struct mr_backend *be, void *p) {
    mr_free(CPU(be)->a, p);
}

static int cpu_host_register(struct mr_backend *be, void *p, uint64_t bytes) {
    (void)be, (void)p, (void)bytes;
    return MOERUN_OK;
}

static void cpu_host_unregister(struct mr_backend *be, void *p) {
    (void)be, (void)p;
}

static int cpu_memcpy(struct mr_backend *be, void *dst, const void *src, uint64_t bytes) {
    (void)be;
    if (bytes)
        memcpy(dst, src, (size_t)bytes);
    return MOERUN_OK;
}

static int cpu_sync(struct mr_backend *be, enum mr_stream stream) {
    (void)be, (void)stream;
    return MOERUN_OK;
}

/* Events of a synchronous device: always complete; a handle so that create/destroy pair. */
struct mr_event {
    int unused;
};

static int cpu_event_create(struct mr_backend *be, struct mr_event **out) {
    *out = mr_calloc(CPU(be)->a, 1, sizeof(**out));
    return *out ? MOERUN_OK : mr_err(MOERUN_ERR_NOMEM, "cpu backend: out of memory");
}

static void cpu_event_destroy(struct mr_backend *be, struct mr_event *ev) {
    mr_free(CPU(be)->a, ev);
}

static int cpu_event_op(struct mr_backend *be, enum mr_stream stream, struct mr_event *ev) {
    (void)be, (void)stream, (void)ev;
    return MOERUN_OK;
}

static int cpu_callback(struct mr_backend *be, enum mr_stream stream, mr_host_fn fn, void *arg) {
    (void)be, (void)stream;
    fn(arg);
    return MOERUN_OK;
}

/* --- workspace ------------------------------------------------------------------------------ */

/* [act: the products' converted activations][scores: n_threads x n_ctx floats] */
static uint64_t cpu_workspace_bytes(struct mr_backend *be, const struct mr_workspace_need *need) {
    struct cpu_backend *c = CPU(be);
    uint64_t act = 0;
    for (int t = 0; t < 64; t++)
        if (need->types & ((uint64_t)1 << t))
            act = MR_MAX(act, (uint64_t)cpu_act_bytes(t, need->max_k, need->n_batch));
    c->act_bytes = (act + 63) & ~(uint64_t)63;
    c->scores_n_ctx = need->n_ctx;
    return c->act_bytes + (uint64_t)c->n_threads * need->n_ctx * sizeof(float);
}

static void cpu_set_workspace(struct mr_backend *be, void *ws, uint64_t bytes) {
    CPU(be)->ws = ws;
    CPU(be)->ws_bytes = bytes;
}

/* --- compute -------------------------------------------------------------------------------- */

static int cpu_matmul_op(struct mr_backend *be, int type, int64_t rows, int64_t k, const void *w,
                         int64_t n, const float *x, float *y) {
    struct cpu_backend *c = CPU(be);
    if (n == 0 || rows == 0)
        return MOERUN_OK;
    const uint64_t act = (uint64_t)cpu_act_bytes(type, k, n);
    if (act && (!c->ws || act > c->act_bytes || c->act_bytes > c->ws_bytes))
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "cpu backend: the workspace is too small for a %lld x %lld product of %lld",
                      (long long)rows, (long long)k, (long long)n);
    if (n == 1)
        return cpu_matvec(c->pool, c->isa, type, rows, k, w, x, y, c->ws);
    return cpu_matmul(c->pool, c->isa, type, rows, k, w, n, x, y, c->ws);
}

/* out = x / sqrt(mean(x^2) + eps) * w over n values (as ggml: squares summed in double). */
static void rmsnorm_row(float *out, const float *x, const float *w, int64_t n, float eps) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++)
        sum += (double)(x[i] * x[i]);
    const float mean = (float)(sum / (double)n);
    const float scale = 1.0f / sqrtf(mean + eps);
    for (int64_t i = 0; i < n; i++)
        out[i] = (x[i] * scale) * w[i];
}

static int cpu_rmsnorm(struct mr_backend *be, float *out, const float *x, const float *w,
                       int64_t n_rows, int64_t n, float eps) {
    (void)be;
    for (int64_t r = 0; r < n_rows; r++)
        rmsnorm_row(out + r * n, x + r * n, w, n, eps);
    return MOERUN_OK;
}

#define ROPE_MAX_ROT 1024

static int cpu_rope(struct mr_backend *be, float *x, int64_t n_tok, int n_head, int hd, int n_rot,
                    int64_t pos0, float base, enum mr_rope_mode mode) {
    (void)be;
    if (n_rot <= 0 || n_rot > hd || (n_rot & 1))
        return mr_err(MOERUN_ERR_INVALID_ARG, "rope: %d rotated dimensions of %d", n_rot, hd);
    if (n_rot > ROPE_MAX_ROT)
        return mr_err(MOERUN_ERR_UNSUPPORTED, "rope: %d rotated dimensions (at most %d)", n_rot,
                      ROPE_MAX_ROT);
    const int half = n_rot / 2;
    const float theta_scale = powf(base, -2.0f / (float)n_rot);
    float cs[ROPE_MAX_ROT]; /* cos of the angles, then their sin */
    for (int64_t t = 0; t < n_tok; t++) {
        /* theta advanced by repeated products, as ggml does */
        float theta = (float)(pos0 + t);
        for (int i = 0; i < half; i++) {
            cs[i] = cosf(theta);
            cs[half + i] = sinf(theta);
            theta *= theta_scale;
        }
        for (int hh = 0; hh < n_head; hh++) {
            float *v = x + (t * n_head + hh) * (int64_t)hd;
            for (int i = 0; i < half; i++) {
                const float co = cs[i], si = cs[half + i];
                const int a = mode == MR_ROPE_MODE_NORM ? 2 * i : i;
                const int b = mode == MR_ROPE_MODE_NORM ? 2 * i + 1 : i + half;
                const float x0 = v[a], x1 = v[b];
                v[a] = x0 * co - x1 * si;
                v[b] = x0 * si + x1 * co;
            }
        }
    }
    return MOERUN_OK;
}

/* In-place softmax of n values (max subtracted, sum in double). */
static void softmax_row(float *x, int64_t n) {
    float max = -INFINITY;
    for (int64_t i = 0; i < n; i++)
        max = x[i] > max ? x[i] : max;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    const float inv = (float)(1.0 / sum);
    for (int64_t i = 0; i < n; i++)
        x[i] *= inv;
}

struct attn_job {
    struct cpu_backend *c;
    const float *q, *k_cache, *v_cache;
    float *o;
    int64_t n_tok, pos0;
    int n_head, n_head_kv, hd;
    cpu_vec_dot_fn dot;
};

/* One (token, head) pair per task: scores over the cached positions, softmax, weighted sum. */
static void attention_task(void *arg, int ith, int nth) {
    const struct attn_job *j = arg;
    const int hd = j->hd, H = j->n_head;
    const int64_t kvd = (int64_t)j->n_head_kv * hd;
    const int group = H / j->n_head_kv;
    const float scale = 1.0f / sqrtf((float)hd);
    float *scores = (float *)(j->c->ws + j->c->act_bytes) + (size_t)ith * j->c->scores_n_ctx;
    for (int64_t task = ith; task < j->n_tok * H; task += nth) {
        const int64_t t = task / H;
        const int head = (int)(task % H), kvh = head / group;
        const int64_t n_keys = j->pos0 + t + 1; /* causal: positions 0 .. pos */
        const float *q = j->q + (t * H + head) * (int64_t)hd;
        for (int64_t p = 0; p < n_keys; p++) {
            float dot;
            j->dot(hd, &dot, q, j->k_cache + p * kvd + (int64_t)kvh * hd);
            scores[p] = dot * scale;
        }
        softmax_row(scores, n_keys);
        float *o = j->o + (t * H + head) * (int64_t)hd;
        memset(o, 0, (size_t)hd * sizeof(float));
        for (int64_t p = 0; p < n_keys; p++) {
            const float a = scores[p];
            const float *v = j->v_cache + p * kvd + (int64_t)kvh * hd;
            for (int i = 0; i < hd; i++)
                o[i] += a * v[i];
        }
    }
}

static int cpu_attention(struct mr_backend *be, const float *q, const float *k_cache,
                         const float *v_cache, float *o, int64_t n_tok, int64_t pos0, int n_head,
                         int n_head_kv, int hd) {
    struct cpu_backend *c = CPU(be);
    if (n_head <= 0 || hd <= 0 || n_head_kv <= 0 || n_head % n_head_kv)
        return mr_err(MOERUN_ERR_INVALID_ARG, "attention: %d heads of %d over %d KV heads", n_head,
                      hd, n_head_kv);
    if (pos0 + n_tok > (int64_t)c->scores_n_ctx || !c->ws ||
        c->act_bytes + (uint64_t)c->n_threads * c->scores_n_ctx * sizeof(float) > c->ws_bytes)
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "cpu backend: the workspace holds scores of %u positions, not %lld",
                      c->scores_n_ctx, (long long)(pos0 + n_tok));
    struct attn_job job = {c,
                           q,
                           k_cache,
                           v_cache,
                           o,
                           n_tok,
                           pos0,
                           n_head,
                           n_head_kv,
                           hd,
                           cpu_kernels(c->isa, MOERUN_TYPE_F32)->vec_dot};
    cpu_pool_run(c->pool, attention_task, &job);
    return MOERUN_OK;
}

static int cpu_softmax_topk(struct mr_backend *be, float *logits, int64_t n_tok, int E, int k,
                            bool renorm, float *probs, int32_t *sel, float *sel_w) {
    (void)be;
    if (E <= 0 || k < 0 || k > E)
        return mr_err(MOERUN_ERR_INVALID_ARG, "softmax_topk: k = %d of %d", k, E);
    for (int64_t t = 0; t < n_tok; t++) {
        float *p = probs + t * E;
        if (p != logits + t * E)
            memcpy(p, logits + t * E, (size_t)E * sizeof(float));
        softmax_row(p, E);
        if (k == 0)
            continue;
        int32_t *st = sel + t * k;
        float *sw = sel_w + t * k;
        float sum = 0.0f;
        for (int j = 0; j < k; j++) {
            int32_t best = -1;
            for (int e = 0; e < E; e++) {
                bool taken = false;
                for (int i = 0; i < j; i++)
                    taken |= st[i] == e;
                if (!taken && (best < 0 || p[e] > p[best]))
                    best = e;
            }
            st[j] = best;
            sw[j] = p[best];
            sum += p[best];
        }
        if (renorm)
            for (int j = 0; j < k; j++)
                sw[j] /= sum;
    }
    return MOERUN_OK;
}

static int cpu_swiglu(struct mr_backend *be, float *out, const float *g, const float *u,
                      int64_t n) {
    (void)be;
    for (int64_t i = 0; i < n; i++)
        out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    return MOERUN_OK;
}

static int cpu_add(struct mr_backend *be, float *y, const float *x, int64_t n) {
    (void)be;
    for (int64_t i = 0; i < n; i++)
        y[i] += x[i];
    return MOERUN_OK;
}

static int cpu_add_rows(struct mr_backend *be, float *y, const float *b, int64_t n_rows,
                        int64_t n) {
    (void)be;
    for (int64_t r = 0; r < n_rows; r++)
        for (int64_t i = 0; i < n; i++)
            y[r * n + i] += b[i];
    return MOERUN_OK;
}

static int cpu_gather_rows(struct mr_backend *be, float *dst, const float *src, const int32_t *idx,
                           int64_t n, int64_t d) {
    (void)be;
    for (int64_t i = 0; i < n; i++)
        memcpy(dst + i * d, src + (int64_t)idx[i] * d, (size_t)d * sizeof(float));
    return MOERUN_OK;
}

static int cpu_scatter_scaled(struct mr_backend *be, float *dst, const float *src,
                              const int32_t *idx, const float *scale, int64_t n, int64_t d) {
    (void)be;
    for (int64_t i = 0; i < n; i++) {
        float *o = dst + (int64_t)idx[i] * d;
        const float s = scale[idx[i]];
        for (int64_t j = 0; j < d; j++)
            o[j] = src[i * d + j] * s;
    }
    return MOERUN_OK;
}

static int cpu_sum_slots(struct mr_backend *be, float *y, const float *slots, int64_t n_tok, int k,
                         int64_t d) {
    (void)be;
    for (int64_t t = 0; t < n_tok; t++) {
        float *yt = y + t * d;
        if (k == 0) {
            memset(yt, 0, (size_t)d * sizeof(float));
            continue;
        }
        memcpy(yt, slots + t * k * d, (size_t)d * sizeof(float));
        for (int j = 1; j < k; j++) {
            const float *src = slots + (t * k + j) * d;
            for (int64_t i = 0; i < d; i++)
                yt[i] += src[i];
        }
    }
    return MOERUN_OK;
}

static int cpu_add_gated(struct mr_backend *be, float *y, const float *x, const float *g,
                         int64_t n_tok, int64_t d) {
    (void)be;
    for (int64_t t = 0; t < n_tok; t++) {
        const float s = 1.0f / (1.0f + expf(-g[t]));
        for (int64_t i = 0; i < d; i++)
            y[t * d + i] += x[t * d + i] * s;
    }
    return MOERUN_OK;
}

const struct mr_backend_ops cpu_backend_ops = {
    .version = MR_BACKEND_VERSION,
    .name = "cpu",
    .clone = cpu_clone,
    .destroy = cpu_destroy,
    .describe = cpu_describe,
    .mem_info = cpu_mem_info,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .host_register = cpu_host_register,
    .host_unregister = cpu_host_unregister,
    .upload = cpu_memcpy,
    .download = cpu_memcpy,
    .copy = cpu_memcpy,
    .sync = cpu_sync,
    .event_create = cpu_event_create,
    .event_destroy = cpu_event_destroy,
    .copy_async = cpu_memcpy,
    .record = cpu_event_op,
    .wait = cpu_event_op,
    .callback = cpu_callback,
    .workspace_bytes = cpu_workspace_bytes,
    .set_workspace = cpu_set_workspace,
    .matmul = cpu_matmul_op,
    .rmsnorm = cpu_rmsnorm,
    .rope = cpu_rope,
    .attention = cpu_attention,
    .softmax_topk = cpu_softmax_topk,
    .swiglu = cpu_swiglu,
    .add = cpu_add,
    .add_rows = cpu_add_rows,
    .gather_rows = cpu_gather_rows,
    .scatter_scaled = cpu_scatter_scaled,
    .sum_slots = cpu_sum_slots,
    .add_gated = cpu_add_gated,
};
