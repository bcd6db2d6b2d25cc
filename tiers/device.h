/* GPU tier (internal): the device memory budget, carved once, and the uploads of weight
 * sections into its slots on the backend's copy stream.
 *
 * Memory: one be->ops->alloc of the whole budget (--gpu-mem) at create; nothing else is
 * allocated on the device. The scheduler's slot region comes first: slots_bytes from
 * tier_device_base, the allocation's first TIER_ALIGN-aligned byte (the scheduler wants its
 * region aligned; CUDA promises 256 only, so leave TIER_ALIGN bytes of slack in the budget).
 * The rest is handed out by a small first-fit allocator to the resident weights, the sessions'
 * KV caches and workspaces (placed at the high end of the free space).
 *
 * Ordering (two events per slot, no host waits on the hot path):
 *   upload(slot):  copy stream waits for the slot's "free" event, copies each range, records
 *                  the slot's "ready" event, then a host callback reports done once the copy
 *                  has finished reading the (pinned) host memory;
 *   acquire(slot): compute stream waits for "ready" (before the first op that reads the slot);
 *   release(slot): compute stream records "free" (after the last op that reads it was
 *                  enqueued).
 * An event never recorded counts as completed, so a slot's first upload does not wait.
 *
 * Threads: uploads come from any thread (the NVMe completion thread, the stage's thread, the
 * compute thread); acquire and release from the compute thread. One mutex serializes this
 * tier's calls on the backend instance; done callbacks run on the backend's callback thread
 * (which must not call into the backend) and take only a small lock of their own.
 * The tiers never include scheduler headers: ranges are plain struct tier_copy. */
#ifndef MOERUN_DEVICE_H
#define MOERUN_DEVICE_H

#include "backend.h"
#include "tiers.h"

#include <stdint.h>

struct tier_device;

/* One host -> device copy: bytes from pinned host src to device dst (inside the slot region). */
struct tier_copy {
    void *dst;
    const void *src;
    uint64_t bytes;
};

/* Allocate bytes of device memory through be (which must outlive the tier), the first
 * slots_bytes of it (from tier_device_base) for the scheduler's slots. Returns MOERUN_OK,
 * MOERUN_ERR_INVALID_ARG (no backend, 0 bytes), MOERUN_ERR_BUDGET (the slots do not fit once
 * aligned), the backend's error (e.g. MOERUN_ERR_NOMEM, MOERUN_ERR_BACKEND), MOERUN_ERR_NOMEM
 * (host tables). */
int tier_device_create(struct mr_backend *be, uint64_t bytes, uint64_t slots_bytes,
                       struct tier_device **out);

/* Waits for the uploads in flight (their callbacks are made), destroys the events and frees the
 * allocation (reserved blocks included). Not from a callback. NULL is a no-op. */
void tier_device_destroy(struct tier_device *d);

/* The slot region's start: the allocation rounded up to TIER_ALIGN (the scheduler's region). */
void *tier_device_base(const struct tier_device *d);
uint64_t tier_device_bytes(const struct tier_device *d); /* the allocation */

/* bytes of device memory after the slot region, aligned to align (a power of two; 0 = 256),
 * placed at the highest free place that fits. Returns MOERUN_OK and *out, MOERUN_ERR_BUDGET
 * naming the bytes free and the largest free block, MOERUN_ERR_INVALID_ARG (0 bytes, bad
 * align), MOERUN_ERR_NOMEM. Thread-safe. */
int tier_device_reserve(struct tier_device *d, uint64_t bytes, uint64_t align, void **out);
/* Give back a block tier_device_reserve returned (NULL is a no-op; anything else is logged and
 * ignored). Thread-safe. */
void tier_device_unreserve(struct tier_device *d, void *p);

/* Create the events of the n_slots slots of the region (the scheduler's layout: dense slots,
 * then expert slots). Once per tier, before any upload. Returns MOERUN_OK,
 * MOERUN_ERR_INVALID_ARG (n_slots 0, already set), the backend's error, MOERUN_ERR_NOMEM. */
int tier_device_set_slots(struct tier_device *d, uint32_t n_slots);

/* Enqueue the upload of n ranges into slot `slot` (every dst inside the slot region; src pinned
 * host memory that stays unchanged until done) and, on the copy stream after it, the callback
 * done(user, tag, MOERUN_OK, NULL) once the copies have finished reading src. Returns MOERUN_OK
 * (done will be called exactly once) or an error (not called): MOERUN_ERR_INVALID_ARG, the
 * backend's error, MOERUN_ERR_BACKEND (an injected fault). If the backend fails after some
 * copies were enqueued, this waits for the copy stream before returning, so src may be reused.
 * Waits only while the uploads outstanding fill the callback ring (2 x n_slots + 64). */
int tier_device_upload(struct tier_device *d, uint32_t slot, const struct tier_copy *copies,
                       uint32_t n, uint64_t tag, tier_done_fn done, void *user);

/* Compute stream waits for slot's last upload (before the first op that reads it). */
int tier_device_acquire(struct tier_device *d, uint32_t slot);
/* Compute stream marks slot free (after the last op that reads it was enqueued): its next
 * upload waits for that point. */
int tier_device_release(struct tier_device *d, uint32_t slot);

/* Fault injection for tests: the nth call of tier_device_upload since create (counting from 0,
 * valid arguments only) fails with MOERUN_ERR_BACKEND before anything is enqueued.
 * UINT64_MAX: none. */
void tier_device_set_fault(struct tier_device *d, uint64_t nth);

struct tier_device_stats {
    uint64_t bytes_uploaded; /* bytes of uploads completed (their callback came) */
    uint64_t uploads;        /* uploads completed */
    uint64_t busy_ns;        /* time with at least one upload outstanding, from its enqueue to
                              * the last callback: includes waits for slots to be released, so
                              * bytes_uploaded / busy_ns is a lower bound of the link's speed */
    uint64_t reserved_bytes; /* held by tier_device_reserve blocks now */
    uint64_t free_bytes;     /* left for tier_device_reserve (above the slot region) */
};
void tier_device_get_stats(const struct tier_device *d, struct tier_device_stats *out);
void tier_device_reset_stats(struct tier_device *d); /* the counters, not the memory figures */

#endif /* MOERUN_DEVICE_H */
