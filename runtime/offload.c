/* Offloading: resident parts, sections and their slot layout, and the glue between the
 * scheduler and the NVMe tier. */
#include "offload.h"
#include "offload_impl.h"
#include "internal.h"
#include "model.h"
#include "scheduler.h"
#include "tiers.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* Fields of struct mr_layer by where they live. */
static const size_t dense_fields[] = {
    offsetof(struct mr_layer, attn_norm),   offsetof(struct mr_layer, wq),
    offsetof(struct mr_layer, wk),          offsetof(struct mr_layer, wv),
    offsetof(struct mr_layer, wo),          offsetof(struct mr_layer, bq),
    offsetof(struct mr_layer, bk),          offsetof(struct mr_layer, bv),
    offsetof(struct mr_layer, q_norm),      offsetof(struct mr_layer, k_norm),
    offsetof(struct mr_layer, sh_gate_inp), offsetof(struct mr_layer, sh_gate),
    offsetof(struct mr_layer, sh_up),       offsetof(struct mr_layer, sh_down),
};
static const size_t resident_fields[] = {
    offsetof(struct mr_layer, ffn_norm), /* the router and its norm: predictions never wait */
    offsetof(struct mr_layer, router),
};
static const size_t expert_fields[3] = {
    offsetof(struct mr_layer, gate_exps),
    offsetof(struct mr_layer, up_exps),
    offsetof(struct mr_layer, down_exps),
};

uint64_t offload_tensor_bytes(const struct mr_weight *w) {
    return w->matrix_bytes * w->ne[2] * w->ne[3];
}

static uint64_t file_offset(const struct mr_weight *w) {
    return (uint64_t)(uintptr_t)w->data; /* bound but not yet placed: the file offset */
}

/* Append a range to a section: its span is read to the slot at *cursor. Returns the offset of
 * the tensor's first byte in the slot. */
static uint64_t section_add(struct sched_section *sec, uint64_t off, uint64_t len) {
    struct tier_span sp = tier_span_of(off, len);
    struct sched_range *r = &sec->ranges[sec->n_ranges++];
    r->file_offset = sp.offset;
    r->bytes = sp.bytes;
    r->slot_offset = sec->slot_bytes;
    sec->slot_bytes += sp.bytes;
    return r->slot_offset + sp.slack;
}

static void build_sections(struct mr_offload *o, const struct mr_weights *w) {
    const uint32_t L = o->n_layer, E = o->n_expert;
    for (uint32_t il = 0; il < L; il++) {
        const struct mr_layer *l = &w->layers[il];
        struct sched_section *sec = &o->sections[sched_section_index(L, E, il, -1)];
        sec->layer = il;
        sec->expert = -1;
        o->dense_at[il] = *l;
        for (size_t i = 0; i < MR_ARRAY_LEN(dense_fields); i++) {
            const struct mr_weight *f = OFFLOAD_FIELD(l, dense_fields[i]);
            if (!f->row_bytes)
                continue;
            uint64_t at = section_add(sec, file_offset(f), offload_tensor_bytes(f));
            OFFLOAD_FIELD(&o->dense_at[il], dense_fields[i])->data = (const uint8_t *)(uintptr_t)at;
        }
        for (uint32_t e = 0; e < E; e++) {
            const uint32_t idx = sched_section_index(L, E, il, (int32_t)e);
            sec = &o->sections[idx];
            sec->layer = il;
            sec->expert = (int32_t)e;
            for (int k = 0; k < 3; k++) {
                const struct mr_weight *f = OFFLOAD_FIELD(l, expert_fields[k]);
                o->expert_at[il * E + e][k] =
                    section_add(sec, file_offset(f) + e * f->matrix_bytes, f->matrix_bytes);
            }
        }
    }
}

size_t offload_resident_max(uint32_t n_layer) {
    return 3 + MR_ARRAY_LEN(resident_fields) * (size_t)n_layer;
}

size_t offload_resident_list(struct mr_weights *w, bool embeddings, struct mr_weight **list) {
    size_t n = 0;
    if (embeddings)
        list[n++] = &w->tok_embd;
    list[n++] = &w->output_norm;
    /* a tied output is the embeddings' bytes: read once with them, but a list without the
     * embeddings (the GPU's) needs it */
    if (!embeddings || w->output.data != w->tok_embd.data)
        list[n++] = &w->output;
    for (uint32_t il = 0; il < w->hp.n_layer; il++)
        for (size_t i = 0; i < MR_ARRAY_LEN(resident_fields); i++)
            list[n++] = OFFLOAD_FIELD(&w->layers[il], resident_fields[i]);
    return n;
}

int offload_read_tensors(const struct mr_offload *o, const char *path,
                         struct mr_weight *const *list, size_t n, uint8_t **buf, uint64_t *bytes) {
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += offload_piece_bytes(offload_tensor_bytes(list[i]));
    *bytes = total;
    *buf = mr_alloc(o->a, total ? total : 64, 64);
    if (!*buf)
        return mr_err(MOERUN_ERR_NOMEM, "offload: cannot allocate %llu bytes of resident weights",
                      (unsigned long long)total);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return mr_err_errno(errno, "offload: open");
    int rc = MOERUN_OK;
    uint64_t at = 0;
    for (size_t i = 0; i < n && rc == MOERUN_OK; i++) {
        const uint64_t nb = offload_tensor_bytes(list[i]), off = file_offset(list[i]);
        for (uint64_t done = 0; done < nb && rc == MOERUN_OK;) {
            ssize_t got = pread(fd, *buf + at + done, nb - done, (off_t)(off + done));
            if (got < 0 && errno == EINTR)
                continue;
            if (got < 0)
                rc = mr_err_errno(errno, "offload: reading resident weights");
            else if (got == 0)
                rc = mr_err(MOERUN_ERR_FORMAT, "offload: the file ends early");
            else
                done += (uint64_t)got;
        }
        at += offload_piece_bytes(nb);
    }
    close(fd);
    return rc;
}

/* Read the tensors the host keeps for the whole run and point the weights at them: all the
 * resident ones on the CPU; with a GPU, only the token embeddings (the GPU has the rest). */
static int read_resident(struct mr_offload *o, struct mr_weights *w, const char *path, bool gpu) {
    struct mr_weight **list = mr_calloc(o->a, offload_resident_max(o->n_layer), sizeof(*list));
    if (!list)
        return mr_err(MOERUN_ERR_NOMEM, "offload: out of memory");
    const bool tied = file_offset(&w->output) == file_offset(&w->tok_embd);
    size_t n = 1;
    list[0] = &w->tok_embd;
    if (!gpu)
        n = offload_resident_list(w, true, list);
    int rc = offload_read_tensors(o, path, list, n, &o->resident, &o->resident_bytes);
    uint64_t at = 0;
    for (size_t i = 0; i < n && rc == MOERUN_OK; i++) {
        list[i]->data = o->resident + at;
        at += offload_piece_bytes(offload_tensor_bytes(list[i]));
    }
    if (rc == MOERUN_OK && tied && !gpu)
        w->output = w->tok_embd;
    mr_free(o->a, list);
    return rc;
}

static void on_read_done(void *user, uint64_t tag, int status, const char *msg) {
    struct mr_offload *o = user;
    sched_load_done(o->sched, tag, status, msg);
}

int offload_read_section(void *ctx, const struct sched_section *sec, void *dst, uint64_t tag) {
    struct mr_offload *o = ctx;
    struct tier_read reads[SCHED_MAX_RANGES];
    for (uint32_t i = 0; i < sec->n_ranges; i++) {
        reads[i].offset = sec->ranges[i].file_offset;
        reads[i].bytes = sec->ranges[i].bytes;
        reads[i].dst = (uint8_t *)dst + sec->ranges[i].slot_offset;
    }
    return tier_nvme_submit(o->nvme, reads, sec->n_ranges, tag);
}

void offload_fmt_bytes(char *buf, size_t size, uint64_t b) {
    snprintf(buf, size, "%llu bytes (%.1f MiB)", (unsigned long long)b, b / 1048576.0);
}

static int open_host_slots(struct mr_offload *o, struct moerun_model *m, const char *path);

int offload_open(struct moerun_model *m, const char *path) {
    struct mr_weights *w = m->w;
    const moerun_allocator *a = m->params.allocator;
    struct mr_offload *o = mr_calloc(a, 1, sizeof(*o));
    if (!o)
        return mr_err(MOERUN_ERR_NOMEM, "offload: out of memory");
    m->offload = o;
    o->a = a;
    o->n_layer = w->hp.n_layer;
    o->n_expert = w->hp.n_expert;
    o->prefetch_layers = m->params.prefetch_layers > 0 ? m->params.prefetch_layers : 1;
    o->prefetch = m->params.prefetch;
    pthread_mutex_init(&o->run_lock, NULL);
    if (o->n_layer > 4096)
        return mr_err(MOERUN_ERR_UNSUPPORTED, "offload: more than 4096 layers");
    if (m->params.policy < MOERUN_POLICY_LRU || m->params.policy > MOERUN_POLICY_PREDICTED)
        return mr_err(MOERUN_ERR_INVALID_ARG, "offload: unknown eviction policy %d",
                      m->params.policy);
    if (m->params.prefetch < MOERUN_PREFETCH_OFF || m->params.prefetch > MOERUN_PREFETCH_AUTO)
        return mr_err(MOERUN_ERR_INVALID_ARG, "offload: unknown prefetch mode %d",
                      m->params.prefetch);
    o->n_sections = o->n_layer + o->n_layer * o->n_expert;
    o->sections = mr_calloc(a, o->n_sections, sizeof(*o->sections));
    o->dense_at = mr_calloc(a, o->n_layer, sizeof(*o->dense_at));
    o->expert_at = mr_calloc(a, (size_t)o->n_layer * o->n_expert, sizeof(*o->expert_at));
    if (!o->sections || !o->dense_at || !o->expert_at)
        return mr_err(MOERUN_ERR_NOMEM, "offload: out of memory for %u sections", o->n_sections);
    build_sections(o, w);

    const bool gpu = m->params.device != MOERUN_DEVICE_CPU;
    int rc = read_resident(o, w, path, gpu);
    if (rc != MOERUN_OK)
        return rc;
    if (gpu)
        return offload_gpu_open(o, m, path);
    return open_host_slots(o, m, path);
}

/* The CPU computes from host slots filled by the NVMe tier. */
static int open_host_slots(struct mr_offload *o, struct moerun_model *m, const char *path) {
    const struct mr_weights *w = m->w;
    int rc;
    struct sched_params sp = {
        .n_layer = o->n_layer,
        .n_expert = o->n_expert,
        .n_expert_used = w->hp.n_expert_used,
        .policy = (enum sched_policy)m->params.policy,
        .prefetch = (enum sched_prefetch)m->params.prefetch,
        .prefetch_when_idle = true,
    };
    const uint64_t min_slots = sched_min_bytes(&sp, o->sections, o->n_sections);
    const uint64_t need = o->resident_bytes + min_slots;
    if (m->params.host_bytes < need) {
        char b1[64], b2[64], b3[64], b4[64];
        offload_fmt_bytes(b1, sizeof(b1), m->params.host_bytes);
        offload_fmt_bytes(b2, sizeof(b2), need);
        offload_fmt_bytes(b3, sizeof(b3), o->resident_bytes);
        offload_fmt_bytes(b4, sizeof(b4), min_slots);
        return mr_err(MOERUN_ERR_BUDGET,
                      "host budget of %s is below the minimum for this model, %s (resident "
                      "embeddings, output and routers %s + the fewest slots %s)",
                      b1, b2, b3, b4);
    }
    const uint64_t region =
        (m->params.host_bytes - o->resident_bytes) & ~(uint64_t)(TIER_ALIGN - 1);
    struct tier_host_params hp = {.bytes = region, .huge_pages = true, .bind_numa = true};
    if ((rc = tier_host_create(&hp, &o->host)) != MOERUN_OK)
        return rc;
    struct tier_nvme_params np = {
        .queue_depth = 64,
        .direct = m->params.direct_io != 0,
        .region = tier_host_base(o->host),
        .region_bytes = tier_host_bytes(o->host),
        .done = on_read_done,
        .user = o,
    };
    if ((rc = tier_nvme_open(path, &np, &o->nvme)) != MOERUN_OK)
        return rc;
    sp.region = tier_host_base(o->host);
    sp.region_bytes = tier_host_bytes(o->host);
    struct sched_loader loader = {offload_read_section, o};
    if ((rc = sched_create(&sp, o->sections, o->n_sections, loader, &o->sched)) != MOERUN_OK)
        return rc;
    mr_log_info("offload: host tier %s (%s), resident %llu bytes, O_DIRECT %s",
                tier_host_describe(o->host), path, (unsigned long long)o->resident_bytes,
                tier_nvme_is_direct(o->nvme) ? "on" : "off");
    return MOERUN_OK;
}

void offload_close(struct moerun_model *m) {
    struct mr_offload *o = m->offload;
    if (!o)
        return;
    sched_destroy(o->sched); /* waits for the loads in flight */
    offload_gpu_close(o);    /* the stage and the GPU tier (nothing without a GPU) */
    tier_nvme_close(o->nvme);
    tier_host_destroy(o->host);
    pthread_mutex_destroy(&o->run_lock);
    mr_free(o->a, o->resident);
    mr_free(o->a, o->expert_at);
    mr_free(o->a, o->dense_at);
    mr_free(o->a, o->sections);
    mr_free(o->a, o);
    m->offload = NULL;
}

void offload_lock(struct mr_offload *o) {
    pthread_mutex_lock(&o->run_lock);
}

void offload_unlock(struct mr_offload *o) {
    pthread_mutex_unlock(&o->run_lock);
}

int offload_layer_acquire(struct mr_offload *o, uint32_t il, struct mr_layer *view) {
    const void *base;
    int rc = sched_dense_acquire(o->sched, il, &base);
    if (rc == MOERUN_OK && o->dev && (rc = offload_gpu_acquire(o, base, &o->dense_slot[il])))
        sched_dense_release(o->sched, il);
    if (rc != MOERUN_OK)
        return rc;
    *view = o->dense_at[il];
    for (size_t i = 0; i < MR_ARRAY_LEN(dense_fields); i++) {
        struct mr_weight *f = OFFLOAD_FIELD(view, dense_fields[i]);
        if (f->row_bytes)
            f->data = (const uint8_t *)base + (uintptr_t)f->data;
    }
    return MOERUN_OK;
}

void offload_layer_release(struct mr_offload *o, uint32_t il) {
    if (o->dev)
        offload_gpu_release(o, o->dense_slot[il]);
    sched_dense_release(o->sched, il);
}

/* ns per byte from bytes moved in busy_ns, or 0 below 1 MiB (not measured yet) */
static double per_byte(uint64_t busy_ns, uint64_t bytes) {
    return bytes >= (1u << 20) ? (double)busy_ns / (double)bytes : 0.0;
}

/* The cost of loading for prefetch's AUTO mode: the disk's; with a GPU, the copy's plus the
 * disk's for the share of loads the host tier misses. */
static double load_cost(const struct mr_offload *o) {
    struct tier_nvme_stats ns;
    tier_nvme_get_stats(o->nvme, &ns);
    const double disk = per_byte(ns.busy_ns, ns.bytes_read);
    if (!o->dev)
        return disk;
    double copy, miss_share;
    offload_gpu_load_figures(o, &copy, &miss_share);
    return copy > 0.0 ? copy + miss_share * disk : 0.0;
}

int offload_experts_request(struct mr_offload *o, uint32_t il, const int32_t *experts, uint32_t n) {
    if (o->prefetch == MOERUN_PREFETCH_AUTO)
        sched_set_load_cost(o->sched, load_cost(o));
    return sched_experts_request(o->sched, il, experts, n);
}

int offload_experts_next(struct mr_offload *o, uint32_t il, int32_t *expert,
                         struct mr_expert_ptrs *p) {
    const void *base;
    int rc = sched_experts_next(o->sched, il, expert, &base);
    if (rc == MOERUN_OK && o->dev && (rc = offload_gpu_acquire(o, base, &o->expert_slot[*expert])))
        sched_expert_release(o->sched, il, *expert);
    if (rc != MOERUN_OK)
        return rc;
    const uint64_t *at = o->expert_at[il * o->n_expert + (uint32_t)*expert];
    p->gate = (const uint8_t *)base + at[0];
    p->up = (const uint8_t *)base + at[1];
    p->down = (const uint8_t *)base + at[2];
    return MOERUN_OK;
}

void offload_expert_release(struct mr_offload *o, uint32_t il, int32_t expert) {
    if (o->dev)
        offload_gpu_release(o, o->expert_slot[expert]);
    sched_expert_release(o->sched, il, expert);
}

void offload_predict(struct mr_offload *o, uint32_t il, const float *probs) {
    sched_predict(o->sched, il, probs);
}

int offload_prefetch_layers(const struct mr_offload *o) {
    /* when every section has a slot of its own nothing is ever evicted: predictions could only
     * cost (on a GPU, a wait for the host per layer) */
    struct sched_layout lay;
    sched_get_layout(o->sched, &lay);
    if (!lay.ring && lay.n_expert_slots >= o->n_layer * o->n_expert)
        return 0;
    return o->prefetch_layers;
}

void offload_get_stats(const struct mr_offload *o, moerun_stats *out) {
    struct sched_stats ss;
    struct tier_nvme_stats ns;
    sched_get_stats(o->sched, &ss);
    tier_nvme_get_stats(o->nvme, &ns);
    ns.bytes_read -= o->nvme_base.bytes_read; /* since the last reset */
    ns.busy_ns -= o->nvme_base.busy_ns;
    moerun_stats st;
    memset(&st, 0, sizeof(st));
    st.struct_size = sizeof(st);
    st.host_bytes = tier_host_bytes(o->host) + o->resident_bytes;
    struct sched_layout lay;
    sched_get_layout(o->sched, &lay);
    st.slot_bytes_dense = lay.dense_slot_bytes;
    st.slots_dense = lay.n_dense_slots;
    st.slot_bytes_expert = lay.expert_slot_bytes;
    st.slots_expert = lay.n_expert_slots;
    st.nvme_bytes_read = ns.bytes_read;
    st.nvme_busy_ns = ns.busy_ns;
    st.expert_hits = ss.expert_hits;
    st.expert_misses = ss.expert_misses;
    st.dense_hits = ss.dense_hits;
    st.dense_misses = ss.dense_misses;
    st.prefetch_issued = ss.prefetch_issued;
    st.prefetch_used = ss.prefetch_used;
    st.prefetch_cancelled = ss.prefetch_cancelled;
    st.prediction_precision = ss.predicted ? (double)ss.predicted_correct / ss.predicted : 0.0;
    st.prediction_recall = ss.needed ? (double)ss.predicted_correct / ss.needed : 0.0;
    st.predicted = ss.predicted;
    st.prefetch_skipped = ss.prefetch_skipped;
    st.prefetch_on = ss.prefetch_on;
    st.layer_compute_ns = ss.layer_compute_ns;
    st.wrong_load_ns = ss.wrong_load_ns;
    st.stall_ns = ss.stall_ns;
    st.read_gbps = ns.busy_ns ? (double)ns.bytes_read / (double)ns.busy_ns : 0.0;
    st.direct_io = tier_nvme_is_direct(o->nvme);
    st.n_layer = o->n_layer;
    st.layer_hits = ss.layer_hits;
    st.layer_misses = ss.layer_misses;
    if (o->dev)
        offload_gpu_get_stats(o, &st);
    size_t n = MR_MIN(out->struct_size, sizeof(st));
    memcpy(out, &st, n);
    out->struct_size = n;
}

void offload_reset_stats(struct mr_offload *o) {
    sched_reset_stats(o->sched);
    tier_nvme_get_stats(o->nvme, &o->nvme_base);
    if (o->dev)
        offload_gpu_reset_stats(o);
}
