/* CUDA backend: device discovery. Exits 77 (skip) where there is no device. */
#include "testutil.h"

#include "cuda_backend.h"
#include "moerun.h"

#include <stdio.h>

static void test_describe_each_device(void **state) {
    (void)state;
    int n = 0;
    assert_int_equal(cuda_device_count(&n), MOERUN_OK);
    for (int i = 0; i < n; i++) {
        char name[256];
        unsigned long long mem = 0;
        assert_int_equal(cuda_device_describe(i, name, sizeof(name), &mem), MOERUN_OK);
        assert_true(mem > 0);
        assert_true(name[0] != '\0');
    }
    /* a device index past the end is an error with a message, not a crash */
    char name[64];
    assert_int_equal(cuda_device_describe(n, name, sizeof(name), NULL), MOERUN_ERR_BACKEND);
    assert_true(moerun_errmsg()[0] != '\0');
}

int main(void) {
    int n = 0;
    if (cuda_device_count(&n) != MOERUN_OK || n == 0) {
        fprintf(stderr, "no CUDA device: skipping (%s)\n", moerun_errmsg());
        return TU_SKIP;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_describe_each_device),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
