/* Prefetch's AUTO mode in the scheduler (scheduler.h, sched_set_load_cost): it acts on
 * predictions while the loads of their wrong experts would take less time than a layer computes,
 * stops when they would take longer, and starts again when loading gets cheap. Driven with a
 * loader that completes at once, scripted routing (predictions half right or always right) and
 * load costs far from the decision boundary, so no outcome depends on this machine's speed. */
#include "testutil.h"

#include "scheduler.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#define N_LAYER   4
#define N_EXPERT  8
#define K         2
#define SEC_BYTES 4096u

struct env {
    struct sched *s;
    uint8_t *region;
};

static int load_now(void *ctx, const struct sched_section *sec, void *dst, uint64_t tag) {
    (void)sec, (void)dst;
    sched_load_done(*(struct sched **)ctx, tag, MOERUN_OK, NULL);
    return MOERUN_OK;
}

/* Dense parts resident (one slot each), 4 expert slots for 32 experts: predictions for the
 * next layer are rarely resident already. */
static int env_open(struct env *v, enum sched_prefetch mode) {
    struct sched_section sec[N_LAYER + N_LAYER * N_EXPERT];
    memset(sec, 0, sizeof(sec));
    for (uint32_t l = 0; l < N_LAYER; l++)
        for (int32_t e = -1; e < N_EXPERT; e++) {
            struct sched_section *c = &sec[sched_section_index(N_LAYER, N_EXPERT, l, e)];
            c->layer = l;
            c->expert = e;
            c->n_ranges = 1;
            c->ranges[0].file_offset = (uint64_t)(l * (N_EXPERT + 1) + (uint32_t)(e + 1)) * 4096;
            c->ranges[0].bytes = SEC_BYTES;
            c->slot_bytes = SEC_BYTES;
        }
    const uint64_t bytes = (N_LAYER + 4) * (uint64_t)SEC_BYTES;
    v->region = aligned_alloc(SCHED_ALIGN, bytes);
    assert_non_null(v->region);
    struct sched_params p = {.n_layer = N_LAYER,
                             .n_expert = N_EXPERT,
                             .n_expert_used = K,
                             .region = v->region,
                             .region_bytes = bytes,
                             .policy = SCHED_POLICY_LRU,
                             .prefetch = mode};
    v->s = NULL;
    struct sched_loader ld = {load_now, &v->s};
    return sched_create(&p, sec, N_LAYER + N_LAYER * N_EXPERT, ld, &v->s);
}

static void env_close(struct env *v) {
    sched_destroy(v->s);
    free(v->region);
}

static void sleep_us(long us) {
    struct timespec ts = {0, us * 1000};
    nanosleep(&ts, NULL);
}

/* n_tok tokens through every layer: token t needs experts {t % 8, (t + 3) % 8} in each layer;
 * the prediction of the next layer names both (right) or the first and (t + 5) % 8 (half
 * right). compute_us: time each layer "computes" (a sleep: the compute time is then at least
 * that, whatever the machine). */
static void run_tokens(struct env *v, uint32_t t0, uint32_t n_tok, bool right, long compute_us) {
    for (uint32_t t = t0; t < t0 + n_tok; t++) {
        const int32_t need[K] = {(int32_t)(t % N_EXPERT), (int32_t)((t + 3) % N_EXPERT)};
        const int32_t wrong = (int32_t)((t + 5) % N_EXPERT);
        for (uint32_t l = 0; l < N_LAYER; l++) {
            const void *base;
            assert_int_equal(sched_dense_acquire(v->s, l, &base), MOERUN_OK);
            assert_int_equal(sched_experts_request(v->s, l, need, K), MOERUN_OK);
            float scores[N_EXPERT] = {0};
            scores[need[0]] = 0.6f;
            scores[right ? need[1] : wrong] = 0.4f;
            /* the next layer's prediction (of the next token for the last layer) */
            if (l + 1 < N_LAYER)
                sched_predict(v->s, l + 1, scores);
            int32_t e;
            int rc;
            while ((rc = sched_experts_next(v->s, l, &e, &base)) == MOERUN_OK)
                sched_expert_release(v->s, l, e);
            assert_int_equal(rc, 1);
            sched_dense_release(v->s, l);
            if (compute_us)
                sleep_us(compute_us);
        }
    }
}

static struct sched_stats stats(struct env *v) {
    struct sched_stats st;
    sched_get_stats(v->s, &st);
    return st;
}

/* Loading slow (1 ms per byte: 4 s per wrong expert) against layers of about a millisecond,
 * predictions half right: after the warm-up AUTO stops acting on predictions; with loading
 * made cheap again it starts again. */
static void test_off_when_wrong_loads_cost_more(void **state) {
    (void)state;
    struct env v;
    assert_int_equal(env_open(&v, SCHED_PREFETCH_AUTO), MOERUN_OK);
    run_tokens(&v, 0, 2, false, 0); /* no load cost known yet: on */
    struct sched_stats st = stats(&v);
    assert_true(st.prefetch_on);
    assert_true(st.prefetch_issued > 0);
    assert_int_equal(st.prefetch_skipped, 0);

    sched_set_load_cost(v.s, 1e6);
    run_tokens(&v, 2, 4, false, 200);
    const uint64_t issued = stats(&v).prefetch_issued;
    run_tokens(&v, 6, 4, false, 200);
    st = stats(&v);
    assert_false(st.prefetch_on);
    assert_int_equal(st.prefetch_issued, issued); /* nothing more was loaded ahead */
    assert_true(st.prefetch_skipped >= 4 * (N_LAYER - 1));
    assert_true(st.wrong_load_ns > st.layer_compute_ns);
    assert_true(st.layer_compute_ns >= 100000); /* the sleeps weigh in */

    /* the disk got fast (1e-6 ns per byte): a wrong expert costs nothing against a layer */
    sched_set_load_cost(v.s, 1e-6);
    run_tokens(&v, 10, 4, false, 200);
    st = stats(&v);
    assert_true(st.prefetch_on);
    assert_true(st.prefetch_issued > issued);
    env_close(&v);
}

/* Predictions always right cost nothing however slow loading is: AUTO stays on. */
static void test_on_when_predictions_are_right(void **state) {
    (void)state;
    struct env v;
    assert_int_equal(env_open(&v, SCHED_PREFETCH_AUTO), MOERUN_OK);
    sched_set_load_cost(v.s, 1e6);
    run_tokens(&v, 0, 8, true, 50);
    const struct sched_stats st = stats(&v);
    assert_true(st.prefetch_on);
    assert_int_equal(st.prefetch_skipped, 0);
    assert_true(st.prefetch_issued >= 8 * (N_LAYER - 1) / 2);
    assert_int_equal(st.predicted_correct, st.predicted);
    env_close(&v);
}

/* ON and OFF ignore the cost: ON loads ahead on every prediction, OFF on none; neither
 * counts skipped predictions. An unknown mode is refused. */
static void test_on_and_off_are_fixed(void **state) {
    (void)state;
    struct env v;
    assert_int_equal(env_open(&v, SCHED_PREFETCH_ON), MOERUN_OK);
    sched_set_load_cost(v.s, 1e6);
    run_tokens(&v, 0, 8, false, 0);
    struct sched_stats st = stats(&v);
    assert_true(st.prefetch_on);
    assert_true(st.prefetch_issued >= 8 * (N_LAYER - 1) / 2);
    assert_int_equal(st.prefetch_skipped, 0);
    env_close(&v);

    assert_int_equal(env_open(&v, SCHED_PREFETCH_OFF), MOERUN_OK);
    sched_set_load_cost(v.s, 1e-6);
    run_tokens(&v, 0, 8, false, 0);
    st = stats(&v);
    assert_false(st.prefetch_on);
    assert_int_equal(st.prefetch_issued, 0);
    assert_int_equal(st.prefetch_skipped, 0);
    assert_true(st.predicted > 0); /* still measured */
    env_close(&v);

    assert_int_equal(env_open(&v, (enum sched_prefetch)3), MOERUN_ERR_INVALID_ARG);
    assert_true(tu_contains(moerun_errmsg(), "prefetch mode"));
    free(v.region);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_off_when_wrong_loads_cost_more),
        cmocka_unit_test(test_on_when_predictions_are_right),
        cmocka_unit_test(test_on_and_off_are_fixed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
