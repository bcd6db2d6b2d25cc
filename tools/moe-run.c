/* moe-run: run a Mixture-of-Experts model from a GGUF file.
 *
 * Today it opens and validates a model and prints its summary (--info); without -m it makes
 * the project's demo model first (moe-synth's generator, cached) and describes that. The forward
 * pass, tokenizer and sampler arrive with the next milestone (see README.md).
 */
#include "moerun.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct options {
    const char *model;
    int info;
    int meta;
    int n_threads;
};

static void usage(FILE *f) {
    fprintf(f, "usage: moe-run [-m FILE] [--info] [--meta] [-t N]\n"
               "\n"
               "  -m, --model FILE   GGUF model to open (default: the demo model, generated on\n"
               "                     first use into $MOERUN_CACHE_DIR, $XDG_CACHE_HOME/moerun or\n"
               "                     ~/.cache/moerun)\n"
               "  --info             print the model summary: architecture, hyper-parameters,\n"
               "                     tensors and bytes by type, expert bytes per layer\n"
               "  --meta             also list every metadata key and value\n"
               "  -t, --threads N    compute threads (default: one per core)\n"
               "  -h, --help         this text\n"
               "  --version          library version\n");
}

static int parse_int(const char *flag, const char *s, int lo, int hi, int *out) {
    char *end;
    errno = 0;
    long v = s ? strtol(s, &end, 10) : 0;
    if (!s || errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "moe-run: %s needs an integer in [%d, %d], got '%s'\n", flag, lo, hi,
                s ? s : "");
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* 0: parsed; 1: exit 0 (help, version); -1: error. */
static int parse_args(int argc, char **argv, struct options *o) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 1;
        } else if (!strcmp(a, "--version")) {
            printf("moe-run (moerun %s)\n", moerun_version());
            return 1;
        } else if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            if (!val) {
                fprintf(stderr, "moe-run: %s needs a file\n", a);
                return -1;
            }
            o->model = val;
            i++;
        } else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) {
            if (parse_int(a, val, 1, 1024, &o->n_threads))
                return -1;
            i++;
        } else if (!strcmp(a, "--info")) {
            o->info = 1;
        } else if (!strcmp(a, "--meta")) {
            o->info = 1;
            o->meta = 1;
        } else {
            fprintf(stderr, "moe-run: unknown option '%s' (see moe-run --help)\n", a);
            return -1;
        }
    }
    return 0;
}

static void print_size(FILE *f, uint64_t bytes) {
    if (bytes >= (1ull << 30))
        fprintf(f, "%.2f GiB", (double)bytes / (1ull << 30));
    else if (bytes >= (1ull << 20))
        fprintf(f, "%.2f MiB", (double)bytes / (1ull << 20));
    else if (bytes >= (1ull << 10))
        fprintf(f, "%.2f KiB", (double)bytes / (1ull << 10));
    else
        fprintf(f, "%llu B", (unsigned long long)bytes);
}

static int print_info(const char *path, const moerun_model *m, int meta) {
    moerun_model_info in = {.struct_size = sizeof(in)};
    if (moerun_model_get_info(m, &in) != MOERUN_OK)
        return -1;
    printf("file          %s\n", path);
    printf("size          ");
    print_size(stdout, in.file_bytes);
    printf(" (GGUF v%u, %llu metadata keys, alignment %u, data at %llu)\n", in.gguf_version,
           (unsigned long long)in.n_kv, in.alignment, (unsigned long long)in.data_offset);
    printf("architecture  %s%s%s\n", in.arch, in.name[0] ? ", " : "", in.name);
    printf("vocab         %u\n", in.n_vocab);
    printf("context       %u (trained)\n", in.n_ctx_train);
    printf("embedding     %u\n", in.n_embd);
    printf("layers        %u\n", in.n_layer);
    printf("heads         %u query, %u key/value", in.n_head, in.n_head_kv);
    if (in.n_head)
        printf(" (head size %u, rope dims %u)", in.n_embd / in.n_head, in.n_rot);
    printf("\n");
    printf("rope base     %g\n", in.rope_freq_base);
    printf("rms eps       %g\n", in.rms_eps);
    if (in.n_expert)
        printf("experts       %u per layer, %u used per token, expert FFN %u\n", in.n_expert,
               in.n_expert_used, in.n_ff_exp);
    else
        printf("experts       none (dense model)\n");
    if (in.n_ff && in.n_ff != in.n_ff_exp) /* Mixtral files give the expert width here too */
        printf("FFN           %u (feed_forward_length)\n", in.n_ff);
    printf("tensors       %llu, ", (unsigned long long)in.n_tensors);
    print_size(stdout, in.tensor_bytes);
    printf("\n");
    for (int t = 0; t < 64; t++) {
        uint64_t n = 0, bytes = 0;
        if (!moerun_type_name(t) || moerun_model_type_bytes(m, t, &n, &bytes) != MOERUN_OK ||
            n == 0)
            continue;
        printf("  %-8s    %6llu tensors, ", moerun_type_name(t), (unsigned long long)n);
        print_size(stdout, bytes);
        printf("%s\n", moerun_type_is_supported(t) ? "" : " (not supported for compute)");
    }
    if (in.expert_bytes) {
        printf("expert bytes  ");
        print_size(stdout, in.expert_bytes);
        printf(" (%.1f%% of the tensor data)\n", 100.0 * in.expert_bytes / in.tensor_bytes);
        for (uint32_t il = 0; il < in.n_layer; il++) {
            uint64_t all = 0, one = 0;
            moerun_model_layer_expert_bytes(m, il, &all, &one);
            printf("  layer %-4u  ", il);
            print_size(stdout, all);
            if (one) {
                printf(" = %llu x ", (unsigned long long)(all / one));
                print_size(stdout, one);
            }
            printf("\n");
        }
    }
    if (meta) {
        printf("metadata\n");
        for (uint64_t i = 0; i < in.n_kv; i++) {
            char val[256];
            moerun_model_meta_value_str(m, i, val, sizeof(val));
            printf("  %-40s %s\n", moerun_model_meta_key(m, i), val);
        }
    }
    return 0;
}

static int mkdir_p(const char *dir) {
    char buf[PATH_MAX];
    if (snprintf(buf, sizeof(buf), "%s", dir) >= (int)sizeof(buf))
        return -1;
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST)
            return -1;
        *p = '/';
    }
    return mkdir(buf, 0755) != 0 && errno != EEXIST ? -1 : 0;
}

/* The demo model: a small Mixtral-style model, made once and cached. */
static int demo_model_path(char *path, size_t size, int n_threads) {
    char dir[PATH_MAX];
    const char *env = getenv("MOERUN_CACHE_DIR");
    const char *xdg = getenv("XDG_CACHE_HOME");
    const char *home = getenv("HOME");
    if (env && *env)
        snprintf(dir, sizeof(dir), "%s", env);
    else if (xdg && *xdg)
        snprintf(dir, sizeof(dir), "%s/moerun", xdg);
    else if (home && *home)
        snprintf(dir, sizeof(dir), "%s/.cache/moerun", home);
    else
        snprintf(dir, sizeof(dir), "/tmp/moerun-cache");
    if (snprintf(path, size, "%s/demo-mixtral-q8_0-v1.gguf", dir) >= (int)size)
        return -1;
    if (access(path, R_OK) == 0)
        return 0;
    if (mkdir_p(dir) != 0) {
        fprintf(stderr, "moe-run: cannot create the cache folder %s: %s\n", dir, strerror(errno));
        return -1;
    }
    moerun_synth_params p;
    moerun_synth_params_init(&p);
    p.weight_type = MOERUN_TYPE_Q8_0;
    p.n_vocab = 4096;
    p.n_embd = 512;
    p.n_layer = 4;
    p.n_head = 8;
    p.n_head_kv = 4;
    p.n_expert = 8;
    p.n_expert_used = 2;
    p.n_ff = 1024;
    p.seed = 1;
    p.n_threads = n_threads;
    fprintf(stderr, "moe-run: generating the demo model %s ...\n", path);
    int rc = moerun_synth_write(&p, path);
    if (rc != MOERUN_OK) {
        fprintf(stderr, "moe-run: cannot write the demo model: %s\n", moerun_errmsg());
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    struct options o = {0};
    int rc = parse_args(argc, argv, &o);
    if (rc != 0)
        return rc > 0 ? 0 : 2;

    char demo[PATH_MAX];
    const char *path = o.model;
    if (!path) {
        if (demo_model_path(demo, sizeof(demo), o.n_threads) != 0)
            return 1;
        path = demo;
    }

    moerun_model_params mp;
    moerun_model_params_init(&mp);
    mp.n_threads = o.n_threads;
    moerun_model *m = NULL;
    rc = moerun_model_open(path, &mp, &m);
    if (rc != MOERUN_OK) {
        fprintf(stderr, "moe-run: cannot open %s: %s (%s)\n", path, moerun_errmsg(),
                moerun_status_str(rc));
        return 1;
    }
    if (!o.info)
        fprintf(stderr, "moe-run: generation arrives with the forward pass (next milestone); "
                        "showing the model summary\n");
    rc = print_info(path, m, o.meta);
    moerun_model_close(m);
    return rc == 0 ? 0 : 1;
}
