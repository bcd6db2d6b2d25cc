/* Tiers: span arithmetic, the host region, and the NVMe reader (io_uring) against a file of
 * random bytes: random unaligned ranges, multi-read requests, two submitting threads, requests
 * larger than the ring, O_DIRECT and buffered reads, fault injection, the end of the file,
 * statistics and close with reads in flight.
 *
 * MOERUN_NVME_BENCH=<file> measures the sequential read bandwidth of <file> instead (queue depth
 * 64, 1 MiB chunks, O_DIRECT) and prints it. */
#include "testutil.h"

#include "moerun.h"
#include "tiers.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MIB          (1ull << 20)
#define MAX_TAGS     1024
#define WAIT_SECONDS 30

static uint64_t MIN_U64(uint64_t a, uint64_t b) {
    return a < b ? a : b;
}

static struct tu_rng rng;

/* The shared file of random bytes in the build tree. */
static char file_path[4096];
static uint8_t *file_data;
static uint64_t file_size;
static char short_path[4096]; /* the file test_past_end truncates */

/* --- completions --------------------------------------------------------------------------------
 */

struct coll {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint32_t total;
    uint32_t calls[MAX_TAGS];
    int status[MAX_TAGS];
    char msg[MAX_TAGS][256];
};

static void coll_init(struct coll *c) {
    memset(c, 0, sizeof(*c));
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
}

static void coll_reset(struct coll *c) {
    pthread_mutex_lock(&c->mu);
    c->total = 0;
    memset(c->calls, 0, sizeof(c->calls));
    memset(c->status, 0, sizeof(c->status));
    pthread_mutex_unlock(&c->mu);
}

static void coll_free(struct coll *c) {
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
}

static void on_done(void *user, uint64_t tag, int status, const char *msg) {
    struct coll *c = user;
    pthread_mutex_lock(&c->mu);
    if (tag < MAX_TAGS) {
        c->calls[tag]++;
        c->status[tag] = status;
        snprintf(c->msg[tag], sizeof(c->msg[tag]), "%s", msg ? msg : "");
    }
    c->total++;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

/* Wait until n completions have arrived; false after WAIT_SECONDS. */
static bool coll_wait(struct coll *c, uint32_t n) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += WAIT_SECONDS;
    pthread_mutex_lock(&c->mu);
    int rc = 0;
    while (c->total < n && rc == 0)
        rc = pthread_cond_timedwait(&c->cv, &c->mu, &until);
    bool ok = c->total >= n;
    pthread_mutex_unlock(&c->mu);
    return ok;
}

/* --- helpers ------------------------------------------------------------------------------------
 */

static void fill_random(uint8_t *p, uint64_t n) {
    for (uint64_t i = 0; i < n; i += 8) {
        uint64_t v = tu_rng_u64(&rng);
        memcpy(p + i, &v, MIN_U64(8, n - i));
    }
}

static bool write_file(const char *path, const uint8_t *data, uint64_t n) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0)
        return false;
    uint64_t off = 0;
    while (off < n) {
        ssize_t w = write(fd, data + off, (size_t)(n - off));
        if (w <= 0) {
            close(fd);
            return false;
        }
        off += (uint64_t)w;
    }
    return close(fd) == 0;
}

static uint64_t rand_below(uint64_t n) {
    return n ? tu_rng_u64(&rng) % n : 0;
}

static struct tier_host *host_new(uint64_t bytes) {
    struct tier_host_params hp = {.bytes = bytes, .huge_pages = false, .bind_numa = false};
    struct tier_host *h = NULL;
    assert_int_equal(tier_host_create(&hp, &h), MOERUN_OK);
    return h;
}

static struct tier_nvme *nvme_new(const char *path, struct tier_host *h, struct coll *c,
                                  uint32_t qd, uint32_t chunk, bool direct) {
    struct tier_nvme_params p = {
        .queue_depth = qd,
        .direct = direct,
        .region = h ? tier_host_base(h) : NULL,
        .region_bytes = h ? tier_host_bytes(h) : 0,
        .done = on_done,
        .user = c,
        .chunk_bytes = chunk,
    };
    struct tier_nvme *t = NULL;
    int rc = tier_nvme_open(path, &p, &t);
    if (rc != MOERUN_OK)
        fail_msg("tier_nvme_open(%s): %s", path, moerun_errmsg());
    return t;
}

/* A GGUF-like tensor range: 32-byte aligned offset and length inside the file. */
struct range {
    uint64_t off, len;
    struct tier_span span;
    uint8_t *dst; /* where the span lands */
};

static struct range random_range(uint64_t size, uint64_t max_len) {
    struct range r;
    r.len = 32 * (1 + rand_below(max_len / 32));
    if (r.len > size)
        r.len = size & ~31ull;
    r.off = 32 * rand_below((size - r.len) / 32 + 1);
    r.span = tier_span_of(r.off, r.len);
    r.dst = NULL;
    return r;
}

static struct tier_read read_of(const struct range *r) {
    struct tier_read rd = {.offset = r->span.offset, .bytes = r->span.bytes, .dst = r->dst};
    return rd;
}

/* The range's bytes equal the file's, and the span's bytes past the end of the file are 0. */
static void check_range(const struct range *r, const uint8_t *data, uint64_t size) {
    assert_memory_equal(r->dst + r->span.slack, data + r->off, r->len);
    uint64_t span_end = r->span.offset + r->span.bytes;
    if (span_end > size) {
        const uint8_t *tail = r->dst + (size - r->span.offset);
        for (uint64_t i = 0; i < span_end - size; i++)
            assert_int_equal(tail[i], 0);
    }
}

/* --- span arithmetic
 * ------------------------------------------------------------------------------ */

static void test_span(void **state) {
    (void)state;
    struct tier_span s = tier_span_of(4096, 0);
    assert_int_equal(s.offset, 4096);
    assert_int_equal(s.bytes, 0);
    s = tier_span_of(4095, 2);
    assert_int_equal(s.offset, 0);
    assert_int_equal(s.slack, 4095);
    assert_int_equal(s.bytes, 8192);
    s = tier_span_of(32, 4064);
    assert_int_equal(s.offset, 0);
    assert_int_equal(s.bytes, 4096);
    for (int i = 0; i < 100000; i++) {
        uint64_t off = tu_rng_u64(&rng) >> 24, len = tu_rng_u64(&rng) >> 36;
        if (i % 2)
            off &= ~31ull;
        s = tier_span_of(off, len);
        assert_int_equal(s.offset % TIER_ALIGN, 0);
        assert_int_equal(s.bytes % TIER_ALIGN, 0);
        assert_true(s.offset <= off);
        assert_int_equal(s.offset + s.slack, off);
        assert_true(s.slack < TIER_ALIGN);
        assert_true(s.offset + s.bytes >= off + len);             /* covers the range */
        assert_true(s.offset + s.bytes < off + len + TIER_ALIGN); /* and no more than needed */
    }
}

/* --- host tier ----------------------------------------------------------------------------------
 */

static void test_host(void **state) {
    (void)state;
    tier_host_destroy(NULL);
    struct tier_host_params bad = {.bytes = 0};
    struct tier_host *h = NULL;
    assert_true(tier_host_create(&bad, &h) < 0);
    assert_null(h);

    for (int k = 0; k < 3; k++) {
        uint64_t want = 1 + rand_below(9 * MIB);
        struct tier_host_params hp = {.bytes = want, .huge_pages = k >= 1, .bind_numa = k == 2};
        assert_int_equal(tier_host_create(&hp, &h), MOERUN_OK);
        uint8_t *base = tier_host_base(h);
        uint64_t bytes = tier_host_bytes(h);
        assert_int_equal((uintptr_t)base % TIER_ALIGN, 0);
        assert_true(bytes >= want);
        assert_int_equal(bytes % TIER_ALIGN, 0);
        assert_true(bytes - want < (hp.huge_pages ? 2 * MIB : TIER_ALIGN));
        for (uint64_t i = 0; i < bytes; i++)
            assert_int_equal(base[i], 0); /* anonymous, faulted in: zero */
        uint64_t seed = tu_rng_u64(&rng);
        for (uint64_t i = 0; i < bytes; i += 8)
            memcpy(base + i, &(uint64_t){seed ^ i}, 8);
        for (uint64_t i = 0; i < bytes; i += 8) {
            uint64_t v;
            memcpy(&v, base + i, 8);
            assert_true(v == (seed ^ i));
        }
        const char *d = tier_host_describe(h);
        assert_non_null(d);
        assert_true(strstr(d, "pages") != NULL);
        assert_true(strstr(d, "node") != NULL || strstr(d, "NUMA") != NULL);
        if (hp.bind_numa)
            printf("host tier (huge pages, NUMA): %s\n", d);
        tier_host_destroy(h);
    }
}

/* --- NVMe ---------------------------------------------------------------------------------------
 */

static void test_random_ranges(void **state) {
    (void)state;
    struct coll *c = malloc(sizeof(*c));
    coll_init(c);
    struct tier_host *h = host_new(32 * MIB);
    uint8_t *base = tier_host_base(h);
    uint64_t region = tier_host_bytes(h);
    struct tier_nvme *t = nvme_new(file_path, h, c, 64, 128 * 1024, true);
    static struct range rs[MAX_TAGS];
    uint64_t total_bytes = 0;
    uint32_t total_reads = 0;
    for (int batch = 0; batch < 4; batch++) {
        memset(base, 0xa5, region); /* stale bytes must not pass */
        coll_reset(c);
        uint64_t used = 0;
        uint32_t n = 0;
        while (n < MAX_TAGS) {
            struct range r = random_range(file_size, n % 8 == 0 ? 2 * MIB : 64 * 1024);
            if (batch == 0 && n == 0) { /* a tensor that ends at the end of the file */
                r.len = 32 * (1 + rand_below(4096));
                r.off = (file_size - r.len) & ~31ull;
                r.len = file_size - r.off;
                r.span = tier_span_of(r.off, r.len);
            }
            if (used + r.span.bytes > region)
                break;
            r.dst = base + used;
            used += r.span.bytes;
            rs[n] = r;
            struct tier_read rd = read_of(&rs[n]);
            assert_int_equal(tier_nvme_submit(t, &rd, 1, n), MOERUN_OK);
            total_bytes += rd.bytes;
            total_reads++;
            n++;
        }
        assert_true(coll_wait(c, n));
        for (uint32_t i = 0; i < n; i++) {
            assert_int_equal(c->calls[i], 1);
            if (c->status[i] != MOERUN_OK)
                fail_msg("request %u: %s", i, c->msg[i]);
            check_range(&rs[i], file_data, file_size);
        }
    }
    struct tier_nvme_stats st;
    tier_nvme_get_stats(t, &st);
    assert_int_equal(st.bytes_read, total_bytes);
    assert_int_equal(st.reads, total_reads);
    assert_int_equal(st.errors, 0);
    printf("random ranges: %u reads, %.1f MiB, O_DIRECT %s, fixed buffers %s\n", total_reads,
           (double)total_bytes / MIB, tier_nvme_is_direct(t) ? "yes" : "no",
           tier_nvme_is_fixed(t) ? "yes" : "no");
    tier_nvme_close(t);
    tier_host_destroy(h);
    coll_free(c);
    free(c);
}

/* Three ranges (an expert's gate, up, down) as one request: done() once, all data there. */
static void test_three_ranges(void **state) {
    (void)state;
    struct coll *c = malloc(sizeof(*c));
    coll_init(c);
    struct tier_host *h = host_new(16 * MIB);
    uint8_t *base = tier_host_base(h);
    struct tier_nvme *t = nvme_new(file_path, h, c, 16, 64 * 1024, true);
    for (int rep = 0; rep < 20; rep++) {
        struct range r[3];
        struct tier_read rd[3];
        uint64_t used = 0;
        for (int i = 0; i < 3; i++) {
            r[i] = random_range(file_size, 1 * MIB);
            r[i].dst = base + used;
            used += r[i].span.bytes;
            rd[i] = read_of(&r[i]);
        }
        coll_reset(c);
        assert_int_equal(tier_nvme_submit(t, rd, 3, 7), MOERUN_OK);
        assert_true(coll_wait(c, 1));
        usleep(1000); /* a second done() would show up here */
        assert_int_equal(c->total, 1);
        assert_int_equal(c->calls[7], 1);
        assert_int_equal(c->status[7], MOERUN_OK);
        for (int i = 0; i < 3; i++)
            check_range(&r[i], file_data, file_size);
    }
    tier_nvme_close(t);
    tier_host_destroy(h);
    coll_free(c);
    free(c);
}

struct thread_arg {
    struct tier_nvme *t;
    struct range *rs;
    uint32_t n;
    uint32_t tag0;
    int rc;
};

static void *submit_thread(void *p) {
    struct thread_arg *a = p;
    a->rc = MOERUN_OK;
    for (uint32_t i = 0; i < a->n && a->rc == MOERUN_OK; i++) {
        struct tier_read rd = read_of(&a->rs[i]);
        a->rc = tier_nvme_submit(a->t, &rd, 1, a->tag0 + i);
    }
    return NULL;
}

static void test_two_threads(void **state) {
    (void)state;
    struct coll *c = malloc(sizeof(*c));
    coll_init(c);
    struct tier_host *h = host_new(32 * MIB);
    uint8_t *base = tier_host_base(h);
    struct tier_nvme *t = nvme_new(file_path, h, c, 8, 64 * 1024, true);
    enum { PER = 100 };
    static struct range rs[2][PER];
    uint64_t half = tier_host_bytes(h) / 2;
    struct thread_arg args[2];
    for (int k = 0; k < 2; k++) {
        uint64_t used = 0;
        for (uint32_t i = 0; i < PER; i++) {
            rs[k][i] = random_range(file_size, 256 * 1024);
            rs[k][i].dst = base + k * half + used;
            used += rs[k][i].span.bytes;
            assert_true(used <= half);
        }
        args[k] = (struct thread_arg){.t = t, .rs = rs[k], .n = PER, .tag0 = (uint32_t)k * PER};
    }
    pthread_t th[2];
    for (int k = 0; k < 2; k++)
        assert_int_equal(pthread_create(&th[k], NULL, submit_thread, &args[k]), 0);
    for (int k = 0; k < 2; k++) {
        pthread_join(th[k], NULL);
        assert_int_equal(args[k].rc, MOERUN_OK);
    }
    assert_true(coll_wait(c, 2 * PER));
    for (int k = 0; k < 2; k++)
        for (uint32_t i = 0; i < PER; i++) {
            assert_int_equal(c->calls[k * PER + i], 1);
            assert_int_equal(c->status[k * PER + i], MOERUN_OK);
            check_range(&rs[k][i], file_data, file_size);
        }
    tier_nvme_close(t);
    tier_host_destroy(h);
    coll_free(c);
    free(c);
}

/* A request of far more SQEs than the ring holds (queue depth 4, 64 KiB chunks), and a request
 * of the most reads allowed. */
static void test_big_request(void **state) {
    (void)state;
    struct coll *c = malloc(sizeof(*c));
    coll_init(c);
    struct tier_host *h = host_new(24 * MIB);
    uint8_t *base = tier_host_base(h);
    struct tier_nvme *t = nvme_new(file_path, h, c, 4, 64 * 1024, true);
    struct range r[TIER_NVME_MAX_READS];
    struct tier_read rd[TIER_NVME_MAX_READS];
    uint64_t used = 0;
    for (int i = 0; i < 3; i++) {
        r[i] = random_range(file_size, 6 * MIB);
        r[i].dst = base + used;
        used += r[i].span.bytes;
        rd[i] = read_of(&r[i]);
    }
    assert_int_equal(tier_nvme_submit(t, rd, 3, 1), MOERUN_OK);
    assert_true(coll_wait(c, 1));
    assert_int_equal(c->status[1], MOERUN_OK);
    for (int i = 0; i < 3; i++)
        check_range(&r[i], file_data, file_size);

    used = 0;
    for (uint32_t i = 0; i < TIER_NVME_MAX_READS; i++) {
        r[i] = random_range(file_size, 512 * 1024);
        r[i].dst = base + used;
        used += r[i].span.bytes;
        rd[i] = read_of(&r[i]);
    }
    assert_int_equal(tier_nvme_submit(t, rd, TIER_NVME_MAX_READS, 2), MOERUN_OK);
    assert_true(tier_nvme_submit(t, rd, TIER_NVME_MAX_READS + 1, 3) < 0);
    assert_true(tier_nvme_submit(t, rd, 0, 3) < 0);
    assert_true(coll_wait(c, 2));
    assert_int_equal(c->status[2], MOERUN_OK);
    assert_int_equal(c->calls[3], 0);
    for (uint32_t i = 0; i < TIER_NVME_MAX_READS; i++)
        check_range(&r[i], file_data, file_size);
    tier_nvme_close(t);
    tier_host_destroy(h);
    coll_free(c);
    free(c);
}

/* Read n random ranges of path (holding data) through t into h; all must succeed. */
static void read_and_check(struct tier_nvme *t, struct tier_host *h, struct coll *c,
                           const uint8_t *data, uint64_t size, uint32_t n) {
    uint8_t *base = tier_host_base(h);
    memset(base, 0x5a, tier_host_bytes(h));
    struct range rs[64];
    assert_true(n <= 64);
    uint64_t used = 0;
    coll_reset(c);
    for (uint32_t i = 0; i < n; i++) {
        rs[i] = random_range(size, 256 * 1024);
        if (i == 0) { /* one tensor ends at the end of the file: the span's tail reads as 0 */
            rs[i].off = (size - rs[i].len) & ~31ull;
            rs[i].len = size - rs[i].off;
            rs[i].span = tier_span_of(rs[i].off, rs[i].len);
        }
        rs[i].dst = base + used;
        used += rs[i].span.bytes;
        assert_true(used <= tier_host_bytes(h));
        struct tier_read rd = read_of(&rs[i]);
        assert_int_equal(tier_nvme_submit(t, &rd, 1, i), MOERUN_OK);
    }
    assert_true(coll_wait(c, n));
    for (uint32_t i = 0; i < n; i++) {
        if (c->status[i] != MOERUN_OK)
            fail_msg("request %u: %s", i, c->msg[i]);
        check_range(&rs[i], data, size);
    }
}

static int warn_direct;
static void count_log(moerun_log_level level, const char *msg, void *user) {
    (void)user;
    if (level == MOERUN_LOG_WARN && strstr(msg, "O_DIRECT not supported"))
        __atomic_add_fetch(&warn_direct, 1, __ATOMIC_SEQ_CST);
}

/* O_DIRECT on the build tree's file system (reported), buffered on /dev/shm (tmpfs), explicit
 * buffered mode, and the fallback when the first O_DIRECT read is refused with EINVAL. */
static void test_direct_and_buffered(void **state) {
    (void)state;
    struct coll *c = malloc(sizeof(*c));
    coll_init(c);
    struct tier_host *h = host_new(16 * MIB);
    moerun_log_set(count_log, NULL);

    struct tier_nvme *t = nvme_new(file_path, h, c, 16, 0, true);
    bool direct = tier_nvme_is_direct(t);
    printf("build tree file system: O_DIRECT %s\n", direct ? "used" : "refused (buffered)");
    read_and_check(t, h, c, file_data, file_size, 40);
    tier_nvme_close(t);

    t = nvme_new(file_path, h, c, 16, 0, false);
    assert_false(tier_nvme_is_direct(t));
    read_and_check(t, h, c, file_data, file_size, 40);
    tier_nvme_close(t);

    /* the first read refused with EINVAL: buffered from then on, logged once */
    warn_direct = 0;
    t = nvme_new(file_path, h, c, 16, 0, true);
    if (tier_nvme_is_direct(t)) {
        tier_nvme_set_fault(t, 0, TIER_FAULT_EINVAL, 0);
        read_and_check(t, h, c, file_data, file_size, 20);
        assert_false(tier_nvme_is_direct(t));
        read_and_check(t, h, c, file_data, file_size, 20);
        assert_int_equal(warn_direct, 1);
    }
    tier_nvme_close(t);

    char shm[128];
    snprintf(shm, sizeof(shm), "/dev/shm/moerun-test-tiers-%d", (int)getpid());
    uint64_t size = 8 * MIB + 32 * rand_below(4096);
    if (write_file(shm, file_data, size)) {
        t = nvme_new(shm, h, c, 16, 0, true);
        printf("/dev/shm: O_DIRECT %s\n", tier_nvme_is_direct(t) ? "accepted" : "refused");
        read_and_check(t, h, c, file_data, size, 40);
        tier_nvme_close(t);
        t = nvme_new(shm, h, c, 16, 0, false);
        assert_false(tier_nvme_is_direct(t));
        read_and_check(t, h, c, file_data, size, 40);
        tier_nvme_close(t);
        unlink(shm);
    } else {
        printf("/dev/shm not writable: buffered tmpfs case not run\n");
    }
    moerun_log_set(NULL, NULL);
    tier_host_destroy(h);
    coll_free(c);
    free(c);
}

/* The nth SQE fails with EIO: that request fails once, naming the offset; the others succeed;
 * a failing multi-chunk request is reported once; the tier stays usable. */
static void test_fault_eio(void **state) {
    (void)state;
    struct coll *c = malloc(sizeof(*c));
    coll_init(c);
    struct tier_host *h = host_new(16 * MIB);
    uint8_t *base = tier_host_base(h);
    struct tier_nvme *t = nvme_new(file_path, h, c, 8, 1 * MIB, (tu_rng_u64(&rng) & 1) != 0);
    uint32_t bad = (uint32_t)rand_below(6);
    tier_nvme_set_fault(t, bad, TIER_FAULT_EIO, 0);
    struct range rs[6];
    for (uint32_t i = 0; i < 6; i++) { /* one SQE each, submitted in order */
        rs[i] = random_range(file_size, 1 * MIB - TIER_ALIGN);
        rs[i].dst = base + i * 2 * MIB;
        struct tier_read rd = read_of(&rs[i]);
        assert_int_equal(tier_nvme_submit(t, &rd, 1, i), MOERUN_OK);
    }
    assert_true(coll_wait(c, 6));
    for (uint32_t i = 0; i < 6; i++) {
        assert_int_equal(c->calls[i], 1);
        if (i == bad) {
            assert_int_equal(c->status[i], MOERUN_ERR_IO);
            char off[32];
            snprintf(off, sizeof(off), "at %llu", (unsigned long long)rs[i].span.offset);
            if (!strstr(c->msg[i], off))
                fail_msg("message '%s' does not name offset %s", c->msg[i], off);
            printf("injected EIO: %s\n", c->msg[i]);
        } else {
            assert_int_equal(c->status[i], MOERUN_OK);
            check_range(&rs[i], file_data, file_size);
        }
    }
    struct tier_nvme_stats st;
    tier_nvme_get_stats(t, &st);
    assert_int_equal(st.errors, 1);
    assert_int_equal(st.reads, 5);

    /* a request of 8 chunks whose third SQE fails: reported once, after its other SQEs */
    coll_reset(c);
    struct range big = random_range(file_size, 8 * MIB);
    big.len = 8 * MIB - TIER_ALIGN;
    big.off = 32 * rand_below((file_size - big.len) / 32);
    big.span = tier_span_of(big.off, big.len);
    big.dst = base;
    struct tier_read rd = read_of(&big);
    tier_nvme_get_stats(t, &st);
    tier_nvme_set_fault(t, st.sqes + 2, TIER_FAULT_EIO, 0);
    assert_int_equal(tier_nvme_submit(t, &rd, 1, 9), MOERUN_OK);
    assert_true(coll_wait(c, 1));
    usleep(20000);
    assert_int_equal(c->total, 1);
    assert_int_equal(c->status[9], MOERUN_ERR_IO);

    read_and_check(t, h, c, file_data, file_size, 10); /* still usable */
    tier_nvme_get_stats(t, &st);
    assert_int_equal(st.errors, 2);
    tier_nvme_close(t);
    tier_host_destroy(h);
    coll_free(c);
    free(c);
}

/* A short completion is resubmitted for the rest: data intact, counted. */
static void test_fault_short(void **state) {
    (void)state;
    struct coll *c = malloc(sizeof(*c));
    coll_init(c);
    struct tier_host *h = host_new(8 * MIB);
    uint8_t *base = tier_host_base(h);
    for (int direct = 0; direct < 2; direct++) {
        struct tier_nvme *t = nvme_new(file_path, h, c, 8, 1 * MIB, direct != 0);
        for (int rep = 0; rep < 3; rep++) {
            memset(base, 0x77, tier_host_bytes(h));
            coll_reset(c);
            struct range r = random_range(file_size, 4 * MIB);
            r.dst = base;
            uint64_t short_bytes = 1 + rand_below(MIN_U64(r.span.bytes, 1 * MIB) - 1);
            struct tier_nvme_stats before, after;
            tier_nvme_get_stats(t, &before);
            /* some SQE of the request: the request has ceil(bytes / 1 MiB) of them */
            uint64_t n_sqe = (r.span.bytes + MIB - 1) / MIB;
            tier_nvme_set_fault(t, before.sqes + rand_below(n_sqe), TIER_FAULT_SHORT, short_bytes);
            struct tier_read rd = read_of(&r);
            assert_int_equal(tier_nvme_submit(t, &rd, 1, 0), MOERUN_OK);
            assert_true(coll_wait(c, 1));
            if (c->status[0] != MOERUN_OK)
                fail_msg("short read: %s", c->msg[0]);
            check_range(&r, file_data, file_size);
            tier_nvme_get_stats(t, &after);
            assert_true(after.resubmits >= before.resubmits + 1);
            assert_int_equal(after.bytes_read - before.bytes_read, r.span.bytes);
        }
        tier_nvme_close(t);
    }
    tier_host_destroy(h);
    coll_free(c);
    free(c);
}

/* Reads past the end: refused at submit beyond the aligned end; a file that shrank after open
 * makes the read fail (res == 0 before the end) with the offset in the message. */
static void test_past_end(void **state) {
    (void)state;
    struct coll *c = malloc(sizeof(*c));
    coll_init(c);
    struct tier_host *h = host_new(4 * MIB);
    uint8_t *base = tier_host_base(h);
    struct tier_nvme *t = nvme_new(file_path, h, c, 8, 0, true);
    uint64_t aligned_end = (file_size + TIER_ALIGN - 1) & ~(uint64_t)(TIER_ALIGN - 1);
    struct tier_read rd = {.offset = aligned_end, .bytes = TIER_ALIGN, .dst = base};
    assert_int_equal(tier_nvme_submit(t, &rd, 1, 0), MOERUN_ERR_RANGE);
    rd.offset = aligned_end - TIER_ALIGN;
    rd.bytes = 2 * TIER_ALIGN;
    assert_int_equal(tier_nvme_submit(t, &rd, 1, 0), MOERUN_ERR_RANGE);
    rd.bytes = TIER_ALIGN;
    rd.dst = base + 1;
    assert_int_equal(tier_nvme_submit(t, &rd, 1, 0), MOERUN_ERR_INVALID_ARG); /* unaligned */
    rd.dst = base + tier_host_bytes(h);
    assert_int_equal(tier_nvme_submit(t, &rd, 1, 0), MOERUN_ERR_INVALID_ARG); /* outside */
    tier_nvme_close(t);
    assert_int_equal(c->total, 0);

    const char *path = tu_tmp_path(".short");
    char *spath = short_path; /* removed by the group's teardown too, if an assert fails */
    snprintf(spath, sizeof(short_path), "%s", path);
    assert_true(write_file(spath, file_data, 4 * MIB));
    t = nvme_new(spath, h, c, 8, 256 * 1024, true);
    uint64_t cut = 1 * MIB + 32 * rand_below(4096);
    assert_int_equal(truncate(spath, (off_t)cut), 0);
    struct tier_read rds[2] = {
        {.offset = 2 * MIB, .bytes = 64 * 1024, .dst = base},            /* after */
        {.offset = 512 * 1024, .bytes = 1 * MIB, .dst = base + 1 * MIB}, /* across */
    };
    for (uint32_t i = 0; i < 2; i++)
        assert_int_equal(tier_nvme_submit(t, &rds[i], 1, i), MOERUN_OK);
    assert_true(coll_wait(c, 2));
    for (uint32_t i = 0; i < 2; i++) {
        assert_int_equal(c->calls[i], 1);
        assert_int_equal(c->status[i], MOERUN_ERR_IO);
        char off[32];
        snprintf(off, sizeof(off), "at %llu", (unsigned long long)rds[i].offset);
        if (!strstr(c->msg[i], off))
            fail_msg("message '%s' does not name %s", c->msg[i], off);
    }
    printf("file cut short: %s\n", c->msg[0]);
    read_and_check(t, h, c, file_data, cut & ~(uint64_t)(TIER_ALIGN - 1), 8); /* usable */
    tier_nvme_close(t);
    unlink(spath);
    tier_host_destroy(h);
    coll_free(c);
    free(c);
}

/* Statistics add up: bytes and reads of the requests, no errors, busy time within the wall
 * time. */
static void test_stats(void **state) {
    (void)state;
    struct coll *c = malloc(sizeof(*c));
    coll_init(c);
    struct tier_host *h = host_new(16 * MIB);
    uint8_t *base = tier_host_base(h);
    struct tier_nvme *t = nvme_new(file_path, h, c, 32, 256 * 1024, true);
    struct tier_nvme_stats st;
    tier_nvme_get_stats(t, &st);
    assert_int_equal(st.bytes_read + st.reads + st.errors + st.busy_ns + st.sqes, 0);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    uint64_t bytes = 0, reads = 0, used = 0, min_sqes = 0;
    uint32_t n = 0;
    for (; n < 20; n++) {
        struct range r[2];
        struct tier_read rd[2];
        uint32_t k = 1 + (n & 1);
        for (uint32_t i = 0; i < k; i++) {
            r[i] = random_range(file_size, 384 * 1024);
            r[i].dst = base + used;
            used += r[i].span.bytes;
            rd[i] = read_of(&r[i]);
            bytes += rd[i].bytes;
            min_sqes += (rd[i].bytes + 256 * 1024 - 1) / (256 * 1024);
        }
        reads += k;
        assert_true(used <= tier_host_bytes(h));
        assert_int_equal(tier_nvme_submit(t, rd, k, n), MOERUN_OK);
    }
    assert_true(coll_wait(c, n));
    clock_gettime(CLOCK_MONOTONIC, &t1);
    uint64_t wall =
        (uint64_t)(t1.tv_sec - t0.tv_sec) * 1000000000ull + (uint64_t)(t1.tv_nsec - t0.tv_nsec);
    tier_nvme_get_stats(t, &st);
    assert_int_equal(st.bytes_read, bytes);
    assert_int_equal(st.reads, reads);
    assert_int_equal(st.errors, 0);
    assert_int_equal(st.sqes, min_sqes + st.resubmits);
    assert_true(st.busy_ns > 0);
    assert_true(st.busy_ns <= wall);
    tier_nvme_close(t);
    tier_host_destroy(h);
    coll_free(c);
    free(c);
}

/* close() with requests in flight and queued: every done() is called before it returns. */
static void test_close_in_flight(void **state) {
    (void)state;
    struct coll *c = malloc(sizeof(*c));
    coll_init(c);
    struct tier_host *h = host_new(16 * MIB);
    uint8_t *base = tier_host_base(h);
    struct tier_nvme *t = nvme_new(file_path, h, c, 4, 64 * 1024, true);
    enum { N = 48 };
    static struct range rs[N];
    uint64_t used = 0;
    for (uint32_t i = 0; i < N; i++) {
        rs[i] = random_range(file_size, 256 * 1024);
        rs[i].dst = base + used;
        used += rs[i].span.bytes;
        assert_true(used <= tier_host_bytes(h));
        struct tier_read rd = read_of(&rs[i]);
        assert_int_equal(tier_nvme_submit(t, &rd, 1, i), MOERUN_OK);
    }
    tier_nvme_close(t);
    assert_int_equal(c->total, N);
    for (uint32_t i = 0; i < N; i++) {
        assert_int_equal(c->calls[i], 1);
        assert_int_equal(c->status[i], MOERUN_OK);
        check_range(&rs[i], file_data, file_size);
    }
    tier_nvme_close(NULL);
    tier_host_destroy(h);
    coll_free(c);
    free(c);
}

/* A region over 1 GiB is registered as several iovecs: a read across the 1 GiB boundary is
 * split there (two SQEs with their own buffer index) and lands intact. */
static void test_iovec_boundary(void **state) {
    (void)state;
    struct coll *c = malloc(sizeof(*c));
    coll_init(c);
    struct tier_host_params hp = {.bytes = (1ull << 30) + 4 * MIB, .huge_pages = true};
    struct tier_host *h = NULL;
    if (tier_host_create(&hp, &h) != MOERUN_OK) {
        printf("no 1 GiB region (%s): iovec split not tested\n", moerun_errmsg());
        coll_free(c);
        free(c);
        skip();
    }
    uint8_t *base = tier_host_base(h);
    struct tier_nvme *t = nvme_new(file_path, h, c, 8, 4 * MIB, true);
    struct range r = random_range(file_size, 2 * MIB);
    while (r.span.bytes < 2 * TIER_ALIGN) /* it must be able to cross */
        r = random_range(file_size, 2 * MIB);
    r.dst = base + (1ull << 30) - TIER_ALIGN * (1 + rand_below(r.span.bytes / TIER_ALIGN - 1));
    struct tier_read rd = read_of(&r);
    assert_int_equal(tier_nvme_submit(t, &rd, 1, 0), MOERUN_OK);
    assert_true(coll_wait(c, 1));
    if (c->status[0] != MOERUN_OK)
        fail_msg("read across the 1 GiB iovec boundary: %s", c->msg[0]);
    check_range(&r, file_data, file_size);
    struct tier_nvme_stats st;
    tier_nvme_get_stats(t, &st);
    if (tier_nvme_is_fixed(t))
        assert_int_equal(st.sqes, 2 + st.resubmits);
    tier_nvme_close(t);
    tier_host_destroy(h);
    coll_free(c);
    free(c);
}

/* --- setup, bandwidth, main ------------------------------------------------------------------ */

static int make_file(void **state) {
    (void)state;
    file_size = 20 * MIB + rand_below(12 * MIB); /* usually not a multiple of 4 KiB */
    file_data = malloc(file_size);
    if (!file_data)
        return -1;
    fill_random(file_data, file_size);
    snprintf(file_path, sizeof(file_path), "%s", tu_tmp_path(".bin"));
    return write_file(file_path, file_data, file_size) ? 0 : -1;
}

static int remove_file(void **state) {
    (void)state;
    unlink(file_path);
    if (short_path[0])
        unlink(short_path);
    free(file_data);
    return 0;
}

struct bench {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t done, failed;
};

static void bench_done(void *user, uint64_t tag, int status, const char *msg) {
    struct bench *b = user;
    (void)tag;
    pthread_mutex_lock(&b->mu);
    b->done++;
    if (status != MOERUN_OK && b->failed++ == 0)
        fprintf(stderr, "bench: %s\n", msg);
    pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);
}

/* Sequential read of the whole file in 8 MiB requests (1 MiB SQEs, queue depth 64, O_DIRECT)
 * into a 256 MiB region reused round-robin. */
static int bench(const char *path) {
    struct bench b = {.done = 0, .failed = 0};
    pthread_mutex_init(&b.mu, NULL);
    pthread_cond_init(&b.cv, NULL);
    struct tier_host_params hp = {.bytes = 256 * MIB, .huge_pages = true, .bind_numa = true};
    struct tier_host *h = NULL;
    if (tier_host_create(&hp, &h) != MOERUN_OK) {
        fprintf(stderr, "bench: %s\n", moerun_errmsg());
        return 1;
    }
    struct tier_nvme_params p = {.queue_depth = 64,
                                 .direct = true,
                                 .region = tier_host_base(h),
                                 .region_bytes = tier_host_bytes(h),
                                 .done = bench_done,
                                 .user = &b,
                                 .chunk_bytes = 1 << 20};
    struct tier_nvme *t = NULL;
    if (tier_nvme_open(path, &p, &t) != MOERUN_OK) {
        fprintf(stderr, "bench: %s\n", moerun_errmsg());
        tier_host_destroy(h);
        return 1;
    }
    struct stat st;
    stat(path, &st);
    uint64_t size = (uint64_t)st.st_size & ~(uint64_t)(TIER_ALIGN - 1), req = 8 * MIB, n = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (uint64_t off = 0; off < size; off += req, n++) {
        struct tier_read rd = {.offset = off,
                               .bytes = MIN_U64(req, size - off),
                               .dst = (uint8_t *)tier_host_base(h) + (n * req) % (256 * MIB)};
        if (tier_nvme_submit(t, &rd, 1, n) != MOERUN_OK) {
            fprintf(stderr, "bench: %s\n", moerun_errmsg());
            break;
        }
    }
    pthread_mutex_lock(&b.mu);
    while (b.done < n)
        pthread_cond_wait(&b.cv, &b.mu);
    pthread_mutex_unlock(&b.mu);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    struct tier_nvme_stats ts;
    tier_nvme_get_stats(t, &ts);
    printf("bench: %s: %.2f GiB in %.3f s = %.0f MiB/s (busy %.3f s), O_DIRECT %s, fixed "
           "buffers %s, host %s, %llu failed\n",
           path, (double)ts.bytes_read / (1 << 30), s, (double)ts.bytes_read / MIB / s,
           1e-9 * (double)ts.busy_ns, tier_nvme_is_direct(t) ? "yes" : "no",
           tier_nvme_is_fixed(t) ? "yes" : "no", tier_host_describe(h),
           (unsigned long long)b.failed);
    tier_nvme_close(t);
    tier_host_destroy(h);
    return b.failed ? 1 : 0;
}

/* io_uring may be refused (seccomp in a container): skip then. */
static bool io_uring_usable(void) {
    const char *path = tu_tmp_path(".probe");
    char p[4096];
    snprintf(p, sizeof(p), "%s", path);
    uint8_t buf[TIER_ALIGN] = {0};
    if (!write_file(p, buf, sizeof(buf)))
        return true; /* let the tests report the real problem */
    struct coll *c = malloc(sizeof(*c));
    coll_init(c);
    struct tier_nvme_params np = {.done = on_done, .user = c};
    struct tier_nvme *t = NULL;
    int rc = tier_nvme_open(p, &np, &t);
    if (rc == MOERUN_ERR_UNSUPPORTED)
        printf("skipping: %s\n", moerun_errmsg());
    tier_nvme_close(t);
    unlink(p);
    coll_free(c);
    free(c);
    return rc != MOERUN_ERR_UNSUPPORTED;
}

int main(void) {
    tu_rng_init(&rng, tu_seed());
    const char *bench_path = getenv("MOERUN_NVME_BENCH");
    if (bench_path && *bench_path)
        return bench(bench_path);
    const struct CMUnitTest base_tests[] = {
        cmocka_unit_test(test_span),
        cmocka_unit_test(test_host),
    };
    int failed = cmocka_run_group_tests_name("tiers: span, host", base_tests, NULL, NULL);
    if (!io_uring_usable())
        return failed ? failed : TU_SKIP;
    const struct CMUnitTest nvme_tests[] = {
        cmocka_unit_test(test_random_ranges),
        cmocka_unit_test(test_three_ranges),
        cmocka_unit_test(test_two_threads),
        cmocka_unit_test(test_big_request),
        cmocka_unit_test(test_direct_and_buffered),
        cmocka_unit_test(test_fault_eio),
        cmocka_unit_test(test_fault_short),
        cmocka_unit_test(test_past_end),
        cmocka_unit_test(test_stats),
        cmocka_unit_test(test_close_in_flight),
        cmocka_unit_test(test_iovec_boundary),
    };
    failed += cmocka_run_group_tests_name("tiers: nvme", nvme_tests, make_file, remove_file);
    return failed;
}
