/* libFuzzer: the whole model path on hostile files. Each input is a model file: open it
 * (reader, hyper-parameters, tensor binding, tokenizer), and when it opens, tokenize, make a
 * small session and evaluate two tokens (on the CPU, and for the files that open, through the
 * GPU path on the simulated device too). Any crash, leak, undefined behaviour or oversized
 * allocation is a finding; errors are the expected outcome for most inputs. */
#include "moerun.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

static void quiet(moerun_log_level level, const char *msg, void *user) {
    (void)level;
    (void)msg;
    (void)user;
}

static void exercise(moerun_model *m, int with_session) {
    int32_t ids[64];
    size_t n = 0;
    moerun_tokenize(m, "Hello <s> world\n", 16, 1, 1, ids, 64, &n);
    char piece[64];
    const uint32_t n_vocab = moerun_model_n_vocab(m);
    for (uint32_t i = 0; i < n_vocab && i < 8; i++)
        moerun_token_to_piece(m, (int32_t)i, 1, piece, sizeof(piece));
    if (!with_session || n_vocab < 2)
        return;
    moerun_session_params sp;
    moerun_session_params_init(&sp);
    sp.n_ctx = 8;
    sp.n_batch = 4;
    sp.n_threads = 1;
    moerun_session *s = NULL;
    if (moerun_session_create(m, &sp, &s) != MOERUN_OK)
        return;
    float *logits = malloc((size_t)n_vocab * 2 * sizeof(float));
    const int32_t tokens[2] = {0, (int32_t)(n_vocab - 1)};
    if (logits)
        moerun_session_decode(s, tokens, 2, logits, 1);
    free(logits);
    moerun_session_destroy(s);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int init;
    if (!init) {
        moerun_log_set(quiet, NULL);
        init = 1;
    }
    int fd = memfd_create("fuzz-model", MFD_CLOEXEC);
    if (fd < 0)
        return 0;
    size_t done = 0;
    while (done < size) {
        ssize_t w = write(fd, data + done, size - done);
        if (w <= 0)
            break;
        done += (size_t)w;
    }
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    /* all in memory; metadata only; and for the files that open, the GPU path on the
     * simulated device (GPU tier, pinned host stage, NVMe tier, scheduler) */
    int opened = 0;
    for (int mode = 0; mode <= (opened ? 2 : 1); mode++) {
        const int metadata_only = mode == 1;
        moerun_model_params mp;
        moerun_model_params_init(&mp);
        mp.n_threads = 1;
        mp.metadata_only = metadata_only;
        if (mode == 2) {
            mp.device = MOERUN_DEVICE_SIM;
            mp.gpu_bytes = 8u << 20;
            mp.gpu_ctx = 8;
            mp.gpu_batch = 4;
            mp.direct_io = 0;
        }
        moerun_model *m = NULL;
        if (moerun_model_open(path, &mp, &m) == MOERUN_OK) {
            opened |= mode == 0;
            exercise(m, !metadata_only);
        }
        moerun_model_close(m);
    }
    close(fd);
    return 0;
}
