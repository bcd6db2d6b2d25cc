/* Offloading with a GPU: three tiers. The scheduler's slots are GPU memory (the GPU tier, one
 * allocation of gpu_bytes); its loader is the stage (scheduler/stage.c), a cache of sections in
 * pinned host memory that the NVMe tier reads into and the GPU tier uploads from on the copy
 * stream. The GPU also holds the routers, their norms and the output (uploaded once), and the
 * sessions' KV caches and scratch (reserved from the same allocation); the host keeps the
 * token embeddings. */
#include "backend.h"
#include "device.h"
#include "internal.h"
#include "model.h"
#include "offload_impl.h"
#include "session.h"
#include "stage.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define GIB (1024ull * 1024 * 1024)

static uint64_t align_up(uint64_t v, uint64_t a) {
    return (v + a - 1) / a * a;
}

/* The bytes every section would take in its own GPU slot (two slot sizes, as the scheduler). */
static uint64_t all_slots_bytes(const struct mr_offload *o) {
    uint64_t dense = 0, expert = 0;
    for (uint32_t i = 0; i < o->n_sections; i++) {
        const struct sched_section *sec = &o->sections[i];
        if (sec->expert < 0)
            dense = MR_MAX(dense, sec->slot_bytes);
        else
            expert = MR_MAX(expert, sec->slot_bytes);
    }
    return align_up(dense, SCHED_ALIGN) * o->n_layer +
           align_up(expert, SCHED_ALIGN) * o->n_layer * o->n_expert;
}

static uint64_t packed_bytes(const struct mr_offload *o) {
    uint64_t sum = 0;
    for (uint32_t i = 0; i < o->n_sections; i++)
        sum += align_up(o->sections[i].slot_bytes, SCHED_ALIGN);
    return sum;
}

/* --- the chain: NVMe -> stage -> GPU tier -> scheduler --------------------------------------- */

/* The NVMe tier's completion goes to the stage. */
static void on_read_done(void *user, uint64_t tag, int status, const char *msg) {
    struct mr_offload *o = user;
    stage_read_done(o->stage, tag, status, msg);
}

/* The stage's "upload enqueued" goes to the scheduler of the GPU slots. */
static void on_load_done(void *user, uint64_t tag, int status, const char *msg) {
    struct mr_offload *o = user;
    sched_load_done(o->sched, tag, status, msg);
}

/* The GPU tier's "copy finished reading the host slot" goes back to the stage. */
static void on_upload_done(void *user, uint64_t tag, int status, const char *msg) {
    struct mr_offload *o = user;
    stage_upload_done(o->stage, tag, status, msg);
}

/* The stage's uploader: the section's bytes (laid out alike in the host and the GPU slot) in
 * one copy into the GPU slot that starts at dst. */
static int upload_section(void *ctx, const struct sched_section *sec, const void *src, void *dst,
                          uint64_t tag) {
    struct mr_offload *o = ctx;
    const int32_t slot = sched_slot_index(o->sched, dst);
    if (slot < 0)
        return mr_err(MOERUN_ERR_INTERNAL, "offload: %p is not a GPU slot", dst);
    const struct tier_copy copy = {dst, src, sec->slot_bytes};
    return tier_device_upload(o->dev, (uint32_t)slot, &copy, 1, tag, on_upload_done, o);
}

/* The scheduler's loader: through the stage (made after the scheduler, whose layout it uses). */
static int load_section(void *ctx, const struct sched_section *sec, void *dst, uint64_t tag) {
    struct mr_offload *o = ctx;
    const struct sched_loader l = stage_loader(o->stage);
    return l.load(l.ctx, sec, dst, tag);
}

/* --- opening --------------------------------------------------------------------------------- */

/* Read the resident tensors (all but the embeddings) from the file into a host buffer used
 * for the upload, into GPU memory reserved from the tier; o->cw is the model's weights with
 * those pointers (and the host's token embeddings). The host keeps no copy. */
static int upload_resident(struct mr_offload *o, struct mr_weights *w, const char *path,
                           uint64_t bytes) {
    struct mr_backend *be = o->be;
    const size_t max = offload_resident_max(o->n_layer);
    struct mr_weight **src = mr_calloc(o->a, 2 * max, sizeof(*src)), **dst = src + max;
    if (!src)
        return mr_err(MOERUN_ERR_NOMEM, "offload: out of memory");
    *o->cw = *w;
    memcpy(o->cw_layers, w->layers, o->n_layer * sizeof(*o->cw_layers));
    o->cw->layers = o->cw_layers;
    const size_t n = offload_resident_list(w, false, src);
    offload_resident_list(o->cw, false, dst); /* the same tensors, in the same order */
    uint8_t *host = NULL;
    uint64_t host_bytes = 0;
    int rc = offload_read_tensors(o, path, src, n, &host, &host_bytes);
    if (rc == MOERUN_OK)
        rc = tier_device_reserve(o->dev, bytes, 256, &o->dev_resident);
    uint64_t at = 0, from = 0;
    for (size_t i = 0; i < n && rc == MOERUN_OK; i++) {
        const uint64_t nb = offload_tensor_bytes(src[i]);
        uint8_t *p = (uint8_t *)o->dev_resident + at;
        rc = be->ops->upload(be, p, host + from, nb);
        dst[i]->data = p;
        at += align_up(nb, 256);
        from += offload_piece_bytes(nb);
    }
    const int synced = be->ops->sync(be, MR_STREAM_COMPUTE); /* uploads read host until then */
    rc = rc == MOERUN_OK ? synced : rc;
    mr_free(o->a, host);
    mr_free(o->a, src);
    return rc;
}

/* The GPU bytes of those tensors (each 256-byte aligned), or 0 out of memory. */
static uint64_t resident_gpu_bytes(struct mr_offload *o, struct mr_weights *w) {
    struct mr_weight **list = mr_calloc(o->a, offload_resident_max(o->n_layer), sizeof(*list));
    if (!list)
        return 0;
    const size_t n = offload_resident_list(w, false, list);
    uint64_t sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += align_up(offload_tensor_bytes(list[i]), 256);
    mr_free(o->a, list);
    return sum;
}

/* The pinned host stage: host_bytes less the host's resident parts, or automatically the whole
 * model's sections when they fit in half of the machine's memory (else that half). */
static int open_stage(struct mr_offload *o, struct moerun_model *m, const char *path) {
    const uint32_t K = m->w->hp.n_expert_used;
    const uint32_t in_flight = 2 * K; /* a layer's experts and the prediction's */
    const uint64_t min =
        stage_min_bytes(o->sections, o->n_sections, o->n_layer, o->n_expert, in_flight);
    uint64_t region;
    if (m->params.host_bytes) {
        if (m->params.host_bytes < o->resident_bytes + min) {
            char b1[64], b2[64], b3[64], b4[64];
            offload_fmt_bytes(b1, sizeof(b1), m->params.host_bytes);
            offload_fmt_bytes(b2, sizeof(b2), o->resident_bytes + min);
            offload_fmt_bytes(b3, sizeof(b3), o->resident_bytes);
            offload_fmt_bytes(b4, sizeof(b4), min);
            return mr_err(MOERUN_ERR_BUDGET,
                          "host budget of %s is below the minimum for this model with a GPU, %s "
                          "(the token embeddings %s + the fewest pinned slots %s)",
                          b1, b2, b3, b4);
        }
        region = m->params.host_bytes - o->resident_bytes;
    } else {
        const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
        const uint64_t half = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page / 2 : 0;
        region = MR_MAX(MR_MIN(packed_bytes(o), half), min);
    }
    region &= ~(uint64_t)(TIER_ALIGN - 1);
    struct tier_host_params hp = {.bytes = region, .huge_pages = true, .bind_numa = true};
    int rc = tier_host_create(&hp, &o->host);
    if (rc != MOERUN_OK)
        return rc;
    void *base = tier_host_base(o->host);
    if ((rc = o->be->ops->host_register(o->be, base, tier_host_bytes(o->host))) != MOERUN_OK)
        return rc;
    o->host_registered = true;
    struct tier_nvme_params np = {
        .queue_depth = 64,
        .direct = m->params.direct_io != 0,
        .region = base,
        .region_bytes = tier_host_bytes(o->host),
        .done = on_read_done,
        .user = o,
    };
    if ((rc = tier_nvme_open(path, &np, &o->nvme)) != MOERUN_OK)
        return rc;
    struct sched_layout lay;
    sched_get_layout(o->sched, &lay);
    struct stage_params sp = {
        .region = base,
        .region_bytes = tier_host_bytes(o->host),
        .sections = o->sections,
        .n_sections = o->n_sections,
        .n_layer = o->n_layer,
        .n_expert = o->n_expert,
        .max_in_flight = in_flight,
        /* dense parts that stay in their GPU slots are read once: the stage only passes them */
        .n_dense_slots = lay.ring ? 0 : MR_MIN(o->n_layer, 2u),
        .reader = {offload_read_section, o},
        .uploader = {upload_section, o},
        .done = on_load_done,
        .done_user = o,
    };
    return stage_create(&sp, &o->stage);
}

int offload_gpu_open(struct mr_offload *o, struct moerun_model *m, const char *path) {
    struct mr_weights *w = m->w;
    const moerun_model_params *mp = &m->params;
    const moerun_allocator *a = o->a;
    o->be = m->be;
    o->dense_slot = mr_calloc(a, o->n_layer, sizeof(*o->dense_slot));
    o->expert_slot = mr_calloc(a, MR_MAX(o->n_expert, 1u), sizeof(*o->expert_slot));
    o->cw = mr_calloc(a, 1, sizeof(*o->cw));
    o->cw_layers = mr_calloc(a, o->n_layer, sizeof(*o->cw_layers));
    if (!o->dense_slot || !o->expert_slot || !o->cw || !o->cw_layers)
        return mr_err(MOERUN_ERR_NOMEM, "offload: out of memory");

    /* the GPU budget: [slots | resident tensors | sessions] */
    struct sched_params sp = {
        .n_layer = o->n_layer,
        .n_expert = o->n_expert,
        .n_expert_used = w->hp.n_expert_used,
        .policy = (enum sched_policy)mp->policy,
        .prefetch = (enum sched_prefetch)mp->prefetch,
        .prefetch_when_idle = true,
    };
    /* as a session's defaults: the trained context, at most 4096 */
    const uint32_t trained = w->hp.n_ctx_train ? w->hp.n_ctx_train : 4096;
    const uint32_t ctx = mp->gpu_ctx ? mp->gpu_ctx : MR_MIN(trained, 4096u);
    const uint32_t batch = MR_MIN(mp->gpu_batch ? mp->gpu_batch : 512, ctx);
    const uint64_t resident = resident_gpu_bytes(o, w);
    if (!resident)
        return mr_err(MOERUN_ERR_NOMEM, "offload: out of memory");
    /* the sessions' reservation: one session of ctx positions and batch tokens, with the
     * model's thread count (a CPU-side workspace has scores per thread) */
    const long cores = sysconf(_SC_NPROCESSORS_ONLN);
    const int threads = mp->n_threads > 0 ? mp->n_threads : cores > 0 ? (int)MR_MIN(cores, 512) : 1;
    struct mr_backend *probe = NULL;
    int rc = o->be->ops->clone(o->be, threads, &probe);
    if (rc != MOERUN_OK)
        return rc;
    const uint64_t sessions = align_up(session_backend_bytes(w, probe, ctx, batch), 256);
    mr_backend_destroy(probe);
    const uint64_t fixed = align_up(resident + sessions + 4096, SCHED_ALIGN);
    const uint64_t min_slots = sched_min_bytes(&sp, o->sections, o->n_sections);
    const uint64_t all = all_slots_bytes(o);
    uint64_t budget = mp->gpu_bytes;
    if (!budget) { /* what the device has free, less 1 GiB, at most the whole model */
        uint64_t total = 0, free_now = 0;
        rc = o->be->ops->mem_info(o->be, &total, &free_now);
        if (rc != MOERUN_OK)
            return rc;
        budget = fixed + all;
        if (free_now)
            budget = MR_MIN(budget, free_now > GIB ? free_now - GIB : 0);
    }
    if (budget < fixed + min_slots) {
        char b1[64], b2[64], b3[64], b4[64], b5[64];
        offload_fmt_bytes(b1, sizeof(b1), budget);
        offload_fmt_bytes(b2, sizeof(b2), fixed + min_slots);
        offload_fmt_bytes(b3, sizeof(b3), resident);
        offload_fmt_bytes(b4, sizeof(b4), sessions);
        offload_fmt_bytes(b5, sizeof(b5), min_slots);
        return mr_err(MOERUN_ERR_BUDGET,
                      "GPU budget of %s is below the minimum for this model, %s (routers, norms "
                      "and output %s + KV cache and scratch for %u positions, batch %u, %s + the "
                      "fewest slots %s)",
                      b1, b2, b3, ctx, batch, b4, b5);
    }
    const uint64_t slots = MR_MIN((budget - fixed) & ~(uint64_t)(SCHED_ALIGN - 1), all);
    budget = slots + fixed;
    rc = tier_device_create(o->be, budget, slots, &o->dev);
    if (rc != MOERUN_OK)
        return rc;
    if ((rc = upload_resident(o, w, path, resident)) != MOERUN_OK)
        return rc;
    m->cw = o->cw;

    sp.region = tier_device_base(o->dev);
    sp.region_bytes = slots;
    struct sched_loader loader = {load_section, o};
    if ((rc = sched_create(&sp, o->sections, o->n_sections, loader, &o->sched)) != MOERUN_OK)
        return rc;
    struct sched_layout lay;
    sched_get_layout(o->sched, &lay);
    if ((rc = tier_device_set_slots(o->dev, lay.n_dense_slots + lay.n_expert_slots)))
        return rc;
    if ((rc = open_stage(o, m, path)) != MOERUN_OK)
        return rc;
    struct stage_layout sl;
    stage_get_layout(o->stage, &sl);
    mr_log_info("offload: %s; GPU tier %.1f MiB (%u dense + %u expert slots%s), pinned host "
                "stage %.1f MiB (%s), O_DIRECT %s",
                o->be->ops->describe(o->be), budget / 1048576.0, lay.n_dense_slots,
                lay.n_expert_slots, lay.ring ? ", dense ring" : "",
                tier_host_bytes(o->host) / 1048576.0, sl.packed ? "the whole model" : "a cache",
                tier_nvme_is_direct(o->nvme) ? "on" : "off");
    return MOERUN_OK;
}

void offload_gpu_close(struct mr_offload *o) {
    if (!o->be)
        return;
    stage_destroy(o->stage); /* waits for its reads and uploads */
    o->stage = NULL;
    if (o->dev) {
        tier_device_unreserve(o->dev, o->dev_resident);
        tier_device_destroy(o->dev); /* waits for the copy stream */
        o->dev = NULL;
    }
    if (o->host_registered)
        o->be->ops->host_unregister(o->be, tier_host_base(o->host));
    o->host_registered = false;
    mr_free(o->a, o->cw_layers);
    mr_free(o->a, o->cw);
    mr_free(o->a, o->expert_slot);
    mr_free(o->a, o->dense_slot);
}

/* --- the forward pass's side ------------------------------------------------------------------ */

int offload_gpu_acquire(struct mr_offload *o, const void *base, int32_t *slot) {
    *slot = sched_slot_index(o->sched, base);
    if (*slot < 0)
        return mr_err(MOERUN_ERR_INTERNAL, "offload: %p is not a GPU slot", base);
    return tier_device_acquire(o->dev, (uint32_t)*slot);
}

void offload_gpu_release(struct mr_offload *o, int32_t slot) {
    int rc = tier_device_release(o->dev, (uint32_t)slot);
    if (rc != MOERUN_OK) /* the stream is broken: the next op on it reports it */
        mr_log_warn("offload: releasing GPU slot %d: %s", slot, moerun_errmsg());
}

bool offload_has_device(const struct mr_offload *o) {
    return o->dev != NULL;
}

int offload_device_reserve(struct mr_offload *o, uint64_t bytes, void **out) {
    return tier_device_reserve(o->dev, bytes, 256, out);
}

void offload_device_unreserve(struct mr_offload *o, void *p) {
    tier_device_unreserve(o->dev, p);
}

void offload_gpu_get_stats(const struct mr_offload *o, moerun_stats *st) {
    struct tier_device_stats ds;
    struct stage_stats ss;
    tier_device_get_stats(o->dev, &ds);
    stage_get_stats(o->stage, &ss);
    st->gpu_bytes = tier_device_bytes(o->dev);
    st->gpu_bytes_copied = ds.bytes_uploaded;
    st->gpu_copy_busy_ns = ds.busy_ns;
    st->copy_gbps = ds.busy_ns ? (double)ds.bytes_uploaded / (double)ds.busy_ns : 0.0;
    st->host_hits = ss.host_hits;
    st->host_misses = ss.host_misses;
}

void offload_gpu_load_figures(const struct mr_offload *o, double *copy_ns_per_byte,
                              double *miss_share) {
    struct tier_device_stats ds;
    struct stage_stats ss;
    tier_device_get_stats(o->dev, &ds);
    stage_get_stats(o->stage, &ss);
    *copy_ns_per_byte =
        ds.bytes_uploaded >= (1u << 20) ? (double)ds.busy_ns / (double)ds.bytes_uploaded : 0.0;
    const uint64_t loads = ss.host_hits + ss.host_misses;
    *miss_share = loads ? (double)ss.host_misses / (double)loads : 1.0;
}

void offload_gpu_reset_stats(struct mr_offload *o) {
    tier_device_reset_stats(o->dev);
    stage_reset_stats(o->stage);
}
