#define _GNU_SOURCE
#include "marking.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "stats.h"

static struct ksm_marking setup = {.page_size = 4096};

static uintptr_t page_down(uintptr_t address) { return address & ~(uintptr_t)(setup.page_size - 1); }
static uintptr_t page_up(uintptr_t address) { return page_down(address + setup.page_size - 1); }

void ksm_marking_start(const struct ksm_marking *chosen)
{
    setup = *chosen;
}

static void count_madvise_failure(int error)
{
    switch (error) {
    case EINVAL: ksm_stat_add(KSM_STAT_madvise_einval, 1); break;
    case ENOMEM: ksm_stat_add(KSM_STAT_madvise_enomem, 1); break;
    case EAGAIN: ksm_stat_add(KSM_STAT_madvise_eagain, 1); break;
    default: ksm_stat_add(KSM_STAT_madvise_other, 1); break;
    }
}

/* errno is kept: a failure here is counted, never shown to the program. */
static void madvise_mergeable(uintptr_t start, uintptr_t end)
{
    int saved_errno = errno;
    ksm_stat_add(KSM_STAT_madvise_calls, 1);
    /* The system call: `madvise` would be the shim's own wrapper, which counts the program's calls. */
    if (syscall(SYS_madvise, (void *)start, end - start, MADV_MERGEABLE) != 0)
        count_madvise_failure(errno);
    errno = saved_errno;
}

/* ---- the brk heap ------------------------------------------------------ */

/* Marking one block at a time would split the brk heap into a VMA per block.
 * Instead the heap is marked from the lowest large block up to one page below
 * its top. The top page stays unmarked on purpose: brk then grows that
 * unmarked VMA in place, and the next marking joins the grown part to the
 * marked VMA below it (they came from one VMA and share its anon_vma). Marked
 * up to the top, each growth of the heap would become a VMA of its own. So the
 * heap keeps three VMAs: unmarked, marked, the unmarked top page. The marked
 * range is remembered: a block inside it costs no system call while the top
 * has not moved. */
static uintptr_t heap_marked_from, heap_marked_top;
static int heap_lock;

static void lock_heap_marks(void)
{
    while (__atomic_test_and_set(&heap_lock, __ATOMIC_ACQUIRE))
        ;
}

static void unlock_heap_marks(void)
{
    __atomic_clear(&heap_lock, __ATOMIC_RELEASE);
}

static int mark_in_main_heap(uintptr_t start)
{
    uintptr_t top = page_up((uintptr_t)sbrk(0));
    if (!setup.main_heap_start || start < setup.main_heap_start || start >= top)
        return 0;
    lock_heap_marks();
    if (!heap_marked_from || start < heap_marked_from || top != heap_marked_top) {
        /* A moved top may hide a trim and regrowth: mark the whole range again. */
        uintptr_t from = heap_marked_from && heap_marked_from < start ? heap_marked_from : start;
        if (top - setup.page_size > from)
            madvise_mergeable(from, top - setup.page_size);
        heap_marked_from = from;
        heap_marked_top = top;
    }
    unlock_heap_marks();
    return 1;
}

/* ---- glibc's chunks ---------------------------------------------------- */

/* glibc keeps two size_t words before each block: prev_size, then the size
 * with flag bits. A chunk of its own mapping (IS_MMAPPED) records in prev_size
 * how far into the mapping it starts; a chunk of a thread's arena
 * (NON_MAIN_ARENA) lives in a heap that starts at a multiple of HEAP_MAX. This
 * layout has not changed since glibc 2.3 (malloc/malloc.c, arena.c). */
#define GLIBC_IS_MMAPPED 0x2
#define GLIBC_NON_MAIN_ARENA 0x4
#define GLIBC_SIZE_BITS 0x7
#define GLIBC_HEAP_MAX ((uintptr_t)2 * 4 * 1024 * 1024 * sizeof(long))

static size_t glibc_word_before(const void *ptr, int words)
{
    size_t word;
    memcpy(&word, (const char *)ptr - words * sizeof(size_t), sizeof word);
    return word;
}

/* The whole mapping: marking it as one keeps it one VMA, and lets it join its neighbours. */
static void mark_glibc_mapped_chunk(void *ptr)
{
    uintptr_t chunk = (uintptr_t)ptr - 2 * sizeof(size_t);
    size_t offset = glibc_word_before(ptr, 2), size = glibc_word_before(ptr, 1) & ~(size_t)GLIBC_SIZE_BITS;
    ksm_region_record(chunk - offset, offset + size, KSM_REGION_GLIBC_CHUNK, NULL);
    if (!setup.by_prctl)
        madvise_mergeable(chunk - offset, chunk + size);
}

/* A thread arena's heap is marked whole, once: the parts it has not grown
 * into yet are PROT_NONE and keep the mark when glibc opens them. */
#define MARKED_HEAPS 256
static uintptr_t marked_heaps[MARKED_HEAPS];

static void mark_glibc_arena_heap(void *ptr)
{
    uintptr_t heap = (uintptr_t)ptr & ~(GLIBC_HEAP_MAX - 1);
    uintptr_t *seen = &marked_heaps[(heap / GLIBC_HEAP_MAX) % MARKED_HEAPS];
    if (__atomic_load_n(seen, __ATOMIC_RELAXED) == heap)
        return;
    ksm_region_record(heap, GLIBC_HEAP_MAX, KSM_REGION_GLIBC_ARENA, NULL);
    if (!setup.by_prctl)
        madvise_mergeable(heap, heap + GLIBC_HEAP_MAX);
    __atomic_store_n(seen, heap, __ATOMIC_RELAXED);
}

/* What glibc's malloc(size) would have given: a heap chunk of size + 8 bytes
 * rounded to 16 (32 at least), or a mapping of it rounded to pages. */
static size_t glibc_unaligned_usable(void *ptr, size_t size)
{
    size_t chunk = (size + sizeof(size_t) + 15) & ~(size_t)15;
    chunk = chunk < 32 ? 32 : chunk;
    if (glibc_word_before(ptr, 1) & GLIBC_IS_MMAPPED)
        return page_up(chunk + sizeof(size_t)) - 2 * sizeof(size_t);
    return chunk - sizeof(size_t);
}

size_t ksm_glibc_padding(void *ptr, size_t size, size_t usable)
{
    size_t unaligned = glibc_unaligned_usable(ptr, size);
    return usable > unaligned ? usable - unaligned : 0;
}

static int mark_by_glibc_chunk(void *ptr)
{
    size_t size_word = glibc_word_before(ptr, 1);
    if (size_word & GLIBC_IS_MMAPPED)
        mark_glibc_mapped_chunk(ptr);
    else if (size_word & GLIBC_NON_MAIN_ARENA)
        mark_glibc_arena_heap(ptr);
    else
        return 0;
    return 1;
}

/* ---- anything else ----------------------------------------------------- */

/* Each madvise on part of a mapping can split it in three; the kernel caps a
 * process's mappings (vm.max_map_count), so the splits we cause are budgeted. */
static int take_vma_budget(void)
{
    uint64_t left = __atomic_load_n(&setup.vma_budget, __ATOMIC_RELAXED);
    while (left > 0)
        if (__atomic_compare_exchange_n(&setup.vma_budget, &left, left - 1, 0, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED))
            return 1;
    ksm_stat_add(KSM_STAT_vma_budget_skips, 1);
    return 0;
}

void ksm_mark_heap_block(void *ptr, size_t size)
{
    ksm_stats_publish_pending();
    ksm_stat_add(KSM_STAT_heap_regions, 1);
    ksm_stat_add(KSM_STAT_heap_bytes, size);
    if (setup.by_prctl) { /* nothing to mark: only the region records */
        if (setup.glibc_chunks)
            mark_by_glibc_chunk(ptr);
        return;
    }
    uintptr_t start = page_up((uintptr_t)ptr), end = page_down((uintptr_t)ptr + size);
    if (end <= start || mark_in_main_heap(start))
        return;
    /* Other allocators (jemalloc) map their memory through the wrapped mmap,
     * which marks whole mappings: a madvise per block would only cost a call. */
    if (!setup.glibc_chunks || mark_by_glibc_chunk(ptr))
        return;
    if (take_vma_budget()) /* glibc's main arena outside the brk heap */
        madvise_mergeable(start, end);
}

void ksm_mark_extent(void *ptr, size_t len)
{
    ksm_stats_publish_pending();
    ksm_region_record((uintptr_t)ptr, len, KSM_REGION_JEMALLOC_EXTENT, NULL);
    if (!setup.by_prctl)
        madvise_mergeable(page_down((uintptr_t)ptr), page_up((uintptr_t)ptr + len));
}

static void mark_mapping_of_kind(void *ptr, size_t len, enum ksm_region_kind kind, const void *caller)
{
    ksm_stats_publish_pending();
    ksm_region_record((uintptr_t)ptr, len, kind, caller);
    ksm_stat_add(KSM_STAT_mmap_regions, 1);
    ksm_stat_add(KSM_STAT_mmap_bytes, len);
    if (!setup.by_prctl)
        madvise_mergeable((uintptr_t)ptr, (uintptr_t)ptr + page_up(len));
}

void ksm_mark_mapping(void *ptr, size_t len, const void *caller)
{
    mark_mapping_of_kind(ptr, len, KSM_REGION_MAPPING, caller);
}

/* ---- mappings made before the shim started ------------------------------ */

/* One line of /proc/self/maps ("start-end perms offset device inode [path]"):
 * an anonymous private mapping (inode 0, no path) of at least `threshold`
 * bytes is marked. */
static void mark_if_anonymous_private(const char *line, size_t threshold)
{
    unsigned long start, stop, inode;
    char perms[8];
    int path_at = 0;
    if (sscanf(line, "%lx-%lx %7s %*s %*s %lu %n", &start, &stop, perms, &inode, &path_at) < 4)
        return;
    if (perms[3] == 'p' && inode == 0 && line[path_at] == '\0' && stop - start >= threshold)
        mark_mapping_of_kind((void *)start, stop - start, KSM_REGION_AT_START, NULL);
}

void ksm_mark_existing_mappings(size_t threshold)
{
    if (setup.by_prctl)
        return;
    int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    char buffer[4096];
    size_t held = 0;
    ssize_t got;
    while ((got = read(fd, buffer + held, sizeof buffer - 1 - held)) > 0) {
        held += (size_t)got;
        buffer[held] = '\0';
        char *line = buffer, *newline;
        while ((newline = strchr(line, '\n'))) {
            *newline = '\0';
            mark_if_anonymous_private(line, threshold);
            line = newline + 1;
        }
        held = strlen(line);
        memmove(buffer, line, held);
    }
    close(fd);
}

void ksm_marking_after_fork(void)
{
    heap_lock = 0; /* another thread may have held it when the parent forked */
}
