/* The stage tests' fake environment (test_stage, test_stage_sched): a fake model file of random
 * bytes cut into sections, a fake reader and a fake uploader (tests/fake_queue.h: synchronous
 * inside the call, on their own thread with delays, or holding their work until the test
 * releases it), a fake device (one place per section, or the real scheduler's region), and a
 * record of the stage's completions. Every section that reaches the fake device can be compared
 * with the file's bytes; the uploader checks that the host slot it copies from still holds the
 * section (nothing evicted while pinned) and sets up.violated when not, which se_env_close
 * asserts. Draws from tu_main_rng (fresh random data each run; MOERUN_TEST_SEED replays one). */
#ifndef MOERUN_STAGE_ENV_H
#define MOERUN_STAGE_ENV_H

#include "fake_queue.h"
#include "testutil.h"

#include "scheduler.h"
#include "stage.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

/* x rounded up to SCHED_ALIGN */
uint64_t se_align_up(uint64_t x);

/* ---- fake model: sections over a file of random bytes ---------------------------------------- */

struct se_model {
    uint32_t n_layer, n_expert, n_sections;
    struct sched_section *secs;
    uint8_t *file;
    uint64_t dslot, eslot, packed; /* expected slot sizes, sum of rounded sizes */
};

/* n_layer dense sections, then n_layer * n_expert experts, at random offsets and sizes. */
void se_model_make(struct se_model *m, uint32_t n_layer, uint32_t n_expert);
void se_model_free(struct se_model *m);

/* base (a slot) holds the section's bytes from the file */
bool se_section_ok(const struct se_model *m, uint32_t sec, const void *base);

/* ---- environment ---------------------------------------------------------------------------- */

struct se_done_rec {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint32_t *count;  /* [n_sections] completions per tag */
    int *status;      /* [n_sections] the last one's */
    char (*msg)[128]; /* [n_sections] */
    uint64_t total;
};

struct se_env {
    struct se_model m;
    struct stage *st;
    struct sched *s; /* when the real scheduler drives the stage */
    uint8_t *region;
    uint64_t region_bytes;
    uint8_t *dev; /* fake device memory: one place per section (or the scheduler's region) */
    uint64_t dev_stride;
    struct fake_queue rd, up; /* the fake reader and uploader; jobs' items are sections */
    struct se_done_rec dn;
};

struct se_env_opts {
    uint32_t n_layer, n_expert;
    uint64_t region_bytes; /* 0: from the slot counts */
    uint32_t n_dense, n_eslots;
    uint32_t max_in_flight, n_dense_slots;
    bool rd_threaded, up_threaded;
    uint32_t delay_max;
};

/* The stage over a fresh model, its host region sized by o, the fakes as o says. */
void se_env_open(struct se_env *v, const struct se_env_opts *o);
/* Lets the work in flight finish, destroys the scheduler (when set) and the stage, checks that
 * neither fake saw a violation, frees everything. */
void se_env_close(struct se_env *v);

/* The fake device's place for sec (when no scheduler owns v->dev). */
void *se_dev_at(struct se_env *v, uint32_t sec);

/* The fake reader and uploader (the stage's reader and uploader; ctx is the env). */
int se_fake_read(void *ctx, const struct sched_section *sec, void *dst, uint64_t tag);
int se_fake_upload(void *ctx, const struct sched_section *sec, const void *src, void *dst,
                   uint64_t tag);
/* The stage's done callback (user is the env): to the scheduler when v->s is set, else
 * recorded in v->dn. */
void se_on_done(void *user, uint64_t tag, int status, const char *msg);

/* Wait (up to 10 s) until the fake holds at least n jobs (the stage's thread starts queued
 * requests asynchronously). */
void se_wait_held(struct fake_queue *q, uint32_t n);

/* ---- completions ---------------------------------------------------------------------------- */

uint32_t se_done_count(struct se_env *v, uint32_t sec);
uint64_t se_done_total(struct se_env *v);
/* Wait (up to 10 s) for the count-th completion of sec; returns its status. */
int se_wait_done(struct se_env *v, uint32_t sec, uint32_t count);

/* ---- loads ---------------------------------------------------------------------------------- */

/* The stage's load of sec into se_dev_at(v, sec), tagged sec: returns load's status. */
int se_load(struct se_env *v, uint32_t sec);
/* Load sec and wait for its completion (and, threaded, its bytes): returns the status. */
int se_load_wait(struct se_env *v, uint32_t sec);
/* Wait until the uploader has nothing queued or running (the bytes are on the device). */
void se_settle_uploads(struct se_env *v);

#endif /* MOERUN_STAGE_ENV_H */
