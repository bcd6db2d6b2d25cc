/* Kernel tables per instruction set: the SIMD files' entries merged over the scalar ones, field
 * by field, once; and the choice of the instruction set this CPU runs. */
#include "quants.h"
#include "moerun.h"
#include "internal.h"

#if defined(MOERUN_X86) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

/* Every type the CPU computes with (weights and activation companions). */
static const int cpu_types[] = {
    MOERUN_TYPE_F32,  MOERUN_TYPE_F16,  MOERUN_TYPE_BF16, MOERUN_TYPE_Q4_0, MOERUN_TYPE_Q8_0,
    MOERUN_TYPE_Q4_K, MOERUN_TYPE_Q5_K, MOERUN_TYPE_Q6_K, MOERUN_TYPE_Q8_K,
};
#define N_CPU_TYPES ((int)(sizeof(cpu_types) / sizeof(cpu_types[0])))

static struct cpu_type_kernels tables[CPU_ISA_COUNT][N_CPU_TYPES];
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;

static void merge(struct cpu_type_kernels *dst, const struct cpu_type_kernels *base,
                  const struct cpu_type_kernels *simd) {
    *dst = *base;
    if (!simd)
        return;
    if (simd->to_float)
        dst->to_float = simd->to_float;
    if (simd->from_float)
        dst->from_float = simd->from_float;
    if (simd->vec_dot)
        dst->vec_dot = simd->vec_dot;
}

static void tables_build(void) {
    for (int t = 0; t < N_CPU_TYPES; t++) {
        const struct cpu_type_kernels *ref = cpu_ref_kernels(cpu_types[t]);
        /* every listed type has a scalar entry (quants_ref.c); keep the row zeroed otherwise */
        if (!ref)
            continue;
        tables[CPU_ISA_SCALAR][t] = *ref;
#ifdef MOERUN_X86
        merge(&tables[CPU_ISA_AVX2][t], &tables[CPU_ISA_SCALAR][t], cpu_avx2_kernels(cpu_types[t]));
        merge(&tables[CPU_ISA_AVX512][t], &tables[CPU_ISA_AVX2][t],
              cpu_avx512_kernels(cpu_types[t]));
#else
        tables[CPU_ISA_AVX2][t] = *ref;
        tables[CPU_ISA_AVX512][t] = *ref;
#endif
    }
}

const struct cpu_type_kernels *cpu_kernels(enum cpu_isa isa, int type) {
    if ((int)isa < 0 || isa >= CPU_ISA_COUNT)
        return NULL;
    pthread_once(&tables_once, tables_build);
    for (int t = 0; t < N_CPU_TYPES; t++) {
        if (cpu_types[t] == type)
            return tables[isa][t].to_float ? &tables[isa][t] : NULL;
    }
    return NULL;
}

/* ---------------------------------------------------------------------------------------------
 * Instruction set detection
 * ------------------------------------------------------------------------------------------- */

static enum cpu_isa isa_hw = CPU_ISA_SCALAR;   /* what the CPU runs */
static enum cpu_isa isa_best = CPU_ISA_SCALAR; /* capped by MOERUN_CPU_ISA */
static pthread_once_t isa_once = PTHREAD_ONCE_INIT;

#if defined(MOERUN_X86) && (defined(__GNUC__) || defined(__clang__))
/* F16C from cpuid (leaf 1, ecx bit 29): not every clang knows "f16c" in
 * __builtin_cpu_supports. The OS's saving of AVX state is checked by the "avx2" test. */
static bool cpu_has_f16c(void) {
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
}
#endif

static void isa_detect(void) {
    enum cpu_isa hw = CPU_ISA_SCALAR;
#if defined(MOERUN_X86) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c()) {
        hw = CPU_ISA_AVX2;
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
            hw = CPU_ISA_AVX512;
    }
#endif
    isa_hw = hw;
    enum cpu_isa best = hw;
    const char *env = getenv("MOERUN_CPU_ISA");
    if (env && *env) {
        int i = 0;
        while (i < CPU_ISA_COUNT && strcmp(env, cpu_isa_name((enum cpu_isa)i)) != 0)
            i++;
        if (i == CPU_ISA_COUNT)
            mr_log_warn("cpu: MOERUN_CPU_ISA='%s' is not scalar, avx2 or avx512; ignored", env);
        else if ((enum cpu_isa)i < best)
            best = (enum cpu_isa)i;
    }
    isa_best = best;
}

enum cpu_isa cpu_isa_best(void) {
    pthread_once(&isa_once, isa_detect);
    return isa_best;
}

bool cpu_isa_available(enum cpu_isa isa) {
    pthread_once(&isa_once, isa_detect);
    return (int)isa >= 0 && isa <= isa_hw;
}

const char *cpu_isa_name(enum cpu_isa isa) {
    switch (isa) {
    case CPU_ISA_SCALAR:
        return "scalar";
    case CPU_ISA_AVX2:
        return "avx2";
    case CPU_ISA_AVX512:
        return "avx512";
    default:
        return "unknown";
    }
}
