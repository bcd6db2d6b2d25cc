/* moe-run's command line: --tokenize against the tokenizer test vectors, --logits-out and greedy
 * generation against the golden files, --json output, reproducible sampling, and the error
 * cases (a message on stderr and a non-zero exit, never a crash). */
#include "testutil.h"

#include "moerun.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *moe_run;
static char *model_path; /* a small synthetic model, made once */
static char *out_path, *err_path;

/* Run moe-run with args; its exit status (-1 when it died of a signal), stdout and stderr in
 * out_path and err_path. */
static int run(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int run(const char *fmt, ...) {
    char args[8192], cmd[9000];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(args, sizeof(args), fmt, ap);
    va_end(ap);
    assert_true(n > 0 && n < (int)sizeof(args));
    snprintf(cmd, sizeof(cmd), "%s %s >%s 2>%s", moe_run, args, out_path, err_path);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* A whole file as a NUL-terminated string (tu_read_file does not terminate); NULL on failure. */
static char *read_str(const char *path) {
    size_t n;
    char *data = tu_read_file(path, &n);
    if (!data)
        return NULL;
    char *s = realloc(data, n + 1);
    if (!s) {
        free(data);
        return NULL;
    }
    s[n] = '\0';
    return s;
}

static char *read_out(void) {
    char *s = read_str(out_path);
    assert_non_null(s);
    return s;
}

static char *read_err(void) {
    char *s = read_str(err_path);
    assert_non_null(s);
    return s;
}

/* A failed run: exit status 1 or 2 (not a signal) and a message on stderr naming want. */
static void expect_error(int rc, const char *want) {
    char *err = read_err();
    if (rc < 1 || rc > 2 || !strstr(err, want))
        fail_msg("exit %d, stderr '%s' (want a message with '%s')", rc, err, want);
    free(err);
}

/* Parse a JSON array of integers starting at s ('['); the count, or -1. */
static int parse_ids(const char *s, int32_t *ids, int cap) {
    if (*s != '[')
        return -1;
    s++;
    int n = 0;
    while (*s == ' ')
        s++;
    if (*s == ']')
        return 0;
    for (;;) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || n == cap)
            return -1;
        ids[n++] = (int32_t)v;
        s = end;
        while (*s == ' ')
            s++;
        if (*s == ']')
            return n;
        if (*s != ',')
            return -1;
        s++;
    }
}

/* The ids of a JSON array after "key": in json; the count, or -1. */
static int json_ids(const char *json, const char *key, int32_t *ids, int cap) {
    char k[64];
    snprintf(k, sizeof(k), "\"%s\":[", key);
    const char *p = strstr(json, k);
    return p ? parse_ids(p + strlen(k) - 1, ids, cap) : -1;
}

/* The number after "key": in the stats object; NAN when absent. */
static double json_stat(const char *json, const char *key) {
    const char *stats = strstr(json, "\"stats\":{");
    if (!stats)
        return NAN;
    char k[64];
    snprintf(k, sizeof(k), "\"%s\":", key);
    const char *p = strstr(stats, k);
    if (!p)
        return NAN;
    char *end;
    double v = strtod(p + strlen(k), &end);
    return end == p + strlen(k) ? NAN : v;
}

/* The unescaped "text" string of json into a malloc'd buffer; NULL when malformed. */
static char *json_text(const char *json) {
    const char *p = strstr(json, "\"text\":\"");
    if (!p)
        return NULL;
    p += 8;
    char *out = malloc(strlen(p) + 1), *o = out;
    assert_non_null(out);
    for (; *p != '"'; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '\0' || c < 0x20) { /* unterminated, or a raw control character */
            free(out);
            return NULL;
        }
        if (c != '\\') {
            *o++ = (char)c;
            continue;
        }
        p++;
        switch (*p) {
        case '"':
        case '\\':
        case '/':
            *o++ = *p;
            break;
        case 'n':
            *o++ = '\n';
            break;
        case 't':
            *o++ = '\t';
            break;
        case 'r':
            *o++ = '\r';
            break;
        case 'b':
            *o++ = '\b';
            break;
        case 'f':
            *o++ = '\f';
            break;
        case 'u': {
            unsigned v;
            if (sscanf(p + 1, "%4x", &v) != 1 || v >= 0x80) { /* only controls are escaped */
                free(out);
                return NULL;
            }
            *o++ = (char)v;
            p += 4;
            break;
        }
        default:
            free(out);
            return NULL;
        }
    }
    *o = '\0';
    return out;
}

/* The whole object: starts with '{', ends with "}\n", all keys there. */
static void check_json_shape(const char *json) {
    size_t n = strlen(json);
    assert_true(n > 2 && json[0] == '{' && json[n - 2] == '}' && json[n - 1] == '\n');
    static const char *const keys[] = {"\"prompt_tokens\":[", "\"tokens\":[", "\"text\":\"",
                                       "\"stats\":{"};
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
        if (!strstr(json, keys[i]))
            fail_msg("no %s in %s", keys[i], json);
    static const char *const stats[] = {"prompt_tokens", "prompt_ms", "prompt_tps",
                                        "gen_tokens",    "gen_ms",    "gen_tps"};
    for (size_t i = 0; i < sizeof(stats) / sizeof(stats[0]); i++) {
        double v = json_stat(json, stats[i]);
        if (!(v >= 0))
            fail_msg("stats.%s missing or negative in %s", stats[i], json);
    }
}

/* Read a comma-separated id file ("1,71,68"); the count. */
static int read_id_file(const char *path, int32_t *ids, int cap) {
    char *s = read_str(path);
    assert_non_null(s);
    char buf[16384];
    size_t len = strcspn(s, "\r\n");
    assert_true(len + 3 < sizeof(buf));
    snprintf(buf, sizeof(buf), "[%.*s]", (int)len, s);
    free(s);
    int n = parse_ids(buf, ids, cap);
    assert_true(n > 0);
    return n;
}

static int group_setup(void **state) {
    (void)state;
    moe_run = getenv("MOE_RUN");
    if (!moe_run) {
        fprintf(stderr, "test_cli: MOE_RUN is not set (run through ctest)\n");
        return -1;
    }
    out_path = strdup(tu_tmp_path(".out"));
    err_path = strdup(tu_tmp_path(".err"));
    model_path = strdup(tu_tmp_path(".gguf"));
    moerun_synth_params p;
    moerun_synth_params_init(&p);
    p.weight_type = MOERUN_TYPE_F32;
    p.n_vocab = 300;
    p.n_embd = 64;
    p.n_layer = 2;
    p.n_head = 4;
    p.n_head_kv = 2;
    p.n_expert = 4;
    p.n_expert_used = 2;
    p.n_ff = 64;
    p.n_ctx = 256;
    p.seed = tu_seed();
    if (moerun_synth_write(&p, model_path) != MOERUN_OK) {
        fprintf(stderr, "test_cli: %s\n", moerun_errmsg());
        return -1;
    }
    return 0;
}

static int group_teardown(void **state) {
    (void)state;
    unlink(model_path);
    unlink(out_path);
    unlink(err_path);
    free(model_path);
    free(out_path);
    free(err_path);
    return 0;
}

/* Split a .inp file on the separator: the test strings, in place. */
static int split_inputs(char *text, char **strs, int cap) {
    static const char sep[] = "\n__ggml_vocab_test__\n";
    int n = 0;
    char *p = text, *q;
    while ((q = strstr(p, sep)) && n < cap) {
        *q = '\0';
        strs[n++] = p;
        p = q + strlen(sep);
    }
    return n;
}

/* --tokenize on a vocab-only file gives the test vectors' ids (with BOS, which add_special adds
 * for this SentencePiece vocab), for strings with spaces, newlines and non-ASCII text. */
static void test_tokenize_vocab(void **state) {
    (void)state;
    const char *vocab = tu_shared_path("golden/vocab/ggml-vocab-llama-spm.gguf");
    if (!vocab)
        skip();
    char path[4096];
    snprintf(path, sizeof(path), "%s", vocab);
    char rel[256];
    snprintf(rel, sizeof(rel), "golden/vocab/ggml-vocab-llama-spm.gguf.inp");
    char *inp = read_str(tu_shared_path(rel));
    snprintf(rel, sizeof(rel), "golden/vocab/ggml-vocab-llama-spm.gguf.out");
    char *outs = read_str(tu_shared_path(rel));
    assert_non_null(inp);
    assert_non_null(outs);
    char *strs[128];
    int n_str = split_inputs(inp, strs, 128);
    assert_true(n_str >= 40);
    /* one line per string; an empty line for the empty string */
    char *lines[129];
    int n_lines = 0;
    for (char *l = outs; l && n_lines < 129; n_lines++) {
        lines[n_lines] = l;
        l = strchr(l, '\n');
        if (l)
            *l++ = '\0';
    }
    if (n_lines == n_str + 1 && lines[n_str][0] == '\0')
        n_lines--; /* the newline at the end of the file */
    assert_int_equal(n_lines, n_str);

    struct tu_rng rng;
    tu_rng_init(&rng, tu_seed());
    const char *txt = tu_tmp_path(".txt");
    int checked = 0;
    for (int k = 0; k < 6; k++) {
        int i = (int)(tu_rng_u64(&rng) % (uint64_t)n_str);
        const char *want_line = lines[i];
        FILE *f = fopen(txt, "wb");
        assert_non_null(f);
        fwrite(strs[i], 1, strlen(strs[i]), f);
        fclose(f);
        int rc = run("--tokenize -m '%s' -f '%s'", path, txt);
        if (rc != 0) {
            char *err = read_err();
            fail_msg("--tokenize of string %d exited %d: %s", i, rc, err);
        }
        char *got_s = read_out();
        int32_t got[1024], want[1024];
        int n_got = parse_ids(got_s, got, 1024);
        int n_want = 0; /* " 474 287 29871" */
        for (const char *c = want_line;;) {
            char *end;
            long v = strtol(c, &end, 10);
            if (end == c)
                break;
            assert_true(n_want < 1024);
            want[n_want++] = (int32_t)v;
            c = end;
        }
        if (n_got != n_want + 1 || got[0] != 1 ||
            memcmp(got + 1, want, (size_t)n_want * sizeof(int32_t)) != 0)
            fail_msg("string %d ('%s'): got %s, want BOS + %s", i, strs[i], got_s, want_line);
        free(got_s);
        checked++;
    }
    assert_int_equal(checked, 6);

    /* -p, and --parse-special: "<s>" is the BOS token only with the flag */
    assert_int_equal(run("--tokenize -m '%s' -p 'Hello world'", path), 0);
    char *s = read_out();
    assert_string_equal(s, "[1,15043,3186]\n");
    free(s);
    assert_int_equal(run("--tokenize -m '%s' -p '<s>x' --parse-special", path), 0);
    s = read_out();
    int32_t ids[64];
    int n = parse_ids(s, ids, 64);
    assert_true(n >= 3 && ids[0] == 1 && ids[1] == 1);
    free(s);
    assert_int_equal(run("--tokenize -m '%s' -p '<s>x'", path), 0);
    s = read_out();
    n = parse_ids(s, ids, 64);
    assert_true(n >= 3 && ids[0] == 1);
    for (int i = 1; i < n; i++)
        assert_int_not_equal(ids[i], 1);
    free(s);
    unlink(txt);
    free(inp);
    free(outs);

    /* the prompt of a golden case tokenizes to its .tokens (BOS first) */
    const char *model = tu_shared_path("golden/mixtral-spm32k-f16.gguf");
    char mpath[4096], ppath[4096];
    snprintf(mpath, sizeof(mpath), "%s", model);
    snprintf(ppath, sizeof(ppath), "%s", tu_shared_path("golden/mixtral-spm32k-f16.prompt"));
    int32_t want[256], got[256];
    int n_want = read_id_file(tu_shared_path("golden/mixtral-spm32k-f16.tokens"), want, 256);
    assert_int_equal(run("--tokenize -m '%s' -f '%s'", mpath, ppath), 0);
    s = read_out();
    assert_int_equal(parse_ids(s, got, 256), n_want);
    assert_memory_equal(got, want, (size_t)n_want * sizeof(int32_t));
    free(s);
}

/* --tokens with --logits-out writes [n_prompt][n_vocab] float32 matching the reference logits
 * within 1e-4 relative per row; --temp 0 continues with the golden greedy ids. */
static void test_golden_logits_and_greedy(void **state) {
    (void)state;
    const char *g = tu_shared_path("golden/mixtral-f32.gguf");
    if (!g)
        skip();
    char model[4096], list[8192];
    snprintf(model, sizeof(model), "%s", g);
    int32_t toks[256], greedy[64];
    int n_tok = read_id_file(tu_shared_path("golden/mixtral-f32.tokens"), toks, 256);
    int n_greedy = read_id_file(tu_shared_path("golden/mixtral-f32.greedy"), greedy, 64);
    size_t ref_size;
    float *ref = tu_read_file(tu_shared_path("golden/mixtral-f32.logits.f32"), &ref_size);
    assert_non_null(ref);
    const size_t n_vocab = ref_size / sizeof(float) / (size_t)n_tok;
    assert_int_equal(n_vocab * sizeof(float) * (size_t)n_tok, ref_size);
    size_t len = 0;
    for (int i = 0; i < n_tok; i++)
        len += (size_t)snprintf(list + len, sizeof(list) - len, "%s%d", i ? "," : "", toks[i]);

    const char *lpath = tu_tmp_path(".f32");
    assert_int_equal(run("-m '%s' --tokens %s --logits-out '%s' -n 0 -t 2", model, list, lpath), 0);
    size_t size;
    float *got = tu_read_file(lpath, &size);
    assert_non_null(got);
    assert_int_equal(size, ref_size);
    double *row = malloc(n_vocab * sizeof(double));
    assert_non_null(row);
    for (int i = 0; i < n_tok; i++) {
        for (size_t v = 0; v < n_vocab; v++)
            row[v] = ref[(size_t)i * n_vocab + v];
        double e = tu_rel_l2(got + (size_t)i * n_vocab, row, n_vocab);
        if (!(e <= 1e-4))
            fail_msg("position %d: relative error %.3g > 1e-4", i, e);
    }
    free(row);
    free(got);
    free(ref);
    unlink(lpath);

    assert_int_equal(run("-m '%s' --tokens %s --temp 0 -n %d --json", model, list, n_greedy), 0);
    char *json = read_out();
    check_json_shape(json);
    int32_t ids[64];
    int n = json_ids(json, "tokens", ids, 64);
    assert_int_equal(n, n_greedy);
    assert_memory_equal(ids, greedy, (size_t)n_greedy * sizeof(int32_t));
    assert_int_equal(json_ids(json, "prompt_tokens", ids, 64), n_tok);
    assert_memory_equal(ids, toks, (size_t)n_tok * sizeof(int32_t));
    free(json);
}

/* --json: the keys, counts that agree, the text equal to what streams without --json; greedy
 * twice gives the same tokens, and so does sampling with the same seed. */
static void test_json_and_reproducible(void **state) {
    (void)state;
    struct tu_rng rng;
    tu_rng_init(&rng, tu_seed() ^ 0x5eed);
    const int n_predict = 4 + (int)(tu_rng_u64(&rng) % 12);
    static const char *const prompts[] = {"Once upon a time", "hello", "a b c", "\\\"quoted\\\""};
    const char *prompt = prompts[tu_rng_u64(&rng) % 4];

    assert_int_equal(run("-m %s -p \"%s\" --temp 0 -n %d --json", model_path, prompt, n_predict),
                     0);
    char *a = read_out();
    check_json_shape(a);
    int32_t pa[256], ta[256], tb[256];
    int n_pa = json_ids(a, "prompt_tokens", pa, 256), n_ta = json_ids(a, "tokens", ta, 256);
    assert_true(n_pa > 0);
    assert_true(n_ta >= 0 && n_ta <= n_predict);
    assert_int_equal(json_stat(a, "prompt_tokens"), n_pa);
    assert_int_equal(json_stat(a, "gen_tokens"), n_ta);
    for (int i = 0; i < n_pa; i++)
        assert_true(pa[i] >= 0 && pa[i] < 300);
    char *text = json_text(a);
    assert_non_null(text);

    /* through the GPU path on the simulated device, the GPU budget at its minimum (named by
     * the error below it): the same tokens, and the GPU figures in the stats */
    assert_int_equal(run("-m %s -p \"%s\" --temp 0 -n %d --json --device sim --gpu-mem 4K",
                         model_path, prompt, n_predict),
                     1);
    char *err0 = read_err(), *at = strstr(err0, "minimum for this model, ");
    assert_non_null(at);
    const unsigned long long gpu_min = strtoull(at + strlen("minimum for this model, "), NULL, 10);
    free(err0);
    assert_int_equal(run("-m %s -p \"%s\" --temp 0 -n %d --json --device sim --gpu-mem %llu",
                         model_path, prompt, n_predict, gpu_min),
                     0);
    char *g = read_out();
    assert_int_equal(json_ids(g, "tokens", tb, 256), n_ta);
    assert_memory_equal(ta, tb, (size_t)n_ta * sizeof(int32_t));
    assert_non_null(strstr(g, "\"gpu_bytes_copied\":"));
    free(g);

    /* the same run again: the same tokens */
    assert_int_equal(run("-m %s -p \"%s\" --temp 0 -n %d --json", model_path, prompt, n_predict),
                     0);
    char *b = read_out();
    assert_int_equal(json_ids(b, "tokens", tb, 256), n_ta);
    assert_memory_equal(ta, tb, (size_t)n_ta * sizeof(int32_t));
    free(b);

    /* without --json: the prompt, then the same text streams to stdout; timings on stderr */
    assert_int_equal(run("-m %s -p \"%s\" --temp 0 -n %d", model_path, prompt, n_predict), 0);
    char *plain = read_out();
    char *want = malloc(strlen(text) + 512);
    assert_non_null(want);
    char unq[64];
    size_t k = 0;
    for (const char *c = prompt; *c; c++) /* the shell removes the backslashes */
        if (*c != '\\')
            unq[k++] = *c;
    unq[k] = '\0';
    sprintf(want, "%s%s\n", unq, text);
    assert_string_equal(plain, want);
    char *err = read_err();
    assert_non_null(strstr(err, "prompt:"));
    assert_non_null(strstr(err, "tok/s"));
    free(err);
    free(want);
    free(plain);
    free(text);
    free(a);

    /* sampling with a seed is reproducible */
    uint64_t seed = tu_rng_u64(&rng) >> 1;
    const char *samp = "--temp 1.5 --top-k 0 --top-p 1 --min-p 0 --repeat-penalty 1.1";
    assert_int_equal(
        run("-m %s -p hello %s -s %llu -n 16 --json", model_path, samp, (unsigned long long)seed),
        0);
    a = read_out();
    n_ta = json_ids(a, "tokens", ta, 256);
    assert_true(n_ta >= 0);
    assert_int_equal(run("-m %s -p hello %s --seed %llu -n 16 --json", model_path, samp,
                         (unsigned long long)seed),
                     0);
    b = read_out();
    assert_int_equal(json_ids(b, "tokens", tb, 256), n_ta);
    assert_memory_equal(ta, tb, (size_t)n_ta * sizeof(int32_t));
    free(a);
    free(b);
}

/* A context smaller than prompt + -n: generation stops when it is full, and says so. */
static void test_context_full(void **state) {
    (void)state;
    /* 5 prompt tokens, a context of 8: at most 8 - 5 + 1 tokens (the last is not evaluated) */
    assert_int_equal(run("-m %s --tokens 1,40,50,60,70 -c 8 --temp 0 -n -1 --json", model_path), 0);
    char *json = read_out();
    int32_t ids[64];
    int n = json_ids(json, "tokens", ids, 64);
    assert_true(n >= 0 && n <= 4);
    if (n == 4) { /* no end-of-generation token on the way */
        char *err = read_err();
        assert_non_null(strstr(err, "context is full"));
        free(err);
    }
    free(json);
}

static void test_errors(void **state) {
    (void)state;
    int rc;
    /* bad flags and flag values: exit 2 */
    assert_int_equal(run("--bogus"), 2);
    expect_error(2, "--bogus");
    rc = run("-m %s --temp abc", model_path);
    assert_int_equal(rc, 2);
    expect_error(rc, "--temp");
    rc = run("-m %s -n x", model_path);
    assert_int_equal(rc, 2);
    expect_error(rc, "-n");
    rc = run("-m %s -n -2", model_path);
    assert_int_equal(rc, 2);
    expect_error(rc, "-n");
    rc = run("-m %s --prefetch sometimes", model_path);
    assert_int_equal(rc, 2);
    expect_error(rc, "--prefetch is off, on or auto");
    rc = run("-m %s --tokens 1,,2", model_path);
    assert_int_equal(rc, 2);
    expect_error(rc, "--tokens");
    rc = run("-m %s --tokens 1,-3", model_path);
    assert_int_equal(rc, 2);
    expect_error(rc, "--tokens");
    rc = run("-m %s -p x --tokens 1", model_path);
    assert_int_equal(rc, 2);
    expect_error(rc, "one prompt");
    rc = run("-m %s -p", model_path);
    assert_int_equal(rc, 2);
    expect_error(rc, "-p");
    rc = run("-m %s --tokenize", model_path);
    assert_int_equal(rc, 2);
    expect_error(rc, "--tokenize");
    /* files that do not open */
    rc = run("-m /nonexistent/model.gguf -p hi");
    expect_error(rc, "/nonexistent/model.gguf");
    rc = run("-m %s -f /nonexistent/prompt.txt", model_path);
    expect_error(rc, "/nonexistent/prompt.txt");
    /* sampling parameters the library rejects */
    rc = run("-m %s -p hi --top-p 2", model_path);
    expect_error(rc, "top_p");
    /* an id out of range (the vocabulary has 300), checked by the library */
    rc = run("-m %s --tokens 1,300", model_path);
    assert_int_equal(rc, 1);
    expect_error(rc, "300");
    /* a prompt longer than the context */
    rc = run("-m %s --tokens 1,2,3,4,5,6,7,8,9 -c 4", model_path);
    assert_int_equal(rc, 1);
    expect_error(rc, "context");
    /* devices: an unknown one, a GPU budget below the minimum (named), CUDA where there is no
     * GPU or no CUDA build (a message, exit 1) */
    rc = run("-m %s -p hi --device tpu", model_path);
    assert_int_equal(rc, 2);
    expect_error(rc, "--device");
    rc = run("-m %s --tokens 1,5 -n 1 --device sim --gpu-mem 64K", model_path);
    assert_int_equal(rc, 1);
    expect_error(rc, "minimum for this model");
    if (moerun_device_count(MOERUN_DEVICE_CUDA) == 0) {
        rc = run("-m %s --tokens 1,5 -n 1 --gpu-mem 1G", model_path);
        assert_int_equal(rc, 1);
        expect_error(rc, "CUDA");
    }
    rc = run("-m %s --tokens 1,5 -n 1 --device sim --mmap", model_path);
    assert_int_equal(rc, 1);
    expect_error(rc, "mmap");
    /* --logits-out into a folder that does not exist */
    rc = run("-m %s --tokens 1,5 -n 0 --logits-out /nonexistent/l.f32", model_path);
    assert_int_equal(rc, 1);
    expect_error(rc, "/nonexistent/l.f32");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tokenize_vocab),
        cmocka_unit_test(test_golden_logits_and_greedy),
        cmocka_unit_test(test_json_and_reproducible),
        cmocka_unit_test(test_context_full),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
