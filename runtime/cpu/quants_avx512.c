/* AVX-512 (F, BW, VL, DQ + AVX2, FMA, F16C) kernels for every CPU weight type.
 *
 * Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c and only called
 * when cpuid reports those sets (dispatch.c). Same functions as quants_ref.c:
 *   to_float   bit-exact: the same float operations in the same order as the scalar code
 *              (so no fused multiply-adds there; C11 mode keeps GCC from contracting);
 *   from_float bit-exact: the same roundings (RNE) as the scalar code;
 *   vec_dot    within float rounding: integer products per block (VPMADDUBSW / VPMADDWD),
 *              scaled per block, accumulated in float registers, one horizontal sum per row.
 *
 * The vec_dot kernels are the decode (matrix-vector) kernels and are memory bound: they load
 * whole blocks, keep the unpacking to a few vector instructions per 64 weights and hold every
 * accumulator in a register.
 */
#include "quants.h"

#include "moerun.h"

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

/* ---------------------------------------------------------------------------------------------
 * helpers
 * ------------------------------------------------------------------------------------------- */

static inline float h2f(mr_fp16 h) {
    return _cvtsh_ss(h);
}

/* all-ones mask of the low n (< 16) lanes */
static inline __mmask16 tail_mask16(int64_t n) {
    return (__mmask16)((1u << n) - 1u);
}

/* 32 bytes at p into the low half of a 512-bit register and 32 bytes at q into the high half */
static inline __m512i load_2x256(const void *p, const void *q) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p)),
                              _mm256_loadu_si256((const __m256i *)q), 1);
}

/* 16 floats: a in lanes 0..7, b in lanes 8..15 */
static inline __m512 set_2x8_ps(float a, float b) {
    return _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1);
}

/* signed bytes a . signed bytes b, pairs of 2 summed to int16 (values of b never -128) */
static inline __m512i dot_s8_s8(__m512i a, __m512i b) {
    const __mmask64 neg = _mm512_movepi8_mask(a);
    const __m512i bs = _mm512_mask_sub_epi8(b, neg, _mm512_setzero_si512(), b);
    return _mm512_maddubs_epi16(_mm512_abs_epi8(a), bs);
}

/* the fp16 scales at the start of 8 consecutive blocks of stride bytes, as 8 floats */
static inline __m256 load_d8(const void *blocks, size_t stride) {
    const uint8_t *p = blocks;
    uint64_t lo = 0, hi = 0;
    for (int k = 0; k < 4; k++) {
        uint16_t h0, h1;
        memcpy(&h0, p + (size_t)k * stride, sizeof(h0));
        memcpy(&h1, p + (size_t)(k + 4) * stride, sizeof(h1));
        lo |= (uint64_t)h0 << (16 * k);
        hi |= (uint64_t)h1 << (16 * k);
    }
    return _mm256_cvtph_ps(_mm_set_epi64x((long long)hi, (long long)lo));
}

/* lanes 0..7 = element 2k of v, lanes 8..15 = element 2k+1 */
static inline __m512i pair_idx(int k) {
    return _mm512_mask_blend_epi32(0xff00, _mm512_set1_epi32(2 * k), _mm512_set1_epi32(2 * k + 1));
}

static inline float hsum256_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Q4_K / Q5_K: the 12 packed bytes of 6-bit scales and mins at p (16 bytes are read; the quants
 * follow them in the block) into bytes sc[0..7] | m[0..7]. With a0..a2 the three 32-bit words:
 *   sc[0..3] = a0 & 0x3f,  sc[4..7] = (a2 & 0x0f) | ((a0 >> 6) & 3) << 4,
 *   m[0..3]  = a1 & 0x3f,  m[4..7]  = ((a2 >> 4) & 0x0f) | ((a1 >> 6) & 3) << 4  (per byte). */
static inline __m128i unpack_scales_k4_v(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p);           /* a0 a1 a2 .. */
    const __m128i w = _mm_shuffle_epi32(v, _MM_SHUFFLE(1, 1, 0, 0)); /* a0 a0 a1 a1 */
    const __m128i u = _mm_shuffle_epi32(v, _MM_SHUFFLE(2, 1, 2, 0)); /* a0 a2 a1 a2 */
    const __m128i lo = _mm_and_si128(w, _mm_set1_epi8(0x3f));        /* lanes 0, 2 */
    /* lanes 1, 3: ((a2 >> {0, 4}) & 0x0f) | (({a0, a1} >> 2) & 0x30) */
    const __m128i x = _mm_srlv_epi32(u, _mm_set_epi32(4, 0, 0, 0));
    const __m128i y = _mm_and_si128(_mm_srli_epi32(w, 2), _mm_set1_epi8(0x30));
    const __m128i hi = _mm_ternarylogic_epi32(x, _mm_set1_epi8(0x0f), y, 0xEA);
    return _mm_mask_blend_epi32(0x0a, lo, hi);
}

/* ---------------------------------------------------------------------------------------------
 * F32, F16, BF16
 * ------------------------------------------------------------------------------------------- */

static inline __m512 load_bf16x16(const mr_bf16 *p) {
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

static inline __m512 maskz_load_bf16x16(__mmask16 m, const mr_bf16 *p) {
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

static inline __m512 load_f16x16(const mr_fp16 *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

static inline __m512 maskz_load_f16x16(__mmask16 m, const mr_fp16 *p) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

static inline __m512 load_f32x16(const float *p) {
    return _mm512_loadu_ps(p);
}

static inline __m512 maskz_load_f32x16(__mmask16 m, const float *p) {
    return _mm512_maskz_loadu_ps(m, p);
}

/* Dot products of two float rows of element type T, read 16 at a time through LOAD (MLOAD for
 * the masked tail): four accumulators over 64 elements per step. */
#define VEC_DOT_FLOAT(name, T, LOAD, MLOAD)                                                        \
    static void name(int64_t n, float *s, const void *w, const void *x) {                          \
        const T *a = w, *b = x;                                                                    \
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();                             \
        __m512 acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();                             \
        int64_t i = 0;                                                                             \
        for (; i + 64 <= n; i += 64) {                                                             \
            acc0 = _mm512_fmadd_ps(LOAD(a + i), LOAD(b + i), acc0);                                \
            acc1 = _mm512_fmadd_ps(LOAD(a + i + 16), LOAD(b + i + 16), acc1);                      \
            acc2 = _mm512_fmadd_ps(LOAD(a + i + 32), LOAD(b + i + 32), acc2);                      \
            acc3 = _mm512_fmadd_ps(LOAD(a + i + 48), LOAD(b + i + 48), acc3);                      \
        }                                                                                          \
        for (; i + 16 <= n; i += 16)                                                               \
            acc0 = _mm512_fmadd_ps(LOAD(a + i), LOAD(b + i), acc0);                                \
        if (i < n) {                                                                               \
            const __mmask16 m = tail_mask16(n - i);                                                \
            acc1 = _mm512_fmadd_ps(MLOAD(m, a + i), MLOAD(m, b + i), acc1);                        \
        }                                                                                          \
        *s = _mm512_reduce_add_ps(                                                                 \
            _mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));                  \
    }

VEC_DOT_FLOAT(vec_dot_f32, float, load_f32x16, maskz_load_f32x16)
VEC_DOT_FLOAT(vec_dot_f16, mr_fp16, load_f16x16, maskz_load_f16x16)
VEC_DOT_FLOAT(vec_dot_bf16, mr_bf16, load_bf16x16, maskz_load_bf16x16)

static void to_float_f32(const void *src, float *dst, int64_t n) {
    memcpy(dst, src, (size_t)n * sizeof(float));
}

static void from_float_f32(const float *src, void *dst, int64_t n) {
    memcpy(dst, src, (size_t)n * sizeof(float));
}

/* Widen a row of element type T to float, 16 at a time through LOAD (MLOAD for the tail). */
#define TO_FLOAT_WIDEN(name, T, LOAD, MLOAD)                                                       \
    static void name(const void *src, float *dst, int64_t n) {                                     \
        const T *x = src;                                                                          \
        int64_t i = 0;                                                                             \
        for (; i + 16 <= n; i += 16)                                                               \
            _mm512_storeu_ps(dst + i, LOAD(x + i));                                                \
        if (i < n) {                                                                               \
            const __mmask16 m = tail_mask16(n - i);                                                \
            _mm512_mask_storeu_ps(dst + i, m, MLOAD(m, x + i));                                    \
        }                                                                                          \
    }

TO_FLOAT_WIDEN(to_float_f16, mr_fp16, load_f16x16, maskz_load_f16x16)
TO_FLOAT_WIDEN(to_float_bf16, mr_bf16, load_bf16x16, maskz_load_bf16x16)

static void from_float_f16(const float *src, void *dst, int64_t n) {
    mr_fp16 *y = dst;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
        _mm256_storeu_si256((__m256i *)(y + i), h);
    }
    if (i < n) {
        const __mmask16 m = tail_mask16(n - i);
        const __m256i h =
            _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, src + i), _MM_FROUND_TO_NEAREST_INT);
        _mm256_mask_storeu_epi16(y + i, m, h);
    }
}

/* round to nearest even; NaN -> quiet NaN with the same sign and top payload bits */
static inline __m256i f32_to_bf16x16(__m512 f) {
    const __m512i u = _mm512_castps_si512(f);
    const __m512i abs = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(abs, _mm512_set1_epi32(0x7f800000));
    const __m512i hi = _mm512_srli_epi32(u, 16);
    const __m512i odd = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd);
    r = _mm512_srli_epi32(r, 16);
    r = _mm512_mask_or_epi32(r, nan, hi, _mm512_set1_epi32(64));
    return _mm512_cvtepi32_epi16(r);
}

static void from_float_bf16(const float *src, void *dst, int64_t n) {
    mr_bf16 *y = dst;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(y + i), f32_to_bf16x16(_mm512_loadu_ps(src + i)));
    if (i < n) {
        const __mmask16 m = tail_mask16(n - i);
        _mm256_mask_storeu_epi16(y + i, m, f32_to_bf16x16(_mm512_maskz_loadu_ps(m, src + i)));
    }
}

/* ---------------------------------------------------------------------------------------------
 * Q8_0, Q4_0 (activations Q8_0)
 * ------------------------------------------------------------------------------------------- */

static void vec_dot_q8_0_q8_0(int64_t n, float *s, const void *w, const void *x) {
    const block_q8_0 *a = w;
    const block_q8_0 *b = x;
    const int64_t nb = n / QK8_0;
    const __m512i ones = _mm512_set1_epi16(1);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    const __m512i idx0 = pair_idx(0), idx1 = pair_idx(1), idx2 = pair_idx(2), idx3 = pair_idx(3);
    int64_t i = 0;
    for (; i + 8 <= nb; i += 8) {
        /* d_w * d_x of the 8 blocks, then 2 blocks (64 products) per register */
        const __m512 d = _mm512_castps256_ps512(
            _mm256_mul_ps(load_d8(&a[i], sizeof(*a)), load_d8(&b[i], sizeof(*b))));
#define Q8_0_PAIR(k)                                                                               \
    _mm512_cvtepi32_ps(                                                                            \
        _mm512_madd_epi16(dot_s8_s8(load_2x256(a[i + 2 * (k)].qs, a[i + 2 * (k) + 1].qs),          \
                                    load_2x256(b[i + 2 * (k)].qs, b[i + 2 * (k) + 1].qs)),         \
                          ones))
        acc0 = _mm512_fmadd_ps(Q8_0_PAIR(0), _mm512_permutexvar_ps(idx0, d), acc0);
        acc1 = _mm512_fmadd_ps(Q8_0_PAIR(1), _mm512_permutexvar_ps(idx1, d), acc1);
        acc0 = _mm512_fmadd_ps(Q8_0_PAIR(2), _mm512_permutexvar_ps(idx2, d), acc0);
        acc1 = _mm512_fmadd_ps(Q8_0_PAIR(3), _mm512_permutexvar_ps(idx3, d), acc1);
#undef Q8_0_PAIR
    }
    for (; i + 2 <= nb; i += 2) {
        const __m512i p = _mm512_madd_epi16(
            dot_s8_s8(load_2x256(a[i].qs, a[i + 1].qs), load_2x256(b[i].qs, b[i + 1].qs)), ones);
        const __m512 d = set_2x8_ps(h2f(a[i].d) * h2f(b[i].d), h2f(a[i + 1].d) * h2f(b[i + 1].d));
        acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), d, acc0);
    }
    if (i < nb) {
        /* last odd block: the upper half of the registers holds zeros */
        const __m512i va = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)a[i].qs));
        const __m512i vb = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)b[i].qs));
        const __m512i p = _mm512_madd_epi16(dot_s8_s8(va, vb), ones);
        acc1 =
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(h2f(a[i].d) * h2f(b[i].d)), acc1);
    }
    *s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

/* the 16 nibble bytes of two Q4_0 blocks as 64 bytes 0..15 in element order: [a lo, a hi, b lo,
 * b hi] */
static inline __m512i unpack_q4_0_x2(const block_q4_0 *a, const block_q4_0 *b) {
    const __m256i ab =
        _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)a->qs)),
                                _mm_loadu_si128((const __m128i *)b->qs), 1);
    const __m512i v = _mm512_castsi256_si512(ab);
    const __m512i aabb = _mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(1, 1, 0, 0));
    const __m512i sh = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);
    return _mm512_and_si512(_mm512_srlv_epi64(aabb, sh), _mm512_set1_epi8(0x0f));
}

static void vec_dot_q4_0_q8_0(int64_t n, float *s, const void *w, const void *x) {
    const block_q4_0 *a = w;
    const block_q8_0 *b = x;
    const int64_t nb = n / QK4_0;
    const __m512i ones = _mm512_set1_epi16(1);
    const __m512i eight = _mm512_set1_epi8(8);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    const __m512i idx0 = pair_idx(0), idx1 = pair_idx(1), idx2 = pair_idx(2), idx3 = pair_idx(3);
    int64_t i = 0;
    /* (q - 8) . y = q . y - 8 . y, both with unsigned-by-signed byte products */
#define Q4_0_PAIR(k)                                                                               \
    _mm512_cvtepi32_ps(_mm512_madd_epi16(                                                          \
        _mm512_sub_epi16(                                                                          \
            _mm512_maddubs_epi16(unpack_q4_0_x2(&a[i + 2 * (k)], &a[i + 2 * (k) + 1]),             \
                                 load_2x256(b[i + 2 * (k)].qs, b[i + 2 * (k) + 1].qs)),            \
            _mm512_maddubs_epi16(eight, load_2x256(b[i + 2 * (k)].qs, b[i + 2 * (k) + 1].qs))),    \
        ones))
    for (; i + 8 <= nb; i += 8) {
        const __m512 d = _mm512_castps256_ps512(
            _mm256_mul_ps(load_d8(&a[i], sizeof(*a)), load_d8(&b[i], sizeof(*b))));
        acc0 = _mm512_fmadd_ps(Q4_0_PAIR(0), _mm512_permutexvar_ps(idx0, d), acc0);
        acc1 = _mm512_fmadd_ps(Q4_0_PAIR(1), _mm512_permutexvar_ps(idx1, d), acc1);
        acc0 = _mm512_fmadd_ps(Q4_0_PAIR(2), _mm512_permutexvar_ps(idx2, d), acc0);
        acc1 = _mm512_fmadd_ps(Q4_0_PAIR(3), _mm512_permutexvar_ps(idx3, d), acc1);
    }
#undef Q4_0_PAIR
    for (; i + 2 <= nb; i += 2) {
        const __m512i q = unpack_q4_0_x2(&a[i], &a[i + 1]);
        const __m512i y = load_2x256(b[i].qs, b[i + 1].qs);
        const __m512i p16 =
            _mm512_sub_epi16(_mm512_maddubs_epi16(q, y), _mm512_maddubs_epi16(eight, y));
        const __m512i p = _mm512_madd_epi16(p16, ones);
        const __m512 d = set_2x8_ps(h2f(a[i].d) * h2f(b[i].d), h2f(a[i + 1].d) * h2f(b[i + 1].d));
        acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), d, acc0);
    }
    if (i < nb) {
        const __m128i q16 = _mm_loadu_si128((const __m128i *)a[i].qs);
        const __m256i q = _mm256_and_si256(
            _mm256_inserti128_si256(_mm256_castsi128_si256(q16), _mm_srli_epi16(q16, 4), 1),
            _mm256_set1_epi8(0x0f));
        const __m256i y = _mm256_loadu_si256((const __m256i *)b[i].qs);
        const __m256i p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(q, y),
                                             _mm256_maddubs_epi16(_mm256_set1_epi8(8), y));
        const __m256i p = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
        const __m512 pf = _mm512_zextps256_ps512(_mm256_cvtepi32_ps(p));
        acc1 = _mm512_fmadd_ps(pf, _mm512_set1_ps(h2f(a[i].d) * h2f(b[i].d)), acc1);
    }
    *s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

static void to_float_q8_0(const void *src, float *dst, int64_t n) {
    const block_q8_0 *x = src;
    const int64_t nb = n / QK8_0;
    for (int64_t i = 0; i < nb; i++) {
        const __m512 d = _mm512_set1_ps(h2f(x[i].d));
        const __m512i q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)x[i].qs));
        const __m512i q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(x[i].qs + 16)));
        _mm512_storeu_ps(dst + i * QK8_0, _mm512_mul_ps(_mm512_cvtepi32_ps(q0), d));
        _mm512_storeu_ps(dst + i * QK8_0 + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(q1), d));
    }
}

static void to_float_q4_0(const void *src, float *dst, int64_t n) {
    const block_q4_0 *x = src;
    const int64_t nb = n / QK4_0;
    const __m128i m4 = _mm_set1_epi8(0x0f);
    const __m128i eight = _mm_set1_epi8(8);
    for (int64_t i = 0; i < nb; i++) {
        const __m512 d = _mm512_set1_ps(h2f(x[i].d));
        const __m128i q = _mm_loadu_si128((const __m128i *)x[i].qs);
        const __m128i lo = _mm_sub_epi8(_mm_and_si128(q, m4), eight);
        const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), m4), eight);
        _mm512_storeu_ps(dst + i * QK4_0,
                         _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), d));
        _mm512_storeu_ps(dst + i * QK4_0 + 16,
                         _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), d));
    }
}

/* As llama.cpp's x86 path and quants_ref.c: amax over 32 floats; d = amax / 127 stored as fp16
 * (RNE); q = RNE(x * (127 / amax)) (the multiplier 127 / amax, not 1 / d) */
static void from_float_q8_0(const float *src, void *dst, int64_t n) {
    block_q8_0 *y = dst;
    const int64_t nb = n / QK8_0;
    for (int64_t i = 0; i < nb; i++) {
        const __m512 x0 = _mm512_loadu_ps(src + i * QK8_0);
        const __m512 x1 = _mm512_loadu_ps(src + i * QK8_0 + 16);
        const float amax =
            _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        const float d = amax / 127.0f;
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        y[i].d = (mr_fp16)_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
        const __m512 vid = _mm512_set1_ps(id);
        const __m512i q0 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(x0, vid),
                                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512i q1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(x1, vid),
                                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)y[i].qs, _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(y[i].qs + 16), _mm512_cvtsepi32_epi8(q1));
    }
}

/* ---------------------------------------------------------------------------------------------
 * Q8_K (activations of the K types)
 * ------------------------------------------------------------------------------------------- */

/* max = the element of largest |x| (first on ties); q = min(127, RNE(x * -127 / max));
 * d = 1 / (-127 / max); bsums = sums of 16 quants */
static void from_float_q8_k(const float *src, void *dst, int64_t n) {
    block_q8_K *y = dst;
    const int64_t nb = n / QK_K;
    for (int64_t i = 0; i < nb; i++) {
        const float *x = src + i * QK_K;
        __m512 vmax = _mm512_setzero_ps();
        for (int j = 0; j < QK_K; j += 16)
            vmax = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + j)), vmax);
        const float amax = _mm512_reduce_max_ps(vmax);
        if (amax == 0.0f) {
            memset(&y[i], 0, sizeof(y[i]));
            continue;
        }
        float max = 0.0f;
        const __m512 va = _mm512_set1_ps(amax);
        for (int j = 0; j < QK_K; j += 16) {
            const __mmask16 m =
                _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(x + j)), va, _CMP_EQ_OQ);
            if (m) {
                max = x[j + __builtin_ctz(m)];
                break;
            }
        }
        const float iscale = -127.0f / max;
        const __m512 vs = _mm512_set1_ps(iscale);
        const __m512i lim = _mm512_set1_epi32(127);
        for (int j = 0; j < QK_K; j += 16) {
            __m512i q = _mm512_cvt_roundps_epi32(_mm512_mul_ps(vs, _mm512_loadu_ps(x + j)),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q = _mm512_min_epi32(q, lim);
            _mm_storeu_si128((__m128i *)(y[i].qs + j), _mm512_cvtsepi32_epi8(q));
            y[i].bsums[j / 16] = (int16_t)_mm512_reduce_add_epi32(q);
        }
        y[i].d = 1.0f / iscale;
    }
}

static void to_float_q8_k(const void *src, float *dst, int64_t n) {
    const block_q8_K *x = src;
    const int64_t nb = n / QK_K;
    for (int64_t i = 0; i < nb; i++) {
        const __m512 d = _mm512_set1_ps(x[i].d);
        for (int j = 0; j < QK_K; j += 16) {
            const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(x[i].qs + j)));
            _mm512_storeu_ps(dst + i * QK_K + j, _mm512_mul_ps(d, _mm512_cvtepi32_ps(q)));
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Q4_K, Q5_K (activations Q8_K)
 *
 * 128 weights at a time: 64 bytes of quants, masked, give sub-blocks 4h and 4h+2 (low nibbles of
 * bytes 0..31 and 32..63) and, shifted, 4h+1 and 4h+3; each register meets the matching two 32-byte
 * runs of Q8_K quants. Products by VPMADDUBSW, scaled by the 6-bit scales with VPMADDWD (one
 * scale per 256-bit half), summed per block in int32; the mins through the Q8_K bsums.
 * ------------------------------------------------------------------------------------------- */

/* byte control giving int16 lanes [sc[j0] x16 | sc[j1] x16] from a register holding sc[0..7] in
 * bytes 0..7 of every 128-bit lane */
static inline __m512i k4_scale_ctrl(int j0, int j1) {
    const __m512i lo = _mm512_set1_epi16((short)(0xff00 | j0));
    const __m512i hi = _mm512_set1_epi16((short)(0xff00 | j1));
    return _mm512_mask_blend_epi64(0xf0, lo, hi);
}

/* sum over the 8 sub-blocks of m[j] * (bsums[2j] + bsums[2j+1]), as 8 int32 to be summed;
 * scm holds sc[0..7] | m[0..7] */
static inline __m256i k4_mins_dot(__m128i scm, const int16_t *bsums) {
    /* int16 lanes m0 m0 m1 m1 .. m7 m7 */
    const __m256i ctrl =
        _mm256_set_epi8(-1, 15, -1, 15, -1, 14, -1, 14, -1, 13, -1, 13, -1, 12, -1, 12, /* lane 1 */
                        -1, 11, -1, 11, -1, 10, -1, 10, -1, 9, -1, 9, -1, 8, -1, 8);    /* lane 0 */
    const __m256i m16 = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(scm), ctrl);
    return _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)bsums), m16);
}

/* the sub-block order of the four 64-weight registers of a block (see above) */
#define K4_SUB0(r) (((r) >> 1) * 4 + ((r)&1))
#define K4_SUB1(r) (K4_SUB0(r) + 2)

static void vec_dot_q4_k_q8_k(int64_t n, float *s, const void *w, const void *x) {
    const block_q4_K *a = w;
    const block_q8_K *b = x;
    const int64_t nb = n / QK_K;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    const __m512i c0 = k4_scale_ctrl(0, 2), c1 = k4_scale_ctrl(1, 3);
    const __m512i c2 = k4_scale_ctrl(4, 6), c3 = k4_scale_ctrl(5, 7);
    __m512 acc = _mm512_setzero_ps();
    __m256 accm = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const float d = b[i].d * h2f(a[i].d);
        const float dmin = b[i].d * h2f(a[i].dmin);
        const __m128i scm = unpack_scales_k4_v(a[i].scales);
        const __m512i sc = _mm512_broadcast_i32x4(scm);

        const __m256i pm = k4_mins_dot(scm, b[i].bsums);
        accm = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pm), _mm256_set1_ps(dmin), accm);

        const int8_t *q8 = b[i].qs;
        const __m512i l0 = _mm512_loadu_si512(a[i].qs);
        const __m512i l1 = _mm512_loadu_si512(a[i].qs + 64);
        const __m512i q0 = _mm512_and_si512(l0, m4);
        const __m512i q1 = _mm512_and_si512(_mm512_srli_epi16(l0, 4), m4);
        const __m512i q2 = _mm512_and_si512(l1, m4);
        const __m512i q3 = _mm512_and_si512(_mm512_srli_epi16(l1, 4), m4);
        const __m512i p0 = _mm512_maddubs_epi16(q0, load_2x256(q8, q8 + 64));
        const __m512i p1 = _mm512_maddubs_epi16(q1, load_2x256(q8 + 32, q8 + 96));
        const __m512i p2 = _mm512_maddubs_epi16(q2, load_2x256(q8 + 128, q8 + 192));
        const __m512i p3 = _mm512_maddubs_epi16(q3, load_2x256(q8 + 160, q8 + 224));
        const __m512i s01 = _mm512_add_epi32(_mm512_madd_epi16(p0, _mm512_shuffle_epi8(sc, c0)),
                                             _mm512_madd_epi16(p1, _mm512_shuffle_epi8(sc, c1)));
        const __m512i s23 = _mm512_add_epi32(_mm512_madd_epi16(p2, _mm512_shuffle_epi8(sc, c2)),
                                             _mm512_madd_epi16(p3, _mm512_shuffle_epi8(sc, c3)));
        acc =
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s01, s23)), _mm512_set1_ps(d), acc);
    }
    *s = _mm512_reduce_add_ps(acc) - hsum256_ps(accm);
}

static void vec_dot_q5_k_q8_k(int64_t n, float *s, const void *w, const void *x) {
    const block_q5_K *a = w;
    const block_q8_K *b = x;
    const int64_t nb = n / QK_K;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    const __m512i sixteen = _mm512_set1_epi8(16);
    /* register r: scales and high-bit masks of its two sub-blocks (bit j of qh = sub-block j) */
    __m512i ctrl[4], bit[4];
    for (int r = 0; r < 4; r++) {
        ctrl[r] = k4_scale_ctrl(K4_SUB0(r), K4_SUB1(r));
        bit[r] = _mm512_mask_blend_epi64(0xf0, _mm512_set1_epi8((char)(1 << K4_SUB0(r))),
                                         _mm512_set1_epi8((char)(1 << K4_SUB1(r))));
    }
    __m512 acc = _mm512_setzero_ps();
    __m256 accm = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const float d = b[i].d * h2f(a[i].d);
        const float dmin = b[i].d * h2f(a[i].dmin);
        const __m128i scm = unpack_scales_k4_v(a[i].scales);
        const __m512i sc = _mm512_broadcast_i32x4(scm);

        const __m256i pm = k4_mins_dot(scm, b[i].bsums);
        accm = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pm), _mm256_set1_ps(dmin), accm);

        const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)a[i].qh));
        __m512i sumi = _mm512_setzero_si512();
        for (int h = 0; h < 2; h++) {
            const __m512i l = _mm512_loadu_si512(a[i].qs + 64 * h);
            const int8_t *q8 = b[i].qs + 128 * h;
            for (int r = 2 * h; r < 2 * h + 2; r++) {
                __m512i q = r & 1 ? _mm512_srli_epi16(l, 4) : l;
                q = _mm512_and_si512(q, m4);
                q = _mm512_mask_add_epi8(q, _mm512_test_epi8_mask(qh, bit[r]), q, sixteen);
                const int8_t *y = q8 + 32 * (r & 1);
                const __m512i p = _mm512_maddubs_epi16(q, load_2x256(y, y + 64));
                sumi =
                    _mm512_add_epi32(sumi, _mm512_madd_epi16(p, _mm512_shuffle_epi8(sc, ctrl[r])));
            }
        }
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_set1_ps(d), acc);
    }
    *s = _mm512_reduce_add_ps(acc) - hsum256_ps(accm);
}

/* y = (d * sc) * q - (dmin * m), as the scalar code */
static void to_float_q4_k(const void *src, float *dst, int64_t n) {
    const block_q4_K *x = src;
    const int64_t nb = n / QK_K;
    const __m128i m4 = _mm_set1_epi8(0x0f);
    for (int64_t i = 0; i < nb; i++) {
        const float d = h2f(x[i].d);
        const float dmin = h2f(x[i].dmin);
        uint8_t sc[16]; /* sc[0..7], then the mins */
        _mm_storeu_si128((__m128i *)sc, unpack_scales_k4_v(x[i].scales));
        const uint8_t *m = sc + 8;
        float *y = dst + i * QK_K;
        for (int j = 0; j < 8; j++) {
            /* sub-block j: nibbles (j odd: high) of qs[32 * (j / 2) ..] */
            const __m512 dj = _mm512_set1_ps(d * (float)sc[j]);
            const __m512 mj = _mm512_set1_ps(dmin * (float)m[j]);
            for (int h = 0; h < 2; h++) {
                __m128i q = _mm_loadu_si128((const __m128i *)(x[i].qs + 32 * (j / 2) + 16 * h));
                if (j & 1)
                    q = _mm_srli_epi16(q, 4);
                q = _mm_and_si128(q, m4);
                const __m512 qf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q));
                _mm512_storeu_ps(y + 32 * j + 16 * h, _mm512_sub_ps(_mm512_mul_ps(dj, qf), mj));
            }
        }
    }
}

static void to_float_q5_k(const void *src, float *dst, int64_t n) {
    const block_q5_K *x = src;
    const int64_t nb = n / QK_K;
    const __m128i m4 = _mm_set1_epi8(0x0f);
    const __m128i sixteen = _mm_set1_epi8(16);
    for (int64_t i = 0; i < nb; i++) {
        const float d = h2f(x[i].d);
        const float dmin = h2f(x[i].dmin);
        uint8_t sc[16]; /* sc[0..7], then the mins */
        _mm_storeu_si128((__m128i *)sc, unpack_scales_k4_v(x[i].scales));
        const uint8_t *m = sc + 8;
        float *y = dst + i * QK_K;
        for (int j = 0; j < 8; j++) {
            const __m512 dj = _mm512_set1_ps(d * (float)sc[j]);
            const __m512 mj = _mm512_set1_ps(dmin * (float)m[j]);
            const __m128i bit = _mm_set1_epi8((char)(1 << j));
            for (int h = 0; h < 2; h++) {
                __m128i q = _mm_loadu_si128((const __m128i *)(x[i].qs + 32 * (j / 2) + 16 * h));
                if (j & 1)
                    q = _mm_srli_epi16(q, 4);
                q = _mm_and_si128(q, m4);
                const __m128i qh = _mm_loadu_si128((const __m128i *)(x[i].qh + 16 * h));
                q = _mm_mask_add_epi8(q, _mm_test_epi8_mask(qh, bit), q, sixteen);
                const __m512 qf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q));
                _mm512_storeu_ps(y + 32 * j + 16 * h, _mm512_sub_ps(_mm512_mul_ps(dj, qf), mj));
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Q6_K (activations Q8_K)
 *
 * Per 128 weights: 64 bytes of ql give, masked, the low 4 bits of weights 0..63 and, shifted,
 * of 64..127; the 32 bytes of qh broadcast to both halves and shifted per half give bits 4-5.
 * The -32 offset is taken out once per block through the Q8_K bsums.
 * ------------------------------------------------------------------------------------------- */

static void vec_dot_q6_k_q8_k(int64_t n, float *s, const void *w, const void *x) {
    const block_q6_K *a = w;
    const block_q8_K *b = x;
    const int64_t nb = n / QK_K;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    const __m512i m30 = _mm512_set1_epi8(0x30);
    const __m512i sh_lo = _mm512_set_epi64(2, 2, 2, 2, 4, 4, 4, 4); /* left */
    const __m512i sh_hi = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0); /* right */
    /* idx[v]: int16 lane l takes scale 4v + l / 8 (one scale per 16 weights) */
    const long long m = 0x0001000100010001LL;
    const __m512i lane8 = _mm512_set_epi64(3 * m, 3 * m, 2 * m, 2 * m, m, m, 0, 0);
    __m512i idx[4];
    for (int v = 0; v < 4; v++)
        idx[v] = _mm512_add_epi16(lane8, _mm512_set1_epi16((short)(4 * v)));
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const float d = b[i].d * h2f(a[i].d);
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)a[i].scales));
        const __m512i sc = _mm512_castsi256_si512(sc16);
        /* 32 * sum_g sc[g] * bsums[g] */
        const __m256i corr = _mm256_slli_epi32(
            _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)b[i].bsums), sc16), 5);
        __m512i sumi = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_zextsi256_si512(corr));
        for (int h = 0; h < 2; h++) {
            const __m512i l = _mm512_loadu_si512(a[i].ql + 64 * h);
            const __m512i qh =
                _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(a[i].qh + 32 * h)));
            const __m512i hl = _mm512_and_si512(_mm512_sllv_epi64(qh, sh_lo), m30);
            const __m512i hh = _mm512_and_si512(_mm512_srlv_epi64(qh, sh_hi), m30);
            const __m512i qlo = _mm512_ternarylogic_epi64(l, m4, hl, 0xEA);
            const __m512i qhi = _mm512_ternarylogic_epi64(_mm512_srli_epi16(l, 4), m4, hh, 0xEA);
            const __m512i plo = _mm512_maddubs_epi16(qlo, _mm512_loadu_si512(b[i].qs + 128 * h));
            const __m512i phi =
                _mm512_maddubs_epi16(qhi, _mm512_loadu_si512(b[i].qs + 128 * h + 64));
            sumi = _mm512_add_epi32(
                sumi, _mm512_madd_epi16(plo, _mm512_permutexvar_epi16(idx[2 * h], sc)));
            sumi = _mm512_add_epi32(
                sumi, _mm512_madd_epi16(phi, _mm512_permutexvar_epi16(idx[2 * h + 1], sc)));
        }
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_set1_ps(d), acc);
    }
    *s = _mm512_reduce_add_ps(acc);
}

/* y = (d * sc) * (q - 32), as the scalar code */
static void to_float_q6_k(const void *src, float *dst, int64_t n) {
    const block_q6_K *x = src;
    const int64_t nb = n / QK_K;
    const __m128i m4 = _mm_set1_epi8(0x0f);
    const __m128i m3 = _mm_set1_epi8(0x03);
    const __m128i off = _mm_set1_epi8(32);
    for (int64_t i = 0; i < nb; i++) {
        const float d = h2f(x[i].d);
        float *y = dst + i * QK_K;
        for (int half = 0; half < 2; half++) {
            const uint8_t *ql = x[i].ql + 64 * half;
            const uint8_t *qh = x[i].qh + 32 * half;
            const int8_t *sc = x[i].scales + 8 * half;
            /* group t (0..3) of 32: low nibbles of ql[0..31] (t=0), ql[32..63] (t=1), high
             * nibbles (t=2, 3); bits 4-5 from qh >> 2t */
            for (int t = 0; t < 4; t++) {
                for (int h = 0; h < 2; h++) {
                    __m128i l = _mm_loadu_si128((const __m128i *)(ql + 32 * (t & 1) + 16 * h));
                    if (t & 2)
                        l = _mm_srli_epi16(l, 4);
                    l = _mm_and_si128(l, m4);
                    __m128i hb = _mm_loadu_si128((const __m128i *)(qh + 16 * h));
                    hb = _mm_and_si128(_mm_srl_epi16(hb, _mm_cvtsi32_si128(2 * t)), m3);
                    const __m128i q = _mm_sub_epi8(_mm_or_si128(l, _mm_slli_epi16(hb, 4)), off);
                    const __m512 dj = _mm512_set1_ps(d * (float)sc[2 * t + h]);
                    const __m512 qf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
                    _mm512_storeu_ps(y + 128 * half + 32 * t + 16 * h, _mm512_mul_ps(dj, qf));
                }
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * table
 * ------------------------------------------------------------------------------------------- */

static const struct cpu_type_kernels k_f32 = {MOERUN_TYPE_F32, MOERUN_TYPE_F32, to_float_f32,
                                              from_float_f32, vec_dot_f32};
static const struct cpu_type_kernels k_f16 = {MOERUN_TYPE_F16, MOERUN_TYPE_F16, to_float_f16,
                                              from_float_f16, vec_dot_f16};
static const struct cpu_type_kernels k_bf16 = {MOERUN_TYPE_BF16, MOERUN_TYPE_BF16, to_float_bf16,
                                               from_float_bf16, vec_dot_bf16};
static const struct cpu_type_kernels k_q8_0 = {MOERUN_TYPE_Q8_0, MOERUN_TYPE_Q8_0, to_float_q8_0,
                                               from_float_q8_0, vec_dot_q8_0_q8_0};
static const struct cpu_type_kernels k_q4_0 = {MOERUN_TYPE_Q4_0, MOERUN_TYPE_Q8_0, to_float_q4_0,
                                               NULL, vec_dot_q4_0_q8_0};
static const struct cpu_type_kernels k_q4_k = {MOERUN_TYPE_Q4_K, MOERUN_TYPE_Q8_K, to_float_q4_k,
                                               NULL, vec_dot_q4_k_q8_k};
static const struct cpu_type_kernels k_q5_k = {MOERUN_TYPE_Q5_K, MOERUN_TYPE_Q8_K, to_float_q5_k,
                                               NULL, vec_dot_q5_k_q8_k};
static const struct cpu_type_kernels k_q6_k = {MOERUN_TYPE_Q6_K, MOERUN_TYPE_Q8_K, to_float_q6_k,
                                               NULL, vec_dot_q6_k_q8_k};
static const struct cpu_type_kernels k_q8_k = {MOERUN_TYPE_Q8_K, MOERUN_TYPE_Q8_K, to_float_q8_k,
                                               from_float_q8_k, NULL};

const struct cpu_type_kernels *cpu_avx512_kernels(int type) {
    switch (type) {
    case MOERUN_TYPE_F32:
        return &k_f32;
    case MOERUN_TYPE_F16:
        return &k_f16;
    case MOERUN_TYPE_BF16:
        return &k_bf16;
    case MOERUN_TYPE_Q8_0:
        return &k_q8_0;
    case MOERUN_TYPE_Q4_0:
        return &k_q4_0;
    case MOERUN_TYPE_Q4_K:
        return &k_q4_k;
    case MOERUN_TYPE_Q5_K:
        return &k_q5_k;
    case MOERUN_TYPE_Q6_K:
        return &k_q6_k;
    case MOERUN_TYPE_Q8_K:
        return &k_q8_k;
    default:
        return NULL;
    }
}
