/* NVMe tier: reads aligned spans of the model file into the host region with io_uring.
 *
 * Structure (everything allocated at open):
 *  - requests: a pool of 4 x queue_depth slots; a request holds a copy of its reads and an
 *    issue cursor (which read, how far into it). Requests with SQEs still to issue wait in a
 *    FIFO (the pending list).
 *  - ops: queue_depth slots, one per SQE in flight; an op is one chunk of a read (at most
 *    chunk_bytes, never crossing a 1 GiB registered-buffer iovec).
 *  - one mutex guards everything above and the submission queue. tier_nvme_submit and the
 *    completion thread both "pump": move chunks from the pending list into free ops and submit.
 *    The completion thread alone reaps the CQ (io_uring_wait_cqe, without the mutex) and calls
 *    done() without the mutex, after the request's slot is back in the pool.
 *
 * Short reads are resubmitted for the rest (from the last TIER_ALIGN boundary under O_DIRECT);
 * a read that reaches the end of the file zero-fills the rest of its span; res == 0 before the
 * end is an error. A failed request is reported once all of its SQEs have been reaped.
 */
#include "internal.h"
#include "tiers.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define NVME_DEFAULT_QD    64u
#define NVME_DEFAULT_CHUNK (1u << 20)
#define NVME_IOV_MAX_BYTES (1ull << 30) /* io_uring's limit per registered buffer */
#define NVME_NONE          UINT32_MAX
#define NVME_UD_STOP       UINT64_MAX /* user_data of the NOP that stops the thread */
#define NVME_MAX_STALLS    1u         /* short reads of one op in a row without aligned progress */
#define NVME_MSG_BYTES     768

struct nvme_req {
    uint64_t tag;
    uint32_t n;
    struct tier_read reads[TIER_NVME_MAX_READS];
    uint32_t next_read;    /* issue cursor: read index ... */
    uint64_t next_off;     /* ... and bytes of it already given to ops */
    uint32_t ops_inflight; /* ops of this request not yet finished */
    int status;            /* MOERUN_OK, or the first failure */
    bool pending;          /* in the pending list */
    uint32_t next;         /* pending list / free list link */
    char msg[NVME_MSG_BYTES];
};

struct nvme_op {
    uint32_t req;
    uint32_t read_idx;
    uint64_t file_off; /* of the chunk */
    uint8_t *dst;
    uint32_t len;    /* chunk bytes */
    uint32_t done;   /* bytes landed so far */
    uint32_t stalls; /* resubmissions in a row that made no progress */
    enum tier_fault_kind fault;
    uint64_t short_bytes;
    bool was_direct; /* submitted while the file was open with O_DIRECT */
    uint32_t next;   /* free list link */
};

struct tier_nvme {
    char path[512];
    int fd;
    int old_fd; /* the O_DIRECT descriptor after the buffered fallback, closed at close */
    bool direct;
    bool direct_ok; /* a read under O_DIRECT has succeeded: EINVAL is then a real error */
    uint64_t file_bytes;

    struct io_uring ring;
    bool fixed_file;
    bool fixed_bufs;
    uint8_t *region;
    uint64_t region_bytes;
    uint32_t chunk;
    tier_done_fn done;
    void *user;

    pthread_mutex_t mu;
    pthread_cond_t cv; /* a request slot was freed / a request finished */
    pthread_t thread;
    bool closing;

    struct nvme_req *reqs;
    uint32_t n_reqs;
    uint32_t free_req;
    uint32_t active; /* requests taken and not yet finished */
    uint32_t pend_head, pend_tail;

    struct nvme_op *ops;
    uint32_t n_ops;
    uint32_t free_op;
    uint32_t inflight; /* read SQEs submitted, not reaped */
    uint64_t busy_since;

    uint64_t sqe_count; /* read SQEs prepared since open (the fault hook counts these) */
    uint64_t fault_nth;
    enum tier_fault_kind fault_kind;
    uint64_t fault_short;

    struct tier_nvme_stats stats;
};

/* A request that finished, reported with done() after the mutex is dropped. */
struct nvme_finished {
    bool any;
    uint64_t tag;
    int status;
    char msg[NVME_MSG_BYTES];
};

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t align_up(uint64_t x) {
    return (x + TIER_ALIGN - 1) & ~(uint64_t)(TIER_ALIGN - 1);
}

/* --- request bookkeeping (all under t->mu) --------------------------------------------------- */

static void pend_remove(struct tier_nvme *t, uint32_t ri) {
    uint32_t prev = NVME_NONE;
    for (uint32_t i = t->pend_head; i != NVME_NONE; prev = i, i = t->reqs[i].next) {
        if (i != ri)
            continue;
        if (prev == NVME_NONE)
            t->pend_head = t->reqs[i].next;
        else
            t->reqs[prev].next = t->reqs[i].next;
        if (t->pend_tail == i)
            t->pend_tail = prev;
        break;
    }
    t->reqs[ri].pending = false;
    t->reqs[ri].next = NVME_NONE;
}

static void req_fail(struct tier_nvme *t, struct nvme_req *r, const struct nvme_op *op, int e,
                     const char *why) {
    if (r->status != MOERUN_OK)
        return; /* the first failure is the one reported */
    const struct tier_read *rd = &r->reads[op->read_idx];
    r->status = MOERUN_ERR_IO;
    snprintf(r->msg, sizeof(r->msg), "nvme: read of %llu at %llu failed: %s (%s, chunk at %llu)",
             (unsigned long long)rd->bytes, (unsigned long long)rd->offset, why ? why : strerror(e),
             t->path, (unsigned long long)(op->file_off + op->done));
    if (r->pending)
        pend_remove(t, (uint32_t)(r - t->reqs)); /* issue no more of it */
}

/* Finish r if nothing of it is left in flight: fill *fin, return the slot to the pool. */
static void req_maybe_finish(struct tier_nvme *t, struct nvme_req *r, struct nvme_finished *fin) {
    if (r->ops_inflight > 0)
        return;
    if (r->status == MOERUN_OK && r->next_read < r->n)
        return; /* more to issue */
    fin->any = true;
    fin->tag = r->tag;
    fin->status = r->status;
    if (r->status == MOERUN_OK) {
        fin->msg[0] = '\0';
        for (uint32_t i = 0; i < r->n; i++)
            t->stats.bytes_read += r->reads[i].bytes;
        t->stats.reads += r->n;
    } else {
        memcpy(fin->msg, r->msg, sizeof(fin->msg));
        t->stats.errors++;
    }
    r->next = t->free_req;
    t->free_req = (uint32_t)(r - t->reqs);
    t->active--;
    pthread_cond_broadcast(&t->cv);
}

/* --- submission (under t->mu) ----------------------------------------------------------------- */

static void busy_begin(struct tier_nvme *t) {
    if (t->inflight++ == 0)
        t->busy_since = now_ns();
}

static void busy_end(struct tier_nvme *t) {
    if (--t->inflight == 0)
        t->stats.busy_ns += now_ns() - t->busy_since;
}

/* Prepare the SQE for the rest of op (from op->done). The ring has room (ops <= SQ entries and
 * every pump submits), unless io_uring_submit failed: then false, nothing prepared. */
static bool op_prep(struct tier_nvme *t, struct nvme_op *op) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&t->ring);
    if (!sqe)
        return false;
    uint32_t oi = (uint32_t)(op - t->ops);
    uint64_t nth = t->sqe_count++;
    op->fault = TIER_FAULT_NONE;
    if (t->fault_kind != TIER_FAULT_NONE && nth == t->fault_nth) {
        op->fault = t->fault_kind;
        op->short_bytes = t->fault_short;
        t->fault_kind = TIER_FAULT_NONE;
    }
    op->was_direct = t->direct;
    if (op->fault == TIER_FAULT_EIO || op->fault == TIER_FAULT_EINVAL) {
        io_uring_prep_nop(sqe); /* completed synthetically: its result is overridden */
    } else {
        int fd = t->fixed_file ? 0 : t->fd;
        uint8_t *dst = op->dst + op->done;
        unsigned len = op->len - op->done;
        uint64_t off = op->file_off + op->done;
        if (t->fixed_bufs) {
            int bi = (int)((uint64_t)(op->dst - t->region) / NVME_IOV_MAX_BYTES);
            io_uring_prep_read_fixed(sqe, fd, dst, len, off, bi);
        } else {
            io_uring_prep_read(sqe, fd, dst, len, off);
        }
        if (t->fixed_file)
            sqe->flags |= IOSQE_FIXED_FILE;
    }
    io_uring_sqe_set_data64(sqe, oi);
    busy_begin(t);
    return true;
}

static void ring_submit(struct tier_nvme *t) {
    for (int tries = 0; tries < 1000; tries++) {
        int rc = io_uring_submit(&t->ring);
        if (rc >= 0 || (rc != -EINTR && rc != -EAGAIN && rc != -EBUSY)) {
            if (rc < 0)
                mr_log_error("nvme: io_uring_submit failed: %s", strerror(-rc));
            return;
        }
    }
}

/* Move chunks of pending requests into free ops and submit them. */
static void pump(struct tier_nvme *t) {
    uint32_t n_prep = 0;
    while (t->free_op != NVME_NONE && t->pend_head != NVME_NONE &&
           io_uring_sq_space_left(&t->ring) > 0) {
        struct nvme_req *r = &t->reqs[t->pend_head];
        const struct tier_read *rd = &r->reads[r->next_read];
        uint8_t *dst = (uint8_t *)rd->dst + r->next_off;
        uint64_t len = MR_MIN(rd->bytes - r->next_off, (uint64_t)t->chunk);
        if (t->fixed_bufs) {
            uint64_t pos = (uint64_t)(dst - t->region);
            uint64_t iov_end = (pos / NVME_IOV_MAX_BYTES + 1) * NVME_IOV_MAX_BYTES;
            len = MR_MIN(len, iov_end - pos);
        }
        uint32_t oi = t->free_op;
        struct nvme_op *op = &t->ops[oi];
        t->free_op = op->next;
        op->req = t->pend_head;
        op->read_idx = r->next_read;
        op->file_off = rd->offset + r->next_off;
        op->dst = dst;
        op->len = (uint32_t)len;
        op->done = 0;
        op->stalls = 0;
        r->ops_inflight++;
        r->next_off += len;
        if (r->next_off == rd->bytes) {
            r->next_read++;
            r->next_off = 0;
            if (r->next_read == r->n) {
                t->pend_head = r->next;
                if (t->pend_head == NVME_NONE)
                    t->pend_tail = NVME_NONE;
                r->pending = false;
                r->next = NVME_NONE;
            }
        }
        op_prep(t, op); /* cannot fail: space was checked */
        n_prep++;
    }
    if (n_prep > 0)
        ring_submit(t);
}

/* Switch to buffered reads after O_DIRECT was refused at read time. */
static int reopen_buffered(struct tier_nvme *t) {
    int fd = open(t->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    if (t->fixed_file) {
        int rc = io_uring_register_files_update(&t->ring, 0, &fd, 1);
        if (rc < 0) {
            close(fd);
            return rc;
        }
    }
    t->old_fd = t->fd; /* in-flight SQEs may still use it: closed at close */
    t->fd = fd;
    t->direct = false;
    mr_log_warn("O_DIRECT not supported on %s: buffered reads", t->path);
    return 0;
}

static void op_release(struct tier_nvme *t, struct nvme_op *op) {
    op->next = t->free_op;
    t->free_op = (uint32_t)(op - t->ops);
}

/* One CQE of op oi with result res. */
static void handle_cqe(struct tier_nvme *t, uint32_t oi, int res, struct nvme_finished *fin) {
    struct nvme_op *op = &t->ops[oi];
    struct nvme_req *r = &t->reqs[op->req];
    busy_end(t);
    if (op->fault == TIER_FAULT_EIO)
        res = -EIO;
    else if (op->fault == TIER_FAULT_EINVAL)
        res = -EINVAL;
    else if (op->fault == TIER_FAULT_SHORT && res > 0)
        res = (uint64_t)res > op->short_bytes ? res - (int)op->short_bytes : (res > 1 ? 1 : res);

    bool resubmit = false;
    if (res == -EINVAL && op->was_direct && !t->direct_ok && r->status == MOERUN_OK) {
        /* O_DIRECT refused at read time: the file system cannot do it */
        if (!t->direct || reopen_buffered(t) == 0)
            resubmit = true;
        else
            req_fail(t, r, op, EINVAL, NULL);
    } else if (res < 0) {
        req_fail(t, r, op, -res, NULL);
    } else if (r->status != MOERUN_OK) {
        /* the request already failed: this op's data is moot */
    } else {
        if (op->was_direct && res > 0)
            t->direct_ok = true;
        uint64_t got = op->done + (uint64_t)res;
        uint64_t end = op->file_off + got;
        if (got >= op->len) {
            op->done = op->len;
        } else if (res > 0 && end >= t->file_bytes) {
            /* the span runs past the end of the file: its tail is zero */
            memset(op->dst + got, 0, op->len - got);
            op->done = op->len;
        } else if (res == 0) {
            char why[96];
            snprintf(why, sizeof(why), "file shorter than expected (ends at or before %llu)",
                     (unsigned long long)end);
            req_fail(t, r, op, EIO, why);
        } else {
            /* short: read the rest (from an aligned point under O_DIRECT) */
            uint64_t next = t->direct ? got & ~(uint64_t)(TIER_ALIGN - 1) : got;
            op->stalls = next > op->done ? 0 : op->stalls + 1;
            if (op->stalls > NVME_MAX_STALLS) {
                /* O_DIRECT reads end unaligned only at the end of the file */
                char why[96];
                snprintf(why, sizeof(why), "file shorter than expected (ends at %llu)",
                         (unsigned long long)end);
                req_fail(t, r, op, EIO, why);
            } else {
                op->done = (uint32_t)next;
                t->stats.resubmits++;
                resubmit = true;
            }
        }
    }

    if (resubmit) {
        if (op_prep(t, op)) {
            ring_submit(t);
            return;
        }
        req_fail(t, r, op, EAGAIN, "no submission queue entry to resubmit");
    }
    r->ops_inflight--;
    op_release(t, op);
    req_maybe_finish(t, r, fin);
}

static void *completion_main(void *arg) {
    struct tier_nvme *t = arg;
    for (;;) {
        struct io_uring_cqe *cqe;
        int rc = io_uring_wait_cqe(&t->ring, &cqe);
        if (rc < 0) {
            if (rc != -EINTR && rc != -EAGAIN)
                mr_log_error("nvme: io_uring_wait_cqe failed: %s", strerror(-rc));
            continue;
        }
        uint64_t ud = io_uring_cqe_get_data64(cqe);
        int res = cqe->res;
        io_uring_cqe_seen(&t->ring, cqe);
        if (ud == NVME_UD_STOP)
            break;
        struct nvme_finished fin;
        fin.any = false;
        pthread_mutex_lock(&t->mu);
        if (ud < t->n_ops) {
            handle_cqe(t, (uint32_t)ud, res, &fin);
            pump(t);
        }
        pthread_mutex_unlock(&t->mu);
        if (fin.any)
            t->done(t->user, fin.tag, fin.status, fin.msg);
    }
    return NULL;
}

/* --- open / close ----------------------------------------------------------------------------- */

static int open_file(struct tier_nvme *t, bool direct) {
    if (direct) {
        t->fd = open(t->path, O_RDONLY | O_DIRECT | O_CLOEXEC);
        if (t->fd >= 0) {
            t->direct = true;
            return MOERUN_OK;
        }
        if (errno != EINVAL)
            return mr_err(MOERUN_ERR_IO, "nvme: cannot open %s: %s", t->path, strerror(errno));
        mr_log_warn("O_DIRECT not supported on %s: buffered reads", t->path);
    }
    t->fd = open(t->path, O_RDONLY | O_CLOEXEC);
    if (t->fd < 0)
        return mr_err(MOERUN_ERR_IO, "nvme: cannot open %s: %s", t->path, strerror(errno));
    t->direct = false;
    return MOERUN_OK;
}

/* Register the region as <= 1 GiB iovecs; on refusal fall back to plain reads (logged). */
static void register_region(struct tier_nvme *t) {
    if (!t->region || t->region_bytes == 0)
        return;
    uint64_t n_iov = (t->region_bytes + NVME_IOV_MAX_BYTES - 1) / NVME_IOV_MAX_BYTES;
    struct iovec *iov = mr_calloc(NULL, (size_t)n_iov, sizeof(*iov));
    if (!iov) {
        mr_log_warn("nvme: no memory to register the region: plain reads");
        return;
    }
    for (uint64_t i = 0; i < n_iov; i++) {
        iov[i].iov_base = t->region + i * NVME_IOV_MAX_BYTES;
        iov[i].iov_len =
            (size_t)MR_MIN(NVME_IOV_MAX_BYTES, t->region_bytes - i * NVME_IOV_MAX_BYTES);
    }
    int rc = io_uring_register_buffers(&t->ring, iov, (unsigned)n_iov);
    mr_free(NULL, iov);
    if (rc == 0)
        t->fixed_bufs = true;
    else
        mr_log_warn("nvme: registering %llu bytes of buffers failed (%s; RLIMIT_MEMLOCK?): "
                    "plain reads",
                    (unsigned long long)t->region_bytes, strerror(-rc));
}

int tier_nvme_open(const char *path, const struct tier_nvme_params *p, struct tier_nvme **out) {
    if (!path || !p || !out || !p->done)
        return mr_err(MOERUN_ERR_INVALID_ARG, "nvme: no path, parameters or done callback");
    *out = NULL;
    uint32_t qd = p->queue_depth ? p->queue_depth : NVME_DEFAULT_QD;
    uint32_t chunk = p->chunk_bytes ? p->chunk_bytes : NVME_DEFAULT_CHUNK;
    if (qd > 4096 || chunk % TIER_ALIGN != 0 || chunk > (1u << 30))
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "nvme: queue depth %u (at most 4096) or chunk %u bytes (a multiple of %u) "
                      "out of range",
                      qd, chunk, TIER_ALIGN);
    if (p->region && ((uintptr_t)p->region % TIER_ALIGN != 0 || p->region_bytes % TIER_ALIGN))
        return mr_err(MOERUN_ERR_INVALID_ARG, "nvme: region %p + %llu is not %u-aligned", p->region,
                      (unsigned long long)p->region_bytes, TIER_ALIGN);
    if (strlen(path) >= sizeof(((struct tier_nvme *)0)->path))
        return mr_err(MOERUN_ERR_INVALID_ARG, "nvme: path too long: %s", path);

    int rc;
    struct tier_nvme *t = mr_calloc(NULL, 1, sizeof(*t));
    if (!t)
        return mr_err(MOERUN_ERR_NOMEM, "nvme: out of memory for the tier");
    strcpy(t->path, path);
    t->fd = t->old_fd = -1;
    t->region = p->region;
    t->region_bytes = p->region ? p->region_bytes : 0;
    t->chunk = chunk;
    t->done = p->done;
    t->user = p->user;
    t->n_ops = qd;
    t->n_reqs = 4 * qd;
    t->reqs = mr_calloc(NULL, t->n_reqs, sizeof(*t->reqs));
    t->ops = mr_calloc(NULL, t->n_ops, sizeof(*t->ops));
    if (!t->reqs || !t->ops) {
        rc = mr_err(MOERUN_ERR_NOMEM, "nvme: out of memory for %u requests", t->n_reqs);
        goto out_free;
    }
    for (uint32_t i = 0; i < t->n_reqs; i++)
        t->reqs[i].next = i + 1 < t->n_reqs ? i + 1 : NVME_NONE;
    for (uint32_t i = 0; i < t->n_ops; i++)
        t->ops[i].next = i + 1 < t->n_ops ? i + 1 : NVME_NONE;
    t->free_req = 0;
    t->free_op = 0;
    t->pend_head = t->pend_tail = NVME_NONE;

    rc = open_file(t, p->direct);
    if (rc < 0)
        goto out_free;
    struct stat st;
    if (fstat(t->fd, &st) != 0) {
        rc = mr_err(MOERUN_ERR_IO, "nvme: cannot stat %s: %s", path, strerror(errno));
        goto out_close;
    }
    t->file_bytes = (uint64_t)st.st_size;

    rc = io_uring_queue_init(qd, &t->ring, 0);
    if (rc < 0) {
        if (rc == -ENOSYS || rc == -EPERM)
            rc = mr_err(MOERUN_ERR_UNSUPPORTED, "nvme: io_uring unavailable: %s", strerror(-rc));
        else
            rc = mr_err(MOERUN_ERR_IO, "nvme: io_uring_queue_init(%u) failed: %s", qd,
                        strerror(-rc));
        goto out_close;
    }
    if (io_uring_register_files(&t->ring, &t->fd, 1) == 0)
        t->fixed_file = true;
    register_region(t);

    if (pthread_mutex_init(&t->mu, NULL) != 0) {
        rc = mr_err(MOERUN_ERR_NOMEM, "nvme: pthread_mutex_init failed");
        goto out_ring;
    }
    if (pthread_cond_init(&t->cv, NULL) != 0) {
        rc = mr_err(MOERUN_ERR_NOMEM, "nvme: pthread_cond_init failed");
        goto out_mutex;
    }
    int e = pthread_create(&t->thread, NULL, completion_main, t);
    if (e != 0) {
        rc = mr_err(MOERUN_ERR_NOMEM, "nvme: cannot start the completion thread: %s", strerror(e));
        goto out_cond;
    }
    *out = t;
    return MOERUN_OK;

out_cond:
    pthread_cond_destroy(&t->cv);
out_mutex:
    pthread_mutex_destroy(&t->mu);
out_ring:
    io_uring_queue_exit(&t->ring);
out_close:
    close(t->fd);
out_free:
    mr_free(NULL, t->ops);
    mr_free(NULL, t->reqs);
    mr_free(NULL, t);
    return rc;
}

void tier_nvme_close(struct tier_nvme *t) {
    if (!t)
        return;
    pthread_mutex_lock(&t->mu);
    t->closing = true;
    while (t->active > 0)
        pthread_cond_wait(&t->cv, &t->mu);
    /* stop the thread: a NOP it recognises, queued after everything it has reaped */
    struct io_uring_sqe *sqe = io_uring_get_sqe(&t->ring);
    if (sqe) {
        io_uring_prep_nop(sqe);
        io_uring_sqe_set_data64(sqe, NVME_UD_STOP);
        ring_submit(t);
    }
    pthread_mutex_unlock(&t->mu);
    if (sqe)
        pthread_join(t->thread, NULL);
    else
        mr_log_error("nvme: no SQE to stop the completion thread of %s", t->path);
    if (t->fixed_bufs)
        io_uring_unregister_buffers(&t->ring);
    if (t->fixed_file)
        io_uring_unregister_files(&t->ring);
    io_uring_queue_exit(&t->ring);
    pthread_cond_destroy(&t->cv);
    pthread_mutex_destroy(&t->mu);
    close(t->fd);
    if (t->old_fd >= 0)
        close(t->old_fd);
    mr_free(NULL, t->ops);
    mr_free(NULL, t->reqs);
    mr_free(NULL, t);
}

/* --- submit ----------------------------------------------------------------------------------- */

static int check_read(const struct tier_nvme *t, const struct tier_read *rd, uint32_t i) {
    uint64_t dst = (uint64_t)(uintptr_t)rd->dst;
    if (rd->bytes == 0 || ((rd->offset | rd->bytes | dst) & (TIER_ALIGN - 1)) != 0)
        return mr_err(MOERUN_ERR_INVALID_ARG,
                      "nvme: read %u (%llu bytes at %llu into %p) is empty or not %u-aligned", i,
                      (unsigned long long)rd->bytes, (unsigned long long)rd->offset, rd->dst,
                      TIER_ALIGN);
    uint64_t end;
    if (mr_add_overflow_u64(rd->offset, rd->bytes, &end) || end > align_up(t->file_bytes))
        return mr_err(MOERUN_ERR_RANGE,
                      "nvme: read of %llu at %llu is past the end of %s (%llu bytes)",
                      (unsigned long long)rd->bytes, (unsigned long long)rd->offset, t->path,
                      (unsigned long long)t->file_bytes);
    if (t->region) {
        uint64_t base = (uint64_t)(uintptr_t)t->region;
        if (dst < base || dst - base > t->region_bytes ||
            rd->bytes > t->region_bytes - (dst - base))
            return mr_err(MOERUN_ERR_INVALID_ARG,
                          "nvme: read %u: destination %p + %llu is outside the region", i, rd->dst,
                          (unsigned long long)rd->bytes);
    }
    return MOERUN_OK;
}

int tier_nvme_submit(struct tier_nvme *t, const struct tier_read *reads, uint32_t n, uint64_t tag) {
    if (!t || !reads || n == 0 || n > TIER_NVME_MAX_READS)
        return mr_err(MOERUN_ERR_INVALID_ARG, "nvme: submit of %u reads (1 to %u)", n,
                      TIER_NVME_MAX_READS);
    for (uint32_t i = 0; i < n; i++) {
        int rc = check_read(t, &reads[i], i);
        if (rc < 0)
            return rc;
    }
    bool on_thread = pthread_equal(pthread_self(), t->thread) != 0;
    pthread_mutex_lock(&t->mu);
    while (!t->closing && t->free_req == NVME_NONE && !on_thread)
        pthread_cond_wait(&t->cv, &t->mu);
    if (t->closing || t->free_req == NVME_NONE) {
        bool closing = t->closing;
        pthread_mutex_unlock(&t->mu);
        return closing ? mr_err(MOERUN_ERR_INVALID_ARG, "nvme: submit while %s is closing", t->path)
                       : mr_err(MOERUN_ERR_BUDGET,
                                "nvme: all %u requests in use (submit from done())", t->n_reqs);
    }
    uint32_t ri = t->free_req;
    struct nvme_req *r = &t->reqs[ri];
    t->free_req = r->next;
    t->active++;
    r->tag = tag;
    r->n = n;
    memcpy(r->reads, reads, n * sizeof(*reads));
    r->next_read = 0;
    r->next_off = 0;
    r->ops_inflight = 0;
    r->status = MOERUN_OK;
    r->msg[0] = '\0';
    r->pending = true;
    r->next = NVME_NONE;
    if (t->pend_tail == NVME_NONE)
        t->pend_head = ri;
    else
        t->reqs[t->pend_tail].next = ri;
    t->pend_tail = ri;
    pump(t);
    pthread_mutex_unlock(&t->mu);
    return MOERUN_OK;
}

/* --- queries ---------------------------------------------------------------------------------- */

bool tier_nvme_is_direct(const struct tier_nvme *t) {
    struct tier_nvme *m = (struct tier_nvme *)t; /* the mutex is not part of the value */
    pthread_mutex_lock(&m->mu);
    bool d = m->direct;
    pthread_mutex_unlock(&m->mu);
    return d;
}

bool tier_nvme_is_fixed(const struct tier_nvme *t) {
    return t->fixed_bufs;
}

void tier_nvme_get_stats(const struct tier_nvme *t, struct tier_nvme_stats *out) {
    struct tier_nvme *m = (struct tier_nvme *)t;
    pthread_mutex_lock(&m->mu);
    *out = m->stats;
    out->sqes = m->sqe_count;
    if (m->inflight > 0)
        out->busy_ns += now_ns() - m->busy_since;
    pthread_mutex_unlock(&m->mu);
}

void tier_nvme_set_fault(struct tier_nvme *t, uint64_t nth, enum tier_fault_kind kind,
                         uint64_t short_bytes) {
    pthread_mutex_lock(&t->mu);
    t->fault_nth = nth;
    t->fault_kind = kind;
    t->fault_short = short_bytes;
    pthread_mutex_unlock(&t->mu);
}
