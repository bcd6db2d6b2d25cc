/* CPU weight types: GGML block layouts, conversions, and the kernel table (internal).
 *
 * Every supported weight type has a companion ("vec dot") type that activations are
 * converted to before a dot product, as llama.cpp does, so results match its CPU backend:
 *   F32 -> F32, F16 -> F16, BF16 -> BF16, Q8_0 -> Q8_0, Q4_0 -> Q8_0,
 *   Q4_K / Q5_K / Q6_K -> Q8_K.
 * A row of n elements of type t is n / blck(t) blocks of type_size(t) bytes (types.h).
 */
#ifndef MOERUN_CPU_QUANTS_H
#define MOERUN_CPU_QUANTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define QK4_0        32
#define QK8_0        32
#define QK_K         256
#define K_SCALE_SIZE 12

typedef uint16_t mr_fp16; /* IEEE half, raw bits */
typedef uint16_t mr_bf16; /* bfloat16, raw bits */

typedef struct {
    mr_fp16 d;             /* delta */
    uint8_t qs[QK4_0 / 2]; /* nibbles: low = elements 0..15, high = 16..31; value = q - 8 */
} block_q4_0;

typedef struct {
    mr_fp16 d;        /* delta */
    int8_t qs[QK8_0]; /* quants */
} block_q8_0;

typedef struct {
    mr_fp16 d;                    /* super-block scale for quantized scales */
    mr_fp16 dmin;                 /* super-block scale for quantized mins */
    uint8_t scales[K_SCALE_SIZE]; /* 8 scales and 8 mins, 6 bits each */
    uint8_t qs[QK_K / 2];         /* 4-bit quants */
} block_q4_K;

typedef struct {
    mr_fp16 d;
    mr_fp16 dmin;
    uint8_t scales[K_SCALE_SIZE];
    uint8_t qh[QK_K / 8]; /* high bit of the quants */
    uint8_t qs[QK_K / 2]; /* low 4 bits */
} block_q5_K;

typedef struct {
    uint8_t ql[QK_K / 2];     /* low 4 bits */
    uint8_t qh[QK_K / 4];     /* high 2 bits */
    int8_t scales[QK_K / 16]; /* 8-bit scales of 16-element groups */
    mr_fp16 d;                /* super-block scale */
} block_q6_K;

typedef struct {
    float d;                  /* delta */
    int8_t qs[QK_K];          /* quants */
    int16_t bsums[QK_K / 16]; /* sums of quants in groups of 16 */
} block_q8_K;

_Static_assert(sizeof(block_q4_0) == 18, "block_q4_0 layout");
_Static_assert(sizeof(block_q8_0) == 34, "block_q8_0 layout");
_Static_assert(sizeof(block_q4_K) == 144, "block_q4_K layout");
_Static_assert(sizeof(block_q5_K) == 176, "block_q5_K layout");
_Static_assert(sizeof(block_q6_K) == 210, "block_q6_K layout");
_Static_assert(sizeof(block_q8_K) == 292, "block_q8_K layout");

/* Scalar conversions, bit-exact with ggml's (round to nearest even; NaN stays NaN). */
float mr_fp16_to_fp32(mr_fp16 h);
mr_fp16 mr_fp32_to_fp16(float f);
float mr_bf16_to_fp32(mr_bf16 h);
mr_bf16 mr_fp32_to_bf16(float f);

/* ---------------------------------------------------------------------------------------------
 * Kernel table. One table per instruction set; all tables compute the same functions:
 * to_float bit-exactly, from_float bit-exactly, vec_dot within float rounding of the scalar.
 * ------------------------------------------------------------------------------------------- */

enum cpu_isa {
    CPU_ISA_SCALAR = 0,
    CPU_ISA_AVX2 = 1,   /* AVX2 + FMA + F16C */
    CPU_ISA_AVX512 = 2, /* AVX-512 F/BW/VL/DQ + the AVX2 set */
    CPU_ISA_COUNT
};

/* dequantize n elements (a multiple of blck) of src into dst */
typedef void (*cpu_to_float_fn)(const void *src, float *dst, int64_t n);
/* quantize n elements (a multiple of blck) of src into dst */
typedef void (*cpu_from_float_fn)(const float *src, void *dst, int64_t n);
/* *s = dot(w, x) over n elements: w a row of the weight type, x a row of its vec_dot_type */
typedef void (*cpu_vec_dot_fn)(int64_t n, float *s, const void *w, const void *x);

struct cpu_type_kernels {
    int type;                     /* moerun_type */
    int vec_dot_type;             /* the companion type of activations */
    cpu_to_float_fn to_float;     /* NULL for none */
    cpu_from_float_fn from_float; /* quantize (for moe-synth and activations) */
    cpu_vec_dot_fn vec_dot;       /* NULL for activation-only types (Q8_K) */
};

/* Kernels of a type for an instruction set (falls back to the scalar entry where that set has
 * no faster version); NULL for a type with no CPU support. The table exists for every set; call
 * its functions only when cpu_isa_available(isa). Thread-safe (built once). */
const struct cpu_type_kernels *cpu_kernels(enum cpu_isa isa, int type);

/* The best instruction set this CPU runs (checked once with cpuid), capped by the
 * MOERUN_CPU_ISA environment variable ("scalar", "avx2", "avx512") when set. */
enum cpu_isa cpu_isa_best(void);
bool cpu_isa_available(enum cpu_isa isa);
const char *cpu_isa_name(enum cpu_isa isa);

/* The SIMD files' own entries (quants_avx2.c, quants_avx512.c): NULL for a type they do not
 * speed up, and NULL fields for functions they leave to the scalar code. dispatch.c merges
 * them over the scalar table once, at first use. */
const struct cpu_type_kernels *cpu_avx2_kernels(int type);
const struct cpu_type_kernels *cpu_avx512_kernels(int type);

/* Scalar reference implementations (quants_ref.c); the SIMD files are tested against these. */
void cpu_ref_to_float(int type, const void *src, float *dst, int64_t n);
void cpu_ref_from_float(int type, const float *src, void *dst, int64_t n);
void cpu_ref_vec_dot(int type, int64_t n, float *s, const void *w, const void *x);
/* The scalar table's entry for a type (what dispatch.c merges the SIMD entries over); NULL for a
 * type without CPU support. */
const struct cpu_type_kernels *cpu_ref_kernels(int type);

/* Weight quantizers: Q4_0, Q4_K, Q5_K, Q6_K follow ggml's reference quantizers
 * (quantize_row_*_ref, no importance matrix), search included; Q8_0 as the activations.
 * Activation quantizers, bit-exact with llama.cpp's x86 CPU backend (every table must match):
 *   Q8_0: amax = max |x| over the 32; d = amax / 127.f, stored as fp16; the multiplier is
 *         id = amax != 0 ? 127.f / amax : 0 (as ggml's AVX code, NOT 1 / d: they can differ in
 *         the last bit); q = x * id rounded to nearest, ties to even.
 *   Q8_K: max = the element of largest |x| (first on ties); max == 0: all zero; else
 *         iscale = -127.f / max, q = min(127, x * iscale rounded to nearest even),
 *         d = 1 / iscale, bsums[g] = sum of q[16g .. 16g + 15].
 *   F16, BF16: mr_fp32_to_fp16 / mr_fp32_to_bf16. */

#endif /* MOERUN_CPU_QUANTS_H */
