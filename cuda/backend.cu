// The CUDA backend: the ops table of runtime/backend.h over the kernels of ops.h on one device.
//
// Instances: the root (mr_backend_cuda_create) makes the device state every instance shares, a
// struct cuda_dev: the device index, a compute and a copy stream (non-blocking: no implicit
// ordering with the legacy default stream), one cuBLAS handle bound to the compute stream, the
// description line. Clones point at the same cuda_dev and own only their workspace pointer;
// cuda_dev is reference-counted, so it goes with the last instance whatever the order (the
// contract asks clones to go first; nothing breaks if they do not).
//
// Streams: every compute op and upload / download / copy run on the compute stream, copy_async on
// the copy stream; the two meet only through events (record / wait), exactly as the contract says.
//
// Products (matmul): n == 1 is cuda_matvec; 2 <= n <= MM_FUSED_MAX (8) is cuda_matvec_n, which
// reads each weight once for all n columns and keeps x in F32 (the matvec's accuracy); beyond,
// dequantize-to-F16 + cublasGemmEx (cuda_matmul_ws) with the workspace, F32 weights through an
// F32 GEMM (no F16 rounding, no TF32). Why 8: up to 8 columns the fused kernel is still bound by
// the weight bytes (one pass, 8 FMAs per weight), so it beats n separate matvecs (n passes over
// W) and the GEMM path (dequantize writes and reads 4 bytes per weight: more traffic than a Q4_K
// weight's 0.56 bytes times 8); past that the GEMM's tensor cores win.
//
// Workspace (per instance, set_workspace): only the GEMM path uses it:
//   [X as F16: n_batch][max_k], 256-byte aligned | [W as F16: chunk rows][k], 256-byte aligned
// where the W part holds min(max_elements, MM_W_CHUNK) elements (at least one row of max_k); a
// larger matrix is dequantized and multiplied in chunks of rows. No other op needs workspace:
// attention keeps its softmax online, the router and the plumbing ops work in place.
//
// Errors: every CUDA / cuBLAS failure is MOERUN_ERR_BACKEND naming the call (cuda_util.cuh);
// shapes and types are checked before anything is launched. Nothing aborts or prints.
#include "cuda_backend.h"
#include "ops.h"

#include "cuda_util.cuh"

extern "C" {
#include "backend.h"
}

#include <stdio.h>
#include <string.h>

namespace {

constexpr int64_t MM_FUSED_MAX = 8;        // products with n <= this: cuda_matvec_n
constexpr int64_t MM_W_CHUNK = 16LL << 20; // elements of W staged as F16 per GEMM (32 MiB)
constexpr uint64_t WS_ALIGN = 256;

struct cuda_dev {
    int device;
    int refs; // instances using it (atomic)
    cudaStream_t compute, copy;
    void *cublas; // bound to compute
    const moerun_allocator *a;
    char desc[384]; // "cuda:0 NVIDIA H100 80GB HBM3, 79.1 GiB, cc 9.0"
};

struct cuda_be {
    struct mr_backend base; // first: the ops get &base
    struct cuda_dev *dev;
    uint8_t *ws; // workspace (backend memory, not owned), WS_ALIGN aligned
    uint64_t ws_bytes;
};

cuda_be *cb(struct mr_backend *be) {
    return reinterpret_cast<cuda_be *>(be);
}

uint64_t align_up(uint64_t v) {
    return (v + WS_ALIGN - 1) / WS_ALIGN * WS_ALIGN;
}

// Make the instance's device current on the calling thread (the current device is per thread and
// sessions may run on other threads than the one that created the root).
int enter(const cuda_be *c) {
    int cur = -1;
    cudaError_t e = cudaGetDevice(&cur);
    if (e != cudaSuccess)
        return cuda_util_err(e, "cudaGetDevice");
    if (cur != c->dev->device && (e = cudaSetDevice(c->dev->device)) != cudaSuccess)
        return cuda_util_err(e, "cudaSetDevice");
    return MOERUN_OK;
}

// The stream s of c, with c's device current on this thread (as enter).
int stream_of(const cuda_be *c, enum mr_stream s, cudaStream_t *out) {
    if (s == MR_STREAM_COMPUTE)
        *out = c->dev->compute;
    else if (s == MR_STREAM_COPY)
        *out = c->dev->copy;
    else
        return mr_err(MOERUN_ERR_INVALID_ARG, "cuda backend: stream %d", (int)s);
    return enter(c);
}

void dev_release(cuda_dev *d) {
    if (!d || __atomic_sub_fetch(&d->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    // Streams are destroyed at once; work still queued on them completes first (CUDA's rule).
    // Failures here (a device already faulted) have no one to report to: cleared and dropped.
    cudaSetDevice(d->device);
    cuda_cublas_destroy(d->cublas);
    if (d->copy)
        cudaStreamDestroy(d->copy);
    if (d->compute)
        cudaStreamDestroy(d->compute);
    (void)cudaGetLastError();
    mr_free(d->a, d);
}

const struct mr_backend_ops *ops_table();

int new_instance(cuda_dev *d, struct mr_backend **out) {
    cuda_be *c = static_cast<cuda_be *>(mr_calloc(d->a, 1, sizeof(cuda_be)));
    if (!c)
        return mr_err(MOERUN_ERR_NOMEM, "cuda backend: no memory for an instance");
    c->base.ops = ops_table();
    c->base.kind = MR_BACKEND_CUDA;
    c->base.host_memory = false;
    c->dev = d;
    __atomic_add_fetch(&d->refs, 1, __ATOMIC_ACQ_REL);
    *out = &c->base;
    return MOERUN_OK;
}

// --- instances ---------------------------------------------------------------------------------

int be_clone(struct mr_backend *be, int n_threads, struct mr_backend **out) {
    (void)n_threads; // the GPU has no host thread pool
    *out = NULL;
    return new_instance(cb(be)->dev, out);
}

void be_destroy(struct mr_backend *be) {
    if (!be)
        return;
    cuda_be *c = cb(be);
    cuda_dev *d = c->dev;
    mr_free(d->a, c);
    dev_release(d);
}

const char *be_describe(struct mr_backend *be) {
    return cb(be)->dev->desc;
}

int be_mem_info(struct mr_backend *be, uint64_t *total, uint64_t *free_now) {
    *total = 0, *free_now = 0;
    int rc = enter(cb(be));
    if (rc)
        return rc;
    size_t f = 0, t = 0;
    cudaError_t e = cudaMemGetInfo(&f, &t);
    if (e != cudaSuccess)
        return cuda_util_err(e, "cudaMemGetInfo");
    *total = t, *free_now = f;
    return MOERUN_OK;
}

// --- memory ------------------------------------------------------------------------------------

int be_alloc(struct mr_backend *be, uint64_t bytes, void **out) {
    *out = NULL;
    if (bytes == 0)
        return MOERUN_OK;
    int rc = enter(cb(be));
    return rc ? rc : cuda_alloc((size_t)bytes, out); // cudaMalloc: 256-byte aligned
}

void be_free(struct mr_backend *be, void *p) {
    if (!p || enter(cb(be)) != MOERUN_OK)
        return;
    cuda_free(p);
    (void)cudaGetLastError(); // a failure here (after a fault) is not the next call's
}

int be_host_register(struct mr_backend *be, void *p, uint64_t bytes) {
    if (bytes == 0)
        return MOERUN_OK;
    int rc = enter(cb(be));
    if (rc)
        return rc;
    cudaError_t e = cudaHostRegister(p, (size_t)bytes, cudaHostRegisterPortable);
    if (e != cudaSuccess) {
        char what[96];
        snprintf(what, sizeof(what), "cudaHostRegister of %llu bytes at %p",
                 (unsigned long long)bytes, p);
        return cuda_util_err(e, what);
    }
    return MOERUN_OK;
}

void be_host_unregister(struct mr_backend *be, void *p) {
    if (!p || enter(cb(be)) != MOERUN_OK)
        return;
    cudaHostUnregister(p);
    (void)cudaGetLastError();
}

// bytes from src to dst on stream, asynchronous (what names the copy in an error).
int memcpy_async(cuda_be *c, void *dst, const void *src, uint64_t bytes, cudaMemcpyKind kind,
                 cudaStream_t stream, const char *what) {
    if (bytes == 0)
        return MOERUN_OK;
    int rc = enter(c);
    if (rc)
        return rc;
    cudaError_t e = cudaMemcpyAsync(dst, src, (size_t)bytes, kind, stream);
    return e == cudaSuccess ? MOERUN_OK : cuda_util_err(e, what);
}

// Host -> device, asynchronous on the compute stream: the contract keeps src unchanged until a
// later download or sync returns, so nothing waits here (from pinned memory the copy overlaps the
// host; from pageable memory the runtime stages it first).
int be_upload(struct mr_backend *be, void *dst, const void *src, uint64_t bytes) {
    cuda_be *c = cb(be);
    return memcpy_async(c, dst, src, bytes, cudaMemcpyHostToDevice, c->dev->compute,
                        "cudaMemcpyAsync (host to device)");
}

int be_download(struct mr_backend *be, void *dst, const void *src, uint64_t bytes) {
    cuda_be *c = cb(be);
    int rc = enter(c);
    if (rc)
        return rc;
    if (bytes == 0) // still reports a fault of earlier work, as the contract says
        return cuda_stream_sync(c->dev->compute);
    return cuda_download(dst, src, (size_t)bytes, c->dev->compute);
}

int be_copy(struct mr_backend *be, void *dst, const void *src, uint64_t bytes) {
    cuda_be *c = cb(be);
    return memcpy_async(c, dst, src, bytes, cudaMemcpyDeviceToDevice, c->dev->compute,
                        "cudaMemcpyAsync (device to device)");
}

int be_sync(struct mr_backend *be, enum mr_stream stream) {
    cuda_be *c = cb(be);
    cudaStream_t st = NULL;
    int rc = stream_of(c, stream, &st);
    return rc ? rc : cuda_stream_sync(st);
}

// --- the copy stream and events ------------------------------------------------------------------

// struct mr_event is never defined: a cudaEvent_t (a pointer) travels as one.
cudaEvent_t ev_of(struct mr_event *ev) {
    return reinterpret_cast<cudaEvent_t>(ev);
}

int be_event_create(struct mr_backend *be, struct mr_event **out) {
    *out = NULL;
    int rc = enter(cb(be));
    if (rc)
        return rc;
    cudaEvent_t ev = NULL;
    cudaError_t e = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
    if (e != cudaSuccess)
        return cuda_util_err(e, "cudaEventCreateWithFlags");
    *out = reinterpret_cast<struct mr_event *>(ev);
    return MOERUN_OK;
}

void be_event_destroy(struct mr_backend *be, struct mr_event *ev) {
    if (!ev || enter(cb(be)) != MOERUN_OK)
        return;
    cudaEventDestroy(ev_of(ev));
    (void)cudaGetLastError();
}

int be_copy_async(struct mr_backend *be, void *dst, const void *src, uint64_t bytes) {
    cuda_be *c = cb(be);
    return memcpy_async(c, dst, src, bytes, cudaMemcpyHostToDevice, c->dev->copy,
                        "cudaMemcpyAsync (copy stream, host to device)");
}

int be_record(struct mr_backend *be, enum mr_stream stream, struct mr_event *ev) {
    cuda_be *c = cb(be);
    cudaStream_t st = NULL;
    if (!ev)
        return mr_err(MOERUN_ERR_INVALID_ARG, "cuda backend: record of a NULL event");
    int rc = stream_of(c, stream, &st);
    if (rc)
        return rc;
    cudaError_t e = cudaEventRecord(ev_of(ev), st);
    if (e != cudaSuccess)
        return cuda_util_err(e, "cudaEventRecord");
    return MOERUN_OK;
}

// A never-recorded event counts as completed: cudaStreamWaitEvent on it waits for nothing.
int be_wait(struct mr_backend *be, enum mr_stream stream, struct mr_event *ev) {
    cuda_be *c = cb(be);
    cudaStream_t st = NULL;
    if (!ev)
        return mr_err(MOERUN_ERR_INVALID_ARG, "cuda backend: wait on a NULL event");
    int rc = stream_of(c, stream, &st);
    if (rc)
        return rc;
    cudaError_t e = cudaStreamWaitEvent(st, ev_of(ev), 0);
    if (e != cudaSuccess)
        return cuda_util_err(e, "cudaStreamWaitEvent");
    return MOERUN_OK;
}

// fn runs on a CUDA runtime thread once the stream's earlier work is done; it must make no CUDA
// call (CUDA's rule for host functions, and the contract's: it must not call the backend).
int be_callback(struct mr_backend *be, enum mr_stream stream, mr_host_fn fn, void *arg) {
    cuda_be *c = cb(be);
    cudaStream_t st = NULL;
    if (!fn)
        return mr_err(MOERUN_ERR_INVALID_ARG, "cuda backend: callback without a function");
    int rc = stream_of(c, stream, &st);
    if (rc)
        return rc;
    cudaError_t e = cudaLaunchHostFunc(st, fn, arg);
    if (e != cudaSuccess)
        return cuda_util_err(e, "cudaLaunchHostFunc");
    return MOERUN_OK;
}

// --- compute -----------------------------------------------------------------------------------

bool staged_type(int type) { // dequantized to F16 in the workspace by the GEMM path
    return type != MOERUN_TYPE_F32 && type != MOERUN_TYPE_F16;
}

uint64_t be_workspace_bytes(struct mr_backend *be, const struct mr_workspace_need *need) {
    (void)be;
    if (!need || (int64_t)need->n_batch <= MM_FUSED_MAX || need->max_k <= 0)
        return 0; // every product is a fused matvec
    const unsigned types = need->types ? (unsigned)need->types : ~0u; // 0: assume any
    const unsigned f32 = 1u << MOERUN_TYPE_F32, f16 = 1u << MOERUN_TYPE_F16;
    if (!(types & ~f32))
        return 0; // F32 GEMMs stage nothing
    uint64_t bytes = align_up(cuda_matmul_x_bytes(need->max_k, need->n_batch));
    if (types & ~(f32 | f16)) {
        int64_t elems = need->max_elements > 0 && need->max_elements < MM_W_CHUNK
                            ? need->max_elements
                            : MM_W_CHUNK; // 0: unknown, a full chunk
        if (elems < need->max_k)
            elems = need->max_k; // at least one row of the widest product
        bytes += align_up((uint64_t)elems * 2);
    }
    return bytes;
}

void be_set_workspace(struct mr_backend *be, void *ws, uint64_t bytes) {
    cuda_be *c = cb(be);
    const uintptr_t p = (uintptr_t)ws, a = (uintptr_t)align_up(p);
    if (!ws || bytes < a - p) {
        c->ws = NULL, c->ws_bytes = 0;
        return;
    }
    c->ws = reinterpret_cast<uint8_t *>(a); // alloc gives 256-byte alignment: a == p
    c->ws_bytes = bytes - (a - p);
}

int be_matmul(struct mr_backend *be, int type, int64_t rows, int64_t k, const void *w, int64_t n,
              const float *x, float *y) {
    cuda_be *c = cb(be);
    int rc = cuda_check_weights("cuda matmul", type, rows, k, w); // ERR_UNSUPPORTED for a type
    if (rc)
        return rc;
    if (n < 0)
        return mr_err(MOERUN_ERR_INVALID_ARG, "cuda matmul: n %lld", (long long)n);
    if (rows == 0 || n == 0)
        return MOERUN_OK;
    if ((rc = enter(c)))
        return rc;
    if (n <= MM_FUSED_MAX)
        return cuda_matvec_n(type, rows, k, w, n, x, y, c->dev->compute);
    if (type != MOERUN_TYPE_F32) {
        const uint64_t need = cuda_matmul_x_bytes(k, n) + (staged_type(type) ? (uint64_t)k * 2 : 0);
        if (c->ws_bytes < need)
            return mr_err(MOERUN_ERR_INVALID_ARG,
                          "cuda matmul: n %lld, k %lld needs %llu bytes of workspace, the "
                          "instance has %llu (size it with workspace_bytes for n_batch >= n)",
                          (long long)n, (long long)k, (unsigned long long)need,
                          (unsigned long long)c->ws_bytes);
    }
    return cuda_matmul_ws(c->dev->cublas, type, rows, k, w, n, x, y, c->ws, (size_t)c->ws_bytes,
                          c->dev->compute);
}

// The layer parts: each enters the device and runs its kernel on the compute stream.
#define COMPUTE(call)                                                                              \
    do {                                                                                           \
        cuda_be *c = cb(be);                                                                       \
        int rc = enter(c);                                                                         \
        if (rc)                                                                                    \
            return rc;                                                                             \
        void *stream = c->dev->compute;                                                            \
        return call;                                                                               \
    } while (0)

int be_rmsnorm(struct mr_backend *be, float *out, const float *x, const float *w, int64_t n_rows,
               int64_t n, float eps) {
    if (n_rows == 0)
        return MOERUN_OK;
    COMPUTE(cuda_rmsnorm(out, x, w, n_rows, n, eps, stream));
}

int be_rope(struct mr_backend *be, float *x, int64_t n_tok, int n_head, int hd, int n_rot,
            int64_t pos0, float base, enum mr_rope_mode mode) {
    enum cuda_rope_style style;
    if (mode == MR_ROPE_MODE_NORM)
        style = CUDA_ROPE_NORM;
    else if (mode == MR_ROPE_MODE_NEOX)
        style = CUDA_ROPE_NEOX;
    else
        return mr_err(MOERUN_ERR_INVALID_ARG, "cuda rope: mode %d", (int)mode);
    COMPUTE(cuda_rope(x, n_tok, n_head, hd, n_rot, pos0, base, style, stream));
}

// One token: the decode kernel over keys 0 .. pos0; more: the tiled causal kernel.
int be_attention(struct mr_backend *be, const float *q, const float *k_cache, const float *v_cache,
                 float *o, int64_t n_tok, int64_t pos0, int n_head, int n_head_kv, int hd) {
    if (n_tok < 0 || pos0 < 0)
        return mr_err(MOERUN_ERR_INVALID_ARG, "cuda attention: %lld tokens at %lld",
                      (long long)n_tok, (long long)pos0);
    if (n_tok == 0)
        return MOERUN_OK;
    if (n_tok == 1)
        COMPUTE(
            cuda_attention_decode(q, k_cache, v_cache, o, n_head, n_head_kv, hd, pos0 + 1, stream));
    COMPUTE(
        cuda_attention_prompt(q, k_cache, v_cache, o, n_tok, pos0, n_head, n_head_kv, hd, stream));
}

int be_softmax_topk(struct mr_backend *be, float *logits, int64_t n_tok, int E, int k, bool renorm,
                    float *probs, int32_t *sel, float *sel_w) {
    COMPUTE(cuda_softmax_topk(logits, n_tok, E, k, renorm, probs, sel, sel_w, stream));
}

int be_swiglu(struct mr_backend *be, float *out, const float *g, const float *u, int64_t n) {
    COMPUTE(cuda_swiglu(out, g, u, n, stream));
}

int be_add(struct mr_backend *be, float *y, const float *x, int64_t n) {
    COMPUTE(cuda_add(y, x, n, stream));
}

int be_add_rows(struct mr_backend *be, float *y, const float *b, int64_t n_rows, int64_t n) {
    COMPUTE(cuda_add_rows(y, b, n_rows, n, stream));
}

int be_gather_rows(struct mr_backend *be, float *dst, const float *src, const int32_t *idx,
                   int64_t n, int64_t d) {
    COMPUTE(cuda_gather_rows(dst, src, idx, n, d, stream));
}

int be_scatter_scaled(struct mr_backend *be, float *dst, const float *src, const int32_t *idx,
                      const float *scale, int64_t n, int64_t d) {
    COMPUTE(cuda_scatter_scaled(dst, src, idx, scale, n, d, stream));
}

int be_sum_slots(struct mr_backend *be, float *y, const float *slots, int64_t n_tok, int k,
                 int64_t d) {
    COMPUTE(cuda_sum_slots(y, slots, n_tok, k, d, stream));
}

int be_add_gated(struct mr_backend *be, float *y, const float *x, const float *g, int64_t n_tok,
                 int64_t d) {
    COMPUTE(cuda_add_gated(y, x, g, n_tok, d, stream));
}

#undef COMPUTE

struct mr_backend_ops make_ops() {
    struct mr_backend_ops o;
    memset(&o, 0, sizeof(o));
    o.version = MR_BACKEND_VERSION;
    o.name = "cuda";
    o.clone = be_clone;
    o.destroy = be_destroy;
    o.describe = be_describe;
    o.mem_info = be_mem_info;
    o.alloc = be_alloc;
    o.free = be_free;
    o.host_register = be_host_register;
    o.host_unregister = be_host_unregister;
    o.upload = be_upload;
    o.download = be_download;
    o.copy = be_copy;
    o.sync = be_sync;
    o.event_create = be_event_create;
    o.event_destroy = be_event_destroy;
    o.copy_async = be_copy_async;
    o.record = be_record;
    o.wait = be_wait;
    o.callback = be_callback;
    o.workspace_bytes = be_workspace_bytes;
    o.set_workspace = be_set_workspace;
    o.matmul = be_matmul;
    o.rmsnorm = be_rmsnorm;
    o.rope = be_rope;
    o.attention = be_attention;
    o.softmax_topk = be_softmax_topk;
    o.swiglu = be_swiglu;
    o.add = be_add;
    o.add_rows = be_add_rows;
    o.gather_rows = be_gather_rows;
    o.scatter_scaled = be_scatter_scaled;
    o.sum_slots = be_sum_slots;
    o.add_gated = be_add_gated;
    return o;
}

const struct mr_backend_ops *ops_table() {
    static const struct mr_backend_ops ops = make_ops(); // thread-safe initialisation (C++11)
    return &ops;
}

// The device state for cfg->device, or an error. On failure everything made is undone.
int dev_create(const struct mr_backend_config *cfg, cuda_dev **out) {
    *out = NULL;
    int n = 0;
    int rc = cuda_device_count(&n);
    if (rc) {
        char why[256];
        snprintf(why, sizeof(why), "%s", moerun_errmsg());
        return mr_err(MOERUN_ERR_BACKEND, "no CUDA device: %s", why);
    }
    if (n == 0) {
        int drv = 0, rt = 0;
        cudaDriverGetVersion(&drv);
        cudaRuntimeGetVersion(&rt);
        (void)cudaGetLastError();
        return mr_err(MOERUN_ERR_BACKEND,
                      "no CUDA device: the driver reports none (driver API %d, runtime %d%s)", drv,
                      rt, drv == 0 ? ": no driver loaded" : "");
    }
    if (cfg->device < 0 || cfg->device >= n)
        return mr_err(MOERUN_ERR_BACKEND, "no CUDA device %d: %d device%s (0 .. %d)", cfg->device,
                      n, n == 1 ? "" : "s", n - 1);
    cudaError_t e = cudaSetDevice(cfg->device);
    if (e != cudaSuccess)
        return cuda_util_err(e, "cudaSetDevice");
    cudaDeviceProp prop;
    if ((e = cudaGetDeviceProperties(&prop, cfg->device)) != cudaSuccess)
        return cuda_util_err(e, "cudaGetDeviceProperties");

    cuda_dev *d = static_cast<cuda_dev *>(mr_calloc(cfg->allocator, 1, sizeof(cuda_dev)));
    if (!d)
        return mr_err(MOERUN_ERR_NOMEM, "cuda backend: no memory for the device state");
    d->device = cfg->device;
    d->a = cfg->allocator;
    d->refs = 1; // the creator's, handed to the root instance
    snprintf(d->desc, sizeof(d->desc), "cuda:%d %s, %.1f GiB, cc %d.%d", cfg->device, prop.name,
             (double)prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0), prop.major, prop.minor);
    void *compute = NULL, *copy = NULL;
    if ((rc = cuda_stream_create(&compute)) || (rc = cuda_stream_create(&copy)) ||
        (rc = cuda_cublas_create(&d->cublas)) ||
        (rc = cuda_cublas_set_stream(d->cublas, compute))) {
        d->compute = cuda_util_stream(compute), d->copy = cuda_util_stream(copy);
        dev_release(d); // refs 1 -> 0: undoes what was made
        return rc;
    }
    d->compute = cuda_util_stream(compute), d->copy = cuda_util_stream(copy);
    *out = d;
    return MOERUN_OK;
}

} // namespace

extern "C" int mr_backend_cuda_create(const struct mr_backend_config *cfg,
                                      struct mr_backend **out) {
    if (!out)
        return mr_err(MOERUN_ERR_INVALID_ARG, "mr_backend_cuda_create: no out pointer");
    *out = NULL;
    if (!cfg)
        return mr_err(MOERUN_ERR_INVALID_ARG, "mr_backend_cuda_create: no config");
    cuda_dev *d = NULL;
    int rc = dev_create(cfg, &d);
    if (rc)
        return rc;
    rc = new_instance(d, out); // takes a reference of its own
    dev_release(d);            // and drops the creator's: the root now holds the only one
    return rc;
}
