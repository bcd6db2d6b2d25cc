/* Scheduler: slots and the residency table, starting loads (now or queued as prefetches), the
 * prefetch queue and its cap, completions. Locking rules in sched_impl.h. */
#include "sched_impl.h"

#include "internal.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

#define DONE_ISSUE 8 /* loads a completion thread starts per round */

/* The scheduler whose loader.load() this thread is inside (a completion delivered from there
 * does not pump), and whether such a completion asked for a pump. */
static _Thread_local const struct sched *tl_in_load;
static _Thread_local bool tl_owed;

/* ---- residency helpers (mutex held) --------------------------------------------------------- */

static bool sec_is_dense(const struct sched *s, uint32_t sec) {
    return sec < s->p.n_layer;
}

void *sched_slot_ptr(const struct sched *s, uint32_t sec, int32_t slot) {
    return sec_is_dense(s, sec) ? s->dbase + (uint64_t)slot * s->dslot_bytes
                                : s->ebase + (uint64_t)slot * s->eslot_bytes;
}

static char *slot_msg(struct sched *s, uint32_t sec, int32_t slot) {
    return (sec_is_dense(s, sec) ? s->dmsg : s->emsg) + (size_t)slot * SCHED_MSG;
}

static int32_t *slot_table(struct sched *s, uint32_t sec) {
    return sec_is_dense(s, sec) ? s->dslot_sec : s->eslot_sec;
}

/* Drop a section that is not loading and not pinned from its slot; a queued prefetch is
 * cancelled (never handed to the loader). */
void sched_evict(struct sched *s, uint32_t sec) {
    struct sec_state *t = &s->st[sec];
    if (t->state == SCHED_QUEUED) {
        s->n_queued--;
        s->stats.prefetch_cancelled++;
    }
    if (t->slot >= 0)
        slot_table(s, sec)[t->slot] = -1;
    t->slot = -1;
    t->state = SCHED_ABSENT;
    t->prefetched = 0;
}

/* Put sec into slot, evicting what is there (and a failed load's leftover slot of sec). */
void sched_place(struct sched *s, uint32_t sec, int32_t slot) {
    int32_t *table = slot_table(s, sec);
    if (s->st[sec].slot >= 0 && s->st[sec].slot != slot)
        sched_evict(s, sec);
    if (table[slot] >= 0 && (uint32_t)table[slot] != sec)
        sched_evict(s, (uint32_t)table[slot]);
    table[slot] = (int32_t)sec;
    s->st[sec].slot = slot;
}

/* Mark sec (placed in its slot) loading and record its load in *to. */
static void issue(struct sched *s, uint32_t sec, bool prefetch, struct issue *to) {
    struct sec_state *t = &s->st[sec];
    t->state = SCHED_LOADING;
    t->pf_loading = prefetch;
    s->in_flight++;
    s->pf_in_flight += prefetch;
    to->sec = sec;
    to->dst = sched_slot_ptr(s, sec, t->slot);
    const struct sched_section *c = &s->sections[sec];
    for (uint32_t r = 0; r < c->n_ranges; r++)
        s->stats.bytes_loaded += c->ranges[r].bytes;
    s->stats.loads++;
    if (prefetch) {
        t->prefetched = 1;
        s->stats.prefetch_issued++;
    }
}

/* A demand load: into slot now (compute thread). */
void sched_start_load(struct sched *s, uint32_t sec, int32_t slot) {
    sched_place(s, sec, slot);
    issue(s, sec, false, &s->issue[s->n_issue++]);
}

/* A prefetch: slot reserved, load queued. */
void sched_queue_prefetch(struct sched *s, uint32_t sec, int32_t slot) {
    sched_place(s, sec, slot);
    struct sec_state *t = &s->st[sec];
    t->state = SCHED_QUEUED;
    t->prefetched = 0;
    t->qorder = ++s->qtick;
    s->n_queued++;
}

/* A queued prefetch that is needed now: start it as a demand load (compute thread). */
void sched_promote(struct sched *s, uint32_t sec) {
    s->n_queued--;
    issue(s, sec, false, &s->issue[s->n_issue++]);
}

/* Start the oldest queued prefetches while fewer than pf_cap prefetch loads (with pf_idle: loads
 * of any kind) are in flight, at most max, into to[]. Returns how many. */
static uint32_t pump(struct sched *s, struct issue *to, uint32_t max) {
    uint32_t n = 0;
    while (n < max && s->n_queued && (s->pf_idle ? s->in_flight : s->pf_in_flight) < s->pf_cap &&
           !s->closing) {
        int32_t best = -1;
        for (uint32_t i = 0; i < s->n_eslots; i++) {
            int32_t x = s->eslot_sec[i];
            if (x >= 0 && s->st[x].state == SCHED_QUEUED &&
                (best < 0 || s->st[x].qorder < s->st[best].qorder))
                best = x;
        }
        if (best < 0) { /* cannot happen: n_queued counts the QUEUED sections */
            mr_log_error("sched: %u queued prefetches not found", s->n_queued);
            s->n_queued = 0;
            break;
        }
        s->n_queued--;
        issue(s, (uint32_t)best, true, &to[n++]);
    }
    return n;
}

void sched_pump(struct sched *s) {
    s->n_issue += pump(s, s->issue + s->n_issue, s->n_dslots + s->n_eslots - s->n_issue);
}

/* Completion of sec's load (mutex held). */
static void finish(struct sched *s, uint32_t sec, int status, const char *msg) {
    struct sec_state *t = &s->st[sec];
    if (t->state != SCHED_LOADING) {
        mr_log_warn("sched: completion for layer %u expert %d that is not loading",
                    s->sections[sec].layer, s->sections[sec].expert);
        return;
    }
    s->in_flight--;
    if (t->pf_loading)
        s->pf_in_flight--;
    t->pf_loading = 0;
    if (status == MOERUN_OK) {
        t->state = SCHED_RESIDENT;
    } else {
        t->state = SCHED_FAILED;
        t->fail_status = status;
        snprintf(slot_msg(s, sec, t->slot), SCHED_MSG, "%s",
                 msg && *msg ? msg : moerun_status_str(status));
    }
    pthread_cond_broadcast(&s->cv);
}

/* Report a failed load once and leave the section absent so a later call retries it. */
int sched_take_failure(struct sched *s, uint32_t sec) {
    char msg[SCHED_MSG];
    memcpy(msg, slot_msg(s, sec, s->st[sec].slot), SCHED_MSG);
    msg[SCHED_MSG - 1] = 0;
    const int status = s->st[sec].fail_status < 0 ? s->st[sec].fail_status : MOERUN_ERR_IO;
    sched_evict(s, sec);
    const struct sched_section *c = &s->sections[sec];
    if (c->expert < 0)
        return mr_err(status, "sched: loading layer %u dense part: %s", c->layer, msg);
    return mr_err(status, "sched: loading layer %u expert %d: %s", c->layer, c->expert, msg);
}

uint64_t sched_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Wait for a completion, counting the time as stall. */
void sched_wait_load(struct sched *s) {
    uint64_t t0 = sched_now_ns();
    pthread_cond_wait(&s->cv, &s->mu);
    const uint64_t dt = sched_now_ns() - t0;
    s->stats.stall_ns += dt;
    s->pf.stall_ns += dt;
}

/* ---- starting loads (mutex NOT held) -------------------------------------------------------- */

/* Hand the recorded loads to the loader; a refusal completes the load as failed. */
static void start_all(struct sched *s, const struct issue *list, uint32_t n) {
    const struct sched *prev = tl_in_load;
    tl_in_load = s;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t sec = list[i].sec;
        int rc = s->loader.load(s->loader.ctx, &s->sections[sec], list[i].dst, sec);
        if (rc != MOERUN_OK) {
            const char *msg = moerun_errmsg();
            pthread_mutex_lock(&s->mu);
            finish(s, sec, rc, msg && *msg ? msg : "loader refused the request");
            pthread_mutex_unlock(&s->mu);
            tl_owed = true; /* a prefetch's place in flight may have opened */
        }
    }
    tl_in_load = prev;
}

/* Start the recorded loads (compute thread), then the queued prefetches that completions
 * delivered from inside them made room for. */
void sched_flush_loads(struct sched *s) {
    tl_owed = false;
    while (s->n_issue) {
        start_all(s, s->issue, s->n_issue);
        s->n_issue = 0;
        if (!tl_owed)
            break;
        tl_owed = false;
        pthread_mutex_lock(&s->mu);
        sched_pump(s);
        pthread_mutex_unlock(&s->mu);
    }
}

/* Drop the mutex, start the recorded loads, take the mutex again. */
void sched_flush_locked(struct sched *s) {
    pthread_mutex_unlock(&s->mu);
    sched_flush_loads(s);
    pthread_mutex_lock(&s->mu);
}

/* ---- completion ----------------------------------------------------------------------------- */

void sched_load_done(struct sched *s, uint64_t tag, int status, const char *msg) {
    if (!s)
        return;
    pthread_mutex_lock(&s->mu);
    if (tag >= s->n_sections) {
        mr_log_warn("sched: completion with unknown tag %llu", (unsigned long long)tag);
        pthread_mutex_unlock(&s->mu);
        return;
    }
    finish(s, (uint32_t)tag, status, msg);
    if (tl_in_load == s) { /* from inside our own load(): its caller pumps */
        tl_owed = true;
        pthread_mutex_unlock(&s->mu);
        return;
    }
    struct issue list[DONE_ISSUE]; /* this thread's own: s->issue is the compute thread's */
    uint32_t n;
    while ((n = pump(s, list, DONE_ISSUE)) != 0) {
        s->issuers++;
        pthread_mutex_unlock(&s->mu);
        start_all(s, list, n);
        pthread_mutex_lock(&s->mu);
        if (--s->issuers == 0)
            pthread_cond_broadcast(&s->cv);
    }
    tl_owed = false;
    pthread_mutex_unlock(&s->mu);
}
