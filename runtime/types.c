/* GGML weight type table. Ids and layouts follow ggml.h (ggml_type) so files from the
 * llama.cpp ecosystem read as they are; ids that ggml retired stay unknown. */
#include "types.h"
#include "internal.h"

#include <strings.h>

static const struct mr_type_info type_table[MR_TYPE_COUNT] = {
    [0] = {"F32", 1, 4, true},          [1] = {"F16", 1, 2, true},
    [2] = {"Q4_0", 32, 18, true},       [3] = {"Q4_1", 32, 20, false},
    [6] = {"Q5_0", 32, 22, false},      [7] = {"Q5_1", 32, 24, false},
    [8] = {"Q8_0", 32, 34, true},       [9] = {"Q8_1", 32, 36, false},
    [10] = {"Q2_K", 256, 84, false},    [11] = {"Q3_K", 256, 110, false},
    [12] = {"Q4_K", 256, 144, true},    [13] = {"Q5_K", 256, 176, true},
    [14] = {"Q6_K", 256, 210, true},    [15] = {"Q8_K", 256, 292, false},
    [16] = {"IQ2_XXS", 256, 66, false}, [17] = {"IQ2_XS", 256, 74, false},
    [18] = {"IQ3_XXS", 256, 98, false}, [19] = {"IQ1_S", 256, 50, false},
    [20] = {"IQ4_NL", 32, 18, false},   [21] = {"IQ3_S", 256, 110, false},
    [22] = {"IQ2_S", 256, 82, false},   [23] = {"IQ4_XS", 256, 136, false},
    [24] = {"I8", 1, 1, false},         [25] = {"I16", 1, 2, false},
    [26] = {"I32", 1, 4, false},        [27] = {"I64", 1, 8, false},
    [28] = {"F64", 1, 8, false},        [29] = {"IQ1_M", 256, 56, false},
    [30] = {"BF16", 1, 2, true},        [34] = {"TQ1_0", 256, 54, false},
    [35] = {"TQ2_0", 256, 66, false},   [39] = {"MXFP4", 32, 17, false},
};

const struct mr_type_info *mr_type_info(int type) {
    if (type < 0 || type >= MR_TYPE_COUNT || type_table[type].name == NULL)
        return NULL;
    return &type_table[type];
}

bool mr_type_nbytes(int type, uint64_t n, uint64_t *bytes) {
    const struct mr_type_info *t = mr_type_info(type);
    if (!t || n % t->blck != 0)
        return false;
    return !mr_mul_overflow_u64(n / t->blck, t->type_size, bytes);
}

const char *moerun_type_name(int type) {
    const struct mr_type_info *t = mr_type_info(type);
    return t ? t->name : NULL;
}

int moerun_type_from_name(const char *name) {
    if (!name)
        return mr_err(MOERUN_ERR_INVALID_ARG, "type name is NULL");
    for (int i = 0; i < MR_TYPE_COUNT; i++) {
        if (type_table[i].name && strcasecmp(type_table[i].name, name) == 0)
            return i;
    }
    return mr_err(MOERUN_ERR_UNSUPPORTED, "unknown weight type '%s'", name);
}

int moerun_type_is_supported(int type) {
    const struct mr_type_info *t = mr_type_info(type);
    return t && t->supported;
}
