/* A fake completion queue for tests: the work a fake loader, reader or uploader is given, each
 * job completed synchronously inside the call, by the queue's own thread after a random delay,
 * or held until the test releases it; "fail the nth call" injection (a refusal, or a job that
 * completes as failed); every call counted and logged. The test's run callback does the work and
 * delivers the completion. No CMocka here: misuse sets violated, which the test checks. */
#ifndef MOERUN_FAKE_QUEUE_H
#define MOERUN_FAKE_QUEUE_H

#include "testutil.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#define FQ_MAX     4096 /* jobs waiting at once */
#define FQ_LOG_MAX 8192 /* calls logged */

struct fq_job {
    const void *item; /* what to do: the test's (a struct sched_section) */
    const void *src;  /* an upload's source; else NULL */
    void *dst;
    uint64_t tag;
    bool fail; /* set by fq_submit: the injected failure, to complete as failed */
};

struct fq_params {
    void (*run)(void *user, const struct fq_job *j); /* does j and delivers its completion */
    /* optional: called under mu at each call (fail set), before it is refused, queued or run */
    void (*on_call)(void *user, const struct fq_job *j);
    void *user;
    bool threaded;      /* jobs run on the queue's thread */
    uint32_t delay_max; /* threaded: each job waits [0, delay_max) microseconds first */
    uint64_t seed;      /* for the delays */
};

struct fake_queue {
    struct fq_params p;
    pthread_t th;
    struct tu_rng rng;  /* the thread's delays */
    pthread_mutex_t mu; /* guards what follows; tests take it to read them or set violated */
    pthread_cond_t cv;
    bool hold;               /* jobs wait until fq_release (or fq_hold(false) when threaded) */
    bool fail_return;        /* the injected failure is a refusal (fq_submit returns false) */
    int64_t fail_nth;        /* this call (from 0) fails; -1 none */
    struct fq_job q[FQ_MAX]; /* waiting jobs, oldest at head */
    uint32_t head, n;
    bool running; /* the thread is running a job now, into running_dst */
    void *running_dst;
    bool stop;
    uint64_t calls;
    struct {
        uint32_t id; /* the caller's name for the job (a section index) */
        void *dst;
    } log[FQ_LOG_MAX]; /* in call order */
    bool violated;     /* more jobs than FQ_MAX; tests set it for their own checks */
};

/* Returns 0, or pthread_create's error (then nothing is left to stop). */
int fq_init(struct fake_queue *q, const struct fq_params *p);
/* Joins the thread (it runs what waits unless held) and frees the lock; violated stays. */
void fq_stop(struct fake_queue *q);

/* One call: numbered, logged as id, failing when it is the fail_nth; then refused (returns
 * false: the caller returns its error), queued (threaded or held), or run on this thread. */
bool fq_submit(struct fake_queue *q, const struct fq_job *j, uint32_t id);

void fq_fail(struct fake_queue *q, int64_t nth, bool refuse);
void fq_hold(struct fake_queue *q, bool hold);
/* Run the oldest n waiting jobs on this thread; returns how many ran. */
uint32_t fq_release(struct fake_queue *q, uint32_t n);
uint32_t fq_held(struct fake_queue *q);                 /* jobs waiting */
uint64_t fq_calls(struct fake_queue *q);                /* calls so far */
bool fq_idle(struct fake_queue *q);                     /* nothing waiting or running */
bool fq_pending(struct fake_queue *q, const void *dst); /* a job into dst waits or runs */

#endif /* MOERUN_FAKE_QUEUE_H */
