/* moe-run: run a Mixture-of-Experts model from a GGUF file.
 *
 * Generates text from a prompt (-p, -f, or token ids with --tokens), streaming it to stdout as
 * it is produced, with llama.cpp's sampling flags; --json prints the result and timings as one
 * object, --logits-out writes the prompt's logits, --tokenize only tokenizes, --info/--meta
 * print the model summary. Without -m it makes the project's demo model first (moe-synth's
 * generator, cached) and uses that. Exit status: 0 done, 1 a runtime error (a file that does
 * not open, a prompt longer than the context, ids out of range), 2 a bad command line.
 */
#include "moe-run.h"
#include "moerun.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_PROMPT "Once upon a time"

struct options {
    const char *model;
    const char *prompt;      /* -p */
    const char *prompt_file; /* -f */
    const char *tokens;      /* --tokens: comma-separated ids */
    const char *logits_out;  /* --logits-out FILE */
    int info;
    int meta;
    int json;
    int tokenize;
    int parse_special;
    int n_threads;              /* 0 = one per core */
    int n_predict;              /* tokens to generate; -1 = until EOG or the context is full */
    int n_ctx;                  /* 0 = the model's, capped at 4096 */
    int n_batch;                /* 0 = the library's */
    moerun_sampler_params samp; /* sampling flags over the library's defaults */
    uint64_t host_mem;          /* --host-mem: host tier budget, bytes; 0 = all resident */
    uint64_t gpu_mem;           /* --gpu-mem: GPU tier budget, bytes; 0 = automatic */
    int device;                 /* --device: moerun_device; CPU unless --gpu-mem */
    int device_set;             /* --device given */
    int gpu_index;              /* --gpu N */
    int policy;                 /* --policy */
    int prefetch;               /* --prefetch (moerun_prefetch); --no-prefetch: off */
    int prefetch_layers;        /* --prefetch-layers */
    int direct_io;              /* 0 with --no-direct-io */
    int use_mmap;               /* --mmap */
    int stats;                  /* --stats */
    const char *trace_out;      /* --trace-out FILE */
};

static void usage(FILE *f) {
    fprintf(
        f, "usage: moe-run [-m FILE] [-p TEXT | -f FILE | --tokens IDS] [options]\n"
           "       moe-run [-m FILE] --info | --meta\n"
           "       moe-run [-m FILE] --tokenize (-p TEXT | -f FILE) [--parse-special]\n"
           "\n"
           "  -m, --model FILE        GGUF model to open (default: the demo model, generated on\n"
           "                          first use into $MOERUN_CACHE_DIR, $XDG_CACHE_HOME/moerun or\n"
           "                          ~/.cache/moerun)\n"
           "  -p, --prompt TEXT       prompt (default: \"" DEFAULT_PROMPT "\"); BOS is added as\n"
           "                          the model asks\n"
           "  -f, --file FILE         read the prompt from a file\n"
           "  --tokens IDS            use these token ids as the prompt (\"1,15043,3186\"; no BOS\n"
           "                          added)\n"
           "  -n, --n-predict N       tokens to generate (default 64; -1 = until an end-of-\n"
           "                          generation token or the context is full)\n"
           "  -c, --ctx-size N        context length (default 0 = the model's, at most 4096)\n"
           "  -b, --batch-size N      most prompt tokens computed together (default 0 = 512)\n"
           "  -t, --threads N         compute threads (default: one per core)\n"
           "  --host-mem SIZE         host memory for weights (e.g. 6G, 512M): the weights stay\n"
           "                          in the file and move through this much memory (default:\n"
           "                          read the whole model into memory)\n"
           "  --device D              what computes: cpu, cuda or sim (the GPU path on the CPU,\n"
           "                          for tests); default cpu, or cuda with --gpu-mem\n"
           "  --gpu-mem SIZE          GPU memory for weights, KV cache and scratch (e.g. 8G):\n"
           "                          weights move NVMe -> pinned host (--host-mem, default\n"
           "                          automatic) -> GPU; 0 = the free memory less 1 GiB\n"
           "  --gpu N                 which CUDA device (default 0)\n"
           "  --policy P              expert eviction: lru, lfu or predicted (default lru)\n"
           "  --prefetch MODE         load predicted experts ahead: auto (while it pays,\n"
           "                          default), on or off\n"
           "  --no-prefetch           --prefetch off: load experts only when needed\n"
           "  --prefetch-layers N     layers predicted ahead (default 1)\n"
           "  --no-direct-io          buffered reads instead of O_DIRECT\n"
           "  --mmap                  map the file and compute from the page cache (no tiers;\n"
           "                          a baseline)\n"
           "  --stats                 print the tier statistics to stderr at the end\n"
           "  --trace-out FILE        write the routing of every token and layer as JSON lines\n"
           "  -s, --seed N            sampling seed (default -1 = random)\n"
           "  --temp X                temperature; 0 = greedy (default 0.8)\n"
           "  --top-k N               keep the N most likely tokens; 0 = off (default 40)\n"
           "  --top-p X               nucleus sampling; 1 = off (default 0.95)\n"
           "  --min-p X               drop tokens below X times the top probability (default "
           "0.05)\n"
           "  --repeat-penalty X      penalise recent tokens; 1 = off (default 1.0)\n"
           "  --repeat-last-n N       how many recent tokens the penalty looks at (default 64)\n"
           "  --json                  print one JSON object at the end (tokens, text, timings)\n"
           "                          instead of streaming the text\n"
           "  --logits-out FILE       write the logits of every prompt position: float32\n"
           "                          little-endian, [n_prompt][n_vocab]\n"
           "  --tokenize              print the prompt's token ids as a JSON array and exit\n"
           "  --parse-special         with --tokenize: text such as \"<s>\" becomes the special\n"
           "                          token\n"
           "  --info                  print the model summary: architecture, hyper-parameters,\n"
           "                          tensors and bytes by type, expert bytes per layer\n"
           "  --meta                  also list every metadata key and value\n"
           "  -h, --help              this text\n"
           "  --version               library version\n");
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

static int parse_float(const char *flag, const char *s, float *out) {
    char *end;
    errno = 0;
    float v = s ? strtof(s, &end) : 0;
    if (!s || errno || end == s || *end || !isfinite(v)) {
        fprintf(stderr, "moe-run: %s needs a number, got '%s'\n", flag, s ? s : "");
        return -1;
    }
    *out = v;
    return 0;
}

/* A seed: 0 .. 2^64 - 2, or -1 for a random one. */
static int parse_seed(const char *flag, const char *s, uint64_t *out) {
    if (s && !strcmp(s, "-1")) {
        *out = MOERUN_SEED_RANDOM;
        return 0;
    }
    char *end;
    errno = 0;
    unsigned long long v = s && *s != '-' ? strtoull(s, &end, 10) : 0;
    if (!s || *s == '-' || errno || end == s || *end || v == MOERUN_SEED_RANDOM) {
        fprintf(stderr, "moe-run: %s needs an integer in [0, 2^64 - 2] or -1, got '%s'\n", flag,
                s ? s : "");
        return -1;
    }
    *out = v;
    return 0;
}

/* "6G", "512M", "64K", "1.5G" or a byte count. */
static int parse_size(const char *flag, const char *s, uint64_t *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    double mul = 1;
    if (end != s && *end) {
        switch (*end) {
        case 'k':
        case 'K':
            mul = 1024.0;
            break;
        case 'm':
        case 'M':
            mul = 1024.0 * 1024;
            break;
        case 'g':
        case 'G':
            mul = 1024.0 * 1024 * 1024;
            break;
        case 't':
        case 'T':
            mul = 1024.0 * 1024 * 1024 * 1024;
            break;
        default:
            mul = 0;
        }
        end++;
        if (*end == 'i' || *end == 'I')
            end++;
        if (*end == 'b' || *end == 'B')
            end++;
    }
    if (end == s || *end || errno || mul == 0 || !(v > 0) || v * mul > 1e18) {
        fprintf(stderr, "moe-run: %s needs a size such as 6G, 512M or 1048576, got '%s'\n", flag,
                s);
        return -1;
    }
    *out = (uint64_t)(v * mul);
    return 0;
}

/* A flag whose value is one of names[], NULL-terminated: *out = its index (the enum value). */
static int parse_choice(const char *flag, const char *s, const char *const names[], int *out) {
    int n = 0;
    for (; names[n]; n++)
        if (!strcmp(s, names[n])) {
            *out = n;
            return 0;
        }
    fprintf(stderr, "moe-run: %s is ", flag);
    for (int i = 0; i < n; i++)
        fprintf(stderr, "%s%s", i == 0 ? "" : i == n - 1 ? " or " : ", ", names[i]);
    fprintf(stderr, ", got '%s'\n", s);
    return -1;
}

/* in the order of their enums: moerun_policy, moerun_prefetch, moerun_device */
static const char *const policy_names[] = {"lru", "lfu", "predicted", NULL};
static const char *const prefetch_names[] = {"off", "on", "auto", NULL};
static const char *const device_names[] = {"cpu", "cuda", "sim", NULL};

static int flag_is(const char *a, const char *short_name, const char *long_name) {
    return (short_name && !strcmp(a, short_name)) || !strcmp(a, long_name);
}

/* 0: parsed; 1: exit 0 (help, version); -1: error. */
static int parse_args(int argc, char **argv, struct options *o) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        int takes_value = 1, rc = 0;
        if (flag_is(a, "-h", "--help")) {
            usage(stdout);
            return 1;
        } else if (!strcmp(a, "--version")) {
            printf("moe-run (moerun %s)\n", moerun_version());
            return 1;
        } else if (!strcmp(a, "--info")) {
            o->info = 1;
            takes_value = 0;
        } else if (!strcmp(a, "--meta")) {
            o->info = 1;
            o->meta = 1;
            takes_value = 0;
        } else if (!strcmp(a, "--json")) {
            o->json = 1;
            takes_value = 0;
        } else if (!strcmp(a, "--tokenize")) {
            o->tokenize = 1;
            takes_value = 0;
        } else if (!strcmp(a, "--parse-special")) {
            o->parse_special = 1;
            takes_value = 0;
        } else if (!strcmp(a, "--no-prefetch")) {
            o->prefetch = MOERUN_PREFETCH_OFF;
            takes_value = 0;
        } else if (!strcmp(a, "--no-direct-io")) {
            o->direct_io = 0;
            takes_value = 0;
        } else if (!strcmp(a, "--mmap")) {
            o->use_mmap = 1;
            takes_value = 0;
        } else if (!strcmp(a, "--stats")) {
            o->stats = 1;
            takes_value = 0;
        } else if (!val) {
            if (flag_is(a, "-m", "--model") || flag_is(a, "-p", "--prompt") ||
                flag_is(a, "-f", "--file") || !strcmp(a, "--tokens") ||
                !strcmp(a, "--logits-out") || flag_is(a, "-n", "--n-predict") ||
                flag_is(a, "-c", "--ctx-size") || flag_is(a, "-b", "--batch-size") ||
                flag_is(a, "-t", "--threads") || flag_is(a, "-s", "--seed") ||
                !strcmp(a, "--temp") || !strcmp(a, "--top-k") || !strcmp(a, "--top-p") ||
                !strcmp(a, "--min-p") || !strcmp(a, "--repeat-penalty") ||
                !strcmp(a, "--repeat-last-n") || !strcmp(a, "--host-mem") ||
                !strcmp(a, "--policy") || !strcmp(a, "--prefetch") ||
                !strcmp(a, "--prefetch-layers") || !strcmp(a, "--trace-out") ||
                !strcmp(a, "--device") || !strcmp(a, "--gpu-mem") || !strcmp(a, "--gpu"))
                fprintf(stderr, "moe-run: %s needs a value\n", a);
            else
                fprintf(stderr, "moe-run: unknown option '%s' (see moe-run --help)\n", a);
            return -1;
        } else if (flag_is(a, "-m", "--model")) {
            o->model = val;
        } else if (flag_is(a, "-p", "--prompt")) {
            o->prompt = val;
        } else if (flag_is(a, "-f", "--file")) {
            o->prompt_file = val;
        } else if (!strcmp(a, "--tokens")) {
            o->tokens = val;
        } else if (!strcmp(a, "--logits-out")) {
            o->logits_out = val;
        } else if (flag_is(a, "-n", "--n-predict")) {
            rc = parse_int(a, val, -1, INT_MAX, &o->n_predict);
        } else if (flag_is(a, "-c", "--ctx-size")) {
            rc = parse_int(a, val, 0, INT_MAX, &o->n_ctx);
        } else if (flag_is(a, "-b", "--batch-size")) {
            rc = parse_int(a, val, 0, INT_MAX, &o->n_batch);
        } else if (flag_is(a, "-t", "--threads")) {
            rc = parse_int(a, val, 1, 1024, &o->n_threads);
        } else if (flag_is(a, "-s", "--seed")) {
            rc = parse_seed(a, val, &o->samp.seed);
        } else if (!strcmp(a, "--temp")) {
            rc = parse_float(a, val, &o->samp.temp);
        } else if (!strcmp(a, "--top-k")) {
            rc = parse_int(a, val, 0, INT32_MAX, &o->samp.top_k);
        } else if (!strcmp(a, "--top-p")) {
            rc = parse_float(a, val, &o->samp.top_p);
        } else if (!strcmp(a, "--min-p")) {
            rc = parse_float(a, val, &o->samp.min_p);
        } else if (!strcmp(a, "--repeat-penalty")) {
            rc = parse_float(a, val, &o->samp.repeat_penalty);
        } else if (!strcmp(a, "--repeat-last-n")) {
            rc = parse_int(a, val, 0, INT32_MAX, &o->samp.repeat_last_n);
        } else if (!strcmp(a, "--host-mem")) {
            rc = parse_size(a, val, &o->host_mem);
        } else if (!strcmp(a, "--gpu-mem")) { /* 0: the device's free memory less 1 GiB */
            o->gpu_mem = 0;
            rc = strcmp(val, "0") ? parse_size(a, val, &o->gpu_mem) : 0;
            o->device = o->device_set ? o->device : MOERUN_DEVICE_CUDA;
        } else if (!strcmp(a, "--device")) {
            rc = parse_choice(a, val, device_names, &o->device);
            o->device_set = 1;
        } else if (!strcmp(a, "--gpu")) {
            rc = parse_int(a, val, 0, 1024, &o->gpu_index);
        } else if (!strcmp(a, "--policy")) {
            rc = parse_choice(a, val, policy_names, &o->policy);
        } else if (!strcmp(a, "--prefetch")) {
            rc = parse_choice(a, val, prefetch_names, &o->prefetch);
        } else if (!strcmp(a, "--prefetch-layers")) {
            rc = parse_int(a, val, 1, 64, &o->prefetch_layers);
        } else if (!strcmp(a, "--trace-out")) {
            o->trace_out = val;
        } else {
            fprintf(stderr, "moe-run: unknown option '%s' (see moe-run --help)\n", a);
            return -1;
        }
        if (rc)
            return -1;
        i += takes_value;
    }
    int sources = (o->prompt != NULL) + (o->prompt_file != NULL) + (o->tokens != NULL);
    if (sources > 1) {
        fprintf(stderr, "moe-run: give one prompt: -p, -f or --tokens\n");
        return -1;
    }
    if (o->tokenize && o->tokens) {
        fprintf(stderr, "moe-run: --tokenize tokenizes text (-p or -f), not --tokens\n");
        return -1;
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
    if (snprintf(path, size, "%s/demo-mixtral-q8_0-v2.gguf", dir) >= (int)size)
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

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* A whole file into a NUL-terminated malloc'd buffer (*len bytes); NULL with errno on failure. */
static char *read_text(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    struct buf b = {0};
    char chunk[65536];
    size_t n;
    while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0)
        buf_put(&b, chunk, n);
    int bad = ferror(f) || b.failed;
    fclose(f);
    if (bad) {
        free(b.data);
        errno = EIO;
        return NULL;
    }
    if (!b.data) {
        b.data = calloc(1, 1);
        if (!b.data)
            return NULL;
    }
    *len = b.len;
    return b.data;
}

/* "1,2, 3" into ids; the library checks them against the vocabulary. 0 or -1 (message). */
static int parse_token_list(const char *s, int32_t **out, size_t *n_out) {
    size_t cap = 1;
    for (const char *p = s; *p; p++)
        cap += *p == ',';
    int32_t *ids = malloc(cap * sizeof(*ids));
    if (!ids) {
        fprintf(stderr, "moe-run: out of memory\n");
        return -1;
    }
    size_t n = 0;
    const char *p = s;
    for (;;) {
        char *end;
        while (*p == ' ')
            p++;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > INT32_MAX) {
            fprintf(stderr, "moe-run: --tokens needs comma-separated ids >= 0, got '%s'\n", s);
            free(ids);
            return -1;
        }
        ids[n++] = (int32_t)v;
        p = end;
        while (*p == ' ')
            p++;
        if (*p == '\0')
            break;
        if (*p != ',' || n == cap) {
            fprintf(stderr, "moe-run: --tokens needs comma-separated ids >= 0, got '%s'\n", s);
            free(ids);
            return -1;
        }
        p++;
    }
    *out = ids;
    *n_out = n;
    return 0;
}

static int tokenize_text(const moerun_model *m, const char *text, size_t len, int parse_special,
                         int32_t **out, size_t *n_out) {
    size_t cap = len + 16, n = 0;
    int32_t *ids = NULL;
    for (int attempt = 0; attempt < 2; attempt++) {
        ids = malloc((cap ? cap : 1) * sizeof(*ids));
        if (!ids) {
            fprintf(stderr, "moe-run: out of memory for %zu tokens\n", cap);
            return -1;
        }
        int rc = moerun_tokenize(m, text, len, 1, parse_special, ids, cap, &n);
        if (rc == MOERUN_OK) {
            *out = ids;
            *n_out = n;
            return 0;
        }
        free(ids);
        ids = NULL;
        if (rc != MOERUN_ERR_RANGE || n <= cap) {
            fprintf(stderr, "moe-run: cannot tokenize the prompt: %s (%s)\n", moerun_errmsg(),
                    moerun_status_str(rc));
            return -1;
        }
        cap = n;
    }
    fprintf(stderr, "moe-run: cannot tokenize the prompt: the token count changed\n");
    return -1;
}

/* Decode the prompt, then sample, print and decode one token at a time until -n tokens, an
 * end-of-generation token or a full context. Returns the exit status. */
/* Whether the weights go through tiers (so there are statistics to show). */
static int tiered(const struct options *o) {
    return o->host_mem || o->device != MOERUN_DEVICE_CPU;
}

static int generate(const struct options *o, moerun_model *m, const int32_t *prompt,
                    size_t n_prompt, const char *prompt_text, size_t prompt_len) {
    int status = 1, rc;
    const uint32_t n_vocab = moerun_model_n_vocab(m);
    moerun_session *s = NULL;
    moerun_sampler *smp = NULL;
    float *logits = NULL;
    int32_t *gen = NULL;
    struct buf text = {0};
    struct trace trace = {0};

    rc = moerun_sampler_create(&o->samp, n_vocab, &smp);
    if (rc != MOERUN_OK) {
        fprintf(stderr, "moe-run: bad sampling parameters: %s (%s)\n", moerun_errmsg(),
                moerun_status_str(rc));
        goto out;
    }

    moerun_session_params sp;
    moerun_session_params_init(&sp);
    sp.n_ctx = (uint32_t)o->n_ctx;
    sp.n_batch = (uint32_t)o->n_batch;
    sp.n_threads = o->n_threads;
    rc = moerun_session_create(m, &sp, &s);
    if (rc != MOERUN_OK) {
        fprintf(stderr, "moe-run: cannot create a session: %s (%s)\n", moerun_errmsg(),
                moerun_status_str(rc));
        goto out;
    }
    const uint32_t n_ctx = moerun_session_n_ctx(s);
    if (n_prompt > n_ctx) {
        fprintf(stderr,
                "moe-run: the prompt (%zu tokens) is longer than the context (%u tokens; "
                "see -c)\n",
                n_prompt, n_ctx);
        goto out;
    }
    /* logits: every prompt position with --logits-out, else the last one */
    const size_t rows = o->logits_out ? n_prompt : 1;
    if (n_vocab == 0 || rows > SIZE_MAX / sizeof(float) / n_vocab ||
        !(logits = malloc(rows * n_vocab * sizeof(float)))) {
        fprintf(stderr, "moe-run: out of memory for %zu x %u logits\n", rows, n_vocab);
        goto out;
    }
    const size_t n_gen_max = o->n_predict < 0 ? n_ctx : (size_t)o->n_predict;
    gen = malloc((n_gen_max ? n_gen_max : 1) * sizeof(*gen));
    if (!gen) {
        fprintf(stderr, "moe-run: out of memory\n");
        goto out;
    }

    if (o->trace_out) {
        trace.f = fopen(o->trace_out, "w");
        if (!trace.f) {
            fprintf(stderr, "moe-run: cannot write %s: %s\n", o->trace_out, strerror(errno));
            goto out;
        }
        moerun_session_set_route_callback(s, trace_route, &trace);
    }
    if (!o->json && prompt_text) {
        fwrite(prompt_text, 1, prompt_len, stdout);
        fflush(stdout);
    }
    moerun_model_reset_stats(m);
    const double t0 = now_ms();
    rc = moerun_session_decode(s, prompt, n_prompt, logits, o->logits_out != NULL);
    if (rc != MOERUN_OK) {
        fprintf(stderr, "moe-run: cannot evaluate the prompt: %s (%s)\n", moerun_errmsg(),
                moerun_status_str(rc));
        for (size_t i = 0; i < n_prompt; i++)
            if (prompt[i] < 0 || (uint32_t)prompt[i] >= n_vocab) {
                fprintf(stderr,
                        "moe-run: token id %d at position %zu is out of range (the "
                        "vocabulary has %u tokens)\n",
                        prompt[i], i, n_vocab);
                break;
            }
        goto out;
    }
    const double t1 = now_ms();
    if (trace_flush(&trace) != 0) {
        fprintf(stderr, "moe-run: writing %s failed\n", o->trace_out);
        goto out;
    }
    moerun_stats st = {.struct_size = sizeof(st)};
    moerun_model_get_stats(m, &st);
    const uint64_t prompt_bytes = st.nvme_bytes_read;
    moerun_model_reset_stats(m); /* the figures printed are the decode phase's */
    if (o->logits_out && write_logits(o->logits_out, logits, n_prompt * (size_t)n_vocab) != 0)
        goto out;
    float *last = logits + (rows - 1) * (size_t)n_vocab;
    for (size_t i = 0; i < n_prompt; i++)
        moerun_sampler_accept(smp, prompt[i]);

    size_t n_gen = 0;
    moerun_detok dt;
    memset(&dt, 0, sizeof(dt));
    char piece[1024];
    while (n_gen < n_gen_max) {
        int32_t tok = moerun_sampler_sample(smp, last);
        if (tok < 0) {
            fprintf(stderr, "moe-run: cannot sample: %s (%s)\n", moerun_errmsg(),
                    moerun_status_str(tok));
            goto out;
        }
        if (moerun_token_is_eog(m, tok))
            break;
        moerun_sampler_accept(smp, tok);
        gen[n_gen++] = tok;
        int np = moerun_detok_push(m, &dt, tok, piece, sizeof(piece));
        if (np < 0) {
            fprintf(stderr, "moe-run: cannot detokenize token %d: %s\n", tok, moerun_errmsg());
            goto out;
        }
        buf_put(&text, piece, (size_t)np);
        if (!o->json && np > 0) {
            fwrite(piece, 1, (size_t)np, stdout);
            fflush(stdout);
        }
        if (moerun_session_n_past(s) >= n_ctx) {
            if (n_gen < n_gen_max)
                fprintf(stderr, "%smoe-run: the context is full (%u tokens; see -c)\n",
                        o->json ? "" : "\n", n_ctx);
            break;
        }
        rc = moerun_session_decode(s, &tok, 1, last, 0);
        if (rc == MOERUN_OK && trace_flush(&trace) != 0) {
            fprintf(stderr, "moe-run: writing %s failed\n", o->trace_out);
            goto out;
        }
        if (rc != MOERUN_OK) {
            fprintf(stderr, "moe-run: cannot evaluate token %d: %s (%s)\n", tok, moerun_errmsg(),
                    moerun_status_str(rc));
            goto out;
        }
    }
    int np = moerun_detok_flush(&dt, piece, sizeof(piece));
    if (np > 0) {
        buf_put(&text, piece, (size_t)np);
        if (!o->json)
            fwrite(piece, 1, (size_t)np, stdout);
    }
    const double t2 = now_ms();
    if (text.failed) {
        fprintf(stderr, "moe-run: out of memory for the generated text\n");
        goto out;
    }

    const double prompt_ms = t1 - t0, gen_ms = t2 - t1;
    const double prompt_tps = prompt_ms > 0 ? n_prompt * 1e3 / prompt_ms : 0;
    const double gen_tps = gen_ms > 0 && n_gen ? n_gen * 1e3 / gen_ms : 0;
    if (o->json) {
        printf("{\"prompt_tokens\":");
        json_ids(stdout, prompt, n_prompt);
        printf(",\"tokens\":");
        json_ids(stdout, gen, n_gen);
        printf(",\"text\":");
        json_string(stdout, text.data ? text.data : "", text.len);
        printf(",\"stats\":{\"prompt_tokens\":%zu,\"prompt_ms\":%.3f,\"prompt_tps\":%.2f,"
               "\"gen_tokens\":%zu,\"gen_ms\":%.3f,\"gen_tps\":%.2f",
               n_prompt, prompt_ms, prompt_tps, n_gen, gen_ms, gen_tps);
        if (tiered(o)) {
            moerun_model_get_stats(m, &st);
            print_tier_stats(stdout, 1, &st, prompt_bytes, n_gen, gen_ms);
        }
        printf("}}\n");
    } else {
        printf("\n");
    }
    fflush(stdout);
    fprintf(stderr,
            "moe-run: prompt: %zu tokens in %.1f ms (%.1f tok/s)  decode: %zu tokens in %.1f ms "
            "(%.1f tok/s)\n",
            n_prompt, prompt_ms, prompt_tps, n_gen, gen_ms, gen_tps);
    if (o->stats && tiered(o)) {
        moerun_model_get_stats(m, &st);
        print_tier_stats(stderr, 0, &st, prompt_bytes, n_gen, gen_ms);
    } else if (o->stats) {
        fprintf(stderr, "moe-run: no tier statistics: the whole model is in memory (see "
                        "--host-mem and --gpu-mem)\n");
    }
    status = 0;
    if (trace.f && (trace_flush(&trace) != 0 || fclose(trace.f) != 0)) {
        fprintf(stderr, "moe-run: writing %s failed\n", o->trace_out);
        status = 1;
    }
    trace.f = NULL;
out:
    if (trace.f)
        fclose(trace.f);
    free(trace.recs);
    free(trace.text.data);
    free(text.data);
    free(gen);
    free(logits);
    moerun_sampler_destroy(smp);
    moerun_session_destroy(s);
    return status;
}

int main(int argc, char **argv) {
    struct options o = {
        .n_predict = 64, .prefetch = MOERUN_PREFETCH_AUTO, .prefetch_layers = 1, .direct_io = 1};
    moerun_sampler_params_init(&o.samp);
    int rc = parse_args(argc, argv, &o);
    if (rc != 0)
        return rc > 0 ? 0 : 2;
    if (o.tokenize && !o.prompt && !o.prompt_file) {
        fprintf(stderr, "moe-run: --tokenize needs a text (-p or -f)\n");
        return 2;
    }

    /* the prompt text first: a file that does not open fails before the model is read */
    char *file_text = NULL;
    const char *text = NULL;
    size_t text_len = 0;
    if (o.prompt_file) {
        file_text = read_text(o.prompt_file, &text_len);
        if (!file_text) {
            fprintf(stderr, "moe-run: cannot read the prompt file %s: %s\n", o.prompt_file,
                    strerror(errno));
            return 1;
        }
        text = file_text;
    } else if (o.prompt) {
        text = o.prompt;
        text_len = strlen(text);
    } else if (!o.tokens) {
        text = DEFAULT_PROMPT;
        text_len = strlen(text);
    }

    int status = 1;
    int32_t *ids = NULL;
    size_t n_ids = 0;
    moerun_model *m = NULL;
    char demo[PATH_MAX];
    const char *path = o.model;
    if (o.tokens && parse_token_list(o.tokens, &ids, &n_ids) != 0) {
        status = 2;
        goto out;
    }
    if (!path) {
        if (demo_model_path(demo, sizeof(demo), o.n_threads) != 0)
            goto out;
        path = demo;
    }

    moerun_model_params mp;
    moerun_model_params_init(&mp);
    mp.n_threads = o.n_threads;
    mp.metadata_only = o.info || o.tokenize; /* vocab-only files work for these */
    mp.host_bytes = o.host_mem;
    mp.policy = o.policy;
    mp.prefetch = o.prefetch;
    mp.prefetch_layers = o.prefetch_layers;
    mp.direct_io = o.direct_io;
    mp.use_mmap = o.use_mmap;
    mp.device = o.device;
    mp.gpu_index = o.gpu_index;
    mp.gpu_bytes = o.gpu_mem;
    mp.gpu_ctx = o.n_ctx > 0 ? (uint32_t)o.n_ctx : 0;
    mp.gpu_batch = o.n_batch > 0 ? (uint32_t)o.n_batch : 0;
    if (o.use_mmap && o.host_mem) {
        fprintf(stderr, "moe-run: --mmap and --host-mem are two ways to hold the weights: "
                        "choose one\n");
        goto out;
    }
    rc = moerun_model_open(path, &mp, &m);
    if (rc != MOERUN_OK) {
        fprintf(stderr, "moe-run: cannot open %s: %s (%s)\n", path, moerun_errmsg(),
                moerun_status_str(rc));
        goto out;
    }
    if (o.info) {
        status = print_info(path, m, o.meta) == 0 ? 0 : 1;
        goto out;
    }
    if (text && tokenize_text(m, text, text_len, o.parse_special, &ids, &n_ids) != 0)
        goto out;
    if (o.tokenize) {
        json_ids(stdout, ids, n_ids);
        printf("\n");
        status = fflush(stdout) == 0 ? 0 : 1;
        goto out;
    }
    if (n_ids == 0) {
        fprintf(stderr, "moe-run: the prompt is empty (no tokens)\n");
        goto out;
    }
    status = generate(&o, m, ids, n_ids, o.tokens ? NULL : text, text_len);
out:
    moerun_model_close(m);
    free(ids);
    free(file_text);
    return status;
}
