/*
 * moerun.h - run Mixture-of-Experts models larger than the memory that computes them.
 *
 * One header, C11. Conventions (see README.md):
 *  - functions that act return a status: MOERUN_OK (0) or a negative MOERUN_ERR_* code;
 *    the detail of the last error of the calling thread is in moerun_errmsg();
 *  - handles are opaque, returned through an out-parameter, and destroy(NULL) is a no-op;
 *  - params structs are filled by *_params_init() and carry struct_size so they can grow;
 *  - the library never writes to stdout and never calls exit() or abort(); diagnostics go
 *    through the log callback (moerun_log_set).
 */
#ifndef MOERUN_H
#define MOERUN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define MOERUN_API
#else
#define MOERUN_API __attribute__((visibility("default")))
#endif

#define MOERUN_VERSION_MAJOR 0
#define MOERUN_VERSION_MINOR 1
#define MOERUN_VERSION_PATCH 0

/* ---------------------------------------------------------------------------------------------
 * Status codes: one list, expanded into the enum and into moerun_status_str().
 * ------------------------------------------------------------------------------------------- */

#define MOERUN_STATUS_LIST(X)                                                                      \
    X(OK, 0, "success")                                                                            \
    X(ERR_INVALID_ARG, -1, "invalid argument")                                                     \
    X(ERR_NOMEM, -2, "out of memory")                                                              \
    X(ERR_IO, -3, "input/output error")                                                            \
    X(ERR_FORMAT, -4, "malformed or hostile model file")                                           \
    X(ERR_UNSUPPORTED, -5, "unsupported model, type or feature")                                   \
    X(ERR_RANGE, -6, "value out of range")                                                         \
    X(ERR_BUDGET, -7, "memory budget too small")                                                   \
    X(ERR_BACKEND, -8, "compute backend failure")                                                  \
    X(ERR_CANCELLED, -9, "cancelled by the caller")                                                \
    X(ERR_INTERNAL, -10, "internal error")

typedef enum moerun_status {
#define MOERUN_STATUS_ENUM(name, value, text) MOERUN_##name = (value),
    MOERUN_STATUS_LIST(MOERUN_STATUS_ENUM)
#undef MOERUN_STATUS_ENUM
} moerun_status;

/* The fixed text of a status code ("out of memory"); "unknown status" for a value not in the
 * list. Returns a static string. Thread-safe. */
MOERUN_API const char *moerun_status_str(int status);

/* The message of the last error set on the calling thread, naming what failed and where
 * ("gguf: tensor 'blk.0.attn_q.weight' at offset 1234: data past the end of the file").
 * Empty string when none. Valid until the next library call on this thread. Thread-safe
 * (per-thread storage). */
MOERUN_API const char *moerun_errmsg(void);

/* The library version as "MAJOR.MINOR.PATCH". Returns a static string. Thread-safe. */
MOERUN_API const char *moerun_version(void);

/* ---------------------------------------------------------------------------------------------
 * Logging
 * ------------------------------------------------------------------------------------------- */

typedef enum moerun_log_level {
    MOERUN_LOG_ERROR = 0,
    MOERUN_LOG_WARN = 1,
    MOERUN_LOG_INFO = 2,
    MOERUN_LOG_DEBUG = 3,
} moerun_log_level;

/* msg is one line without its trailing newline. Called from any library thread. */
typedef void (*moerun_log_fn)(moerun_log_level level, const char *msg, void *user_data);

/* Route the library's diagnostics to fn (NULL restores the default, which writes WARN and
 * ERROR lines to stderr). Returns nothing. Thread-safe, but messages logged concurrently with
 * the change may reach either callback. */
MOERUN_API void moerun_log_set(moerun_log_fn fn, void *user_data);

/* Messages above this level are dropped before formatting; default MOERUN_LOG_INFO.
 * Thread-safe. */
MOERUN_API void moerun_log_set_level(moerun_log_level max_level);

/* ---------------------------------------------------------------------------------------------
 * Memory: the library allocates through this when given one, else through malloc/free.
 * It never replaces the process's malloc.
 * ------------------------------------------------------------------------------------------- */

typedef struct moerun_allocator {
    /* size bytes aligned to align (a power of two >= sizeof(void *)); NULL on failure */
    void *(*alloc)(size_t size, size_t align, void *user_data);
    void (*free)(void *ptr, void *user_data); /* ptr may be NULL */
    void *user_data;
} moerun_allocator;

/* ---------------------------------------------------------------------------------------------
 * Weight types: the GGML type ids, as stored in GGUF files.
 * ------------------------------------------------------------------------------------------- */

typedef enum moerun_type {
    MOERUN_TYPE_F32 = 0,
    MOERUN_TYPE_F16 = 1,
    MOERUN_TYPE_Q4_0 = 2,
    MOERUN_TYPE_Q8_0 = 8,
    MOERUN_TYPE_Q4_K = 12,
    MOERUN_TYPE_Q5_K = 13,
    MOERUN_TYPE_Q6_K = 14,
    MOERUN_TYPE_Q8_K = 15, /* activations only */
    MOERUN_TYPE_BF16 = 30,
} moerun_type;

/* The GGML name of a type id ("Q4_K"), for every type GGUF files may hold, including ones
 * the compute kernels do not support; NULL for an unknown id. Thread-safe. */
MOERUN_API const char *moerun_type_name(int type);

/* The type id for a name (case-insensitive, "q8_0" or "Q8_0"); a negative status when the
 * name is unknown. Thread-safe. */
MOERUN_API int moerun_type_from_name(const char *name);

/* Whether weights of this type can be computed with (F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K,
 * Q6_K). Returns 1 or 0. Thread-safe. */
MOERUN_API int moerun_type_is_supported(int type);

/* ---------------------------------------------------------------------------------------------
 * Models
 * ------------------------------------------------------------------------------------------- */

typedef struct moerun_model moerun_model;

typedef struct moerun_model_params {
    size_t struct_size;                /* set by moerun_model_params_init() */
    int n_threads;                     /* compute threads; 0 = one per core */
    const moerun_allocator *allocator; /* NULL = malloc/free; must outlive the model */
    int metadata_only;                 /* 1 = header, metadata and tokenizer only: no weights are
                                          read and no session can be made (--info, --tokenize;
                                          works on vocab-only files) */
    uint64_t host_bytes;               /* host tier budget, bytes; 0 = read every weight into
                                          memory at open (no tiers). Otherwise weights stay in
                                          the file and move through slots of this much memory;
                                          below the minimum, open fails saying the minimum */
    int policy;                        /* moerun_policy for the expert slots; MOERUN_POLICY_LRU */
    int prefetch;                      /* moerun_prefetch: load predicted experts ahead
                                          while it pays (MOERUN_PREFETCH_AUTO, default),
                                          always, or never (only on demand) */
    int prefetch_layers;               /* layers predicted ahead; 0 = 1 */
    int direct_io;                     /* 1 = O_DIRECT reads (default; buffered where refused) */
    int use_mmap;                      /* 1 = map the file and compute from the page cache, as
                                          llama.cpp does by default (no tiers: the kernel decides
                                          what stays; a baseline for benchmarks); 0 = default */
    int device;                        /* moerun_device that computes; MOERUN_DEVICE_CPU */
    int gpu_index;                     /* which CUDA device; 0 */
    uint64_t gpu_bytes;                /* GPU tier budget, bytes (moe-run --gpu-mem), allocated
                                          at open as one block: weight slots, the resident
                                          routers, norms and output, and the sessions' KV caches
                                          and scratch (gpu_ctx, gpu_batch). 0 = the device's free
                                          memory less 1 GiB, at most what the model needs. Below
                                          the minimum, open fails saying the minimum */
    uint32_t gpu_ctx;                  /* KV positions reserved in the GPU budget for sessions
                                          (one session of gpu_ctx, or several smaller); 0 = the
                                          trained context, at most 4096 (a session's default) */
    uint32_t gpu_batch;                /* tokens per forward call of those sessions; 0 = 512 */
} moerun_model_params;

/* The device that computes. With a GPU (or the simulator), weights move NVMe -> pinned host
 * (host_bytes, 0 = automatic) -> GPU memory (gpu_bytes); the CPU keeps the token embeddings. */
typedef enum moerun_device {
    MOERUN_DEVICE_CPU = 0,  /* the CPU computes (host_bytes: tiers below it, or all resident) */
    MOERUN_DEVICE_CUDA = 1, /* a CUDA GPU (gpu_index) */
    MOERUN_DEVICE_SIM = 2,  /* the CPU computing as if it were a GPU: weights in a separate
                               gpu_bytes "device" allocation, uploaded on an asynchronous copy
                               thread, the GPU tier's code path without a GPU (tests, profiling) */
} moerun_device;

/* Eviction policies of the expert slots. */
typedef enum moerun_policy {
    MOERUN_POLICY_LRU = 0,       /* least recently used */
    MOERUN_POLICY_LFU = 1,       /* least frequently used */
    MOERUN_POLICY_PREDICTED = 2, /* lowest predicted use by the router's prediction, then LRU */
} moerun_policy;

/* Prefetch of predicted experts. AUTO turns it off while the loads of wrong predictions would
 * take longer than a layer computes (they then delay the loads the next layer waits for) and
 * on again when they would not, from measured precision, compute time and load speed
 * (README, "Tiers"). */
typedef enum moerun_prefetch {
    MOERUN_PREFETCH_OFF = 0,  /* load experts only when a layer needs them */
    MOERUN_PREFETCH_ON = 1,   /* load every prediction's experts ahead */
    MOERUN_PREFETCH_AUTO = 2, /* load ahead while that pays */
} moerun_prefetch;

/* Fill p with defaults. Returns nothing. Thread-safe. */
MOERUN_API void moerun_model_params_init(moerun_model_params *p);

/* How many devices of kind device (moerun_device) this build and machine can compute on: the
 * CPU and the simulator 1, CUDA the number of usable GPUs (0 without a driver or a device, or
 * in a build without CUDA). Returns the count (>= 0). Thread-safe. */
MOERUN_API int moerun_device_count(int device);

/* Open a GGUF model file: parse and validate its header, metadata and tensor table (nothing
 * is trusted before it is checked against the file's size). params may be NULL (defaults).
 * Returns MOERUN_OK and *out, or MOERUN_ERR_IO / ERR_FORMAT / ERR_UNSUPPORTED / ERR_NOMEM
 * with *out = NULL and moerun_errmsg() naming the key or tensor and the byte offset.
 * Thread-safe (distinct calls share nothing). */
MOERUN_API int moerun_model_open(const char *path, const moerun_model_params *params,
                                 moerun_model **out);

/* Release a model. NULL is a no-op. Not thread-safe with other uses of the same model. */
MOERUN_API void moerun_model_close(moerun_model *model);

/* A summary of an open model; hyper-parameters the file does not have are 0. */
typedef struct moerun_model_info {
    size_t struct_size;     /* set by the caller to sizeof(moerun_model_info) */
    char arch[32];          /* general.architecture ("llama", "qwen2moe", ...) */
    char name[128];         /* general.name, or "" */
    uint32_t gguf_version;  /* 2 or 3 */
    uint32_t alignment;     /* tensor data alignment, bytes */
    uint64_t file_bytes;    /* size of the file */
    uint64_t data_offset;   /* start of the tensor data section, bytes */
    uint64_t n_kv;          /* metadata key/value pairs */
    uint64_t n_tensors;     /* tensors in the file */
    uint64_t tensor_bytes;  /* bytes of all tensor data */
    uint32_t n_vocab;       /* tokens in the vocabulary (tokenizer or output tensor) */
    uint32_t n_ctx_train;   /* <arch>.context_length */
    uint32_t n_embd;        /* <arch>.embedding_length */
    uint32_t n_layer;       /* <arch>.block_count */
    uint32_t n_head;        /* <arch>.attention.head_count */
    uint32_t n_head_kv;     /* <arch>.attention.head_count_kv (n_head when absent) */
    uint32_t n_ff;          /* <arch>.feed_forward_length (dense FFN) */
    uint32_t n_ff_exp;      /* <arch>.expert_feed_forward_length, else from the tensors */
    uint32_t n_expert;      /* <arch>.expert_count; 0 = not an MoE model */
    uint32_t n_expert_used; /* <arch>.expert_used_count */
    uint32_t n_rot;         /* <arch>.rope.dimension_count (head size when absent) */
    float rope_freq_base;   /* <arch>.rope.freq_base (10000 when absent) */
    float rms_eps;          /* <arch>.attention.layer_norm_rms_epsilon */
    uint64_t expert_bytes;  /* bytes of all expert tensors (*_exps) */
} moerun_model_info;

/* Fill *info (info->struct_size must be set). Returns MOERUN_OK or MOERUN_ERR_INVALID_ARG.
 * Thread-safe for concurrent readers. */
MOERUN_API int moerun_model_get_info(const moerun_model *model, moerun_model_info *info);

/* Tensor count and bytes of one weight type in the model (both 0 when absent), for the
 * summary by type. Returns MOERUN_OK or MOERUN_ERR_INVALID_ARG. Thread-safe. */
MOERUN_API int moerun_model_type_bytes(const moerun_model *model, int type, uint64_t *n_tensors,
                                       uint64_t *bytes);

/* Bytes of layer il's experts: all experts of its *_exps tensors (0 for a layer without),
 * and of one expert (the three ranges the scheduler moves as one section).
 * Returns MOERUN_OK or MOERUN_ERR_RANGE for il >= n_layer. Thread-safe. */
MOERUN_API int moerun_model_layer_expert_bytes(const moerun_model *model, uint32_t il,
                                               uint64_t *all_experts, uint64_t *one_expert);

/* Metadata access by index (0 <= i < n_kv): the key, and the value rendered as text
 * (arrays as "[type; n]" with their first elements). Returns the key or NULL when out of
 * range / the number of characters the value needs (snprintf-style, buf may be NULL) or a
 * negative status. Thread-safe. */
MOERUN_API const char *moerun_model_meta_key(const moerun_model *model, uint64_t i);
MOERUN_API int moerun_model_meta_value_str(const moerun_model *model, uint64_t i, char *buf,
                                           size_t size);

/* ---------------------------------------------------------------------------------------------
 * Tokenizer and detokenizer (from the GGUF metadata: SentencePiece "llama" or BPE "gpt2" with
 * the pre-tokenizer tokenizer.ggml.pre names).
 * ------------------------------------------------------------------------------------------- */

/* Tokens in the vocabulary. Thread-safe. */
MOERUN_API uint32_t moerun_model_n_vocab(const moerun_model *model);

/* Special tokens: the id, or -1 when the model has none. Thread-safe. */
MOERUN_API int32_t moerun_token_bos(const moerun_model *model);
MOERUN_API int32_t moerun_token_eos(const moerun_model *model);

/* Whether generation ends at this token (EOS, EOT and the like). Returns 1 or 0. Thread-safe. */
MOERUN_API int moerun_token_is_eog(const moerun_model *model, int32_t token);

/* Tokenize len bytes of UTF-8 text. add_special: add BOS (and EOS) as the model's metadata
 * asks (tokenizer.ggml.add_bos_token / add_eos_token). parse_special: text that spells a
 * special or control token ("<s>") becomes that token; otherwise it is plain text.
 * Writes at most cap ids; *n_tokens gets the count the text needs, so a call with cap too small
 * returns MOERUN_ERR_RANGE and tells the size. Returns MOERUN_OK, MOERUN_ERR_RANGE, or
 * MOERUN_ERR_INVALID_ARG. Thread-safe (the model is read-only). */
MOERUN_API int moerun_tokenize(const moerun_model *model, const char *text, size_t len,
                               int add_special, int parse_special, int32_t *tokens, size_t cap,
                               size_t *n_tokens);

/* The bytes a token stands for (SentencePiece's U+2581 as a space, byte tokens as their byte,
 * BPE's byte-level characters as bytes; special tokens as their text only with render_special).
 * Not NUL-terminated; may be part of a UTF-8 sequence. Returns the byte count, which may exceed
 * size (then only size bytes were written: call again with more room), or MOERUN_ERR_RANGE for
 * an id out of range. Thread-safe. */
MOERUN_API int moerun_token_to_piece(const moerun_model *model, int32_t token, int render_special,
                                     char *buf, size_t size);

/* Streaming detokenizer: turns tokens into text that is always valid UTF-8, holding back the
 * bytes of a character split across tokens until it is complete (invalid bytes become U+FFFD).
 * Zero-initialise it (or memset) before the first push. */
typedef struct moerun_detok {
    unsigned char pending[8]; /* bytes of an incomplete UTF-8 sequence */
    unsigned n_pending;
} moerun_detok;

/* Append the text of token to out (size >= 64 + the longest token is always enough): returns
 * the bytes written (>= 0), or MOERUN_ERR_RANGE when out is too small or the id is out of range.
 * Thread-safe for distinct moerun_detok. */
MOERUN_API int moerun_detok_push(const moerun_model *model, moerun_detok *d, int32_t token,
                                 char *out, size_t size);

/* Write what is still held back (as U+FFFD) and reset d. Returns bytes written. */
MOERUN_API int moerun_detok_flush(moerun_detok *d, char *out, size_t size);

/* ---------------------------------------------------------------------------------------------
 * Sessions: one sequence with its own KV cache over a shared model.
 * Lifecycle: create -> decode (prompt batch, then one token at a time) -> destroy.
 * ------------------------------------------------------------------------------------------- */

typedef struct moerun_session moerun_session;

typedef struct moerun_session_params {
    size_t struct_size; /* set by moerun_session_params_init() */
    uint32_t n_ctx;     /* context (KV cache) length, tokens; 0 = the model's trained length,
                           capped at 4096 */
    uint32_t n_batch;   /* most tokens per decode call computed together; 0 = 512 (longer
                           calls are split, results unchanged) */
    int n_threads;      /* compute threads; 0 = the model's */
} moerun_session_params;

MOERUN_API void moerun_session_params_init(moerun_session_params *p);

/* Create a session (allocates its KV cache and scratch now; nothing is allocated per token).
 * Returns MOERUN_OK, MOERUN_ERR_INVALID_ARG (a metadata-only model), MOERUN_ERR_NOMEM.
 * Thread-safe: many sessions may share one model, each used by one thread at a time. */
MOERUN_API int moerun_session_create(moerun_model *model, const moerun_session_params *params,
                                     moerun_session **out);

MOERUN_API void moerun_session_destroy(moerun_session *session); /* NULL is a no-op */

/* Evaluate n tokens at positions n_past .. n_past + n - 1 and append them to the KV cache.
 * logits: NULL, or room for n_vocab floats (the last token's logits) or, with logits_all,
 * n * n_vocab floats ([n][n_vocab], every position's). Token ids are checked first
 * (MOERUN_ERR_RANGE for an id >= n_vocab, nothing evaluated), then the context
 * (MOERUN_ERR_RANGE when n_past + n > n_ctx). On an error the session is unchanged.
 * Not thread-safe for one session. */
MOERUN_API int moerun_session_decode(moerun_session *session, const int32_t *tokens, size_t n,
                                     float *logits, int logits_all);

/* Positions filled so far / the context length. */
MOERUN_API uint32_t moerun_session_n_past(const moerun_session *session);
MOERUN_API uint32_t moerun_session_n_ctx(const moerun_session *session);

/* Forget the sequence (n_past = 0). Returns nothing. */
MOERUN_API void moerun_session_reset(moerun_session *session);

/* Routing of each evaluated token, for traces: called from moerun_session_decode's thread for
 * every token and layer, in execution order, with the chosen experts (descending router weight)
 * and their weights as used (renormalised where the architecture does). pos is the token's
 * position. NULL removes it. */
typedef void (*moerun_route_fn)(void *user_data, uint32_t pos, uint32_t layer,
                                const int32_t *experts, const float *weights, uint32_t k);
MOERUN_API void moerun_session_set_route_callback(moerun_session *session, moerun_route_fn fn,
                                                  void *user_data);

/* ---------------------------------------------------------------------------------------------
 * Statistics of the tiers (zero when the model was opened without tiers: CPU, no host budget).
 * ------------------------------------------------------------------------------------------- */

typedef struct moerun_stats {
    size_t struct_size;         /* set by the caller to sizeof(moerun_stats) */
    uint64_t host_bytes;        /* host tier size */
    uint64_t slot_bytes_dense;  /* one dense slot */
    uint64_t slot_bytes_expert; /* one expert slot */
    uint32_t slots_dense;       /* dense slots (n_layer: all resident; fewer: a ring) */
    uint32_t slots_expert;      /* expert slots */
    uint64_t nvme_bytes_read;   /* bytes read from the model file */
    uint64_t nvme_busy_ns;      /* time with reads in flight */
    uint64_t expert_hits;       /* needed experts found resident (or already loading) */
    uint64_t expert_misses;     /* needed experts loaded on demand */
    uint64_t dense_hits, dense_misses;
    uint64_t prefetch_issued;     /* expert loads started from predictions */
    uint64_t prefetch_used;       /* of those, used before eviction */
    uint64_t prefetch_cancelled;  /* predicted loads dropped before they started (queued) */
    double prediction_precision;  /* predicted experts that were then chosen / predicted */
    double prediction_recall;     /* chosen experts that had been predicted / chosen */
    uint64_t stall_ns;            /* time compute waited for weights */
    double read_gbps;             /* achieved read bandwidth while reading, GB/s */
    int direct_io;                /* 1 when O_DIRECT is in use */
    uint32_t n_layer;             /* entries of the arrays below */
    const uint64_t *layer_hits;   /* [n_layer] expert hits per layer (owned by the model) */
    const uint64_t *layer_misses; /* [n_layer] */
    /* with a GPU (device CUDA or SIM): */
    uint64_t gpu_bytes;        /* GPU tier size (the one allocation) */
    uint64_t gpu_bytes_copied; /* bytes uploaded host -> GPU */
    uint64_t gpu_copy_busy_ns; /* time with uploads in flight */
    double copy_gbps;          /* achieved upload bandwidth while uploading, GB/s */
    uint64_t host_hits;        /* GPU loads served from the pinned host tier */
    uint64_t host_misses;      /* GPU loads read from the file first */
    uint64_t predicted;        /* experts predicted (0: no predictions were made, as when every
                                  section has a slot of its own) */
    /* MOERUN_PREFETCH_AUTO: */
    uint64_t prefetch_skipped; /* predictions not acted on (prefetch did not pay) */
    int prefetch_on;           /* 1 when predictions are acted on now */
    uint64_t layer_compute_ns; /* its estimates now: compute per layer (stalls excluded), */
    uint64_t wrong_load_ns;    /* and load time of a prediction's wrong experts */
} moerun_stats;

/* A snapshot of the model's tier statistics. Returns MOERUN_OK or MOERUN_ERR_INVALID_ARG.
 * Thread-safe. */
MOERUN_API int moerun_model_get_stats(const moerun_model *model, moerun_stats *stats);
MOERUN_API void moerun_model_reset_stats(moerun_model *model);

/* ---------------------------------------------------------------------------------------------
 * Sampler: repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw, as llama.cpp's
 * default chain; greedy when temp <= 0. Seeded: the same seed and inputs give the same tokens.
 * ------------------------------------------------------------------------------------------- */

typedef struct moerun_sampler moerun_sampler;

typedef struct moerun_sampler_params {
    size_t struct_size;    /* set by moerun_sampler_params_init() */
    float temp;            /* temperature; <= 0 = greedy (argmax, lowest id on ties); 0.8 */
    int32_t top_k;         /* keep the k most likely; 0 = off; 40 */
    float top_p;           /* keep the smallest set with probability >= p; 1 = off; 0.95 */
    float min_p;           /* drop tokens below min_p x the top probability; 0 = off; 0.05 */
    float repeat_penalty;  /* divide positive (multiply negative) logits of recent tokens;
                              1 = off; 1.0 */
    int32_t repeat_last_n; /* how many recent tokens the penalty looks at; 64 */
    uint64_t seed;         /* random seed; 0xFFFFFFFF... = MOERUN_SEED_RANDOM draws one */
} moerun_sampler_params;

#define MOERUN_SEED_RANDOM UINT64_MAX

MOERUN_API void moerun_sampler_params_init(moerun_sampler_params *p);

/* Returns MOERUN_OK, MOERUN_ERR_INVALID_ARG (a parameter out of range, n_vocab 0),
 * MOERUN_ERR_NOMEM. All memory is allocated here. */
MOERUN_API int moerun_sampler_create(const moerun_sampler_params *params, uint32_t n_vocab,
                                     moerun_sampler **out);
MOERUN_API void moerun_sampler_destroy(moerun_sampler *sampler); /* NULL is a no-op */

/* Choose the next token from n_vocab logits (not modified). Returns the id (>= 0) or a
 * negative status (MOERUN_ERR_INVALID_ARG for NULL or non-finite logits everywhere).
 * Does not record the token: call moerun_sampler_accept. Not thread-safe for one sampler. */
MOERUN_API int32_t moerun_sampler_sample(moerun_sampler *sampler, const float *logits);

/* Record a token (prompt or generated) for the repetition penalty. */
MOERUN_API void moerun_sampler_accept(moerun_sampler *sampler, int32_t token);

/* Forget the recorded tokens and reseed with the original seed. */
MOERUN_API void moerun_sampler_reset(moerun_sampler *sampler);

/* ---------------------------------------------------------------------------------------------
 * Synthetic models: random weights of a given shape, type and seed, for demos, tests and
 * benchmarks. The same parameters and seed give the same file, byte for byte.
 * ------------------------------------------------------------------------------------------- */

typedef struct moerun_synth_params {
    size_t struct_size;     /* set by moerun_synth_params_init() */
    const char *arch;       /* "mixtral" (GGUF arch "llama" with experts), "qwen2moe",
                               "qwen3moe", "olmoe" */
    int weight_type;        /* moerun_type of the matrices (router and norms stay F32) */
    uint64_t seed;          /* same seed, same file */
    uint32_t n_vocab;       /* tokens; >= 259 (3 special + 256 bytes) */
    uint32_t n_embd;        /* model width; a multiple of the weight type's block size */
    uint32_t n_layer;       /* blocks */
    uint32_t n_head;        /* query heads; divides n_embd */
    uint32_t n_head_kv;     /* key/value heads; divides n_head */
    uint32_t n_expert;      /* experts per layer */
    uint32_t n_expert_used; /* experts chosen per token */
    uint32_t n_ff;          /* expert FFN width; a multiple of the block size */
    uint32_t n_ctx;         /* trained context length written to the metadata */
    float rope_freq_base;   /* RoPE base; 0 = the architecture's (1e6 for qwen2moe and
                               qwen3moe, 1e4 for the others) */
    float rms_eps;          /* RMSNorm epsilon */
    int n_threads;          /* threads for quantizing; 0 = one per core (output unchanged) */
    uint32_t n_ff_shared;   /* qwen2moe shared-expert FFN width; 0 = 2 * n_ff; a multiple of the
                               block size */
    uint32_t n_head_dim;    /* head size; 0 = n_embd / n_head; when set, q is [n_embd,
                               n_head * n_head_dim] and attn_output its transpose (qwen3moe
                               always writes attention.key_length) */
} moerun_synth_params;

/* Defaults: a small Mixtral-style model (vocab 512, dim 256, 4 layers, 8 heads / 4 KV heads,
 * 8 experts top-2, expert FFN 512, Q8_0, seed 42). Returns nothing. Thread-safe. */
MOERUN_API void moerun_synth_params_init(moerun_synth_params *p);

/* Write a synthetic model to path (replaced atomically: written to a temporary file, then
 * renamed). Returns MOERUN_OK, MOERUN_ERR_INVALID_ARG for an inconsistent shape,
 * MOERUN_ERR_UNSUPPORTED for an unknown arch or type, MOERUN_ERR_IO. Thread-safe. */
MOERUN_API int moerun_synth_write(const moerun_synth_params *params, const char *path);

#ifdef __cplusplus
}
#endif

#endif /* MOERUN_H */
