/* CPU weight types: fp16/bf16 conversions, dequantize against hand-built GGML blocks, quantize
 * round trips, activation rounding, dot products against float64, and every instruction set
 * this machine runs against the scalar reference. */
#include "testutil.h"

#include "moerun.h"
#include "cpu/quants.h"
#include "types.h"

#include <float.h>
#include <stddef.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

static struct tu_rng rng;

static int group_setup(void **state) {
    (void)state;
    tu_rng_init(&rng, tu_seed());
    return 0;
}

static uint32_t rnd32(void) {
    return (uint32_t)(tu_rng_u64(&rng) >> 32);
}

static int rnd_int(int n) { /* 0 .. n-1 */
    return (int)(tu_rng_uniform(&rng) * n);
}

static float f32_of(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return u;
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    assert_non_null(p);
    return p;
}

static size_t row_bytes(int type, int64_t n) {
    uint64_t b = 0;
    assert_true(mr_type_nbytes(type, (uint64_t)n, &b));
    return (size_t)b;
}

/* ---------------------------------------------------------------------------------------------
 * fp16 / bf16
 * ------------------------------------------------------------------------------------------- */

/* The value of half bits h, decoded independently in double. */
static double half_value(uint16_t h) {
    int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v;
    if (e == 31)
        v = m ? NAN : INFINITY;
    else if (e == 0)
        v = ldexp((double)m, -24);
    else
        v = ldexp((double)(1024 + m), e - 25);
    return s ? -v : v;
}

static double bf16_value(uint16_t h) {
    int s = h >> 15, e = (h >> 7) & 255, m = h & 127;
    double v;
    if (e == 255)
        v = m ? NAN : INFINITY;
    else if (e == 0)
        v = ldexp((double)m, -133);
    else
        v = ldexp((double)(128 + m), e - 134);
    return s ? -v : v;
}

/* |f| rounded to a grid with mant_bits fraction bits and minimum exponent emin, ties to even,
 * computed in double; returns INFINITY when the result reaches 2^(emax + 1). */
static double round_to_format(double a, int mant_bits, int emin, int emax) {
    if (a == 0)
        return 0;
    int e;
    frexp(a, &e);
    e -= 1; /* a in [2^e, 2^(e+1)) */
    if (e < emin)
        e = emin;
    double ulp = ldexp(1.0, e - mant_bits);
    double q = a / ulp; /* exact: a power-of-two scaling */
    double r = floor(q);
    double frac = q - r;
    if (frac > 0.5 || (frac == 0.5 && fmod(r, 2.0) != 0))
        r += 1;
    double v = r * ulp;
    return v >= ldexp(1.0, emax + 1) ? INFINITY : v;
}

static void check_fp16_of(float f) {
    uint16_t h = mr_fp32_to_fp16(f);
    if (isnan(f)) {
        assert_true((h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0);
        assert_int_equal(h >> 15, bits_of(f) >> 31);
        return;
    }
    double want = round_to_format(fabs((double)f), 10, -14, 15);
    double got = half_value(h);
    if (fabs(got) != want || (h >> 15) != (bits_of(f) >> 31)) {
        fprintf(stderr, "fp16(%a = 0x%08x) = 0x%04x (%a), want %a\n", (double)f, bits_of(f), h, got,
                want);
        fail();
    }
}

static void check_bf16_of(float f) {
    uint16_t h = mr_fp32_to_bf16(f);
    if (isnan(f)) {
        assert_true((h & 0x7f80) == 0x7f80 && (h & 0x7f) != 0);
        assert_true(h & 0x40); /* quiet */
        assert_int_equal(h >> 15, bits_of(f) >> 31);
        return;
    }
    double want = round_to_format(fabs((double)f), 7, -126, 127);
    double got = bf16_value(h);
    if (fabs(got) != want || (h >> 15) != (bits_of(f) >> 31)) {
        fprintf(stderr, "bf16(%a = 0x%08x) = 0x%04x (%a), want %a\n", (double)f, bits_of(f), h, got,
                want);
        fail();
    }
}

static void test_fp16_all_halves(void **state) {
    (void)state;
    for (uint32_t i = 0; i < 65536; i++) {
        uint16_t h = (uint16_t)i;
        float f = mr_fp16_to_fp32(h);
        double v = half_value(h);
        if (isnan(v)) {
            assert_true(isnan(f));
            assert_true(isnan(half_value(mr_fp32_to_fp16(f))));
            assert_int_equal(mr_fp32_to_fp16(f) >> 15, h >> 15);
            continue;
        }
        assert_true((double)f == v);
        assert_int_equal(bits_of(f) >> 31, h >> 15); /* -0 stays -0 */
        assert_int_equal(mr_fp32_to_fp16(f), h);
    }
}

static void test_fp16_rounding(void **state) {
    (void)state;
    /* random bit patterns over the whole float range */
    for (int i = 0; i < 200000; i++)
        check_fp16_of(f32_of(rnd32()));
    /* magnitudes around half's range: subnormals, normals, overflow */
    for (int i = 0; i < 200000; i++) {
        double a = ldexp(1.0 + tu_rng_uniform(&rng), rnd_int(45) - 28); /* 2^-28 .. 2^17 */
        check_fp16_of((float)(rnd_int(2) ? a : -a));
    }
    /* exact ties between neighbouring halves, and points just beside them */
    for (int i = 0; i < 100000; i++) {
        uint16_t h = (uint16_t)(rnd32() & 0x7bfe); /* finite, below the largest */
        double mid = (half_value(h) + half_value((uint16_t)(h + 1))) / 2;
        float f = (float)mid;
        assert_true((double)f == mid); /* halves' midpoints are floats */
        check_fp16_of(f);
        check_fp16_of(-f);
        check_fp16_of(nextafterf(f, 0));
        check_fp16_of(nextafterf(f, INFINITY));
    }
    /* overflow edges: 65504 is the largest half; 65520 is its tie with 2^16 (rounds up) */
    check_fp16_of(65504.0f);
    check_fp16_of(65519.996f);
    check_fp16_of(65520.0f);
    check_fp16_of(FLT_MAX);
    check_fp16_of(INFINITY);
    check_fp16_of(-INFINITY);
    check_fp16_of(NAN);
    check_fp16_of(-NAN);
    check_fp16_of(0x1p-25f);                   /* tie with 0: to even (0) */
    check_fp16_of(nextafterf(0x1p-25f, 1.0f)); /* just above: smallest subnormal */
    check_fp16_of(0x1.8p-24f);                 /* tie between 1 and 2 subnormal units: 2 */
    assert_int_equal(mr_fp32_to_fp16(65520.0f), 0x7c00);
    assert_int_equal(mr_fp32_to_fp16(0x1p-25f), 0);
    assert_int_equal(mr_fp32_to_fp16(0x1.8p-24f), 2);
    assert_int_equal(mr_fp32_to_fp16(1.0f), 0x3c00);
    assert_int_equal(mr_fp32_to_fp16(-2.0f), 0xc000);
}

static void test_bf16(void **state) {
    (void)state;
    for (uint32_t i = 0; i < 65536; i++) {
        uint16_t h = (uint16_t)i;
        float f = mr_bf16_to_fp32(h);
        double v = bf16_value(h);
        if (isnan(v)) {
            assert_true(isnan(f));
            assert_true(isnan(bf16_value(mr_fp32_to_bf16(f))));
            continue;
        }
        assert_true((double)f == v);
        assert_int_equal(mr_fp32_to_bf16(f), h);
    }
    for (int i = 0; i < 300000; i++)
        check_bf16_of(f32_of(rnd32()));
    for (int i = 0; i < 100000; i++) {
        /* ties: a bf16 value plus half its unit, exactly (low 16 bits 0x8000) */
        uint32_t u = (rnd32() & 0x7f7e0000u) | 0x8000u;
        check_bf16_of(f32_of(u));
        check_bf16_of(f32_of(u | 0x80000000u));
        check_bf16_of(f32_of(u + 1));
        check_bf16_of(f32_of(u - 1));
    }
    check_bf16_of(FLT_MAX); /* rounds to infinity */
    check_bf16_of(INFINITY);
    check_bf16_of(f32_of(0x7f800001u)); /* signalling NaN: quiet */
    check_bf16_of(f32_of(0xff800001u));
    assert_int_equal(mr_fp32_to_bf16(f32_of(0x7f800001u)), 0x7fc0);
    assert_int_equal(mr_fp32_to_bf16(f32_of(0x3f808000u)), 0x3f80); /* tie, even stays */
    assert_int_equal(mr_fp32_to_bf16(f32_of(0x3f818000u)), 0x3f82); /* tie, odd rounds up */
}

/* ---------------------------------------------------------------------------------------------
 * Dequantize hand-built blocks: expected values from the GGML layout, computed here in double
 * ------------------------------------------------------------------------------------------- */

/* A random fp16 scale of moderate size (positive), and its value. */
static uint16_t rnd_fp16_scale(double *val) {
    uint16_t h = mr_fp32_to_fp16((float)ldexp(0.5 + tu_rng_uniform(&rng), -rnd_int(12)));
    *val = half_value(h);
    return h;
}

/* got (float) against want (double) whose terms have magnitude mag: a few float roundings */
static void check_close(float got, double want, double mag, int idx) {
    if (fabs((double)got - want) > 4 * FLT_EPSILON * mag + 1e-30) {
        fprintf(stderr, "element %d: got %.9g, want %.9g\n", idx, (double)got, want);
        fail();
    }
}

static void test_dequant_q4_0_q8_0(void **state) {
    (void)state;
    const int nb = 3;
    block_q4_0 b4[3];
    block_q8_0 b8[3];
    int q4[3][32], q8[3][32];
    double d4[3], d8[3];
    for (int i = 0; i < nb; i++) {
        b4[i].d = rnd_fp16_scale(&d4[i]);
        b8[i].d = rnd_fp16_scale(&d8[i]);
        if (i == 1)
            b4[i].d = (uint16_t)(b4[i].d | 0x8000), d4[i] = -d4[i]; /* negative scale */
        for (int j = 0; j < 32; j++) {
            q4[i][j] = rnd_int(16);
            q8[i][j] = rnd_int(256) - 128;
            b8[i].qs[j] = (int8_t)q8[i][j];
        }
        /* byte j: element j in the low nibble, element j + 16 in the high one */
        for (int j = 0; j < 16; j++)
            b4[i].qs[j] = (uint8_t)(q4[i][j] | (q4[i][j + 16] << 4));
    }
    float y[96];
    cpu_ref_to_float(MOERUN_TYPE_Q4_0, b4, y, 96);
    for (int e = 0; e < 96; e++)
        assert_true((double)y[e] == d4[e / 32] * (q4[e / 32][e % 32] - 8));
    cpu_ref_to_float(MOERUN_TYPE_Q8_0, b8, y, 96);
    for (int e = 0; e < 96; e++)
        assert_true((double)y[e] == d8[e / 32] * q8[e / 32][e % 32]);
}

/* Pack 8 6-bit scales and mins as GGML's K-quants store them. */
static void pack_k_scales(uint8_t out[12], const int sc[8], const int mn[8]) {
    memset(out, 0, 12);
    for (int j = 0; j < 4; j++) {
        out[j] = (uint8_t)(sc[j] | ((sc[j + 4] >> 4) << 6));
        out[j + 4] = (uint8_t)(mn[j] | ((mn[j + 4] >> 4) << 6));
        out[j + 8] = (uint8_t)((sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4));
    }
}

static void test_dequant_q4_K_q5_K(void **state) {
    (void)state;
    for (int rep = 0; rep < 20; rep++) {
        block_q4_K b4;
        block_q5_K b5;
        int sc[8], mn[8], q[256];
        double d, dmin;
        b4.d = b5.d = rnd_fp16_scale(&d);
        b4.dmin = b5.dmin = rnd_fp16_scale(&dmin);
        for (int j = 0; j < 8; j++) {
            sc[j] = rnd_int(64);
            mn[j] = rnd_int(64);
        }
        if (rep == 0) { /* the extremes */
            for (int j = 0; j < 8; j++)
                sc[j] = mn[j] = (j & 1) ? 63 : 0;
        }
        pack_k_scales(b4.scales, sc, mn);
        memcpy(b5.scales, b4.scales, 12);
        for (int e = 0; e < 256; e++)
            q[e] = rnd_int(32);
        /* 64-element chunks c: qs[32c + l] = q[64c + l] | q[64c + 32 + l] << 4 (low 4 bits);
         * Q5_K's fifth bit of q[64c + l] is bit 2c of qh[l], of q[64c + 32 + l] bit 2c + 1 */
        memset(b5.qh, 0, 32);
        for (int c = 0; c < 4; c++) {
            for (int l = 0; l < 32; l++) {
                int lo = q[64 * c + l], hi = q[64 * c + 32 + l];
                b4.qs[32 * c + l] = (uint8_t)((lo & 15) | ((hi & 15) << 4));
                b5.qs[32 * c + l] = b4.qs[32 * c + l];
                b5.qh[l] |= (uint8_t)(((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1)));
            }
        }
        float y4[256], y5[256];
        cpu_ref_to_float(MOERUN_TYPE_Q4_K, &b4, y4, 256);
        cpu_ref_to_float(MOERUN_TYPE_Q5_K, &b5, y5, 256);
        for (int e = 0; e < 256; e++) {
            int j = e / 32;
            double a4 = d * sc[j] * (q[e] & 15), a5 = d * sc[j] * q[e], m = dmin * mn[j];
            check_close(y4[e], a4 - m, fabs(a4) + fabs(m), e);
            check_close(y5[e], a5 - m, fabs(a5) + fabs(m), e);
        }
    }
}

static void test_dequant_q6_K(void **state) {
    (void)state;
    for (int rep = 0; rep < 20; rep++) {
        block_q6_K b;
        int sc[16], q[256];
        double d;
        b.d = rnd_fp16_scale(&d);
        for (int g = 0; g < 16; g++) {
            sc[g] = rnd_int(256) - 128;
            b.scales[g] = (int8_t)sc[g];
        }
        for (int e = 0; e < 256; e++)
            q[e] = rnd_int(64);
        if (rep == 0) {
            for (int e = 0; e < 256; e++)
                q[e] = (e & 1) ? 63 : 0;
        }
        /* halves h of 128: for l < 32, ql[64h + l] = q[l] | q[l + 64] << 4,
         * ql[64h + 32 + l] = q[l + 32] | q[l + 96] << 4 (low 4 bits), and
         * qh[32h + l] = the top 2 bits of q[l], q[l + 32], q[l + 64], q[l + 96] from bit 0 up */
        for (int h = 0; h < 2; h++) {
            const int *qq = q + 128 * h;
            for (int l = 0; l < 32; l++) {
                b.ql[64 * h + l] = (uint8_t)((qq[l] & 15) | ((qq[l + 64] & 15) << 4));
                b.ql[64 * h + 32 + l] = (uint8_t)((qq[l + 32] & 15) | ((qq[l + 96] & 15) << 4));
                b.qh[32 * h + l] = (uint8_t)((qq[l] >> 4) | ((qq[l + 32] >> 4) << 2) |
                                             ((qq[l + 64] >> 4) << 4) | ((qq[l + 96] >> 4) << 6));
            }
        }
        float y[256];
        cpu_ref_to_float(MOERUN_TYPE_Q6_K, &b, y, 256);
        for (int e = 0; e < 256; e++) {
            double want = d * sc[e / 16] * (q[e] - 32);
            check_close(y[e], want, fabs(want), e);
        }
    }
}

static void test_dequant_q8_K_f16_bf16(void **state) {
    (void)state;
    block_q8_K b;
    b.d = (float)(tu_rng_normal(&rng) * 0.01);
    for (int e = 0; e < 256; e++)
        b.qs[e] = (int8_t)(rnd_int(255) - 127);
    float y[256];
    cpu_ref_to_float(MOERUN_TYPE_Q8_K, &b, y, 256);
    for (int e = 0; e < 256; e++)
        assert_true(y[e] == (float)((double)b.d * b.qs[e])); /* one rounding */
    uint16_t h[64];
    for (int i = 0; i < 64; i++)
        h[i] = (uint16_t)(rnd32() & 0x7bff); /* finite */
    cpu_ref_to_float(MOERUN_TYPE_F16, h, y, 64);
    for (int i = 0; i < 64; i++)
        assert_true((double)y[i] == half_value(h[i]));
    for (int i = 0; i < 64; i++)
        h[i] = (uint16_t)(rnd32() & 0x7f7f);
    cpu_ref_to_float(MOERUN_TYPE_BF16, h, y, 64);
    for (int i = 0; i < 64; i++)
        assert_true((double)y[i] == bf16_value(h[i]));
}

/* ---------------------------------------------------------------------------------------------
 * Quantize -> dequantize of N(0, 1) data
 * ------------------------------------------------------------------------------------------- */

struct type_case {
    int type;
    double rt_bound; /* relative RMS round-trip error bound on N(0, 1) data */
};

/* measured (16384 values, several seeds): F16 2.1e-4, BF16 1.7e-3, Q8_0 5.3e-3, Q4_0 0.085,
 * Q4_K 0.071, Q5_K 0.036, Q6_K 0.0177, Q8_K 7.0e-3 */
static const struct type_case cases[] = {
    {MOERUN_TYPE_F32, 0.0},     {MOERUN_TYPE_F16, 3e-4},   {MOERUN_TYPE_BF16, 2.2e-3},
    {MOERUN_TYPE_Q8_0, 6.5e-3}, {MOERUN_TYPE_Q4_0, 0.1},   {MOERUN_TYPE_Q4_K, 0.085},
    {MOERUN_TYPE_Q5_K, 0.043},  {MOERUN_TYPE_Q6_K, 0.021}, {MOERUN_TYPE_Q8_K, 8.5e-3},
};
#define N_CASES ((int)(sizeof(cases) / sizeof(cases[0])))

static double rt_bound(int type) {
    for (int i = 0; i < N_CASES; i++) {
        if (cases[i].type == type)
            return cases[i].rt_bound;
    }
    return -1;
}

/* quantize then dequantize x into y through the scalar reference; returns the relative error */
static double round_trip(int type, const float *x, float *y, int64_t n) {
    void *q = xmalloc(row_bytes(type, n));
    cpu_ref_from_float(type, x, q, n);
    cpu_ref_to_float(type, q, y, n);
    free(q);
    double *xd = xmalloc((size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++)
        xd[i] = x[i];
    double r = tu_rel_l2(y, xd, (size_t)n);
    free(xd);
    return r;
}

static void test_round_trip(void **state) {
    (void)state;
    const int64_t n = 4096 * 4;
    float *x = xmalloc(n * sizeof(float)), *y = xmalloc(n * sizeof(float));
    tu_fill_normal(&rng, x, (size_t)n, 1.0f);
    for (int c = 0; c < N_CASES; c++) {
        double r = round_trip(cases[c].type, x, y, n);
        fprintf(stderr, "round trip %-5s rel rms %.3g (bound %.3g)\n",
                moerun_type_name(cases[c].type), r, cases[c].rt_bound);
        assert_true(r <= cases[c].rt_bound);
        /* scale invariance of the block formats: the same data scaled by 2^-10 */
        if (cases[c].type != MOERUN_TYPE_F32) {
            float *xs = xmalloc(n * sizeof(float));
            for (int64_t i = 0; i < n; i++)
                xs[i] = x[i] * 0x1p-10f;
            assert_true(round_trip(cases[c].type, xs, y, n) <= cases[c].rt_bound * 1.1);
            free(xs);
        }
    }
    /* all-zero and constant blocks */
    memset(x, 0, n * sizeof(float));
    for (int c = 0; c < N_CASES; c++) {
        int64_t nb = QK_K;
        cpu_ref_to_float(cases[c].type, x, y, 0); /* n = 0 is a no-op */
        void *q = xmalloc(row_bytes(cases[c].type, nb));
        cpu_ref_from_float(cases[c].type, x, q, nb);
        for (int64_t i = 0; i < nb; i++)
            y[i] = 1.0f;
        cpu_ref_to_float(cases[c].type, q, y, nb);
        for (int64_t i = 0; i < nb; i++)
            assert_true(y[i] == 0.0f);
        free(q);
    }
    for (int64_t i = 0; i < QK_K; i++)
        x[i] = 0.75f;
    for (int c = 0; c < N_CASES; c++) {
        double r = round_trip(cases[c].type, x, y, QK_K);
        assert_true(r <= cases[c].rt_bound + 1e-6);
    }
    free(x);
    free(y);
}

/* ---------------------------------------------------------------------------------------------
 * Activation quantizers: rounding of ties, bsums, the sign of the largest element
 * ------------------------------------------------------------------------------------------- */

/* A Q8_0 block where the multiplier 127 / amax (llama.cpp's x86 rule) and 1 / (amax / 127)
 * round some quants differently: x[0] = amax, and elements placed just beside k + 0.5 under
 * one multiplier. Returns how many elements tell the two rules apart. */
static int q8_0_adversarial(float *x) {
    for (;;) {
        float amax = (float)(0.5 + tu_rng_uniform(&rng));
        float id1 = 127.f / amax, id2 = 1.0f / (amax / 127.f);
        if (id1 == id2)
            continue;
        int found = 0;
        x[0] = amax;
        for (int j = 1; j < 32; j++)
            x[j] = (float)((tu_rng_uniform(&rng) * 2 - 1) * amax);
        for (int k = 1 + rnd_int(20); k < 127 && found < 31; k += 1 + rnd_int(4)) {
            float c = (k + 0.5f) / id1;
            for (int s = -4; s <= 4; s++) {
                float y = c;
                for (int u = 0; u < abs(s); u++)
                    y = nextafterf(y, s > 0 ? INFINITY : 0);
                if (y < amax && nearbyintf(y * id1) != nearbyintf(y * id2)) {
                    x[1 + found++] = rnd_int(2) ? y : -y;
                    break;
                }
            }
        }
        if (found > 0)
            return found;
    }
}

static void test_q8_ties(void **state) {
    (void)state;
    /* Q8_0: amax 127 gives d = 1 and id = 1, so x lands on x itself */
    float x[256];
    for (int j = 0; j < 32; j++)
        x[j] = (float)(rnd_int(200) - 100) + 0.5f;
    x[5] = 127.0f;
    block_q8_0 b;
    cpu_ref_from_float(MOERUN_TYPE_Q8_0, x, &b, 32);
    assert_true(half_value(b.d) == 1.0);
    for (int j = 0; j < 32; j++) {
        double want = nearbyint((double)x[j]); /* default mode: ties to even */
        assert_int_equal(b.qs[j], (int)want);
        assert_true(fabs(b.qs[j] - x[j]) == 0.5 || j == 5);
        assert_int_equal(b.qs[j] % 2 == 0 || j == 5, 1);
    }
    /* Q8_0 with general data, and with data that tells 127 / amax from 1 / d:
     * q = x * (127 / amax) to nearest even, |q| <= 127 */
    for (int rep = 0; rep < 40; rep++) {
        if (rep % 2)
            tu_fill_normal(&rng, x, 32, 3.0f);
        else
            q8_0_adversarial(x);
        cpu_ref_from_float(MOERUN_TYPE_Q8_0, x, &b, 32);
        float amax = 0;
        for (int j = 0; j < 32; j++)
            amax = fmaxf(amax, fabsf(x[j]));
        assert_true(amax > 0);
        assert_int_equal(b.d, mr_fp32_to_fp16(amax / 127.f));
        for (int j = 0; j < 32; j++) {
            float v = x[j] * (127.f / amax);
            assert_true(fabsf((float)b.qs[j] - v) <= 0.5f);
            if (fabsf((float)b.qs[j] - v) == 0.5f)
                assert_true(b.qs[j] % 2 == 0);
        }
    }

    /* Q8_K: the largest magnitude -127 maps iscale to 1: x lands on x itself */
    for (int j = 0; j < 256; j++)
        x[j] = (float)(rnd_int(200) - 100) + 0.5f;
    x[17] = -127.0f;
    block_q8_K k;
    cpu_ref_from_float(MOERUN_TYPE_Q8_K, x, &k, 256);
    assert_true(k.d == 1.0f);
    for (int j = 0; j < 256; j++)
        assert_int_equal(k.qs[j], (int)nearbyint((double)x[j]));
    /* largest +127: iscale = -1, q = -x, d = -1 */
    x[17] = 127.0f;
    cpu_ref_from_float(MOERUN_TYPE_Q8_K, x, &k, 256);
    assert_true(k.d == -1.0f);
    for (int j = 0; j < 256; j++)
        assert_int_equal(k.qs[j], (int)nearbyint(-(double)x[j]));
    /* equal magnitudes: the first one is the max */
    for (int j = 0; j < 256; j++)
        x[j] = (float)tu_rng_normal(&rng);
    x[3] = -10.0f;
    x[200] = 10.0f;
    cpu_ref_from_float(MOERUN_TYPE_Q8_K, x, &k, 256);
    assert_int_equal(k.qs[3], -127);
    assert_int_equal(k.qs[200], 127);
    assert_true(k.d > 0);
}

static void test_q8_K_bsums(void **state) {
    (void)state;
    const int nb = 5;
    float x[5 * 256];
    tu_fill_normal(&rng, x, 5 * 256, 2.0f);
    for (int j = 0; j < 256; j++)
        x[256 + j] = 100.0f + (float)j; /* all positive: the sums reach their largest */
    block_q8_K b[5];
    cpu_ref_from_float(MOERUN_TYPE_Q8_K, x, b, nb * 256);
    for (int i = 0; i < nb; i++) {
        for (int g = 0; g < 16; g++) {
            int s = 0;
            for (int l = 0; l < 16; l++)
                s += b[i].qs[16 * g + l];
            assert_int_equal(b[i].bsums[g], s);
        }
        /* q is within one half of x / d */
        for (int j = 0; j < 256; j++)
            assert_true(fabs((double)x[256 * i + j] / b[i].d - b[i].qs[j]) <= 0.5 + 1e-4);
    }
}

/* ---------------------------------------------------------------------------------------------
 * Dot products against float64
 * ------------------------------------------------------------------------------------------- */

static double dot64(const float *a, const float *b, int64_t n, double *abs_sum) {
    double s = 0, as = 0;
    for (int64_t i = 0; i < n; i++) {
        s += (double)a[i] * b[i];
        as += fabs((double)a[i] * b[i]);
    }
    if (abs_sum)
        *abs_sum = as;
    return s;
}

static double norm64(const float *a, int64_t n) {
    return sqrt(dot64(a, a, n, NULL));
}

static void test_vec_dot_reference(void **state) {
    (void)state;
    const int weight_types[] = {MOERUN_TYPE_F32,  MOERUN_TYPE_F16,  MOERUN_TYPE_BF16,
                                MOERUN_TYPE_Q8_0, MOERUN_TYPE_Q4_0, MOERUN_TYPE_Q4_K,
                                MOERUN_TYPE_Q5_K, MOERUN_TYPE_Q6_K};
    const int64_t sizes[] = {256, 4096, 4096 + 256};
    for (size_t t = 0; t < ARRAY_LEN(weight_types); t++) {
        const int wt = weight_types[t];
        const struct cpu_type_kernels *k = cpu_ref_kernels(wt);
        assert_non_null(k);
        assert_non_null(k->vec_dot);
        const int xt = k->vec_dot_type;
        for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {
            const int64_t n = sizes[si];
            float *w = xmalloc(n * sizeof(float)), *x = xmalloc(n * sizeof(float));
            float *wd = xmalloc(n * sizeof(float)), *xd = xmalloc(n * sizeof(float));
            tu_fill_normal(&rng, w, (size_t)n, 0.05f);
            tu_fill_normal(&rng, x, (size_t)n, 3.0f);
            void *wq = xmalloc(row_bytes(wt, n)), *xq = xmalloc(row_bytes(xt, n));
            cpu_ref_from_float(wt, w, wq, n);
            cpu_ref_from_float(xt, x, xq, n);
            cpu_ref_to_float(wt, wq, wd, n);
            cpu_ref_to_float(xt, xq, xd, n);
            float s;
            cpu_ref_vec_dot(wt, n, &s, wq, xq);
            /* the same arithmetic as the dequantized rows' dot */
            double as;
            double ref = dot64(wd, xd, n, &as);
            if (fabs(s - ref) > 1e-5 * (fabs(ref) + as)) {
                fprintf(stderr, "%s n=%lld: vec_dot %.9g, dequantized dot %.9g\n",
                        moerun_type_name(wt), (long long)n, (double)s, ref);
                fail();
            }
            /* against the unquantized data: |dot(w', x') - dot(w, x)| <=
             * (e_w + e_x + e_w e_x) |w| |x| (Cauchy-Schwarz) with the types' error bounds */
            double exact = dot64(w, x, n, NULL);
            double ew = rt_bound(wt), ex = rt_bound(xt);
            double tol = (ew + ex + ew * ex) * norm64(w, n) * norm64(x, n) + 1e-5 * as;
            if (fabs(s - exact) > tol) {
                fprintf(stderr, "%s n=%lld: vec_dot %.9g, exact %.9g, tolerance %.3g\n",
                        moerun_type_name(wt), (long long)n, (double)s, exact, tol);
                fail();
            }
            free(w);
            free(x);
            free(wd);
            free(xd);
            free(wq);
            free(xq);
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Every instruction set this machine runs, against the scalar reference
 * ------------------------------------------------------------------------------------------- */

/* Random bytes for a row of type, with every scale field finite and moderate so no NaN
 * payloads (whose bits may legitimately differ) enter the comparison; wild: F32/F16/BF16 rows
 * keep all bit patterns (NaN, infinity, subnormals), else they hold N(0, 1) values. */
static void random_row(int type, void *dst, int64_t n, bool wild) {
    size_t bytes = row_bytes(type, n);
    uint8_t *p = dst;
    for (size_t i = 0; i < bytes; i++)
        p[i] = (uint8_t)rnd32();
    const struct mr_type_info *ti = mr_type_info(type);
    int64_t nb = n / ti->blck;
    double v;
    for (int64_t i = 0; i < nb; i++) {
        uint8_t *blk = p + (size_t)i * ti->type_size;
        uint16_t d = rnd_fp16_scale(&v), dmin = rnd_fp16_scale(&v);
        if (rnd_int(2))
            d |= 0x8000;
        switch (type) {
        case MOERUN_TYPE_Q4_0:
        case MOERUN_TYPE_Q8_0:
            memcpy(blk, &d, 2);
            break;
        case MOERUN_TYPE_Q4_K:
        case MOERUN_TYPE_Q5_K:
            memcpy(blk, &d, 2);
            memcpy(blk + 2, &dmin, 2);
            break;
        case MOERUN_TYPE_Q6_K:
            memcpy(blk + offsetof(block_q6_K, d), &d, 2);
            break;
        case MOERUN_TYPE_Q8_K: {
            float f = (float)(tu_rng_normal(&rng) * 0.01);
            memcpy(blk, &f, 4);
            break;
        }
        case MOERUN_TYPE_F32:
        case MOERUN_TYPE_F16:
        case MOERUN_TYPE_BF16: {
            if (wild)
                break;
            float f = (float)tu_rng_normal(&rng);
            uint16_t h = type == MOERUN_TYPE_F16 ? mr_fp32_to_fp16(f) : mr_fp32_to_bf16(f);
            if (type == MOERUN_TYPE_F32)
                memcpy(blk, &f, 4);
            else
                memcpy(blk, &h, 2);
            break;
        }
        default:
            break;
        }
    }
}

static void fill_activation(float *x, int64_t n) {
    tu_fill_normal(&rng, x, (size_t)n, (float)ldexp(1.0, rnd_int(8) - 4));
    /* an all-zero block, exact ties and repeated maxima now and then */
    if (n >= 256 && rnd_int(3) == 0)
        memset(x + (n / 256 - 1) * 256, 0, 256 * sizeof(float));
    if (n >= 32 && rnd_int(2) == 0) {
        x[0] = 127.0f;
        for (int j = 1; j < 32; j++)
            x[j] = (float)(rnd_int(200) - 100) + 0.5f;
    }
    /* Q8_0 blocks that tell the multiplier 127 / amax from 1 / d */
    for (int64_t b = 0; b + 32 <= n && b < 32 * 64; b += 32) {
        if (rnd_int(2) == 0)
            q8_0_adversarial(x + b);
    }
    if (n >= 64 && rnd_int(2) == 0) {
        x[33] = 1e3f;
        x[40] = -1e3f;
    }
}

static void check_isa(enum cpu_isa isa) {
    static const int types[] = {MOERUN_TYPE_F32,  MOERUN_TYPE_F16,  MOERUN_TYPE_BF16,
                                MOERUN_TYPE_Q8_0, MOERUN_TYPE_Q4_0, MOERUN_TYPE_Q4_K,
                                MOERUN_TYPE_Q5_K, MOERUN_TYPE_Q6_K, MOERUN_TYPE_Q8_K};
    for (size_t t = 0; t < ARRAY_LEN(types); t++) {
        const int type = types[t];
        const struct cpu_type_kernels *k = cpu_kernels(isa, type);
        const struct cpu_type_kernels *r = cpu_ref_kernels(type);
        assert_non_null(k);
        assert_non_null(r);
        assert_int_equal(k->type, type);
        assert_int_equal(k->vec_dot_type, r->vec_dot_type);
        assert_non_null(k->to_float);
        assert_non_null(k->from_float);
        assert_true((k->vec_dot == NULL) == (r->vec_dot == NULL));
        const int64_t blck = mr_type_info(type)->blck;
        int64_t big = blck == 256 ? 4096 + 256 : blck == 32 ? 32 * 37 : 4096 + 7;
        int64_t nsizes[13];
        int ns = 0;
        for (int b = 1; b <= 9; b++)
            nsizes[ns++] = b * (blck == 1 ? 1 + rnd_int(40) : blck);
        nsizes[ns++] = big;
        nsizes[ns++] = blck == 1 ? 33 : 16 * blck;
        nsizes[ns++] = blck == 1 ? 4096 : 64 * blck;
        for (int si = 0; si < ns; si++) {
            const int64_t n = nsizes[si];
            const size_t nbytes = row_bytes(type, n);
            void *q1 = xmalloc(nbytes), *q2 = xmalloc(nbytes);
            float *y1 = xmalloc(n * sizeof(float)), *y2 = xmalloc(n * sizeof(float));
            float *x = xmalloc(n * sizeof(float));
            /* to_float, bit-exact */
            random_row(type, q1, n, true);
            r->to_float(q1, y1, n);
            k->to_float(q1, y2, n);
            if (memcmp(y1, y2, n * sizeof(float)) != 0) {
                fprintf(stderr, "%s %s to_float n=%lld differs from scalar\n", cpu_isa_name(isa),
                        moerun_type_name(type), (long long)n);
                fail();
            }
            /* from_float, bit-exact */
            fill_activation(x, n);
            memset(q1, 0xA5, nbytes);
            memset(q2, 0x5A, nbytes);
            r->from_float(x, q1, n);
            k->from_float(x, q2, n);
            if (memcmp(q1, q2, nbytes) != 0) {
                fprintf(stderr, "%s %s from_float n=%lld differs from scalar\n", cpu_isa_name(isa),
                        moerun_type_name(type), (long long)n);
                fail();
            }
            /* vec_dot, within float rounding */
            if (r->vec_dot) {
                const int xt = r->vec_dot_type;
                void *xq = xmalloc(row_bytes(xt, n));
                float *xd = xmalloc(n * sizeof(float));
                cpu_ref_from_float(xt, x, xq, n);
                cpu_ref_to_float(xt, xq, xd, n);
                float s1 = 0, s2 = 0;
                r->vec_dot(n, &s1, q1, xq);
                k->vec_dot(n, &s2, q1, xq);
                r->to_float(q1, y1, n);
                double as;
                dot64(y1, xd, n, &as);
                if (!(fabs((double)s1 - s2) <= 1e-5 * (fabs((double)s1) + as))) {
                    fprintf(stderr, "%s %s vec_dot n=%lld: %.9g, scalar %.9g\n", cpu_isa_name(isa),
                            moerun_type_name(type), (long long)n, (double)s2, (double)s1);
                    fail();
                }
                /* and on random weight bytes (not from the quantizer) */
                random_row(type, q2, n, false);
                r->vec_dot(n, &s1, q2, xq);
                k->vec_dot(n, &s2, q2, xq);
                r->to_float(q2, y2, n);
                dot64(y2, xd, n, &as);
                if (!(fabs((double)s1 - s2) <= 1e-5 * (fabs((double)s1) + as))) {
                    fprintf(stderr, "%s %s vec_dot (random) n=%lld: %.9g, scalar %.9g\n",
                            cpu_isa_name(isa), moerun_type_name(type), (long long)n, (double)s2,
                            (double)s1);
                    fail();
                }
                free(xq);
                free(xd);
            }
            free(q1);
            free(q2);
            free(y1);
            free(y2);
            free(x);
        }
    }
}

static void test_isas(void **state) {
    (void)state;
    assert_true(cpu_isa_available(CPU_ISA_SCALAR));
    assert_true(cpu_isa_available(cpu_isa_best()));
    assert_string_equal(cpu_isa_name(CPU_ISA_SCALAR), "scalar");
    assert_string_equal(cpu_isa_name(CPU_ISA_AVX2), "avx2");
    assert_string_equal(cpu_isa_name(CPU_ISA_AVX512), "avx512");
    /* types without CPU kernels */
    assert_null(cpu_kernels(CPU_ISA_SCALAR, 3));  /* Q4_1 */
    assert_null(cpu_kernels(CPU_ISA_SCALAR, 10)); /* Q2_K */
    assert_null(cpu_kernels(CPU_ISA_SCALAR, -1));
    assert_null(cpu_kernels(CPU_ISA_SCALAR, 1000));
    assert_null(cpu_ref_kernels(3));
    for (int isa = 0; isa < CPU_ISA_COUNT; isa++) {
        if (!cpu_isa_available((enum cpu_isa)isa)) {
            fprintf(stderr, "isa %s: not run by this CPU, skipped\n",
                    cpu_isa_name((enum cpu_isa)isa));
            continue;
        }
        fprintf(stderr, "isa %s: checking against scalar\n", cpu_isa_name((enum cpu_isa)isa));
        check_isa((enum cpu_isa)isa);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fp16_all_halves),
        cmocka_unit_test(test_fp16_rounding),
        cmocka_unit_test(test_bf16),
        cmocka_unit_test(test_dequant_q4_0_q8_0),
        cmocka_unit_test(test_dequant_q4_K_q5_K),
        cmocka_unit_test(test_dequant_q6_K),
        cmocka_unit_test(test_dequant_q8_K_f16_bf16),
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_q8_ties),
        cmocka_unit_test(test_q8_K_bsums),
        cmocka_unit_test(test_vec_dot_reference),
        cmocka_unit_test(test_isas),
    };
    return cmocka_run_group_tests(tests, group_setup, NULL);
}
