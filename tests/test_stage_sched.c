/* The real scheduler driving a fake device through the stage (tests/stage_env.h: a fake model
 * file, a fake reader and a fake uploader, each synchronous inside its call or on its own thread
 * with delays): random shapes, slot counts, policies and prefetch settings, with injected read
 * failures and read and upload refusals. Every section the scheduler hands out is compared with
 * the file's bytes, and the uploader checks that the host slot it copies from still holds the
 * section (nothing evicted while pinned); the scheduler's and the stage's counts must agree.
 * Fresh random data each run (MOERUN_TEST_SEED replays a run). */
#include "stage_env.h"

#include "moerun.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void scores_top(uint32_t n_expert, const int32_t *top, uint32_t k, float *sc) {
    for (uint32_t e = 0; e < n_expert; e++)
        sc[e] = 0.01f * (float)tu_rnd(10);
    for (uint32_t i = 0; i < k; i++)
        sc[top[i]] = 0.9f - 0.1f * (float)i;
}

/* Wait until no upload into base is queued or running, then check its bytes: the real device
 * orders compute after the upload with events; the fake's lock stands in for that. */
static void await_bytes(struct se_env *v, uint32_t sec, const void *base) {
    for (int i = 0; i < 100000 && fq_pending(&v->up, base); i++)
        usleep(100);
    pthread_mutex_lock(&v->up.mu);
    bool ok = se_section_ok(&v->m, sec, base);
    pthread_mutex_unlock(&v->up.mu);
    assert_true(ok);
}

static void run_with_sched(uint32_t run) {
    struct se_env v;
    struct se_env_opts o;
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
    se_env_open(&v, &o);
    const uint32_t k = 1 + tu_rnd(o.n_expert < 3 ? o.n_expert : 3);
    /* the device: the scheduler's region, a ring or every dense part, a few expert slots */
    uint64_t dd = v.m.dslot, de = v.m.eslot;
    uint32_t dev_dense = tu_rnd(2) ? 2 : o.n_layer, dev_exp = k + tu_rnd(5);
    uint64_t dev_bytes = dev_dense * dd + dev_exp * de;
    free(v.dev);
    v.dev = aligned_alloc(SCHED_ALIGN, se_align_up(dev_bytes));
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
    se_env_close(&v);
}

static void test_with_sched(void **state) {
    (void)state;
    for (uint32_t run = 0; run < 24; run++)
        run_with_sched(run);
}

int main(void) {
    alarm(300); /* a deadlock (destroy waiting for a callback that never comes) fails the run */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_with_sched),
    };
    return cmocka_run_group_tests(tests, tu_rng_setup, NULL);
}
