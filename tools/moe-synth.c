/* moe-synth: write a random-weight MoE model of a given architecture, shape, weight type and
 * seed. The same arguments give the same file, byte for byte. */
#include "moerun.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static void usage(FILE *f) {
    moerun_synth_params d;
    moerun_synth_params_init(&d);
    fprintf(f,
            "usage: moe-synth -o FILE [options]\n"
            "\n"
            "  -o, --output FILE     where to write the GGUF model (replaced atomically)\n"
            "  --arch NAME           mixtral, qwen2moe, qwen3moe or olmoe (default %s)\n"
            "  --type T              weight type: F32 F16 BF16 Q8_0 Q4_0 Q4_K Q5_K Q6_K "
            "(default %s)\n"
            "  --seed N              random seed (default %llu)\n"
            "  --vocab N             vocabulary size (default %u)\n"
            "  --embd N              model width (default %u)\n"
            "  --layers N            blocks (default %u)\n"
            "  --heads N             query heads (default %u)\n"
            "  --kv-heads N          key/value heads (default %u)\n"
            "  --experts N           experts per layer (default %u)\n"
            "  --experts-used N      experts per token (default %u)\n"
            "  --ff N                expert FFN width (default %u)\n"
            "  --ff-shared N         qwen2moe shared-expert FFN width (default: 2 x --ff)\n"
            "  --head-dim N          head size (default: embd / heads)\n"
            "  --ctx N               trained context length in the metadata (default %u)\n"
            "  --rope-base X         RoPE base (default: 1e6 for qwen2moe and qwen3moe,\n"
            "                        1e4 for the others)\n"
            "  -t, --threads N       threads for quantizing (default: one per core; the\n"
            "                        output does not depend on it)\n"
            "  -h, --help            this text\n",
            d.arch, moerun_type_name(d.weight_type), (unsigned long long)d.seed, d.n_vocab,
            d.n_embd, d.n_layer, d.n_head, d.n_head_kv, d.n_expert, d.n_expert_used, d.n_ff,
            d.n_ctx);
}

static int parse_u64(const char *flag, const char *s, unsigned long long hi,
                     unsigned long long *out) {
    char *end;
    errno = 0;
    unsigned long long v = s ? strtoull(s, &end, 0) : 0;
    if (!s || errno || end == s || *end || s[0] == '-' || v > hi) {
        fprintf(stderr, "moe-synth: %s needs an integer in [0, %llu], got '%s'\n", flag, hi,
                s ? s : "");
        return -1;
    }
    *out = v;
    return 0;
}

int main(int argc, char **argv) {
    moerun_synth_params p;
    moerun_synth_params_init(&p);
    const char *out = NULL;
    for (int i = 1; i < argc; i += 2) { /* flag, value */
        const char *a = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        unsigned long long v = 0;
        uint32_t *u32 = NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        }
        if (!val) {
            fprintf(stderr, "moe-synth: %s needs a value (see moe-synth --help)\n", a);
            return 2;
        }
        if (!strcmp(a, "-o") || !strcmp(a, "--output")) {
            out = val;
        } else if (!strcmp(a, "--arch")) {
            p.arch = val;
        } else if (!strcmp(a, "--type")) {
            p.weight_type = moerun_type_from_name(val);
            if (p.weight_type < 0 || !moerun_type_is_supported(p.weight_type)) {
                fprintf(stderr, "moe-synth: unknown or unsupported weight type '%s'\n", val);
                return 2;
            }
        } else if (!strcmp(a, "--seed")) {
            if (parse_u64(a, val, UINT64_MAX, &v))
                return 2;
            p.seed = v;
        } else if (!strcmp(a, "--rope-base")) {
            char *end;
            p.rope_freq_base = strtof(val, &end);
            if (end == val || *end) {
                fprintf(stderr, "moe-synth: --rope-base needs a number, got '%s'\n", val);
                return 2;
            }
        } else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) {
            if (parse_u64(a, val, 1024, &v))
                return 2;
            p.n_threads = (int)v;
        } else {
            static const struct {
                const char *flag;
                size_t offset;
            } dims[] = {
                {"--vocab", offsetof(moerun_synth_params, n_vocab)},
                {"--embd", offsetof(moerun_synth_params, n_embd)},
                {"--layers", offsetof(moerun_synth_params, n_layer)},
                {"--heads", offsetof(moerun_synth_params, n_head)},
                {"--kv-heads", offsetof(moerun_synth_params, n_head_kv)},
                {"--experts", offsetof(moerun_synth_params, n_expert)},
                {"--experts-used", offsetof(moerun_synth_params, n_expert_used)},
                {"--ff", offsetof(moerun_synth_params, n_ff)},
                {"--ctx", offsetof(moerun_synth_params, n_ctx)},
                {"--ff-shared", offsetof(moerun_synth_params, n_ff_shared)},
                {"--head-dim", offsetof(moerun_synth_params, n_head_dim)},
            };
            for (size_t j = 0; j < sizeof(dims) / sizeof(dims[0]); j++) {
                if (!strcmp(a, dims[j].flag))
                    u32 = (uint32_t *)((char *)&p + dims[j].offset);
            }
            if (!u32) {
                fprintf(stderr, "moe-synth: unknown option '%s' (see moe-synth --help)\n", a);
                return 2;
            }
            if (parse_u64(a, val, UINT32_MAX, &v))
                return 2;
            *u32 = (uint32_t)v;
        }
    }
    if (!out) {
        fprintf(stderr, "moe-synth: no output file (-o FILE; see moe-synth --help)\n");
        return 2;
    }
    int rc = moerun_synth_write(&p, out);
    if (rc != MOERUN_OK) {
        fprintf(stderr, "moe-synth: %s (%s)\n", moerun_errmsg(), moerun_status_str(rc));
        return 1;
    }
    struct stat st;
    if (stat(out, &st) == 0)
        printf("moe-synth: wrote %s (%.1f MiB, %s %s, seed %llu)\n", out,
               (double)st.st_size / (1 << 20), p.arch, moerun_type_name(p.weight_type),
               (unsigned long long)p.seed);
    return 0;
}
