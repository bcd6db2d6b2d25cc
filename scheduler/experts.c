/* Scheduler: the expert cache (slots chosen by LRU, LFU or predicted use), requests, hand-out
 * and release, predictions with prefetch (queued, cancelled when no longer wanted) and their
 * precision/recall. */
#include "sched_impl.h"

#include "internal.h"

#include <string.h>

/* ---- expert cache --------------------------------------------------------------------------- */

/* true when x should give up its slot before y under the policy */
static bool worse(const struct sched *s, const struct sec_state *x, const struct sec_state *y) {
    switch (s->p.policy) {
    case SCHED_POLICY_LFU:
        if (x->uses != y->uses)
            return x->uses < y->uses;
        break;
    case SCHED_POLICY_PREDICTED:
        if (x->score != y->score)
            return x->score < y->score;
        break;
    case SCHED_POLICY_LRU:
        break;
    }
    return x->last_use < y->last_use;
}

/* An expert slot to load into: a free one, a failed load's, else the policy's victim among the
 * residents and queued prefetches (taking one's slot cancels it) that are not pinned (requested
 * and unreleased) and not marked in s->mark for layer excl_layer (-1: none). -1 when there is
 * none. */
static int32_t expert_pick(struct sched *s, int64_t excl_layer) {
    int32_t best = -1;
    for (uint32_t i = 0; i < s->n_eslots; i++) {
        int32_t x = s->eslot_sec[i];
        if (x < 0)
            return (int32_t)i;
        const struct sec_state *t = &s->st[x];
        if (t->pins || t->state == SCHED_LOADING)
            continue;
        if (t->state == SCHED_FAILED)
            return (int32_t)i;
        const struct sched_section *c = &s->sections[x];
        if ((int64_t)c->layer == excl_layer && s->mark[c->expert])
            continue;
        if (best < 0 || worse(s, t, &s->st[s->eslot_sec[best]]))
            best = (int32_t)i;
    }
    return best;
}

/* Pin the entries of the request that are present; start loads for the absent ones, in order,
 * while there are slots. */
static void issue_deferred(struct sched *s) {
    for (uint32_t i = 0; i < s->req_n; i++) {
        struct req_entry *r = &s->req[i];
        if (r->pinned || r->handed)
            continue;
        struct sec_state *t = &s->st[r->sec];
        if (t->state == SCHED_QUEUED) {
            sched_promote(s, r->sec);
        } else if (t->state == SCHED_ABSENT) {
            int32_t slot = expert_pick(s, -1);
            if (slot < 0)
                return;
            sched_start_load(s, r->sec, slot);
        }
        t->pins++;
        r->pinned = true;
    }
}

static bool has_deferred(const struct sched *s) {
    for (uint32_t i = 0; i < s->req_n; i++)
        if (!s->req[i].pinned && !s->req[i].handed)
            return true;
    return false;
}

/* Cancel the queued prefetches of layer `layer` not marked in s->mark, and those of layers the
 * execution has passed: not among the next n_layer / 2 after `layer`. */
static void cancel_queued(struct sched *s, uint32_t layer) {
    const uint32_t nl = s->p.n_layer, window = MR_MAX(nl / 2, 1u);
    for (uint32_t i = 0; i < s->n_eslots && s->n_queued; i++) {
        int32_t x = s->eslot_sec[i];
        if (x < 0 || s->st[x].state != SCHED_QUEUED)
            continue;
        const struct sched_section *c = &s->sections[x];
        uint32_t d = (c->layer + nl - layer) % nl;
        if (d == 0 ? !s->mark[c->expert] : d > window)
            sched_evict(s, (uint32_t)x);
    }
}

/* ---- prefetch on or off (SCHED_PREFETCH_AUTO; the model in scheduler.h) -------------------- */

static void average(double *avg, double v, uint32_t *n) {
    *avg = *n ? *avg + (v - *avg) / 8.0 : v;
    if (*n < UINT32_MAX)
        (*n)++;
}

/* A request of layer `layer`: the compute time since the previous layer's request (consecutive
 * layers only: the gap between tokens holds sampling and whatever the caller does), and how
 * right the prediction for this layer was (correct of k, when there was one). */
static void auto_observe(struct sched *s, uint32_t layer, int64_t correct) {
    struct pf_auto *a = &s->pf;
    const uint64_t now = sched_now_ns();
    if (a->last_layer >= 0 && (uint32_t)a->last_layer + 1 == layer) {
        const uint64_t wall = now - a->last_ns, stalled = a->stall_ns - a->last_stall;
        average(&a->compute_ns, wall > stalled ? (double)(wall - stalled) : 0.0, &a->n_compute);
    }
    a->last_layer = layer;
    a->last_ns = now;
    a->last_stall = a->stall_ns;
    if (correct >= 0)
        average(&a->precision, (double)correct / s->p.n_expert_used, &a->n_precision);
}

/* Whether to act on a prediction with `cand` of its top-k not resident (AUTO). */
static bool auto_decide(struct sched *s, uint32_t cand) {
    struct pf_auto *a = &s->pf;
    average(&a->candidates, cand, &a->n_cand);
    if (a->ns_per_byte <= 0.0 || a->n_compute < 4 || a->n_precision < 4)
        return a->on = true;
    /* a wrong load also takes a slot from an expert that is then missed as often as cached
     * experts are reused (hits that no prefetch brought, of the experts needed) */
    const struct sched_stats *st = &s->stats;
    const uint64_t needed = st->expert_hits + st->expert_misses;
    const double reuse =
        needed ? (double)(st->expert_hits - MR_MIN(st->prefetch_used, st->expert_hits)) / needed
               : 0.0;
    a->wrong_ns = (1.0 - a->precision) * a->candidates * (double)s->eslot_bytes * a->ns_per_byte *
                  (1.0 + reuse);
    a->on = a->wrong_ns < (a->on ? 1.25 : 0.8) * a->compute_ns;
    return a->on;
}

void sched_set_load_cost(struct sched *s, double ns_per_byte) {
    if (!s || !(ns_per_byte > 0.0))
        return;
    pthread_mutex_lock(&s->mu);
    s->pf.ns_per_byte = ns_per_byte;
    pthread_mutex_unlock(&s->mu);
}

/* End the current request: unpin what it still holds. */
static void end_request(struct sched *s) {
    for (uint32_t i = 0; i < s->req_n; i++) {
        struct req_entry *r = &s->req[i];
        if (r->pinned && s->st[r->sec].pins)
            s->st[r->sec].pins--;
        r->pinned = false;
    }
    s->req_n = 0;
    s->req_handed = 0;
    s->req_active = false;
}

int sched_experts_request(struct sched *s, uint32_t layer, const int32_t *experts, uint32_t n) {
    if (!s || layer >= s->p.n_layer || n > s->p.n_expert || (n && !experts))
        return mr_err(MOERUN_ERR_INVALID_ARG, "sched: request of %u experts for layer %u", n,
                      layer);
    pthread_mutex_lock(&s->mu);
    end_request(s);
    memset(s->mark, 0, s->p.n_expert);
    for (uint32_t i = 0; i < n; i++) {
        int32_t e = experts[i];
        if (e < 0 || (uint32_t)e >= s->p.n_expert || s->mark[e]) {
            pthread_mutex_unlock(&s->mu);
            return mr_err(MOERUN_ERR_INVALID_ARG,
                          "sched: layer %u: expert %d out of range or repeated", layer, e);
        }
        s->mark[e] = 1;
    }
    int64_t correct = -1;
    if (s->pred_pending[layer]) {
        const int32_t *top = s->pred_topk + (size_t)layer * s->p.n_expert_used;
        correct = 0;
        for (uint32_t i = 0; i < s->p.n_expert_used; i++)
            correct += s->mark[top[i]];
        s->stats.predicted_correct += (uint64_t)correct;
        s->stats.predicted += s->p.n_expert_used;
        s->stats.needed += n;
        s->pred_pending[layer] = false;
    }
    auto_observe(s, layer, correct);
    s->req_layer = layer;
    s->req_active = true;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t sec = sched_section_index(s->p.n_layer, s->p.n_expert, layer, experts[i]);
        struct sec_state *t = &s->st[sec];
        struct req_entry *r = &s->req[s->req_n++];
        if (t->state == SCHED_FAILED)
            sched_evict(s, sec); /* failed before anyone needed it: load it again */
        r->sec = sec;
        r->expert = experts[i];
        r->handed = r->released = false;
        r->pinned = false;
        t->uses++;
        t->last_use = ++s->tick;
        if (t->state == SCHED_RESIDENT || t->state == SCHED_LOADING) {
            s->stats.expert_hits++;
            s->stats.layer_hits[layer]++;
            if (t->prefetched)
                s->stats.prefetch_used++;
            t->prefetched = 0;
        } else {
            if (t->state == SCHED_QUEUED)
                sched_promote(s, sec); /* not loaded ahead after all: a miss, loading now */
            s->stats.expert_misses++;
            s->stats.layer_misses[layer]++;
        }
        if (t->state != SCHED_ABSENT) {
            t->pins++;
            r->pinned = true;
        }
    }
    if (s->n_queued)
        cancel_queued(s, layer);
    issue_deferred(s);
    sched_pump(s);
    pthread_mutex_unlock(&s->mu);
    sched_flush_loads(s);
    return MOERUN_OK;
}

int sched_experts_next(struct sched *s, uint32_t layer, int32_t *expert, const void **base) {
    if (!s || !expert || !base)
        return mr_err(MOERUN_ERR_INVALID_ARG, "sched: experts_next without outputs");
    pthread_mutex_lock(&s->mu);
    int rc;
    if (!s->req_active || s->req_layer != layer) {
        pthread_mutex_unlock(&s->mu);
        return mr_err(MOERUN_ERR_INVALID_ARG, "sched: experts_next for layer %u, not requested",
                      layer);
    }
    for (;;) {
        if (s->req_handed == s->req_n) {
            rc = 1;
            break;
        }
        int32_t found = -1, failed = -1;
        for (uint32_t i = 0; i < s->req_n && found < 0; i++) {
            const struct req_entry *r = &s->req[i];
            if (!r->pinned || r->handed)
                continue;
            if (s->st[r->sec].state == SCHED_RESIDENT)
                found = (int32_t)i;
            else if (s->st[r->sec].state == SCHED_FAILED && failed < 0)
                failed = (int32_t)i;
        }
        if (found >= 0) {
            struct req_entry *r = &s->req[found];
            r->handed = true;
            s->req_handed++;
            *expert = r->expert;
            *base = sched_slot_ptr(s, r->sec, s->st[r->sec].slot);
            rc = MOERUN_OK;
            break;
        }
        if (failed >= 0) {
            struct req_entry *r = &s->req[failed];
            r->pinned = false; /* back to deferred: the next call loads it again */
            s->st[r->sec].pins--;
            rc = sched_take_failure(s, r->sec);
            break;
        }
        issue_deferred(s);
        if (s->n_issue) {
            sched_flush_locked(s);
        } else if (s->in_flight) {
            sched_wait_load(s);
        } else {
            rc = mr_err(MOERUN_ERR_INVALID_ARG,
                        "sched: layer %u: every expert slot holds a handed-out expert; release "
                        "computed experts before asking for more",
                        layer);
            break;
        }
    }
    sched_pump(s);
    pthread_mutex_unlock(&s->mu);
    sched_flush_loads(s);
    return rc;
}

void sched_expert_release(struct sched *s, uint32_t layer, int32_t expert) {
    if (!s)
        return;
    pthread_mutex_lock(&s->mu);
    if (s->req_active && s->req_layer == layer) {
        for (uint32_t i = 0; i < s->req_n; i++) {
            struct req_entry *r = &s->req[i];
            if (r->expert != expert || !r->handed || r->released)
                continue;
            r->released = true;
            if (r->pinned) {
                s->st[r->sec].pins--;
                r->pinned = false;
            }
            break;
        }
        issue_deferred(s); /* the freed slot takes the next waiting expert */
    }
    sched_pump(s);
    pthread_mutex_unlock(&s->mu);
    sched_flush_loads(s);
}

void sched_predict(struct sched *s, uint32_t layer, const float *scores) {
    if (!s || !scores || layer >= s->p.n_layer || s->p.n_expert == 0)
        return;
    const uint32_t ne = s->p.n_expert, k = s->p.n_expert_used;
    pthread_mutex_lock(&s->mu);
    uint32_t first = sched_section_index(s->p.n_layer, ne, layer, 0);
    for (uint32_t e = 0; e < ne; e++) {
        float v = scores[e];
        s->st[first + e].score = v == v ? v : 0.0f; /* NaN counts as no prediction */
    }
    /* top-k, ties to the lower index */
    int32_t *top = s->pred_topk + (size_t)layer * k;
    memset(s->mark, 0, ne);
    for (uint32_t i = 0; i < k; i++) {
        int32_t best = -1;
        for (uint32_t e = 0; e < ne; e++)
            if (!s->mark[e] && (best < 0 || s->st[first + e].score > s->st[first + best].score))
                best = (int32_t)e;
        top[i] = best;
        s->mark[best] = 1;
    }
    s->pred_pending[layer] = true;
    /* the queued prefetches of this layer that the new top-k no longer names */
    for (uint32_t e = 0; e < ne && s->n_queued; e++)
        if (!s->mark[e] && s->st[first + e].state == SCHED_QUEUED)
            sched_evict(s, first + e);
    /* prefetch (AUTO: while it pays), unless the layer computing still waits for slots: queue
     * the loads, most likely first; the pump starts them as the in-flight cap allows */
    bool act = s->p.prefetch == SCHED_PREFETCH_ON;
    if (s->p.prefetch == SCHED_PREFETCH_AUTO) {
        uint32_t cand = 0;
        for (uint32_t i = 0; i < k; i++) {
            const uint8_t st = s->st[first + (uint32_t)top[i]].state;
            cand += st != SCHED_RESIDENT && st != SCHED_LOADING && st != SCHED_QUEUED;
        }
        act = auto_decide(s, cand);
        s->stats.prefetch_skipped += !act;
    }
    if (act && !has_deferred(s)) {
        for (uint32_t i = 0; i < k; i++) {
            uint32_t sec = first + (uint32_t)top[i];
            struct sec_state *t = &s->st[sec];
            if (t->state == SCHED_RESIDENT || t->state == SCHED_LOADING || t->state == SCHED_QUEUED)
                continue;
            if (t->state == SCHED_FAILED && t->pins == 0)
                sched_evict(s, sec);
            if (t->state != SCHED_ABSENT)
                continue;
            int32_t slot = expert_pick(s, layer);
            if (slot < 0)
                break;
            sched_queue_prefetch(s, sec, slot);
            t->last_use = ++s->tick;
        }
    }
    sched_pump(s);
    pthread_mutex_unlock(&s->mu);
    sched_flush_loads(s);
}
