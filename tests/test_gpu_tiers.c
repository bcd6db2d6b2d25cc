/* The GPU path end to end: weights through NVMe -> pinned host -> GPU tier, on the device named
 * by MOERUN_TEST_DEVICE (sim, the default: the CPU computing as a GPU, so this runs in CI; or
 * cuda: exits 77 without a device). Offloading never changes results: logits are bit-identical
 * for every GPU and host budget down to the minimum, every policy, prefetch on, off or auto, and
 * any batch split (on cuda: per batch size, as its products' kernels depend on the columns in
 * the call); on sim they are also bit-identical to the CPU's (same ops). Besides: the golden
 * cases match the CPU's logits within the golden tolerances, and the synthetic ones the float64
 * reference (ref_forward.c) as test_forward holds them. A failed upload fails that call and the
 * session goes on. */
#include "testutil.h"

#include "device.h"
#include "model.h"
#include "moerun.h"
#include "offload_impl.h"
#include "ref_forward.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define N_PROMPT 9
#define N_STEPS  4
#define N_CTX    64

static int device = MOERUN_DEVICE_SIM;

struct cfg {
    int device;
    uint64_t gpu_bytes, host_bytes;
    int policy, prefetch;
    uint32_t n_batch; /* 0 = 16 */
};

static int open_model(const char *path, const struct cfg *c, moerun_model **m) {
    moerun_model_params mp;
    moerun_model_params_init(&mp);
    mp.device = c->device;
    mp.gpu_bytes = c->gpu_bytes;
    mp.host_bytes = c->host_bytes;
    mp.policy = c->policy;
    mp.prefetch = c->prefetch;
    mp.gpu_ctx = N_CTX; /* a small reservation for the sessions: small budgets work */
    mp.gpu_batch = 16;
    mp.n_threads = 2;
    return moerun_model_open(path, &mp, m);
}

static moerun_session *open_session(moerun_model *m, uint32_t n_batch) {
    moerun_session_params sp;
    moerun_session_params_init(&sp);
    sp.n_ctx = N_CTX;
    sp.n_batch = n_batch ? n_batch : 16;
    moerun_session *s = NULL;
    if (moerun_session_create(m, &sp, &s) != MOERUN_OK)
        fail_msg("session: %s", moerun_errmsg());
    return s;
}

static void prompt_of(int32_t *prompt, uint32_t nv) {
    for (int i = 0; i < N_PROMPT; i++)
        prompt[i] = (int32_t)((i * 37 + 11) % nv);
}

/* Prompt logits [N_PROMPT][n_vocab] then N_STEPS greedy steps' logits, the tokens they follow
 * into tokens[N_PROMPT + N_STEPS] when not NULL; NULL when the model does not open (*rc_out says
 * why). */
static float *run_tokens(const char *path, const struct cfg *c, uint32_t *n_vocab, int *rc_out,
                         int32_t *tokens) {
    moerun_model *m = NULL;
    int rc = open_model(path, c, &m);
    if (rc_out)
        *rc_out = rc;
    if (rc != MOERUN_OK)
        return NULL;
    const size_t nv = *n_vocab = moerun_model_n_vocab(m);
    moerun_model_info info = {.struct_size = sizeof(info)};
    assert_int_equal(moerun_model_get_info(m, &info), MOERUN_OK);
    float *out = malloc((N_PROMPT + N_STEPS) * nv * sizeof(float));
    assert_non_null(out);
    moerun_session *s = open_session(m, c->n_batch);
    int32_t prompt[N_PROMPT];
    prompt_of(prompt, (uint32_t)nv);
    if (moerun_session_decode(s, prompt, N_PROMPT, out, 1) != MOERUN_OK)
        fail_msg("decode: %s", moerun_errmsg());
    const int tiered = c->device != MOERUN_DEVICE_CPU || c->host_bytes;
    moerun_stats st = {.struct_size = sizeof(st)};
    if (tiered) {
        assert_int_equal(moerun_model_get_stats(m, &st), MOERUN_OK);
        if (c->device != MOERUN_DEVICE_CPU) {
            assert_true(st.gpu_bytes > 0);
            assert_true(st.gpu_bytes_copied > 0); /* every weight went up once at least */
            assert_true(st.host_hits + st.host_misses > 0);
        }
        moerun_model_reset_stats(m);
    }
    for (int step = 0; step < N_STEPS; step++) {
        const float *last = out + (N_PROMPT - 1 + step) * nv;
        int32_t best = 0;
        for (size_t j = 1; j < nv; j++)
            if (last[j] > last[best])
                best = (int32_t)j;
        assert_int_equal(moerun_session_decode(s, &best, 1, out + (N_PROMPT + step) * nv, 0),
                         MOERUN_OK);
        if (tokens)
            tokens[N_PROMPT + step] = best;
    }
    if (tokens)
        memcpy(tokens, prompt, sizeof(prompt));
    if (tiered) {
        assert_int_equal(moerun_model_get_stats(m, &st), MOERUN_OK);
        assert_int_equal(st.expert_hits + st.expert_misses,
                         N_STEPS * st.n_layer * (uint64_t)info.n_expert_used);
    }
    moerun_session_destroy(s);
    moerun_model_close(m);
    return out;
}

static float *run(const char *path, const struct cfg *c, uint32_t *n_vocab, int *rc_out) {
    return run_tokens(path, c, n_vocab, rc_out, NULL);
}

/* The minimum a budget error names after `after`. */
static uint64_t named_minimum(const char *after) {
    const char *at = strstr(moerun_errmsg(), after);
    if (!at)
        fail_msg("the error '%s' does not name the minimum", moerun_errmsg());
    return strtoull(at + strlen(after), NULL, 10);
}

/* A synthetic case's all-on-GPU logits against the float64 reference on the tokens they
 * follow, rounded as the device rounds (sim as the CPU, cuda not at all; ref_forward.h), held to
 * test_forward's bounds; a routing nearer a tie than its gap that misses is reported, not
 * failed (test_forward chooses prompts away from ties: accuracy is its subject, the tiers are
 * this one's). */
static void check_vs_reference(const char *path, const char *what, int type, const int32_t *tokens,
                               const float *out, size_t nv) {
    const size_t n = N_PROMPT + N_STEPS;
    const int f32 = type == MOERUN_TYPE_F32, cuda = device == MOERUN_DEVICE_CUDA;
    const double tol = f32 ? REF_F32_TOL : cuda ? REF_CUDA_QUANT_TOL : REF_QUANT_TOL;
    const double want_gap = f32 ? REF_GAP_F32 : REF_GAP_QUANT;
    double *ref = malloc(n * nv * sizeof(double)), gap = 0;
    assert_non_null(ref);
    assert_int_equal(ref_n_vocab(path), nv);
    assert_int_equal(ref_forward_gap(path, tokens, n, !f32 && !cuda, ref, &gap), 0);
    const double err = tu_max_rel_l2(out, ref, n, nv);
    fprintf(stderr, "%s: %.2e from the float64 reference (router gap %.1e)\n", what, err, gap);
    if (!(err <= tol) && gap < want_gap)
        fprintf(stderr, "  routing within %.1e of a tie: not held to %.0e\n", gap, tol);
    else if (!(err <= tol))
        fail_msg("%s: the GPU's logits are %.3e from the reference (tolerance %.0e)", what, err,
                 tol);
    free(ref);
}

/* What a case's all-on-GPU logits are held to besides the tiers' invariant: on sim, the CPU's
 * bit for bit; on cuda, the CPU's within cpu_tol (golden cases); and the float64 reference for
 * a synthetic case of weight type synth_type (-1: none). */
struct held_to {
    double cpu_tol;
    int synth_type;
};

static void check_invariant(const char *path, const char *what, struct held_to h) {
    uint32_t nv = 0;
    int rc;
    const struct cfg cpu = {MOERUN_DEVICE_CPU, 0, 0, MOERUN_POLICY_LRU, 1, 0};
    float *ref_cpu = run(path, &cpu, &nv, NULL);
    assert_non_null(ref_cpu);
    const size_t bytes = (N_PROMPT + N_STEPS) * (size_t)nv * sizeof(float);
    struct cfg c = {device, 0, 0, MOERUN_POLICY_LRU, 1, 0}; /* all of it on the GPU */
    int32_t tokens[N_PROMPT + N_STEPS];
    float *ref = run_tokens(path, &c, &nv, &rc, tokens);
    if (!ref)
        fail_msg("%s: %s", what, moerun_errmsg());
    /* a CUDA product's kernel depends on the columns in the call (fused matvec up to 8, the
     * F16-staged GEMM beyond): the runs with n_batch 4 have their own all-on-GPU reference */
    c.n_batch = 4;
    float *ref4 = device == MOERUN_DEVICE_CUDA ? run(path, &c, &nv, &rc) : NULL;
    c.n_batch = 0;
    const double err = tu_max_rel_l2_ff(ref, ref_cpu, N_PROMPT + N_STEPS, nv);
    if (device == MOERUN_DEVICE_SIM)
        assert_memory_equal(ref, ref_cpu, bytes); /* the same ops as the CPU */
    else if (h.cpu_tol > 0 && !(err <= h.cpu_tol))
        fail_msg("%s: the GPU's logits are %.3e from the CPU's (tolerance %.0e)", what, err,
                 h.cpu_tol);
    if (h.synth_type >= 0)
        check_vs_reference(path, what, h.synth_type, tokens, ref, nv);

    c.gpu_bytes = 4096;
    assert_null(run(path, &c, &nv, &rc));
    assert_int_equal(rc, MOERUN_ERR_BUDGET);
    const uint64_t lo = named_minimum("minimum for this model, ");
    c.gpu_bytes = 4 * lo;
    c.host_bytes = 4096;
    assert_null(run(path, &c, &nv, &rc));
    assert_int_equal(rc, MOERUN_ERR_BUDGET);
    const uint64_t host_lo = named_minimum("minimum for this model with a GPU, ");

    const uint64_t budgets[] = {lo, lo + lo / 3, 4 * lo};
    int runs = 0;
    for (size_t b = 0; b < 3; b++)
        for (int policy = MOERUN_POLICY_LRU; policy <= MOERUN_POLICY_PREDICTED; policy++)
            for (int prefetch = MOERUN_PREFETCH_OFF; prefetch <= MOERUN_PREFETCH_AUTO;
                 prefetch++, runs++) {
                c.gpu_bytes = budgets[b];
                c.host_bytes = runs % 2 ? host_lo : 0;
                c.policy = policy;
                c.prefetch = prefetch;
                c.n_batch = runs % 3 == 0 ? 4 : 0;
                float *out = run(path, &c, &nv, &rc);
                if (!out)
                    fail_msg("%s: GPU budget %llu, host %llu: %s", what,
                             (unsigned long long)c.gpu_bytes, (unsigned long long)c.host_bytes,
                             moerun_errmsg());
                const float *want = ref4 && c.n_batch == 4 ? ref4 : ref;
                if (memcmp(out, want, bytes) != 0)
                    fail_msg("%s: logits differ with GPU budget %llu, host %llu, policy %d, "
                             "prefetch %d",
                             what, (unsigned long long)c.gpu_bytes,
                             (unsigned long long)c.host_bytes, policy, prefetch);
                free(out);
            }
    fprintf(stderr,
            "%s: %d GPU-tier runs bit-identical (minimum GPU budget %llu, host %llu bytes; "
            "%.2e from the CPU)\n",
            what, runs, (unsigned long long)lo, (unsigned long long)host_lo, err);
    free(ref);
    free(ref4);
    free(ref_cpu);
}

static char *synth(const char *arch, int type, uint32_t k, uint64_t seed) {
    moerun_synth_params p;
    moerun_synth_params_init(&p);
    p.arch = arch;
    p.weight_type = type;
    p.seed = seed;
    p.n_vocab = 600;
    p.n_embd = 256;
    p.n_ff = 256;
    p.n_layer = 3;
    p.n_head = 4;
    p.n_head_kv = 2;
    p.n_expert = 8;
    p.n_expert_used = k;
    char *path = strdup(tu_tmp_path(".gguf"));
    assert_int_equal(moerun_synth_write(&p, path), MOERUN_OK);
    return path;
}

static void test_invariant_synth(void **state) {
    (void)state;
    static const char *const archs[] = {"mixtral", "qwen2moe", "qwen3moe", "olmoe"};
    static const int types[] = {MOERUN_TYPE_Q4_K, MOERUN_TYPE_F16, MOERUN_TYPE_Q8_0,
                                MOERUN_TYPE_F32};
    for (size_t i = 0; i < 4; i++) {
        char *path = synth(archs[i], types[i], i == 2 ? 4 : 2, tu_seed() + i);
        char what[64];
        snprintf(what, sizeof(what), "%s %s", archs[i], moerun_type_name(types[i]));
        /* on cuda against the reference only: the CPU rounds activations, cuda does not, and
         * a routing near a tie may flip between them (a Q4_K case 1.4 apart was seen) */
        check_invariant(path, what, (struct held_to){0, types[i]});
        unlink(path);
        free(path);
    }
}

static void test_invariant_golden(void **state) {
    (void)state;
    static const char *const cases[] = {"mixtral-f32", "qwen2moe-f32", "olmoe-f32", "tinymix-f16"};
    static const double tol[] = {1e-4, 1e-4, 1e-4, 3e-3};
    if (!tu_shared_path("golden/MANIFEST.tsv"))
        skip();
    for (size_t i = 0; i < 4; i++) {
        char rel[128];
        snprintf(rel, sizeof(rel), "golden/%s.gguf", cases[i]);
        const char *path = tu_shared_path(rel);
        assert_non_null(path);
        char *copy = strdup(path);
        check_invariant(copy, cases[i], (struct held_to){tol[i], -1});
        free(copy);
    }
}

/* An upload that fails fails that decode call with its message; the session and the model go
 * on and give the same logits. */
static void test_copy_failure(void **state) {
    (void)state;
    char *path = synth("mixtral", MOERUN_TYPE_Q8_0, 2, tu_seed() ^ 0xfa11);
    uint32_t nv;
    int rc;
    struct cfg c = {device, 0, 0, MOERUN_POLICY_LRU, 1, 4}; /* the sessions' n_batch below */
    float *ref = run(path, &c, &nv, NULL);
    assert_non_null(ref);
    c.gpu_bytes = 4096;
    assert_null(run(path, &c, &nv, &rc));
    c.gpu_bytes = named_minimum("minimum for this model, ");
    float *out = malloc(N_PROMPT * (size_t)nv * sizeof(float));
    assert_non_null(out);
    int32_t prompt[N_PROMPT];
    prompt_of(prompt, nv);
    for (uint64_t nth = 0; nth < 40; nth += 3) {
        moerun_model *m = NULL;
        c.prefetch = nth != 0; /* without prefetch the first upload is one the call waits for */
        assert_int_equal(open_model(path, &c, &m), MOERUN_OK);
        moerun_session *s = open_session(m, 4);
        tier_device_set_fault(m->offload->dev, nth);
        rc = moerun_session_decode(s, prompt, N_PROMPT, out, 1);
        fprintf(stderr, "upload %llu fails: %s (%s)\n", (unsigned long long)nth,
                rc ? moerun_errmsg() : "a load ahead, loaded again when needed",
                moerun_status_str(rc));
        /* the first upload is then the first layer's dense part, which the call waits for; a
         * later one may be a load ahead (the ring's, a prefetch), loaded again when needed */
        if (nth == 0 || rc != MOERUN_OK) {
            assert_int_equal(rc, MOERUN_ERR_BACKEND);
            assert_int_equal(moerun_session_n_past(s), 0);
            rc = moerun_session_decode(s, prompt, N_PROMPT, out, 1);
            if (rc != MOERUN_OK)
                fail_msg("after the failed upload: %s", moerun_errmsg());
        }
        assert_memory_equal(out, ref, N_PROMPT * (size_t)nv * sizeof(float));
        moerun_session_destroy(s);
        moerun_model_close(m);
    }
    free(out);
    free(ref);
    unlink(path);
    free(path);
}

/* Sessions' KV caches and scratch come from the GPU budget: two sessions of the reserved size
 * do not fit in a minimal budget, one does; two small ones interleaved give one's logits. */
static void test_sessions(void **state) {
    (void)state;
    char *path = synth("qwen3moe", MOERUN_TYPE_F32, 2, tu_seed() ^ 0x5e55);
    uint32_t nv;
    int rc;
    struct cfg c = {device, 4096, 0, MOERUN_POLICY_LRU, 1, 0};
    assert_null(run(path, &c, &nv, &rc));
    c.gpu_bytes = named_minimum("minimum for this model, ");
    moerun_model *m = NULL;
    assert_int_equal(open_model(path, &c, &m), MOERUN_OK);
    moerun_session *a = open_session(m, 0), *b = NULL;
    moerun_session_params sp;
    moerun_session_params_init(&sp);
    sp.n_ctx = N_CTX;
    sp.n_batch = 16;
    rc = moerun_session_create(m, &sp, &b);
    fprintf(stderr, "a second session: %s (%s)\n", moerun_errmsg(), moerun_status_str(rc));
    assert_int_equal(rc, MOERUN_ERR_BUDGET);
    assert_null(b);
    moerun_session_destroy(a);
    moerun_model_close(m);

    c.gpu_bytes = 0; /* the whole model, and room for sessions of N_CTX / 2 */
    assert_int_equal(open_model(path, &c, &m), MOERUN_OK);
    sp.n_ctx = N_CTX / 2;
    sp.n_batch = 4;
    assert_int_equal(moerun_session_create(m, &sp, &a), MOERUN_OK);
    assert_int_equal(moerun_session_create(m, &sp, &b), MOERUN_OK);
    nv = moerun_model_n_vocab(m);
    float *la = malloc(N_PROMPT * (size_t)nv * sizeof(float));
    float *lb = malloc(N_PROMPT * (size_t)nv * sizeof(float));
    int32_t prompt[N_PROMPT];
    prompt_of(prompt, nv);
    for (int i = 0; i < N_PROMPT; i++) { /* interleaved, token by token */
        assert_int_equal(moerun_session_decode(a, &prompt[i], 1, la + i * (size_t)nv, 0), 0);
        assert_int_equal(moerun_session_decode(b, &prompt[i], 1, lb + i * (size_t)nv, 0), 0);
    }
    assert_memory_equal(la, lb, N_PROMPT * (size_t)nv * sizeof(float));
    moerun_session_destroy(a);
    moerun_session_destroy(b);
    moerun_model_close(m);
    free(la);
    free(lb);
    unlink(path);
    free(path);
}

int main(void) {
    const char *dev = getenv("MOERUN_TEST_DEVICE");
    if (dev && !strcmp(dev, "cuda"))
        device = MOERUN_DEVICE_CUDA;
    if (moerun_device_count(device) == 0) {
        fprintf(stderr, "no %s device: skipped\n", dev ? dev : "sim");
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_invariant_synth),
        cmocka_unit_test(test_invariant_golden),
        cmocka_unit_test(test_copy_failure),
        cmocka_unit_test(test_sessions),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
