/* The "sim" backend: the CPU computing from its own "device" allocations, with an asynchronous
 * copy stream, so that the GPU tier's path (events, asynchronous uploads, slot reuse, callbacks
 * on another thread) runs without a GPU, under ASan and TSan.
 *
 *  - The compute stream is the calling thread (synchronous), as for the CPU backend: every
 *    compute op, upload, download and copy has completed when it returns.
 *  - The copy stream is one worker thread taking operations from a fixed ring (no allocation
 *    per operation) in order: memcpy (copy_async), complete an event (record), block until an
 *    event completes (wait), run fn(arg) (callback). A full ring makes the enqueuer wait.
 *  - An event is a generation counter: each record bumps `recorded`; a record on the copy
 *    stream completes when the worker reaches it (`completed` = its generation), one on the
 *    compute stream at once. A wait waits for the generation recorded when it was issued.
 *    Destroying an event waits until no queued operation names it.
 *  - Device memory comes from the instance's allocator, 4096-aligned, filled with 0xA5 bytes
 *    (unless MOERUN_SIM_POISON=0) so that reads of never-written memory stand out, and is
 *    tracked: free checks the pointer, destroy frees what is left (with a warning).
 *
 * The instance begins with struct cpu_backend (whose ops compute); clones are made by the CPU
 * backend's clone and reach the copy stream, memory and events through ->root. */
#include "backend_cpu.h"
#include "internal.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define SIM_RING_LEN 4096 /* copy-stream operations queued at most */
#define SIM_POISON   0xA5 /* the bytes of a new allocation (MOERUN_SIM_POISON=0: none) */

enum sim_op_kind {
    SIM_OP_COPY,
    SIM_OP_RECORD,
    SIM_OP_WAIT,
    SIM_OP_CALLBACK,
};

/* An event (handed out as struct mr_event *). Copy-stream generations complete in order, so
 * `completed` only grows. A compute record completes at once: it never touches `completed`
 * (an earlier copy record of the same event may still be pending), it only clears on_copy. */
struct sim_event {
    pthread_mutex_t mu;
    pthread_cond_t cv;  /* completed grew, or refs fell */
    uint64_t recorded;  /* generations recorded (0: never recorded = complete) */
    uint64_t completed; /* the last copy-stream generation the worker completed */
    bool on_copy;       /* the latest record (generation `recorded`) is on the copy stream */
    uint32_t refs;      /* queued operations naming this event (destroy waits for 0) */
};

struct sim_op {
    enum sim_op_kind kind;
    void *dst; /* copy: bytes from src to dst */
    const void *src;
    uint64_t bytes;
    struct sim_event *ev; /* record, wait: the event and its generation */
    uint64_t gen;
    mr_host_fn fn; /* callback */
    void *arg;
};

/* A live allocation (alloc is not on the hot path: one node per allocation). */
struct sim_block {
    struct sim_block *next;
    void *p;
    uint64_t bytes;
};

struct sim_backend {
    struct cpu_backend cpu; /* first: the CPU ops compute on it */
    pthread_t worker;
    pthread_mutex_t mu;        /* guards the ring, busy, stop */
    pthread_cond_t cv_work;    /* worker: operations queued, or stop */
    pthread_cond_t cv_space;   /* enqueuers: the ring has room */
    pthread_cond_t cv_idle;    /* sync: the ring is empty and the worker idle */
    uint32_t head, count;      /* ring[head] runs next; count queued */
    bool busy;                 /* the worker is running an operation it took from the ring */
    bool stop;                 /* destroy: the worker exits once the ring is empty */
    pthread_mutex_t blocks_mu; /* guards blocks */
    struct sim_block *blocks;  /* live allocations */
    bool poison;
    struct sim_op ring[SIM_RING_LEN];
};

/* The sim instance behind be (a root or a clone). */
static struct sim_backend *sim_of(struct mr_backend *be) {
    return (struct sim_backend *)((struct cpu_backend *)be)->root;
}

/* --- the copy stream ------------------------------------------------------------------------ */

static void sim_event_complete(struct sim_event *ev, uint64_t gen) {
    pthread_mutex_lock(&ev->mu);
    if (gen > ev->completed)
        ev->completed = gen;
    ev->refs--;
    pthread_cond_broadcast(&ev->cv);
    pthread_mutex_unlock(&ev->mu);
}

/* Block until copy-stream generation gen of ev has completed (gen 0: nothing to wait for). */
static void sim_event_block(struct sim_event *ev, uint64_t gen) {
    pthread_mutex_lock(&ev->mu);
    while (ev->completed < gen)
        pthread_cond_wait(&ev->cv, &ev->mu);
    pthread_mutex_unlock(&ev->mu);
}

static void sim_event_unref(struct sim_event *ev) {
    pthread_mutex_lock(&ev->mu);
    ev->refs--;
    pthread_cond_broadcast(&ev->cv);
    pthread_mutex_unlock(&ev->mu);
}

static void sim_run_op(const struct sim_op *op) {
    switch (op->kind) {
    case SIM_OP_COPY:
        memcpy(op->dst, op->src, (size_t)op->bytes);
        break;
    case SIM_OP_RECORD:
        sim_event_complete(op->ev, op->gen);
        break;
    case SIM_OP_WAIT:
        /* the generation waited for is an earlier copy record, already passed in this FIFO;
           blocking here keeps the stream's semantics should it ever not be */
        sim_event_block(op->ev, op->gen);
        sim_event_unref(op->ev);
        break;
    case SIM_OP_CALLBACK:
        op->fn(op->arg);
        break;
    }
}

static void *sim_worker(void *arg) {
    struct sim_backend *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (s->count == 0 && !s->stop)
            pthread_cond_wait(&s->cv_work, &s->mu);
        if (s->count == 0)
            break; /* stop, and nothing left */
        const struct sim_op op = s->ring[s->head];
        s->head = (s->head + 1) % SIM_RING_LEN;
        s->count--;
        s->busy = true;
        pthread_cond_signal(&s->cv_space);
        pthread_mutex_unlock(&s->mu);
        sim_run_op(&op);
        pthread_mutex_lock(&s->mu);
        s->busy = false;
        if (s->count == 0)
            pthread_cond_broadcast(&s->cv_idle);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* Append op to the ring, waiting (without holding anything the worker needs) while it is full. */
static void sim_enqueue(struct sim_backend *s, const struct sim_op *op) {
    pthread_mutex_lock(&s->mu);
    while (s->count == SIM_RING_LEN)
        pthread_cond_wait(&s->cv_space, &s->mu);
    s->ring[(s->head + s->count) % SIM_RING_LEN] = *op;
    s->count++;
    pthread_cond_signal(&s->cv_work);
    pthread_mutex_unlock(&s->mu);
}

static void sim_drain(struct sim_backend *s) {
    pthread_mutex_lock(&s->mu);
    while (s->count > 0 || s->busy)
        pthread_cond_wait(&s->cv_idle, &s->mu);
    pthread_mutex_unlock(&s->mu);
}

static int sim_sync(struct mr_backend *be, enum mr_stream stream) {
    if (stream == MR_STREAM_COPY)
        sim_drain(sim_of(be));
    return MOERUN_OK; /* the compute stream is synchronous */
}

static int sim_copy_async(struct mr_backend *be, void *dst, const void *src, uint64_t bytes) {
    if (bytes == 0)
        return MOERUN_OK;
    if (!dst || !src)
        return mr_err(MOERUN_ERR_INVALID_ARG, "sim backend: copy_async of %llu bytes from %p to %p",
                      (unsigned long long)bytes, src, dst);
    sim_enqueue(sim_of(be),
                &(struct sim_op){.kind = SIM_OP_COPY, .dst = dst, .src = src, .bytes = bytes});
    return MOERUN_OK;
}

static int sim_callback(struct mr_backend *be, enum mr_stream stream, mr_host_fn fn, void *arg) {
    if (!fn)
        return mr_err(MOERUN_ERR_INVALID_ARG, "sim backend: callback without a function");
    if (stream == MR_STREAM_COMPUTE) {
        fn(arg); /* the compute stream's work has completed: it is synchronous */
        return MOERUN_OK;
    }
    sim_enqueue(sim_of(be), &(struct sim_op){.kind = SIM_OP_CALLBACK, .fn = fn, .arg = arg});
    return MOERUN_OK;
}

/* --- events --------------------------------------------------------------------------------- */

static int sim_event_create(struct mr_backend *be, struct mr_event **out) {
    *out = NULL;
    struct sim_event *ev = mr_calloc(sim_of(be)->cpu.a, 1, sizeof(*ev));
    if (!ev)
        return mr_err(MOERUN_ERR_NOMEM, "sim backend: out of memory for an event");
    if (pthread_mutex_init(&ev->mu, NULL) != 0) {
        mr_free(sim_of(be)->cpu.a, ev);
        return mr_err(MOERUN_ERR_BACKEND, "sim backend: cannot create an event's mutex");
    }
    if (pthread_cond_init(&ev->cv, NULL) != 0) {
        pthread_mutex_destroy(&ev->mu);
        mr_free(sim_of(be)->cpu.a, ev);
        return mr_err(MOERUN_ERR_BACKEND, "sim backend: cannot create an event's condition");
    }
    *out = (struct mr_event *)ev;
    return MOERUN_OK;
}

/* Waits until no queued operation names the event (a device releases it once its work is done). */
static void sim_event_destroy(struct mr_backend *be, struct mr_event *e) {
    struct sim_event *ev = (struct sim_event *)e;
    if (!ev)
        return;
    pthread_mutex_lock(&ev->mu);
    while (ev->refs > 0)
        pthread_cond_wait(&ev->cv, &ev->mu);
    pthread_mutex_unlock(&ev->mu);
    pthread_cond_destroy(&ev->cv);
    pthread_mutex_destroy(&ev->mu);
    mr_free(sim_of(be)->cpu.a, ev);
}

static int sim_record(struct mr_backend *be, enum mr_stream stream, struct mr_event *e) {
    struct sim_event *ev = (struct sim_event *)e;
    if (!ev)
        return mr_err(MOERUN_ERR_INVALID_ARG, "sim backend: record of a NULL event");
    pthread_mutex_lock(&ev->mu);
    const uint64_t gen = ++ev->recorded;
    ev->on_copy = stream == MR_STREAM_COPY;
    if (ev->on_copy)
        ev->refs++;
    pthread_mutex_unlock(&ev->mu);
    if (stream == MR_STREAM_COPY)
        sim_enqueue(sim_of(be), &(struct sim_op){.kind = SIM_OP_RECORD, .ev = ev, .gen = gen});
    return MOERUN_OK;
}

static int sim_wait(struct mr_backend *be, enum mr_stream stream, struct mr_event *e) {
    struct sim_event *ev = (struct sim_event *)e;
    if (!ev)
        return mr_err(MOERUN_ERR_INVALID_ARG, "sim backend: wait for a NULL event");
    pthread_mutex_lock(&ev->mu);
    /* a compute-stream record completed when it was made; never recorded = complete */
    const uint64_t gen = ev->on_copy ? ev->recorded : 0;
    if (gen && stream == MR_STREAM_COPY)
        ev->refs++;
    pthread_mutex_unlock(&ev->mu);
    if (gen == 0)
        return MOERUN_OK;
    if (stream == MR_STREAM_COMPUTE)
        sim_event_block(ev, gen);
    else
        sim_enqueue(sim_of(be), &(struct sim_op){.kind = SIM_OP_WAIT, .ev = ev, .gen = gen});
    return MOERUN_OK;
}

/* --- memory --------------------------------------------------------------------------------- */

static int sim_alloc(struct mr_backend *be, uint64_t bytes, void **out) {
    struct sim_backend *s = sim_of(be);
    *out = NULL;
    if (bytes == 0)
        return MOERUN_OK;
    struct sim_block *b = mr_calloc(s->cpu.a, 1, sizeof(*b));
    void *p = bytes > SIZE_MAX / 2 ? NULL : mr_alloc(s->cpu.a, (size_t)bytes, 4096);
    if (!b || !p) {
        mr_free(s->cpu.a, b);
        mr_free(s->cpu.a, p);
        return mr_err(MOERUN_ERR_NOMEM, "sim backend: cannot allocate %llu bytes",
                      (unsigned long long)bytes);
    }
    if (s->poison)
        memset(p, SIM_POISON, (size_t)bytes); /* reads of never-written memory stand out */
    b->p = p;
    b->bytes = bytes;
    pthread_mutex_lock(&s->blocks_mu);
    b->next = s->blocks;
    s->blocks = b;
    pthread_mutex_unlock(&s->blocks_mu);
    *out = p;
    return MOERUN_OK;
}

static void sim_free(struct mr_backend *be, void *p) {
    struct sim_backend *s = sim_of(be);
    if (!p)
        return;
    struct sim_block *b = NULL;
    pthread_mutex_lock(&s->blocks_mu);
    for (struct sim_block **pp = &s->blocks; *pp; pp = &(*pp)->next) {
        if ((*pp)->p == p) {
            b = *pp;
            *pp = b->next;
            break;
        }
    }
    pthread_mutex_unlock(&s->blocks_mu);
    if (!b) {
        mr_log_error("sim backend: free of %p, which alloc did not return (ignored)", p);
        return;
    }
    mr_free(s->cpu.a, b->p);
    mr_free(s->cpu.a, b);
}

/* --- instances ------------------------------------------------------------------------------ */

static void sim_destroy(struct mr_backend *be);

static struct mr_backend_ops sim_ops;
static pthread_once_t sim_ops_once = PTHREAD_ONCE_INIT;

/* The CPU table with the copy stream, events and memory replaced. */
static void sim_ops_build(void) {
    sim_ops = cpu_backend_ops;
    sim_ops.name = "sim";
    sim_ops.destroy = sim_destroy;
    sim_ops.alloc = sim_alloc;
    sim_ops.free = sim_free;
    sim_ops.sync = sim_sync;
    sim_ops.event_create = sim_event_create;
    sim_ops.event_destroy = sim_event_destroy;
    sim_ops.copy_async = sim_copy_async;
    sim_ops.record = sim_record;
    sim_ops.wait = sim_wait;
    sim_ops.callback = sim_callback;
}

static void sim_destroy(struct mr_backend *be) {
    struct cpu_backend *c = (struct cpu_backend *)be;
    if (c->root != c) {
        cpu_backend_ops.destroy(be); /* a clone: its pool and itself */
        return;
    }
    struct sim_backend *s = (struct sim_backend *)c;
    const moerun_allocator *a = s->cpu.a;
    pthread_mutex_lock(&s->mu);
    s->stop = true; /* the worker runs what is queued first */
    pthread_cond_signal(&s->cv_work);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->worker, NULL);
    pthread_cond_destroy(&s->cv_idle);
    pthread_cond_destroy(&s->cv_space);
    pthread_cond_destroy(&s->cv_work);
    pthread_mutex_destroy(&s->blocks_mu);
    pthread_mutex_destroy(&s->mu);
    int n_left = 0;
    while (s->blocks) {
        struct sim_block *b = s->blocks;
        s->blocks = b->next;
        mr_free(a, b->p);
        mr_free(a, b);
        n_left++;
    }
    if (n_left)
        mr_log_warn("sim backend: %d allocations still live at destroy (freed)", n_left);
    cpu_backend_fini(&s->cpu);
    mr_free(a, s);
}

int mr_backend_sim_create(const struct mr_backend_config *cfg, struct mr_backend **out) {
    *out = NULL;
    pthread_once(&sim_ops_once, sim_ops_build);
    struct sim_backend *s = mr_calloc(cfg->allocator, 1, sizeof(*s));
    if (!s)
        return mr_err(MOERUN_ERR_NOMEM, "sim backend: out of memory");
    int rc = cpu_backend_init(&s->cpu, &sim_ops, MR_BACKEND_SIM, cfg->n_threads, cfg->allocator);
    if (rc != MOERUN_OK)
        goto out_free;
    const char *env = getenv("MOERUN_SIM_POISON");
    s->poison = !(env && strcmp(env, "0") == 0);
    rc = MOERUN_ERR_BACKEND;
    if (pthread_mutex_init(&s->mu, NULL) != 0)
        goto out_fini;
    if (pthread_mutex_init(&s->blocks_mu, NULL) != 0)
        goto out_mu;
    if (pthread_cond_init(&s->cv_work, NULL) != 0)
        goto out_blocks_mu;
    if (pthread_cond_init(&s->cv_space, NULL) != 0)
        goto out_cv_work;
    if (pthread_cond_init(&s->cv_idle, NULL) != 0)
        goto out_cv_space;
    int e = pthread_create(&s->worker, NULL, sim_worker, s);
    if (e != 0)
        goto out_cv_idle;
    *out = &s->cpu.base;
    return MOERUN_OK;

out_cv_idle:
    pthread_cond_destroy(&s->cv_idle);
out_cv_space:
    pthread_cond_destroy(&s->cv_space);
out_cv_work:
    pthread_cond_destroy(&s->cv_work);
out_blocks_mu:
    pthread_mutex_destroy(&s->blocks_mu);
out_mu:
    pthread_mutex_destroy(&s->mu);
out_fini:
    cpu_backend_fini(&s->cpu);
    if (rc == MOERUN_ERR_BACKEND)
        mr_err(rc, "sim backend: cannot start the copy stream (its thread or locks)");
out_free:
    mr_free(cfg->allocator, s);
    return rc;
}
