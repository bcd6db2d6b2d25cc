/* Scheduler (internal): which weight section is in which slot of the host tier, and when to
 * load what.
 *
 * A section is what the scheduler moves as one: a layer's dense part (attention, norms,
 * router, shared expert) or one expert of a layer (its gate, up and down ranges). Host memory
 * is carved into slots of two sizes:
 *   - dense slots: when every layer's dense part fits, each stays resident; otherwise they
 *     form a ring that layers flow through in execution order, round-robin, each loaded
 *     ahead of its use (SE-MoE's ring memory);
 *   - expert slots: a cache with a selectable eviction policy (LRU, LFU, predicted use).
 * Prefetch: the forward pass tells the scheduler which experts it predicts a later layer will
 * choose; the scheduler reserves slots for those that are not resident and queues their loads.
 * At most prefetch_in_flight prefetch loads are with the loader at once; the rest wait QUEUED
 * (oldest started first) and can still be cancelled: by the request of their layer when it
 * does not need them, by a newer prediction for their layer that no longer names them, or
 * when the execution has passed their layer. Demand loads are never capped or queued.
 *
 * The scheduler does no I/O itself: it drives a loader through struct sched_loader (the NVMe
 * tier in the engine, a fake in the tests) and learns of completions through sched_load_done,
 * which may be called from any thread. It never includes io_uring or CUDA headers.
 *
 * Thread model: one compute thread calls everything but sched_load_done; the loader's thread
 * calls sched_load_done. All waiting is on one mutex and condition variable.
 */
#ifndef MOERUN_SCHEDULER_H
#define MOERUN_SCHEDULER_H

#include "moerun.h"

#include <stdbool.h>
#include <stdint.h>

#define SCHED_MAX_RANGES 24    /* tensors in one section (a dense part has up to ~17) */
#define SCHED_ALIGN      4096u /* slot sizes and offsets are multiples of it (= TIER_ALIGN) */

struct sched;

enum sched_policy {
    SCHED_POLICY_LRU,       /* evict the expert used longest ago */
    SCHED_POLICY_LFU,       /* evict the expert used least often (ties: longest ago) */
    SCHED_POLICY_PREDICTED, /* evict the expert with the lowest predicted use, then LRU */
};

/* One byte range of the model file that belongs to a section, and where it lands in the slot:
 * the loader reads [file_offset, +bytes) (TIER_ALIGN-aligned) to slot + slot_offset, and the
 * tensor starts at slot + slot_offset + slack. Filled by the engine (runtime), which knows the
 * tensors; the scheduler only copies the descriptions to the loader. */
struct sched_range {
    uint64_t file_offset;
    uint64_t bytes;
    uint64_t slot_offset;
};

struct sched_section {
    uint32_t layer;
    int32_t expert; /* -1: the layer's dense part */
    uint32_t n_ranges;
    struct sched_range ranges[SCHED_MAX_RANGES];
    uint64_t slot_bytes; /* bytes of slot this section needs */
};

/* Start loading a section into slot memory dst; call sched_load_done(s, tag, status) once it
 * has all landed (from any thread). Returns MOERUN_OK or an error (then no callback). */
struct sched_loader {
    int (*load)(void *ctx, const struct sched_section *sec, void *dst, uint64_t tag);
    void *ctx;
};

enum sched_prefetch {
    SCHED_PREFETCH_OFF,  /* predictions are measured and scored, nothing is loaded from them */
    SCHED_PREFETCH_ON,   /* every prediction's experts are loaded ahead */
    SCHED_PREFETCH_AUTO, /* loaded ahead while that pays (sched_set_load_cost) */
};

struct sched_params {
    uint32_t n_layer;
    uint32_t n_expert;
    uint32_t n_expert_used; /* k: the most experts one token needs in a layer */
    void *region;           /* host tier memory the slots are carved from */
    uint64_t region_bytes;
    enum sched_policy policy;
    enum sched_prefetch prefetch; /* act on predictions: never, always, while it pays */
    uint32_t ring_ahead;          /* dense parts loaded ahead of the one computing; 0 = 1 (a ring
                                     of 2 slots when they do not all fit; capped by the budget) */
    uint32_t prefetch_in_flight;  /* prefetch loads with the loader at once, at most (the rest
                                     are queued); 0 = n_expert_used */
    bool prefetch_when_idle;      /* count demand loads too against prefetch_in_flight: prefetches
                                     use only the I/O that demand loads leave idle (on a decode
                                     bound by the disk, wrong predictions then cost no reads) */
};

/* The least region_bytes that runs: 2 dense slots when the dense parts do not all fit (or all
 * of them) plus k expert slots, with alignment. */
uint64_t sched_min_bytes(const struct sched_params *p, const struct sched_section *sections,
                         uint32_t n_sections);

/* sections: n_layer dense parts then n_layer * n_expert experts, index = sched_section_index.
 * The sections are copied. region must be SCHED_ALIGN-aligned. Slot sizes: the largest
 * slot_bytes of the dense parts, of the experts, each rounded up to SCHED_ALIGN. When all the
 * dense parts fit with n_expert_used expert slots, each layer has its own dense slot (loaded
 * once); otherwise a ring of R = ring_ahead + 1 slots (at least 2, fewer when the budget is
 * short). The rest of the region is expert slots. Everything is allocated here.
 * Returns MOERUN_OK, MOERUN_ERR_BUDGET naming the minimum (bytes and MiB),
 * MOERUN_ERR_INVALID_ARG (inconsistent sections or params), MOERUN_ERR_NOMEM. */
int sched_create(const struct sched_params *p, const struct sched_section *sections,
                 uint32_t n_sections, struct sched_loader loader, struct sched **out);
void sched_destroy(struct sched *s); /* waits for loads in flight; NULL is a no-op */

/* Sections in their places (index = sched_section_index), layers and experts in range, ranges
 * inside their slot_bytes. Returns MOERUN_OK or MOERUN_ERR_INVALID_ARG naming the section
 * (messages start with who). */
int sched_check_sections(const struct sched_section *sections, uint32_t n_sections,
                         uint32_t n_layer, uint32_t n_expert, const char *who);

static inline uint32_t sched_section_index(uint32_t n_layer, uint32_t n_expert, uint32_t layer,
                                           int32_t expert) {
    return expert < 0 ? layer : n_layer + layer * n_expert + (uint32_t)expert;
}

/* Completion from the loader (any thread; also from inside load() itself: the scheduler never
 * holds its mutex while it calls load()). status MOERUN_OK or a negative code; msg may be NULL. */
void sched_load_done(struct sched *s, uint64_t tag, int status, const char *msg);

/* --- the forward pass's calls, in order, per layer ------------------------------------------ */

/* The dense part of layer l, resident (waits for its load; starts the ring's loads ahead).
 * Ring slots are reused in execution order: a layer goes into the slot whose layer is needed
 * furthest in the future (never an acquired or loading one), which is slot l % R when R
 * divides n_layer. Release also starts the next load ahead into the released slot.
 * Returns MOERUN_OK and *base (the slot), or the error of a load this call waited for
 * (the loader's status, MOERUN_ERR_IO for a read, MOERUN_ERR_BACKEND for an upload, with its
 * message; the section is left absent and the next call loads it again). A load that failed before
 * any call waited for it (a load ahead, a prefetch) is simply started again when needed. */
int sched_dense_acquire(struct sched *s, uint32_t layer, const void **base);
void sched_dense_release(struct sched *s, uint32_t layer);

/* The experts layer l needs now (the union over the batch's tokens), n <= n_expert: start the
 * loads of those not resident, as slots allow, most needed first (a queued prefetch of one of
 * them is started now and counts as a miss). Queued prefetches of layer l that are not in the
 * set, and those of layers not among the next n_layer / 2 after l (passed), are cancelled.
 * A request ends the previous one (its experts not yet released are released). Returns MOERUN_OK or
 * MOERUN_ERR_INVALID_ARG (layer or expert out of range, duplicates). */
int sched_experts_request(struct sched *s, uint32_t layer, const int32_t *experts, uint32_t n);

/* The next requested expert of layer l that is resident and not yet handed out (waits for one
 * when none is): *expert and *base. Returns MOERUN_OK, 1 when all requested were handed out,
 * or the error of one requested expert's load (the loader's status and message, reported once;
 * calling again loads it again), or MOERUN_ERR_INVALID_ARG when layer is not the one requested
 * or every slot holds a handed-out expert that was not released. Release each when computed
 * (frees its slot for the rest). */
int sched_experts_next(struct sched *s, uint32_t layer, int32_t *expert, const void **base);
void sched_expert_release(struct sched *s, uint32_t layer, int32_t expert);

/* Prediction for a later layer: scores (probabilities) of its n_expert experts. With prefetch
 * on, the top n_expert_used not resident get slots whose experts are not needed now and their
 * loads are queued (started up to prefetch_in_flight at once, oldest first); queued loads of
 * this layer's previous prediction that the new top n_expert_used no longer names are
 * cancelled. Predictions are also what precision/recall are measured on. */
void sched_predict(struct sched *s, uint32_t layer, const float *scores);

/* SCHED_PREFETCH_AUTO: prefetch pays when the loads of a prediction's wrong experts take less
 * time than a layer computes (then they hide under compute; longer, and they delay the loads the
 * next layer waits for, as every right guess would have been loaded on demand anyway). Per
 * prediction, from running averages (the newest weighs 1/8):
 *   wrong_ns = (1 - precision) * (predicted experts not resident) * expert slot bytes
 *              * ns_per_byte * (1 + reuse)
 * where reuse is the share of needed experts found cached without a prefetch: a wrong load
 * also evicts one, missed that often later.
 * against the compute per layer: the time between the requests of consecutive layers, less the
 * time stalled on loads. On while wrong_ns < compute (with a 25% band against flapping), and
 * always on until both are known (4 predictions checked, 4 layer times, a load cost). The
 * engine measures the cost of loading (ns per byte of the link loads wait on: the disk, or the
 * copy to the GPU plus the disk for the host tier's misses) and passes it here; values <= 0
 * are ignored. Compute thread. */
void sched_set_load_cost(struct sched *s, double ns_per_byte);

/* --- introspection (tests, tools) ----------------------------------------------------------- */

enum sched_state {
    SCHED_ABSENT,
    SCHED_LOADING,
    SCHED_RESIDENT,
    SCHED_FAILED,
    SCHED_QUEUED, /* a prefetch: slot reserved, not yet handed to the loader */
};

struct sched_layout {
    bool ring;              /* dense parts flow through a ring (else each has its slot) */
    uint32_t n_dense_slots; /* R, or n_layer */
    uint32_t n_expert_slots;
    uint64_t dense_slot_bytes; /* multiples of SCHED_ALIGN */
    uint64_t expert_slot_bytes;
};
void sched_get_layout(const struct sched *s, struct sched_layout *out);
/* The slot whose memory starts at base (a pointer the scheduler handed out or gave the
 * loader): dense slots are 0 .. n_dense_slots - 1, expert slots follow; -1 when base is not
 * the start of a slot. The layout is fixed at creation, so this takes no lock. */
int32_t sched_slot_index(const struct sched *s, const void *base);
/* State of a section now (expert -1: the dense part); SCHED_ABSENT when out of range. */
enum sched_state sched_section_state(const struct sched *s, uint32_t layer, int32_t expert);

/* --- statistics ----------------------------------------------------------------------------- */

struct sched_stats {
    uint64_t bytes_loaded;  /* bytes the loader was asked for */
    uint64_t loads;         /* sections loaded */
    uint64_t expert_hits;   /* needed expert already resident (or loading from a prefetch) */
    uint64_t expert_misses; /* needed expert not resident: loaded on demand */
    uint64_t dense_hits, dense_misses;
    uint64_t prefetch_issued;    /* expert loads started (handed to the loader) from predictions */
    uint64_t prefetch_used;      /* of those, experts needed before their eviction */
    uint64_t predicted;          /* predicted experts (top-k of each prediction) */
    uint64_t predicted_correct;  /* of those, in the set the layer then needed */
    uint64_t needed;             /* experts needed by layers that had a prediction */
    uint64_t stall_ns;           /* time the compute thread waited for loads */
    uint64_t prefetch_cancelled; /* queued prefetches dropped before their load started */
    uint64_t prefetch_skipped;   /* predictions SCHED_PREFETCH_AUTO did not act on */
    bool prefetch_on;            /* AUTO's decision now (ON: true, OFF: false) */
    uint64_t layer_compute_ns;   /* AUTO's estimates now (kept across resets): compute per */
    uint64_t wrong_load_ns;      /* layer, and load time of a prediction's wrong experts */
    uint64_t *layer_hits;        /* [n_layer] expert hits per layer, owned by the scheduler */
    uint64_t *layer_misses;      /* [n_layer] expert misses per layer */
};

/* A snapshot (the per-layer arrays point into the scheduler; valid until it is destroyed). */
void sched_get_stats(const struct sched *s, struct sched_stats *out);
void sched_reset_stats(struct sched *s);

#endif /* MOERUN_SCHEDULER_H */
