/* Counters the shim keeps, readable from outside the process.
 * File format (docs/COUNTERS.md): "KSMPRLD1", u64 slot count, the u64 slots,
 * then the slot names, each NUL-terminated, in slot order. Little-endian. */
#ifndef KSMPRELOAD_STATS_H
#define KSMPRELOAD_STATS_H

#include <stdint.h>

#define KSM_STAT_SLOTS(X)                                                                                              \
    X(pid)       /* process that writes this file */                                                                   \
    X(strategy)  /* 1 prctl, 2 madvise */                                                                              \
    X(threshold) /* bytes: allocations and mappings this large are handled */                                          \
    X(align)     /* 1 when large heap blocks are page-aligned */                                                       \
    X(page_size)                                                                                                       \
    X(heap_regions) /* large heap blocks made mergeable (cumulative) */                                                \
    X(heap_bytes)                                                                                                      \
    X(mmap_regions) /* large anonymous private mappings made mergeable */                                              \
    X(mmap_bytes)                                                                                                      \
    X(padding_bytes)  /* gauge: usable bytes that alignment adds to live blocks */                                     \
    X(realloc_copies) /* reallocs the shim moved to a page-aligned block */                                            \
    X(madvise_calls)                                                                                                   \
    X(madvise_einval) /* failures by errno: never shown to the program */                                              \
    X(madvise_enomem)                                                                                                  \
    X(madvise_eagain)                                                                                                  \
    X(madvise_other)                                                                                                   \
    X(vma_budget_skips)            /* blocks left unmarked to keep the VMA count bounded */                            \
    X(unmapped_bytes)              /* bytes given back by munmap calls at or above the threshold */                    \
    X(program_madvise_mergeable)   /* madvise(MADV_MERGEABLE) calls the program made itself */                         \
    X(program_madvise_einval)      /* ... that failed with EINVAL (an address not page-aligned) */                     \
    X(program_madvise_failed)      /* ... that failed otherwise */                                                     \
    X(program_madvise_unmergeable) /* madvise(MADV_UNMERGEABLE) calls of the program that succeeded */                 \
    X(program_unmerged_bytes)      /* ... and the bytes they unmarked */                                               \
    X(hook_arenas)                 /* jemalloc arenas given the counting extent hooks (KSMPRELOAD_JEMALLOC_HOOKS=1) */ \
    X(hook_extents)                /* extents at or above the threshold that jemalloc allocated through them */        \
    X(hook_bytes)                                                                                                      \
    X(hook_unseen_extents) /* of those, extents the mmap wrapper had not seen */                                       \
    X(hook_unseen_bytes)                                                                                               \
    X(hook_recommits)      /* commits of decommitted ranges in such extents, marked again */                           \
    X(padded_blocks)       /* gauge: live blocks whose alignment costs padding */                                      \
    X(padding_table_bytes) /* gauge: memory of the table that keeps their padding */                                   \
    X(cached_blocks)       /* gauge: freed aligned blocks kept for reuse (block_cache.c) */                            \
    X(cached_bytes)        /* gauge: their usable bytes */                                                             \
    X(cache_hits)          /* blocks the cache handed out again (cumulative) */

enum ksm_stat_slot {
#define KSM_STAT_ENUM(name) KSM_STAT_##name,
    KSM_STAT_SLOTS(KSM_STAT_ENUM)
#undef KSM_STAT_ENUM
        KSM_STAT_COUNT
};

/* Where counters are written: private memory, or the slots and records of the mapped
 * file. Once there is a file it lives in a page marked MADV_WIPEONFORK, so that a child
 * made by fork, _Fork or clone (no atfork handler runs for the last two) reads NULL here
 * and takes counters of its own before it writes anything. */
struct ksm_stats_home {
    uint64_t *slots;
    struct ksm_region_table *regions;
};
extern struct ksm_stats_home *ksm_stats_home;
uint64_t *ksm_stats_in_fork_child(void) __attribute__((cold, noinline));

static inline uint64_t *ksm_stats_slots(void)
{
    struct ksm_stats_home *home = __atomic_load_n(&ksm_stats_home, __ATOMIC_ACQUIRE);
    uint64_t *slots = __atomic_load_n(&home->slots, __ATOMIC_ACQUIRE);
    return __builtin_expect(slots != 0, 1) ? slots : ksm_stats_in_fork_child();
}

/* glibc's own flag (2.32+): no second thread was ever created. A weak reference, so that a
 * C library without it leaves the address NULL and every add is atomic. */
extern char __libc_single_threaded __attribute__((weak));

static inline int ksm_stats_single_threaded(void) { return &__libc_single_threaded && __libc_single_threaded; }

/* While the process has one thread, a plain add: an atomic one costs as much as the rest of
 * a large allocation's bookkeeping. Each slot is one aligned word, read whole by the tools. */
static inline void ksm_stat_add(enum ksm_stat_slot slot, uint64_t value)
{
    uint64_t *counter = &ksm_stats_slots()[slot];
    if (ksm_stats_single_threaded())
        __atomic_store_n(counter, __atomic_load_n(counter, __ATOMIC_RELAXED) + value, __ATOMIC_RELAXED);
    else
        __atomic_fetch_add(counter, value, __ATOMIC_RELAXED);
}

static inline void ksm_stat_set(enum ksm_stat_slot slot, uint64_t value)
{
    __atomic_store_n(&ksm_stats_slots()[slot], value, __ATOMIC_RELAXED);
}

/* Regions the shim handled, so that tools can say what made a mapping. The
 * file keeps the last KSM_REGION_CAPACITY records after the slot names
 * (docs/COUNTERS.md); a record may outlive its region. */
enum ksm_region_kind {
    KSM_REGION_MAPPING = 1,    /* an mmap the wrapper saw; caller: the code that called mmap */
    KSM_REGION_AT_START,       /* an anonymous mapping made before the shim started */
    KSM_REGION_GLIBC_CHUNK,    /* a glibc chunk with a mapping of its own (large malloc) */
    KSM_REGION_GLIBC_ARENA,    /* a glibc thread arena's heap (64 MiB, or as glibc's tunables size it) */
    KSM_REGION_JEMALLOC_EXTENT /* an extent jemalloc's hooks saw and the mmap wrapper did not */
};
#define KSM_REGION_CAPACITY 4096

void ksm_region_record(uintptr_t start, uint64_t length, enum ksm_region_kind kind, const void *caller);

/* Counters go to <dir>/<pid>.stats at the process's first large event. dir: absolute, no
 * symlink in it, of the process's euid and writable by it alone (its last component is
 * made, mode 0700, when missing); otherwise, or "off", they stay private (verbose: one line
 * on stderr says why). */
void ksm_stats_publish(const char *dir, int verbose);
/* Called on the slow paths: creates the file on the process's first large event. */
void ksm_stats_publish_pending(void);
/* Removes the file this process created, if its name still holds it. */
void ksm_stats_unpublish(void);

#endif
