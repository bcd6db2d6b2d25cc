/* Scalar reference kernels for every CPU weight type: dequantize, quantize, dot product.
 *
 * Layouts and formulas are GGML's (ggml-quants.c), so blocks read from llama.cpp's files
 * dequantize to the same floats, activations quantize to the same bytes as llama.cpp's x86 CPU
 * backend, and weights quantize as ggml's reference quantizers (quantize_row_*_ref) do.
 * The SIMD files (quants_avx2.c, quants_avx512.c) are tested against these functions.
 */
#include "quants.h"
#include "types.h"
#include "moerun.h"

#include <math.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------------
 * Helpers
 * ------------------------------------------------------------------------------------------- */

/* Round to nearest, ties to even (the FPU's default mode), as ggml's nearest_int: valid for
 * |f| < 2^22; other inputs give some value without undefined behaviour (callers clamp). */
static inline int nearest_int(float f) {
    float v = f + 12582912.f; /* 1.5 * 2^23: the integer lands in the low mantissa bits */
    int32_t i;
    memcpy(&i, &v, sizeof(i));
    return (i & 0x007fffff) - 0x00400000;
}

static inline int imin(int a, int b) {
    return a < b ? a : b;
}

static inline int imax(int a, int b) {
    return a > b ? a : b;
}

/* The 6-bit scale and min of sub-block j (0..7) from a K-quant's 12 packed bytes:
 * bytes 0..3 hold scales 0..3 (low 6 bits), bytes 4..7 mins 0..3 (low 6 bits); bytes 8..11
 * hold the low 4 bits of scale j (low nibble) and min j (high nibble) for j = 4..7, whose top
 * 2 bits sit in the top 2 bits of bytes j-4 (scale) and j (min). */
static inline void kq_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

static void kq_pack_scale_min(uint8_t *q, const uint8_t ls[8], const uint8_t lm[8]) {
    memset(q, 0, K_SCALE_SIZE);
    for (int j = 0; j < 8; j++) {
        if (j < 4) {
            q[j] = ls[j];
            q[j + 4] = lm[j];
        } else {
            q[j + 4] = (uint8_t)((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
            q[j - 4] |= (uint8_t)((ls[j] >> 4) << 6);
            q[j] |= (uint8_t)((lm[j] >> 4) << 6);
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * F32, F16, BF16
 * ------------------------------------------------------------------------------------------- */

static void f32_to_float(const void *src, float *dst, int64_t n) {
    memcpy(dst, src, (size_t)n * sizeof(float));
}

static void f32_from_float(const float *src, void *dst, int64_t n) {
    memcpy(dst, src, (size_t)n * sizeof(float));
}

static void f32_vec_dot(int64_t n, float *s, const void *w, const void *x) {
    const float *a = w, *b = x;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++)
        sum += (double)(a[i] * b[i]);
    *s = (float)sum;
}

static void f16_to_float(const void *src, float *dst, int64_t n) {
    const mr_fp16 *h = src;
    for (int64_t i = 0; i < n; i++)
        dst[i] = mr_fp16_to_fp32(h[i]);
}

static void f16_from_float(const float *src, void *dst, int64_t n) {
    mr_fp16 *h = dst;
    for (int64_t i = 0; i < n; i++)
        h[i] = mr_fp32_to_fp16(src[i]);
}

static void f16_vec_dot(int64_t n, float *s, const void *w, const void *x) {
    const mr_fp16 *a = w, *b = x;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++)
        sum += (double)(mr_fp16_to_fp32(a[i]) * mr_fp16_to_fp32(b[i]));
    *s = (float)sum;
}

static void bf16_to_float(const void *src, float *dst, int64_t n) {
    const mr_bf16 *h = src;
    for (int64_t i = 0; i < n; i++)
        dst[i] = mr_bf16_to_fp32(h[i]);
}

static void bf16_from_float(const float *src, void *dst, int64_t n) {
    mr_bf16 *h = dst;
    for (int64_t i = 0; i < n; i++)
        h[i] = mr_fp32_to_bf16(src[i]);
}

static void bf16_vec_dot(int64_t n, float *s, const void *w, const void *x) {
    const mr_bf16 *a = w, *b = x;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++)
        sum += (double)(mr_bf16_to_fp32(a[i]) * mr_bf16_to_fp32(b[i]));
    *s = (float)sum;
}

/* ---------------------------------------------------------------------------------------------
 * Q4_0: 32 weights, d = fp16, value = d * (nibble - 8); nibble j low = element j, high = j+16
 * ------------------------------------------------------------------------------------------- */

static void q4_0_to_float(const void *src, float *dst, int64_t n) {
    const block_q4_0 *b = src;
    for (int64_t i = 0; i < n / QK4_0; i++) {
        const float d = mr_fp16_to_fp32(b[i].d);
        for (int j = 0; j < QK4_0 / 2; j++) {
            dst[i * QK4_0 + j] = (float)((b[i].qs[j] & 0xF) - 8) * d;
            dst[i * QK4_0 + j + QK4_0 / 2] = (float)((b[i].qs[j] >> 4) - 8) * d;
        }
    }
}

/* ggml's quantize_row_q4_0_ref: the element of largest magnitude maps to -8. */
static void q4_0_from_float(const float *src, void *dst, int64_t n) {
    block_q4_0 *b = dst;
    for (int64_t i = 0; i < n / QK4_0; i++) {
        const float *x = src + i * QK4_0;
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK4_0; j++) {
            if (amax < fabsf(x[j])) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        }
        const float d = max / -8;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = mr_fp32_to_fp16(d);
        for (int j = 0; j < QK4_0 / 2; j++) {
            /* x*id lies in [-8, 8]; + 8.5 truncated is round-half-up, capped at 15 */
            const int q0 = imin(15, (int)(int8_t)(x[j] * id + 8.5f));
            const int q1 = imin(15, (int)(int8_t)(x[j + QK4_0 / 2] * id + 8.5f));
            b[i].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

static void q4_0_vec_dot(int64_t n, float *s, const void *w, const void *x) {
    const block_q4_0 *a = w;
    const block_q8_0 *b = x;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK4_0; i++) {
        int32_t isum = 0;
        for (int j = 0; j < QK4_0 / 2; j++) {
            isum += ((a[i].qs[j] & 0xF) - 8) * b[i].qs[j];
            isum += ((a[i].qs[j] >> 4) - 8) * b[i].qs[j + QK4_0 / 2];
        }
        sum += (float)isum * (mr_fp16_to_fp32(a[i].d) * mr_fp16_to_fp32(b[i].d));
    }
    *s = sum;
}

/* ---------------------------------------------------------------------------------------------
 * Q8_0: 32 weights, d = fp16, value = d * q
 * ------------------------------------------------------------------------------------------- */

static void q8_0_to_float(const void *src, float *dst, int64_t n) {
    const block_q8_0 *b = src;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        const float d = mr_fp16_to_fp32(b[i].d);
        for (int j = 0; j < QK8_0; j++)
            dst[i * QK8_0 + j] = (float)b[i].qs[j] * d;
    }
}

/* As llama.cpp's x86 CPU path (quantize_row_q8_0 with AVX): d = amax / 127 stored as fp16,
 * multiplier id = 127 / amax (not 1 / d: the two can differ in the last bit), q rounded to
 * nearest even. */
static void q8_0_from_float(const float *src, void *dst, int64_t n) {
    block_q8_0 *b = dst;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        const float *x = src + i * QK8_0;
        float amax = 0.0f;
        for (int j = 0; j < QK8_0; j++)
            amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.f;
        const float id = amax != 0.0f ? 127.f / amax : 0.0f;
        b[i].d = mr_fp32_to_fp16(d);
        for (int j = 0; j < QK8_0; j++)
            b[i].qs[j] = (int8_t)nearest_int(x[j] * id);
    }
}

static void q8_0_vec_dot(int64_t n, float *s, const void *w, const void *x) {
    const block_q8_0 *a = w;
    const block_q8_0 *b = x;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        int32_t isum = 0;
        for (int j = 0; j < QK8_0; j++)
            isum += a[i].qs[j] * b[i].qs[j];
        sum += (float)isum * (mr_fp16_to_fp32(a[i].d) * mr_fp16_to_fp32(b[i].d));
    }
    *s = sum;
}

/* ---------------------------------------------------------------------------------------------
 * Q8_K (activations): 256 values, d = float, value = d * q, bsums[g] = sum of q[16g..16g+15]
 * ------------------------------------------------------------------------------------------- */

static void q8_K_to_float(const void *src, float *dst, int64_t n) {
    const block_q8_K *b = src;
    for (int64_t i = 0; i < n / QK_K; i++) {
        for (int j = 0; j < QK_K; j++)
            dst[i * QK_K + j] = b[i].d * (float)b[i].qs[j];
    }
}

/* ggml's quantize_row_q8_K_ref: the element of largest magnitude (first on ties) maps to -127. */
static void q8_K_from_float(const float *src, void *dst, int64_t n) {
    block_q8_K *b = dst;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float *x = src + i * QK_K;
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK_K; j++) {
            if (fabsf(x[j]) > amax) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        }
        if (amax == 0.0f) {
            b[i].d = 0.0f;
            memset(b[i].qs, 0, sizeof(b[i].qs));
            memset(b[i].bsums, 0, sizeof(b[i].bsums));
            continue;
        }
        const float iscale = -127.f / max;
        for (int j = 0; j < QK_K; j++)
            b[i].qs[j] = (int8_t)imin(127, nearest_int(iscale * x[j]));
        for (int g = 0; g < QK_K / 16; g++) {
            int sum = 0;
            for (int l = 0; l < 16; l++)
                sum += b[i].qs[16 * g + l];
            b[i].bsums[g] = (int16_t)sum;
        }
        b[i].d = 1 / iscale;
    }
}

/* ---------------------------------------------------------------------------------------------
 * K-quant weight quantizers: ggml's reference search (make_qkx2_quants, make_qx_quants)
 * ------------------------------------------------------------------------------------------- */

/* Fit x[i] ~ scale * L[i] - min with L in 0..nmax, weighted least squares over nstep + 1 trial
 * scales; returns scale and sets *the_min (>= 0). */
static float kq_fit_scale_min(int n, int nmax, const float *x, const float *weights, uint8_t *L,
                              float *the_min, uint8_t *Laux, float rmin, float rdelta, int nstep) {
    float min = x[0], max = x[0];
    float sum_w = weights[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min)
            min = x[i];
        if (x[i] > max)
            max = x[i];
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if (min > 0)
        min = 0;
    if (max == min) {
        memset(L, 0, (size_t)n);
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; i++) {
        int l = nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)imax(0, imin(nmax, l));
        float diff = scale * L[i] + min - x[i];
        diff = diff * diff;
        best_error += weights[i] * diff;
    }
    for (int is = 0; is <= nstep; is++) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; i++) {
            int l = imax(0, imin(nmax, nearest_int(iscale * (x[i] - min))));
            Laux[i] = (uint8_t)l;
            float w = weights[i];
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
            for (int i = 0; i < n; i++) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                diff = diff * diff;
                cur_error += weights[i] * diff;
            }
            if (cur_error < best_error) {
                memcpy(L, Laux, (size_t)n);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

/* Fit x[i] ~ scale * l[i] with l in -nmax..nmax-1 (weights x^2), trying 19 scales around the
 * one that maps the largest magnitude to -nmax; L[i] = l[i] + nmax. Returns scale (signed). */
static float kq_fit_scale(int n, int nmax, const float *x, int8_t *L) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; i++) {
        if (fabsf(x[i]) > amax) {
            amax = fabsf(x[i]);
            max = x[i];
        }
    }
    if (amax < 1e-15f) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        int l = imax(-nmax, imin(nmax - 1, nearest_int(iscale * x[i])));
        L[i] = (int8_t)(l + nmax);
        float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0)
            continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; i++) {
            int l = imax(-nmax, imin(nmax - 1, nearest_int(iscale * x[i])));
            float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; i++) {
                int l = nearest_int(iscale * x[i]);
                L[i] = (int8_t)(nmax + imax(-nmax, imin(nmax - 1, l)));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* Shared by Q4_K (nmax 15) and Q5_K (nmax 31): per 32-element sub-block scale and min, both
 * quantized to 6 bits against the block's d and dmin, then the quants recomputed with the
 * quantized values. Fills d, dmin, scales and L[256] (0..nmax). */
static void kq_quantize_sub32(const float *x, int nmax, float rmin, float rdelta, int nstep,
                              mr_fp16 *out_d, mr_fp16 *out_dmin, uint8_t *out_scales, uint8_t *L) {
    uint8_t Laux[32];
    float weights[32];
    float mins[QK_K / 32], scales[QK_K / 32];
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < QK_K / 32; j++) {
        float sum_x2 = 0;
        for (int l = 0; l < 32; l++)
            sum_x2 += x[32 * j + l] * x[32 * j + l];
        float av_x = sqrtf(sum_x2 / 32);
        for (int l = 0; l < 32; l++)
            weights[l] = av_x + fabsf(x[32 * j + l]);
        scales[j] = kq_fit_scale_min(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], Laux,
                                     rmin, rdelta, nstep);
        if (scales[j] > max_scale)
            max_scale = scales[j];
        if (mins[j] > max_min)
            max_min = mins[j];
    }
    float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    uint8_t ls[8], lm[8];
    for (int j = 0; j < QK_K / 32; j++) {
        /* as ggml: to uint8 first, then capped (a negative scale becomes 63) */
        ls[j] = (uint8_t)imin(63, (uint8_t)nearest_int(inv_scale * scales[j]));
        lm[j] = (uint8_t)imin(63, (uint8_t)nearest_int(inv_min * mins[j]));
    }
    kq_pack_scale_min(out_scales, ls, lm);
    *out_d = mr_fp32_to_fp16(max_scale / 63.f);
    *out_dmin = mr_fp32_to_fp16(max_min / 63.f);
    const float dd = mr_fp16_to_fp32(*out_d), dm = mr_fp16_to_fp32(*out_dmin);
    for (int j = 0; j < QK_K / 32; j++) {
        uint8_t sc, m;
        kq_scale_min(j, out_scales, &sc, &m);
        const float d = dd * sc;
        if (d == 0.0f)
            continue;
        const float mm = dm * m;
        for (int l = 0; l < 32; l++) {
            int q = nearest_int((x[32 * j + l] + mm) / d);
            L[32 * j + l] = (uint8_t)imax(0, imin(nmax, q));
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Q4_K: 256 weights in 8 sub-blocks of 32; y = d*sc*q - dmin*m. qs[32*c + l]: low nibble is
 * element 64c + l, high nibble element 64c + 32 + l.
 * ------------------------------------------------------------------------------------------- */

static void q4_K_to_float(const void *src, float *dst, int64_t n) {
    const block_q4_K *b = src;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = mr_fp16_to_fp32(b[i].d);
        const float dmin = mr_fp16_to_fp32(b[i].dmin);
        const uint8_t *q = b[i].qs;
        float *y = dst + i * QK_K;
        for (int c = 0; c < 4; c++) {
            uint8_t sc, m;
            kq_scale_min(2 * c, b[i].scales, &sc, &m);
            const float d1 = d * sc, m1 = dmin * m;
            kq_scale_min(2 * c + 1, b[i].scales, &sc, &m);
            const float d2 = d * sc, m2 = dmin * m;
            for (int l = 0; l < 32; l++)
                y[64 * c + l] = d1 * (float)(q[32 * c + l] & 0xF) - m1;
            for (int l = 0; l < 32; l++)
                y[64 * c + 32 + l] = d2 * (float)(q[32 * c + l] >> 4) - m2;
        }
    }
}

static void q4_K_from_float(const float *src, void *dst, int64_t n) {
    block_q4_K *b = dst;
    uint8_t L[QK_K];
    for (int64_t i = 0; i < n / QK_K; i++) {
        kq_quantize_sub32(src + i * QK_K, 15, -1.f, 0.1f, 20, &b[i].d, &b[i].dmin, b[i].scales, L);
        for (int c = 0; c < 4; c++) {
            for (int l = 0; l < 32; l++)
                b[i].qs[32 * c + l] = (uint8_t)(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
        }
    }
}

/* Sum over the 8 sub-blocks of m_j * (sum of the activation quants of sub-block j). */
static int32_t kq_mins_dot(const uint8_t *scales, const int16_t *bsums) {
    int32_t summs = 0;
    for (int j = 0; j < QK_K / 32; j++) {
        uint8_t sc, m;
        kq_scale_min(j, scales, &sc, &m);
        summs += m * (bsums[2 * j] + bsums[2 * j + 1]);
    }
    return summs;
}

static void q4_K_vec_dot(int64_t n, float *s, const void *w, const void *x) {
    const block_q4_K *a = w;
    const block_q8_K *b = x;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        int32_t isum = 0;
        for (int j = 0; j < QK_K / 32; j++) {
            uint8_t sc, m;
            kq_scale_min(j, a[i].scales, &sc, &m);
            const uint8_t *q = a[i].qs + 32 * (j / 2);
            const int shift = 4 * (j & 1);
            const int8_t *y = b[i].qs + 32 * j;
            int32_t s32 = 0;
            for (int l = 0; l < 32; l++)
                s32 += ((q[l] >> shift) & 0xF) * y[l];
            isum += sc * s32;
        }
        const int32_t summs = kq_mins_dot(a[i].scales, b[i].bsums);
        const float d = mr_fp16_to_fp32(a[i].d) * b[i].d;
        const float dmin = mr_fp16_to_fp32(a[i].dmin) * b[i].d;
        sum += d * (float)isum - dmin * (float)summs;
    }
    *s = sum;
}

/* ---------------------------------------------------------------------------------------------
 * Q5_K: as Q4_K with a fifth bit: element 64c + l takes bit 2c of qh[l], element 64c + 32 + l
 * bit 2c + 1.
 * ------------------------------------------------------------------------------------------- */

static void q5_K_to_float(const void *src, float *dst, int64_t n) {
    const block_q5_K *b = src;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = mr_fp16_to_fp32(b[i].d);
        const float dmin = mr_fp16_to_fp32(b[i].dmin);
        const uint8_t *ql = b[i].qs, *qh = b[i].qh;
        float *y = dst + i * QK_K;
        for (int c = 0; c < 4; c++) {
            uint8_t sc, m;
            kq_scale_min(2 * c, b[i].scales, &sc, &m);
            const float d1 = d * sc, m1 = dmin * m;
            kq_scale_min(2 * c + 1, b[i].scales, &sc, &m);
            const float d2 = d * sc, m2 = dmin * m;
            const uint8_t u1 = (uint8_t)(1u << (2 * c)), u2 = (uint8_t)(2u << (2 * c));
            for (int l = 0; l < 32; l++)
                y[64 * c + l] = d1 * (float)((ql[32 * c + l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
            for (int l = 0; l < 32; l++)
                y[64 * c + 32 + l] =
                    d2 * (float)((ql[32 * c + l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
        }
    }
}

static void q5_K_from_float(const float *src, void *dst, int64_t n) {
    block_q5_K *b = dst;
    uint8_t L[QK_K];
    for (int64_t i = 0; i < n / QK_K; i++) {
        kq_quantize_sub32(src + i * QK_K, 31, -0.5f, 0.1f, 15, &b[i].d, &b[i].dmin, b[i].scales, L);
        memset(b[i].qh, 0, sizeof(b[i].qh));
        for (int c = 0; c < 4; c++) {
            for (int l = 0; l < 32; l++) {
                int l1 = L[64 * c + l], l2 = L[64 * c + 32 + l];
                if (l1 > 15) {
                    l1 -= 16;
                    b[i].qh[l] |= (uint8_t)(1u << (2 * c));
                }
                if (l2 > 15) {
                    l2 -= 16;
                    b[i].qh[l] |= (uint8_t)(2u << (2 * c));
                }
                b[i].qs[32 * c + l] = (uint8_t)(l1 | (l2 << 4));
            }
        }
    }
}

static void q5_K_vec_dot(int64_t n, float *s, const void *w, const void *x) {
    const block_q5_K *a = w;
    const block_q8_K *b = x;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        int32_t isum = 0;
        for (int j = 0; j < QK_K / 32; j++) {
            uint8_t sc, m;
            kq_scale_min(j, a[i].scales, &sc, &m);
            const uint8_t *ql = a[i].qs + 32 * (j / 2);
            const int shift = 4 * (j & 1);
            const int8_t *y = b[i].qs + 32 * j;
            int32_t s32 = 0;
            for (int l = 0; l < 32; l++) {
                const int q = ((ql[l] >> shift) & 0xF) | (((a[i].qh[l] >> j) & 1) << 4);
                s32 += q * y[l];
            }
            isum += sc * s32;
        }
        const int32_t summs = kq_mins_dot(a[i].scales, b[i].bsums);
        const float d = mr_fp16_to_fp32(a[i].d) * b[i].d;
        const float dmin = mr_fp16_to_fp32(a[i].dmin) * b[i].d;
        sum += d * (float)isum - dmin * (float)summs;
    }
    *s = sum;
}

/* ---------------------------------------------------------------------------------------------
 * Q6_K: 256 weights, 16 groups of 16 with int8 scales; y = d * sc * (q - 32), q 6 bits.
 * Per half h (128 elements), l in 0..31: element 128h + l     = ql[64h + l] low  | qh bits 0-1
 *                                        element 128h + 32 + l = ql[64h + 32 + l] low | bits 2-3
 *                                        element 128h + 64 + l = ql[64h + l] high | bits 4-5
 *                                        element 128h + 96 + l = ql[64h + 32 + l] high | bits 6-7
 * of qh[32h + l]; the scale of element e is scales[e / 16].
 * ------------------------------------------------------------------------------------------- */

static inline int q6_K_quant(const block_q6_K *b, int e) {
    const int h = e / 128, r = e % 128, part = r / 32, l = r % 32;
    const uint8_t lo = b->ql[64 * h + 32 * (part & 1) + l];
    const int low = part < 2 ? (lo & 0xF) : (lo >> 4);
    const int high = (b->qh[32 * h + l] >> (2 * part)) & 3;
    return (low | (high << 4)) - 32;
}

static void q6_K_to_float(const void *src, float *dst, int64_t n) {
    const block_q6_K *b = src;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = mr_fp16_to_fp32(b[i].d);
        for (int e = 0; e < QK_K; e++)
            dst[i * QK_K + e] = d * (float)b[i].scales[e / 16] * (float)q6_K_quant(&b[i], e);
    }
}

static void q6_K_from_float(const float *src, void *dst, int64_t n) {
    block_q6_K *b = dst;
    int8_t L[QK_K];
    float scales[QK_K / 16];
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float *x = src + i * QK_K;
        float max_scale = 0, max_abs_scale = 0;
        for (int g = 0; g < QK_K / 16; g++) {
            scales[g] = kq_fit_scale(16, 32, x + 16 * g, L + 16 * g);
            if (fabsf(scales[g]) > max_abs_scale) {
                max_abs_scale = fabsf(scales[g]);
                max_scale = scales[g];
            }
        }
        memset(&b[i], 0, sizeof(b[i]));
        if (max_abs_scale < 1e-15f)
            continue; /* all zero: d = 0 */
        const float iscale = -128.f / max_scale;
        b[i].d = mr_fp32_to_fp16(1 / iscale);
        for (int g = 0; g < QK_K / 16; g++)
            b[i].scales[g] = (int8_t)imin(127, nearest_int(iscale * scales[g]));
        const float dd = mr_fp16_to_fp32(b[i].d);
        for (int g = 0; g < QK_K / 16; g++) {
            const float d = dd * b[i].scales[g];
            if (d == 0.0f)
                continue;
            for (int l = 0; l < 16; l++) {
                int q = nearest_int(x[16 * g + l] / d);
                L[16 * g + l] = (int8_t)(imax(-32, imin(31, q)) + 32);
            }
        }
        for (int h = 0; h < 2; h++) {
            const int8_t *Lh = L + 128 * h;
            for (int l = 0; l < 32; l++) {
                b[i].ql[64 * h + l] = (uint8_t)((Lh[l] & 0xF) | ((Lh[l + 64] & 0xF) << 4));
                b[i].ql[64 * h + 32 + l] =
                    (uint8_t)((Lh[l + 32] & 0xF) | ((Lh[l + 96] & 0xF) << 4));
                b[i].qh[32 * h + l] =
                    (uint8_t)((Lh[l] >> 4) | ((Lh[l + 32] >> 4) << 2) | ((Lh[l + 64] >> 4) << 4) |
                              ((Lh[l + 96] >> 4) << 6));
            }
        }
    }
}

static void q6_K_vec_dot(int64_t n, float *s, const void *w, const void *x) {
    const block_q6_K *a = w;
    const block_q8_K *b = x;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        int32_t isum = 0;
        for (int g = 0; g < QK_K / 16; g++) {
            int32_t s32 = 0;
            for (int l = 0; l < 16; l++)
                s32 += q6_K_quant(&a[i], 16 * g + l) * b[i].qs[16 * g + l];
            isum += a[i].scales[g] * s32;
        }
        sum += mr_fp16_to_fp32(a[i].d) * b[i].d * (float)isum;
    }
    *s = sum;
}

/* ---------------------------------------------------------------------------------------------
 * The scalar table
 * ------------------------------------------------------------------------------------------- */

static const struct cpu_type_kernels ref_table[] = {
    {MOERUN_TYPE_F32, MOERUN_TYPE_F32, f32_to_float, f32_from_float, f32_vec_dot},
    {MOERUN_TYPE_F16, MOERUN_TYPE_F16, f16_to_float, f16_from_float, f16_vec_dot},
    {MOERUN_TYPE_BF16, MOERUN_TYPE_BF16, bf16_to_float, bf16_from_float, bf16_vec_dot},
    {MOERUN_TYPE_Q4_0, MOERUN_TYPE_Q8_0, q4_0_to_float, q4_0_from_float, q4_0_vec_dot},
    {MOERUN_TYPE_Q8_0, MOERUN_TYPE_Q8_0, q8_0_to_float, q8_0_from_float, q8_0_vec_dot},
    {MOERUN_TYPE_Q4_K, MOERUN_TYPE_Q8_K, q4_K_to_float, q4_K_from_float, q4_K_vec_dot},
    {MOERUN_TYPE_Q5_K, MOERUN_TYPE_Q8_K, q5_K_to_float, q5_K_from_float, q5_K_vec_dot},
    {MOERUN_TYPE_Q6_K, MOERUN_TYPE_Q8_K, q6_K_to_float, q6_K_from_float, q6_K_vec_dot},
    {MOERUN_TYPE_Q8_K, MOERUN_TYPE_Q8_K, q8_K_to_float, q8_K_from_float, NULL},
};

const struct cpu_type_kernels *cpu_ref_kernels(int type) {
    for (size_t i = 0; i < sizeof(ref_table) / sizeof(ref_table[0]); i++) {
        if (ref_table[i].type == type)
            return &ref_table[i];
    }
    return NULL;
}

void cpu_ref_to_float(int type, const void *src, float *dst, int64_t n) {
    const struct cpu_type_kernels *k = cpu_ref_kernels(type);
    if (k && k->to_float)
        k->to_float(src, dst, n);
}

void cpu_ref_from_float(int type, const float *src, void *dst, int64_t n) {
    const struct cpu_type_kernels *k = cpu_ref_kernels(type);
    if (k && k->from_float)
        k->from_float(src, dst, n);
}

void cpu_ref_vec_dot(int type, int64_t n, float *s, const void *w, const void *x) {
    const struct cpu_type_kernels *k = cpu_ref_kernels(type);
    if (k && k->vec_dot)
        k->vec_dot(n, s, w, x);
    else
        *s = 0.0f;
}
