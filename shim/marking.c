#define _GNU_SOURCE
#include "marking.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "glibc_chunks.h"
#include "runtime.h"
#include "stats.h"
#include "sys.h"

static struct ksm_marking setup;

static uintptr_t page_down(uintptr_t address) { return address & ~(uintptr_t)(ksm_runtime.page_size - 1); }
static uintptr_t page_up(uintptr_t address) { return page_down(address + ksm_runtime.page_size - 1); }

void ksm_marking_start(const struct ksm_marking *chosen) { setup = *chosen; }

static void count_madvise_failure(int error)
{
    switch (error) {
    case EINVAL:
        ksm_stat_add(KSM_STAT_madvise_einval, 1);
        break;
    case ENOMEM:
        ksm_stat_add(KSM_STAT_madvise_enomem, 1);
        break;
    case EAGAIN:
        ksm_stat_add(KSM_STAT_madvise_eagain, 1);
        break;
    default:
        ksm_stat_add(KSM_STAT_madvise_other, 1);
        break;
    }
}

/* errno is kept: a failure here is counted, never shown to the program. */
static void madvise_mergeable(uintptr_t start, uintptr_t end)
{
    int saved_errno = errno;
    ksm_stat_add(KSM_STAT_madvise_calls, 1);
    /* The system call: `madvise` would be the shim's own wrapper, which counts the program's calls. */
    if (ksm_sys_madvise((void *)start, end - start, MADV_MERGEABLE) != 0)
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

static void unlock_heap_marks(void) { __atomic_clear(&heap_lock, __ATOMIC_RELEASE); }

static int mark_in_main_heap(uintptr_t start)
{
    uintptr_t top = page_up((uintptr_t)sbrk(0));
    if (!setup.main_heap_start || start < setup.main_heap_start || start >= top)
        return 0;
    lock_heap_marks();
    if (!heap_marked_from || start < heap_marked_from || top != heap_marked_top) {
        /* A moved top may hide a trim and regrowth: mark the whole range again. */
        uintptr_t from = heap_marked_from && heap_marked_from < start ? heap_marked_from : start;
        if (top - ksm_runtime.page_size > from)
            madvise_mergeable(from, top - ksm_runtime.page_size);
        heap_marked_from = from;
        heap_marked_top = top;
    }
    unlock_heap_marks();
    return 1;
}

/* ---- the real layout, from /proc/self/maps ------------------------------ */

struct vma {
    uintptr_t start, end;
    char perms[8];
    int anonymous; /* no file, no name ([heap], [stack] and the like have one) */
};

static int parse_maps_line(const char *line, struct vma *vma)
{
    unsigned long start, end, inode;
    int path_at = 0;
    if (sscanf(line, "%lx-%lx %7s %*s %*s %lu %n", &start, &end, vma->perms, &inode, &path_at) < 4)
        return 0;
    vma->start = start;
    vma->end = end;
    const char *name = line + path_at;
    /* "[anon:NAME]": anonymous memory a program named (glibc 2.40 names its heaps so), but
     * never a stack, whatever names it */
    vma->anonymous = inode == 0 && (*name == '\0' || (strncmp(name, "[anon:", 6) == 0 && !strstr(name, "stack")));
    return 1;
}

/* Calls visit(vma, context) for each mapping in address order, until it returns nonzero.
 * Raw reads into a stack buffer: this runs inside malloc. A line longer than the buffer
 * (a path near PATH_MAX) is visited from its start, a file's, and the rest of it skipped. */
static void for_each_mapping(int (*visit)(const struct vma *, void *), void *context)
{
    int cancel = ksm_cancel_off();
    int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        ksm_cancel_restore(cancel);
        return;
    }
    char buffer[4096];
    size_t held = 0;
    ssize_t got;
    int stop = 0, skipping = 0;
    struct vma vma;
    while (!stop && (got = read(fd, buffer + held, sizeof buffer - 1 - held)) > 0) {
        held += (size_t)got;
        buffer[held] = '\0';
        char *line = buffer, *newline;
        while (!stop && (newline = strchr(line, '\n'))) {
            *newline = '\0';
            stop = !skipping && parse_maps_line(line, &vma) && visit(&vma, context);
            skipping = 0;
            line = newline + 1;
        }
        held = strlen(line);
        if (held == sizeof buffer - 1) {
            stop = stop || (!skipping && parse_maps_line(line, &vma) && visit(&vma, context));
            skipping = 1;
            held = 0;
        }
        memmove(buffer, line, held);
    }
    close(fd);
    ksm_cancel_restore(cancel);
}

static int private_anonymous(const struct vma *vma) { return vma->anonymous && vma->perms[3] == 'p'; }

/* ---- glibc's chunks (glibc_chunks.c says where they live) ------------- */

/* The whole mapping: marking it as one keeps it one VMA, and lets it join its neighbours. */
static void mark_glibc_mapped_chunk(void *ptr)
{
    uintptr_t start;
    size_t length;
    ksm_glibc_chunk_mapping(ptr, &start, &length);
    ksm_region_record(start, length, KSM_REGION_GLIBC_CHUNK, NULL);
    if (!ksm_runtime.by_prctl)
        madvise_mergeable(start, start + length);
}

/* A thread arena's heap is one mapping, aligned to its size, made of the part
 * in use and a PROT_NONE reserve after it. Its size is glibc's choice: 64 MiB
 * on 64 bits, 4 huge pages under GLIBC_TUNABLES=glibc.malloc.hugetlb=2 (glibc
 * 2.35+). So it is read from the maps, never assumed: the mapping that holds
 * the block, with the PROT_NONE mapping right after it, must span a power of
 * two and start at a multiple of it; else the heap is not marked whole. */
struct heap_search {
    uintptr_t block;
    struct vma holding, after;
    int found; /* 1: holding, 2: and the mapping right after it */
};

static int find_holding_mapping(const struct vma *vma, void *context)
{
    struct heap_search *search = context;
    if (search->found == 1) {
        search->after = *vma;
        search->found = vma->start == search->holding.end ? 2 : 1;
        return 1;
    }
    if (search->block >= vma->start && search->block < vma->end) {
        search->holding = *vma;
        search->found = 1;
    }
    return 0;
}

static uintptr_t glibc_heap_size; /* learned from the first heap found */
/* The mapping where the last search found no heap: its blocks skip the search (a hint). */
static uintptr_t no_heap_start, no_heap_end;

static int heap_search_failed(uintptr_t block)
{
    return block >= __atomic_load_n(&no_heap_start, __ATOMIC_RELAXED) &&
           block < __atomic_load_n(&no_heap_end, __ATOMIC_RELAXED);
}

static int no_heap_in(const struct vma *holding)
{
    __atomic_store_n(&no_heap_end, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&no_heap_start, holding->start, __ATOMIC_RELAXED);
    __atomic_store_n(&no_heap_end, holding->end, __ATOMIC_RELAXED);
    return 0;
}

static int find_glibc_heap(uintptr_t block, uintptr_t *start, uintptr_t *size)
{
    struct heap_search search = {.block = block};
    if (heap_search_failed(block))
        return 0;
    for_each_mapping(find_holding_mapping, &search);
    if (!search.found)
        return 0;
    if (!private_anonymous(&search.holding))
        return no_heap_in(&search.holding);
    uintptr_t end = search.holding.end;
    if (search.found == 2 && private_anonymous(&search.after) && strcmp(search.after.perms, "---p") == 0)
        end = search.after.end;
    *start = search.holding.start;
    *size = end - *start;
    if ((*size & (*size - 1)) == 0 && (*start & (*size - 1)) == 0 && *size >= ksm_runtime.page_size)
        return 1;
    return no_heap_in(&search.holding);
}

/* Marked whole, once: the reserve keeps the mark when glibc opens it. */
#define MARKED_HEAPS 256
static uintptr_t marked_heaps[MARKED_HEAPS];

static uintptr_t *heap_seen_slot(uintptr_t heap, uintptr_t size) { return &marked_heaps[(heap / size) % MARKED_HEAPS]; }

/* glibc deletes an empty heap with its own munmap, which the shim never sees, and the next
 * heap often comes back at the same address, unmarked: a remembered heap is marked again
 * at every 32nd block made in a remembered heap (one system call), so a heap that came
 * back is marked, with the blocks already in it, soon after it is used. */
#define REMARK_EVERY 32
static unsigned remembered_hits;

static int remembered_heap(void *ptr)
{
    uintptr_t size = __atomic_load_n(&glibc_heap_size, __ATOMIC_RELAXED);
    uintptr_t heap = (uintptr_t)ptr & ~(size - 1);
    if (!size || __atomic_load_n(heap_seen_slot(heap, size), __ATOMIC_RELAXED) != heap)
        return 0;
    if (!ksm_runtime.by_prctl && __atomic_add_fetch(&remembered_hits, 1, __ATOMIC_RELAXED) % REMARK_EVERY == 0)
        madvise_mergeable(heap, heap + size);
    return 1;
}

static int mark_glibc_arena_heap(void *ptr)
{
    uintptr_t size, heap;
    if (remembered_heap(ptr))
        return 1;
    if (!find_glibc_heap((uintptr_t)ptr, &heap, &size))
        return 0;
    __atomic_store_n(&glibc_heap_size, size, __ATOMIC_RELAXED);
    ksm_region_record(heap, size, KSM_REGION_GLIBC_ARENA, NULL);
    if (!ksm_runtime.by_prctl)
        madvise_mergeable(heap, heap + size);
    __atomic_store_n(heap_seen_slot(heap, size), heap, __ATOMIC_RELAXED);
    return 1;
}

/* 1 when the chunk's whole mapping or heap is handled; 0: mark the block itself. */
static int mark_by_glibc_chunk(void *ptr)
{
    if (ksm_glibc_chunk_is_mapped(ptr)) {
        mark_glibc_mapped_chunk(ptr);
        return 1;
    }
    return ksm_glibc_chunk_in_arena_heap(ptr) && mark_glibc_arena_heap(ptr);
}

/* ---- anything else ----------------------------------------------------- */

/* Each madvise on part of a mapping can split it in three; the kernel caps a
 * process's mappings (vm.max_map_count), so the splits we cause are budgeted. */
static int take_vma_budget(void)
{
    uint64_t left = __atomic_load_n(&setup.vma_budget, __ATOMIC_RELAXED);
    while (left > 0)
        if (__atomic_compare_exchange_n(&setup.vma_budget, &left, left - 1, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            return 1;
    ksm_stat_add(KSM_STAT_vma_budget_skips, 1);
    return 0;
}

/* With threads, a thread's heap blocks are counted in batches: two threads adding to one
 * cache line at every large block cost more than the rest of its bookkeeping (an 8 KiB
 * alloc/free loop on two threads ran 4.5x slower than jemalloc alone, half of it in those
 * two adds). Up to HEAP_BATCH_BLOCKS - 1 blocks and HEAP_BATCH_BYTES of a thread wait. */
#define HEAP_BATCH_BLOCKS 64
#define HEAP_BATCH_BYTES (4u << 20)
static __thread struct {
    uint64_t blocks, bytes;
} heap_batch __attribute__((tls_model("initial-exec")));

static void count_heap_block(size_t size)
{
    if (ksm_stats_single_threaded()) {
        ksm_stat_add(KSM_STAT_heap_regions, 1);
        ksm_stat_add(KSM_STAT_heap_bytes, size);
        return;
    }
    heap_batch.blocks++;
    heap_batch.bytes += size;
    if (heap_batch.blocks < HEAP_BATCH_BLOCKS && heap_batch.bytes < HEAP_BATCH_BYTES)
        return;
    ksm_stat_add(KSM_STAT_heap_regions, heap_batch.blocks);
    ksm_stat_add(KSM_STAT_heap_bytes, heap_batch.bytes);
    heap_batch.blocks = heap_batch.bytes = 0;
}

void ksm_mark_heap_block(void *ptr, size_t size)
{
    ksm_stats_publish_pending();
    count_heap_block(size);
    if (ksm_runtime.by_prctl) { /* nothing to mark: only the region records */
        if (ksm_runtime.allocator_is_glibc)
            mark_by_glibc_chunk(ptr);
        return;
    }
    uintptr_t start = page_up((uintptr_t)ptr), end = page_down((uintptr_t)ptr + size);
    if (end <= start || mark_in_main_heap(start))
        return;
    /* Other allocators (jemalloc) map their memory through the wrapped mmap,
     * which marks whole mappings: a madvise per block would only cost a call. */
    if (!ksm_runtime.allocator_is_glibc || mark_by_glibc_chunk(ptr))
        return;
    if (take_vma_budget()) /* glibc's main arena outside the brk heap */
        madvise_mergeable(start, end);
}

void ksm_mark_extent(void *ptr, size_t len)
{
    ksm_stats_publish_pending();
    ksm_region_record((uintptr_t)ptr, len, KSM_REGION_JEMALLOC_EXTENT, NULL);
    if (!ksm_runtime.by_prctl)
        madvise_mergeable(page_down((uintptr_t)ptr), page_up((uintptr_t)ptr + len));
}

static void mark_mapping_of_kind(void *ptr, size_t len, enum ksm_region_kind kind, const void *caller)
{
    ksm_stats_publish_pending();
    ksm_region_record((uintptr_t)ptr, len, kind, caller);
    ksm_stat_add(KSM_STAT_mmap_regions, 1);
    ksm_stat_add(KSM_STAT_mmap_bytes, len);
    if (!ksm_runtime.by_prctl)
        madvise_mergeable((uintptr_t)ptr, (uintptr_t)ptr + page_up(len));
}

void ksm_mark_mapping(void *ptr, size_t len, const void *caller)
{
    mark_mapping_of_kind(ptr, len, KSM_REGION_MAPPING, caller);
}

/* ---- mappings made before the shim started ------------------------------ */

/* An anonymous private mapping of at least `threshold` bytes is marked, unless
 * it is a file's own memory (the .bss right after a library or program,
 * the shim's included) or a thread stack (right above its PROT_NONE guard). */
struct existing_scan {
    size_t threshold;
    struct vma before;
};

static int belongs_to_neighbour(const struct vma *vma, const struct vma *before)
{
    if (before->end != vma->start)
        return 0;
    return !before->anonymous || (private_anonymous(before) && strcmp(before->perms, "---p") == 0);
}

static int mark_if_program_memory(const struct vma *vma, void *context)
{
    struct existing_scan *scan = context;
    if (private_anonymous(vma) && vma->end - vma->start >= scan->threshold && !belongs_to_neighbour(vma, &scan->before))
        mark_mapping_of_kind((void *)vma->start, vma->end - vma->start, KSM_REGION_AT_START, NULL);
    scan->before = *vma;
    return 0;
}

void ksm_mark_existing_mappings(size_t threshold)
{
    if (ksm_runtime.by_prctl)
        return;
    struct existing_scan scan = {.threshold = threshold};
    for_each_mapping(mark_if_program_memory, &scan);
}

void ksm_marking_after_fork(void)
{
    heap_lock = 0; /* another thread may have held it when the parent forked */
    /* The child's counters start from zero: what the forking thread had waiting was the parent's. */
    heap_batch.blocks = heap_batch.bytes = 0;
}
