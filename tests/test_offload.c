/* Offloading end to end: logits are bit-identical between a fully resident run and runs
 * through the tiers at any budget down to the minimum, for every policy, with prefetch on, off
 * and auto; a failed read fails the call and leaves the model usable; a model larger than the
 * process's address-space limit runs within its budget. */
#include "testutil.h"

#include "moerun.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#define N_PROMPT 9
#define N_STEPS  4

/* Prompt logits [N_PROMPT][n_vocab] then N_STEPS greedy steps' logits, for one configuration.
 * Returns the logits, or NULL when the model does not open (*rc_out says why). */
static int use_mmap; /* run() maps the file instead (no budget) */

static float *run(const char *path, uint64_t host_bytes, int policy, int prefetch, uint32_t n_batch,
                  uint32_t *n_vocab, int *rc_out) {
    moerun_model_params mp;
    moerun_model_params_init(&mp);
    mp.host_bytes = host_bytes;
    mp.use_mmap = use_mmap;
    mp.policy = policy;
    mp.prefetch = prefetch;
    mp.n_threads = 2;
    moerun_model *m = NULL;
    int rc = moerun_model_open(path, &mp, &m);
    if (rc_out)
        *rc_out = rc;
    if (rc != MOERUN_OK)
        return NULL;
    *n_vocab = moerun_model_n_vocab(m);
    moerun_model_info info = {.struct_size = sizeof(info)};
    assert_int_equal(moerun_model_get_info(m, &info), MOERUN_OK);
    const uint32_t k_used = info.n_expert_used;
    const size_t nv = *n_vocab;
    float *out = malloc((N_PROMPT + N_STEPS) * nv * sizeof(float));
    assert_non_null(out);
    moerun_session_params sp;
    moerun_session_params_init(&sp);
    sp.n_batch = n_batch;
    moerun_session *s = NULL;
    assert_int_equal(moerun_session_create(m, &sp, &s), MOERUN_OK);
    int32_t prompt[N_PROMPT];
    for (int i = 0; i < N_PROMPT; i++)
        prompt[i] = (int32_t)((i * 37 + 11) % nv);
    if (moerun_session_decode(s, prompt, N_PROMPT, out, 1) != MOERUN_OK)
        fail_msg("decode: %s", moerun_errmsg());
    uint64_t prompt_read = 0;
    if (host_bytes) { /* a reset starts the counters again (loads in flight may still add) */
        moerun_stats st = {.struct_size = sizeof(st)};
        assert_int_equal(moerun_model_get_stats(m, &st), MOERUN_OK);
        prompt_read = st.nvme_bytes_read;
        assert_true(prompt_read > 0);
        moerun_model_reset_stats(m);
        assert_int_equal(moerun_model_get_stats(m, &st), MOERUN_OK);
        assert_int_equal(st.expert_hits + st.expert_misses, 0);
        assert_true(st.nvme_bytes_read < prompt_read);
    }
    for (int step = 0; step < N_STEPS; step++) {
        const float *last = out + (N_PROMPT - 1 + step) * nv;
        int32_t best = 0;
        for (size_t j = 1; j < nv; j++)
            if (last[j] > last[best])
                best = (int32_t)j;
        assert_int_equal(moerun_session_decode(s, &best, 1, out + (N_PROMPT + step) * nv, 0),
                         MOERUN_OK);
    }
    if (host_bytes) {
        moerun_stats st = {.struct_size = sizeof(st)};
        assert_int_equal(moerun_model_get_stats(m, &st), MOERUN_OK);
        assert_int_equal(st.expert_hits + st.expert_misses,
                         N_STEPS * st.n_layer * (uint64_t)k_used);
        uint64_t hits = 0, misses = 0;
        for (uint32_t l = 0; l < st.n_layer; l++) {
            hits += st.layer_hits[l];
            misses += st.layer_misses[l];
        }
        assert_int_equal(hits, st.expert_hits);
        assert_int_equal(misses, st.expert_misses);
        assert_true(st.prediction_precision >= 0 && st.prediction_precision <= 1);
        assert_true(st.prediction_recall >= 0 && st.prediction_recall <= 1);
    }
    moerun_session_destroy(s);
    moerun_model_close(m);
    return out;
}

/* The least budget that opens: the library says it in the error below it. */
static uint64_t min_budget(const char *path) {
    uint32_t nv;
    int rc;
    assert_null(run(path, 4096, MOERUN_POLICY_LRU, 1, 0, &nv, &rc));
    assert_int_equal(rc, MOERUN_ERR_BUDGET);
    const char *msg = moerun_errmsg();
    const char *at = strstr(msg, "minimum for this model, ");
    assert_non_null(at);
    return strtoull(at + strlen("minimum for this model, "), NULL, 10);
}

static void check_invariant(const char *path, const char *what) {
    uint32_t nv = 0;
    float *ref = run(path, 0, MOERUN_POLICY_LRU, 1, 0, &nv, NULL);
    assert_non_null(ref);
    const size_t bytes = (N_PROMPT + N_STEPS) * (size_t)nv * sizeof(float);
    use_mmap = 1; /* the page-cache baseline computes the same */
    float *mapped = run(path, 0, MOERUN_POLICY_LRU, 1, 0, &nv, NULL);
    use_mmap = 0;
    assert_non_null(mapped);
    assert_memory_equal(mapped, ref, bytes);
    free(mapped);
    const uint64_t lo = min_budget(path);
    uint32_t nv_bad;
    int rc_bad;
    assert_null(run(path, lo, 7, 1, 0, &nv_bad, &rc_bad)); /* an unknown policy */
    assert_int_equal(rc_bad, MOERUN_ERR_INVALID_ARG);
    assert_null(run(path, lo, MOERUN_POLICY_LRU, 3, 0, &nv_bad, &rc_bad)); /* a prefetch mode */
    assert_int_equal(rc_bad, MOERUN_ERR_INVALID_ARG);
    const uint64_t budgets[] = {lo, lo + lo / 3, 4 * lo, 64ull << 20};
    int runs = 0;
    for (size_t b = 0; b < sizeof(budgets) / sizeof(budgets[0]); b++) {
        for (int policy = MOERUN_POLICY_LRU; policy <= MOERUN_POLICY_PREDICTED; policy++) {
            for (int prefetch = MOERUN_PREFETCH_OFF; prefetch <= MOERUN_PREFETCH_AUTO; prefetch++) {
                uint32_t nv2;
                int rc;
                const uint32_t n_batch = (uint32_t)(runs % 3 == 0 ? 4 : 0);
                float *out = run(path, budgets[b], policy, prefetch, n_batch, &nv2, &rc);
                if (!out)
                    fail_msg("%s: budget %llu: %s", what, (unsigned long long)budgets[b],
                             moerun_errmsg());
                if (memcmp(out, ref, bytes) != 0)
                    fail_msg("%s: logits differ with budget %llu, policy %d, prefetch %d", what,
                             (unsigned long long)budgets[b], policy, prefetch);
                free(out);
                runs++;
            }
        }
    }
    fprintf(stderr, "%s: %d tiered runs bit-identical (minimum budget %llu bytes)\n", what, runs,
            (unsigned long long)lo);
    free(ref);
}

static void test_invariant_synth(void **state) {
    (void)state;
    static const char *const archs[] = {"mixtral", "qwen2moe", "qwen3moe", "olmoe"};
    static const int types[] = {MOERUN_TYPE_Q8_0, MOERUN_TYPE_F16, MOERUN_TYPE_Q4_K,
                                MOERUN_TYPE_F32};
    for (size_t i = 0; i < 4; i++) {
        moerun_synth_params p;
        moerun_synth_params_init(&p);
        p.arch = archs[i];
        p.weight_type = types[i];
        p.seed = tu_seed() + i;
        p.n_vocab = 600;
        p.n_embd = 256;
        p.n_ff = 256;
        p.n_layer = 3;
        p.n_head = 4;
        p.n_head_kv = 2;
        p.n_expert = 8;
        p.n_expert_used = i == 2 ? 4 : 2;
        char *path = strdup(tu_tmp_path(".gguf"));
        assert_int_equal(moerun_synth_write(&p, path), MOERUN_OK);
        char what[64];
        snprintf(what, sizeof(what), "%s %s", archs[i], moerun_type_name(types[i]));
        check_invariant(path, what);
        unlink(path);
        free(path);
    }
}

static void test_invariant_golden(void **state) {
    (void)state;
    static const char *const cases[] = {"mixtral-f32", "mixtral-q4_k", "qwen2moe-f32", "olmoe-f32",
                                        "tinymix-f16"};
    if (!tu_shared_path("golden/MANIFEST.tsv"))
        skip();
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char rel[128];
        snprintf(rel, sizeof(rel), "golden/%s.gguf", cases[i]);
        const char *path = tu_shared_path(rel);
        assert_non_null(path);
        char *copy = strdup(path);
        check_invariant(copy, cases[i]);
        free(copy);
    }
}

/* A read that fails (the file cut short under the open model) fails that decode call; once the
 * file is whole again the same session goes on and gives the resident logits. */
static void test_io_error_recovers(void **state) {
    (void)state;
    moerun_synth_params p;
    moerun_synth_params_init(&p);
    p.seed = tu_seed();
    p.n_vocab = 400;
    p.n_embd = 256;
    p.n_ff = 512;
    p.n_layer = 2;
    p.n_head = 4;
    p.n_head_kv = 2;
    char *path = strdup(tu_tmp_path(".gguf"));
    assert_int_equal(moerun_synth_write(&p, path), MOERUN_OK);
    size_t size;
    void *whole = tu_read_file(path, &size);
    assert_non_null(whole);

    uint32_t nv;
    float *ref = run(path, 0, MOERUN_POLICY_LRU, 1, 0, &nv, NULL);
    moerun_model_params mp;
    moerun_model_params_init(&mp);
    mp.host_bytes = min_budget(path);
    moerun_model *m = NULL;
    assert_int_equal(moerun_model_open(path, &mp, &m), MOERUN_OK);
    moerun_session *s = NULL;
    assert_int_equal(moerun_session_create(m, NULL, &s), MOERUN_OK);
    assert_int_equal(truncate(path, (off_t)(size / 2)), 0);
    int32_t prompt[N_PROMPT];
    for (int i = 0; i < N_PROMPT; i++)
        prompt[i] = (int32_t)((i * 37 + 11) % nv);
    float *out = malloc(N_PROMPT * (size_t)nv * sizeof(float));
    int rc = moerun_session_decode(s, prompt, N_PROMPT, out, 1);
    fprintf(stderr, "expected I/O error: %s (%s)\n", moerun_errmsg(), moerun_status_str(rc));
    assert_true(rc < 0);
    assert_true(moerun_errmsg()[0] != '\0');
    assert_int_equal(moerun_session_n_past(s), 0);

    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(whole, 1, size, f), size);
    assert_int_equal(fclose(f), 0);
    rc = moerun_session_decode(s, prompt, N_PROMPT, out, 1);
    if (rc != MOERUN_OK)
        fail_msg("after the file is whole again: %s", moerun_errmsg());
    assert_memory_equal(out, ref, N_PROMPT * (size_t)nv * sizeof(float));
    moerun_session_destroy(s);
    moerun_model_close(m);
    free(out);
    free(ref);
    free(whole);
    unlink(path);
    free(path);
}

/* moe-run --trace-out: a line per token and layer, in the documented format. */
static void test_trace_out(void **state) {
    (void)state;
    const char *moe_run = getenv("MOE_RUN");
    if (!moe_run)
        skip();
    moerun_synth_params p;
    moerun_synth_params_init(&p);
    p.seed = tu_seed();
    p.n_layer = 3;
    char *path = strdup(tu_tmp_path(".gguf")), *trace = strdup(tu_tmp_path(".jsonl"));
    assert_int_equal(moerun_synth_write(&p, path), MOERUN_OK);
    char cmd[4096];
    snprintf(cmd, sizeof(cmd),
             "%s -m %s --tokens 1,2,3,4 -n 3 --temp 0 --host-mem 8M --trace-out %s "
             ">/dev/null 2>&1",
             moe_run, path, trace);
    int st = system(cmd);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    FILE *f = fopen(trace, "r");
    assert_non_null(f);
    char line[512];
    int n = 0;
    while (fgets(line, sizeof(line), f)) {
        unsigned tok, layer;
        int e0, e1;
        float w0, w1;
        if (sscanf(line, "{\"token\":%u,\"layer\":%u,\"experts\":[%d,%d],\"weights\":[%g,%g]}",
                   &tok, &layer, &e0, &e1, &w0, &w1) != 6)
            fail_msg("bad trace line: %s", line);
        assert_int_equal(layer, (unsigned)n % p.n_layer); /* token-major */
        assert_int_equal(tok, (unsigned)n / p.n_layer);
        assert_true(e0 != e1 && e0 >= 0 && e1 >= 0 && (uint32_t)e0 < p.n_expert);
        assert_true(w0 >= w1 && w0 + w1 > 0.999f && w0 + w1 < 1.001f); /* renormalised */
        n++;
    }
    fclose(f);
    /* 4 prompt tokens and the 3 generated ones, each evaluated once */
    assert_int_equal(n, (4 + 3) * (int)p.n_layer);
    unlink(trace);
    unlink(path);
    free(trace);
    free(path);
}

/* A model larger than the address space the process may use runs with --host-mem. */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define TU_SANITIZED 1 /* the sanitizers reserve terabytes of address space */
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define TU_SANITIZED 1
#endif
#endif

static void test_larger_than_address_limit(void **state) {
    (void)state;
    const char *moe_run = getenv("MOE_RUN");
#ifdef TU_SANITIZED
    fprintf(stderr, "sanitizer build: an address-space limit cannot apply; skipped\n");
    skip();
#endif
    if (!moe_run)
        skip();
    moerun_synth_params p;
    moerun_synth_params_init(&p);
    p.seed = tu_seed();
    p.weight_type = MOERUN_TYPE_F16;
    p.n_vocab = 1000;
    p.n_embd = 512;
    p.n_ff = 1536;
    p.n_layer = 6;
    p.n_expert = 16; /* ~450 MiB of experts */
    char *path = strdup(tu_tmp_path(".gguf"));
    assert_int_equal(moerun_synth_write(&p, path), MOERUN_OK);
    size_t size;
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    size = (size_t)ftell(f);
    fclose(f);
    const rlim_t limit = (rlim_t)(size * 3 / 4); /* less than the model */
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        struct rlimit rl = {limit, limit};
        if (setrlimit(RLIMIT_AS, &rl) != 0)
            _exit(90);
        int fd = open("/dev/null", O_WRONLY);
        if (fd >= 0)
            dup2(fd, 1);
        execl(moe_run, moe_run, "-m", path, "--tokens", "1,2,3,4", "-n", "4", "--temp", "0", "-t",
              "2", "--host-mem", "64M", (char *)NULL);
        _exit(91);
    }
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    fprintf(stderr, "model %.0f MiB, address space limit %.0f MiB: exit %d\n", size / 1048576.0,
            limit / 1048576.0, WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    /* and without the budget it cannot fit: the same limit makes the resident load fail */
    pid = fork();
    if (pid == 0) {
        struct rlimit rl = {limit, limit};
        setrlimit(RLIMIT_AS, &rl);
        int fd = open("/dev/null", O_WRONLY);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        execl(moe_run, moe_run, "-m", path, "--tokens", "1,2", "-n", "1", (char *)NULL);
        _exit(91);
    }
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 1);
    unlink(path);
    free(path);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_invariant_synth),           cmocka_unit_test(test_invariant_golden),
        cmocka_unit_test(test_io_error_recovers),         cmocka_unit_test(test_trace_out),
        cmocka_unit_test(test_larger_than_address_limit),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
