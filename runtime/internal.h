/* Internal helpers shared by every module: errors, logging, allocation, assertions. */
#ifndef MOERUN_INTERNAL_H
#define MOERUN_INTERNAL_H

#include "moerun.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define MR_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define MR_PRINTF(f, a)
#endif

/* Set the calling thread's error message and return status, so that error paths read
 *     return mr_err(MOERUN_ERR_FORMAT, "gguf: key '%s' at offset %llu: ...", ...);
 * The message is prefixed with nothing: name the module and the object in the text. */
int mr_err(int status, const char *fmt, ...) MR_PRINTF(2, 3);
int mr_verr(int status, const char *fmt, va_list ap);

/* Convert an errno value where it enters the library, naming the operation and file:line. */
#define mr_err_errno(e, what) mr_err_errno_at((e), (what), __FILE__, __LINE__)
int mr_err_errno_at(int e, const char *what, const char *file, int line);

/* Clear the calling thread's message (at the start of public entry points). */
void mr_err_clear(void);

/* Logging through the user's callback. */
void mr_log(moerun_log_level level, const char *fmt, ...) MR_PRINTF(2, 3);
#define mr_log_error(...) mr_log(MOERUN_LOG_ERROR, __VA_ARGS__)
#define mr_log_warn(...)  mr_log(MOERUN_LOG_WARN, __VA_ARGS__)
#define mr_log_info(...)  mr_log(MOERUN_LOG_INFO, __VA_ARGS__)
#define mr_log_debug(...) mr_log(MOERUN_LOG_DEBUG, __VA_ARGS__)

/* Allocation through the caller's allocator (NULL = system). mr_alloc returns memory aligned
 * to align (power of two, 0 = alignof(max_align_t)); sizes that overflow return NULL. */
void *mr_alloc(const moerun_allocator *a, size_t size, size_t align);
void *mr_calloc(const moerun_allocator *a, size_t n, size_t size);
void mr_free(const moerun_allocator *a, void *ptr);

/* Overflow-checked arithmetic: true when the result does not fit. */
static inline bool mr_mul_overflow_u64(uint64_t a, uint64_t b, uint64_t *out) {
    return __builtin_mul_overflow(a, b, out);
}
static inline bool mr_add_overflow_u64(uint64_t a, uint64_t b, uint64_t *out) {
    return __builtin_add_overflow(a, b, out);
}

/* Internal invariants only, never user input: logs and returns MOERUN_ERR_INTERNAL from the
 * enclosing function (which must return int). */
#define MOERUN_ASSERT(cond)                                                                        \
    do {                                                                                           \
        if (!(cond))                                                                               \
            return mr_err(MOERUN_ERR_INTERNAL, "internal error: %s failed at %s:%d", #cond,        \
                          __FILE__, __LINE__);                                                     \
    } while (0)

/* Lay a caller's params struct over defaults (both start with size_t struct_size): a caller
 * built against an older header passes a smaller struct, and the fields it lacks keep their
 * defaults. given may be NULL (defaults). Returns MOERUN_OK, or MOERUN_ERR_INVALID_ARG naming
 * what (e.g. "moerun_model_open") when struct_size was never set. */
int mr_params_merge(void *defaults, size_t size, const void *given, const char *what);

#define MR_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define MR_MIN(a, b)    ((a) < (b) ? (a) : (b))
#define MR_MAX(a, b)    ((a) > (b) ? (a) : (b))

#endif /* MOERUN_INTERNAL_H */
