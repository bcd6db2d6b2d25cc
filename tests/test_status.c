/* Status codes, per-thread messages, logging, the type table. */
#include "testutil.h"

#include "internal.h"
#include "types.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

static void test_status_strings(void **state) {
    (void)state;
    int seen = 0;
#define CHECK_STATUS(name, value, text)                                                            \
    assert_string_equal(moerun_status_str(MOERUN_##name), text);                                   \
    assert_true(MOERUN_##name <= 0);                                                               \
    seen++;
    MOERUN_STATUS_LIST(CHECK_STATUS)
#undef CHECK_STATUS
    assert_true(seen >= 10);
    assert_int_equal(MOERUN_OK, 0);
    assert_string_equal(moerun_status_str(12345), "unknown status");
    assert_string_equal(moerun_status_str(-12345), "unknown status");
}

static void *set_other_thread_error(void *arg) {
    (void)arg;
    mr_err(MOERUN_ERR_IO, "message from another thread");
    return NULL;
}

static void test_errmsg_per_thread(void **state) {
    (void)state;
    mr_err_clear();
    assert_string_equal(moerun_errmsg(), "");
    assert_int_equal(mr_err(MOERUN_ERR_FORMAT, "key '%s' at offset %d", "a.b", 42),
                     MOERUN_ERR_FORMAT);
    assert_string_equal(moerun_errmsg(), "key 'a.b' at offset 42");
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, set_other_thread_error, NULL), 0);
    pthread_join(th, NULL);
    assert_string_equal(moerun_errmsg(), "key 'a.b' at offset 42");
    /* errno conversion names the operation and the place */
    assert_int_equal(mr_err_errno(2, "open x"), MOERUN_ERR_IO);
    assert_non_null(strstr(moerun_errmsg(), "open x"));
    assert_non_null(strstr(moerun_errmsg(), "test_status.c"));
    /* long messages are truncated, not overflowed */
    char big[2000];
    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    mr_err(MOERUN_ERR_INTERNAL, "%s", big);
    assert_true(strlen(moerun_errmsg()) < sizeof(big) - 1);
}

struct log_capture {
    int n;
    moerun_log_level last_level;
    char last[256];
};

static void capture(moerun_log_level level, const char *msg, void *user_data) {
    struct log_capture *c = user_data;
    c->n++;
    c->last_level = level;
    snprintf(c->last, sizeof(c->last), "%s", msg);
}

static void test_log_callback_and_level(void **state) {
    (void)state;
    struct log_capture c = {0};
    moerun_log_set(capture, &c);
    moerun_log_set_level(MOERUN_LOG_INFO);
    mr_log_warn("disk %d is slow", 3);
    assert_int_equal(c.n, 1);
    assert_int_equal(c.last_level, MOERUN_LOG_WARN);
    assert_string_equal(c.last, "disk 3 is slow");
    mr_log_debug("dropped");
    assert_int_equal(c.n, 1);
    moerun_log_set_level(MOERUN_LOG_DEBUG);
    mr_log_debug("kept");
    assert_int_equal(c.n, 2);
    moerun_log_set(NULL, NULL);
    mr_log_info("to the default sink (info is not printed)");
    assert_int_equal(c.n, 2);
    moerun_log_set_level(MOERUN_LOG_INFO);
}

static void test_type_table(void **state) {
    (void)state;
    static const struct {
        int type;
        const char *name;
        uint32_t blck, size;
    } want[] = {
        {MOERUN_TYPE_F32, "F32", 1, 4},       {MOERUN_TYPE_F16, "F16", 1, 2},
        {MOERUN_TYPE_BF16, "BF16", 1, 2},     {MOERUN_TYPE_Q8_0, "Q8_0", 32, 34},
        {MOERUN_TYPE_Q4_0, "Q4_0", 32, 18},   {MOERUN_TYPE_Q4_K, "Q4_K", 256, 144},
        {MOERUN_TYPE_Q5_K, "Q5_K", 256, 176}, {MOERUN_TYPE_Q6_K, "Q6_K", 256, 210},
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(want); i++) {
        const struct mr_type_info *t = mr_type_info(want[i].type);
        assert_non_null(t);
        assert_string_equal(t->name, want[i].name);
        assert_int_equal(t->blck, want[i].blck);
        assert_int_equal(t->type_size, want[i].size);
        assert_true(moerun_type_is_supported(want[i].type));
        assert_int_equal(moerun_type_from_name(want[i].name), want[i].type);
    }
    assert_int_equal(moerun_type_from_name("q4_k"), MOERUN_TYPE_Q4_K);
    assert_true(moerun_type_from_name("Q9_9") < 0);
    assert_null(mr_type_info(-1));
    assert_null(mr_type_info(4)); /* retired Q4_2 */
    assert_null(mr_type_info(MR_TYPE_COUNT));
    assert_null(moerun_type_name(1000));
    assert_false(moerun_type_is_supported(MOERUN_TYPE_Q8_K));
    uint64_t bytes;
    assert_true(mr_type_nbytes(MOERUN_TYPE_Q4_K, 512, &bytes));
    assert_int_equal(bytes, 288);
    assert_false(mr_type_nbytes(MOERUN_TYPE_Q4_K, 100, &bytes));
    assert_false(mr_type_nbytes(MOERUN_TYPE_F32, UINT64_MAX / 2, &bytes));
}

static void test_allocator(void **state) {
    (void)state;
    void *p = mr_alloc(NULL, 1000, 4096);
    assert_non_null(p);
    assert_int_equal((uintptr_t)p % 4096, 0);
    mr_free(NULL, p);
    assert_null(mr_calloc(NULL, SIZE_MAX / 2, 4));
    mr_free(NULL, NULL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_status_strings),
        cmocka_unit_test(test_errmsg_per_thread),
        cmocka_unit_test(test_log_callback_and_level),
        cmocka_unit_test(test_type_table),
        cmocka_unit_test(test_allocator),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
