/* Host tier: one anonymous region, faulted in at creation, on the NUMA node(s) of the calling
 * thread (hwloc), with huge pages where the system gives them. */
#include "internal.h"
#include "tiers.h"

#include <errno.h>
#include <hwloc.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define HOST_HUGE_PAGE (2u << 20)

struct tier_host {
    void *base;     /* TIER_ALIGN-aligned (page-aligned) */
    uint64_t bytes; /* mapped size: the request rounded up to the page size used */
    char desc[224];
};

static uint64_t round_up(uint64_t x, uint64_t a) {
    return (x + a - 1) / a * a;
}

/* Bind [base, +bytes) to the NUMA node(s) of the calling thread's cpuset before it is touched.
 * Writes what happened into where (never fails: one node or a refusal is only described). */
static void host_bind_numa(void *base, uint64_t bytes, char *where, size_t where_size) {
    hwloc_topology_t topo;
    if (hwloc_topology_init(&topo) != 0) {
        snprintf(where, where_size, "no NUMA binding (hwloc init failed)");
        return;
    }
    hwloc_bitmap_t cpuset = hwloc_bitmap_alloc();
    hwloc_bitmap_t nodeset = hwloc_bitmap_alloc();
    if (!cpuset || !nodeset || hwloc_topology_load(topo) != 0) {
        snprintf(where, where_size, "no NUMA binding (hwloc topology failed)");
        goto out_free;
    }
    int n_nodes = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE);
    if (hwloc_get_cpubind(topo, cpuset, HWLOC_CPUBIND_THREAD) != 0) {
        snprintf(where, where_size, "no NUMA binding (cpu binding unknown: %s)", strerror(errno));
        goto out_free;
    }
    hwloc_cpuset_to_nodeset(topo, cpuset, nodeset);
    char nodes[64];
    hwloc_bitmap_list_snprintf(nodes, sizeof(nodes), nodeset);
    if (n_nodes <= 1) {
        snprintf(where, where_size, "no NUMA binding (one node)");
        goto out_free;
    }
    if (hwloc_set_area_membind(topo, base, (size_t)bytes, nodeset, HWLOC_MEMBIND_BIND,
                               HWLOC_MEMBIND_BYNODESET) != 0) {
        snprintf(where, where_size, "no NUMA binding (node %s refused: %s)", nodes,
                 strerror(errno));
        goto out_free;
    }
    snprintf(where, where_size, "%s %s", hwloc_bitmap_weight(nodeset) > 1 ? "nodes" : "node",
             nodes);
out_free:
    hwloc_bitmap_free(nodeset);
    hwloc_bitmap_free(cpuset);
    hwloc_topology_destroy(topo);
}

/* Fault every page in now (MADV_POPULATE_WRITE where the kernel has it, else a write per
 * page), after any binding so the pages land on the chosen node. */
static void host_populate(void *base, uint64_t bytes, uint64_t page) {
#ifdef MADV_POPULATE_WRITE
    if (madvise(base, (size_t)bytes, MADV_POPULATE_WRITE) == 0)
        return;
#endif
    volatile unsigned char *p = base;
    for (uint64_t off = 0; off < bytes; off += page)
        p[off] = 0;
}

int tier_host_create(const struct tier_host_params *p, struct tier_host **out) {
    if (!p || !out || p->bytes == 0)
        return mr_err(MOERUN_ERR_INVALID_ARG, "host tier: no parameters or a size of 0");
    *out = NULL;
    long sys_page = sysconf(_SC_PAGESIZE);
    uint64_t page = sys_page > 0 ? (uint64_t)sys_page : TIER_ALIGN;
    if (page < TIER_ALIGN)
        page = TIER_ALIGN;
    if (p->bytes > UINT64_MAX - HOST_HUGE_PAGE || p->bytes > (uint64_t)SIZE_MAX / 2)
        return mr_err(MOERUN_ERR_NOMEM, "host tier: %llu bytes is too large",
                      (unsigned long long)p->bytes);

    struct tier_host *h = mr_calloc(NULL, 1, sizeof(*h));
    if (!h)
        return mr_err(MOERUN_ERR_NOMEM, "host tier: out of memory for its handle");

    const char *pages = "4 KiB pages";
    void *base = MAP_FAILED;
    uint64_t bytes = 0;
#ifdef MAP_HUGETLB
    if (p->huge_pages) {
        bytes = round_up(p->bytes, HOST_HUGE_PAGE);
        base = mmap(NULL, (size_t)bytes, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
        if (base != MAP_FAILED)
            pages = "2 MiB pages";
    }
#endif
    if (base == MAP_FAILED) {
        bytes = round_up(p->bytes, page);
        base =
            mmap(NULL, (size_t)bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (base == MAP_FAILED) {
            int e = errno;
            mr_free(NULL, h);
            return mr_err(MOERUN_ERR_NOMEM, "host tier: mmap of %llu bytes failed: %s",
                          (unsigned long long)bytes, strerror(e));
        }
#ifdef MADV_HUGEPAGE
        if (p->huge_pages && madvise(base, (size_t)bytes, MADV_HUGEPAGE) == 0)
            pages = "transparent huge pages";
#endif
    }

    char where[160];
    if (p->bind_numa)
        host_bind_numa(base, bytes, where, sizeof(where));
    else
        snprintf(where, sizeof(where), "no NUMA binding");
    host_populate(base, bytes, page);

    h->base = base;
    h->bytes = bytes;
    snprintf(h->desc, sizeof(h->desc), "%s, %s", where, pages);
    *out = h;
    return MOERUN_OK;
}

void tier_host_destroy(struct tier_host *h) {
    if (!h)
        return;
    munmap(h->base, (size_t)h->bytes);
    mr_free(NULL, h);
}

void *tier_host_base(const struct tier_host *h) {
    return h->base;
}

uint64_t tier_host_bytes(const struct tier_host *h) {
    return h->bytes;
}

const char *tier_host_describe(const struct tier_host *h) {
    return h->desc;
}
