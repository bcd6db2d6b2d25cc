/* Scheduler: layout of the region into slots, dense ring, statistics, create/destroy. Starting
 * loads, the prefetch queue and completions are in issue.c; the expert cache, its policies and
 * prediction in experts.c; the shared state and the locking rules in sched_impl.h. */
#include "sched_impl.h"

#include "internal.h"

#include <string.h>

/* ---- layout --------------------------------------------------------------------------------- */

static uint64_t round_align(uint64_t x) {
    uint64_t r = (x + SCHED_ALIGN - 1) & ~(uint64_t)(SCHED_ALIGN - 1);
    return r ? r : SCHED_ALIGN;
}

static void slot_sizes(const struct sched_params *p, const struct sched_section *sec, uint32_t n,
                       uint64_t *dense, uint64_t *expert) {
    uint64_t d = 0, e = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (sec[i].expert < 0)
            d = MR_MAX(d, sec[i].slot_bytes);
        else
            e = MR_MAX(e, sec[i].slot_bytes);
    }
    *dense = round_align(d);
    *expert = p->n_expert ? round_align(e) : 0;
}

/* a * b + c, or UINT64_MAX when it overflows */
static uint64_t mul_add_sat(uint64_t a, uint64_t b, uint64_t c) {
    uint64_t m, r;
    if (mr_mul_overflow_u64(a, b, &m) || mr_add_overflow_u64(m, c, &r))
        return UINT64_MAX;
    return r;
}

uint64_t sched_min_bytes(const struct sched_params *p, const struct sched_section *sections,
                         uint32_t n_sections) {
    if (!p || !sections)
        return 0;
    uint64_t d, e;
    slot_sizes(p, sections, n_sections, &d, &e);
    return mul_add_sat(MR_MIN(p->n_layer, 2u), d, mul_add_sat(p->n_expert_used, e, 0));
}

static int check_args(const struct sched_params *p, const struct sched_section *sections,
                      uint32_t n_sections) {
    if (p->n_layer == 0)
        return mr_err(MOERUN_ERR_INVALID_ARG, "sched: n_layer is 0");
    if (p->n_expert ? (p->n_expert_used == 0 || p->n_expert_used > p->n_expert)
                    : p->n_expert_used != 0)
        return mr_err(MOERUN_ERR_INVALID_ARG, "sched: n_expert_used %u with n_expert %u",
                      p->n_expert_used, p->n_expert);
    uint64_t want = mul_add_sat(p->n_layer, p->n_expert, p->n_layer);
    if (want != n_sections)
        return mr_err(MOERUN_ERR_INVALID_ARG, "sched: %u sections, expected %llu", n_sections,
                      (unsigned long long)want);
    if ((unsigned)p->prefetch > SCHED_PREFETCH_AUTO)
        return mr_err(MOERUN_ERR_INVALID_ARG, "sched: prefetch mode %d", (int)p->prefetch);
    if (!p->region || ((uintptr_t)p->region & (SCHED_ALIGN - 1)))
        return mr_err(MOERUN_ERR_INVALID_ARG, "sched: region %p is not %u-byte aligned", p->region,
                      SCHED_ALIGN);
    return sched_check_sections(sections, n_sections, p->n_layer, p->n_expert, "sched");
}

int sched_check_sections(const struct sched_section *sections, uint32_t n_sections,
                         uint32_t n_layer, uint32_t n_expert, const char *who) {
    for (uint32_t i = 0; i < n_sections; i++) {
        const struct sched_section *c = &sections[i];
        if (c->layer >= n_layer || c->expert >= (int32_t)n_expert ||
            sched_section_index(n_layer, n_expert, c->layer, c->expert < 0 ? -1 : c->expert) != i ||
            c->n_ranges > SCHED_MAX_RANGES)
            return mr_err(MOERUN_ERR_INVALID_ARG,
                          "%s: section %u (layer %u expert %d, %u ranges) is out of place", who, i,
                          c->layer, c->expert, c->n_ranges);
        for (uint32_t r = 0; r < c->n_ranges; r++) {
            uint64_t end;
            if (mr_add_overflow_u64(c->ranges[r].slot_offset, c->ranges[r].bytes, &end) ||
                end > c->slot_bytes)
                return mr_err(MOERUN_ERR_INVALID_ARG,
                              "%s: layer %u expert %d: range %u ends past slot_bytes %llu", who,
                              c->layer, c->expert, r, (unsigned long long)c->slot_bytes);
        }
    }
    return MOERUN_OK;
}

/* ---- dense ring ----------------------------------------------------------------------------- */

/* Execution distance from layer `next` (about to run) to layer x. */
static uint32_t dist(const struct sched *s, uint32_t x, uint32_t next) {
    return (x + s->p.n_layer - next) % s->p.n_layer;
}

/* A slot for dense layer j when `next` is the layer about to run: its own (all resident), a
 * free one, else the slot whose layer is needed furthest in the future and later than j (never
 * a pinned or loading one). -1 when there is none. */
static int32_t dense_pick(struct sched *s, uint32_t j, uint32_t next) {
    if (!s->ring)
        return (int32_t)j;
    int32_t best = -1;
    uint32_t best_d = dist(s, j, next);
    for (uint32_t i = 0; i < s->n_dslots; i++) {
        int32_t x = s->dslot_sec[i];
        if (x < 0)
            return (int32_t)i;
        const struct sec_state *t = &s->st[x];
        if (t->pins || t->state == SCHED_LOADING)
            continue;
        uint32_t d = dist(s, (uint32_t)x, next); /* a failed one waits for its acquire */
        if (d > best_d) {
            best_d = d;
            best = (int32_t)i;
        }
    }
    return best;
}

/* Start the loads of the layers next .. next + count - 1 that are absent (or whose load ahead
 * failed before anyone waited for it: tried again). */
static void dense_fill(struct sched *s, uint32_t next, uint32_t count) {
    for (uint32_t a = 0; a < count; a++) {
        uint32_t j = (next + a) % s->p.n_layer;
        if (s->st[j].state == SCHED_FAILED && s->st[j].pins == 0)
            sched_evict(s, j);
        if (s->st[j].state != SCHED_ABSENT)
            continue;
        int32_t slot = dense_pick(s, j, next);
        if (slot < 0)
            break;
        sched_start_load(s, j, slot);
    }
}

int sched_dense_acquire(struct sched *s, uint32_t layer, const void **base) {
    if (!s || !base || layer >= s->p.n_layer)
        return mr_err(MOERUN_ERR_INVALID_ARG, "sched: dense acquire of layer %u", layer);
    pthread_mutex_lock(&s->mu);
    struct sec_state *t = &s->st[layer];
    if (t->state == SCHED_FAILED)
        sched_evict(s, layer); /* failed before this call waited for it: load it again */
    if (t->state == SCHED_ABSENT)
        s->stats.dense_misses++;
    else
        s->stats.dense_hits++;
    bool filled = false;
    int rc;
    for (;;) {
        if (t->state == SCHED_RESIDENT) {
            t->pins++;
            *base = sched_slot_ptr(s, layer, t->slot);
            rc = MOERUN_OK;
            break;
        }
        if (t->state == SCHED_FAILED) {
            rc = sched_take_failure(s, layer);
            break;
        }
        if (t->state == SCHED_ABSENT) {
            int32_t slot = dense_pick(s, layer, layer);
            if (slot >= 0) {
                sched_start_load(s, layer, slot);
            } else if (s->in_flight == 0) {
                rc = mr_err(MOERUN_ERR_BUDGET,
                            "sched: no ring slot for layer %u: all %u hold acquired layers", layer,
                            s->n_dslots);
                break;
            }
        }
        if (!filled && t->state == SCHED_LOADING) {
            dense_fill(s, layer + 1, s->ahead);
            filled = true;
        }
        if (s->n_issue)
            sched_flush_locked(s);
        else
            sched_wait_load(s);
    }
    if (rc == MOERUN_OK && !filled)
        dense_fill(s, layer + 1, s->ahead);
    sched_pump(s);
    pthread_mutex_unlock(&s->mu);
    sched_flush_loads(s);
    return rc;
}

void sched_dense_release(struct sched *s, uint32_t layer) {
    if (!s || layer >= s->p.n_layer)
        return;
    pthread_mutex_lock(&s->mu);
    if (s->st[layer].pins)
        s->st[layer].pins--;
    /* the released slot can take the layer after the ones already ahead */
    dense_fill(s, layer + 1, s->ring ? s->n_dslots : s->ahead);
    sched_pump(s);
    pthread_mutex_unlock(&s->mu);
    sched_flush_loads(s);
}

/* ---- statistics and introspection ----------------------------------------------------------- */

void sched_get_stats(const struct sched *s, struct sched_stats *out) {
    if (!s || !out)
        return;
    struct sched *m = (struct sched *)s; /* the mutex is not part of the logical state */
    pthread_mutex_lock(&m->mu);
    *out = s->stats;
    out->prefetch_on = s->pf.on;
    out->layer_compute_ns = (uint64_t)s->pf.compute_ns;
    out->wrong_load_ns = (uint64_t)s->pf.wrong_ns;
    pthread_mutex_unlock(&m->mu);
}

void sched_reset_stats(struct sched *s) {
    if (!s)
        return;
    pthread_mutex_lock(&s->mu);
    uint64_t *h = s->stats.layer_hits, *m = s->stats.layer_misses;
    memset(&s->stats, 0, sizeof(s->stats));
    memset(h, 0, s->p.n_layer * sizeof(*h));
    memset(m, 0, s->p.n_layer * sizeof(*m));
    s->stats.layer_hits = h;
    s->stats.layer_misses = m;
    pthread_mutex_unlock(&s->mu);
}

void sched_get_layout(const struct sched *s, struct sched_layout *out) {
    if (!s || !out)
        return;
    out->ring = s->ring;
    out->n_dense_slots = s->n_dslots;
    out->n_expert_slots = s->n_eslots;
    out->dense_slot_bytes = s->dslot_bytes;
    out->expert_slot_bytes = s->eslot_bytes;
}

int32_t sched_slot_index(const struct sched *s, const void *base) {
    const uint8_t *b = base;
    if (s->dslot_bytes && b >= s->dbase && b < s->dbase + s->n_dslots * s->dslot_bytes &&
        (uint64_t)(b - s->dbase) % s->dslot_bytes == 0)
        return (int32_t)((uint64_t)(b - s->dbase) / s->dslot_bytes);
    if (s->eslot_bytes && b >= s->ebase && b < s->ebase + s->n_eslots * s->eslot_bytes &&
        (uint64_t)(b - s->ebase) % s->eslot_bytes == 0)
        return (int32_t)(s->n_dslots + (uint64_t)(b - s->ebase) / s->eslot_bytes);
    return -1;
}

enum sched_state sched_section_state(const struct sched *s, uint32_t layer, int32_t expert) {
    if (!s || layer >= s->p.n_layer || expert >= (int32_t)s->p.n_expert)
        return SCHED_ABSENT;
    struct sched *m = (struct sched *)s;
    pthread_mutex_lock(&m->mu);
    enum sched_state st =
        (enum sched_state)s
            ->st[sched_section_index(s->p.n_layer, s->p.n_expert, layer, expert < 0 ? -1 : expert)]
            .state;
    pthread_mutex_unlock(&m->mu);
    return st;
}

/* ---- create / destroy ----------------------------------------------------------------------- */

static void free_all(struct sched *s) {
    mr_free(NULL, s->sections);
    mr_free(NULL, s->st);
    mr_free(NULL, s->dslot_sec);
    mr_free(NULL, s->eslot_sec);
    mr_free(NULL, s->dmsg);
    mr_free(NULL, s->emsg);
    mr_free(NULL, s->req);
    mr_free(NULL, s->mark);
    mr_free(NULL, s->pred_topk);
    mr_free(NULL, s->pred_pending);
    mr_free(NULL, s->issue);
    mr_free(NULL, s->stats.layer_hits);
    mr_free(NULL, s->stats.layer_misses);
    mr_free(NULL, s);
}

int sched_create(const struct sched_params *p, const struct sched_section *sections,
                 uint32_t n_sections, struct sched_loader loader, struct sched **out) {
    if (!out)
        return mr_err(MOERUN_ERR_INVALID_ARG, "sched: create without out");
    *out = NULL;
    if (!p || !sections || !loader.load)
        return mr_err(MOERUN_ERR_INVALID_ARG, "sched: create without params, sections or loader");
    int rc = check_args(p, sections, n_sections);
    if (rc != MOERUN_OK)
        return rc;

    uint64_t d, e;
    slot_sizes(p, sections, n_sections, &d, &e);
    const uint64_t min = sched_min_bytes(p, sections, n_sections);
    if (p->region_bytes < min)
        return mr_err(MOERUN_ERR_BUDGET,
                      "sched: host region of %llu bytes is below the minimum of %llu bytes "
                      "(%.1f MiB: %u dense slots of %llu and %u expert slots of %llu bytes)",
                      (unsigned long long)p->region_bytes, (unsigned long long)min,
                      (double)min / (1024.0 * 1024.0), MR_MIN(p->n_layer, 2u),
                      (unsigned long long)d, p->n_expert_used, (unsigned long long)e);

    const uint64_t experts_min = (uint64_t)p->n_expert_used * e;
    const uint64_t all = mul_add_sat(p->n_layer, d, experts_min);
    bool ring = all > p->region_bytes;
    uint64_t n_dslots;
    if (!ring) {
        n_dslots = p->n_layer;
    } else {
        uint64_t want = p->ring_ahead ? (uint64_t)p->ring_ahead + 1 : 2;
        uint64_t fit = (p->region_bytes - experts_min) / d; /* >= 2, < n_layer */
        n_dslots = MR_MIN(want, fit);
    }
    uint64_t n_eslots = e ? (p->region_bytes - n_dslots * d) / e : 0;
    n_eslots = MR_MIN(n_eslots, (uint64_t)p->n_layer * p->n_expert);

    struct sched *s = mr_calloc(NULL, 1, sizeof(*s));
    if (!s)
        return mr_err(MOERUN_ERR_NOMEM, "sched: out of memory");
    s->p = *p;
    s->loader = loader;
    s->n_sections = n_sections;
    s->ring = ring;
    s->n_dslots = (uint32_t)n_dslots;
    s->n_eslots = (uint32_t)n_eslots;
    s->dslot_bytes = d;
    s->eslot_bytes = e;
    s->dbase = p->region;
    s->ebase = s->dbase + n_dslots * d;
    s->ahead = ring ? s->n_dslots - 1 : MR_MIN(MR_MAX(p->ring_ahead, 1u), p->n_layer - 1);
    s->pf_cap = p->prefetch_in_flight ? p->prefetch_in_flight : MR_MAX(p->n_expert_used, 1u);
    s->pf_idle = p->prefetch_when_idle;
    s->pf.on = p->prefetch != SCHED_PREFETCH_OFF;
    s->pf.last_layer = -1;
    const uint32_t ne = p->n_expert ? p->n_expert : 1;
    s->sections = mr_alloc(NULL, (size_t)n_sections * sizeof(*sections), 0);
    s->st = mr_calloc(NULL, n_sections, sizeof(*s->st));
    s->dslot_sec = mr_calloc(NULL, s->n_dslots, sizeof(int32_t));
    s->eslot_sec = mr_calloc(NULL, s->n_eslots + 1, sizeof(int32_t));
    s->dmsg = mr_calloc(NULL, s->n_dslots, SCHED_MSG);
    s->emsg = mr_calloc(NULL, s->n_eslots + 1, SCHED_MSG);
    s->req = mr_calloc(NULL, ne, sizeof(*s->req));
    s->mark = mr_calloc(NULL, ne, 1);
    s->pred_topk =
        mr_calloc(NULL, (size_t)p->n_layer * MR_MAX(p->n_expert_used, 1u), sizeof(int32_t));
    s->pred_pending = mr_calloc(NULL, p->n_layer, sizeof(bool));
    s->issue = mr_calloc(NULL, (size_t)s->n_dslots + s->n_eslots, sizeof(*s->issue));
    s->stats.layer_hits = mr_calloc(NULL, p->n_layer, sizeof(uint64_t));
    s->stats.layer_misses = mr_calloc(NULL, p->n_layer, sizeof(uint64_t));
    if (!s->sections || !s->st || !s->dslot_sec || !s->eslot_sec || !s->dmsg || !s->emsg ||
        !s->req || !s->mark || !s->pred_topk || !s->pred_pending || !s->issue ||
        !s->stats.layer_hits || !s->stats.layer_misses) {
        free_all(s);
        return mr_err(MOERUN_ERR_NOMEM, "sched: out of memory for the tables of %u sections",
                      n_sections);
    }
    memcpy(s->sections, sections, (size_t)n_sections * sizeof(*sections));
    for (uint32_t i = 0; i < n_sections; i++)
        s->st[i].slot = -1;
    for (uint32_t i = 0; i < s->n_dslots; i++)
        s->dslot_sec[i] = -1;
    for (uint32_t i = 0; i < s->n_eslots; i++)
        s->eslot_sec[i] = -1;
    if (pthread_mutex_init(&s->mu, NULL)) {
        free_all(s);
        return mr_err(MOERUN_ERR_NOMEM, "sched: pthread_mutex_init failed");
    }
    if (pthread_cond_init(&s->cv, NULL)) {
        pthread_mutex_destroy(&s->mu);
        free_all(s);
        return mr_err(MOERUN_ERR_NOMEM, "sched: pthread_cond_init failed");
    }
    mr_log_debug("sched: %s, %u dense slots of %llu, %u expert slots of %llu bytes",
                 ring ? "dense ring" : "dense resident", s->n_dslots, (unsigned long long)d,
                 s->n_eslots, (unsigned long long)e);
    *out = s;
    return MOERUN_OK;
}

void sched_destroy(struct sched *s) {
    if (!s)
        return;
    pthread_mutex_lock(&s->mu);
    s->closing = true; /* queued prefetches stay queued */
    while (s->in_flight || s->issuers)
        pthread_cond_wait(&s->cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    free_all(s);
}
