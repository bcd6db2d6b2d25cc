/* Models: synthetic model generation, open and summary, the golden files' hyper-parameters,
 * and the moe-run / moe-synth command lines. */
#include "testutil.h"

#include "gguf.h"
#include "moerun.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void small_params(moerun_synth_params *p, int type) {
    moerun_synth_params_init(p);
    p->weight_type = type;
    p->n_vocab = 300;
    p->n_embd = 256;
    p->n_layer = 2;
    p->n_head = 4;
    p->n_head_kv = 2;
    p->n_expert = 4;
    p->n_expert_used = 2;
    p->n_ff = 256;
    p->seed = tu_seed();
}

static int files_equal(const char *a, const char *b) {
    size_t na, nb;
    void *da = tu_read_file(a, &na), *db = tu_read_file(b, &nb);
    int eq = da && db && na == nb && memcmp(da, db, na) == 0;
    free(da);
    free(db);
    return eq;
}

static void test_synth_and_info(void **state) {
    (void)state;
    static const int types[] = {MOERUN_TYPE_F32,  MOERUN_TYPE_F16,  MOERUN_TYPE_BF16,
                                MOERUN_TYPE_Q8_0, MOERUN_TYPE_Q4_0, MOERUN_TYPE_Q4_K,
                                MOERUN_TYPE_Q5_K, MOERUN_TYPE_Q6_K};
    static const struct {
        uint32_t blck, size;
    } layout[] = {{1, 4}, {1, 2}, {1, 2}, {32, 34}, {32, 18}, {256, 144}, {256, 176}, {256, 210}};
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
        moerun_synth_params p;
        small_params(&p, types[ti]);
        const char *path = strdup(tu_tmp_path(".gguf"));
        assert_int_equal(moerun_synth_write(&p, path), MOERUN_OK);
        moerun_model *m = NULL;
        assert_int_equal(moerun_model_open(path, NULL, &m), MOERUN_OK);
        moerun_model_info in = {.struct_size = sizeof(in)};
        assert_int_equal(moerun_model_get_info(m, &in), MOERUN_OK);
        assert_string_equal(in.arch, "llama");
        assert_int_equal(in.gguf_version, 3);
        assert_int_equal(in.n_vocab, p.n_vocab);
        assert_int_equal(in.n_embd, p.n_embd);
        assert_int_equal(in.n_layer, p.n_layer);
        assert_int_equal(in.n_head, p.n_head);
        assert_int_equal(in.n_head_kv, p.n_head_kv);
        assert_int_equal(in.n_expert, p.n_expert);
        assert_int_equal(in.n_expert_used, p.n_expert_used);
        assert_int_equal(in.n_ff_exp, p.n_ff);
        assert_int_equal(in.n_rot, p.n_embd / p.n_head);
        assert_true(in.rms_eps > 0);
        /* tensors: embeddings, output, 7 matrices and 3 F32 tensors (2 norms, router) per
         * layer, the output norm */
        assert_int_equal(in.n_tensors, 2 + 10 * p.n_layer + 1);
        uint64_t n, bytes, sum = 0, count = 0;
        for (int t = 0; t < 64; t++) {
            if (moerun_type_name(t) && moerun_model_type_bytes(m, t, &n, &bytes) == MOERUN_OK) {
                sum += bytes;
                count += n;
            }
        }
        assert_int_equal(sum, in.tensor_bytes);
        assert_int_equal(count, in.n_tensors);
        assert_int_equal(moerun_model_type_bytes(m, types[ti], &n, NULL), MOERUN_OK);
        assert_int_equal(n, types[ti] == MOERUN_TYPE_F32 ? in.n_tensors : 2 + 7 * p.n_layer);
        const uint64_t one = 3ull * p.n_ff * p.n_embd / layout[ti].blck * layout[ti].size;
        for (uint32_t il = 0; il < p.n_layer; il++) {
            uint64_t all_b, one_b;
            assert_int_equal(moerun_model_layer_expert_bytes(m, il, &all_b, &one_b), MOERUN_OK);
            assert_int_equal(one_b, one);
            assert_int_equal(all_b, one * p.n_expert);
        }
        assert_int_equal(in.expert_bytes, one * p.n_expert * p.n_layer);
        assert_int_equal(moerun_model_layer_expert_bytes(m, p.n_layer, NULL, NULL),
                         MOERUN_ERR_RANGE);
        /* metadata by index */
        int found_seed = 0;
        for (uint64_t i = 0; i < in.n_kv; i++) {
            const char *key = moerun_model_meta_key(m, i);
            assert_non_null(key);
            char val[64];
            assert_true(moerun_model_meta_value_str(m, i, val, sizeof(val)) >= 0);
            if (!strcmp(key, "moerun.synth.seed")) {
                char want[32];
                snprintf(want, sizeof(want), "%llu", (unsigned long long)p.seed);
                assert_non_null(strstr(val, want));
                found_seed = 1;
            }
        }
        assert_true(found_seed);
        assert_null(moerun_model_meta_key(m, in.n_kv));
        moerun_model_close(m);
        unlink(path);
        free((void *)path);
    }
}

/* A large synthetic vocabulary has no duplicate pieces: its tokenizer loads. */
static void test_synth_large_vocab(void **state) {
    (void)state;
    moerun_synth_params p;
    small_params(&p, MOERUN_TYPE_Q8_0);
    p.n_vocab = 40000;
    p.n_embd = 64;
    p.n_ff = 64;
    p.n_layer = 1;
    char *path = strdup(tu_tmp_path(".gguf"));
    assert_int_equal(moerun_synth_write(&p, path), MOERUN_OK);
    moerun_model_params mp;
    moerun_model_params_init(&mp);
    mp.metadata_only = 1;
    moerun_model *m = NULL;
    if (moerun_model_open(path, &mp, &m) != MOERUN_OK)
        fail_msg("%s", moerun_errmsg());
    assert_int_equal(moerun_model_n_vocab(m), p.n_vocab);
    int32_t ids[16];
    size_t n = 0;
    assert_int_equal(moerun_tokenize(m, "the model", 9, 1, 0, ids, 16, &n), MOERUN_OK);
    assert_true(n >= 2);
    moerun_model_close(m);
    unlink(path);
    free(path);
}

static void test_synth_deterministic(void **state) {
    (void)state;
    moerun_synth_params p;
    small_params(&p, MOERUN_TYPE_Q4_K);
    char *a = strdup(tu_tmp_path(".gguf")), *b = strdup(tu_tmp_path(".gguf"));
    p.n_threads = 1;
    assert_int_equal(moerun_synth_write(&p, a), MOERUN_OK);
    p.n_threads = 2;
    assert_int_equal(moerun_synth_write(&p, b), MOERUN_OK);
    assert_true(files_equal(a, b)); /* the thread count does not change the file */
    p.seed ^= 1;
    assert_int_equal(moerun_synth_write(&p, b), MOERUN_OK); /* replaces b */
    assert_false(files_equal(a, b));
    unlink(a);
    unlink(b);
    free(a);
    free(b);
}

/* The value of metadata key as text, or NULL when absent (static buffer). */
static const char *meta_value(const moerun_model *m, const char *key) {
    static char val[128];
    moerun_model_info in = {.struct_size = sizeof(in)};
    assert_int_equal(moerun_model_get_info(m, &in), MOERUN_OK);
    for (uint64_t i = 0; i < in.n_kv; i++) {
        if (!strcmp(moerun_model_meta_key(m, i), key)) {
            assert_true(moerun_model_meta_value_str(m, i, val, sizeof(val)) >= 0);
            return val;
        }
    }
    return NULL;
}

/* Every architecture: its tensors, its keys, the RoPE base of its family, determinism, and
 * moe-synth writing the same file as the library. */
static void test_synth_archs(void **state) {
    (void)state;
    static const struct {
        const char *arch, *gguf_arch;
        uint32_t per_layer; /* tensors per layer */
        uint32_t head_dim;  /* n_head_dim to ask for; 0 = default */
        float rope_base;
    } archs[] = {
        {"mixtral", "llama", 10, 0, 1e4f},
        {"qwen2moe", "qwen2moe", 10 + 3 + 4, 0, 1e6f}, /* q/k/v biases, shared expert */
        {"qwen3moe", "qwen3moe", 10 + 2, 96, 1e6f},    /* q/k norms per head */
        {"olmoe", "olmoe", 10 + 2, 0, 1e4f},           /* q/k norms, whole projection */
    };
    for (size_t ai = 0; ai < sizeof(archs) / sizeof(archs[0]); ai++) {
        moerun_synth_params p;
        small_params(&p, MOERUN_TYPE_Q8_0);
        p.arch = archs[ai].arch;
        p.n_head_dim = archs[ai].head_dim;
        char *a = strdup(tu_tmp_path(".gguf")), *b = strdup(tu_tmp_path(".gguf"));
        p.n_threads = 1;
        assert_int_equal(moerun_synth_write(&p, a), MOERUN_OK);
        p.n_threads = 2;
        assert_int_equal(moerun_synth_write(&p, b), MOERUN_OK);
        assert_true(files_equal(a, b));

        moerun_model *m = NULL;
        assert_int_equal(moerun_model_open(a, NULL, &m), MOERUN_OK);
        moerun_model_info in = {.struct_size = sizeof(in)};
        assert_int_equal(moerun_model_get_info(m, &in), MOERUN_OK);
        assert_string_equal(in.arch, archs[ai].gguf_arch);
        assert_int_equal(in.n_tensors, 2 + archs[ai].per_layer * p.n_layer + 1);
        assert_int_equal(in.n_embd, p.n_embd);
        assert_int_equal(in.n_head, p.n_head);
        assert_int_equal(in.n_head_kv, p.n_head_kv);
        assert_int_equal(in.n_expert, p.n_expert);
        assert_int_equal(in.n_ff_exp, p.n_ff);
        const uint32_t hd = p.n_head_dim ? p.n_head_dim : p.n_embd / p.n_head;
        assert_int_equal(in.n_rot, hd);
        assert_true(in.rope_freq_base == archs[ai].rope_base);
        char key[96];
        snprintf(key, sizeof(key), "%s.expert_shared_feed_forward_length", archs[ai].gguf_arch);
        const char *v = meta_value(m, key);
        if (!strcmp(archs[ai].arch, "qwen2moe")) {
            assert_non_null(v);
            assert_int_equal(strtoul(v, NULL, 10), 2 * p.n_ff);
        } else {
            assert_null(v);
        }
        snprintf(key, sizeof(key), "%s.attention.key_length", archs[ai].gguf_arch);
        v = meta_value(m, key);
        if (!strcmp(archs[ai].arch, "qwen3moe")) {
            assert_non_null(v);
            assert_int_equal(strtoul(v, NULL, 10), hd);
        } else {
            assert_null(v);
        }
        moerun_model_close(m);

        /* moe-synth with the same arguments writes the same file */
        const char *moe_synth = getenv("MOE_SYNTH");
        if (moe_synth) {
            char cmd[4096];
            snprintf(cmd, sizeof(cmd),
                     "%s -o %s --arch %s --type q8_0 --vocab 300 --embd 256 --layers 2 "
                     "--heads 4 --kv-heads 2 --experts 4 --experts-used 2 --ff 256 "
                     "--head-dim %u --seed %llu >/dev/null",
                     moe_synth, b, p.arch, p.n_head_dim, (unsigned long long)p.seed);
            assert_int_equal(system(cmd), 0);
            assert_true(files_equal(a, b));
        }
        /* a different shared-expert width or RoPE base changes the file */
        p.n_ff_shared = 3 * p.n_ff;
        p.rope_freq_base = 5e5f;
        assert_int_equal(moerun_synth_write(&p, b), MOERUN_OK);
        assert_int_equal(moerun_model_open(b, NULL, &m), MOERUN_OK);
        assert_int_equal(moerun_model_get_info(m, &in), MOERUN_OK);
        assert_true(in.rope_freq_base == 5e5f);
        snprintf(key, sizeof(key), "%s.expert_shared_feed_forward_length", archs[ai].gguf_arch);
        if (!strcmp(archs[ai].arch, "qwen2moe"))
            assert_int_equal(strtoul(meta_value(m, key), NULL, 10), 3 * p.n_ff);
        moerun_model_close(m);
        unlink(a);
        unlink(b);
        free(a);
        free(b);
    }
}

static void test_synth_rejects_bad_shapes(void **state) {
    (void)state;
    const char *path = tu_tmp_path(".gguf");
    moerun_synth_params p;
    small_params(&p, MOERUN_TYPE_Q4_K);
    p.n_embd = 288; /* not a multiple of 256 */
    p.n_head = 4;
    assert_int_equal(moerun_synth_write(&p, path), MOERUN_ERR_INVALID_ARG);
    assert_non_null(strstr(moerun_errmsg(), "n_embd"));
    small_params(&p, MOERUN_TYPE_Q8_0);
    p.n_head_kv = 3;
    assert_int_equal(moerun_synth_write(&p, path), MOERUN_ERR_INVALID_ARG);
    small_params(&p, MOERUN_TYPE_Q8_0);
    p.n_expert_used = p.n_expert + 1;
    assert_int_equal(moerun_synth_write(&p, path), MOERUN_ERR_INVALID_ARG);
    small_params(&p, MOERUN_TYPE_Q8_0);
    p.n_vocab = 100;
    assert_int_equal(moerun_synth_write(&p, path), MOERUN_ERR_INVALID_ARG);
    small_params(&p, MOERUN_TYPE_Q8_0);
    p.arch = "gpt-17";
    assert_int_equal(moerun_synth_write(&p, path), MOERUN_ERR_UNSUPPORTED);
    assert_non_null(strstr(moerun_errmsg(), "qwen3moe")); /* the known ones are listed */
    small_params(&p, MOERUN_TYPE_Q8_0);
    p.arch = "qwen3moe";
    p.n_head_dim = 33; /* odd */
    assert_int_equal(moerun_synth_write(&p, path), MOERUN_ERR_INVALID_ARG);
    assert_non_null(strstr(moerun_errmsg(), "n_head_dim"));
    p.n_head_dim = 36; /* 4 x 36 is not a multiple of 32 */
    assert_int_equal(moerun_synth_write(&p, path), MOERUN_ERR_INVALID_ARG);
    small_params(&p, MOERUN_TYPE_Q8_0);
    p.arch = "qwen2moe";
    p.n_ff_shared = 100;
    assert_int_equal(moerun_synth_write(&p, path), MOERUN_ERR_INVALID_ARG);
    assert_non_null(strstr(moerun_errmsg(), "n_ff_shared"));
    small_params(&p, MOERUN_TYPE_Q8_0);
    p.n_head = 3; /* 256 / 3 is not a whole head */
    assert_int_equal(moerun_synth_write(&p, path), MOERUN_ERR_INVALID_ARG);
    p.n_head_kv = 1;
    p.n_head_dim = 16;
    assert_int_equal(moerun_synth_write(&p, path), MOERUN_ERR_INVALID_ARG); /* 3 x 16 = 48 */
    p.n_head_dim = 64; /* but with a head size of 64 it is: 3 x 64 = 192, 6 Q8_0 blocks */
    assert_int_equal(moerun_synth_write(&p, path), MOERUN_OK);
    unlink(path);
    small_params(&p, MOERUN_TYPE_Q8_0);
    p.rope_freq_base = -1.0f;
    assert_int_equal(moerun_synth_write(&p, path), MOERUN_ERR_INVALID_ARG);
    small_params(&p, MOERUN_TYPE_Q8_K);
    assert_int_equal(moerun_synth_write(&p, path), MOERUN_ERR_UNSUPPORTED);
    small_params(&p, MOERUN_TYPE_Q8_0);
    p.struct_size = 0;
    assert_int_equal(moerun_synth_write(&p, path), MOERUN_ERR_INVALID_ARG);
    small_params(&p, MOERUN_TYPE_Q8_0);
    assert_int_equal(moerun_synth_write(&p, "/nonexistent-dir/x.gguf"), MOERUN_ERR_IO);
    assert_true(access(path, F_OK) != 0); /* nothing was left behind */
}

struct counting {
    long live;
    long total;
};

static void *count_alloc(size_t size, size_t align, void *user) {
    struct counting *c = user;
    void *p = NULL;
    if (posix_memalign(&p, align, size) != 0)
        return NULL;
    c->live++;
    c->total++;
    return p;
}

static void count_free(void *p, void *user) {
    struct counting *c = user;
    if (p)
        c->live--;
    free(p);
}

static void test_open_errors_and_allocator(void **state) {
    (void)state;
    moerun_model *m = (moerun_model *)&m;
    assert_int_equal(moerun_model_open("/nonexistent/model.gguf", NULL, &m), MOERUN_ERR_IO);
    assert_null(m);
    assert_true(moerun_errmsg()[0] != '\0');
    const char *junk = tu_tmp_path(".gguf");
    FILE *f = fopen(junk, "wb");
    assert_non_null(f);
    fputs("this is not a model file, just text\n", f);
    fclose(f);
    assert_int_equal(moerun_model_open(junk, NULL, &m), MOERUN_ERR_FORMAT);
    assert_null(m);
    unlink(junk);
    assert_int_equal(moerun_model_open(NULL, NULL, &m), MOERUN_ERR_INVALID_ARG);
    assert_int_equal(moerun_model_open("x", NULL, NULL), MOERUN_ERR_INVALID_ARG);
    moerun_model_params mp = {0};
    assert_int_equal(moerun_model_open("x", &mp, &m), MOERUN_ERR_INVALID_ARG);
    moerun_model_close(NULL);

    /* every allocation of an open model goes through the caller's allocator, and is freed */
    moerun_synth_params p;
    small_params(&p, MOERUN_TYPE_F16);
    char *path = strdup(tu_tmp_path(".gguf"));
    assert_int_equal(moerun_synth_write(&p, path), MOERUN_OK);
    struct counting c = {0};
    moerun_allocator a = {count_alloc, count_free, &c};
    moerun_model_params_init(&mp);
    mp.allocator = &a;
    assert_int_equal(moerun_model_open(path, &mp, &m), MOERUN_OK);
    assert_true(c.total > 0);
    moerun_model_close(m);
    assert_int_equal(c.live, 0);
    unlink(path);
    free(path);
}

/* A block_count far beyond the tensors (found by fuzzing) is an error, not a huge allocation. */
static void test_hostile_block_count(void **state) {
    (void)state;
    const char *path = tu_tmp_path(".gguf");
    struct gguf_writer *w = NULL;
    assert_int_equal(gguf_writer_create(NULL, &w), MOERUN_OK);
    assert_int_equal(gguf_writer_set_str(w, "general.architecture", "llama"), MOERUN_OK);
    assert_int_equal(gguf_writer_set_u32(w, "llama.block_count", 4000000000u), MOERUN_OK);
    const uint64_t ne[1] = {32};
    assert_int_equal(gguf_writer_add_tensor(w, "blk.0.attn_norm.weight", MOERUN_TYPE_F32, 1, ne),
                     MOERUN_OK);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    float data[32] = {0};
    assert_int_equal(gguf_writer_begin(w, fd), MOERUN_OK);
    assert_int_equal(gguf_writer_write_data(w, data, sizeof(data)), MOERUN_OK);
    assert_int_equal(gguf_writer_finish(w), MOERUN_OK);
    gguf_writer_destroy(w);
    close(fd);
    for (int metadata_only = 0; metadata_only <= 1; metadata_only++) {
        moerun_model_params mp;
        moerun_model_params_init(&mp);
        mp.metadata_only = metadata_only;
        moerun_model *m = NULL;
        assert_int_equal(moerun_model_open(path, &mp, &m), MOERUN_ERR_FORMAT);
        assert_non_null(strstr(moerun_errmsg(), "block_count"));
        assert_null(m);
    }
    unlink(path);
}

/* Every golden model opens, and its hyper-parameters match MANIFEST.tsv. */
static void test_golden_hparams(void **state) {
    (void)state;
    const char *manifest = tu_shared_path("golden/MANIFEST.tsv");
    if (!manifest)
        skip();
    FILE *f = fopen(manifest, "r");
    assert_non_null(f);
    char line[4096];
    int cases = 0;
    assert_non_null(fgets(line, sizeof(line), f)); /* header */
    while (fgets(line, sizeof(line), f)) {
        char name[128], arch[64], types[1024];
        unsigned vocab, embd, layers, heads, kv, experts, used;
        if (sscanf(line, "%127[^\t]\t%63[^\t]\t%1023[^\t]\t%u\t%u\t%u\t%u\t%u\t%u\t%u", name, arch,
                   types, &vocab, &embd, &layers, &heads, &kv, &experts, &used) != 10)
            continue;
        char rel[256];
        snprintf(rel, sizeof(rel), "golden/%s.gguf", name);
        const char *path = tu_shared_path(rel);
        assert_non_null(path);
        moerun_model *m = NULL;
        int rc = moerun_model_open(path, NULL, &m);
        if (rc != MOERUN_OK)
            fail_msg("%s: %s", name, moerun_errmsg());
        moerun_model_info in = {.struct_size = sizeof(in)};
        assert_int_equal(moerun_model_get_info(m, &in), MOERUN_OK);
        assert_string_equal(in.arch, arch);
        assert_int_equal(in.n_vocab, vocab);
        assert_int_equal(in.n_embd, embd);
        assert_int_equal(in.n_layer, layers);
        assert_int_equal(in.n_head, heads);
        assert_int_equal(in.n_head_kv, kv);
        assert_int_equal(in.n_expert, experts);
        assert_int_equal(in.n_expert_used, used);
        assert_true(in.expert_bytes > 0);
        for (uint32_t il = 0; il < in.n_layer; il++) {
            uint64_t all_b, one_b;
            assert_int_equal(moerun_model_layer_expert_bytes(m, il, &all_b, &one_b), MOERUN_OK);
            assert_int_equal(all_b, one_b * experts);
        }
        moerun_model_close(m);
        cases++;
    }
    fclose(f);
    assert_true(cases >= 10);
}

/* Run a command line; its exit status, with stdout and stderr in files. */
static int run_cmd(const char *cmd, const char *out, const char *err) {
    char buf[8192];
    snprintf(buf, sizeof(buf), "%s >%s 2>%s", cmd, out, err);
    int st = system(buf);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void test_command_lines(void **state) {
    (void)state;
    const char *moe_run = getenv("MOE_RUN"), *moe_synth = getenv("MOE_SYNTH");
    if (!moe_run || !moe_synth)
        skip();
    char *out = strdup(tu_tmp_path(".out")), *err = strdup(tu_tmp_path(".err"));
    char *a = strdup(tu_tmp_path(".gguf")), *b = strdup(tu_tmp_path(".gguf"));
    char cmd[4096];

    /* moe-synth writes the same file as the library call with the same parameters */
    moerun_synth_params p;
    small_params(&p, MOERUN_TYPE_Q6_K);
    assert_int_equal(moerun_synth_write(&p, a), MOERUN_OK);
    snprintf(cmd, sizeof(cmd),
             "%s -o %s --type q6_k --vocab 300 --embd 256 --layers 2 --heads 4 --kv-heads 2 "
             "--experts 4 --experts-used 2 --ff 256 --seed %llu",
             moe_synth, b, (unsigned long long)p.seed);
    assert_int_equal(run_cmd(cmd, out, err), 0);
    assert_true(files_equal(a, b));

    snprintf(cmd, sizeof(cmd), "%s --info -m %s", moe_run, a);
    assert_int_equal(run_cmd(cmd, out, err), 0);
    char *text = tu_read_file(out, NULL);
    assert_non_null(text);
    assert_non_null(strstr(text, "architecture  llama"));
    assert_non_null(strstr(text, "experts       4 per layer, 2 used per token"));
    assert_non_null(strstr(text, "Q6_K"));
    assert_non_null(strstr(text, "layer 1"));
    free(text);

    /* errors: a clear message on stderr and a non-zero exit */
    snprintf(cmd, sizeof(cmd), "%s --info -m /nonexistent.gguf", moe_run);
    assert_int_not_equal(run_cmd(cmd, out, err), 0);
    text = tu_read_file(err, NULL);
    assert_non_null(strstr(text, "/nonexistent.gguf"));
    free(text);
    snprintf(cmd, sizeof(cmd), "%s --bogus", moe_run);
    assert_int_equal(run_cmd(cmd, out, err), 2);
    snprintf(cmd, sizeof(cmd), "%s -o %s --type q9_9", moe_synth, b);
    assert_int_not_equal(run_cmd(cmd, out, err), 0);
    snprintf(cmd, sizeof(cmd), "%s -o %s --embd 100 --type q4_k", moe_synth, b);
    assert_int_not_equal(run_cmd(cmd, out, err), 0);
    text = tu_read_file(err, NULL);
    assert_non_null(strstr(text, "n_embd"));
    free(text);

    unlink(a);
    unlink(b);
    unlink(out);
    unlink(err);
    free(a);
    free(b);
    free(out);
    free(err);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_synth_and_info),
        cmocka_unit_test(test_synth_deterministic),
        cmocka_unit_test(test_synth_large_vocab),
        cmocka_unit_test(test_synth_archs),
        cmocka_unit_test(test_synth_rejects_bad_shapes),
        cmocka_unit_test(test_open_errors_and_allocator),
        cmocka_unit_test(test_hostile_block_count),
        cmocka_unit_test(test_golden_hparams),
        cmocka_unit_test(test_command_lines),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
