/* Half-precision and bfloat16 conversions in portable C, bit-exact with ggml's (and with the
 * F16C instructions the SIMD files use): round to nearest even, NaN stays NaN, overflow goes
 * to infinity, subnormals are exact. */
#include "quants.h"

#include <string.h>

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return u;
}

static inline float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

float mr_fp16_to_fp32(mr_fp16 h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0x1f) {
        /* inf or NaN: keep the payload (a NaN keeps its quiet bit and bits, as F16C does) */
        u = sign | 0x7f800000u | (man << 13);
        if (man)
            u |= 0x00400000u; /* F16C quiets signalling NaNs */
    } else if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {
            /* subnormal: man * 2^-24, normalise */
            int e = -1;
            do {
                man <<= 1;
                e++;
            } while (!(man & 0x400u));
            man &= 0x3ffu;
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | (man << 13);
        }
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    return f32_from_bits(u);
}

mr_fp16 mr_fp32_to_fp16(float f) {
    uint32_t u = f32_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t abs = u & 0x7fffffffu;
    if (abs >= 0x7f800000u) {
        if (abs == 0x7f800000u)
            return (mr_fp16)(sign | 0x7c00u);
        /* NaN: keep the top payload bits, set the quiet bit (F16C does the same) */
        return (mr_fp16)(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));
    }
    int32_t exp = (int32_t)(abs >> 23) - 127 + 15; /* biased half exponent */
    uint32_t man = (abs & 0x7fffffu) | 0x800000u;  /* 24-bit significand with the implicit 1 */
    if (exp >= 0x1f)
        return (mr_fp16)(sign | 0x7c00u);
    uint32_t shift; /* bits of the 24-bit significand dropped */
    uint32_t base;
    if (exp <= 0) {
        if ((abs >> 23) == 0)
            return (mr_fp16)sign; /* float zero or subnormal: far below half's range */
        /* subnormal half: value = man * 2^(exp - 1 - 23 + ...); keep man >> (14 - exp) */
        shift = (uint32_t)(14 - exp);
        if (shift > 25)
            return (mr_fp16)sign; /* below half the smallest subnormal */
        base = 0;
    } else {
        shift = 13;
        base = (uint32_t)exp << 10;
        man &= 0x7fffffu; /* drop the implicit 1; carry into the exponent is handled by add */
    }
    uint32_t q = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1);
    uint32_t r = base + q;
    if (rem > half || (rem == half && (q & 1u)))
        r += 1; /* may carry into the exponent, up to infinity: both correct */
    return (mr_fp16)(sign | r);
}

float mr_bf16_to_fp32(mr_bf16 h) {
    return f32_from_bits((uint32_t)h << 16);
}

mr_bf16 mr_fp32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (mr_bf16)((u >> 16) | 64); /* NaN: quiet, sign kept */
    return (mr_bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
