/* A small cache of freed page-aligned blocks, one per thread, so that an alloc/free loop of
 * aligned blocks costs what the program's allocator costs (block_cache.c). Bounded: blocks of
 * KSM_CACHE_MAX_BLOCK bytes at most, KSM_CACHE_SLOTS blocks and KSM_CACHE_THREAD_BYTES a
 * thread, KSM_CACHE_PROCESS_BYTES in all; counted (cached_blocks, cached_bytes); given back to
 * the allocator when unused (KSM_CACHE_IDLE_MISSES requests in a row that it could not serve)
 * and when the thread exits. */
#ifndef KSMPRELOAD_BLOCK_CACHE_H
#define KSMPRELOAD_BLOCK_CACHE_H

#include <stddef.h>

#define KSM_CACHE_SLOTS 4
#define KSM_CACHE_MAX_BLOCK ((size_t)256 * 1024)
#define KSM_CACHE_THREAD_BYTES ((size_t)1024 * 1024)
#define KSM_CACHE_PROCESS_BYTES ((size_t)8 * 1024 * 1024)
#define KSM_CACHE_IDLE_MISSES 32

/* Blocks of `threshold` usable bytes or more are kept (smaller ones serve no large request);
 * release hands a block back to the allocator (free, as the program's would). */
void ksm_cache_start(size_t page_size, size_t threshold, void (*release)(void *block));
/* A cached block with room for `size` bytes (and not much more), taken out, and its usable
 * size; else NULL. */
void *ksm_cache_take(size_t size, size_t *usable);
/* Keeps a freed page-aligned block of `usable` bytes; 0 when the caller must free it. A block
 * freed twice is handed back to the allocator once, and the caller's free is its second. */
int ksm_cache_keep(void *block, size_t usable);

#endif
