/* CPU thread pool: the caller's thread is worker 0, n - 1 pthreads are the others.
 *
 * A job is published by bumping a generation counter (release); workers wait for it to change
 * (acquire), spinning with a pause instruction for a short while after each job and then
 * sleeping on a condition variable, so back-to-back decode jobs (tens of microseconds each)
 * start within a cache-line transfer while an idle pool costs nothing. Each worker reports the
 * end of its part with a release increment of n_done; the caller spins (acquire) until every
 * worker has reported.
 *
 * Sleeping uses the Dekker pattern with sequentially consistent operations: a worker counts
 * itself in n_sleeping under the mutex and then re-reads the generation before waiting; the
 * caller bumps the generation and then reads n_sleeping, and takes the mutex to broadcast only
 * when someone may be asleep. Either the worker sees the new generation or the caller sees the
 * sleeper (and its broadcast cannot precede the wait, which holds the mutex until it sleeps).
 */
#include "matmul.h"
#include "internal.h"

#include <pthread.h>
#include <sched.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_pause() _mm_pause()
#elif defined(__aarch64__)
#define cpu_pause() __asm__ __volatile__("yield")
#else
#define cpu_pause() ((void)0)
#endif

#define POOL_MAX_THREADS 1024
#define POOL_SPIN_NS     200000 /* a worker spins this long after a job before sleeping */
#define POOL_SPIN_CHECK  64     /* pause iterations between clock reads */
#define POOL_YIELD_AFTER 4096   /* caller: pause iterations before it starts yielding */

struct cpu_pool {
    /* written by the caller, read by the workers */
    alignas(64) atomic_uint gen; /* job generation; bumped (release) to start a job */
    atomic_bool stop;            /* set before the last bump: workers exit */
    cpu_task_fn fn;              /* the current job (plain: published by gen) */
    void *arg;
    /* written by the workers */
    alignas(64) atomic_int n_done; /* workers 1..n-1 that finished the current job */
    alignas(64) atomic_int n_sleeping;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int n_threads;
    int n_started; /* pthreads created (n_threads - 1 once complete) */
    pthread_t *threads;
};

struct pool_worker_arg {
    struct cpu_pool *pool;
    int ith;
};

static uint64_t pool_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Wait until the generation differs from seen; returns the new generation. */
static unsigned pool_wait_job(struct cpu_pool *pool, unsigned seen) {
    unsigned g;
    uint64_t deadline = 0;
    for (unsigned i = 1;; i++) {
        g = atomic_load_explicit(&pool->gen, memory_order_acquire);
        if (g != seen)
            return g;
        cpu_pause();
        if (i % POOL_SPIN_CHECK == 0) {
            /* with more threads than free cores, let a thread that has work run (returns at
             * once when none is waiting for this core) */
            sched_yield();
            uint64_t now = pool_now_ns();
            if (deadline == 0)
                deadline = now + POOL_SPIN_NS;
            else if (now >= deadline)
                break;
        }
    }
    pthread_mutex_lock(&pool->mu);
    atomic_fetch_add_explicit(&pool->n_sleeping, 1, memory_order_seq_cst);
    while ((g = atomic_load_explicit(&pool->gen, memory_order_seq_cst)) == seen)
        pthread_cond_wait(&pool->cv, &pool->mu);
    atomic_fetch_sub_explicit(&pool->n_sleeping, 1, memory_order_relaxed);
    pthread_mutex_unlock(&pool->mu);
    /* the seq_cst load above also acquires the job's fields */
    return g;
}

static void *pool_worker(void *p) {
    struct pool_worker_arg *wa = p;
    struct cpu_pool *pool = wa->pool;
    const int ith = wa->ith;
    unsigned seen = 0; /* the generation at creation */
    mr_free(NULL, wa);
    for (;;) {
        seen = pool_wait_job(pool, seen);
        if (atomic_load_explicit(&pool->stop, memory_order_relaxed))
            break;
        pool->fn(pool->arg, ith, pool->n_threads);
        atomic_fetch_add_explicit(&pool->n_done, 1, memory_order_release);
    }
    return NULL;
}

/* Publish the current fn/arg (or stop) to the workers. */
static void pool_kick(struct cpu_pool *pool) {
    atomic_fetch_add_explicit(&pool->gen, 1, memory_order_seq_cst);
    if (atomic_load_explicit(&pool->n_sleeping, memory_order_seq_cst) > 0) {
        pthread_mutex_lock(&pool->mu);
        pthread_cond_broadcast(&pool->cv);
        pthread_mutex_unlock(&pool->mu);
    }
}

static void pool_join(struct cpu_pool *pool) {
    atomic_store_explicit(&pool->stop, true, memory_order_relaxed);
    pool_kick(pool); /* the release of the bump orders stop before it */
    for (int i = 0; i < pool->n_started; i++)
        pthread_join(pool->threads[i], NULL);
    pool->n_started = 0;
}

int cpu_pool_create(int n_threads, struct cpu_pool **out) {
    if (!out)
        return mr_err(MOERUN_ERR_INVALID_ARG, "cpu pool: out is NULL");
    *out = NULL;
    if (n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = n > 0 ? (int)MR_MIN(n, POOL_MAX_THREADS) : 1;
    }
    if (n_threads > POOL_MAX_THREADS)
        return mr_err(MOERUN_ERR_INVALID_ARG, "cpu pool: %d threads (at most %d)", n_threads,
                      POOL_MAX_THREADS);

    int rc = MOERUN_OK;
    struct cpu_pool *pool = mr_alloc(NULL, sizeof(*pool), 64);
    if (!pool)
        return mr_err(MOERUN_ERR_NOMEM, "cpu pool: allocating the pool");
    atomic_init(&pool->gen, 0);
    atomic_init(&pool->stop, false);
    atomic_init(&pool->n_done, 0);
    atomic_init(&pool->n_sleeping, 0);
    pool->fn = NULL;
    pool->arg = NULL;
    pool->n_threads = n_threads;
    pool->n_started = 0;
    pool->threads = NULL;
    int e = pthread_mutex_init(&pool->mu, NULL);
    if (e) {
        rc = mr_err_errno(e, "cpu pool: pthread_mutex_init");
        goto out_free_pool;
    }
    e = pthread_cond_init(&pool->cv, NULL);
    if (e) {
        rc = mr_err_errno(e, "cpu pool: pthread_cond_init");
        goto out_destroy_mutex;
    }
    if (n_threads > 1) {
        pool->threads = mr_calloc(NULL, (size_t)n_threads - 1, sizeof(pthread_t));
        if (!pool->threads) {
            rc = mr_err(MOERUN_ERR_NOMEM, "cpu pool: allocating %d thread handles", n_threads);
            goto out_destroy_cond;
        }
    }
    for (int i = 1; i < n_threads; i++) {
        struct pool_worker_arg *wa = mr_alloc(NULL, sizeof(*wa), 0);
        if (!wa) {
            rc = mr_err(MOERUN_ERR_NOMEM, "cpu pool: allocating worker %d", i);
            goto out_join;
        }
        wa->pool = pool;
        wa->ith = i;
        e = pthread_create(&pool->threads[i - 1], NULL, pool_worker, wa);
        if (e) {
            mr_free(NULL, wa);
            rc = mr_err_errno(e, "cpu pool: pthread_create");
            goto out_join;
        }
        pool->n_started++;
    }
    *out = pool;
    return MOERUN_OK;

out_join:
    pool_join(pool);
    mr_free(NULL, pool->threads);
out_destroy_cond:
    pthread_cond_destroy(&pool->cv);
out_destroy_mutex:
    pthread_mutex_destroy(&pool->mu);
out_free_pool:
    mr_free(NULL, pool);
    return rc;
}

void cpu_pool_destroy(struct cpu_pool *pool) {
    if (!pool)
        return;
    pool_join(pool);
    mr_free(NULL, pool->threads);
    pthread_cond_destroy(&pool->cv);
    pthread_mutex_destroy(&pool->mu);
    mr_free(NULL, pool);
}

int cpu_pool_size(const struct cpu_pool *pool) {
    return pool ? pool->n_threads : 1;
}

void cpu_pool_run(struct cpu_pool *pool, cpu_task_fn fn, void *arg) {
    if (!pool || pool->n_threads == 1) {
        fn(arg, 0, 1);
        return;
    }
    const int n_others = pool->n_threads - 1;
    pool->fn = fn;
    pool->arg = arg;
    /* every worker finished the previous job, so none reads n_done until the bump below */
    atomic_store_explicit(&pool->n_done, 0, memory_order_relaxed);
    pool_kick(pool);
    fn(arg, 0, pool->n_threads);
    for (unsigned i = 1; atomic_load_explicit(&pool->n_done, memory_order_acquire) < n_others;
         i++) {
        cpu_pause();
        if (i > POOL_YIELD_AFTER)
            sched_yield(); /* more threads than cores: let the late worker run */
    }
}
