/* Stage (host tier between the NVMe reader and the GPU tier) against a fake model file, a fake
 * reader and a fake uploader (tests/stage_env.h: each synchronous inside its call, on its own
 * thread with delays, or holding its work until the test releases it): the host slot layout and
 * the minimum, hits and misses, LRU eviction, requests queued while every host slot is pinned
 * (FIFO), injected read and upload failures (refused and failed later), and destroy with work in
 * flight. Every section that reaches the fake device is compared with the file's bytes, and the
 * uploader checks that the host slot it copies from still holds the section (nothing evicted
 * while pinned). The real scheduler driving the stage is test_stage_sched. Fresh random data
 * each run (MOERUN_TEST_SEED replays a run). */
#include "stage_env.h"

#include "internal.h"
#include "moerun.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- tests ---------------------------------------------------------------------------------- */

static void test_layout(void **state) {
    (void)state;
    struct se_model m;
    const uint32_t L = 3 + tu_rnd(4), E = 4 + tu_rnd(8);
    se_model_make(&m, L, E);
    const uint64_t slots_min = 2 * m.dslot + 3 * m.eslot;
    const uint64_t min = slots_min < m.packed ? slots_min : m.packed;
    assert_int_equal(stage_min_bytes(m.secs, m.n_sections, L, E, 3), min);
    if (2 * m.dslot + m.eslot < m.packed)
        assert_int_equal(stage_min_bytes(m.secs, m.n_sections, L, E, 0), 2 * m.dslot + m.eslot);
    /* more in flight than experts: every expert slot (or the packed size when less) */
    const uint64_t all_e = 2 * m.dslot + (uint64_t)L * E * m.eslot;
    assert_int_equal(stage_min_bytes(m.secs, m.n_sections, L, E, 100000),
                     all_e < m.packed ? all_e : m.packed);
    assert_int_equal(stage_min_bytes(m.secs, 1, 1, 0, 4), se_align_up(m.secs[0].slot_bytes));

    uint8_t *region = aligned_alloc(SCHED_ALIGN, se_align_up(m.packed));
    assert_non_null(region);
    struct se_env dummy; /* the callbacks are never called here */
    memset(&dummy, 0, sizeof(dummy));
    struct stage_params p = {.region = region,
                             .sections = m.secs,
                             .n_sections = m.n_sections,
                             .n_layer = L,
                             .n_expert = E,
                             .max_in_flight = 3,
                             .reader = {se_fake_read, &dummy},
                             .uploader = {se_fake_upload, &dummy},
                             .done = se_on_done,
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
    p.uploader.upload = se_fake_upload;
    m.secs[L].ranges[0].slot_offset = m.secs[L].slot_bytes;
    assert_int_equal(stage_create(&p, &st), MOERUN_ERR_INVALID_ARG);
    assert_null(st);
    stage_destroy(NULL);
    free(region);
    se_model_free(&m);
}

/* Every section once (misses), then again (hits when they all fit); the device gets the bytes. */
static void run_hits(bool threaded, bool packed) {
    struct se_env v;
    struct se_env_opts o = {.n_layer = 3,
                            .n_expert = 6,
                            .n_dense = 3,
                            .n_eslots = 4,
                            .max_in_flight = 2,
                            .rd_threaded = threaded,
                            .up_threaded = threaded,
                            .delay_max = 200};
    if (packed) {
        struct se_model tmp; /* same draws as se_env_open's model: size the region from a twin */
        struct tu_rng save = tu_main_rng;
        se_model_make(&tmp, o.n_layer, o.n_expert);
        tu_main_rng = save;
        o.region_bytes = tmp.packed;
        se_model_free(&tmp);
    }
    se_env_open(&v, &o);
    struct stage_layout lay;
    stage_get_layout(v.st, &lay);
    assert_int_equal(lay.packed, packed);
    for (int round = 0; round < 2; round++)
        for (uint32_t i = 0; i < v.m.n_sections; i++)
            assert_int_equal(se_load_wait(&v, i), MOERUN_OK);
    se_settle_uploads(&v);
    for (uint32_t i = 0; i < v.m.n_sections; i++)
        assert_true(se_section_ok(&v.m, i, se_dev_at(&v, i)));
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
    se_env_close(&v);
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
    struct se_env v;
    struct se_env_opts o = {.n_layer = 2, .n_expert = 8, .n_dense = 2, .n_eslots = 3};
    se_env_open(&v, &o);
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
        assert_int_equal(se_load_wait(&v, seq[i].sec), MOERUN_OK);
        assert_true(se_section_ok(&v.m, seq[i].sec, se_dev_at(&v, seq[i].sec)));
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
    assert_int_equal(se_load_wait(&v, 0), MOERUN_OK);
    assert_int_equal(se_load_wait(&v, 0), MOERUN_OK);
    stage_get_stats(v.st, &st);
    assert_int_equal(st.host_hits, hits + 1);
    /* loading a section again before its load was done is the caller's bug */
    fq_hold(&v.rd, true);
    assert_int_equal(se_load(&v, 9), MOERUN_OK);
    assert_int_equal(se_load(&v, 9), MOERUN_ERR_INTERNAL);
    assert_int_equal(fq_release(&v.rd, 1), 1);
    assert_int_equal(se_wait_done(&v, 9, 1), MOERUN_OK);
    se_env_close(&v);
}

/* Every host slot pinned: requests queue, start in order as slots free, and all arrive. */
static void run_queue(bool hold_uploads) {
    struct se_env v;
    struct se_env_opts o = {.n_layer = 2, .n_expert = 8, .n_dense = 2, .n_eslots = 2};
    se_env_open(&v, &o);
    fq_hold(&v.rd, true);
    fq_hold(&v.up, hold_uploads);
    const uint32_t secs[6] = {2, 7, 5, 12, 9, 3};
    for (int i = 0; i < 6; i++)
        assert_int_equal(se_load(&v, secs[i]), MOERUN_OK);
    assert_int_equal(fq_held(&v.rd), 2);
    struct stage_stats st;
    stage_get_stats(v.st, &st);
    assert_int_equal(st.queued, 4);
    assert_int_equal(se_done_total(&v), 0);
    /* a dense part has its own slots: not behind the experts */
    assert_int_equal(se_load(&v, 1), MOERUN_OK);
    assert_int_equal(fq_held(&v.rd), 3);
    assert_int_equal(fq_release(&v.rd, 3), 3);
    if (hold_uploads) { /* read, uploads held: slots still pinned, nothing more starts */
        usleep(20000);
        assert_int_equal(fq_held(&v.rd), 0);
        assert_int_equal(fq_held(&v.up), 3);
        assert_int_equal(se_done_total(&v), 3); /* done = upload enqueued */
        assert_int_equal(fq_release(&v.up, 3), 3);
    }
    for (int round = 0; round < 2; round++) {
        se_wait_held(&v.rd, 2);
        assert_int_equal(fq_release(&v.rd, 2), 2);
        if (hold_uploads) {
            se_wait_held(&v.up, 2);
            assert_int_equal(fq_release(&v.up, 2), 2);
        }
    }
    for (int i = 0; i < 6; i++)
        assert_int_equal(se_wait_done(&v, secs[i], 1), MOERUN_OK);
    assert_int_equal(se_wait_done(&v, 1, 1), MOERUN_OK);
    se_settle_uploads(&v);
    for (int i = 0; i < 6; i++) {
        assert_true(se_section_ok(&v.m, secs[i], se_dev_at(&v, secs[i])));
        assert_int_equal(v.rd.log[i < 2 ? i : i + 1].id, secs[i]); /* FIFO */
    }
    se_env_close(&v);
}

static void test_queue(void **state) {
    (void)state;
    run_queue(false);
    run_queue(true);
}

/* The error tests' env: 2 layers of 6 experts, host slots for 2 dense parts and 2 experts. */
static void env_open_small(struct se_env *v, bool threaded) {
    struct se_env_opts o = {.n_layer = 2,
                            .n_expert = 6,
                            .n_dense = 2,
                            .n_eslots = 2,
                            .rd_threaded = threaded,
                            .up_threaded = threaded,
                            .delay_max = 100};
    se_env_open(v, &o);
}

/* A read that fails (callback) or is refused (return): the error reaches done or load's caller,
 * the slot is left free, and the next load of the section works. */
static void run_read_error(bool threaded) {
    struct se_env v;
    env_open_small(&v, threaded);
    fq_fail(&v.rd, 0, false);
    assert_int_equal(se_load_wait(&v, 4), MOERUN_ERR_IO);
    assert_true(tu_contains(v.dn.msg[4], "injected read failure"));
    assert_int_equal(se_load_wait(&v, 4), MOERUN_OK);
    se_settle_uploads(&v);
    assert_true(se_section_ok(&v.m, 4, se_dev_at(&v, 4)));

    fq_fail(&v.rd, (int64_t)fq_calls(&v.rd), true);
    assert_int_equal(se_load(&v, 5), MOERUN_ERR_IO);
    assert_true(tu_contains(moerun_errmsg(), "injected read refusal"));
    assert_int_equal(se_done_count(&v, 5), 0); /* no callback */
    assert_int_equal(se_load_wait(&v, 5), MOERUN_OK);

    /* refused while queued: the stage's thread reports it through done */
    se_settle_uploads(&v); /* no host slot pinned now */
    fq_hold(&v.rd, true);
    assert_int_equal(se_load(&v, 6), MOERUN_OK);
    assert_int_equal(se_load(&v, 7), MOERUN_OK);
    assert_int_equal(se_load(&v, 8), MOERUN_OK); /* queued */
    fq_fail(&v.rd, (int64_t)fq_calls(&v.rd), true);
    assert_int_equal(fq_release(&v.rd, 2), 2);
    assert_int_equal(se_wait_done(&v, 8, 1), MOERUN_ERR_IO);
    assert_true(tu_contains(v.dn.msg[8], "injected read refusal"));
    fq_hold(&v.rd, false);
    assert_int_equal(se_wait_done(&v, 6, 1), MOERUN_OK);
    assert_int_equal(se_wait_done(&v, 7, 1), MOERUN_OK);
    assert_int_equal(se_load_wait(&v, 8), MOERUN_OK);
    se_settle_uploads(&v);
    for (uint32_t s = 4; s <= 8; s++)
        assert_true(se_section_ok(&v.m, s, se_dev_at(&v, s)));
    struct stage_stats st;
    stage_get_stats(v.st, &st);
    assert_int_equal(st.read_errors, 3);
    se_env_close(&v);
}

static void test_read_error(void **state) {
    (void)state;
    run_read_error(false);
    run_read_error(true);
}

/* An upload refused after a read (done gets it), refused on a hit (load returns it), and one
 * that fails after it was enqueued (counted); the host copy stays good and the next load works. */
static void run_upload_error(bool threaded) {
    struct se_env v;
    env_open_small(&v, threaded);
    fq_fail(&v.up, 0, true);
    assert_int_equal(se_load_wait(&v, 3), MOERUN_ERR_BACKEND);
    assert_true(tu_contains(v.dn.msg[3], "injected upload refusal"));
    assert_int_equal(se_load_wait(&v, 3), MOERUN_OK); /* from the host slot */
    struct stage_stats st;
    stage_get_stats(v.st, &st);
    assert_int_equal(st.host_hits, 1);
    assert_int_equal(st.host_misses, 1);

    fq_fail(&v.up, (int64_t)fq_calls(&v.up), true);
    assert_int_equal(se_load(&v, 3), MOERUN_ERR_BACKEND); /* a hit refused: no callback */
    assert_true(tu_contains(moerun_errmsg(), "injected upload refusal"));
    assert_int_equal(se_done_count(&v, 3), 2);
    assert_int_equal(se_load_wait(&v, 3), MOERUN_OK);

    fq_fail(&v.up, (int64_t)fq_calls(&v.up), false);
    assert_int_equal(se_load_wait(&v, 10), MOERUN_OK); /* enqueued: the failure comes later */
    se_settle_uploads(&v);
    assert_int_equal(se_load_wait(&v, 10), MOERUN_OK);
    /* the failed uploads' host slots were unpinned: two more experts can take them */
    assert_int_equal(se_load_wait(&v, 11), MOERUN_OK);
    assert_int_equal(se_load_wait(&v, 12), MOERUN_OK);
    se_settle_uploads(&v);
    for (uint32_t s = 10; s <= 12; s++)
        assert_true(se_section_ok(&v.m, s, se_dev_at(&v, s)));
    stage_get_stats(v.st, &st);
    assert_int_equal(st.upload_errors, 3);
    se_env_close(&v);
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
        struct se_env v;
        struct se_env_opts o = {.n_layer = 3,
                                .n_expert = 8,
                                .n_dense = 2,
                                .n_eslots = 1 + tu_rnd(4),
                                .rd_threaded = true,
                                .up_threaded = true,
                                .delay_max = 500};
        se_env_open(&v, &o);
        if (run % 2)
            fq_fail(&v.rd, tu_rnd(8), false);
        uint32_t n = 0;
        for (uint32_t i = 0; i < v.m.n_sections; i++)
            if (tu_rnd(2)) {
                assert_int_equal(se_load(&v, i), MOERUN_OK);
                n++;
            }
        stage_destroy(v.st);
        assert_int_equal(se_done_total(&v), n); /* every load's done was made */
        assert_int_equal(fq_held(&v.up), 0);    /* and every upload finished */
        v.st = NULL;                            /* se_env_close: stage_destroy(NULL) */
        se_env_close(&v);
    }
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
    };
    return cmocka_run_group_tests(tests, tu_rng_setup, NULL);
}
