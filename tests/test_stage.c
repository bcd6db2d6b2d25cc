/* Stage (host tier between the NVMe reader and the GPU tier) against a fake model file, a fake
 * reader and a fake uploader (each synchronous inside its call, on its own thread with delays,
 * or holding its work until the test releases it): the host slot layout and the minimum, hits
 * and misses, LRU eviction, requests queued while every host slot is pinned (FIFO), injected
 * read and upload failures (refused and failed later), destroy with work in flight, and the
 * real scheduler driving a fake device through the stage. Every section that reaches the fake
 * device is compared with the file's bytes, and the uploader checks that the host slot it
 * copies from still holds the section (nothing evicted while pinned). Fresh random data each
 * run (MOERUN_TEST_SEED replays a run). */
#include "fake_queue.h"
#include "testutil.h"

#include "internal.h"
#include "moerun.h"
#include "scheduler.h"
#include "stage.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint64_t align_up(uint64_t x) {
    return (x + SCHED_ALIGN - 1) / SCHED_ALIGN * SCHED_ALIGN;
}

/* ---- fake model: sections over a file of random bytes ---------------------------------------- */

struct model {
    uint32_t n_layer, n_expert, n_sections;
    struct sched_section *secs;
    uint8_t *file;
    uint64_t dslot, eslot, packed; /* expected slot sizes, sum of rounded sizes */
};

static void model_make(struct model *m, uint32_t n_layer, uint32_t n_expert) {
    memset(m, 0, sizeof(*m));
    m->n_layer = n_layer;
    m->n_expert = n_expert;
    m->n_sections = n_layer * (1 + n_expert);
    m->secs = calloc(m->n_sections, sizeof(*m->secs));
    assert_non_null(m->secs);
    uint64_t off = 0;
    for (uint32_t i = 0; i < m->n_sections; i++) {
        struct sched_section *c = &m->secs[i];
        bool dense = i < n_layer;
        c->layer = dense ? i : (i - n_layer) / n_expert;
        c->expert = dense ? -1 : (int32_t)((i - n_layer) % n_expert);
        c->n_ranges = dense ? 3 + tu_rnd(4) : 3;
        uint64_t so = 0;
        for (uint32_t r = 0; r < c->n_ranges; r++) {
            off += 32 * tu_rnd(8);
            c->ranges[r].file_offset = off;
            c->ranges[r].bytes = dense ? 2000 + tu_rnd(3000) : 200 + tu_rnd(1200);
            so += tu_rnd(4) * 64;
            c->ranges[r].slot_offset = so;
            so += c->ranges[r].bytes;
            off += c->ranges[r].bytes;
        }
        c->slot_bytes = so + tu_rnd(64);
        uint64_t a = align_up(c->slot_bytes);
        m->packed += a;
        if (dense)
            m->dslot = a > m->dslot ? a : m->dslot;
        else
            m->eslot = a > m->eslot ? a : m->eslot;
    }
    m->file = malloc(off + 64);
    assert_non_null(m->file);
    for (uint64_t i = 0; i < off + 64; i++)
        m->file[i] = (uint8_t)tu_rng_u64(&tu_main_rng);
}

static void model_free(struct model *m) {
    free(m->secs);
    free(m->file);
}

static uint32_t sec_index(const struct model *m, const struct sched_section *c) {
    return sched_section_index(m->n_layer, m->n_expert, c->layer, c->expert);
}

/* base (a slot) holds the section's bytes from the file */
static bool section_ok(const struct model *m, uint32_t sec, const void *base) {
    const struct sched_section *c = &m->secs[sec];
    for (uint32_t r = 0; r < c->n_ranges; r++)
        if (memcmp((const uint8_t *)base + c->ranges[r].slot_offset,
                   m->file + c->ranges[r].file_offset, c->ranges[r].bytes) != 0)
            return false;
    return true;
}

/* ---- environment ---------------------------------------------------------------------------- */

struct done_rec {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint32_t *count;  /* [n_sections] completions per tag */
    int *status;      /* [n_sections] the last one's */
    char (*msg)[128]; /* [n_sections] */
    uint64_t total;
};

struct env {
    struct model m;
    struct stage *st;
    struct sched *s; /* when the real scheduler drives the stage */
    uint8_t *region;
    uint64_t region_bytes;
    uint8_t *dev; /* fake device memory: one place per section (or the scheduler's region) */
    uint64_t dev_stride;
    struct fake_queue rd, up; /* the fake reader and uploader; jobs' items are sections */
    struct done_rec dn;
};

static void *dev_at(struct env *v, uint32_t sec) {
    return v->dev + (uint64_t)sec * v->dev_stride;
}

/* ---- fake workers: the reader and the uploader ----------------------------------------------- */

static void read_run(void *user, const struct fq_job *j) {
    struct env *v = user;
    const struct sched_section *c = j->item;
    if (!j->fail)
        for (uint32_t r = 0; r < c->n_ranges; r++)
            memcpy((uint8_t *)j->dst + c->ranges[r].slot_offset,
                   v->m.file + c->ranges[r].file_offset, c->ranges[r].bytes);
    else
        memset(j->dst, 0xA5, c->slot_bytes); /* garbage must never reach the device */
    stage_read_done(v->st, j->tag, j->fail ? MOERUN_ERR_IO : MOERUN_OK,
                    j->fail ? "fake: injected read failure" : NULL);
}

static void upload_run(void *user, const struct fq_job *j) {
    struct env *v = user;
    const struct sched_section *c = j->item;
    if (!section_ok(&v->m, sec_index(&v->m, c), j->src)) { /* host slot reused while pinned */
        pthread_mutex_lock(&v->up.mu);
        v->up.violated = true;
        pthread_mutex_unlock(&v->up.mu);
    }
    if (!j->fail)
        for (uint32_t r = 0; r < c->n_ranges; r++)
            memcpy((uint8_t *)j->dst + c->ranges[r].slot_offset,
                   (const uint8_t *)j->src + c->ranges[r].slot_offset, c->ranges[r].bytes);
    stage_upload_done(v->st, j->tag, j->fail ? MOERUN_ERR_BACKEND : MOERUN_OK,
                      j->fail ? "fake: injected upload failure" : NULL);
}

static int fake_read(void *ctx, const struct sched_section *sec, void *dst, uint64_t tag) {
    struct env *v = ctx;
    struct fq_job j = {.item = sec, .dst = dst, .tag = tag};
    if (!fq_submit(&v->rd, &j, sec_index(&v->m, sec)))
        return mr_err(MOERUN_ERR_IO, "fake: injected read refusal");
    return MOERUN_OK;
}

static int fake_upload(void *ctx, const struct sched_section *sec, const void *src, void *dst,
                       uint64_t tag) {
    struct env *v = ctx;
    struct fq_job j = {.item = sec, .src = src, .dst = dst, .tag = tag};
    if (!fq_submit(&v->up, &j, sec_index(&v->m, sec)))
        return mr_err(MOERUN_ERR_BACKEND, "fake: injected upload refusal");
    return MOERUN_OK;
}

static void worker_init(struct env *v, struct fake_queue *q,
                        void (*run)(void *, const struct fq_job *), bool threaded,
                        uint32_t delay_max) {
    struct fq_params p = {.run = run,
                          .user = v,
                          .threaded = threaded,
                          .delay_max = delay_max,
                          .seed = tu_rng_u64(&tu_main_rng)};
    assert_int_equal(fq_init(q, &p), 0);
}

/* Wait (up to 10 s) until the fake holds at least n jobs (the stage's thread starts queued
 * requests asynchronously). */
static void wait_held(struct fake_queue *q, uint32_t n) {
    for (int i = 0; i < 10000 && fq_held(q) < n; i++)
        usleep(1000);
    assert_true(fq_held(q) >= n);
}

/* ---- completions ---------------------------------------------------------------------------- */

static void on_done(void *user, uint64_t tag, int status, const char *msg) {
    struct env *v = user;
    if (v->s) {
        sched_load_done(v->s, tag, status, msg);
        pthread_mutex_lock(&v->dn.mu);
        v->dn.total++;
        pthread_mutex_unlock(&v->dn.mu);
        return;
    }
    struct done_rec *d = &v->dn;
    pthread_mutex_lock(&d->mu);
    if (tag < v->m.n_sections) {
        d->count[tag]++;
        d->status[tag] = status;
        snprintf(d->msg[tag], sizeof(d->msg[tag]), "%s", msg ? msg : "");
    }
    d->total++;
    pthread_cond_broadcast(&d->cv);
    pthread_mutex_unlock(&d->mu);
}

static uint32_t done_count(struct env *v, uint32_t sec) {
    pthread_mutex_lock(&v->dn.mu);
    uint32_t n = v->dn.count[sec];
    pthread_mutex_unlock(&v->dn.mu);
    return n;
}

static uint64_t done_total(struct env *v) {
    pthread_mutex_lock(&v->dn.mu);
    uint64_t n = v->dn.total;
    pthread_mutex_unlock(&v->dn.mu);
    return n;
}

/* Wait (up to 10 s) for the count-th completion of sec; returns its status. */
static int wait_done(struct env *v, uint32_t sec, uint32_t count) {
    struct done_rec *d = &v->dn;
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += 10;
    pthread_mutex_lock(&d->mu);
    while (d->count[sec] < count)
        if (pthread_cond_timedwait(&d->cv, &d->mu, &dl))
            break;
    assert_true(d->count[sec] >= count);
    int status = d->status[sec];
    pthread_mutex_unlock(&d->mu);
    return status;
}

/* ---- environment ---------------------------------------------------------------------------- */

struct env_opts {
    uint32_t n_layer, n_expert;
    uint64_t region_bytes; /* 0: from the slot counts */
    uint32_t n_dense, n_eslots;
    uint32_t max_in_flight, n_dense_slots;
    bool rd_threaded, up_threaded;
    uint32_t delay_max;
};

static void env_open(struct env *v, const struct env_opts *o) {
    memset(v, 0, sizeof(*v));
    model_make(&v->m, o->n_layer, o->n_expert);
    v->region_bytes =
        o->region_bytes ? o->region_bytes : o->n_dense * v->m.dslot + o->n_eslots * v->m.eslot;
    v->region = aligned_alloc(SCHED_ALIGN, align_up(v->region_bytes));
    assert_non_null(v->region);
    memset(v->region, 0x5A, v->region_bytes);
    v->dev_stride = v->m.dslot > v->m.eslot ? v->m.dslot : v->m.eslot;
    v->dev = calloc(v->m.n_sections, v->dev_stride);
    assert_non_null(v->dev);
    v->dn.count = calloc(v->m.n_sections, sizeof(uint32_t));
    v->dn.status = calloc(v->m.n_sections, sizeof(int));
    v->dn.msg = calloc(v->m.n_sections, sizeof(*v->dn.msg));
    assert_true(v->dn.count && v->dn.status && v->dn.msg);
    pthread_mutex_init(&v->dn.mu, NULL);
    pthread_cond_init(&v->dn.cv, NULL);
    worker_init(v, &v->rd, read_run, o->rd_threaded, o->delay_max);
    worker_init(v, &v->up, upload_run, o->up_threaded, o->delay_max);
    struct stage_params p = {
        .region = v->region,
        .region_bytes = v->region_bytes,
        .sections = v->m.secs,
        .n_sections = v->m.n_sections,
        .n_layer = o->n_layer,
        .n_expert = o->n_expert,
        .max_in_flight = o->max_in_flight,
        .n_dense_slots = o->n_dense_slots,
        .reader = {fake_read, v},
        .uploader = {fake_upload, v},
        .done = on_done,
        .done_user = v,
    };
    assert_int_equal(stage_create(&p, &v->st), MOERUN_OK);
}

static void env_close(struct env *v) {
    /* destroy waits for the work in flight: let it run (after fq_hold(false), a fake that is not
     * threaded runs new work inside the call, so draining once is enough) */
    fq_hold(&v->rd, false);
    fq_hold(&v->up, false);
    while (fq_release(&v->rd, 1) + fq_release(&v->up, 1))
        ;
    sched_destroy(v->s);
    stage_destroy(v->st);
    fq_stop(&v->rd);
    fq_stop(&v->up);
    assert_false(v->rd.violated);
    assert_false(v->up.violated);
    pthread_cond_destroy(&v->dn.cv);
    pthread_mutex_destroy(&v->dn.mu);
    free(v->dn.count);
    free(v->dn.status);
    free(v->dn.msg);
    free(v->dev);
    free(v->region);
    model_free(&v->m);
}

static int load(struct env *v, uint32_t sec) {
    struct sched_loader ld = stage_loader(v->st);
    return ld.load(ld.ctx, &v->m.secs[sec], dev_at(v, sec), sec);
}

/* Load sec and wait for its completion (and, threaded, its bytes): returns the status. */
static int load_wait(struct env *v, uint32_t sec) {
    uint32_t before = done_count(v, sec);
    int rc = load(v, sec);
    if (rc != MOERUN_OK)
        return rc;
    return wait_done(v, sec, before + 1);
}

/* Wait until the uploader has nothing queued or running (the bytes are on the device). */
static void settle_uploads(struct env *v) {
    for (int i = 0; i < 10000; i++) {
        if (fq_idle(&v->up))
            return;
        usleep(1000);
    }
    fail_msg("uploads did not finish");
}

/* ---- tests ---------------------------------------------------------------------------------- */

static void test_layout(void **state) {
    (void)state;
    struct model m;
    const uint32_t L = 3 + tu_rnd(4), E = 4 + tu_rnd(8);
    model_make(&m, L, E);
    const uint64_t slots_min = 2 * m.dslot + 3 * m.eslot;
    const uint64_t min = slots_min < m.packed ? slots_min : m.packed;
    assert_int_equal(stage_min_bytes(m.secs, m.n_sections, L, E, 3), min);
    if (2 * m.dslot + m.eslot < m.packed)
        assert_int_equal(stage_min_bytes(m.secs, m.n_sections, L, E, 0), 2 * m.dslot + m.eslot);
    /* more in flight than experts: every expert slot (or the packed size when less) */
    const uint64_t all_e = 2 * m.dslot + (uint64_t)L * E * m.eslot;
    assert_int_equal(stage_min_bytes(m.secs, m.n_sections, L, E, 100000),
                     all_e < m.packed ? all_e : m.packed);
    assert_int_equal(stage_min_bytes(m.secs, 1, 1, 0, 4), align_up(m.secs[0].slot_bytes));

    uint8_t *region = aligned_alloc(SCHED_ALIGN, align_up(m.packed));
    assert_non_null(region);
    struct env dummy; /* the callbacks are never called here */
    memset(&dummy, 0, sizeof(dummy));
    struct stage_params p = {.region = region,
                             .sections = m.secs,
                             .n_sections = m.n_sections,
                             .n_layer = L,
                             .n_expert = E,
                             .max_in_flight = 3,
                             .reader = {fake_read, &dummy},
                             .uploader = {fake_upload, &dummy},
                             .done = on_done,
                             .done_user = &dummy};
    struct stage *st = (struct stage *)&p; /* must be reset to NULL on failure */
    p.region_bytes = min - 1;
    assert_int_equal(stage_create(&p, &st), MOERUN_ERR_BUDGET);
    assert_null(st);
    char num[32];
    snprintf(num, sizeof(num), "%llu", (unsigned long long)min);
    assert_true(tu_contains(moerun_errmsg(), num));
    assert_true(tu_contains(moerun_errmsg(), "MiB"));

    const uint64_t all_dense = L * m.dslot + 3 * m.eslot;
    struct {
        uint64_t bytes;
        uint32_t n_dense_slots;
        bool packed;
        uint32_t nd, ne;
    } cases[] = {
        {slots_min, 0, false, 2, 3},
        {slots_min + m.eslot - 1, 0, false, 2, 3},
        {all_dense - 1, 0, false, 2, (uint32_t)((all_dense - 1 - 2 * m.dslot) / m.eslot)},
        {all_dense, 0, false, L, 3},
        {all_dense + 2 * m.eslot + 7, 0, false, L, 5},
        {all_dense + 2 * m.eslot, 1, false, 2,
         (uint32_t)((all_dense + 2 * m.eslot - 2 * m.dslot) / m.eslot)}, /* clamped up to 2 */
        {all_dense + 2 * m.eslot, 3, false, 3,
         (uint32_t)((all_dense + 2 * m.eslot - 3 * m.dslot) / m.eslot)},
        {all_dense, 100, false, L, 3},         /* clamped down to n_layer */
        {slots_min + m.dslot, L, false, 3, 3}, /* clamped down to the budget */
        {m.packed, 0, true, L, L * E},         /* each section in its place */
    };
    for (size_t c = 0; c < MR_ARRAY_LEN(cases); c++) {
        if (!cases[c].packed && cases[c].bytes >= m.packed)
            continue; /* the random sizes make this case something else */
        p.region_bytes = cases[c].bytes;
        p.n_dense_slots = cases[c].n_dense_slots;
        assert_int_equal(stage_create(&p, &st), MOERUN_OK);
        struct stage_layout lay;
        stage_get_layout(st, &lay);
        assert_int_equal(lay.packed, cases[c].packed);
        assert_int_equal(lay.n_dense_slots, cases[c].nd);
        uint32_t ne = cases[c].ne < L * E ? cases[c].ne : L * E;
        assert_int_equal(lay.n_expert_slots, ne);
        assert_int_equal(lay.dense_slot_bytes, m.dslot);
        assert_int_equal(lay.expert_slot_bytes, m.eslot);
        if (!lay.packed)
            assert_true(lay.n_dense_slots * m.dslot + lay.n_expert_slots * m.eslot <=
                        cases[c].bytes);
        stage_destroy(st);
    }
    /* inconsistent sections, unaligned region, missing callbacks */
    p.region_bytes = m.packed;
    p.n_sections = m.n_sections - 1;
    assert_int_equal(stage_create(&p, &st), MOERUN_ERR_INVALID_ARG);
    p.n_sections = m.n_sections;
    p.region = region + 64;
    assert_int_equal(stage_create(&p, &st), MOERUN_ERR_INVALID_ARG);
    p.region = region;
    p.uploader.upload = NULL;
    assert_int_equal(stage_create(&p, &st), MOERUN_ERR_INVALID_ARG);
    p.uploader.upload = fake_upload;
    m.secs[L].ranges[0].slot_offset = m.secs[L].slot_bytes;
    assert_int_equal(stage_create(&p, &st), MOERUN_ERR_INVALID_ARG);
    assert_null(st);
    stage_destroy(NULL);
    free(region);
    model_free(&m);
}

/* Every section once (misses), then again (hits when they all fit); the device gets the bytes. */
static void run_hits(bool threaded, bool packed) {
    struct env v;
    struct env_opts o = {.n_layer = 3,
                         .n_expert = 6,
                         .n_dense = 3,
                         .n_eslots = 4,
                         .max_in_flight = 2,
                         .rd_threaded = threaded,
                         .up_threaded = threaded,
                         .delay_max = 200};
    if (packed) {
        struct model tmp; /* same draws as env_open's model: size the region from a twin */
        struct tu_rng save = tu_main_rng;
        model_make(&tmp, o.n_layer, o.n_expert);
        tu_main_rng = save;
        o.region_bytes = tmp.packed;
        model_free(&tmp);
    }
    env_open(&v, &o);
    struct stage_layout lay;
    stage_get_layout(v.st, &lay);
    assert_int_equal(lay.packed, packed);
    for (int round = 0; round < 2; round++)
        for (uint32_t i = 0; i < v.m.n_sections; i++)
            assert_int_equal(load_wait(&v, i), MOERUN_OK);
    settle_uploads(&v);
    for (uint32_t i = 0; i < v.m.n_sections; i++)
        assert_true(section_ok(&v.m, i, dev_at(&v, i)));
    struct stage_stats st;
    stage_get_stats(v.st, &st);
    assert_int_equal(st.host_hits + st.host_misses, 2 * v.m.n_sections);
    assert_int_equal(st.uploads, 2 * v.m.n_sections);
    assert_int_equal(st.reads, st.host_misses);
    assert_int_equal(fq_calls(&v.rd), st.host_misses);
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < v.m.n_sections; i++)
        for (uint32_t r = 0; r < v.m.secs[i].n_ranges; r++)
            bytes += v.m.secs[i].ranges[r].bytes;
    assert_int_equal(st.bytes_uploaded, 2 * bytes);
    if (packed) {
        assert_int_equal(st.host_misses, v.m.n_sections);
        assert_int_equal(st.host_hits, v.m.n_sections);
        assert_int_equal(st.bytes_read, bytes);
        assert_int_equal(st.evictions, 0);
    } else {
        /* the dense parts all fit (3 slots): hits the second time; 4 expert slots for 18
         * experts in a cycle: all misses */
        assert_int_equal(st.host_hits, v.m.n_layer);
        assert_int_equal(st.host_misses, v.m.n_sections + v.m.n_sections - v.m.n_layer);
    }
    stage_reset_stats(v.st);
    stage_get_stats(v.st, &st);
    assert_int_equal(st.host_hits + st.host_misses + st.uploads + st.bytes_read, 0);
    env_close(&v);
}

static void test_hits(void **state) {
    (void)state;
    run_hits(false, false);
    run_hits(false, true);
    run_hits(true, false);
    run_hits(true, true);
}

/* LRU over the expert slots, with hits refreshing their place. */
static void test_eviction(void **state) {
    (void)state;
    struct env v;
    struct env_opts o = {.n_layer = 2, .n_expert = 8, .n_dense = 2, .n_eslots = 3};
    env_open(&v, &o);
    struct stage_layout lay;
    stage_get_layout(v.st, &lay);
    assert_false(lay.packed);
    assert_int_equal(lay.n_expert_slots, 3);
    const uint32_t e0 = 2, e1 = 3, e2 = 4, e3 = 5; /* layer 0 experts 0..3 */
    struct {
        uint32_t sec;
        bool hit;
    } seq[] = {{e0, false}, {e1, false},
               {e2, false}, {e0, true},
               {e3, false}, /* evicts e1 */
               {e2, true},  {e1, false} /* evicts e0 */,
               {e3, true},  {e0, false}, /* evicts e2 */
               {e1, true},  {e3, true},
               {e2, false}, /* evicts e0 */ {e0, false}};
    uint64_t hits = 0, misses = 0;
    for (size_t i = 0; i < MR_ARRAY_LEN(seq); i++) {
        assert_int_equal(load_wait(&v, seq[i].sec), MOERUN_OK);
        assert_true(section_ok(&v.m, seq[i].sec, dev_at(&v, seq[i].sec)));
        struct stage_stats st;
        stage_get_stats(v.st, &st);
        hits += seq[i].hit;
        misses += !seq[i].hit;
        assert_int_equal(st.host_hits, hits);
        assert_int_equal(st.host_misses, misses);
    }
    struct stage_stats st;
    stage_get_stats(v.st, &st);
    assert_int_equal(st.evictions, misses - 3);
    /* a dense part loaded twice in a row is a hit */
    assert_int_equal(load_wait(&v, 0), MOERUN_OK);
    assert_int_equal(load_wait(&v, 0), MOERUN_OK);
    stage_get_stats(v.st, &st);
    assert_int_equal(st.host_hits, hits + 1);
    /* loading a section again before its load was done is the caller's bug */
    fq_hold(&v.rd, true);
    assert_int_equal(load(&v, 9), MOERUN_OK);
    assert_int_equal(load(&v, 9), MOERUN_ERR_INTERNAL);
    assert_int_equal(fq_release(&v.rd, 1), 1);
    assert_int_equal(wait_done(&v, 9, 1), MOERUN_OK);
    env_close(&v);
}

/* Every host slot pinned: requests queue, start in order as slots free, and all arrive. */
static void run_queue(bool hold_uploads) {
    struct env v;
    struct env_opts o = {.n_layer = 2, .n_expert = 8, .n_dense = 2, .n_eslots = 2};
    env_open(&v, &o);
    fq_hold(&v.rd, true);
    fq_hold(&v.up, hold_uploads);
    const uint32_t secs[6] = {2, 7, 5, 12, 9, 3};
    for (int i = 0; i < 6; i++)
        assert_int_equal(load(&v, secs[i]), MOERUN_OK);
    assert_int_equal(fq_held(&v.rd), 2);
    struct stage_stats st;
    stage_get_stats(v.st, &st);
    assert_int_equal(st.queued, 4);
    assert_int_equal(done_total(&v), 0);
    /* a dense part has its own slots: not behind the experts */
    assert_int_equal(load(&v, 1), MOERUN_OK);
    assert_int_equal(fq_held(&v.rd), 3);
    assert_int_equal(fq_release(&v.rd, 3), 3);
    if (hold_uploads) { /* read, uploads held: slots still pinned, nothing more starts */
        usleep(20000);
        assert_int_equal(fq_held(&v.rd), 0);
        assert_int_equal(fq_held(&v.up), 3);
        assert_int_equal(done_total(&v), 3); /* done = upload enqueued */
        assert_int_equal(fq_release(&v.up, 3), 3);
    }
    for (int round = 0; round < 2; round++) {
        wait_held(&v.rd, 2);
        assert_int_equal(fq_release(&v.rd, 2), 2);
        if (hold_uploads) {
            wait_held(&v.up, 2);
            assert_int_equal(fq_release(&v.up, 2), 2);
        }
    }
    for (int i = 0; i < 6; i++)
        assert_int_equal(wait_done(&v, secs[i], 1), MOERUN_OK);
    assert_int_equal(wait_done(&v, 1, 1), MOERUN_OK);
    settle_uploads(&v);
    for (int i = 0; i < 6; i++) {
        assert_true(section_ok(&v.m, secs[i], dev_at(&v, secs[i])));
        assert_int_equal(v.rd.log[i < 2 ? i : i + 1].id, secs[i]); /* FIFO */
    }
    env_close(&v);
}

static void test_queue(void **state) {
    (void)state;
    run_queue(false);
    run_queue(true);
}

/* The error tests' env: 2 layers of 6 experts, host slots for 2 dense parts and 2 experts. */
static void env_open_small(struct env *v, bool threaded) {
    struct env_opts o = {.n_layer = 2,
                         .n_expert = 6,
                         .n_dense = 2,
                         .n_eslots = 2,
                         .rd_threaded = threaded,
                         .up_threaded = threaded,
                         .delay_max = 100};
    env_open(v, &o);
}

/* A read that fails (callback) or is refused (return): the error reaches done or load's caller,
 * the slot is left free, and the next load of the section works. */
static void run_read_error(bool threaded) {
    struct env v;
    env_open_small(&v, threaded);
    fq_fail(&v.rd, 0, false);
    assert_int_equal(load_wait(&v, 4), MOERUN_ERR_IO);
    assert_true(tu_contains(v.dn.msg[4], "injected read failure"));
    assert_int_equal(load_wait(&v, 4), MOERUN_OK);
    settle_uploads(&v);
    assert_true(section_ok(&v.m, 4, dev_at(&v, 4)));

    fq_fail(&v.rd, (int64_t)fq_calls(&v.rd), true);
    assert_int_equal(load(&v, 5), MOERUN_ERR_IO);
    assert_true(tu_contains(moerun_errmsg(), "injected read refusal"));
    assert_int_equal(done_count(&v, 5), 0); /* no callback */
    assert_int_equal(load_wait(&v, 5), MOERUN_OK);

    /* refused while queued: the stage's thread reports it through done */
    settle_uploads(&v); /* no host slot pinned now */
    fq_hold(&v.rd, true);
    assert_int_equal(load(&v, 6), MOERUN_OK);
    assert_int_equal(load(&v, 7), MOERUN_OK);
    assert_int_equal(load(&v, 8), MOERUN_OK); /* queued */
    fq_fail(&v.rd, (int64_t)fq_calls(&v.rd), true);
    assert_int_equal(fq_release(&v.rd, 2), 2);
    assert_int_equal(wait_done(&v, 8, 1), MOERUN_ERR_IO);
    assert_true(tu_contains(v.dn.msg[8], "injected read refusal"));
    fq_hold(&v.rd, false);
    assert_int_equal(wait_done(&v, 6, 1), MOERUN_OK);
    assert_int_equal(wait_done(&v, 7, 1), MOERUN_OK);
    assert_int_equal(load_wait(&v, 8), MOERUN_OK);
    settle_uploads(&v);
    for (uint32_t s = 4; s <= 8; s++)
        assert_true(section_ok(&v.m, s, dev_at(&v, s)));
    struct stage_stats st;
    stage_get_stats(v.st, &st);
    assert_int_equal(st.read_errors, 3);
    env_close(&v);
}

static void test_read_error(void **state) {
    (void)state;
    run_read_error(false);
    run_read_error(true);
}

/* An upload refused after a read (done gets it), refused on a hit (load returns it), and one
 * that fails after it was enqueued (counted); the host copy stays good and the next load works. */
static void run_upload_error(bool threaded) {
    struct env v;
    env_open_small(&v, threaded);
    fq_fail(&v.up, 0, true);
    assert_int_equal(load_wait(&v, 3), MOERUN_ERR_BACKEND);
    assert_true(tu_contains(v.dn.msg[3], "injected upload refusal"));
    assert_int_equal(load_wait(&v, 3), MOERUN_OK); /* from the host slot */
    struct stage_stats st;
    stage_get_stats(v.st, &st);
    assert_int_equal(st.host_hits, 1);
    assert_int_equal(st.host_misses, 1);

    fq_fail(&v.up, (int64_t)fq_calls(&v.up), true);
    assert_int_equal(load(&v, 3), MOERUN_ERR_BACKEND); /* a hit refused: no callback */
    assert_true(tu_contains(moerun_errmsg(), "injected upload refusal"));
    assert_int_equal(done_count(&v, 3), 2);
    assert_int_equal(load_wait(&v, 3), MOERUN_OK);

    fq_fail(&v.up, (int64_t)fq_calls(&v.up), false);
    assert_int_equal(load_wait(&v, 10), MOERUN_OK); /* enqueued: the failure comes later */
    settle_uploads(&v);
    assert_int_equal(load_wait(&v, 10), MOERUN_OK);
    /* the failed uploads' host slots were unpinned: two more experts can take them */
    assert_int_equal(load_wait(&v, 11), MOERUN_OK);
    assert_int_equal(load_wait(&v, 12), MOERUN_OK);
    settle_uploads(&v);
    for (uint32_t s = 10; s <= 12; s++)
        assert_true(section_ok(&v.m, s, dev_at(&v, s)));
    stage_get_stats(v.st, &st);
    assert_int_equal(st.upload_errors, 3);
    env_close(&v);
}

static void test_upload_error(void **state) {
    (void)state;
    run_upload_error(false);
    run_upload_error(true);
}

/* Destroy with reads, uploads and queued requests in flight: it waits for every callback. */
static void test_destroy_in_flight(void **state) {
    (void)state;
    for (int run = 0; run < 6; run++) {
        struct env v;
        struct env_opts o = {.n_layer = 3,
                             .n_expert = 8,
                             .n_dense = 2,
                             .n_eslots = 1 + tu_rnd(4),
                             .rd_threaded = true,
                             .up_threaded = true,
                             .delay_max = 500};
        env_open(&v, &o);
        if (run % 2)
            fq_fail(&v.rd, tu_rnd(8), false);
        uint32_t n = 0;
        for (uint32_t i = 0; i < v.m.n_sections; i++)
            if (tu_rnd(2)) {
                assert_int_equal(load(&v, i), MOERUN_OK);
                n++;
            }
        stage_destroy(v.st);
        assert_int_equal(done_total(&v), n); /* every load's done was made */
        assert_int_equal(fq_held(&v.up), 0); /* and every upload finished */
        v.st = NULL;                         /* env_close: stage_destroy(NULL) */
        env_close(&v);
    }
}

/* ---- the real scheduler over a fake device, through the stage -------------------------------- */

static void scores_top(uint32_t n_expert, const int32_t *top, uint32_t k, float *sc) {
    for (uint32_t e = 0; e < n_expert; e++)
        sc[e] = 0.01f * (float)tu_rnd(10);
    for (uint32_t i = 0; i < k; i++)
        sc[top[i]] = 0.9f - 0.1f * (float)i;
}

/* Wait until no upload into base is queued or running, then check its bytes: the real device
 * orders compute after the upload with events; the fake's lock stands in for that. */
static void await_bytes(struct env *v, uint32_t sec, const void *base) {
    for (int i = 0; i < 100000 && fq_pending(&v->up, base); i++)
        usleep(100);
    pthread_mutex_lock(&v->up.mu);
    bool ok = section_ok(&v->m, sec, base);
    pthread_mutex_unlock(&v->up.mu);
    assert_true(ok);
}

static void run_with_sched(uint32_t run) {
    struct env v;
    struct env_opts o;
    memset(&o, 0, sizeof(o));
    o.n_layer = 2 + tu_rnd(4);
    o.n_expert = 4 + tu_rnd(9);
    o.n_dense = 2;
    o.n_eslots = 1 + tu_rnd(6);
    o.max_in_flight = 1 + tu_rnd(3);
    if (o.n_eslots < o.max_in_flight)
        o.n_eslots = o.max_in_flight;
    o.rd_threaded = run % 4 != 0;
    o.up_threaded = run % 4 != 1;
    o.delay_max = 1 + tu_rnd(200);
    env_open(&v, &o);
    const uint32_t k = 1 + tu_rnd(o.n_expert < 3 ? o.n_expert : 3);
    /* the device: the scheduler's region, a ring or every dense part, a few expert slots */
    uint64_t dd = v.m.dslot, de = v.m.eslot;
    uint32_t dev_dense = tu_rnd(2) ? 2 : o.n_layer, dev_exp = k + tu_rnd(5);
    uint64_t dev_bytes = dev_dense * dd + dev_exp * de;
    free(v.dev);
    v.dev = aligned_alloc(SCHED_ALIGN, align_up(dev_bytes));
    assert_non_null(v.dev);
    struct sched_params sp = {.n_layer = o.n_layer,
                              .n_expert = o.n_expert,
                              .n_expert_used = k,
                              .region = v.dev,
                              .region_bytes = dev_bytes,
                              .policy = (enum sched_policy)(run % 3),
                              .prefetch = run % 2 == 0,
                              .prefetch_when_idle = run % 3 == 0};
    struct sched *s;
    assert_int_equal(sched_create(&sp, v.m.secs, v.m.n_sections, stage_loader(v.st), &s),
                     MOERUN_OK);
    v.s = s;
    uint64_t requested = 0, fails = 0, n_io = 0;
    for (int t = 0; t < 6; t++) {
        for (uint32_t l = 0; l < o.n_layer; l++) {
            /* a read failing or refused, or an upload refused (one that failed after it was
             * enqueued would leave the fake device stale: a real one reports it on its stream) */
            if (tu_rnd(10) == 0) {
                struct fake_queue *f = tu_rnd(2) ? &v.rd : &v.up;
                fq_fail(f, (int64_t)fq_calls(f) + tu_rnd(3), f == &v.up || tu_rnd(2));
                fails++;
            }
            const void *b;
            int rc;
            while ((rc = sched_dense_acquire(s, l, &b)) != MOERUN_OK) {
                assert_true(rc == MOERUN_ERR_IO || rc == MOERUN_ERR_BACKEND);
                n_io++;
            }
            await_bytes(&v, l, b);
            if (tu_rnd(2)) {
                float sc[64];
                int32_t top[4];
                tu_random_set(o.n_expert, k, top);
                scores_top(o.n_expert, top, k, sc);
                sched_predict(s, (l + 1) % o.n_layer, sc);
            }
            int32_t set[64];
            uint32_t n = 1 + tu_rnd(tu_rnd(2) ? k : o.n_expert);
            tu_random_set(o.n_expert, n, set);
            assert_int_equal(sched_experts_request(s, l, set, n), MOERUN_OK);
            requested += n;
            uint32_t got = 0;
            for (;;) {
                int32_t e;
                rc = sched_experts_next(s, l, &e, &b);
                if (rc == 1)
                    break;
                if (rc == MOERUN_ERR_IO || rc == MOERUN_ERR_BACKEND) { /* a read, an upload */
                    n_io++;
                    continue;
                }
                assert_int_equal(rc, MOERUN_OK);
                await_bytes(&v, sched_section_index(o.n_layer, o.n_expert, l, e), b);
                sched_expert_release(s, l, e);
                got++;
            }
            assert_int_equal(got, n);
            sched_dense_release(s, l);
        }
    }
    assert_true(n_io <= fails);
    struct sched_stats ss;
    sched_get_stats(s, &ss);
    assert_int_equal(ss.expert_hits + ss.expert_misses, requested);
    sched_destroy(s); /* waits for its loads: every done delivered */
    v.s = NULL;
    struct stage_stats gs;
    stage_get_stats(v.st, &gs);
    assert_int_equal(gs.host_hits + gs.host_misses, ss.loads); /* each load, once */
    assert_true(gs.uploads <= ss.loads && gs.bytes_uploaded <= ss.bytes_loaded);
    assert_int_equal(gs.reads, fq_calls(&v.rd) - gs.read_errors);
    env_close(&v);
}

static void test_with_sched(void **state) {
    (void)state;
    for (uint32_t run = 0; run < 24; run++)
        run_with_sched(run);
}

int main(void) {
    alarm(300); /* a deadlock (destroy waiting for a callback that never comes) fails the run */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layout),
        cmocka_unit_test(test_hits),
        cmocka_unit_test(test_eviction),
        cmocka_unit_test(test_queue),
        cmocka_unit_test(test_read_error),
        cmocka_unit_test(test_upload_error),
        cmocka_unit_test(test_destroy_in_flight),
        cmocka_unit_test(test_with_sched),
    };
    return cmocka_run_group_tests(tests, tu_rng_setup, NULL);
}
