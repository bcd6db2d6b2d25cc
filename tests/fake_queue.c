#include "fake_queue.h"

#include <string.h>
#include <time.h>

static struct fq_job fq_pop(struct fake_queue *q) { /* under mu, q->n > 0 */
    struct fq_job j = q->q[q->head];
    q->head = (q->head + 1) % FQ_MAX;
    q->n--;
    return j;
}

static void *fq_thread(void *arg) {
    struct fake_queue *q = arg;
    pthread_mutex_lock(&q->mu);
    for (;;) {
        while ((!q->n || q->hold) && !q->stop)
            pthread_cond_wait(&q->cv, &q->mu);
        if (!q->n || q->hold)
            break;
        struct fq_job j = fq_pop(q);
        q->running = true;
        q->running_dst = j.dst;
        uint32_t us = q->p.delay_max ? (uint32_t)(tu_rng_u64(&q->rng) % q->p.delay_max) : 0;
        pthread_mutex_unlock(&q->mu);
        struct timespec ts = {0, (long)us * 1000};
        nanosleep(&ts, NULL);
        q->p.run(q->p.user, &j);
        pthread_mutex_lock(&q->mu);
        q->running = false;
        pthread_cond_broadcast(&q->cv);
    }
    pthread_mutex_unlock(&q->mu);
    return NULL;
}

int fq_init(struct fake_queue *q, const struct fq_params *p) {
    memset(q, 0, sizeof(*q));
    q->p = *p;
    q->fail_nth = -1;
    tu_rng_init(&q->rng, p->seed);
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->cv, NULL);
    int rc = p->threaded ? pthread_create(&q->th, NULL, fq_thread, q) : 0;
    if (rc) {
        pthread_cond_destroy(&q->cv);
        pthread_mutex_destroy(&q->mu);
    }
    return rc;
}

void fq_stop(struct fake_queue *q) {
    if (q->p.threaded) {
        pthread_mutex_lock(&q->mu);
        q->stop = true;
        pthread_cond_broadcast(&q->cv);
        pthread_mutex_unlock(&q->mu);
        pthread_join(q->th, NULL);
    }
    pthread_cond_destroy(&q->cv);
    pthread_mutex_destroy(&q->mu);
}

bool fq_submit(struct fake_queue *q, const struct fq_job *job, uint32_t id) {
    pthread_mutex_lock(&q->mu);
    uint64_t idx = q->calls++;
    if (idx < FQ_LOG_MAX) {
        q->log[idx].id = id;
        q->log[idx].dst = job->dst;
    }
    struct fq_job j = *job;
    j.fail = (int64_t)idx == q->fail_nth;
    if (q->p.on_call)
        q->p.on_call(q->p.user, &j);
    if (j.fail && q->fail_return) {
        pthread_mutex_unlock(&q->mu);
        return false;
    }
    if (q->p.threaded || q->hold) {
        if (q->n == FQ_MAX)
            q->violated = true; /* more jobs than the test can have in flight */
        else
            q->q[(q->head + q->n++) % FQ_MAX] = j;
        pthread_cond_broadcast(&q->cv);
        pthread_mutex_unlock(&q->mu);
        return true;
    }
    pthread_mutex_unlock(&q->mu);
    q->p.run(q->p.user, &j);
    return true;
}

void fq_fail(struct fake_queue *q, int64_t nth, bool refuse) {
    pthread_mutex_lock(&q->mu);
    q->fail_nth = nth;
    q->fail_return = refuse;
    pthread_mutex_unlock(&q->mu);
}

void fq_hold(struct fake_queue *q, bool hold) {
    pthread_mutex_lock(&q->mu);
    q->hold = hold;
    pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&q->mu);
}

uint32_t fq_release(struct fake_queue *q, uint32_t n) {
    uint32_t done = 0;
    for (; done < n; done++) {
        pthread_mutex_lock(&q->mu);
        if (!q->n) {
            pthread_mutex_unlock(&q->mu);
            break;
        }
        struct fq_job j = fq_pop(q);
        pthread_mutex_unlock(&q->mu);
        q->p.run(q->p.user, &j); /* may submit more: more held jobs */
    }
    return done;
}

uint32_t fq_held(struct fake_queue *q) {
    pthread_mutex_lock(&q->mu);
    uint32_t n = q->n;
    pthread_mutex_unlock(&q->mu);
    return n;
}

uint64_t fq_calls(struct fake_queue *q) {
    pthread_mutex_lock(&q->mu);
    uint64_t n = q->calls;
    pthread_mutex_unlock(&q->mu);
    return n;
}

bool fq_idle(struct fake_queue *q) {
    pthread_mutex_lock(&q->mu);
    bool idle = !q->n && !q->running;
    pthread_mutex_unlock(&q->mu);
    return idle;
}

bool fq_pending(struct fake_queue *q, const void *dst) {
    pthread_mutex_lock(&q->mu);
    bool pending = q->running && q->running_dst == dst;
    for (uint32_t i = 0; i < q->n; i++)
        pending |= q->q[(q->head + i) % FQ_MAX].dst == dst;
    pthread_mutex_unlock(&q->mu);
    return pending;
}
