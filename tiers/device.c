/* GPU tier: one device allocation carved into the slot region and reserved blocks, and the
 * uploads into slots ordered by per-slot events (what and why in device.h).
 *
 * Callbacks: one host callback per upload on the copy stream, with the tier as its argument.
 * The copy stream runs its work in order, so the callbacks come in the order the uploads were
 * enqueued: the pending uploads (tag, done, user, bytes) wait in a FIFO ring, allocated with the
 * slots, and each callback takes the oldest.
 *
 * Locks: d->mu serializes this tier's calls on the backend (uploads from several threads,
 * acquire and release from the compute thread) and the allocator; d->ring_mu guards the ring and
 * the upload counters and is the only lock a callback takes, and it is never held while calling
 * the backend. Order: mu, then ring_mu. */
#include "device.h"

#include "internal.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define DEVICE_ALIGN 256u /* default alignment of reserved blocks */

struct block {
    uint64_t off, bytes; /* from base */
};

struct pending {
    uint64_t tag;
    tier_done_fn done;
    void *user;
    uint64_t bytes;
};

struct tier_device {
    struct mr_backend *be;
    uint8_t *base;
    uint64_t bytes;
    uint64_t slot0;       /* the slot region's offset from base: base rounded up to TIER_ALIGN */
    uint64_t slots_bytes; /* the slot region [slot0, slot0 + slots_bytes) */
    uint64_t floor;       /* the allocator's: slot0 + slots_bytes */
    bool slots_set;       /* the slots' events exist */

    struct block *blk; /* reserved, sorted by off */
    uint32_t n_blk, cap_blk;

    uint32_t n_slots;
    struct mr_event **ready, **freed; /* [n_slots] */

    uint64_t attempts; /* tier_device_upload calls with valid arguments */
    uint64_t fault_nth;

    struct pending *ring; /* [ring_cap] */
    uint32_t ring_cap, ring_head, ring_n;
    uint64_t busy_t0;
    struct tier_device_stats st; /* the counters (ring_mu) */

    pthread_mutex_t mu;
    pthread_mutex_t ring_mu;
    pthread_cond_t ring_cv; /* room in the ring; the ring empty */
};

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- create / destroy ---------------------------------------------------------------------- */

int tier_device_create(struct mr_backend *be, uint64_t bytes, uint64_t slots_bytes,
                       struct tier_device **out) {
    if (!out)
        return mr_err(MOERUN_ERR_INVALID_ARG, "device tier: create without out");
    *out = NULL;
    if (!be || !be->ops || bytes == 0)
        return mr_err(MOERUN_ERR_INVALID_ARG, "device tier: create with no backend or 0 bytes");
    struct tier_device *d = mr_calloc(NULL, 1, sizeof(*d));
    if (!d)
        return mr_err(MOERUN_ERR_NOMEM, "device tier: out of memory");
    d->be = be;
    d->bytes = bytes;
    d->fault_nth = UINT64_MAX;
    d->cap_blk = 64;
    d->blk = mr_calloc(NULL, d->cap_blk, sizeof(*d->blk));
    int rc = MOERUN_ERR_NOMEM;
    void *p = NULL;
    if (!d->blk || pthread_mutex_init(&d->mu, NULL)) {
        mr_err(rc, "device tier: out of memory");
        goto out_free;
    }
    if (pthread_mutex_init(&d->ring_mu, NULL) || pthread_cond_init(&d->ring_cv, NULL)) {
        mr_err(rc, "device tier: cannot create its locks"); /* (on Linux neither can fail) */
        goto out_mu;
    }
    rc = be->ops->alloc(be, bytes, &p);
    if (rc == MOERUN_OK && !p)
        rc = mr_err(MOERUN_ERR_BACKEND, "device tier: the backend returned no memory");
    if (rc != MOERUN_OK)
        goto out_cv;
    d->base = p;
    d->slot0 = (uint64_t)(-(uintptr_t)p & (TIER_ALIGN - 1));
    if (d->slot0 > bytes || slots_bytes > bytes - d->slot0) {
        rc = mr_err(MOERUN_ERR_BUDGET,
                    "device tier: %llu bytes of slots do not fit in %llu bytes (%llu of them "
                    "align the slots to %u)",
                    (unsigned long long)slots_bytes, (unsigned long long)bytes,
                    (unsigned long long)d->slot0, TIER_ALIGN);
        be->ops->free(be, p);
        goto out_cv;
    }
    d->slots_bytes = slots_bytes;
    d->floor = d->slot0 + slots_bytes;
    mr_log_debug("device tier: %llu bytes at %p (%s)", (unsigned long long)bytes, p, be->ops->name);
    *out = d;
    return MOERUN_OK;

out_cv:
    pthread_cond_destroy(&d->ring_cv);
    pthread_mutex_destroy(&d->ring_mu);
out_mu:
    pthread_mutex_destroy(&d->mu);
out_free:
    mr_free(NULL, d->blk);
    mr_free(NULL, d);
    return rc;
}

static void destroy_events(struct tier_device *d) {
    for (uint32_t i = 0; i < d->n_slots; i++) {
        if (d->ready)
            d->be->ops->event_destroy(d->be, d->ready[i]);
        if (d->freed)
            d->be->ops->event_destroy(d->be, d->freed[i]);
    }
    mr_free(NULL, d->ready);
    mr_free(NULL, d->freed);
    d->ready = d->freed = NULL;
}

void tier_device_destroy(struct tier_device *d) {
    if (!d)
        return;
    pthread_mutex_lock(&d->ring_mu);
    const bool pending = d->ring_n != 0;
    pthread_mutex_unlock(&d->ring_mu);
    if (pending)
        d->be->ops->sync(d->be, MR_STREAM_COPY); /* its error, if any, was reported before */
    pthread_mutex_lock(&d->ring_mu);
    while (d->ring_n) /* callbacks still running */
        pthread_cond_wait(&d->ring_cv, &d->ring_mu);
    pthread_mutex_unlock(&d->ring_mu);
    destroy_events(d);
    d->be->ops->free(d->be, d->base);
    pthread_cond_destroy(&d->ring_cv);
    pthread_mutex_destroy(&d->ring_mu);
    pthread_mutex_destroy(&d->mu);
    mr_free(NULL, d->ring);
    mr_free(NULL, d->blk);
    mr_free(NULL, d);
}

void *tier_device_base(const struct tier_device *d) {
    return d ? d->base + d->slot0 : NULL;
}

uint64_t tier_device_bytes(const struct tier_device *d) {
    return d ? d->bytes : 0;
}

/* ---- the allocator (d->mu held) ------------------------------------------------------------ */

/* The free gap before block i (i = n_blk: the last gap), from the floor at least: [*lo, *hi). */
static void gap(const struct tier_device *d, uint32_t i, uint64_t *lo, uint64_t *hi) {
    *lo = i ? d->blk[i - 1].off + d->blk[i - 1].bytes : 0;
    *hi = i < d->n_blk ? d->blk[i].off : d->bytes;
    if (*lo < d->floor)
        *lo = d->floor;
    if (*hi < *lo)
        *hi = *lo;
}

static void free_figures(const struct tier_device *d, uint64_t *total, uint64_t *largest) {
    *total = *largest = 0;
    for (uint32_t i = 0; i <= d->n_blk; i++) {
        uint64_t lo, hi;
        gap(d, i, &lo, &hi);
        *total += hi - lo;
        *largest = MR_MAX(*largest, hi - lo);
    }
}

int tier_device_reserve(struct tier_device *d, uint64_t bytes, uint64_t align, void **out) {
    if (!d || !out)
        return mr_err(MOERUN_ERR_INVALID_ARG, "device tier: reserve without tier or out");
    *out = NULL;
    if (!align)
        align = DEVICE_ALIGN;
    if (!bytes || (align & (align - 1)))
        return mr_err(MOERUN_ERR_INVALID_ARG, "device tier: reserve of %llu bytes aligned to %llu",
                      (unsigned long long)bytes, (unsigned long long)align);
    pthread_mutex_lock(&d->mu);
    int rc = MOERUN_OK;
    if (d->n_blk == d->cap_blk) {
        struct block *nb = mr_calloc(NULL, (size_t)d->cap_blk * 2, sizeof(*nb));
        if (!nb) {
            rc = mr_err(MOERUN_ERR_NOMEM, "device tier: out of memory for its block table");
            goto out_unlock;
        }
        memcpy(nb, d->blk, d->n_blk * sizeof(*nb));
        mr_free(NULL, d->blk);
        d->blk = nb;
        d->cap_blk *= 2;
    }
    const uintptr_t base = (uintptr_t)d->base;
    for (uint32_t i = d->n_blk + 1; i-- > 0;) { /* the highest gap first */
        uint64_t lo, hi;
        gap(d, i, &lo, &hi);
        if (hi - lo < bytes)
            continue;
        uint64_t addr = ((uint64_t)base + hi - bytes) & ~(align - 1);
        if (addr < (uint64_t)base + lo)
            continue;
        memmove(&d->blk[i + 1], &d->blk[i], (d->n_blk - i) * sizeof(*d->blk));
        d->blk[i].off = addr - base;
        d->blk[i].bytes = bytes;
        d->n_blk++;
        *out = (void *)(uintptr_t)addr;
        goto out_unlock;
    }
    uint64_t total, largest;
    free_figures(d, &total, &largest);
    rc = mr_err(MOERUN_ERR_BUDGET,
                "device tier: cannot reserve %llu bytes (%.1f MiB, aligned to %llu): %llu bytes "
                "(%.1f MiB) are free above the %llu bytes of slots, the largest block %llu bytes",
                (unsigned long long)bytes, bytes / 1048576.0, (unsigned long long)align,
                (unsigned long long)total, total / 1048576.0, (unsigned long long)d->floor,
                (unsigned long long)largest);
out_unlock:
    pthread_mutex_unlock(&d->mu);
    return rc;
}

void tier_device_unreserve(struct tier_device *d, void *p) {
    if (!d || !p)
        return;
    pthread_mutex_lock(&d->mu);
    const uint64_t off = (uint64_t)((uintptr_t)p - (uintptr_t)d->base);
    for (uint32_t i = 0; i < d->n_blk; i++) {
        if (d->blk[i].off == off && (uintptr_t)p >= (uintptr_t)d->base) {
            memmove(&d->blk[i], &d->blk[i + 1], (d->n_blk - i - 1) * sizeof(*d->blk));
            d->n_blk--;
            pthread_mutex_unlock(&d->mu);
            return;
        }
    }
    pthread_mutex_unlock(&d->mu);
    mr_log_error("device tier: unreserve of %p, which reserve did not return (ignored)", p);
}

/* ---- slots --------------------------------------------------------------------------------- */

int tier_device_set_slots(struct tier_device *d, uint32_t n_slots) {
    if (!d || !n_slots)
        return mr_err(MOERUN_ERR_INVALID_ARG, "device tier: %u slots", n_slots);
    pthread_mutex_lock(&d->mu);
    int rc = MOERUN_OK;
    if (d->slots_set) {
        rc = mr_err(MOERUN_ERR_INVALID_ARG, "device tier: the slots are already set");
        goto out_unlock;
    }
    d->ready = mr_calloc(NULL, n_slots, sizeof(*d->ready));
    d->freed = mr_calloc(NULL, n_slots, sizeof(*d->freed));
    const uint64_t cap = 2 * (uint64_t)n_slots + 64;
    d->ring = cap <= UINT32_MAX ? mr_calloc(NULL, cap, sizeof(*d->ring)) : NULL;
    if (!d->ready || !d->freed || !d->ring) {
        rc = mr_err(MOERUN_ERR_NOMEM, "device tier: out of memory for %u slots", n_slots);
        goto out_undo;
    }
    d->n_slots = n_slots;
    for (uint32_t i = 0; i < n_slots && rc == MOERUN_OK; i++) {
        rc = d->be->ops->event_create(d->be, &d->ready[i]);
        if (rc == MOERUN_OK)
            rc = d->be->ops->event_create(d->be, &d->freed[i]);
    }
    if (rc != MOERUN_OK)
        goto out_undo;
    d->ring_cap = (uint32_t)cap;
    d->slots_set = true;
    goto out_unlock;

out_undo:
    destroy_events(d); /* event_destroy(NULL) is a no-op */
    d->n_slots = 0;
    mr_free(NULL, d->ring);
    d->ring = NULL;
out_unlock:
    pthread_mutex_unlock(&d->mu);
    return rc;
}

/* ---- uploads ------------------------------------------------------------------------------- */

/* The copy stream reached the oldest pending upload's callback (a backend thread). */
static void on_copied(void *arg) {
    struct tier_device *d = arg;
    pthread_mutex_lock(&d->ring_mu);
    if (!d->ring_n) { /* cannot happen: one callback per entry */
        pthread_mutex_unlock(&d->ring_mu);
        mr_log_error("device tier: an upload callback with none pending");
        return;
    }
    const struct pending e = d->ring[d->ring_head];
    d->ring_head = (d->ring_head + 1) % d->ring_cap;
    d->ring_n--;
    d->st.uploads++;
    d->st.bytes_uploaded += e.bytes;
    if (!d->ring_n)
        d->st.busy_ns += now_ns() - d->busy_t0;
    pthread_cond_broadcast(&d->ring_cv);
    pthread_mutex_unlock(&d->ring_mu);
    e.done(e.user, e.tag, MOERUN_OK, NULL);
}

static int check_upload(const struct tier_device *d, uint32_t slot, const struct tier_copy *c,
                        uint32_t n, tier_done_fn done) {
    if (!d->slots_set || slot >= d->n_slots || !done || !c || !n)
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "device tier: upload into slot %u of %u (%u copies, %s callback)", slot,
                      d->n_slots, n, done ? "a" : "no");
    const uintptr_t lo = (uintptr_t)d->base + d->slot0, hi = lo + d->slots_bytes;
    for (uint32_t i = 0; i < n; i++) {
        const uintptr_t dst = (uintptr_t)c[i].dst;
        if (!c[i].src || dst < lo || dst > hi || c[i].bytes > hi - dst)
            return mr_err(MOERUN_ERR_INVALID_ARG,
                          "device tier: copy %u of slot %u (%llu bytes to %p) is outside the "
                          "slot region",
                          i, slot, (unsigned long long)c[i].bytes, c[i].dst);
    }
    return MOERUN_OK;
}

int tier_device_upload(struct tier_device *d, uint32_t slot, const struct tier_copy *copies,
                       uint32_t n, uint64_t tag, tier_done_fn done, void *user) {
    if (!d)
        return mr_err(MOERUN_ERR_INVALID_ARG, "device tier: upload without a tier");
    pthread_mutex_lock(&d->mu);
    int rc = check_upload(d, slot, copies, n, done);
    if (rc != MOERUN_OK)
        goto out_unlock;
    if (d->attempts++ == d->fault_nth) {
        rc = mr_err(MOERUN_ERR_BACKEND, "device tier: injected failure of upload %llu (slot %u)",
                    (unsigned long long)(d->attempts - 1), slot);
        goto out_unlock;
    }
    struct pending e = {tag, done, user, 0};
    for (uint32_t i = 0; i < n; i++)
        e.bytes += copies[i].bytes;

    /* our entry goes in first (its callback may run as soon as it is enqueued) */
    pthread_mutex_lock(&d->ring_mu);
    while (d->ring_n == d->ring_cap)
        pthread_cond_wait(&d->ring_cv, &d->ring_mu);
    if (!d->ring_n)
        d->busy_t0 = now_ns();
    d->ring[(d->ring_head + d->ring_n) % d->ring_cap] = e;
    d->ring_n++;
    pthread_mutex_unlock(&d->ring_mu);

    const struct mr_backend_ops *ops = d->be->ops;
    bool copied = false;
    rc = ops->wait(d->be, MR_STREAM_COPY, d->freed[slot]);
    for (uint32_t i = 0; i < n && rc == MOERUN_OK; i++) {
        rc = ops->copy_async(d->be, copies[i].dst, copies[i].src, copies[i].bytes);
        copied |= rc == MOERUN_OK;
    }
    if (rc == MOERUN_OK)
        rc = ops->record(d->be, MR_STREAM_COPY, d->ready[slot]);
    if (rc == MOERUN_OK)
        rc = ops->callback(d->be, MR_STREAM_COPY, on_copied, d);
    if (rc != MOERUN_OK) {
        /* no callback for ours: take it back (the tail: uploads are enqueued under d->mu), and
         * let the copies already enqueued finish reading src before the caller reuses it */
        if (copied) {
            char msg[256];
            const char *m = moerun_errmsg();
            snprintf(msg, sizeof(msg), "%s", m ? m : "");
            ops->sync(d->be, MR_STREAM_COPY);
            mr_err(rc, "%s", msg); /* the failure's message, whatever sync said */
        }
        pthread_mutex_lock(&d->ring_mu);
        d->ring_n--;
        if (!d->ring_n)
            d->st.busy_ns += now_ns() - d->busy_t0;
        pthread_cond_broadcast(&d->ring_cv);
        pthread_mutex_unlock(&d->ring_mu);
    }
out_unlock:
    pthread_mutex_unlock(&d->mu);
    return rc;
}

int tier_device_acquire(struct tier_device *d, uint32_t slot) {
    if (!d || slot >= d->n_slots)
        return mr_err(MOERUN_ERR_INVALID_ARG, "device tier: acquire of slot %u", slot);
    pthread_mutex_lock(&d->mu);
    int rc = d->be->ops->wait(d->be, MR_STREAM_COMPUTE, d->ready[slot]);
    pthread_mutex_unlock(&d->mu);
    return rc;
}

int tier_device_release(struct tier_device *d, uint32_t slot) {
    if (!d || slot >= d->n_slots)
        return mr_err(MOERUN_ERR_INVALID_ARG, "device tier: release of slot %u", slot);
    pthread_mutex_lock(&d->mu);
    int rc = d->be->ops->record(d->be, MR_STREAM_COMPUTE, d->freed[slot]);
    pthread_mutex_unlock(&d->mu);
    return rc;
}

void tier_device_set_fault(struct tier_device *d, uint64_t nth) {
    if (!d)
        return;
    pthread_mutex_lock(&d->mu);
    d->fault_nth = nth;
    pthread_mutex_unlock(&d->mu);
}

/* ---- statistics ---------------------------------------------------------------------------- */

void tier_device_get_stats(const struct tier_device *d, struct tier_device_stats *out) {
    if (!d || !out)
        return;
    struct tier_device *m = (struct tier_device *)d; /* the locks are not logical state */
    pthread_mutex_lock(&m->mu);
    uint64_t total, largest, reserved = 0;
    free_figures(d, &total, &largest);
    for (uint32_t i = 0; i < d->n_blk; i++)
        reserved += d->blk[i].bytes;
    pthread_mutex_lock(&m->ring_mu);
    *out = d->st;
    if (d->ring_n) /* the busy period in progress counts so far */
        out->busy_ns += now_ns() - d->busy_t0;
    pthread_mutex_unlock(&m->ring_mu);
    pthread_mutex_unlock(&m->mu);
    out->reserved_bytes = reserved;
    out->free_bytes = total;
}

void tier_device_reset_stats(struct tier_device *d) {
    if (!d)
        return;
    pthread_mutex_lock(&d->ring_mu);
    d->st.bytes_uploaded = d->st.uploads = d->st.busy_ns = 0;
    if (d->ring_n)
        d->busy_t0 = now_ns();
    pthread_mutex_unlock(&d->ring_mu);
}
