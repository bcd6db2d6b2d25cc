/* The architectures moerun runs. */
#include "arch.h"

#include <stddef.h>
#include <string.h>

static const struct mr_arch *const archs[] = {
    &mr_arch_llama,
    &mr_arch_qwen2moe,
    &mr_arch_qwen3moe,
    &mr_arch_olmoe,
};

const struct mr_arch *mr_arch_find(const char *name) {
    for (size_t i = 0; i < sizeof(archs) / sizeof(archs[0]); i++) {
        if (strcmp(archs[i]->name, name) == 0)
            return archs[i];
    }
    return NULL;
}
