/* GPU tier on the "sim" backend (the CPU with its own device allocation and an asynchronous copy
 * stream): the reserve allocator (placement from the top, first fit, alignment, the slot region,
 * MOERUN_ERR_BUDGET naming what is left), uploads then acquire then download equal to the
 * source, slot reuse ordering (a later upload into a slot waits for the compute stream's release
 * of it), fault injection, and many uploads from several threads through the callback ring.
 * Fresh random data each run (MOERUN_TEST_SEED replays a run). */
#include "testutil.h"

#include "backend.h"
#include "device.h"
#include "internal.h"
#include "moerun.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static struct mr_backend *sim_open(void) {
    struct mr_backend_config cfg = {.kind = MR_BACKEND_SIM, .n_threads = 1};
    struct mr_backend *be = NULL;
    assert_int_equal(mr_backend_sim_create(&cfg, &be), MOERUN_OK);
    return be;
}

/* ---- completions ---------------------------------------------------------------------------- */

#define MAX_TAGS 4096

struct rec {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint32_t count[MAX_TAGS];
    uint64_t order[MAX_TAGS]; /* tags in completion order */
    uint64_t total;
    bool bad; /* a status that was not OK, or a tag out of range */
};

static void rec_init(struct rec *r) {
    memset(r, 0, sizeof(*r));
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
}

static void rec_fini(struct rec *r) {
    assert_false(r->bad);
    pthread_cond_destroy(&r->cv);
    pthread_mutex_destroy(&r->mu);
}

static void on_done(void *user, uint64_t tag, int status, const char *msg) {
    (void)msg;
    struct rec *r = user;
    pthread_mutex_lock(&r->mu);
    if (tag >= MAX_TAGS || status != MOERUN_OK)
        r->bad = true;
    else
        r->count[tag]++;
    if (r->total < MAX_TAGS)
        r->order[r->total] = tag;
    r->total++;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

static uint32_t rec_count(struct rec *r, uint64_t tag) {
    pthread_mutex_lock(&r->mu);
    uint32_t n = r->count[tag];
    pthread_mutex_unlock(&r->mu);
    return n;
}

/* Wait (up to 10 s) until tag has completed n times. */
static void rec_wait(struct rec *r, uint64_t tag, uint32_t n) {
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += 10;
    pthread_mutex_lock(&r->mu);
    while (r->count[tag] < n)
        if (pthread_cond_timedwait(&r->cv, &r->mu, &dl))
            break;
    uint32_t got = r->count[tag];
    pthread_mutex_unlock(&r->mu);
    assert_true(got >= n);
}

/* ---- reserve -------------------------------------------------------------------------------- */

struct held {
    uint8_t *p;
    uint64_t bytes;
};

/* Blocks lie above the slot region, inside the allocation, aligned, and do not overlap. */
static void check_blocks(struct tier_device *d, uint64_t floor, const struct held *h, uint32_t n,
                         const uint64_t *align) {
    uint8_t *base = tier_device_base(d), *end = base + tier_device_bytes(d); /* sim: aligned */
    uint64_t sum = 0;
    for (uint32_t i = 0; i < n; i++) {
        assert_true(h[i].p >= base + floor && h[i].p + h[i].bytes <= end);
        assert_int_equal((uintptr_t)h[i].p % align[i], 0);
        for (uint32_t j = 0; j < i; j++)
            assert_true(h[i].p + h[i].bytes <= h[j].p || h[j].p + h[j].bytes <= h[i].p);
        sum += h[i].bytes;
    }
    struct tier_device_stats st;
    tier_device_get_stats(d, &st);
    assert_int_equal(st.reserved_bytes, sum);
    assert_true(st.free_bytes <= tier_device_bytes(d) - floor - sum);
}

static void test_reserve(void **state) {
    (void)state;
    struct mr_backend *be = sim_open();
    struct tier_device *d = (struct tier_device *)be; /* must be reset to NULL on failure */
    assert_int_equal(tier_device_create(be, 0, 0, &d), MOERUN_ERR_INVALID_ARG);
    assert_null(d);
    assert_int_equal(tier_device_create(NULL, 1 << 20, 0, &d), MOERUN_ERR_INVALID_ARG);
    const uint64_t total = (1u << 20) + 4096 * tu_rnd(64);
    assert_int_equal(tier_device_create(be, total, total + 1, &d), MOERUN_ERR_BUDGET);
    assert_true(tu_contains(moerun_errmsg(), "do not fit"));
    assert_null(d);
    const uint64_t slots = 4096 * (1 + tu_rnd(100));
    assert_int_equal(tier_device_create(be, total, slots, &d), MOERUN_OK);
    assert_int_equal(tier_device_bytes(d), total);
    uint8_t *base = tier_device_base(d); /* the slot region: aligned, then the blocks */
    assert_int_equal((uintptr_t)base % TIER_ALIGN, 0);
    const uint64_t floor = slots;
    assert_int_equal(tier_device_set_slots(d, 0), MOERUN_ERR_INVALID_ARG);
    assert_int_equal(tier_device_set_slots(d, 4), MOERUN_OK);
    assert_int_equal(tier_device_set_slots(d, 4), MOERUN_ERR_INVALID_ARG); /* once */

    /* from the top down */
    struct held h[64];
    uint64_t al[64];
    uint32_t n = 0;
    void *p;
    assert_int_equal(tier_device_reserve(d, 1000, 0, &p), MOERUN_OK);
    h[n] = (struct held){p, 1000};
    al[n++] = 256;
    assert_true((uint8_t *)p + 1000 <= base + total && (uint8_t *)p + 1000 + 256 > base + total);
    assert_int_equal(tier_device_reserve(d, 3000, 4096, &p), MOERUN_OK);
    h[n] = (struct held){p, 3000};
    al[n++] = 4096;
    assert_true((uint8_t *)p < h[0].p);
    check_blocks(d, floor, h, n, al);
    assert_int_equal(tier_device_reserve(d, 0, 0, &p), MOERUN_ERR_INVALID_ARG);
    assert_int_equal(tier_device_reserve(d, 10, 100, &p), MOERUN_ERR_INVALID_ARG);

    /* fill what is left with random blocks, free some, fill again: never overlapping */
    for (int round = 0; round < 4; round++) {
        for (;;) {
            uint64_t bytes = 1 + tu_rnd(40000), a = 1ull << tu_rnd(13);
            int rc = tier_device_reserve(d, bytes, a, &p);
            if (rc == MOERUN_ERR_BUDGET) {
                assert_true(tu_contains(moerun_errmsg(), "free"));
                char num[32];
                snprintf(num, sizeof(num), "%llu", (unsigned long long)bytes);
                assert_true(tu_contains(moerun_errmsg(), num));
                break;
            }
            assert_int_equal(rc, MOERUN_OK);
            assert_true(n < 64);
            h[n] = (struct held){p, bytes};
            al[n++] = a;
            check_blocks(d, floor, h, n, al);
            if (n == 64)
                break;
        }
        for (uint32_t i = 0; i < n;) {
            if (tu_rnd(2)) {
                tier_device_unreserve(d, h[i].p);
                h[i] = h[n - 1];
                al[i] = al[n - 1];
                n--;
            } else {
                i++;
            }
        }
        check_blocks(d, floor, h, n, al);
    }
    /* a freed hole is reused: free one block, take its exact size back */
    if (n) {
        struct held x = h[n - 1];
        tier_device_unreserve(d, x.p);
        n--;
        assert_int_equal(tier_device_reserve(d, x.bytes, 1, &p), MOERUN_OK);
        h[n] = (struct held){p, x.bytes};
        al[n++] = 1;
        check_blocks(d, floor, h, n, al);
    }
    tier_device_unreserve(d, base + 1); /* not a block: logged and ignored */
    tier_device_unreserve(d, NULL);
    check_blocks(d, floor, h, n, al);
    tier_device_destroy(d); /* frees the blocks with the allocation */
    tier_device_destroy(NULL);
    be->ops->destroy(be);
}

/* ---- uploads -------------------------------------------------------------------------------- */

/* A slot's worth of random host bytes and copies of random sub-ranges of it. */
struct payload {
    uint8_t *host;
    struct tier_copy c[4];
    uint32_t n;
};

static void payload_make(struct payload *pl, uint8_t *slot, uint64_t slot_bytes) {
    pl->host = aligned_alloc(4096, slot_bytes);
    assert_non_null(pl->host);
    for (uint64_t i = 0; i < slot_bytes; i++)
        pl->host[i] = (uint8_t)tu_rng_u64(&tu_main_rng);
    pl->n = 1 + tu_rnd(4);
    const uint64_t part = slot_bytes / pl->n;
    for (uint32_t i = 0; i < pl->n; i++) {
        uint64_t off = i * part + tu_rnd(64), bytes = 1 + tu_rnd((uint32_t)(part - 64));
        pl->c[i] = (struct tier_copy){slot + off, pl->host + off, bytes};
    }
}

/* The device bytes of the payload's ranges equal the host's (download on the compute stream). */
static bool payload_ok(struct mr_backend *be, const struct payload *pl) {
    bool ok = true;
    for (uint32_t i = 0; i < pl->n; i++) {
        uint8_t *tmp = malloc(pl->c[i].bytes);
        assert_non_null(tmp);
        assert_int_equal(be->ops->download(be, tmp, pl->c[i].dst, pl->c[i].bytes), MOERUN_OK);
        ok &= memcmp(tmp, pl->c[i].src, pl->c[i].bytes) == 0;
        free(tmp);
    }
    return ok;
}

static void test_upload(void **state) {
    (void)state;
    struct mr_backend *be = sim_open();
    const uint32_t n_slots = 3 + tu_rnd(4);
    const uint64_t sb = 16384;
    struct tier_device *d;
    assert_int_equal(tier_device_create(be, n_slots * sb + TIER_ALIGN + 65536, n_slots * sb, &d),
                     MOERUN_OK);
    struct tier_copy none = {tier_device_base(d), &none, 1};
    struct rec r;
    rec_init(&r);
    /* no events yet */
    assert_int_equal(tier_device_upload(d, 0, &none, 1, 0, on_done, &r), MOERUN_ERR_INVALID_ARG);
    assert_int_equal(tier_device_set_slots(d, n_slots), MOERUN_OK);
    uint8_t *slots = tier_device_base(d);
    struct payload pl[8];
    for (uint32_t s = 0; s < n_slots; s++)
        payload_make(&pl[s], slots + s * sb, sb);
    uint64_t bytes = 0;
    for (uint32_t s = 0; s < n_slots; s++) {
        assert_int_equal(tier_device_upload(d, s, pl[s].c, pl[s].n, 100 + s, on_done, &r),
                         MOERUN_OK);
        for (uint32_t i = 0; i < pl[s].n; i++)
            bytes += pl[s].c[i].bytes;
    }
    for (uint32_t s = 0; s < n_slots; s++) {
        assert_int_equal(tier_device_acquire(d, s), MOERUN_OK); /* waits for the copy */
        assert_true(payload_ok(be, &pl[s]));
        assert_int_equal(tier_device_release(d, s), MOERUN_OK);
    }
    for (uint32_t s = 0; s < n_slots; s++)
        rec_wait(&r, 100 + s, 1);
    usleep(10000);
    for (uint32_t s = 0; s < n_slots; s++)
        assert_int_equal(rec_count(&r, 100 + s), 1); /* exactly once */
    pthread_mutex_lock(&r.mu);
    for (uint32_t s = 0; s < n_slots; s++)
        assert_int_equal(r.order[s], 100 + s); /* in enqueue order */
    pthread_mutex_unlock(&r.mu);
    struct tier_device_stats st;
    tier_device_get_stats(d, &st);
    assert_int_equal(st.uploads, n_slots);
    assert_int_equal(st.bytes_uploaded, bytes);
    assert_true(st.busy_ns > 0);
    tier_device_reset_stats(d);
    tier_device_get_stats(d, &st);
    assert_int_equal(st.uploads + st.bytes_uploaded + st.busy_ns, 0);

    /* arguments: a slot out of range, a copy outside the slot region, no callback */
    assert_int_equal(tier_device_upload(d, n_slots, pl[0].c, 1, 0, on_done, &r),
                     MOERUN_ERR_INVALID_ARG);
    struct tier_copy out = {slots + n_slots * sb - 8, pl[0].host, 16};
    assert_int_equal(tier_device_upload(d, 0, &out, 1, 0, on_done, &r), MOERUN_ERR_INVALID_ARG);
    assert_true(tu_contains(moerun_errmsg(), "outside the slot region"));
    assert_int_equal(tier_device_upload(d, 0, pl[0].c, 1, 0, NULL, NULL), MOERUN_ERR_INVALID_ARG);
    assert_int_equal(tier_device_acquire(d, n_slots), MOERUN_ERR_INVALID_ARG);
    assert_int_equal(tier_device_release(d, n_slots), MOERUN_ERR_INVALID_ARG);

    /* fault injection: the next upload fails before anything is enqueued; the one after works */
    const uint64_t attempts = n_slots; /* valid uploads so far */
    tier_device_set_fault(d, attempts);
    struct payload f;
    payload_make(&f, slots, sb);
    assert_int_equal(tier_device_upload(d, 0, f.c, f.n, 7, on_done, &r), MOERUN_ERR_BACKEND);
    assert_true(tu_contains(moerun_errmsg(), "injected"));
    assert_int_equal(tier_device_acquire(d, 0), MOERUN_OK);
    assert_true(payload_ok(be, &pl[0])); /* nothing was copied */
    assert_int_equal(tier_device_release(d, 0), MOERUN_OK);
    assert_int_equal(tier_device_upload(d, 0, f.c, f.n, 8, on_done, &r), MOERUN_OK);
    assert_int_equal(tier_device_acquire(d, 0), MOERUN_OK);
    assert_true(payload_ok(be, &f));
    assert_int_equal(tier_device_release(d, 0), MOERUN_OK);
    rec_wait(&r, 8, 1);
    tier_device_destroy(d);
    assert_int_equal(rec_count(&r, 7), 0); /* the failed one never calls back */
    rec_fini(&r);
    free(f.host);
    for (uint32_t s = 0; s < n_slots; s++)
        free(pl[s].host);
    be->ops->destroy(be);
}

/* ---- slot reuse ordering -------------------------------------------------------------------- */

/* The sim's compute stream is synchronous (a release completes at once). To see an upload wait
 * for a release, compute-stream records of the tier's instance go to a second sim instance's
 * copy stream, held behind a gate the test opens: a compute stream still busy with the slot. */
static const struct mr_backend_ops *sim_ops;
static struct mr_backend_ops gated_ops;
static struct mr_backend *compute_be; /* the second instance: the "compute stream" */

struct gate {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool open;
};
static struct gate gate;

static void gate_fn(void *arg) {
    struct gate *g = arg;
    pthread_mutex_lock(&g->mu);
    while (!g->open)
        pthread_cond_wait(&g->cv, &g->mu);
    pthread_mutex_unlock(&g->mu);
}

static int gated_record(struct mr_backend *be, enum mr_stream stream, struct mr_event *ev) {
    if (stream == MR_STREAM_COMPUTE)
        return sim_ops->record(compute_be, MR_STREAM_COPY, ev);
    return sim_ops->record(be, stream, ev);
}

static void test_ordering(void **state) {
    (void)state;
    struct mr_backend *be = sim_open();
    compute_be = sim_open();
    sim_ops = be->ops;
    gated_ops = *sim_ops;
    gated_ops.record = gated_record;
    be->ops = &gated_ops;
    pthread_mutex_init(&gate.mu, NULL);
    pthread_cond_init(&gate.cv, NULL);

    const uint64_t sb = 8192;
    struct tier_device *d;
    assert_int_equal(tier_device_create(be, 2 * sb + TIER_ALIGN, 2 * sb, &d), MOERUN_OK);
    assert_int_equal(tier_device_set_slots(d, 2), MOERUN_OK);
    uint8_t *slots = tier_device_base(d);
    struct rec r;
    rec_init(&r);
    struct payload x, y, z;
    payload_make(&x, slots, sb);
    payload_make(&y, slots, sb);
    payload_make(&z, slots + sb, sb);
    assert_int_equal(tier_device_upload(d, 0, x.c, x.n, 1, on_done, &r), MOERUN_OK);
    assert_int_equal(tier_device_acquire(d, 0), MOERUN_OK);
    assert_true(payload_ok(be, &x));
    for (int round = 0; round < 2; round++) {
        /* the compute stream is busy (gate shut) when it releases slot 0 */
        gate.open = false;
        assert_int_equal(sim_ops->callback(compute_be, MR_STREAM_COPY, gate_fn, &gate), MOERUN_OK);
        assert_int_equal(tier_device_release(d, 0), MOERUN_OK);
        struct payload *next = round ? &x : &y;
        assert_int_equal(tier_device_upload(d, 0, next->c, next->n, 2 + round, on_done, &r),
                         MOERUN_OK);
        usleep(30000);
        assert_int_equal(rec_count(&r, 2 + round), 0); /* waiting for the release */
        assert_true(payload_ok(be, round ? &y : &x));  /* slot 0 untouched meanwhile */
        pthread_mutex_lock(&gate.mu);
        gate.open = true;
        pthread_cond_broadcast(&gate.cv);
        pthread_mutex_unlock(&gate.mu);
        rec_wait(&r, 2 + round, 1);
        assert_int_equal(tier_device_acquire(d, 0), MOERUN_OK);
        assert_true(payload_ok(be, next));
    }
    /* a slot never released does not wait */
    assert_int_equal(tier_device_upload(d, 1, z.c, z.n, 5, on_done, &r), MOERUN_OK);
    rec_wait(&r, 5, 1);
    assert_int_equal(tier_device_acquire(d, 1), MOERUN_OK);
    assert_true(payload_ok(be, &z));
    tier_device_destroy(d);
    rec_fini(&r);
    free(x.host);
    free(y.host);
    free(z.host);
    be->ops = sim_ops;
    compute_be->ops->destroy(compute_be);
    be->ops->destroy(be);
    pthread_cond_destroy(&gate.cv);
    pthread_mutex_destroy(&gate.mu);
}

/* ---- many uploads from several threads --------------------------------------------------------
 */

struct uploader {
    struct tier_device *d;
    struct rec *r;
    uint32_t slot;
    uint32_t count;
    struct payload *pl;
    pthread_t th;
    int rc;
};

static void *uploader_run(void *arg) {
    struct uploader *u = arg;
    for (uint32_t i = 0; i < u->count && u->rc == MOERUN_OK; i++)
        u->rc = tier_device_upload(u->d, u->slot, u->pl->c, u->pl->n, u->slot * 1000 + i, on_done,
                                   u->r);
    return NULL;
}

static void test_many(void **state) {
    (void)state;
    struct mr_backend *be = sim_open();
    const uint32_t n_slots = 4;
    const uint64_t sb = 4096;
    struct tier_device *d;
    assert_int_equal(tier_device_create(be, n_slots * sb + TIER_ALIGN, n_slots * sb, &d),
                     MOERUN_OK);
    assert_int_equal(tier_device_set_slots(d, n_slots), MOERUN_OK);
    uint8_t *slots = tier_device_base(d);
    struct rec *r = malloc(sizeof(*r));
    assert_non_null(r);
    rec_init(r);
    struct payload pl[4];
    struct uploader u[4];
    const uint32_t per = 200 + tu_rnd(200); /* more than the callback ring (72): it fills */
    for (uint32_t s = 0; s < n_slots; s++) {
        payload_make(&pl[s], slots + s * sb, sb);
        u[s] = (struct uploader){d, r, s, per, &pl[s], 0, MOERUN_OK};
        assert_int_equal(pthread_create(&u[s].th, NULL, uploader_run, &u[s]), 0);
    }
    for (uint32_t s = 0; s < n_slots; s++) {
        pthread_join(u[s].th, NULL);
        assert_int_equal(u[s].rc, MOERUN_OK);
    }
    for (uint32_t s = 0; s < n_slots; s++) {
        rec_wait(r, s * 1000 + per - 1, 1);
        assert_int_equal(tier_device_acquire(d, s), MOERUN_OK);
        assert_true(payload_ok(be, &pl[s]));
        assert_int_equal(tier_device_release(d, s), MOERUN_OK);
    }
    tier_device_destroy(d); /* waits for every callback */
    pthread_mutex_lock(&r->mu);
    assert_int_equal(r->total, (uint64_t)n_slots * per);
    for (uint32_t s = 0; s < n_slots; s++)
        for (uint32_t i = 0; i < per; i++)
            assert_int_equal(r->count[s * 1000 + i], 1);
    pthread_mutex_unlock(&r->mu);
    rec_fini(r);
    free(r);
    for (uint32_t s = 0; s < n_slots; s++)
        free(pl[s].host);
    be->ops->destroy(be);
}

int main(void) {
    alarm(300); /* a deadlock fails the run */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reserve),
        cmocka_unit_test(test_upload),
        cmocka_unit_test(test_ordering),
        cmocka_unit_test(test_many),
    };
    return cmocka_run_group_tests(tests, tu_rng_setup, NULL);
}
