/* Stage (internal): the host tier between the NVMe reader and the GPU tier.
 *
 * With a GPU, the scheduler's slots are device memory, and its loader is the stage: a cache of
 * sections in pinned host memory. A device load of section S into device slot memory dst:
 *   - S is in a host slot (a hit): pin that host slot, hand the upload (host -> device) to the
 *     uploader and tell the scheduler the load is done with the status of that enqueue (the
 *     device side orders compute after the upload with events: "done" means "enqueued");
 *   - else (a miss): take a host slot (a free one, else the least recently used one that is
 *     not pinned), read S into it with the reader (the NVMe tier, through the same struct
 *     sched_loader as the CPU path); when stage_read_done reports it, enqueue the upload and
 *     tell the scheduler. A failed read is passed to the scheduler and leaves the slot free;
 *   - no host slot can be taken (all pinned by reads and uploads): the request waits in a FIFO
 *     (one per slot kind) and starts when a slot is unpinned.
 * The uploader calls stage_upload_done when the copy has finished reading the host slot; that
 * unpins it. An upload the uploader refuses unpins it and fails the device load.
 *
 * Host slots. When every section fits with its own size (each rounded up to SCHED_ALIGN), each
 * has its own place and nothing is ever evicted ("packed"). Otherwise there are two slot sizes,
 * like the scheduler's (the largest dense part, the largest expert, rounded up to SCHED_ALIGN):
 *   - dense slots: all n_layer when they fit alongside max_in_flight expert slots (a dense
 *     part is needed by every token, an expert by a few: per byte the dense parts are the
 *     better use of the host tier); otherwise min(n_layer, 2), used only to stage reads (an
 *     LRU over fewer slots than layers, visited cyclically, would never hit). n_dense_slots
 *     overrides this, e.g. 2 when the GPU tier holds every dense part (each is loaded once);
 *   - expert slots: the rest, at most n_layer * n_expert; evicted least recently used.
 * The least region: the packed size, or min(n_layer, 2) dense slots and max_in_flight expert
 * slots (stage_min_bytes). Fewer host slots than device loads in flight still works (the rest
 * queue), but reads and uploads then go one slot at a time.
 *
 * Threads. The device scheduler calls load() (stage_loader) from the compute thread and from
 * its completion path; the reader calls stage_read_done from its completion thread; the
 * uploader calls stage_upload_done from a backend thread (a CUDA host callback, which must not
 * call into the backend). One mutex guards the state and is never held while calling the
 * reader, the uploader or done, so each may call back synchronously. stage_upload_done only
 * unpins and signals: queued requests are started by the stage's own thread (reads, and the
 * done callbacks of refused reads, which may make the scheduler start loads, hence uploads, so
 * they must not run on the uploader's callback thread). No CUDA or io_uring header here. */
#ifndef MOERUN_STAGE_H
#define MOERUN_STAGE_H

#include "scheduler.h"

#include <stdbool.h>
#include <stdint.h>

struct stage;

struct stage_uploader {
    /* Enqueue the copy of section sec from host memory src (the host slot; ranges at
     * src + range.slot_offset) to device memory dst (same layout). Return MOERUN_OK and later
     * call stage_upload_done(st, tag, ...) exactly once, from any thread (also from inside
     * upload()), when src may be reused; or return an error with its message (then no
     * callback). */
    int (*upload)(void *ctx, const struct sched_section *sec, const void *src, void *dst,
                  uint64_t tag);
    void *ctx;
};

/* The device scheduler's completion (sched_load_done): called once per load() that returned
 * MOERUN_OK, from any thread, status MOERUN_OK or a negative code with its message. */
typedef void (*stage_done_fn)(void *user, uint64_t tag, int status, const char *msg);

struct stage_params {
    void *region; /* pinned host memory the host slots are carved from, SCHED_ALIGN-aligned */
    uint64_t region_bytes;
    const struct sched_section *sections; /* n_layer dense parts then n_layer * n_expert
                                             experts, as for sched_create; copied */
    uint32_t n_sections;
    uint32_t n_layer, n_expert;
    uint32_t max_in_flight;     /* expert loads that should proceed at once: the fewest expert
                                   slots (see stage_min_bytes); 0 = 1 */
    uint32_t n_dense_slots;     /* dense host slots; 0 = auto (all n_layer when they fit with
                                   max_in_flight expert slots, else min(n_layer, 2)); clamped to
                                   [min(n_layer, 2), n_layer] and to the budget. Packed layouts
                                   ignore it */
    struct sched_loader reader; /* reads a section into host memory; its completion comes
                                   through stage_read_done (the reader's tag is the stage's) */
    struct stage_uploader uploader;
    stage_done_fn done; /* the device scheduler's sched_load_done */
    void *done_user;
};

/* The least region_bytes that works: the sum of the sections' sizes (each rounded up to
 * SCHED_ALIGN) when that is smaller, else min(n_layer, 2) dense slots plus
 * min(max(max_in_flight, 1), n_layer * n_expert) expert slots. UINT64_MAX on overflow. */
uint64_t stage_min_bytes(const struct sched_section *sections, uint32_t n_sections,
                         uint32_t n_layer, uint32_t n_expert, uint32_t max_in_flight);

/* Lays out the host slots and starts the stage's thread; everything is allocated here.
 * Returns MOERUN_OK, MOERUN_ERR_BUDGET naming the minimum (bytes and MiB),
 * MOERUN_ERR_INVALID_ARG (inconsistent sections, unaligned region, missing callbacks),
 * MOERUN_ERR_NOMEM. */
int stage_create(const struct stage_params *p, struct stage **out);

/* Waits for the reads and uploads in flight and the queued requests (all their callbacks are
 * made), then stops the thread and frees everything. Not from a callback. NULL is a no-op. */
void stage_destroy(struct stage *st);

/* The loader the device scheduler is created with: load(ctx, sec, dst, tag) of a device slot.
 * A section must not be loaded again before its previous load's done (the scheduler's rule).
 * Returns MOERUN_OK (done will be called for tag), or an error with no callback: the reader
 * refused the read, the uploader refused a hit's upload, MOERUN_ERR_INVALID_ARG for a section
 * that is not one of the stage's, or MOERUN_ERR_INTERNAL for a section already in flight. */
struct sched_loader stage_loader(struct stage *st);

/* The reader's completion (its thread), for the stage's tag. */
void stage_read_done(struct stage *st, uint64_t tag, int status, const char *msg);

/* The uploader's completion (any thread, a CUDA host callback included): the copy has finished
 * reading the host slot. A non-OK status is counted and logged (the scheduler was already told
 * the load was done; a device fault surfaces on the device's streams). */
void stage_upload_done(struct stage *st, uint64_t tag, int status, const char *msg);

struct stage_layout {
    bool packed;               /* every section has its own host place */
    uint32_t n_dense_slots;    /* packed: n_layer */
    uint32_t n_expert_slots;   /* packed: n_layer * n_expert */
    uint64_t dense_slot_bytes; /* multiples of SCHED_ALIGN; packed: the largest */
    uint64_t expert_slot_bytes;
};
void stage_get_layout(const struct stage *st, struct stage_layout *out);

/* Counters since creation or the last reset. Time spent reading and copying is measured where
 * it happens (tier_nvme_stats.busy_ns, tier_device_stats.busy_ns). */
struct stage_stats {
    uint64_t host_hits;      /* device loads served from a host slot */
    uint64_t host_misses;    /* device loads that read their section from the reader */
    uint64_t queued;         /* of the misses, those that waited for a host slot */
    uint64_t evictions;      /* host slots taken from another section */
    uint64_t bytes_read;     /* range bytes of successful reads */
    uint64_t reads;          /* successful reads */
    uint64_t read_errors;    /* reads refused or failed */
    uint64_t bytes_uploaded; /* range bytes of uploads enqueued */
    uint64_t uploads;        /* uploads enqueued */
    uint64_t upload_errors;  /* uploads refused, or completed with an error */
};
void stage_get_stats(const struct stage *st, struct stage_stats *out); /* any thread */
void stage_reset_stats(struct stage *st);

#endif /* MOERUN_STAGE_H */
