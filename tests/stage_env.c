/* The stage tests' fake environment: see stage_env.h. */
#include "stage_env.h"

#include "internal.h"
#include "moerun.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

uint64_t se_align_up(uint64_t x) {
    return (x + SCHED_ALIGN - 1) / SCHED_ALIGN * SCHED_ALIGN;
}

/* ---- fake model: sections over a file of random bytes ---------------------------------------- */

void se_model_make(struct se_model *m, uint32_t n_layer, uint32_t n_expert) {
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
        uint64_t a = se_align_up(c->slot_bytes);
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

void se_model_free(struct se_model *m) {
    free(m->secs);
    free(m->file);
}

static uint32_t sec_index(const struct se_model *m, const struct sched_section *c) {
    return sched_section_index(m->n_layer, m->n_expert, c->layer, c->expert);
}

bool se_section_ok(const struct se_model *m, uint32_t sec, const void *base) {
    const struct sched_section *c = &m->secs[sec];
    for (uint32_t r = 0; r < c->n_ranges; r++)
        if (memcmp((const uint8_t *)base + c->ranges[r].slot_offset,
                   m->file + c->ranges[r].file_offset, c->ranges[r].bytes) != 0)
            return false;
    return true;
}

/* ---- the fake device ----------------------------------------------------------------------- */

void *se_dev_at(struct se_env *v, uint32_t sec) {
    return v->dev + (uint64_t)sec * v->dev_stride;
}

/* ---- fake workers: the reader and the uploader ----------------------------------------------- */

static void read_run(void *user, const struct fq_job *j) {
    struct se_env *v = user;
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
    struct se_env *v = user;
    const struct sched_section *c = j->item;
    if (!se_section_ok(&v->m, sec_index(&v->m, c), j->src)) { /* host slot reused while pinned */
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

int se_fake_read(void *ctx, const struct sched_section *sec, void *dst, uint64_t tag) {
    struct se_env *v = ctx;
    struct fq_job j = {.item = sec, .dst = dst, .tag = tag};
    if (!fq_submit(&v->rd, &j, sec_index(&v->m, sec)))
        return mr_err(MOERUN_ERR_IO, "fake: injected read refusal");
    return MOERUN_OK;
}

int se_fake_upload(void *ctx, const struct sched_section *sec, const void *src, void *dst,
                   uint64_t tag) {
    struct se_env *v = ctx;
    struct fq_job j = {.item = sec, .src = src, .dst = dst, .tag = tag};
    if (!fq_submit(&v->up, &j, sec_index(&v->m, sec)))
        return mr_err(MOERUN_ERR_BACKEND, "fake: injected upload refusal");
    return MOERUN_OK;
}

static void worker_init(struct se_env *v, struct fake_queue *q,
                        void (*run)(void *, const struct fq_job *), bool threaded,
                        uint32_t delay_max) {
    struct fq_params p = {.run = run,
                          .user = v,
                          .threaded = threaded,
                          .delay_max = delay_max,
                          .seed = tu_rng_u64(&tu_main_rng)};
    assert_int_equal(fq_init(q, &p), 0);
}

void se_wait_held(struct fake_queue *q, uint32_t n) {
    for (int i = 0; i < 10000 && fq_held(q) < n; i++)
        usleep(1000);
    assert_true(fq_held(q) >= n);
}

/* ---- completions ---------------------------------------------------------------------------- */

void se_on_done(void *user, uint64_t tag, int status, const char *msg) {
    struct se_env *v = user;
    if (v->s) {
        sched_load_done(v->s, tag, status, msg);
        pthread_mutex_lock(&v->dn.mu);
        v->dn.total++;
        pthread_mutex_unlock(&v->dn.mu);
        return;
    }
    struct se_done_rec *d = &v->dn;
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

uint32_t se_done_count(struct se_env *v, uint32_t sec) {
    pthread_mutex_lock(&v->dn.mu);
    uint32_t n = v->dn.count[sec];
    pthread_mutex_unlock(&v->dn.mu);
    return n;
}

uint64_t se_done_total(struct se_env *v) {
    pthread_mutex_lock(&v->dn.mu);
    uint64_t n = v->dn.total;
    pthread_mutex_unlock(&v->dn.mu);
    return n;
}

int se_wait_done(struct se_env *v, uint32_t sec, uint32_t count) {
    struct se_done_rec *d = &v->dn;
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

/* ---- environment and loads ------------------------------------------------------------------ */

void se_env_open(struct se_env *v, const struct se_env_opts *o) {
    memset(v, 0, sizeof(*v));
    se_model_make(&v->m, o->n_layer, o->n_expert);
    v->region_bytes =
        o->region_bytes ? o->region_bytes : o->n_dense * v->m.dslot + o->n_eslots * v->m.eslot;
    v->region = aligned_alloc(SCHED_ALIGN, se_align_up(v->region_bytes));
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
        .reader = {se_fake_read, v},
        .uploader = {se_fake_upload, v},
        .done = se_on_done,
        .done_user = v,
    };
    assert_int_equal(stage_create(&p, &v->st), MOERUN_OK);
}

void se_env_close(struct se_env *v) {
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
    se_model_free(&v->m);
}

int se_load(struct se_env *v, uint32_t sec) {
    struct sched_loader ld = stage_loader(v->st);
    return ld.load(ld.ctx, &v->m.secs[sec], se_dev_at(v, sec), sec);
}

int se_load_wait(struct se_env *v, uint32_t sec) {
    uint32_t before = se_done_count(v, sec);
    int rc = se_load(v, sec);
    if (rc != MOERUN_OK)
        return rc;
    return se_wait_done(v, sec, before + 1);
}

void se_settle_uploads(struct se_env *v) {
    for (int i = 0; i < 10000; i++) {
        if (fq_idle(&v->up))
            return;
        usleep(1000);
    }
    fail_msg("uploads did not finish");
}
