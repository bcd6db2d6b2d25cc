/* Stage: the host tier between the NVMe reader and the GPU tier (what and why in stage.h).
 *
 * State: host slots (hs[]) and, per section, its host slot and whether a device load of it is
 * with the stage (queued or reading). Host slot states: FREE, READING (pinned by the read; the
 * device load waiting for it is recorded in the slot), READY (the section's bytes; pinned once
 * per upload reading it). Tags: the reader's and the uploader's tag is the host slot index.
 * Queued requests wait in a FIFO per slot kind, linked through the sections (a section is in at
 * most one device load at a time, so one link each is enough and nothing is allocated later).
 *
 * Locking: st->mu guards everything; it is dropped around every call to the reader, the
 * uploader and done. st->busy counts completion threads inside the stage with it dropped, so
 * destroy waits for them. Queued requests are started only by the stage's thread (see stage.h
 * for why not by stage_upload_done's thread). */
#include "stage.h"

#include "internal.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define STAGE_MSG 384 /* bytes of a refused read's message carried to done */

enum { HS_FREE, HS_READING, HS_READY };
enum { KIND_DENSE, KIND_EXPERT };

struct hslot {
    uint64_t offset;   /* in the region, bytes */
    uint64_t last_use; /* tick of the last read or hit */
    int32_t sec;       /* section held (READING, READY), -1 = none */
    uint32_t pins;     /* the read in flight, uploads in flight */
    uint8_t state;
    void *dev_dst;    /* READING: the device load waiting for the read: its slot memory */
    uint64_t dev_tag; /* ... and the scheduler's tag */
};

struct sec_info {
    int32_t hslot; /* -1 = in no host slot */
    int32_t qnext; /* next queued section of its FIFO, -1 = last */
    bool busy;     /* a device load of it is with the stage (queued or reading) */
    void *q_dst;   /* queued: the device load */
    uint64_t q_tag;
};

struct fifo {
    int32_t head, tail; /* sections, -1 = empty */
    uint32_t n;
};

struct stage {
    struct stage_params p;
    struct sched_section *sections; /* [n_sections], a copy */
    struct sec_info *si;            /* [n_sections] */
    struct hslot *hs;               /* [n_hs]: packed: one per section; else dense then expert */
    uint32_t n_hs;
    bool packed;
    uint32_t n_dslots, n_eslots;
    uint64_t dslot_bytes, eslot_bytes;
    uint8_t *base;
    struct fifo q[2]; /* by KIND_* */
    uint64_t tick;
    uint32_t reads, uploads; /* in flight */
    uint32_t busy;           /* completion threads inside with the mutex dropped */
    bool stop;               /* the thread exits */
    bool thread_started;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t idle; /* destroy waits on it */
    pthread_cond_t work; /* the thread waits on it */
    struct stage_stats stats;
};

/* ---- sizes and layout ---------------------------------------------------------------------- */

static uint64_t round_align(uint64_t x) {
    if (x > UINT64_MAX - SCHED_ALIGN)
        return UINT64_MAX;
    uint64_t r = (x + SCHED_ALIGN - 1) & ~(uint64_t)(SCHED_ALIGN - 1);
    return r ? r : SCHED_ALIGN;
}

static uint64_t add_sat(uint64_t a, uint64_t b) {
    uint64_t r;
    return mr_add_overflow_u64(a, b, &r) ? UINT64_MAX : r;
}

/* a * b + c, or UINT64_MAX when it overflows */
static uint64_t mul_add_sat(uint64_t a, uint64_t b, uint64_t c) {
    uint64_t m;
    return mr_mul_overflow_u64(a, b, &m) ? UINT64_MAX : add_sat(m, c);
}

struct sizes {
    uint64_t dense, expert; /* slot sizes: the largest of each kind, rounded up */
    uint64_t packed;        /* every section with its own rounded size */
    uint64_t slots_min;     /* min(L, 2) dense + the fewest expert slots */
    uint64_t experts_min;   /* the fewest expert slots */
};

static void sizes_of(const struct sched_section *sections, uint32_t n_sections, uint32_t n_layer,
                     uint32_t n_expert, uint32_t max_in_flight, struct sizes *z) {
    memset(z, 0, sizeof(*z));
    for (uint32_t i = 0; i < n_sections; i++) {
        uint64_t r = round_align(sections[i].slot_bytes);
        z->packed = add_sat(z->packed, r);
        if (i < n_layer)
            z->dense = MR_MAX(z->dense, r);
        else
            z->expert = MR_MAX(z->expert, r);
    }
    if (!n_layer)
        z->dense = 0;
    if (!n_expert)
        z->expert = 0;
    const uint64_t all_experts = (uint64_t)n_layer * n_expert;
    const uint64_t ne = MR_MIN(MR_MAX(max_in_flight, 1u), all_experts);
    z->experts_min = mul_add_sat(ne, z->expert, 0);
    z->slots_min = mul_add_sat(MR_MIN(n_layer, 2u), z->dense, z->experts_min);
}

uint64_t stage_min_bytes(const struct sched_section *sections, uint32_t n_sections,
                         uint32_t n_layer, uint32_t n_expert, uint32_t max_in_flight) {
    if (!sections)
        return 0;
    struct sizes z;
    sizes_of(sections, n_sections, n_layer, n_expert, max_in_flight, &z);
    return MR_MIN(z.packed, z.slots_min);
}

static int check_args(const struct stage_params *p) {
    if (!p->sections || !p->reader.load || !p->uploader.upload || !p->done)
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "stage: create without sections, reader, uploader or done");
    if (p->n_layer == 0 || p->n_sections > INT32_MAX)
        return mr_err(MOERUN_ERR_INVALID_ARG, "stage: %u layers, %u sections", p->n_layer,
                      p->n_sections);
    if (mul_add_sat(p->n_layer, p->n_expert, p->n_layer) != p->n_sections)
        return mr_err(MOERUN_ERR_INVALID_ARG, "stage: %u sections for %u layers of %u experts",
                      p->n_sections, p->n_layer, p->n_expert);
    if (!p->region || ((uintptr_t)p->region & (SCHED_ALIGN - 1)))
        return mr_err(MOERUN_ERR_INVALID_ARG, "stage: region %p is not %u-byte aligned", p->region,
                      SCHED_ALIGN);
    return sched_check_sections(p->sections, p->n_sections, p->n_layer, p->n_expert, "stage");
}

/* Lay out the host slots (st->p set). Returns MOERUN_OK or MOERUN_ERR_BUDGET. */
static int layout(struct stage *st) {
    const struct stage_params *p = &st->p;
    struct sizes z;
    sizes_of(p->sections, p->n_sections, p->n_layer, p->n_expert, p->max_in_flight, &z);
    st->dslot_bytes = z.dense;
    st->eslot_bytes = z.expert;
    if (z.packed <= p->region_bytes) {
        st->packed = true;
        st->n_dslots = p->n_layer;
        st->n_eslots = p->n_sections - p->n_layer;
        st->n_hs = p->n_sections;
        return MOERUN_OK;
    }
    if (z.slots_min > p->region_bytes) {
        const uint64_t min = MR_MIN(z.packed, z.slots_min);
        return mr_err(MOERUN_ERR_BUDGET,
                      "stage: host region of %llu bytes is below the minimum of %llu bytes "
                      "(%.1f MiB: %u dense slots of %llu and %llu bytes of expert slots of %llu)",
                      (unsigned long long)p->region_bytes, (unsigned long long)min,
                      (double)min / (1024.0 * 1024.0), MR_MIN(p->n_layer, 2u),
                      (unsigned long long)z.dense, (unsigned long long)z.experts_min,
                      (unsigned long long)z.expert);
    }
    const uint64_t lmin = MR_MIN(p->n_layer, 2u);
    uint64_t nd;
    if (p->n_dense_slots)
        nd = MR_MIN(MR_MAX((uint64_t)p->n_dense_slots, lmin), (uint64_t)p->n_layer);
    else
        nd = mul_add_sat(p->n_layer, z.dense, z.experts_min) <= p->region_bytes ? p->n_layer : lmin;
    nd = MR_MIN(nd, (p->region_bytes - z.experts_min) / z.dense); /* >= lmin: slots_min fits */
    uint64_t ne = z.expert ? (p->region_bytes - nd * z.dense) / z.expert : 0;
    ne = MR_MIN(ne, (uint64_t)p->n_layer * p->n_expert);
    st->n_dslots = (uint32_t)nd;
    st->n_eslots = (uint32_t)ne;
    st->n_hs = st->n_dslots + st->n_eslots;
    return MOERUN_OK;
}

/* ---- host slots (mutex held) --------------------------------------------------------------- */

static uint64_t sec_bytes(const struct sched_section *c) {
    uint64_t b = 0;
    for (uint32_t r = 0; r < c->n_ranges; r++)
        b += c->ranges[r].bytes;
    return b;
}

static int kind_of(const struct stage *st, uint32_t sec) {
    return sec < st->p.n_layer ? KIND_DENSE : KIND_EXPERT;
}

/* A host slot to read sec into: its own (packed), a free one of its kind, else the least
 * recently used one that is not pinned. -1 when there is none. */
static int32_t pick(const struct stage *st, uint32_t sec) {
    if (st->packed)
        return st->hs[sec].pins ? -1 : (int32_t)sec;
    const bool dense = kind_of(st, sec) == KIND_DENSE;
    const uint32_t lo = dense ? 0 : st->n_dslots, hi = dense ? st->n_dslots : st->n_hs;
    int32_t best = -1;
    for (uint32_t i = lo; i < hi; i++) {
        const struct hslot *h = &st->hs[i];
        if (h->state == HS_FREE)
            return (int32_t)i;
        if (h->pins)
            continue;
        if (best < 0 || h->last_use < st->hs[best].last_use)
            best = (int32_t)i;
    }
    return best;
}

/* Put sec into host slot h (evicting what is there) for a read of the device load (dst, tag). */
static void claim(struct stage *st, uint32_t sec, int32_t h, void *dst, uint64_t tag) {
    struct hslot *s = &st->hs[h];
    if (s->sec >= 0) {
        st->si[s->sec].hslot = -1;
        st->stats.evictions++;
    }
    s->sec = (int32_t)sec;
    s->state = HS_READING;
    s->pins = 1;
    s->last_use = ++st->tick;
    s->dev_dst = dst;
    s->dev_tag = tag;
    st->si[sec].hslot = h;
    st->reads++;
}

/* Wake the stage's thread when requests are queued (a slot may have become free). */
static void kick(struct stage *st) {
    if (st->q[KIND_DENSE].n || st->q[KIND_EXPERT].n)
        pthread_cond_signal(&st->work);
}

/* A read that was refused or failed: the slot is left free, the device load leaves the stage. */
static void read_failed(struct stage *st, int32_t h) {
    struct hslot *s = &st->hs[h];
    st->si[s->sec].hslot = -1;
    st->si[s->sec].busy = false;
    s->sec = -1;
    s->state = HS_FREE;
    s->pins = 0;
    st->reads--;
    st->stats.read_errors++;
    kick(st);
    pthread_cond_broadcast(&st->idle);
}

static void fifo_push(struct stage *st, uint32_t sec) {
    struct fifo *f = &st->q[kind_of(st, sec)];
    st->si[sec].qnext = -1;
    if (f->tail >= 0)
        st->si[f->tail].qnext = (int32_t)sec;
    else
        f->head = (int32_t)sec;
    f->tail = (int32_t)sec;
    f->n++;
}

static void fifo_pop(struct stage *st, struct fifo *f) {
    f->head = st->si[f->head].qnext;
    if (f->head < 0)
        f->tail = -1;
    f->n--;
}

/* ---- reads and uploads (mutex NOT held) ---------------------------------------------------- */

static int start_read(struct stage *st, uint32_t sec, int32_t h) {
    return st->p.reader.load(st->p.reader.ctx, &st->sections[sec], st->base + st->hs[h].offset,
                             (uint64_t)h);
}

/* Enqueue the upload of sec from host slot h (pinned for it by the caller) to dst. On a refusal
 * the pin is dropped and the uploader's message is the thread's. Returns the uploader's
 * status. */
static int upload(struct stage *st, uint32_t sec, int32_t h, void *dst) {
    pthread_mutex_lock(&st->mu);
    st->uploads++;
    pthread_mutex_unlock(&st->mu);
    const struct sched_section *c = &st->sections[sec];
    int rc =
        st->p.uploader.upload(st->p.uploader.ctx, c, st->base + st->hs[h].offset, dst, (uint64_t)h);
    pthread_mutex_lock(&st->mu);
    if (rc == MOERUN_OK) {
        st->stats.uploads++;
        st->stats.bytes_uploaded += sec_bytes(c);
    } else {
        st->uploads--;
        st->hs[h].pins--;
        st->stats.upload_errors++;
        kick(st);
        pthread_cond_broadcast(&st->idle);
    }
    pthread_mutex_unlock(&st->mu);
    return rc;
}

/* ---- the loader ---------------------------------------------------------------------------- */

static int stage_load(void *ctx, const struct sched_section *sec, void *dst, uint64_t tag) {
    struct stage *st = ctx;
    if (!sec || !dst || sec->layer >= st->p.n_layer || sec->expert >= (int32_t)st->p.n_expert)
        return mr_err(MOERUN_ERR_INVALID_ARG, "stage: load of layer %u expert %d",
                      sec ? sec->layer : 0, sec ? sec->expert : 0);
    const uint32_t idx = sched_section_index(st->p.n_layer, st->p.n_expert, sec->layer,
                                             sec->expert < 0 ? -1 : sec->expert);
    struct sec_info *si = &st->si[idx];
    pthread_mutex_lock(&st->mu);
    if (si->busy) {
        pthread_mutex_unlock(&st->mu);
        return mr_err(MOERUN_ERR_INTERNAL,
                      "stage: layer %u expert %d loaded again before its load was done", sec->layer,
                      sec->expert);
    }
    int32_t h = si->hslot;
    if (h >= 0 && st->hs[h].state == HS_READY) { /* a hit */
        st->hs[h].pins++;
        st->hs[h].last_use = ++st->tick;
        st->stats.host_hits++;
        pthread_mutex_unlock(&st->mu);
        int rc = upload(st, idx, h, dst);
        if (rc == MOERUN_OK)
            st->p.done(st->p.done_user, tag, MOERUN_OK, NULL);
        return rc;
    }
    st->stats.host_misses++;
    si->busy = true;
    h = st->q[kind_of(st, idx)].n ? -1 : pick(st, idx); /* FIFO: queued requests go first */
    if (h < 0) {
        si->q_dst = dst;
        si->q_tag = tag;
        fifo_push(st, idx);
        st->stats.queued++;
        pthread_mutex_unlock(&st->mu);
        return MOERUN_OK;
    }
    claim(st, idx, h, dst, tag);
    pthread_mutex_unlock(&st->mu);
    int rc = start_read(st, idx, h);
    if (rc != MOERUN_OK) {
        pthread_mutex_lock(&st->mu);
        read_failed(st, h);
        pthread_mutex_unlock(&st->mu);
    }
    return rc;
}

struct sched_loader stage_loader(struct stage *st) {
    struct sched_loader l = {stage_load, st};
    return l;
}

/* ---- completions --------------------------------------------------------------------------- */

void stage_read_done(struct stage *st, uint64_t tag, int status, const char *msg) {
    if (!st)
        return;
    pthread_mutex_lock(&st->mu);
    if (tag >= st->n_hs || st->hs[tag].state != HS_READING) {
        pthread_mutex_unlock(&st->mu);
        mr_log_warn("stage: read completion for host slot %llu that is not reading",
                    (unsigned long long)tag);
        return;
    }
    const int32_t h = (int32_t)tag;
    struct hslot *s = &st->hs[h];
    const uint32_t sec = (uint32_t)s->sec;
    void *dst = s->dev_dst;
    const uint64_t dtag = s->dev_tag;
    st->busy++;
    if (status == MOERUN_OK) {
        s->state = HS_READY; /* the read's pin passes to the upload */
        st->reads--;
        st->si[sec].busy = false;
        st->stats.reads++;
        st->stats.bytes_read += sec_bytes(&st->sections[sec]);
        pthread_cond_broadcast(&st->idle);
        pthread_mutex_unlock(&st->mu);
        int rc = upload(st, sec, h, dst);
        st->p.done(st->p.done_user, dtag, rc, rc == MOERUN_OK ? NULL : moerun_errmsg());
    } else {
        read_failed(st, h);
        pthread_mutex_unlock(&st->mu);
        st->p.done(st->p.done_user, dtag, status, msg && *msg ? msg : moerun_status_str(status));
    }
    pthread_mutex_lock(&st->mu);
    st->busy--;
    pthread_cond_broadcast(&st->idle);
    pthread_mutex_unlock(&st->mu);
}

void stage_upload_done(struct stage *st, uint64_t tag, int status, const char *msg) {
    if (!st)
        return;
    pthread_mutex_lock(&st->mu);
    if (tag >= st->n_hs || st->hs[tag].pins == 0 || st->uploads == 0) {
        pthread_mutex_unlock(&st->mu);
        mr_log_warn("stage: upload completion for host slot %llu that has none in flight",
                    (unsigned long long)tag);
        return;
    }
    st->hs[tag].pins--;
    st->uploads--;
    if (status != MOERUN_OK)
        st->stats.upload_errors++;
    kick(st);
    pthread_cond_broadcast(&st->idle);
    pthread_mutex_unlock(&st->mu);
    if (status != MOERUN_OK)
        mr_log_warn("stage: upload from host slot %llu failed: %s", (unsigned long long)tag,
                    msg && *msg ? msg : moerun_status_str(status));
}

/* ---- the stage's thread: starts queued requests as host slots free ------------------------- */

/* Take the oldest queued request that has a host slot now (mutex held): *sec, *h. */
static bool take_queued(struct stage *st, uint32_t *sec, int32_t *h) {
    for (int k = 0; k < 2; k++) {
        struct fifo *f = &st->q[k];
        if (!f->n)
            continue;
        int32_t slot = pick(st, (uint32_t)f->head);
        if (slot < 0)
            continue;
        *sec = (uint32_t)f->head;
        *h = slot;
        fifo_pop(st, f);
        return true;
    }
    return false;
}

static void *stage_thread(void *arg) {
    struct stage *st = arg;
    pthread_mutex_lock(&st->mu);
    for (;;) {
        uint32_t sec;
        int32_t h;
        if (!take_queued(st, &sec, &h)) {
            if (st->stop)
                break;
            pthread_cond_wait(&st->work, &st->mu);
            continue;
        }
        const uint64_t dtag = st->si[sec].q_tag;
        claim(st, sec, h, st->si[sec].q_dst, dtag);
        pthread_mutex_unlock(&st->mu);
        int rc = start_read(st, sec, h);
        if (rc != MOERUN_OK) {
            char msg[STAGE_MSG];
            const char *m = moerun_errmsg();
            snprintf(msg, sizeof(msg), "%s", m && *m ? m : "reader refused the request");
            pthread_mutex_lock(&st->mu);
            read_failed(st, h);
            pthread_mutex_unlock(&st->mu);
            st->p.done(st->p.done_user, dtag, rc, msg);
        }
        pthread_mutex_lock(&st->mu);
    }
    pthread_mutex_unlock(&st->mu);
    return NULL;
}

/* ---- create / destroy, introspection ------------------------------------------------------- */

static void free_all(struct stage *st) {
    mr_free(NULL, st->sections);
    mr_free(NULL, st->si);
    mr_free(NULL, st->hs);
    mr_free(NULL, st);
}

int stage_create(const struct stage_params *p, struct stage **out) {
    if (!out)
        return mr_err(MOERUN_ERR_INVALID_ARG, "stage: create without out");
    *out = NULL;
    if (!p)
        return mr_err(MOERUN_ERR_INVALID_ARG, "stage: create without params");
    int rc = check_args(p);
    if (rc != MOERUN_OK)
        return rc;
    struct stage *st = mr_calloc(NULL, 1, sizeof(*st));
    if (!st)
        return mr_err(MOERUN_ERR_NOMEM, "stage: out of memory");
    st->p = *p;
    if ((rc = layout(st)) != MOERUN_OK) {
        free_all(st);
        return rc;
    }
    st->base = p->region;
    st->sections = mr_alloc(NULL, (size_t)p->n_sections * sizeof(*p->sections), 0);
    st->si = mr_calloc(NULL, p->n_sections, sizeof(*st->si));
    st->hs = mr_calloc(NULL, st->n_hs ? st->n_hs : 1, sizeof(*st->hs));
    if (!st->sections || !st->si || !st->hs) {
        free_all(st);
        return mr_err(MOERUN_ERR_NOMEM, "stage: out of memory for %u sections", p->n_sections);
    }
    memcpy(st->sections, p->sections, (size_t)p->n_sections * sizeof(*p->sections));
    st->p.sections = st->sections;
    for (uint32_t i = 0; i < p->n_sections; i++) {
        st->si[i].hslot = -1;
        st->si[i].qnext = -1;
    }
    uint64_t off = 0;
    for (uint32_t i = 0; i < st->n_hs; i++) {
        st->hs[i].sec = -1;
        st->hs[i].offset = off;
        if (st->packed)
            off += round_align(st->sections[i].slot_bytes);
        else
            off += i < st->n_dslots ? st->dslot_bytes : st->eslot_bytes;
    }
    for (int k = 0; k < 2; k++)
        st->q[k].head = st->q[k].tail = -1;
    if (pthread_mutex_init(&st->mu, NULL)) {
        free_all(st);
        return mr_err(MOERUN_ERR_NOMEM, "stage: pthread_mutex_init failed");
    }
    if (pthread_cond_init(&st->idle, NULL) || pthread_cond_init(&st->work, NULL)) {
        pthread_mutex_destroy(&st->mu);
        free_all(st); /* a condition variable that did init holds nothing on Linux */
        return mr_err(MOERUN_ERR_NOMEM, "stage: pthread_cond_init failed");
    }
    if (pthread_create(&st->thread, NULL, stage_thread, st)) {
        pthread_cond_destroy(&st->work);
        pthread_cond_destroy(&st->idle);
        pthread_mutex_destroy(&st->mu);
        free_all(st);
        return mr_err(MOERUN_ERR_NOMEM, "stage: cannot start its thread");
    }
    mr_log_debug("stage: %s, %u dense slots of %llu, %u expert slots of %llu bytes",
                 st->packed ? "every section in its place" : "cache", st->n_dslots,
                 (unsigned long long)st->dslot_bytes, st->n_eslots,
                 (unsigned long long)st->eslot_bytes);
    *out = st;
    return MOERUN_OK;
}

void stage_destroy(struct stage *st) {
    if (!st)
        return;
    pthread_mutex_lock(&st->mu);
    while (st->reads || st->uploads || st->busy || st->q[KIND_DENSE].n || st->q[KIND_EXPERT].n)
        pthread_cond_wait(&st->idle, &st->mu);
    st->stop = true;
    pthread_cond_signal(&st->work);
    pthread_mutex_unlock(&st->mu);
    pthread_join(st->thread, NULL);
    pthread_cond_destroy(&st->work);
    pthread_cond_destroy(&st->idle);
    pthread_mutex_destroy(&st->mu);
    free_all(st);
}

void stage_get_layout(const struct stage *st, struct stage_layout *out) {
    if (!st || !out)
        return;
    out->packed = st->packed;
    out->n_dense_slots = st->n_dslots;
    out->n_expert_slots = st->n_eslots;
    out->dense_slot_bytes = st->dslot_bytes;
    out->expert_slot_bytes = st->eslot_bytes;
}

void stage_get_stats(const struct stage *st, struct stage_stats *out) {
    if (!st || !out)
        return;
    struct stage *m = (struct stage *)st; /* the mutex is not part of the logical state */
    pthread_mutex_lock(&m->mu);
    *out = st->stats;
    pthread_mutex_unlock(&m->mu);
}

void stage_reset_stats(struct stage *st) {
    if (!st)
        return;
    pthread_mutex_lock(&st->mu);
    memset(&st->stats, 0, sizeof(st->stats));
    pthread_mutex_unlock(&st->mu);
}
