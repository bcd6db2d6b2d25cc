/* Tiers (internal): the memory weights live in below the compute device.
 *
 *  - host tier (host.c): one region of host memory, allocated when the model opens, placed on
 *    the NUMA node of the compute threads (hwloc), huge pages where available, page-aligned so
 *    the GPU backend can pin it; the scheduler carves it into slots.
 *  - NVMe tier (nvme.c): reads byte ranges of the model file into that region with io_uring,
 *    O_DIRECT, registered buffers and a registered file; completions are reaped by the tier's
 *    own thread, which calls the caller's done() per request.
 *
 * O_DIRECT wants 4 KiB-aligned offsets, lengths and buffers; GGUF aligns tensors to 32 bytes.
 * A range [offset, offset + len) is read as its enclosing aligned span into an aligned buffer,
 * and the tensor starts `slack` bytes into it (tier_span).
 */
#ifndef MOERUN_TIERS_H
#define MOERUN_TIERS_H

#include "moerun.h"

#include <stdbool.h>
#include <stdint.h>

#define TIER_ALIGN 4096u

/* The enclosing aligned span of [offset, offset + len). */
struct tier_span {
    uint64_t offset; /* aligned down */
    uint64_t bytes;  /* aligned up, covering the range */
    uint64_t slack;  /* offset - span.offset: where the range starts in the span */
};

static inline struct tier_span tier_span_of(uint64_t offset, uint64_t len) {
    struct tier_span s;
    s.offset = offset & ~(uint64_t)(TIER_ALIGN - 1);
    s.slack = offset - s.offset;
    s.bytes = (s.slack + len + TIER_ALIGN - 1) & ~(uint64_t)(TIER_ALIGN - 1);
    return s;
}

/* ---------------------------------------------------------------------------------------------
 * Host tier
 * ------------------------------------------------------------------------------------------- */

struct tier_host;

struct tier_host_params {
    uint64_t bytes;  /* size of the region (rounded up to the page size) */
    bool huge_pages; /* try huge pages (MAP_HUGETLB, then madvise), else normal pages */
    bool bind_numa;  /* bind the region to the NUMA node(s) of the calling thread's cpuset */
};

/* Map and touch (fault in) the whole region now, so nothing is allocated later.
 * Returns MOERUN_OK, MOERUN_ERR_NOMEM (with the size in the message). */
int tier_host_create(const struct tier_host_params *p, struct tier_host **out);
void tier_host_destroy(struct tier_host *h);     /* NULL is a no-op */
void *tier_host_base(const struct tier_host *h); /* TIER_ALIGN-aligned */
uint64_t tier_host_bytes(const struct tier_host *h);
/* Where it ended up: "node 0, 2 MiB pages" or "no NUMA binding, 4 KiB pages". */
const char *tier_host_describe(const struct tier_host *h);

/* ---------------------------------------------------------------------------------------------
 * NVMe tier
 * ------------------------------------------------------------------------------------------- */

struct tier_nvme;

/* One read: an aligned span of the file into an aligned destination inside the registered
 * region (offset, bytes and dst all multiples of TIER_ALIGN). */
struct tier_read {
    uint64_t offset;
    uint64_t bytes;
    void *dst;
};

/* Called from the tier's completion thread once every read of a request has finished
 * (status MOERUN_OK) or one has failed for good (a negative status; the message is in
 * *msg, valid during the call). Must not call back into the tier synchronously for the same
 * request; may submit new ones. */
typedef void (*tier_done_fn)(void *user, uint64_t tag, int status, const char *msg);

/* Fault injection for tests: make the nth read submitted (counting from 0) fail with -EIO
 * or complete short by `short_bytes` (which the tier must resubmit). TIER_FAULT_EINVAL makes it
 * fail with -EINVAL, which on an O_DIRECT file before any direct read has succeeded takes the
 * buffered fallback (as a file system that refuses O_DIRECT at read time would). */
enum tier_fault_kind { TIER_FAULT_NONE, TIER_FAULT_EIO, TIER_FAULT_SHORT, TIER_FAULT_EINVAL };

#define TIER_NVME_MAX_READS 32u /* reads in one request (a section has <= SCHED_MAX_RANGES) */

struct tier_nvme_params {
    uint32_t queue_depth; /* in-flight reads; 0 = 64 */
    bool direct;          /* try O_DIRECT (falls back to buffered reads, logged once) */
    void *region;         /* the memory reads land in (registered with io_uring) */
    uint64_t region_bytes;
    tier_done_fn done;    /* completion callback */
    void *user;           /* its first argument */
    uint32_t chunk_bytes; /* reads are split into SQEs of at most this; multiple of
                           * TIER_ALIGN; 0 = 1 MiB */
};

/* Open path for reading, set up the ring, register the file and the region, start the
 * completion thread. Everything is allocated here: 4 x queue_depth request slots.
 * Returns MOERUN_OK or MOERUN_ERR_IO / ERR_UNSUPPORTED (no io_uring) / ERR_NOMEM /
 * ERR_INVALID_ARG. */
int tier_nvme_open(const char *path, const struct tier_nvme_params *p, struct tier_nvme **out);

/* Waits for the reads in flight (their done() is still called), then stops the thread and
 * releases everything. Not from done(). */
void tier_nvme_close(struct tier_nvme *t); /* NULL is a no-op */

/* Submit n reads (1..TIER_NVME_MAX_READS) as one request (an expert's three ranges go
 * together). Thread-safe: a mutex guards the submission queue; SQEs that do not fit in the ring
 * wait in a FIFO and go out as completions free room. Waits only while all request slots are
 * in use (called from done() it returns MOERUN_ERR_BUDGET instead of waiting). Reads must be
 * aligned, inside the region, and end at most at the file's size rounded up to TIER_ALIGN (the
 * bytes past the end of the file are zero-filled).
 * Returns MOERUN_OK (done() will be called exactly once for tag) or an error (not called):
 * MOERUN_ERR_INVALID_ARG, MOERUN_ERR_RANGE (past the end of the file), MOERUN_ERR_BUDGET. */
int tier_nvme_submit(struct tier_nvme *t, const struct tier_read *reads, uint32_t n, uint64_t tag);

bool tier_nvme_is_direct(const struct tier_nvme *t);
/* Whether the region is registered with io_uring (fixed-buffer reads) or plain reads are used
 * (registration refused, e.g. by RLIMIT_MEMLOCK). */
bool tier_nvme_is_fixed(const struct tier_nvme *t);

struct tier_nvme_stats {
    uint64_t bytes_read; /* completed bytes (of requests that succeeded) */
    uint64_t reads;      /* completed struct tier_read (of requests that succeeded; after
                          * resubmission of short ones) */
    uint64_t resubmits;  /* short reads resubmitted */
    uint64_t errors;     /* requests failed */
    uint64_t busy_ns;    /* time with at least one read in flight */
    uint64_t sqes;       /* read SQEs submitted since open, resubmissions included (what
                          * tier_nvme_set_fault's nth counts) */
};
void tier_nvme_get_stats(const struct tier_nvme *t, struct tier_nvme_stats *out); /* any thread */

void tier_nvme_set_fault(struct tier_nvme *t, uint64_t nth, enum tier_fault_kind kind,
                         uint64_t short_bytes);

#endif /* MOERUN_TIERS_H */
