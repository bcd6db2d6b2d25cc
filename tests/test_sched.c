/* Scheduler against a fake model file and a fake loader: slot layout and the minimum budget,
 * dense parts resident or flowing through the ring in execution order, every eviction policy
 * on scripted requests, prefetch and precision/recall, the prefetch queue (in-flight cap,
 * cancellation, promotion) with a loader that holds loads until released, batches larger than
 * the cache, injected load failures, statistics, and a randomized stress run with a threaded
 * loader. Every section
 * handed out is compared with the fake file's bytes. Fresh random data each run
 * (MOERUN_TEST_SEED replays a run). */
#include "fake_queue.h"
#include "testutil.h"

#include "internal.h"
#include "moerun.h"
#include "scheduler.h"

#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ---- fake model: sections over a file of random bytes ---------------------------------------- */

struct model {
    uint32_t n_layer, n_expert, k;
    uint32_t n_sections;
    struct sched_section *secs;
    uint8_t *file;
    size_t file_bytes;
    uint64_t dslot, eslot; /* expected slot sizes */
};

static uint64_t align_up(uint64_t x) {
    return (x + SCHED_ALIGN - 1) / SCHED_ALIGN * SCHED_ALIGN;
}

static void model_make(struct model *m, uint32_t n_layer, uint32_t n_expert, uint32_t k) {
    memset(m, 0, sizeof(*m));
    m->n_layer = n_layer;
    m->n_expert = n_expert;
    m->k = k;
    m->n_sections = n_layer * (1 + n_expert);
    m->secs = calloc(m->n_sections, sizeof(*m->secs));
    assert_non_null(m->secs);
    uint64_t off = 0, dmax = 0, emax = 0;
    for (uint32_t i = 0; i < m->n_sections; i++) {
        struct sched_section *c = &m->secs[i];
        bool dense = i < n_layer;
        c->layer = dense ? i : (i - n_layer) / n_expert;
        c->expert = dense ? -1 : (int32_t)((i - n_layer) % n_expert);
        c->n_ranges = dense ? 4 + tu_rnd(5) : 3;
        uint64_t so = 0;
        for (uint32_t r = 0; r < c->n_ranges; r++) {
            off += 32 * tu_rnd(8); /* GGUF-like 32-byte alignment, gaps */
            c->ranges[r].file_offset = off;
            /* dense slots come out larger than expert slots (one page) */
            c->ranges[r].bytes = dense ? 1500 + tu_rnd(2500) : 100 + tu_rnd(900);
            so += tu_rnd(4) * 64;
            c->ranges[r].slot_offset = so;
            so += c->ranges[r].bytes;
            off += c->ranges[r].bytes;
        }
        c->slot_bytes = so + tu_rnd(64);
        if (dense)
            dmax = c->slot_bytes > dmax ? c->slot_bytes : dmax;
        else
            emax = c->slot_bytes > emax ? c->slot_bytes : emax;
    }
    m->dslot = align_up(dmax);
    m->eslot = align_up(emax);
    m->file_bytes = off + 64;
    m->file = malloc(m->file_bytes);
    assert_non_null(m->file);
    for (size_t i = 0; i < m->file_bytes; i++)
        m->file[i] = (uint8_t)tu_rng_u64(&tu_main_rng);
}

static void model_free(struct model *m) {
    free(m->secs);
    free(m->file);
}

static uint32_t sec_of(const struct model *m, uint32_t layer, int32_t expert) {
    return sched_section_index(m->n_layer, m->n_expert, layer, expert);
}

static uint64_t sec_bytes(const struct sched_section *c) {
    uint64_t b = 0;
    for (uint32_t r = 0; r < c->n_ranges; r++)
        b += c->ranges[r].bytes;
    return b;
}

/* the slot holds the section's bytes from the file */
static bool section_ok(const struct model *m, uint32_t sec, const void *base) {
    const struct sched_section *c = &m->secs[sec];
    for (uint32_t r = 0; r < c->n_ranges; r++)
        if (memcmp((const uint8_t *)base + c->ranges[r].slot_offset,
                   m->file + c->ranges[r].file_offset, c->ranges[r].bytes) != 0)
            return false;
    return true;
}

/* ---- fake loader: synchronous inside load(), its own thread with delays, or holding loads
 * until the test releases them ---------------------------------------------------------------- */

struct fake {
    struct fake_queue q; /* jobs' items are sections; calls logged by section index */
    const struct model *m;
    struct sched *s;
    uint64_t bytes;        /* asked for, under q.mu */
    const void *forbid[4]; /* slots that must not be loaded into now (acquired dense parts) */
    uint32_t n_forbid;     /* under q.mu */
};

static void fake_finish(void *user, const struct fq_job *j) {
    struct fake *f = user;
    const struct sched_section *c = j->item;
    if (!j->fail) {
        for (uint32_t r = 0; r < c->n_ranges; r++)
            memcpy((uint8_t *)j->dst + c->ranges[r].slot_offset,
                   f->m->file + c->ranges[r].file_offset, c->ranges[r].bytes);
    } else {
        memset(j->dst, 0xA5, c->slot_bytes); /* garbage must never be handed out */
    }
    sched_load_done(f->s, j->tag, j->fail ? MOERUN_ERR_IO : MOERUN_OK,
                    j->fail ? "fake: injected failure" : NULL);
}

static void fake_on_call(void *user, const struct fq_job *j) { /* under q.mu */
    struct fake *f = user;
    f->bytes += sec_bytes(j->item);
    for (uint32_t i = 0; i < f->n_forbid; i++)
        if (f->forbid[i] == j->dst)
            f->q.violated = true;
}

static int fake_load(void *ctx, const struct sched_section *sec, void *dst, uint64_t tag) {
    struct fake *f = ctx;
    struct fq_job j = {.item = sec, .dst = dst, .tag = tag};
    if (!fq_submit(&f->q, &j, sec_of(f->m, sec->layer, sec->expert)))
        return mr_err(MOERUN_ERR_IO, "fake: injected refusal");
    return MOERUN_OK;
}

static void fake_init(struct fake *f, const struct model *m, bool threaded, uint32_t delay_max) {
    memset(f, 0, sizeof(*f));
    f->m = m;
    struct fq_params p = {.run = fake_finish,
                          .on_call = fake_on_call,
                          .user = f,
                          .threaded = threaded,
                          .delay_max = delay_max,
                          .seed = tu_rng_u64(&tu_main_rng)};
    assert_int_equal(fq_init(&f->q, &p), 0);
}

static void fake_drain(struct fake *f) {
    while (fq_release(&f->q, 1))
        ;
}

/* the loader was ever asked for sec */
static bool fake_saw(struct fake *f, uint32_t sec) {
    pthread_mutex_lock(&f->q.mu);
    bool seen = false;
    for (uint64_t i = 0; i < f->q.calls && i < FQ_LOG_MAX; i++)
        seen |= f->q.log[i].id == sec;
    pthread_mutex_unlock(&f->q.mu);
    return seen;
}

/* ---- environment: model + fake + region + scheduler ----------------------------------------- */

struct env {
    struct model m;
    struct fake *f;
    uint8_t *region;
    uint64_t region_bytes;
    struct sched *s;
    uint64_t requested; /* experts asked for */
};

struct env_opts {
    uint32_t n_layer, n_expert, k;
    uint32_t n_dense;  /* dense slots the region is sized for */
    uint32_t n_eslots; /* expert slots */
    uint64_t extra;    /* bytes more */
    enum sched_policy policy;
    bool prefetch;
    uint32_t ring_ahead;
    bool threaded;
    bool hold;
    uint32_t delay_max;
    uint32_t prefetch_in_flight;
    bool prefetch_when_idle;
};

static void env_open(struct env *v, const struct env_opts *o) {
    memset(v, 0, sizeof(*v));
    model_make(&v->m, o->n_layer, o->n_expert, o->k);
    v->f = malloc(sizeof(*v->f));
    assert_non_null(v->f);
    fake_init(v->f, &v->m, o->threaded, o->delay_max);
    fq_hold(&v->f->q, o->hold);
    v->region_bytes = o->n_dense * v->m.dslot + o->n_eslots * v->m.eslot + o->extra;
    v->region = aligned_alloc(SCHED_ALIGN, align_up(v->region_bytes));
    assert_non_null(v->region);
    memset(v->region, 0x5A, v->region_bytes);
    struct sched_params p = {
        .n_layer = o->n_layer,
        .n_expert = o->n_expert,
        .n_expert_used = o->k,
        .region = v->region,
        .region_bytes = v->region_bytes,
        .policy = o->policy,
        .prefetch = o->prefetch,
        .ring_ahead = o->ring_ahead,
        .prefetch_in_flight = o->prefetch_in_flight,
        .prefetch_when_idle = o->prefetch_when_idle,
    };
    struct sched_loader ld = {fake_load, v->f};
    assert_int_equal(sched_create(&p, v->m.secs, v->m.n_sections, ld, &v->s), MOERUN_OK);
    v->f->s = v->s;
}

static void env_close(struct env *v) {
    if (v->f->q.hold) { /* sched_destroy waits for the loads in flight */
        fq_hold(&v->f->q, false);
        fake_drain(v->f);
    }
    sched_destroy(v->s);
    fq_stop(&v->f->q);
    assert_false(v->f->q.violated);
    free(v->f);
    free(v->region);
    model_free(&v->m);
}

static void dense_use(struct env *v, uint32_t l) {
    const void *b = NULL;
    assert_int_equal(sched_dense_acquire(v->s, l, &b), MOERUN_OK);
    assert_true(section_ok(&v->m, sec_of(&v->m, l, -1), b));
    pthread_mutex_lock(&v->f->q.mu);
    v->f->forbid[0] = b;
    v->f->n_forbid = 1;
    pthread_mutex_unlock(&v->f->q.mu);
}

static void dense_done(struct env *v, uint32_t l) {
    const void *b = v->f->forbid[0];
    assert_true(section_ok(&v->m, sec_of(&v->m, l, -1), b)); /* not overwritten while held */
    pthread_mutex_lock(&v->f->q.mu);
    v->f->n_forbid = 0;
    pthread_mutex_unlock(&v->f->q.mu);
    sched_dense_release(v->s, l);
}

/* Take every expert of the current request of set (checking its bytes, each exactly once),
 * release each. */
static void handout(struct env *v, uint32_t l, const int32_t *set, uint32_t n) {
    bool seen[64] = {0};
    uint32_t got = 0;
    for (;;) {
        int32_t e = -1;
        const void *b = NULL;
        int rc = sched_experts_next(v->s, l, &e, &b);
        if (rc == 1)
            break;
        assert_int_equal(rc, MOERUN_OK);
        assert_true(e >= 0 && (uint32_t)e < v->m.n_expert && !seen[e]);
        bool in = false;
        for (uint32_t i = 0; i < n; i++)
            in |= set[i] == e;
        assert_true(in);
        seen[e] = true;
        assert_true(section_ok(&v->m, sec_of(&v->m, l, e), b));
        sched_expert_release(v->s, l, e);
        got++;
    }
    assert_int_equal(got, n);
}

/* Request the set, take every expert, release each. */
static void experts_use(struct env *v, uint32_t l, const int32_t *set, uint32_t n) {
    assert_int_equal(sched_experts_request(v->s, l, set, n), MOERUN_OK);
    v->requested += n;
    handout(v, l, set, n);
}

static void use1(struct env *v, uint32_t l, int32_t e) {
    experts_use(v, l, &e, 1);
}

/* hits + misses = requests; loads and bytes match what the loader was asked for */
static void check_stats(struct env *v) {
    struct sched_stats st;
    /* A load is counted when the scheduler decides it, under its lock, and reaches the loader
     * once the lock is dropped: a completion thread may be between the two (starting queued
     * prefetches). Wait for the loader to see every counted load (a lost one never arrives). */
    for (int tries = 0;; tries++) {
        sched_get_stats(v->s, &st);
        pthread_mutex_lock(&v->f->q.mu);
        const bool settled = st.loads == v->f->q.calls && st.bytes_loaded == v->f->bytes;
        pthread_mutex_unlock(&v->f->q.mu);
        if (settled || tries == 2000)
            break;
        usleep(1000);
    }
    assert_int_equal(st.expert_hits + st.expert_misses, v->requested);
    pthread_mutex_lock(&v->f->q.mu);
    assert_int_equal(st.loads, v->f->q.calls);
    assert_int_equal(st.bytes_loaded, v->f->bytes);
    pthread_mutex_unlock(&v->f->q.mu);
    uint64_t h = 0, mi = 0;
    for (uint32_t l = 0; l < v->m.n_layer; l++) {
        h += st.layer_hits[l];
        mi += st.layer_misses[l];
    }
    assert_int_equal(h, st.expert_hits);
    assert_int_equal(mi, st.expert_misses);
    assert_true(st.prefetch_used <= st.prefetch_issued);
    assert_true(st.predicted_correct <= st.predicted);
}

/* ---- tests ---------------------------------------------------------------------------------- */

static void test_layout(void **state) {
    (void)state;
    struct model m;
    uint32_t n_layer = 4 + tu_rnd(5), n_expert = 4 + tu_rnd(12), k = 1 + tu_rnd(4);
    model_make(&m, n_layer, n_expert, k);
    uint8_t *region = aligned_alloc(SCHED_ALIGN, 64u << 20);
    assert_non_null(region);
    struct fake f;
    fake_init(&f, &m, false, 0);
    struct sched_loader ld = {fake_load, &f};
    struct sched_params p = {.n_layer = n_layer,
                             .n_expert = n_expert,
                             .n_expert_used = k,
                             .region = region,
                             .policy = SCHED_POLICY_LRU};
    uint64_t min = 2 * m.dslot + k * m.eslot;
    assert_int_equal(sched_min_bytes(&p, m.secs, m.n_sections), min);

    struct sched *s = (struct sched *)&p; /* must be reset to NULL on failure */
    p.region_bytes = min - 1;
    assert_int_equal(sched_create(&p, m.secs, m.n_sections, ld, &s), MOERUN_ERR_BUDGET);
    assert_null(s);
    char num[32];
    snprintf(num, sizeof(num), "%llu", (unsigned long long)min);
    assert_true(tu_contains(moerun_errmsg(), num));
    assert_true(tu_contains(moerun_errmsg(), "MiB"));

    struct sched_layout lay;
    struct {
        uint64_t bytes;
        uint32_t ring_ahead;
        bool ring;
        uint32_t nd, ne;
    } cases[] = {
        {min, 0, true, 2, k},
        {min + m.eslot - 1, 0, true, 2, k},
        {min + 3 * m.eslot, 0, true, 2, k + 3},
        {3 * m.dslot + (k + 1) * m.eslot, 2, true, 3, k + 1},
        {3 * m.dslot + (k + 1) * m.eslot, 5, true, 3, k + 1}, /* ring_ahead capped by budget */
        {min + m.dslot / 2, 0, true, 2, k},
        {n_layer * m.dslot + k * m.eslot, 0, false, n_layer, k},
        {n_layer * m.dslot + k * m.eslot - 1, 0, true, 2, 0},
        {n_layer * m.dslot + (k + 2) * m.eslot + 100, 3, false, n_layer, k + 2},
    };
    for (size_t c = 0; c < MR_ARRAY_LEN(cases); c++) {
        p.region_bytes = cases[c].bytes;
        p.ring_ahead = cases[c].ring_ahead;
        assert_int_equal(sched_create(&p, m.secs, m.n_sections, ld, &s), MOERUN_OK);
        f.s = s;
        sched_get_layout(s, &lay);
        assert_int_equal(lay.ring, cases[c].ring);
        assert_int_equal(lay.n_dense_slots, cases[c].nd);
        uint64_t ne = (cases[c].bytes - cases[c].nd * m.dslot) / m.eslot;
        if (c < 5 || c == 8)
            assert_int_equal(ne, cases[c].ne); /* the case is what it says */
        if (ne > (uint64_t)n_layer * n_expert)
            ne = (uint64_t)n_layer * n_expert; /* no more slots than experts */
        assert_int_equal(lay.n_expert_slots, ne);
        assert_int_equal(lay.dense_slot_bytes, m.dslot);
        assert_int_equal(lay.expert_slot_bytes, m.eslot);
        /* every slot handed out lies in the region, aligned, and holds the right bytes */
        for (uint32_t l = 0; l < n_layer; l++) {
            const void *b;
            assert_int_equal(sched_dense_acquire(s, l, &b), MOERUN_OK);
            uint64_t off = (uint64_t)((const uint8_t *)b - region);
            assert_true(off % SCHED_ALIGN == 0 && off + m.dslot <= lay.n_dense_slots * m.dslot);
            assert_true(section_ok(&m, l, b));
            sched_dense_release(s, l);
            int32_t set[4];
            tu_random_set(n_expert, k, set);
            assert_int_equal(sched_experts_request(s, l, set, k), MOERUN_OK);
            int32_t e;
            while (sched_experts_next(s, l, &e, &b) == MOERUN_OK) {
                off = (uint64_t)((const uint8_t *)b - region) - lay.n_dense_slots * m.dslot;
                assert_true(off % m.eslot == 0 && off / m.eslot < lay.n_expert_slots);
                assert_true(off + m.eslot <= p.region_bytes);
                assert_true(section_ok(&m, sec_of(&m, l, e), b));
                sched_expert_release(s, l, e);
            }
        }
        sched_destroy(s);
    }
    sched_destroy(NULL);

    /* inconsistent input */
    p.region_bytes = 1u << 20;
    p.n_expert_used = n_expert + 1;
    assert_int_equal(sched_create(&p, m.secs, m.n_sections, ld, &s), MOERUN_ERR_INVALID_ARG);
    p.n_expert_used = k;
    assert_int_equal(sched_create(&p, m.secs, m.n_sections - 1, ld, &s), MOERUN_ERR_INVALID_ARG);
    p.region = region + 64;
    assert_int_equal(sched_create(&p, m.secs, m.n_sections, ld, &s), MOERUN_ERR_INVALID_ARG);
    p.region = region;
    m.secs[n_layer].ranges[0].slot_offset = m.secs[n_layer].slot_bytes;
    assert_int_equal(sched_create(&p, m.secs, m.n_sections, ld, &s), MOERUN_ERR_INVALID_ARG);
    fq_stop(&f.q);
    free(region);
    model_free(&m);
}

static void run_all_resident(bool threaded) {
    struct env v;
    struct env_opts o = {
        .n_layer = 4 + tu_rnd(4), .n_expert = 8, .k = 2, .threaded = threaded, .delay_max = 200};
    o.n_dense = o.n_layer;
    o.n_eslots = 3;
    env_open(&v, &o);
    struct sched_layout lay;
    sched_get_layout(v.s, &lay);
    assert_false(lay.ring);
    const int tokens = 6;
    for (int t = 0; t < tokens; t++) {
        for (uint32_t l = 0; l < o.n_layer; l++) {
            dense_use(&v, l);
            int32_t set[2];
            tu_random_set(o.n_expert, 2, set);
            experts_use(&v, l, set, 2);
            dense_done(&v, l);
        }
    }
    /* each dense part loaded exactly once */
    uint32_t dense_loads[16] = {0};
    for (uint64_t i = 0; i < v.f->q.calls; i++)
        if (v.f->q.log[i].id < o.n_layer)
            dense_loads[v.f->q.log[i].id]++;
    for (uint32_t l = 0; l < o.n_layer; l++)
        assert_int_equal(dense_loads[l], 1);
    struct sched_stats st;
    sched_get_stats(v.s, &st);
    assert_int_equal(st.dense_hits + st.dense_misses, (uint64_t)tokens * o.n_layer);
    assert_true(st.dense_misses >= 1 && st.dense_misses <= o.n_layer);
    check_stats(&v);
    env_close(&v);
}

static void test_all_resident(void **state) {
    (void)state;
    run_all_resident(false);
    run_all_resident(true);
}

/* Ring: dense loads come in execution order (wrapping to layer 0), round-robin over the slots,
 * never into an acquired slot; every acquire after the first is a hit with a synchronous
 * loader. */
static void run_ring(uint32_t n_layer, uint32_t ring_ahead, bool threaded) {
    struct env v;
    uint32_t r = ring_ahead ? ring_ahead + 1 : 2;
    struct env_opts o = {.n_layer = n_layer,
                         .n_expert = 6,
                         .k = 2,
                         .n_dense = r,
                         .n_eslots = 2,
                         .ring_ahead = ring_ahead,
                         .threaded = threaded,
                         .delay_max = 300};
    env_open(&v, &o);
    struct sched_layout lay;
    sched_get_layout(v.s, &lay);
    assert_true(lay.ring);
    assert_int_equal(lay.n_dense_slots, r);
    const uint32_t tokens = 4;
    for (uint32_t t = 0; t < tokens; t++) {
        for (uint32_t l = 0; l < n_layer; l++) {
            dense_use(&v, l);
            int32_t set[2];
            tu_random_set(o.n_expert, 2, set);
            experts_use(&v, l, set, 1 + tu_rnd(2));
            dense_done(&v, l);
        }
    }
    sched_destroy(v.s); /* waits for the loads ahead */
    v.s = NULL;
    uint32_t nd = 0, expect = 0;
    for (uint64_t i = 0; i < v.f->q.calls && i < FQ_LOG_MAX; i++) {
        uint32_t sec = v.f->q.log[i].id;
        if (sec >= n_layer)
            continue;
        assert_int_equal(sec, expect); /* execution order, wrapping around */
        size_t slot = (size_t)((uint8_t *)v.f->q.log[i].dst - v.region) / v.m.dslot;
        assert_int_equal(slot, nd % r); /* round-robin in execution order */
        if (n_layer % r == 0)
            assert_int_equal(slot, sec % r);
        expect = (expect + 1) % n_layer;
        nd++;
    }
    /* every use loaded once, plus at most one ring of loads ahead for the next token */
    assert_true(nd >= tokens * n_layer && nd <= tokens * n_layer + r);
    assert_false(v.f->q.violated);
    fq_stop(&v.f->q);
    free(v.f);
    free(v.region);
    model_free(&v.m);
}

static void test_ring(void **state) {
    (void)state;
    run_ring(6, 0, false);
    run_ring(7, 0, false);
    run_ring(6, 2, false);
    run_ring(8, 3, false);
    run_ring(5, 0, true);
    run_ring(9, 2, true);

    /* hits: with a synchronous loader only the very first acquire waits for a load */
    struct env v;
    struct env_opts o = {.n_layer = 5, .n_expert = 4, .k = 1, .n_dense = 2, .n_eslots = 1};
    env_open(&v, &o);
    for (int t = 0; t < 3; t++)
        for (uint32_t l = 0; l < o.n_layer; l++) {
            dense_use(&v, l);
            dense_done(&v, l);
        }
    struct sched_stats st;
    sched_get_stats(v.s, &st);
    assert_int_equal(st.dense_misses, 1);
    assert_int_equal(st.dense_hits, 3 * o.n_layer - 1);
    /* a pinned part is never evicted: hold layer 2 while running the others around it */
    const void *b2, *b;
    assert_int_equal(sched_dense_acquire(v.s, 2, &b2), MOERUN_OK);
    for (uint32_t l = 3; l < 5; l++) {
        assert_int_equal(sched_dense_acquire(v.s, l, &b), MOERUN_OK);
        assert_true(b != b2);
        assert_true(section_ok(&v.m, l, b));
        sched_dense_release(v.s, l);
        assert_true(section_ok(&v.m, 2, b2));
    }
    /* both slots held: a third layer has no slot and says so */
    assert_int_equal(sched_dense_acquire(v.s, 0, &b), MOERUN_OK);
    assert_int_equal(sched_dense_acquire(v.s, 1, &b), MOERUN_ERR_BUDGET);
    sched_dense_release(v.s, 0);
    sched_dense_release(v.s, 2);
    assert_int_equal(sched_dense_acquire(v.s, 1, &b), MOERUN_OK);
    assert_true(section_ok(&v.m, 1, b));
    sched_dense_release(v.s, 1);
    env_close(&v);
}

static const char *policy_name[] = {"LRU", "LFU", "PREDICTED"};

static void expect_states(struct env *v, uint32_t l, const int32_t *res, uint32_t n_res,
                          const int32_t *gone, uint32_t n_gone, int policy) {
    for (uint32_t i = 0; i < n_res; i++)
        if (sched_section_state(v->s, l, res[i]) != SCHED_RESIDENT)
            fail_msg("%s: layer %u expert %d should be resident", policy_name[policy], l, res[i]);
    for (uint32_t i = 0; i < n_gone; i++)
        if (sched_section_state(v->s, l, gone[i]) != SCHED_ABSENT)
            fail_msg("%s: layer %u expert %d should be evicted", policy_name[policy], l, gone[i]);
}

/* Three expert slots, k = 1; scripted uses; each policy's victims. */
static void test_policies(void **state) {
    (void)state;
    for (int pol = 0; pol < 3; pol++) {
        struct env v;
        struct env_opts o = {.n_layer = 2,
                             .n_expert = 8,
                             .k = 1,
                             .n_dense = 2,
                             .n_eslots = 3,
                             .policy = (enum sched_policy)pol};
        env_open(&v, &o);
        use1(&v, 0, 0);
        use1(&v, 0, 0);
        use1(&v, 0, 0); /* e0: 3 uses */
        use1(&v, 0, 1);
        use1(&v, 0, 2); /* full: last uses e0 < e1 < e2; uses 3, 1, 1 */
        float sc[8] = {0.5f, 0.4f, 0.1f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        sched_predict(v.s, 0, sc); /* prefetch off: only scores */
        assert_int_equal(fq_calls(&v.f->q), 3);
        use1(&v, 0, 3);
        static const int32_t victim1[3] = {0, 1, 2}; /* LRU: oldest; LFU: fewest; PRED: lowest */
        int32_t gone = victim1[pol];
        int32_t keep[3], nk = 0;
        for (int32_t e = 0; e < 4; e++)
            if (e != gone)
                keep[nk++] = e;
        expect_states(&v, 0, keep, 3, &gone, 1, pol);

        use1(&v, 1, 5); /* layer 1 has no prediction: its experts score 0 */
        /* LRU: {1,2,3} -> 1; LFU: {0,2,3} uses 3,1,1 -> 2 (older); PRED: {0,1,3} 0.5,0.4,0 -> 3 */
        static const int32_t victim2[3] = {1, 2, 3};
        assert_int_equal(sched_section_state(v.s, 0, victim2[pol]), SCHED_ABSENT);
        assert_int_equal(sched_section_state(v.s, 1, 5), SCHED_RESIDENT);
        use1(&v, 1, 6);
        /* LRU: {2,3,L1e5} -> 2; LFU: {0,3,L1e5} -> 3; PRED: {0,1,L1e5} -> L1e5 (score 0) */
        if (pol == SCHED_POLICY_PREDICTED) {
            assert_int_equal(sched_section_state(v.s, 1, 5), SCHED_ABSENT);
            int32_t k2[2] = {0, 1};
            expect_states(&v, 0, k2, 2, NULL, 0, pol);
        } else {
            static const int32_t victim3[2] = {2, 3};
            assert_int_equal(sched_section_state(v.s, 0, victim3[pol]), SCHED_ABSENT);
            assert_int_equal(sched_section_state(v.s, 1, 5), SCHED_RESIDENT);
        }
        struct sched_stats st;
        sched_get_stats(v.s, &st);
        assert_int_equal(st.expert_hits, 2);
        assert_int_equal(st.expert_misses, 6);
        check_stats(&v);
        env_close(&v);
    }

    /* PREDICTED: equal scores fall back to LRU */
    struct env v;
    struct env_opts o = {.n_layer = 2,
                         .n_expert = 8,
                         .k = 1,
                         .n_dense = 2,
                         .n_eslots = 3,
                         .policy = SCHED_POLICY_PREDICTED};
    env_open(&v, &o);
    for (int32_t e = 0; e < 4; e++)
        use1(&v, 1, e); /* all score 0: e0 evicted (LRU) */
    int32_t g0 = 0, r0[3] = {1, 2, 3};
    expect_states(&v, 1, r0, 3, &g0, 1, SCHED_POLICY_PREDICTED);
    float sc[8] = {0.0f, 0.1f};
    sched_predict(v.s, 1, sc);
    use1(&v, 1, 4); /* e1 0.1, e2 0, e3 0 -> e2 (older of the zeros) */
    int32_t g1 = 2, r1[3] = {1, 3, 4};
    expect_states(&v, 1, r1, 3, &g1, 1, SCHED_POLICY_PREDICTED);
    env_close(&v);
}

/* The minimum number of expert slots (k): a request's experts are never evicted for its other
 * members, and every policy gets the right bytes. */
static void test_policy_min_slots(void **state) {
    (void)state;
    for (int pol = 0; pol < 3; pol++) {
        struct env v;
        struct env_opts o = {.n_layer = 2,
                             .n_expert = 8,
                             .k = 2,
                             .n_dense = 2,
                             .n_eslots = 2,
                             .policy = (enum sched_policy)pol};
        env_open(&v, &o);
        struct sched_layout lay;
        sched_get_layout(v.s, &lay);
        assert_int_equal(lay.n_expert_slots, 2);
        int32_t a[2] = {0, 1}, b[2] = {2, 3}, c[2] = {3, 4};
        experts_use(&v, 0, a, 2);
        experts_use(&v, 0, b, 2);
        expect_states(&v, 0, b, 2, a, 2, pol);
        experts_use(&v, 0, c, 2); /* 3 is a hit, 4 takes 2's slot */
        int32_t g = 2;
        expect_states(&v, 0, c, 2, &g, 1, pol);
        struct sched_stats st;
        sched_get_stats(v.s, &st);
        assert_int_equal(st.expert_hits, 1);
        assert_int_equal(st.expert_misses, 5);
        check_stats(&v);
        env_close(&v);
    }
}

static void scores_top(uint32_t n_expert, const int32_t *top, uint32_t k, float *sc) {
    for (uint32_t e = 0; e < n_expert; e++)
        sc[e] = 0.01f * (float)tu_rnd(10); /* < 0.1 */
    for (uint32_t i = 0; i < k; i++)
        sc[top[i]] = 0.9f - 0.1f * (float)i;
}

static void test_prefetch(void **state) {
    (void)state;
    struct env v;
    struct env_opts o = {
        .n_layer = 3, .n_expert = 8, .k = 2, .n_dense = 3, .n_eslots = 6, .prefetch = true};
    env_open(&v, &o);
    float sc[8];
    struct sched_stats st;
    int32_t t1[2] = {3, 5};
    scores_top(8, t1, 2, sc);
    sched_predict(v.s, 1, sc);
    assert_int_equal(sched_section_state(v.s, 1, 3), SCHED_RESIDENT);
    assert_int_equal(sched_section_state(v.s, 1, 5), SCHED_RESIDENT);
    assert_int_equal(fq_calls(&v.f->q), 2);
    experts_use(&v, 1, t1, 2);
    sched_get_stats(v.s, &st);
    assert_int_equal(st.prefetch_issued, 2);
    assert_int_equal(st.prefetch_used, 2);
    assert_int_equal(st.expert_hits, 2);
    assert_int_equal(st.expert_misses, 0);
    assert_true(st.predicted == 2 && st.predicted_correct == 2 && st.needed == 2);
    assert_int_equal(fq_calls(&v.f->q), 2);

    /* half right */
    int32_t t2[2] = {0, 1}, n2[2] = {1, 6};
    scores_top(8, t2, 2, sc);
    sched_predict(v.s, 2, sc);
    experts_use(&v, 2, n2, 2);
    sched_get_stats(v.s, &st);
    assert_int_equal(st.prefetch_issued, 4);
    assert_int_equal(st.prefetch_used, 3);
    assert_true(st.expert_hits == 3 && st.expert_misses == 1);
    assert_true(st.predicted == 4 && st.predicted_correct == 3 && st.needed == 4);

    /* wrong prediction: harmless */
    int32_t t3[2] = {6, 7}, n3[3] = {2, 4, 5};
    scores_top(8, t3, 2, sc);
    sched_predict(v.s, 0, sc);
    experts_use(&v, 0, n3, 3);
    sched_get_stats(v.s, &st);
    assert_int_equal(st.prefetch_used, 3);
    assert_true(st.predicted == 6 && st.predicted_correct == 3 && st.needed == 7);
    /* a request without a prediction for its layer does not count */
    experts_use(&v, 0, n3, 2);
    sched_get_stats(v.s, &st);
    assert_true(st.predicted == 6 && st.needed == 7);
    check_stats(&v);
    sched_reset_stats(v.s);
    sched_get_stats(v.s, &st);
    assert_true(st.loads == 0 && st.expert_hits == 0 && st.layer_hits[0] == 0);
    env_close(&v);

    /* prefetch off: predictions are measured, nothing is loaded */
    o.prefetch = false;
    env_open(&v, &o);
    scores_top(8, t1, 2, sc);
    sched_predict(v.s, 1, sc);
    assert_int_equal(fq_calls(&v.f->q), 0);
    assert_int_equal(sched_section_state(v.s, 1, 3), SCHED_ABSENT);
    experts_use(&v, 1, t1, 2);
    sched_get_stats(v.s, &st);
    assert_true(st.prefetch_issued == 0 && st.expert_misses == 2);
    assert_true(st.predicted == 2 && st.predicted_correct == 2 && st.needed == 2);
    check_stats(&v);
    env_close(&v);

    /* the layer computing keeps its experts: with k slots, all pinned, nothing is prefetched */
    o.prefetch = true;
    o.n_eslots = 2;
    env_open(&v, &o);
    int32_t a[2] = {0, 1};
    assert_int_equal(sched_experts_request(v.s, 0, a, 2), MOERUN_OK);
    scores_top(8, t1, 2, sc);
    sched_predict(v.s, 1, sc);
    sched_get_stats(v.s, &st);
    assert_int_equal(st.prefetch_issued, 0);
    for (int i = 0; i < 2; i++) {
        int32_t e;
        const void *b;
        assert_int_equal(sched_experts_next(v.s, 0, &e, &b), MOERUN_OK);
        assert_true(section_ok(&v.m, sec_of(&v.m, 0, e), b));
        sched_expert_release(v.s, 0, e);
    }
    sched_predict(v.s, 1, sc); /* now their slots are free to take */
    sched_get_stats(v.s, &st);
    assert_int_equal(st.prefetch_issued, 2);
    experts_use(&v, 1, t1, 2);
    /* while a request still waits for slots, predictions do not take them */
    int32_t big[4] = {4, 5, 6, 7};
    assert_int_equal(sched_experts_request(v.s, 0, big, 4), MOERUN_OK);
    sched_predict(v.s, 1, sc);
    sched_get_stats(v.s, &st);
    assert_int_equal(st.prefetch_issued, 2);
    int32_t e;
    const void *b;
    int got = 0;
    while (sched_experts_next(v.s, 0, &e, &b) == MOERUN_OK) {
        assert_true(section_ok(&v.m, sec_of(&v.m, 0, e), b));
        sched_expert_release(v.s, 0, e);
        got++;
    }
    assert_int_equal(got, 4);
    v.requested += 2 + 4;
    check_stats(&v);
    env_close(&v);

    /* a prediction's experts do not evict each other (LFU would pick the one never used) */
    o.policy = SCHED_POLICY_LFU;
    env_open(&v, &o);
    experts_use(&v, 0, a, 2);
    assert_int_equal(sched_experts_request(v.s, 0, a, 1), MOERUN_OK); /* holds expert 0 */
    v.requested++;
    sched_predict(v.s, 1, sc); /* 3 takes 1's slot, 5 finds none */
    assert_int_equal(sched_section_state(v.s, 1, 3), SCHED_RESIDENT);
    assert_int_equal(sched_section_state(v.s, 1, 5), SCHED_ABSENT);
    experts_use(&v, 0, a, 1);
    sched_predict(v.s, 1, sc); /* 5 must evict 0 (2 uses), not 3 (none) */
    assert_int_equal(sched_section_state(v.s, 1, 3), SCHED_RESIDENT);
    assert_int_equal(sched_section_state(v.s, 1, 5), SCHED_RESIDENT);
    experts_use(&v, 1, t1, 2);
    sched_get_stats(v.s, &st);
    assert_true(st.prefetch_issued == 2 && st.prefetch_used == 2);
    assert_int_equal(st.expert_hits, 4);
    check_stats(&v);
    env_close(&v);
}

/* With a threaded loader: predicted experts land before they are needed, then are hits. */
static void test_prefetch_threaded(void **state) {
    (void)state;
    struct env v;
    struct env_opts o = {.n_layer = 4,
                         .n_expert = 16,
                         .k = 4,
                         .n_dense = 4,
                         .n_eslots = 8,
                         .prefetch = true,
                         .threaded = true,
                         .delay_max = 500};
    env_open(&v, &o);
    float sc[16];
    for (uint32_t l = 0; l < o.n_layer; l++) {
        int32_t top[4];
        tu_random_set(16, 4, top);
        scores_top(16, top, 4, sc);
        sched_predict(v.s, l, sc);
        for (int spin = 0; spin < 20000; spin++) {
            bool all = true;
            for (int i = 0; i < 4; i++)
                all &= sched_section_state(v.s, l, top[i]) == SCHED_RESIDENT;
            if (all)
                break;
            struct timespec ts = {0, 100000};
            nanosleep(&ts, NULL);
        }
        for (int i = 0; i < 4; i++)
            assert_int_equal(sched_section_state(v.s, l, top[i]), SCHED_RESIDENT);
        experts_use(&v, l, top, 4);
    }
    struct sched_stats st;
    sched_get_stats(v.s, &st);
    assert_int_equal(st.expert_hits, 4 * o.n_layer);
    assert_int_equal(st.prefetch_used, 4 * o.n_layer);
    assert_int_equal(st.predicted_correct, 4 * o.n_layer);
    /* needed while still loading: a hit too */
    int32_t top[4];
    tu_random_set(16, 4, top);
    scores_top(16, top, 4, sc);
    sched_predict(v.s, 0, sc);
    experts_use(&v, 0, top, 4);
    check_stats(&v);
    env_close(&v);
}

/* ---- the prefetch queue: in-flight cap, cancellation, promotion ---------------------------------
 */

static enum sched_state state_of(struct env *v, uint32_t l, int32_t e) {
    return sched_section_state(v->s, l, e);
}

static uint32_t count_state(struct env *v, uint32_t l, const int32_t *set, uint32_t n,
                            enum sched_state want) {
    uint32_t c = 0;
    for (uint32_t i = 0; i < n; i++)
        c += state_of(v, l, set[i]) == want;
    return c;
}

/* Cap 1 with a loader that holds loads: the predicted experts beyond the cap are queued, a
 * completion starts the oldest, the layer's request promotes the queued ones it needs and
 * cancels the rest, a newer prediction cancels what it no longer names. */
/* prefetch_when_idle: while demand loads keep the loader busy, prefetches wait; a request that
 * arrives first cancels the unneeded ones, which are then never read; once the loader idles,
 * the queue drains. */
static void test_prefetch_when_idle(void **state) {
    (void)state;
    struct env v;
    struct env_opts o = {.n_layer = 4,
                         .n_expert = 16,
                         .k = 2,
                         .n_dense = 4,
                         .n_eslots = 16,
                         .prefetch = true,
                         .prefetch_in_flight = 1,
                         .prefetch_when_idle = true,
                         .hold = true};
    env_open(&v, &o);
    float sc[16];
    struct sched_stats st;
    int32_t pick[8];
    tu_random_set(16, 8, pick);
    /* layer 0 demands two experts: two loads in flight */
    int32_t need0[2] = {pick[0], pick[1]};
    assert_int_equal(sched_experts_request(v.s, 0, need0, 2), MOERUN_OK);
    v.requested += 2;
    assert_int_equal(fq_calls(&v.f->q), 2);
    /* a prediction for layer 1 queues both, starts nothing */
    const int32_t *top = pick + 2;
    scores_top(16, top, 2, sc);
    sched_predict(v.s, 1, sc);
    assert_int_equal(fq_calls(&v.f->q), 2);
    assert_int_equal(count_state(&v, 1, top, 2, SCHED_QUEUED), 2);
    /* one demand load done, one still in flight: the loader is not idle, nothing starts (without
     * prefetch_when_idle a prefetch would: none of the cap's one is in flight) */
    assert_int_equal(fq_release(&v.f->q, 1), 1);
    assert_int_equal(fq_calls(&v.f->q), 2);
    assert_int_equal(count_state(&v, 1, top, 2, SCHED_QUEUED), 2);
    /* the other done: the loader idles, the oldest prefetch starts */
    assert_int_equal(fq_release(&v.f->q, 1), 1);
    assert_int_equal(fq_calls(&v.f->q), 3);
    assert_int_equal(state_of(&v, 1, top[0]), SCHED_LOADING);
    assert_int_equal(state_of(&v, 1, top[1]), SCHED_QUEUED);
    handout(&v, 0, need0, 2);
    /* layer 1 needs top[0] (loading: a hit) and pick[4]: the queued top[1] is cancelled */
    int32_t need1[2] = {top[0], pick[4]};
    assert_int_equal(sched_experts_request(v.s, 1, need1, 2), MOERUN_OK);
    v.requested += 2;
    assert_int_equal(state_of(&v, 1, top[1]), SCHED_ABSENT);
    fake_drain(v.f);
    handout(&v, 1, need1, 2);
    assert_false(fake_saw(v.f, sec_of(&v.m, 1, top[1])));
    sched_get_stats(v.s, &st);
    assert_int_equal(st.prefetch_cancelled, 1);
    assert_int_equal(st.prefetch_used, 1);
    assert_int_equal(st.prefetch_issued, 1);
    check_stats(&v);
    env_close(&v);
}

static void test_prefetch_queue(void **state) {
    (void)state;
    struct env v;
    struct env_opts o = {.n_layer = 4,
                         .n_expert = 16,
                         .k = 4,
                         .n_dense = 4,
                         .n_eslots = 16,
                         .prefetch = true,
                         .prefetch_in_flight = 1,
                         .hold = true};
    env_open(&v, &o);
    float sc[16];
    struct sched_stats st;
    int32_t pick[12];
    tu_random_set(16, 12, pick);
    const int32_t *top = pick; /* layer 1's prediction, most likely first */
    scores_top(16, top, 4, sc);
    sched_predict(v.s, 1, sc);
    assert_int_equal(fq_calls(&v.f->q), 1);
    assert_true(fake_saw(v.f, sec_of(&v.m, 1, top[0])));
    assert_int_equal(state_of(&v, 1, top[0]), SCHED_LOADING);
    assert_int_equal(count_state(&v, 1, top + 1, 3, SCHED_QUEUED), 3);
    sched_get_stats(v.s, &st);
    assert_true(st.prefetch_issued == 1 && st.prefetch_cancelled == 0);

    /* a completion starts the oldest queued one: still one in flight */
    assert_int_equal(fq_release(&v.f->q, 1), 1);
    assert_int_equal(state_of(&v, 1, top[0]), SCHED_RESIDENT);
    assert_int_equal(state_of(&v, 1, top[1]), SCHED_LOADING);
    assert_int_equal(count_state(&v, 1, top + 2, 2, SCHED_QUEUED), 2);
    assert_int_equal(fq_calls(&v.f->q), 2);
    assert_int_equal(fq_held(&v.f->q), 1);

    /* the request needs top[1] (loading: a hit), top[2] (queued: promoted, a miss) and pick[4]
     * (absent: a miss); top[3] is cancelled; demand loads start though the cap is reached */
    int32_t need[3] = {top[2], pick[4], top[1]};
    assert_int_equal(sched_experts_request(v.s, 1, need, 3), MOERUN_OK);
    v.requested += 3;
    assert_int_equal(fq_calls(&v.f->q), 4);
    assert_true(fake_saw(v.f, sec_of(&v.m, 1, top[2])));
    assert_true(fake_saw(v.f, sec_of(&v.m, 1, pick[4])));
    assert_int_equal(state_of(&v, 1, top[3]), SCHED_ABSENT);
    sched_get_stats(v.s, &st);
    assert_int_equal(st.prefetch_cancelled, 1);
    assert_int_equal(st.prefetch_issued, 2);
    assert_true(st.expert_hits == 1 && st.expert_misses == 2 && st.layer_misses[1] == 2);
    fake_drain(v.f);
    handout(&v, 1, need, 3);
    sched_get_stats(v.s, &st);
    assert_int_equal(st.prefetch_used, 1);
    assert_false(fake_saw(v.f, sec_of(&v.m, 1, top[3])));
    check_stats(&v);

    /* a newer prediction for layer 2 cancels the queued experts it no longer names */
    const int32_t *p2 = pick + 5;
    scores_top(16, p2, 4, sc);
    sched_predict(v.s, 2, sc);
    assert_int_equal(fq_calls(&v.f->q), 5);
    assert_int_equal(count_state(&v, 2, p2 + 1, 3, SCHED_QUEUED), 3);
    int32_t p2b[4] = {p2[1], pick[9], p2[0], pick[10]};
    scores_top(16, p2b, 4, sc);
    sched_predict(v.s, 2, sc);
    assert_int_equal(count_state(&v, 2, p2 + 2, 2, SCHED_ABSENT), 2);
    assert_int_equal(state_of(&v, 2, p2[0]), SCHED_LOADING); /* handed out: not cancelled */
    assert_int_equal(count_state(&v, 2, p2b, 2, SCHED_QUEUED), 2);
    assert_int_equal(state_of(&v, 2, pick[10]), SCHED_QUEUED);
    assert_int_equal(fq_calls(&v.f->q), 5);
    sched_get_stats(v.s, &st);
    assert_int_equal(st.prefetch_cancelled, 3);
    /* oldest first: p2[1] was queued before the new ones */
    assert_int_equal(fq_release(&v.f->q, 1), 1);
    assert_int_equal(state_of(&v, 2, p2[1]), SCHED_LOADING);
    assert_int_equal(count_state(&v, 2, p2b + 1, 1, SCHED_QUEUED), 1);
    assert_int_equal(fq_calls(&v.f->q), 6);
    fake_drain(v.f);
    assert_int_equal(count_state(&v, 2, p2b, 4, SCHED_RESIDENT), 4);
    assert_false(fake_saw(v.f, sec_of(&v.m, 2, p2[2])));
    assert_false(fake_saw(v.f, sec_of(&v.m, 2, p2[3])));
    experts_use(&v, 2, p2b, 4);
    sched_get_stats(v.s, &st);
    assert_true(st.prefetch_issued == 6 && st.prefetch_used == 5 && st.prefetch_cancelled == 3);
    check_stats(&v);
    env_close(&v);

    /* a synchronous loader completes inside load(): the queued ones still all start */
    o.hold = false;
    env_open(&v, &o);
    scores_top(16, top, 4, sc);
    sched_predict(v.s, 1, sc);
    assert_int_equal(count_state(&v, 1, top, 4, SCHED_RESIDENT), 4);
    assert_int_equal(fq_calls(&v.f->q), 4);
    experts_use(&v, 1, top, 4);
    sched_get_stats(v.s, &st);
    assert_true(st.prefetch_issued == 4 && st.prefetch_used == 4 && st.prefetch_cancelled == 0);
    check_stats(&v);
    env_close(&v);

    /* a threaded loader: completions on its thread start the queued ones */
    o.threaded = true;
    o.delay_max = 300;
    env_open(&v, &o);
    sched_predict(v.s, 1, sc);
    for (int spin = 0; spin < 20000 && count_state(&v, 1, top, 4, SCHED_RESIDENT) < 4; spin++) {
        struct timespec ts = {0, 100000};
        nanosleep(&ts, NULL);
    }
    assert_int_equal(count_state(&v, 1, top, 4, SCHED_RESIDENT), 4);
    experts_use(&v, 1, top, 4);
    check_stats(&v);
    env_close(&v);
}

/* Queued prefetches of layers the execution has passed are cancelled (wrap-around aware);
 * those of the next layers stay and start one at a time. */
static void test_prefetch_passed(void **state) {
    (void)state;
    struct env v;
    struct env_opts o = {.n_layer = 4,
                         .n_expert = 8,
                         .k = 4,
                         .n_dense = 4,
                         .n_eslots = 16,
                         .prefetch = true,
                         .prefetch_in_flight = 1,
                         .hold = true};
    env_open(&v, &o);
    float sc[8];
    struct sched_stats st;
    int32_t a[4], b[4];
    tu_random_set(8, 4, a);
    tu_random_set(8, 4, b);
    scores_top(8, a, 4, sc);
    sched_predict(v.s, 1, sc);
    scores_top(8, b, 4, sc);
    sched_predict(v.s, 3, sc);
    assert_int_equal(count_state(&v, 1, a + 1, 3, SCHED_QUEUED), 3);
    assert_int_equal(count_state(&v, 3, b, 4, SCHED_QUEUED), 4);
    /* layer 2 runs: layer 1 is passed (3 ahead, more than n_layer / 2), layer 3 is next */
    int32_t y = (int32_t)tu_rnd(8);
    assert_int_equal(sched_experts_request(v.s, 2, &y, 1), MOERUN_OK);
    v.requested++;
    assert_int_equal(count_state(&v, 1, a + 1, 3, SCHED_ABSENT), 3);
    assert_int_equal(state_of(&v, 1, a[0]), SCHED_LOADING);
    assert_int_equal(count_state(&v, 3, b, 4, SCHED_QUEUED), 4);
    assert_int_equal(fq_calls(&v.f->q), 2); /* a[0] and the demand load */
    sched_get_stats(v.s, &st);
    assert_int_equal(st.prefetch_cancelled, 3);
    /* completions start layer 3's, never more than one prefetch in flight */
    for (int i = 0; i < 8 && fq_held(&v.f->q); i++) {
        fq_release(&v.f->q, 1);
        assert_true(count_state(&v, 3, b, 4, SCHED_LOADING) <= 1);
    }
    fake_drain(v.f);
    assert_int_equal(count_state(&v, 3, b, 4, SCHED_RESIDENT), 4);
    for (int i = 1; i < 4; i++)
        assert_false(fake_saw(v.f, sec_of(&v.m, 1, a[i])));
    handout(&v, 2, &y, 1);

    /* wrap-around: layer 0 follows layer 3 */
    scores_top(8, a, 4, sc);
    sched_predict(v.s, 0, sc);
    assert_int_equal(count_state(&v, 0, a + 1, 3, SCHED_QUEUED), 3);
    experts_use(&v, 3, b, 4); /* resident: no load, layer 0 is next */
    assert_int_equal(count_state(&v, 0, a + 1, 3, SCHED_QUEUED), 3);
    experts_use(&v, 2, &y, 1); /* layer 0 is 2 ahead: kept */
    assert_int_equal(count_state(&v, 0, a + 1, 3, SCHED_QUEUED), 3);
    sched_get_stats(v.s, &st);
    assert_int_equal(st.prefetch_cancelled, 3);
    int32_t z = a[0];
    assert_int_equal(sched_experts_request(v.s, 1, &z, 1), MOERUN_OK); /* 3 ahead: passed */
    v.requested++;
    assert_int_equal(count_state(&v, 0, a + 1, 3, SCHED_ABSENT), 3);
    sched_get_stats(v.s, &st);
    assert_int_equal(st.prefetch_cancelled, 6);
    fake_drain(v.f);
    handout(&v, 1, &z, 1);
    check_stats(&v);
    env_close(&v);
}

/* A demand load never waits for a queued prefetch: it takes a queued one's slot if it must. */
static void test_prefetch_demand_first(void **state) {
    (void)state;
    for (int pol = 0; pol < 3; pol++) {
        struct env v;
        struct env_opts o = {.n_layer = 2,
                             .n_expert = 8,
                             .k = 2,
                             .n_dense = 2,
                             .n_eslots = 3,
                             .policy = (enum sched_policy)pol,
                             .prefetch = true,
                             .prefetch_in_flight = 1,
                             .hold = true};
        env_open(&v, &o);
        float sc[8];
        int32_t pick[4];
        tu_random_set(8, 4, pick);
        scores_top(8, pick, 2, sc);
        sched_predict(v.s, 1, sc); /* pick[0] loading, pick[1] queued, one slot free */
        assert_int_equal(state_of(&v, 1, pick[1]), SCHED_QUEUED);
        int32_t need[2] = {pick[2], pick[3]};
        assert_int_equal(sched_experts_request(v.s, 0, need, 2), MOERUN_OK);
        v.requested += 2;
        assert_int_equal(fq_calls(&v.f->q), 3); /* both demand loads started at once */
        assert_true(fake_saw(v.f, sec_of(&v.m, 0, pick[2])));
        assert_true(fake_saw(v.f, sec_of(&v.m, 0, pick[3])));
        assert_int_equal(state_of(&v, 1, pick[1]), SCHED_ABSENT);
        struct sched_stats st;
        sched_get_stats(v.s, &st);
        assert_int_equal(st.prefetch_cancelled, 1);
        fake_drain(v.f);
        handout(&v, 0, need, 2);
        assert_false(fake_saw(v.f, sec_of(&v.m, 1, pick[1])));
        check_stats(&v);
        env_close(&v);
    }
}

/* A request of more experts than slots completes, each handed out once. */
static void test_batches(void **state) {
    (void)state;
    for (int mode = 0; mode < 2; mode++) {
        for (int pol = 0; pol < 3; pol++) {
            struct env v;
            struct env_opts o = {.n_layer = 2,
                                 .n_expert = 16,
                                 .k = 2,
                                 .n_dense = 2,
                                 .n_eslots = 3,
                                 .policy = (enum sched_policy)pol,
                                 .prefetch = true,
                                 .threaded = mode == 1,
                                 .delay_max = 200};
            env_open(&v, &o);
            for (int rep = 0; rep < 4; rep++) {
                int32_t set[16];
                uint32_t n = 4 + tu_rnd(13);
                tu_random_set(16, n, set);
                experts_use(&v, (uint32_t)rep % 2, set, n);
            }
            check_stats(&v);
            /* the engine holding every slot and asking for more gets an error, not a hang */
            int32_t set[6] = {0, 1, 2, 3, 4, 5};
            assert_int_equal(sched_experts_request(v.s, 0, set, 6), MOERUN_OK);
            int32_t e;
            const void *b;
            for (int i = 0; i < 3; i++)
                assert_int_equal(sched_experts_next(v.s, 0, &e, &b), MOERUN_OK);
            assert_int_equal(sched_experts_next(v.s, 0, &e, &b), MOERUN_ERR_INVALID_ARG);
            assert_int_equal(sched_experts_next(v.s, 1, &e, &b), MOERUN_ERR_INVALID_ARG);
            /* a new request ends that one */
            v.requested += 6;
            experts_use(&v, 1, set, 6);
            int32_t dup[2] = {3, 3}, bad[1] = {16};
            assert_int_equal(sched_experts_request(v.s, 0, dup, 2), MOERUN_ERR_INVALID_ARG);
            assert_int_equal(sched_experts_request(v.s, 0, bad, 1), MOERUN_ERR_INVALID_ARG);
            assert_int_equal(sched_experts_request(v.s, 2, set, 1), MOERUN_ERR_INVALID_ARG);
            check_stats(&v);
            env_close(&v);
        }
    }
}

/* Injected failures: the call that needs the section returns MOERUN_ERR_IO with the message;
 * the next call for it loads it again. */
static void run_failure(bool threaded, bool ret) {
    struct env v;
    struct env_opts o = {.n_layer = 4,
                         .n_expert = 8,
                         .k = 2,
                         .n_dense = 2,
                         .n_eslots = 3,
                         .prefetch = true,
                         .threaded = threaded,
                         .delay_max = 200};
    env_open(&v, &o);
    const void *b;
    /* dense: the first load fails */
    fq_fail(&v.f->q, 0, ret);
    assert_int_equal(sched_dense_acquire(v.s, 0, &b), MOERUN_ERR_IO);
    assert_true(tu_contains(moerun_errmsg(), "injected"));
    assert_true(tu_contains(moerun_errmsg(), "layer 0"));
    dense_use(&v, 0); /* retried */
    dense_done(&v, 0);
    /* a load ahead fails (ring of 2: releasing layer 1 starts layer 3). Failed before anyone
     * waited (synchronous loader): loaded again when needed; failed while acquire(3) waited
     * (threaded): reported once, then loaded again */
    dense_use(&v, 1);
    uint64_t n_fail = fq_calls(&v.f->q);
    fq_fail(&v.f->q, (int64_t)n_fail, ret);
    dense_done(&v, 1);
    assert_int_equal(fq_calls(&v.f->q), n_fail + 1);
    assert_int_equal(v.f->q.log[n_fail].id, 3);
    dense_use(&v, 2);
    dense_done(&v, 2);
    int rc3 = sched_dense_acquire(v.s, 3, &b);
    if (!threaded)
        assert_int_equal(rc3, MOERUN_OK);
    if (rc3 == MOERUN_ERR_IO) {
        assert_true(tu_contains(moerun_errmsg(), "injected"));
        assert_true(tu_contains(moerun_errmsg(), "layer 3"));
    } else {
        assert_int_equal(rc3, MOERUN_OK);
        assert_true(section_ok(&v.m, 3, b));
        sched_dense_release(v.s, 3);
    }
    dense_use(&v, 3);
    dense_done(&v, 3);
    bool reloaded = false; /* layer 3 was loaded again after the failure */
    for (uint64_t i = n_fail + 1; i < fq_calls(&v.f->q); i++)
        reloaded |= v.f->q.log[i].id == 3;
    assert_true(reloaded);

    /* expert: the second of three fails; next reports it once, then loads it again */
    uint64_t n0 = fq_calls(&v.f->q);
    fq_fail(&v.f->q, (int64_t)n0 + 1, ret);
    int32_t set[3] = {1, 4, 6};
    assert_int_equal(sched_experts_request(v.s, 2, set, 3), MOERUN_OK);
    v.requested += 3;
    bool seen[8] = {0};
    int errors = 0, got = 0;
    for (int guard = 0; guard < 20; guard++) {
        int32_t e;
        int rc = sched_experts_next(v.s, 2, &e, &b);
        if (rc == 1)
            break;
        if (rc == MOERUN_ERR_IO) {
            errors++;
            assert_true(tu_contains(moerun_errmsg(), "injected"));
            assert_true(tu_contains(moerun_errmsg(), "layer 2 expert 4"));
            continue;
        }
        assert_int_equal(rc, MOERUN_OK);
        assert_false(seen[e]);
        seen[e] = true;
        assert_true(section_ok(&v.m, sec_of(&v.m, 2, e), b));
        sched_expert_release(v.s, 2, e);
        got++;
    }
    assert_int_equal(errors, 1);
    assert_int_equal(got, 3);

    /* the failing request is abandoned; the next request for it succeeds */
    n0 = fq_calls(&v.f->q);
    fq_fail(&v.f->q, (int64_t)n0, ret);
    int32_t one[2] = {0, 7};
    assert_int_equal(sched_experts_request(v.s, 3, one, 2), MOERUN_OK);
    v.requested += 2;
    int32_t e;
    int rc;
    while ((rc = sched_experts_next(v.s, 3, &e, &b)) == MOERUN_OK)
        sched_expert_release(v.s, 3, e);
    assert_int_equal(rc, MOERUN_ERR_IO);
    experts_use(&v, 3, one, 2);

    /* a failed prefetch: loaded again on demand (synchronous: it failed before the request);
     * threaded: it may fail while next waits, then reported once */
    n0 = fq_calls(&v.f->q);
    fq_fail(&v.f->q, (int64_t)n0, ret);
    float sc[8];
    int32_t top[2] = {2, 3};
    scores_top(8, top, 2, sc);
    sched_predict(v.s, 0, sc);
    assert_int_equal(sched_experts_request(v.s, 0, top, 2), MOERUN_OK);
    v.requested += 2;
    errors = got = 0;
    for (int guard = 0; guard < 20; guard++) {
        rc = sched_experts_next(v.s, 0, &e, &b);
        if (rc == 1)
            break;
        if (rc == MOERUN_ERR_IO) {
            errors++;
            continue;
        }
        assert_int_equal(rc, MOERUN_OK);
        assert_true(section_ok(&v.m, sec_of(&v.m, 0, e), b));
        sched_expert_release(v.s, 0, e);
        got++;
    }
    assert_true(threaded ? errors <= 1 : errors == 0);
    assert_int_equal(got, 2);
    check_stats(&v);
    env_close(&v);
}

static void test_failure(void **state) {
    (void)state;
    run_failure(false, false);
    run_failure(false, true);
    run_failure(true, false);
}

/* Random engines: random sizes and budgets, all policies, prefetch on and off, a threaded loader
 * with delays, random predictions (some right), occasional failures. Bounded by an alarm. */
static void test_stress(void **state) {
    (void)state;
    alarm(60); /* a deadlock kills the test */
    for (int run = 0; run < 24; run++) {
        struct env v;
        struct env_opts o;
        memset(&o, 0, sizeof(o));
        o.n_layer = 2 + tu_rnd(5);
        o.n_expert = 4 + tu_rnd(13);
        o.k = 1 + tu_rnd(o.n_expert < 4 ? o.n_expert : 4);
        o.n_dense = 2 + tu_rnd(o.n_layer - 1);
        o.n_eslots = o.k + tu_rnd(10);
        o.policy = (enum sched_policy)(run % 3);
        o.prefetch = (run / 3) % 2 == 0;
        o.ring_ahead = tu_rnd(4);
        o.prefetch_in_flight = tu_rnd(3); /* 0: k */
        o.threaded = true;
        o.delay_max = 1 + tu_rnd(300);
        o.extra = tu_rnd(SCHED_ALIGN); /* expert slots are one page */
        env_open(&v, &o);
        uint64_t fails = 0, n_io = 0;
        for (int t = 0; t < 8; t++) {
            for (uint32_t l = 0; l < o.n_layer; l++) {
                if (tu_rnd(8) == 0) {
                    fq_fail(&v.f->q, (int64_t)fq_calls(&v.f->q) + tu_rnd(4), false);
                    fails++;
                }
                const void *b;
                int rc;
                while ((rc = sched_dense_acquire(v.s, l, &b)) == MOERUN_ERR_IO)
                    n_io++;
                assert_int_equal(rc, MOERUN_OK);
                assert_true(section_ok(&v.m, sec_of(&v.m, l, -1), b));
                uint32_t n = 1 + tu_rnd(tu_rnd(2) ? o.k : o.n_expert);
                int32_t set[64];
                tu_random_set(o.n_expert, n, set);
                uint32_t next_l = (l + 1) % o.n_layer;
                if (tu_rnd(2)) {
                    float sc[64];
                    int32_t top[4];
                    tu_random_set(o.n_expert, o.k, top);
                    scores_top(o.n_expert, top, o.k, sc);
                    sched_predict(v.s, next_l, sc);
                }
                if (tu_rnd(3) == 0) { /* further ahead, sometimes superseded, sometimes passed */
                    float sc[64];
                    int32_t top[4];
                    tu_random_set(o.n_expert, o.k, top);
                    scores_top(o.n_expert, top, o.k, sc);
                    sched_predict(v.s, (l + 1 + tu_rnd(o.n_layer)) % o.n_layer, sc);
                }
                assert_int_equal(sched_experts_request(v.s, l, set, n), MOERUN_OK);
                v.requested += n;
                bool seen[64] = {0};
                uint32_t got = 0;
                for (;;) {
                    int32_t e;
                    rc = sched_experts_next(v.s, l, &e, &b);
                    if (rc == 1)
                        break;
                    if (rc == MOERUN_ERR_IO) {
                        n_io++;
                        continue;
                    }
                    assert_int_equal(rc, MOERUN_OK);
                    assert_false(seen[e]);
                    seen[e] = true;
                    assert_true(section_ok(&v.m, sec_of(&v.m, l, e), b));
                    sched_expert_release(v.s, l, e);
                    got++;
                }
                assert_int_equal(got, n);
                sched_dense_release(v.s, l);
            }
        }
        assert_true(n_io <= fails);
        check_stats(&v);
        env_close(&v);
    }
    alarm(0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layout),
        cmocka_unit_test(test_all_resident),
        cmocka_unit_test(test_ring),
        cmocka_unit_test(test_policies),
        cmocka_unit_test(test_policy_min_slots),
        cmocka_unit_test(test_prefetch),
        cmocka_unit_test(test_prefetch_threaded),
        cmocka_unit_test(test_prefetch_queue),
        cmocka_unit_test(test_prefetch_when_idle),
        cmocka_unit_test(test_prefetch_passed),
        cmocka_unit_test(test_prefetch_demand_first),
        cmocka_unit_test(test_batches),
        cmocka_unit_test(test_failure),
        cmocka_unit_test(test_stress),
    };
    return cmocka_run_group_tests(tests, tu_rng_setup, NULL);
}
