/* Scheduler internals shared by its files (sched.c: layout, residency, dense ring, statistics;
 * issue.c: starting loads, the prefetch queue, completions; experts.c: expert cache, policies,
 * prediction). Not for other modules.
 *
 * Locking: one mutex and one condition variable guard all the state. The compute thread decides
 * loads under the mutex (marks the sections loading, records them in s->issue), then drops the
 * mutex and calls loader.load() for each (sched_flush_loads), so a loader may call
 * sched_load_done() synchronously from inside load(). s->issue is touched by the compute
 * thread only.
 *
 * Prefetch queue: a predicted expert gets a slot and state QUEUED; sched_pump() hands the
 * oldest queued ones to the loader while fewer than pf_cap prefetch loads are in flight. It
 * runs at the end of every compute-thread entry point (into s->issue) and in sched_load_done
 * (into a buffer on the completion thread's stack, started with the mutex dropped; s->issuers
 * counts such threads so sched_destroy waits for them). A completion delivered from inside a
 * load() this thread is making (a synchronous loader) does not pump: the thread making the
 * load() calls pumps once they return. */
#ifndef MOERUN_SCHED_IMPL_H
#define MOERUN_SCHED_IMPL_H

#include "scheduler.h"

#include <pthread.h>

#define SCHED_MSG 384 /* bytes of a failed load's message kept per slot */

struct sec_state {
    uint64_t last_use;   /* tick of the last request that needed it (or of its prefetch) */
    uint64_t uses;       /* requests that needed it */
    float score;         /* latest predicted score of its layer; 0 = none */
    int32_t slot;        /* dense or expert slot, -1 = none */
    uint32_t pins;       /* acquired / requested and not released */
    uint8_t state;       /* enum sched_state */
    uint8_t prefetched;  /* loaded from a prediction and not needed since */
    uint8_t pf_loading;  /* its load in flight was started as a prefetch (counts in pf_in_flight) */
    uint64_t qorder;     /* QUEUED: order of queueing (oldest starts first) */
    int32_t fail_status; /* FAILED: the load's status (what the waiting call returns) */
};

struct req_entry {
    uint32_t sec;
    int32_t expert;
    bool pinned; /* holds a pin on its section (present, or its load was started) */
    bool handed;
    bool released;
};

struct issue {
    uint32_t sec;
    void *dst;
};

/* SCHED_PREFETCH_AUTO's state (experts.c): running averages, the newest weighing 1/8. */
struct pf_auto {
    bool on;
    double ns_per_byte; /* cost of loading (sched_set_load_cost); 0 = not known yet */
    double compute_ns;  /* per layer, stalls excluded */
    double precision;   /* share of a prediction's top-k that its layer needed */
    double candidates;  /* experts of a prediction's top-k not resident, loading or queued */
    double wrong_ns;    /* the latest estimate */
    uint32_t n_compute, n_precision, n_cand;
    int64_t last_layer; /* the previous request's layer (-1: none), when, and stall_ns then */
    uint64_t last_ns, last_stall;
    uint64_t stall_ns; /* stalled in total (never reset) */
};

struct sched {
    struct sched_params p;
    struct sched_loader loader;
    struct sched_section *sections; /* [n_sections], a copy */
    struct sec_state *st;           /* [n_sections] */
    uint32_t n_sections;

    bool ring;
    uint32_t ahead; /* dense layers loaded ahead of the one acquired */
    uint32_t n_dslots, n_eslots;
    uint64_t dslot_bytes, eslot_bytes;
    uint8_t *dbase, *ebase;
    int32_t *dslot_sec, *eslot_sec; /* [slots] section held, -1 = free */
    char *dmsg, *emsg;              /* [slots][SCHED_MSG] message of a failed load */

    /* the current expert request */
    struct req_entry *req; /* [n_expert] */
    uint32_t req_n, req_handed, req_layer;
    bool req_active;
    uint8_t *mark; /* [n_expert] scratch marks */

    /* predictions: top-k of the latest one per layer, waiting for that layer's request */
    int32_t *pred_topk; /* [n_layer][k] */
    bool *pred_pending; /* [n_layer] */

    struct issue *issue; /* [n_dslots + n_eslots] loads to start once the mutex is dropped */
    uint32_t n_issue;

    uint64_t tick;
    uint32_t in_flight;    /* loads handed (or being handed) to the loader, not completed */
    uint32_t pf_cap;       /* prefetch loads in flight at most */
    bool pf_idle;          /* ... counting demand loads too (prefetch_when_idle) */
    uint32_t pf_in_flight; /* of in_flight, started as prefetches */
    uint32_t n_queued;     /* sections QUEUED */
    uint64_t qtick;
    uint32_t issuers; /* completion threads starting loads with the mutex dropped */
    bool closing;     /* sched_destroy: start nothing more */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct sched_stats stats;
    struct pf_auto pf;
};

/* Helpers (mutex held unless said otherwise). */
void *sched_slot_ptr(const struct sched *s, uint32_t sec, int32_t slot);
void sched_evict(struct sched *s, uint32_t sec); /* not loading, not pinned (QUEUED: cancels) */
void sched_place(struct sched *s, uint32_t sec, int32_t slot);          /* into slot, evicting */
void sched_start_load(struct sched *s, uint32_t sec, int32_t slot);     /* place, issue now */
void sched_queue_prefetch(struct sched *s, uint32_t sec, int32_t slot); /* place, QUEUED */
void sched_promote(struct sched *s, uint32_t sec);     /* QUEUED -> a demand load issued now */
void sched_pump(struct sched *s);                      /* start queued prefetches into s->issue */
int sched_take_failure(struct sched *s, uint32_t sec); /* report once, leave absent */
void sched_wait_load(struct sched *s);                 /* counts stall time */
uint64_t sched_now_ns(void);                           /* CLOCK_MONOTONIC */
void sched_flush_loads(struct sched *s);               /* mutex NOT held */
void sched_flush_locked(struct sched *s);              /* drop, start, retake */

#endif /* MOERUN_SCHED_IMPL_H */
