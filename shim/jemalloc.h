/* What the shim does when the program's malloc is jemalloc (shared, unprefixed:
 * Debian's libjemalloc.so.2, linked or preloaded). */
#ifndef KSMPRELOAD_JEMALLOC_H
#define KSMPRELOAD_JEMALLOC_H

#include <stddef.h>

/* Finds jemalloc's rallocx and mallctl when they come from the same object as
 * `real_malloc`; installs the extent hooks when `hooks` is set. */
void ksm_jemalloc_start(void *real_malloc, size_t threshold, int hooks);
/* 1 when the program's malloc is jemalloc. */
int ksm_jemalloc_found(void);
/* realloc that keeps the block page-aligned, in place when jemalloc can; NULL
 * on failure, the old block intact. Only when ksm_jemalloc_found(). */
void *ksm_jemalloc_realloc_aligned(void *old, size_t size);
/* A zeroed page-aligned block (mallocx); only when ksm_jemalloc_found(). */
void *ksm_jemalloc_zalloc_aligned(size_t size);
/* Bytes of `usable` beyond what jemalloc gives malloc(size) (nallocx). */
size_t ksm_jemalloc_padding(size_t size, size_t usable);
/* The mmap wrapper tells which mapping it just handled in this thread, so
 * the hooks can count extents it never saw. */
void ksm_jemalloc_saw_mapping(void *ptr, size_t len);

#endif
