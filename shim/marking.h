/* Where the shim marks memory MADV_MERGEABLE, and how it keeps the number of
 * VMAs it causes bounded. With prctl(PR_SET_MEMORY_MERGE) the kernel marks
 * everything and these only count. */
#ifndef KSMPRELOAD_MARKING_H
#define KSMPRELOAD_MARKING_H

#include <stddef.h>
#include <stdint.h>

/* What marking needs besides the runtime (runtime.h: page size, prctl, glibc). */
struct ksm_marking {
    uintptr_t main_heap_start; /* start_brk */
    uint64_t vma_budget;       /* madvise calls that may split a mapping */
};

void ksm_marking_start(const struct ksm_marking *setup);
/* A large heap block the allocator returned (usable: its usable size). */
void ksm_mark_heap_block(void *ptr, size_t size);
/* A large anonymous private mapping the program (or its allocator) made; caller: who called mmap. */
void ksm_mark_mapping(void *ptr, size_t len, const void *caller);
/* An extent jemalloc's hooks found that no other path marked. */
void ksm_mark_extent(void *ptr, size_t len);
/* Large anonymous mappings made before the shim started (an allocator's constructor). */
void ksm_mark_existing_mappings(size_t threshold);
void ksm_marking_after_fork(void);

#endif
