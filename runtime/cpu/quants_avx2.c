/* AVX2 + FMA + F16C kernels for the CPU weight types (compiled with -mavx2 -mfma -mf16c).
 *
 * Same functions as the scalar table (quants_ref.c): to_float and from_float bit-exact (same
 * operations in the same order, round to nearest even), vec_dot within float rounding.
 * The vec_dot kernels are the decode (matrix-vector) inner loops, so they are built to be memory
 * bound: whole blocks are loaded at once, integer products per block (VPMADDUBSW/VPMADDWD),
 * one float FMA per block into an accumulator kept in a register, and a single horizontal sum
 * per row. Layouts are described in quants.h and quants_ref.c.
 */
#include "quants.h"
#include "moerun.h"

#include <immintrin.h>
#include <stddef.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------------
 * Helpers
 * ------------------------------------------------------------------------------------------- */

static inline float fp16_to_f32(mr_fp16 h) {
    return _cvtsh_ss(h);
}

static inline mr_fp16 f32_to_fp16(float f) {
    return (mr_fp16)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
}

static inline float hsum_f32x8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hsum_f32x4(__m128 s) {
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax_f32x8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256i loadu256(const void *p) {
    return _mm256_loadu_si256((const __m256i *)p);
}

/* Sum over pairs of signed bytes a*b into 8 int32 lanes, as float. b must not hold -128
 * (activations never do: quantizers clamp to -127..127). */
static inline __m256 dot_i8x32(__m256i a, __m256i b) {
    const __m256i ua = _mm256_sign_epi8(a, a); /* |a|, -128 reads as 128 unsigned */
    const __m256i sb = _mm256_sign_epi8(b, a);
    const __m256i p16 = _mm256_maddubs_epi16(ua, sb);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

/* Round 8 floats to nearest even and convert to int32 (independent of MXCSR). */
static inline __m256i round_i32x8(__m256 v) {
    return _mm256_cvttps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* Pack 4 x 8 int32 (elements 0..31 in order) into 32 int8 in order (saturating). */
static inline __m256i pack_i32x32(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i ab = _mm256_packs_epi32(a, b); /* 0-3 8-11 | 4-7 12-15 */
    const __m256i cd = _mm256_packs_epi32(c, d); /* 16-19 24-27 | 20-23 28-31 */
    const __m256i all = _mm256_packs_epi16(ab, cd);
    /* dwords now hold 0-3 8-11 16-19 24-27 | 4-7 12-15 20-23 28-31 */
    return _mm256_permutevar8x32_epi32(all, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* y[0..31] = (float)q * d - m for 32 signed bytes q: the scalar's d1 * q - m1, two roundings. */
static inline void store_i8x32_muls(float *y, __m256i q, __m256 d, __m256 m) {
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    const __m128i parts[4] = {lo, _mm_unpackhi_epi64(lo, lo), hi, _mm_unpackhi_epi64(hi, hi)};
    for (int k = 0; k < 4; k++) {
        const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[k]));
        _mm256_storeu_ps(y + 8 * k, _mm256_sub_ps(_mm256_mul_ps(f, d), m));
    }
}

/* y[0..31] = (float)q * d for 32 signed bytes q. */
static inline void store_i8x32_mul(float *y, __m256i q, __m256 d) {
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    const __m128i parts[4] = {lo, _mm_unpackhi_epi64(lo, lo), hi, _mm_unpackhi_epi64(hi, hi)};
    for (int k = 0; k < 4; k++) {
        const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[k]));
        _mm256_storeu_ps(y + 8 * k, _mm256_mul_ps(f, d));
    }
}

/* y[0..15] = (float)q * d for the 16 signed bytes at q. */
static inline void store_i8x16_mul(float *y, __m128i q, __m256 d) {
    const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(q, q)));
    _mm256_storeu_ps(y, _mm256_mul_ps(f0, d));
    _mm256_storeu_ps(y + 8, _mm256_mul_ps(f1, d));
}

/* K-quant (Q4_K, Q5_K) packed 6-bit scales and mins: out bytes 0..7 = scales of sub-blocks
 * 0..7, bytes 8..15 = their mins (see kq_scale_min in quants_ref.c). */
static inline __m128i kq_unpack_scales(const uint8_t *packed) {
    const uint32_t m6 = 0x3f3f3f3fu, m4 = 0x0f0f0f0fu, m2 = 0x03030303u;
    uint32_t u[3];
    memcpy(u, packed, sizeof(u));
    const uint32_t sc_lo = u[0] & m6;
    const uint32_t mn_lo = u[1] & m6;
    const uint32_t sc_hi = (u[2] & m4) | (((u[0] >> 6) & m2) << 4);
    const uint32_t mn_hi = ((u[2] >> 4) & m4) | (((u[1] >> 6) & m2) << 4);
    return _mm_setr_epi32((int)sc_lo, (int)sc_hi, (int)mn_lo, (int)mn_hi);
}

/* vpshufb masks that broadcast int16 lane k (0..7) of each 128-bit half to the whole half. */
static const uint8_t bcast16_masks[8][32] = {
#define BCAST16(k)                                                                                 \
    {                                                                                              \
        2 * k, 2 * k + 1, 2 * k, 2 * k + 1, 2 * k, 2 * k + 1, 2 * k, 2 * k + 1, 2 * k, 2 * k + 1,  \
            2 * k, 2 * k + 1, 2 * k, 2 * k + 1, 2 * k, 2 * k + 1, 2 * k, 2 * k + 1, 2 * k,         \
            2 * k + 1, 2 * k, 2 * k + 1, 2 * k, 2 * k + 1, 2 * k, 2 * k + 1, 2 * k, 2 * k + 1,     \
            2 * k, 2 * k + 1, 2 * k, 2 * k + 1                                                     \
    }
    BCAST16(0), BCAST16(1), BCAST16(2), BCAST16(3), BCAST16(4), BCAST16(5), BCAST16(6), BCAST16(7),
#undef BCAST16
};

static inline __m256i bcast16(__m256i v, int k) {
    return _mm256_shuffle_epi8(v, loadu256(bcast16_masks[k]));
}

/* ---------------------------------------------------------------------------------------------
 * F32, F16, BF16
 * ------------------------------------------------------------------------------------------- */

static inline __m256 load_f16x8(const mr_fp16 *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

static void f16_to_float(const void *src, float *dst, int64_t n) {
    const mr_fp16 *h = src;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, load_f16x8(h + i));
    for (; i < n; i++)
        dst[i] = fp16_to_f32(h[i]);
}

static void f16_from_float(const float *src, void *dst, int64_t n) {
    mr_fp16 *h = dst;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128i v = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(h + i), v);
    }
    for (; i < n; i++)
        h[i] = f32_to_fp16(src[i]);
}

static inline __m256 load_f32x8(const float *p) {
    return _mm256_loadu_ps(p);
}

static inline float f32_to_f32(float x) {
    return x;
}

/* Dot products of two float rows of element type T, 8 at a time through LOAD, four
 * accumulators over 32 elements per step, the tail through TO_F32. */
#define VEC_DOT_FLOAT(name, T, LOAD, TO_F32)                                                       \
    static void name(int64_t n, float *s, const void *vw, const void *vx) {                        \
        const T *w = vw, *x = vx;                                                                  \
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();                                 \
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();                                 \
        int64_t i = 0;                                                                             \
        for (; i + 32 <= n; i += 32) {                                                             \
            a0 = _mm256_fmadd_ps(LOAD(w + i), LOAD(x + i), a0);                                    \
            a1 = _mm256_fmadd_ps(LOAD(w + i + 8), LOAD(x + i + 8), a1);                            \
            a2 = _mm256_fmadd_ps(LOAD(w + i + 16), LOAD(x + i + 16), a2);                          \
            a3 = _mm256_fmadd_ps(LOAD(w + i + 24), LOAD(x + i + 24), a3);                          \
        }                                                                                          \
        for (; i + 8 <= n; i += 8)                                                                 \
            a0 = _mm256_fmadd_ps(LOAD(w + i), LOAD(x + i), a0);                                    \
        float sum = hsum_f32x8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));       \
        for (; i < n; i++)                                                                         \
            sum += TO_F32(w[i]) * TO_F32(x[i]);                                                    \
        *s = sum;                                                                                  \
    }

VEC_DOT_FLOAT(f32_vec_dot, float, load_f32x8, f32_to_f32)
VEC_DOT_FLOAT(f16_vec_dot, mr_fp16, load_f16x8, fp16_to_f32)

static inline __m256 load_bf16x8(const mr_bf16 *p) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}

static inline float bf16_to_f32(mr_bf16 h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

static void bf16_to_float(const void *src, float *dst, int64_t n) {
    const mr_bf16 *h = src;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, load_bf16x8(h + i));
    for (; i < n; i++)
        dst[i] = bf16_to_f32(h[i]);
}

/* 8 floats to bf16 (in the low 16 bits of each int32): NaN -> (u >> 16) | 64, otherwise
 * (u + 0x7fff + ((u >> 16) & 1)) >> 16, as mr_fp32_to_bf16. */
static inline __m256i f32_to_bf16x8(__m256 f) {
    const __m256i u = _mm256_castps_si256(f);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(64));
    const __m256i isnan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(rounded, nan, isnan);
}

static void bf16_from_float(const float *src, void *dst, int64_t n) {
    mr_bf16 *h = dst;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256i a = f32_to_bf16x8(_mm256_loadu_ps(src + i));
        const __m256i b = f32_to_bf16x8(_mm256_loadu_ps(src + i + 8));
        /* values fit 16 bits unsigned: packus keeps them; fix the lane interleave */
        const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
        _mm256_storeu_si256((__m256i *)(h + i), p);
    }
    for (; i < n; i++) {
        uint32_t u;
        memcpy(&u, &src[i], sizeof(u));
        if ((u & 0x7fffffffu) > 0x7f800000u)
            h[i] = (mr_bf16)((u >> 16) | 64);
        else
            h[i] = (mr_bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
}

/* 16 bf16 as two float vectors: the even elements (0, 2, ..) and the odd ones (1, 3, ..); a
 * dot product does not care about the order, and this saves the widening loads. */
static inline void load_bf16x16(const mr_bf16 *p, __m256 *even, __m256 *odd) {
    const __m256i v = loadu256(p);
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}

static void bf16_vec_dot(int64_t n, float *s, const void *vw, const void *vx) {
    const mr_bf16 *w = vw, *x = vx;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256 we, wo, xe, xo;
        load_bf16x16(w + i, &we, &wo);
        load_bf16x16(x + i, &xe, &xo);
        a0 = _mm256_fmadd_ps(we, xe, a0);
        a1 = _mm256_fmadd_ps(wo, xo, a1);
        load_bf16x16(w + i + 16, &we, &wo);
        load_bf16x16(x + i + 16, &xe, &xo);
        a2 = _mm256_fmadd_ps(we, xe, a2);
        a3 = _mm256_fmadd_ps(wo, xo, a3);
    }
    for (; i + 8 <= n; i += 8)
        a0 = _mm256_fmadd_ps(load_bf16x8(w + i), load_bf16x8(x + i), a0);
    float sum = hsum_f32x8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++)
        sum += bf16_to_f32(w[i]) * bf16_to_f32(x[i]);
    *s = sum;
}

/* ---------------------------------------------------------------------------------------------
 * Q8_0 (weights and activations), Q4_0
 * ------------------------------------------------------------------------------------------- */

static void q8_0_to_float(const void *src, float *dst, int64_t n) {
    const block_q8_0 *b = src;
    for (int64_t i = 0; i < n / QK8_0; i++)
        store_i8x32_mul(dst + i * QK8_0, loadu256(b[i].qs), _mm256_set1_ps(fp16_to_f32(b[i].d)));
}

/* amax = max |x|, d = amax / 127 (fp16), id = 127 / amax, q = round-half-even(x * id). */
static void q8_0_from_float(const float *src, void *dst, int64_t n) {
    block_q8_0 *b = dst;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < n / QK8_0; i++) {
        const float *x = src + i * QK8_0;
        __m256 v[4];
        __m256 amax = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_loadu_ps(x + 8 * k);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[k]));
        }
        const float am = hmax_f32x8(amax);
        const float d = am / 127.f;
        const __m256 id = _mm256_set1_ps(am != 0.0f ? 127.f / am : 0.0f);
        b[i].d = f32_to_fp16(d);
        __m256i q[4];
        for (int k = 0; k < 4; k++)
            q[k] = round_i32x8(_mm256_mul_ps(v[k], id));
        _mm256_storeu_si256((__m256i *)b[i].qs, pack_i32x32(q[0], q[1], q[2], q[3]));
    }
}

/* Products of the fp16 scales of 4 consecutive weight and activation blocks, converted with
 * one VCVTPH2PS each instead of one per scale; lane k broadcast with VPERMPS. */
#define SCALES4(w, x, i)                                                                           \
    _mm_mul_ps(fp16x4_to_f32((w)[i].d, (w)[(i) + 1].d, (w)[(i) + 2].d, (w)[(i) + 3].d),            \
               fp16x4_to_f32((x)[i].d, (x)[(i) + 1].d, (x)[(i) + 2].d, (x)[(i) + 3].d))

static inline __m128 fp16x4_to_f32(mr_fp16 a, mr_fp16 b, mr_fp16 c, mr_fp16 d) {
    const uint64_t u = (uint64_t)a | (uint64_t)b << 16 | (uint64_t)c << 32 | (uint64_t)d << 48;
    return _mm_cvtph_ps(_mm_cvtsi64_si128((long long)u));
}

static inline __m256 lane_bcast(__m128 v, __m256i idx) {
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), idx);
}

static void q8_0_vec_dot(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q8_0 *w = vw, *x = vx;
    const int64_t nb = n / QK8_0;
    const __m256i i0 = _mm256_set1_epi32(0), i1 = _mm256_set1_epi32(1);
    const __m256i i2 = _mm256_set1_epi32(2), i3 = _mm256_set1_epi32(3);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 4 <= nb; i += 4) {
        const __m128 d = SCALES4(w, x, i);
        acc0 = _mm256_fmadd_ps(lane_bcast(d, i0), dot_i8x32(loadu256(w[i].qs), loadu256(x[i].qs)),
                               acc0);
        acc1 = _mm256_fmadd_ps(lane_bcast(d, i1),
                               dot_i8x32(loadu256(w[i + 1].qs), loadu256(x[i + 1].qs)), acc1);
        acc0 = _mm256_fmadd_ps(lane_bcast(d, i2),
                               dot_i8x32(loadu256(w[i + 2].qs), loadu256(x[i + 2].qs)), acc0);
        acc1 = _mm256_fmadd_ps(lane_bcast(d, i3),
                               dot_i8x32(loadu256(w[i + 3].qs), loadu256(x[i + 3].qs)), acc1);
    }
    for (; i < nb; i++) {
        const __m256 d0 = _mm256_set1_ps(fp16_to_f32(w[i].d) * fp16_to_f32(x[i].d));
        acc0 = _mm256_fmadd_ps(d0, dot_i8x32(loadu256(w[i].qs), loadu256(x[i].qs)), acc0);
    }
    *s = hsum_f32x8(_mm256_add_ps(acc0, acc1));
}

/* The 32 nibbles of a Q4_0 block in element order: low nibbles (0..15), then high (16..31). */
static inline __m256i q4_0_nibbles(const uint8_t *qs) {
    const __m128i q = _mm_loadu_si128((const __m128i *)qs);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

static void q4_0_to_float(const void *src, float *dst, int64_t n) {
    const block_q4_0 *b = src;
    for (int64_t i = 0; i < n / QK4_0; i++) {
        const __m256i q = _mm256_sub_epi8(q4_0_nibbles(b[i].qs), _mm256_set1_epi8(8));
        store_i8x32_mul(dst + i * QK4_0, q, _mm256_set1_ps(fp16_to_f32(b[i].d)));
    }
}

/* sum (q - 8) * y over the block = maddubs(q, y) - maddubs(8, y): no sign tricks needed. */
static inline __m256 q4_0_block_dot(const block_q4_0 *w, const block_q8_0 *x) {
    const __m256i y = loadu256(x->qs);
    const __m256i p = _mm256_sub_epi16(_mm256_maddubs_epi16(q4_0_nibbles(w->qs), y),
                                       _mm256_maddubs_epi16(_mm256_set1_epi8(8), y));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

static void q4_0_vec_dot(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q4_0 *w = vw;
    const block_q8_0 *x = vx;
    const int64_t nb = n / QK4_0;
    const __m256i i0 = _mm256_set1_epi32(0), i1 = _mm256_set1_epi32(1);
    const __m256i i2 = _mm256_set1_epi32(2), i3 = _mm256_set1_epi32(3);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 4 <= nb; i += 4) {
        const __m128 d = SCALES4(w, x, i);
        acc0 = _mm256_fmadd_ps(lane_bcast(d, i0), q4_0_block_dot(&w[i], &x[i]), acc0);
        acc1 = _mm256_fmadd_ps(lane_bcast(d, i1), q4_0_block_dot(&w[i + 1], &x[i + 1]), acc1);
        acc0 = _mm256_fmadd_ps(lane_bcast(d, i2), q4_0_block_dot(&w[i + 2], &x[i + 2]), acc0);
        acc1 = _mm256_fmadd_ps(lane_bcast(d, i3), q4_0_block_dot(&w[i + 3], &x[i + 3]), acc1);
    }
    for (; i < nb; i++) {
        const __m256 d0 = _mm256_set1_ps(fp16_to_f32(w[i].d) * fp16_to_f32(x[i].d));
        acc0 = _mm256_fmadd_ps(d0, q4_0_block_dot(&w[i], &x[i]), acc0);
    }
    *s = hsum_f32x8(_mm256_add_ps(acc0, acc1));
}

#undef SCALES4

/* ---------------------------------------------------------------------------------------------
 * Q8_K (activations of the K-quants)
 * ------------------------------------------------------------------------------------------- */

/* max = the element of largest |x| (first on ties); iscale = -127 / max;
 * q = min(127, round-half-even(iscale * x)); d = 1 / iscale; bsums = sums of 16. */
static void q8_K_from_float(const float *src, void *dst, int64_t n) {
    block_q8_K *b = dst;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i i127 = _mm256_set1_epi32(127);
    const __m256i ones8 = _mm256_set1_epi8(1);
    const __m256i ones16 = _mm256_set1_epi16(1);
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float *x = src + i * QK_K;
        __m256 vmax = _mm256_setzero_ps();
        for (int k = 0; k < QK_K / 8; k++)
            vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + 8 * k)));
        const float amax = hmax_f32x8(vmax);
        if (amax == 0.0f) {
            memset(&b[i], 0, sizeof(b[i]));
            continue;
        }
        float max = 0.0f;
        const __m256 va = _mm256_set1_ps(amax);
        for (int k = 0; k < QK_K / 8; k++) {
            const __m256 ax = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + 8 * k));
            const int mask = _mm256_movemask_ps(_mm256_cmp_ps(ax, va, _CMP_EQ_OQ));
            if (mask) {
                max = x[8 * k + __builtin_ctz((unsigned)mask)];
                break;
            }
        }
        const float iscale = -127.f / max;
        const __m256 vs = _mm256_set1_ps(iscale);
        __m256i sums[QK_K / 32]; /* per 32 quants: 4 int32 partial sums of each group of 16 */
        for (int j = 0; j < QK_K / 32; j++) {
            __m256i q[4];
            for (int k = 0; k < 4; k++) {
                const __m256 v = _mm256_mul_ps(vs, _mm256_loadu_ps(x + 32 * j + 8 * k));
                q[k] = _mm256_min_epi32(round_i32x8(v), i127);
            }
            const __m256i q8 = pack_i32x32(q[0], q[1], q[2], q[3]);
            _mm256_storeu_si256((__m256i *)(b[i].qs + 32 * j), q8);
            sums[j] = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, q8), ones16);
        }
        /* sums[j]: low half = 4 partials of group 2j, high half = of group 2j + 1 */
        const __m256i h01 = _mm256_hadd_epi32(sums[0], sums[1]);
        const __m256i h23 = _mm256_hadd_epi32(sums[2], sums[3]);
        const __m256i h45 = _mm256_hadd_epi32(sums[4], sums[5]);
        const __m256i h67 = _mm256_hadd_epi32(sums[6], sums[7]);
        const __m256i ga = _mm256_hadd_epi32(h01, h23); /* g0 g2 g4 g6 | g1 g3 g5 g7 */
        const __m256i gb = _mm256_hadd_epi32(h45, h67); /* g8 .. g14   | g9 .. g15 */
        const __m256i p = _mm256_packs_epi32(ga, gb);   /* even groups | odd groups */
        const __m128i even = _mm256_castsi256_si128(p), odd = _mm256_extracti128_si256(p, 1);
        _mm_storeu_si128((__m128i *)b[i].bsums, _mm_unpacklo_epi16(even, odd));
        _mm_storeu_si128((__m128i *)(b[i].bsums + 8), _mm_unpackhi_epi16(even, odd));
        b[i].d = 1 / iscale;
    }
}

/* ---------------------------------------------------------------------------------------------
 * Q4_K, Q5_K
 * ------------------------------------------------------------------------------------------- */

static void q4_K_to_float(const void *src, float *dst, int64_t n) {
    const block_q4_K *b = src;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fp16_to_f32(b[i].d), dmin = fp16_to_f32(b[i].dmin);
        uint8_t sm[16];
        _mm_storeu_si128((__m128i *)sm, kq_unpack_scales(b[i].scales));
        float *y = dst + i * QK_K;
        for (int c = 0; c < 4; c++) {
            const __m256i q = loadu256(b[i].qs + 32 * c);
            const __m256 d1 = _mm256_set1_ps(d * (float)sm[2 * c]);
            const __m256 m1 = _mm256_set1_ps(dmin * (float)sm[8 + 2 * c]);
            const __m256 d2 = _mm256_set1_ps(d * (float)sm[2 * c + 1]);
            const __m256 m2 = _mm256_set1_ps(dmin * (float)sm[8 + 2 * c + 1]);
            store_i8x32_muls(y + 64 * c, _mm256_and_si256(q, m4), d1, m1);
            store_i8x32_muls(y + 64 * c + 32, _mm256_and_si256(_mm256_srli_epi16(q, 4), m4), d2,
                             m2);
        }
    }
}

/* The high bits of Q5_K chunk c (0..3) as 0x10 in each byte: bit 2c (low nibbles) or 2c + 1
 * (high nibbles) of qh[l]. 16-bit shifts are safe: the masked bit never crosses a byte. */
static inline __m256i q5_K_hbit(__m256i qh, int bit) {
    const __m256i m = _mm256_set1_epi8(0x10);
    switch (bit) {
    case 0:
        return _mm256_and_si256(_mm256_slli_epi16(qh, 4), m);
    case 1:
        return _mm256_and_si256(_mm256_slli_epi16(qh, 3), m);
    case 2:
        return _mm256_and_si256(_mm256_slli_epi16(qh, 2), m);
    case 3:
        return _mm256_and_si256(_mm256_slli_epi16(qh, 1), m);
    case 4:
        return _mm256_and_si256(qh, m);
    case 5:
        return _mm256_and_si256(_mm256_srli_epi16(qh, 1), m);
    case 6:
        return _mm256_and_si256(_mm256_srli_epi16(qh, 2), m);
    default:
        return _mm256_and_si256(_mm256_srli_epi16(qh, 3), m);
    }
}

static void q5_K_to_float(const void *src, float *dst, int64_t n) {
    const block_q5_K *b = src;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fp16_to_f32(b[i].d), dmin = fp16_to_f32(b[i].dmin);
        uint8_t sm[16];
        _mm_storeu_si128((__m128i *)sm, kq_unpack_scales(b[i].scales));
        const __m256i qh = loadu256(b[i].qh);
        float *y = dst + i * QK_K;
        for (int c = 0; c < 4; c++) {
            const __m256i q = loadu256(b[i].qs + 32 * c);
            const __m256i lo = _mm256_or_si256(_mm256_and_si256(q, m4), q5_K_hbit(qh, 2 * c));
            const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4),
                                               q5_K_hbit(qh, 2 * c + 1));
            const __m256 d1 = _mm256_set1_ps(d * (float)sm[2 * c]);
            const __m256 m1 = _mm256_set1_ps(dmin * (float)sm[8 + 2 * c]);
            const __m256 d2 = _mm256_set1_ps(d * (float)sm[2 * c + 1]);
            const __m256 m2 = _mm256_set1_ps(dmin * (float)sm[8 + 2 * c + 1]);
            store_i8x32_muls(y + 64 * c, lo, d1, m1);
            store_i8x32_muls(y + 64 * c + 32, hi, d2, m2);
        }
    }
}

/* The mins term of a Q4_K/Q5_K block against Q8_K: 4 int32 lanes summing to
 * sum_j m_j * (bsums[2j] + bsums[2j + 1]); and the scales as int16 in both halves. */
static inline __m128i kq_mins_dot(__m128i scales_mins, const int16_t *bsums, __m256i *scales) {
    const __m256i sm16 = _mm256_cvtepu8_epi16(scales_mins); /* scales | mins, int16 */
    *scales = _mm256_permute2x128_si256(sm16, sm16, 0x00);
    const __m128i b0 = _mm_loadu_si128((const __m128i *)bsums);
    const __m128i b1 = _mm_loadu_si128((const __m128i *)(bsums + 8));
    const __m128i pairs = _mm_hadd_epi16(b0, b1); /* sums of 32 activations per sub-block */
    return _mm_madd_epi16(_mm256_extracti128_si256(sm16, 1), pairs);
}

static void q4_K_vec_dot(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q4_K *w = vw;
    const block_q8_K *x = vx;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    __m128 accm = _mm_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fp16_to_f32(w[i].d) * x[i].d;
        const float dmin = fp16_to_f32(w[i].dmin) * x[i].d;
        __m256i sc;
        const __m128i mins = kq_mins_dot(kq_unpack_scales(w[i].scales), x[i].bsums, &sc);
        accm = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(mins), accm);
        const uint8_t *q4 = w[i].qs;
        const int8_t *q8 = x[i].qs;
        __m256i sumi = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i q = loadu256(q4 + 32 * c);
            const __m256i lo = _mm256_and_si256(q, m4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            const __m256i plo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, loadu256(q8 + 64 * c)),
                                                  bcast16(sc, 2 * c));
            const __m256i phi = _mm256_madd_epi16(
                _mm256_maddubs_epi16(hi, loadu256(q8 + 64 * c + 32)), bcast16(sc, 2 * c + 1));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(plo, phi));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    *s = hsum_f32x8(acc) - hsum_f32x4(accm);
}

static void q5_K_vec_dot(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q5_K *w = vw;
    const block_q8_K *x = vx;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    __m128 accm = _mm_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fp16_to_f32(w[i].d) * x[i].d;
        const float dmin = fp16_to_f32(w[i].dmin) * x[i].d;
        __m256i sc;
        const __m128i mins = kq_mins_dot(kq_unpack_scales(w[i].scales), x[i].bsums, &sc);
        accm = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(mins), accm);
        const __m256i qh = loadu256(w[i].qh);
        const uint8_t *q5 = w[i].qs;
        const int8_t *q8 = x[i].qs;
        __m256i sumi = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i q = loadu256(q5 + 32 * c);
            const __m256i lo = _mm256_or_si256(_mm256_and_si256(q, m4), q5_K_hbit(qh, 2 * c));
            const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4),
                                               q5_K_hbit(qh, 2 * c + 1));
            const __m256i plo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, loadu256(q8 + 64 * c)),
                                                  bcast16(sc, 2 * c));
            const __m256i phi = _mm256_madd_epi16(
                _mm256_maddubs_epi16(hi, loadu256(q8 + 64 * c + 32)), bcast16(sc, 2 * c + 1));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(plo, phi));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    *s = hsum_f32x8(acc) - hsum_f32x4(accm);
}

/* ---------------------------------------------------------------------------------------------
 * Q6_K
 * ------------------------------------------------------------------------------------------- */

/* The four 32-element parts of half h of a Q6_K block as unsigned 6-bit quants (0..63). */
static inline void q6_K_half(const block_q6_K *b, int h, __m256i q[4]) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x30);
    const __m256i la = loadu256(b->ql + 64 * h), lb = loadu256(b->ql + 64 * h + 32);
    const __m256i qh = loadu256(b->qh + 32 * h);
    q[0] =
        _mm256_or_si256(_mm256_and_si256(la, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m2));
    q[1] =
        _mm256_or_si256(_mm256_and_si256(lb, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m2));
    q[2] =
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(la, 4), m4), _mm256_and_si256(qh, m2));
    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lb, 4), m4),
                           _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2));
}

static void q6_K_to_float(const void *src, float *dst, int64_t n) {
    const block_q6_K *b = src;
    const __m256i m32 = _mm256_set1_epi8(32);
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fp16_to_f32(b[i].d);
        float *y = dst + i * QK_K;
        for (int h = 0; h < 2; h++) {
            __m256i q[4];
            q6_K_half(&b[i], h, q);
            for (int k = 0; k < 4; k++) {
                const int g = 8 * h + 2 * k; /* groups g and g + 1 */
                const __m256i v = _mm256_sub_epi8(q[k], m32);
                float *yk = y + 128 * h + 32 * k;
                store_i8x16_mul(yk, _mm256_castsi256_si128(v),
                                _mm256_set1_ps(d * (float)b[i].scales[g]));
                store_i8x16_mul(yk + 16, _mm256_extracti128_si256(v, 1),
                                _mm256_set1_ps(d * (float)b[i].scales[g + 1]));
            }
        }
    }
}

/* vpshufb masks for Q6_K part k (0..3): int16 lane 2k to the low half, 2k + 1 to the high. */
static const uint8_t q6_scale_masks[4][32] = {
#define Q6MASK(k)                                                                                  \
    {                                                                                              \
        4 * k, 4 * k + 1, 4 * k, 4 * k + 1, 4 * k, 4 * k + 1, 4 * k, 4 * k + 1, 4 * k, 4 * k + 1,  \
            4 * k, 4 * k + 1, 4 * k, 4 * k + 1, 4 * k, 4 * k + 1, 4 * k + 2, 4 * k + 3, 4 * k + 2, \
            4 * k + 3, 4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3,           \
            4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3                       \
    }
    Q6MASK(0),
    Q6MASK(1),
    Q6MASK(2),
    Q6MASK(3),
#undef Q6MASK
};

/* sum_g sc_g * sum (q - 32) * y = sum_g sc_g * sum q * y - 32 * sum_g sc_g * bsums_g. */
static void q6_K_vec_dot(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q6_K *w = vw;
    const block_q8_K *x = vx;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fp16_to_f32(w[i].d) * x[i].d;
        const __m256i sc16 =
            _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w[i].scales)); /* 16 int16 */
        const __m256i corr = _mm256_madd_epi16(sc16, loadu256(x[i].bsums));
        __m256i sumi = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            /* groups 8h..8h+7 in both halves; part k uses 8h+2k (low half), 8h+2k+1 (high) */
            const __m256i sch = h ? _mm256_permute2x128_si256(sc16, sc16, 0x11)
                                  : _mm256_permute2x128_si256(sc16, sc16, 0x00);
            __m256i q[4];
            q6_K_half(&w[i], h, q);
            const int8_t *q8 = x[i].qs + 128 * h;
            for (int k = 0; k < 4; k++) {
                const __m256i sck = _mm256_shuffle_epi8(sch, loadu256(q6_scale_masks[k]));
                const __m256i p = _mm256_maddubs_epi16(q[k], loadu256(q8 + 32 * k));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, sck));
            }
        }
        sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32(corr, 5));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    *s = hsum_f32x8(acc);
}

/* ---------------------------------------------------------------------------------------------
 * The AVX2 table
 * ------------------------------------------------------------------------------------------- */

static const struct cpu_type_kernels avx2_table[] = {
    {MOERUN_TYPE_F32, MOERUN_TYPE_F32, NULL, NULL, f32_vec_dot},
    {MOERUN_TYPE_F16, MOERUN_TYPE_F16, f16_to_float, f16_from_float, f16_vec_dot},
    {MOERUN_TYPE_BF16, MOERUN_TYPE_BF16, bf16_to_float, bf16_from_float, bf16_vec_dot},
    {MOERUN_TYPE_Q4_0, MOERUN_TYPE_Q8_0, q4_0_to_float, NULL, q4_0_vec_dot},
    {MOERUN_TYPE_Q8_0, MOERUN_TYPE_Q8_0, q8_0_to_float, q8_0_from_float, q8_0_vec_dot},
    {MOERUN_TYPE_Q4_K, MOERUN_TYPE_Q8_K, q4_K_to_float, NULL, q4_K_vec_dot},
    {MOERUN_TYPE_Q5_K, MOERUN_TYPE_Q8_K, q5_K_to_float, NULL, q5_K_vec_dot},
    {MOERUN_TYPE_Q6_K, MOERUN_TYPE_Q8_K, q6_K_to_float, NULL, q6_K_vec_dot},
    {MOERUN_TYPE_Q8_K, MOERUN_TYPE_Q8_K, NULL, q8_K_from_float, NULL},
};

const struct cpu_type_kernels *cpu_avx2_kernels(int type) {
    for (size_t i = 0; i < sizeof(avx2_table) / sizeof(avx2_table[0]); i++) {
        if (avx2_table[i].type == type)
            return &avx2_table[i];
    }
    return NULL;
}
