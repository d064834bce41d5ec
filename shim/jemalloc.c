/* jemalloc inside the target: an aligned realloc that avoids the shim's own
 * copies, and (measurement mode, KSMPRELOAD_JEMALLOC_HOOKS=1) extent hooks on
 * every automatic arena that count the extents jemalloc makes and mark any the
 * mmap wrapper did not see. docs/BENCHMARKS.md says why the mmap path stays
 * the default. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "jemalloc.h"
#include "marking.h"
#include "runtime.h"
#include "stats.h"

typedef void *(*rallocx_fn)(void *ptr, size_t size, int flags);
typedef void *(*mallocx_fn)(size_t size, int flags);
#define MALLOCX_ZERO 0x40 /* jemalloc.h: zeroed, and jemalloc knows which pages already are */
typedef size_t (*nallocx_fn)(size_t size, int flags);
typedef int (*mallctl_fn)(const char *name, void *old, size_t *old_len, void *new_value, size_t new_len);

/* jemalloc's extent_hooks_t (stable since 5.0): nine function pointers, of
 * which the shim replaces alloc and commit and passes the others through. */
typedef void *(*extent_alloc_fn)(void *hooks, void *new_addr, size_t size, size_t alignment, bool *zero, bool *commit,
                                 unsigned arena_ind);
typedef bool (*extent_commit_fn)(void *hooks, void *addr, size_t size, size_t offset, size_t length,
                                 unsigned arena_ind);
struct extent_hooks {
    extent_alloc_fn alloc;
    void *dalloc, *destroy;
    extent_commit_fn commit;
    void *decommit, *purge_lazy, *purge_forced, *split, *merge;
};

static rallocx_fn real_rallocx;
static mallocx_fn real_mallocx;
static nallocx_fn real_nallocx;
static mallctl_fn real_mallctl;
static int lg_page_flag;
static size_t extent_threshold;
static struct extent_hooks *default_hooks;
static struct extent_hooks counting_hooks;

static __thread uintptr_t seen_start __attribute__((tls_model("initial-exec")));
static __thread uintptr_t seen_end __attribute__((tls_model("initial-exec")));

void ksm_jemalloc_saw_mapping(void *ptr, size_t len)
{
    seen_start = (uintptr_t)ptr;
    seen_end = (uintptr_t)ptr + len;
}

static int seen_by_mmap_wrapper(const void *ptr, size_t size)
{
    return (uintptr_t)ptr >= seen_start && (uintptr_t)ptr + size <= seen_end;
}

static void *counting_alloc(void *hooks, void *new_addr, size_t size, size_t alignment, bool *zero, bool *commit,
                            unsigned arena_ind)
{
    (void)hooks;
    void *ptr = default_hooks->alloc(default_hooks, new_addr, size, alignment, zero, commit, arena_ind);
    if (!ptr || size < extent_threshold)
        return ptr;
    ksm_stat_add(KSM_STAT_hook_extents, 1);
    ksm_stat_add(KSM_STAT_hook_bytes, size);
    if (!seen_by_mmap_wrapper(ptr, size)) {
        ksm_stat_add(KSM_STAT_hook_unseen_extents, 1);
        ksm_stat_add(KSM_STAT_hook_unseen_bytes, size);
        ksm_mark_extent(ptr, size);
    }
    return ptr;
}

/* A decommitted range (mmap PROT_NONE over it, when the system does not
 * overcommit) comes back as a new mapping without the mergeable flag. */
static bool counting_commit(void *hooks, void *addr, size_t size, size_t offset, size_t length, unsigned arena_ind)
{
    (void)hooks;
    bool failed = default_hooks->commit(default_hooks, addr, size, offset, length, arena_ind);
    if (!failed && size >= extent_threshold) {
        ksm_stat_add(KSM_STAT_hook_recommits, 1);
        if (!ksm_runtime.by_prctl)
            ksm_mark_extent((char *)addr + offset, length);
    }
    return failed;
}

static int arena_hooks(unsigned arena, struct extent_hooks **old, struct extent_hooks *new_hooks)
{
    char name[64];
    snprintf(name, sizeof name, "arena.%u.extent_hooks", arena);
    size_t old_len = sizeof *old;
    return real_mallctl(name, old, &old_len, new_hooks ? &new_hooks : NULL, new_hooks ? sizeof new_hooks : 0);
}

/* Every automatic arena, created now if it was not yet; arenas the program
 * gave hooks of its own keep them. */
static void install_counting_hooks(void)
{
    unsigned narenas = 0;
    size_t len = sizeof narenas;
    if (real_mallctl("opt.narenas", &narenas, &len, NULL, 0) != 0 || arena_hooks(0, &default_hooks, NULL) != 0)
        return;
    counting_hooks = *default_hooks;
    counting_hooks.alloc = counting_alloc;
    if (default_hooks->commit)
        counting_hooks.commit = counting_commit;
    for (unsigned arena = 0; arena < narenas; arena++) {
        struct extent_hooks *old = NULL;
        if (arena_hooks(arena, &old, NULL) == 0 && old == default_hooks &&
            arena_hooks(arena, &old, &counting_hooks) == 0)
            ksm_stat_add(KSM_STAT_hook_arenas, 1);
    }
}

static int same_object(void *a, void *b)
{
    Dl_info info_a, info_b;
    return a && b && dladdr(a, &info_a) && dladdr(b, &info_b) && info_a.dli_fbase == info_b.dli_fbase;
}

void ksm_jemalloc_start(void *real_malloc, size_t threshold, int hooks)
{
    void *rallocx = dlsym(RTLD_NEXT, "rallocx");
    void *mallctl = dlsym(RTLD_NEXT, "mallctl");
    void *nallocx = dlsym(RTLD_NEXT, "nallocx");
    void *mallocx = dlsym(RTLD_NEXT, "mallocx");
    if (!same_object(real_malloc, rallocx) || !same_object(real_malloc, mallctl) ||
        !same_object(real_malloc, nallocx) || !same_object(real_malloc, mallocx))
        return;
    real_mallocx = (mallocx_fn)mallocx;
    real_nallocx = (nallocx_fn)nallocx;
    lg_page_flag = __builtin_ctzl(ksm_runtime.page_size); /* MALLOCX_LG_ALIGN(log2 page) */
    extent_threshold = threshold;
    real_mallctl = (mallctl_fn)mallctl;
    __atomic_store_n(&real_rallocx, (rallocx_fn)rallocx, __ATOMIC_RELEASE);
    if (hooks)
        install_counting_hooks();
}

int ksm_jemalloc_found(void) { return __atomic_load_n(&real_rallocx, __ATOMIC_ACQUIRE) != NULL; }

void *ksm_jemalloc_realloc_aligned(void *old, size_t size) { return real_rallocx(old, size, lg_page_flag); }

void *ksm_jemalloc_zalloc_aligned(size_t size) { return real_mallocx(size, lg_page_flag | MALLOCX_ZERO); }

size_t ksm_jemalloc_padding(size_t size, size_t usable)
{
    size_t unaligned = real_nallocx(size, 0);
    return unaligned && usable > unaligned ? usable - unaligned : 0;
}
