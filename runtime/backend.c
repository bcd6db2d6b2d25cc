/* The backend interface's entry points: pick the implementation for a configuration. */
#include "backend.h"
#include "internal.h"

int mr_backend_create(const struct mr_backend_config *cfg, struct mr_backend **out) {
    if (!out)
        return mr_err(MOERUN_ERR_INVALID_ARG, "mr_backend_create: out is NULL");
    *out = NULL;
    if (!cfg)
        return mr_err(MOERUN_ERR_INVALID_ARG, "mr_backend_create: no configuration");
    int rc;
    switch (cfg->kind) {
    case MR_BACKEND_CPU:
        rc = mr_backend_cpu_create(cfg, out);
        break;
    case MR_BACKEND_SIM:
        rc = mr_backend_sim_create(cfg, out);
        break;
    case MR_BACKEND_CUDA:
#ifdef MOERUN_HAVE_CUDA
        rc = mr_backend_cuda_create(cfg, out);
        break;
#else
        return mr_err(MOERUN_ERR_UNSUPPORTED,
                      "this build has no CUDA backend (configure with MOERUN_CUDA=ON)");
#endif
    default:
        return mr_err(MOERUN_ERR_INVALID_ARG, "mr_backend_create: unknown backend kind %d",
                      (int)cfg->kind);
    }
    if (rc != MOERUN_OK)
        return rc;
    const struct mr_backend_ops *ops = (*out)->ops;
    if (ops->version != MR_BACKEND_VERSION) {
        mr_err(MOERUN_ERR_INTERNAL, "backend %s: ops table version %u, this build needs %u",
               ops->name, ops->version, MR_BACKEND_VERSION);
        ops->destroy(*out);
        *out = NULL;
        return MOERUN_ERR_INTERNAL;
    }
    return MOERUN_OK;
}

void mr_backend_destroy(struct mr_backend *be) {
    if (be)
        be->ops->destroy(be);
}
