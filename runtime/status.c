/* Status strings, per-thread error messages, logging and allocation. */
#include "internal.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MR_ERRMSG_SIZE 512

static _Thread_local char tls_errmsg[MR_ERRMSG_SIZE];

const char *moerun_status_str(int status) {
    switch (status) {
#define MOERUN_STATUS_CASE(name, value, text)                                                      \
    case (value):                                                                                  \
        return text;
        MOERUN_STATUS_LIST(MOERUN_STATUS_CASE)
#undef MOERUN_STATUS_CASE
    }
    return "unknown status";
}

const char *moerun_errmsg(void) {
    return tls_errmsg;
}

const char *moerun_version(void) {
#define MR_STR2(x) #x
#define MR_STR(x)  MR_STR2(x)
    return MR_STR(MOERUN_VERSION_MAJOR) "." MR_STR(MOERUN_VERSION_MINOR) "." MR_STR(
        MOERUN_VERSION_PATCH);
}

int mr_verr(int status, const char *fmt, va_list ap) {
    vsnprintf(tls_errmsg, sizeof(tls_errmsg), fmt, ap);
    return status;
}

int mr_err(int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    mr_verr(status, fmt, ap);
    va_end(ap);
    return status;
}

int mr_err_errno_at(int e, const char *what, const char *file, int line) {
    int status = MOERUN_ERR_IO;
    if (e == ENOMEM)
        status = MOERUN_ERR_NOMEM;
    else if (e == EINVAL)
        status = MOERUN_ERR_INVALID_ARG;
    char buf[128];
    /* GNU strerror_r may return a static string instead of filling buf */
    const char *text = strerror_r(e, buf, sizeof(buf));
    return mr_err(status, "%s: %s (errno %d, %s:%d)", what, text, e, file, line);
}

void mr_err_clear(void) {
    tls_errmsg[0] = '\0';
}

/* --- logging ------------------------------------------------------------------------------- */

struct log_sink {
    moerun_log_fn fn;
    void *user_data;
};

static _Atomic(struct log_sink *) log_sink_cur;
static struct log_sink log_sinks[2];
static atomic_int log_sink_next;
static atomic_int log_max_level = MOERUN_LOG_INFO;

void moerun_log_set(moerun_log_fn fn, void *user_data) {
    /* two sinks alternate, so a reader never sees a half-written pair */
    int i = atomic_fetch_add(&log_sink_next, 1) & 1;
    log_sinks[i].fn = fn;
    log_sinks[i].user_data = user_data;
    atomic_store(&log_sink_cur, fn ? &log_sinks[i] : NULL);
}

void moerun_log_set_level(moerun_log_level max_level) {
    atomic_store(&log_max_level, (int)max_level);
}

static const char *log_level_name(moerun_log_level level) {
    switch (level) {
    case MOERUN_LOG_ERROR:
        return "error";
    case MOERUN_LOG_WARN:
        return "warning";
    case MOERUN_LOG_INFO:
        return "info";
    case MOERUN_LOG_DEBUG:
        return "debug";
    }
    return "log";
}

void mr_log(moerun_log_level level, const char *fmt, ...) {
    if ((int)level > atomic_load(&log_max_level))
        return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    struct log_sink *sink = atomic_load(&log_sink_cur);
    if (sink) {
        sink->fn(level, msg, sink->user_data);
    } else if (level <= MOERUN_LOG_WARN) {
        fprintf(stderr, "moerun %s: %s\n", log_level_name(level), msg);
    }
}

int mr_params_merge(void *defaults, size_t size, const void *given, const char *what) {
    if (!given)
        return MOERUN_OK;
    size_t given_size;
    memcpy(&given_size, given, sizeof(given_size));
    if (given_size < sizeof(size_t))
        return mr_err(MOERUN_ERR_INVALID_ARG, "%s: params not initialised (struct_size is %zu)",
                      what, given_size);
    memcpy(defaults, given, given_size < size ? given_size : size);
    memcpy(defaults, &size, sizeof(size)); /* struct_size: this library's */
    return MOERUN_OK;
}

/* --- allocation ----------------------------------------------------------------------------- */

void *mr_alloc(const moerun_allocator *a, size_t size, size_t align) {
    if (align < sizeof(void *))
        align = sizeof(void *) * 2;
    if (size == 0)
        size = 1;
    if (a && a->alloc)
        return a->alloc(size, align, a->user_data);
    void *p = NULL;
    if (posix_memalign(&p, align, size) != 0)
        return NULL;
    return p;
}

void *mr_calloc(const moerun_allocator *a, size_t n, size_t size) {
    size_t total;
    if (__builtin_mul_overflow(n, size, &total))
        return NULL;
    void *p = mr_alloc(a, total, 0);
    if (p)
        memset(p, 0, total);
    return p;
}

void mr_free(const moerun_allocator *a, void *ptr) {
    if (a && a->free)
        a->free(ptr, a->user_data);
    else
        free(ptr);
}
