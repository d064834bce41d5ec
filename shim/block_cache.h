/* A small cache of freed page-aligned blocks, one per thread, so that an alloc/free loop of
 * aligned blocks costs what the program's allocator costs (block_cache.c). A thread keeps
 * blocks only while its requests are of the sizes it frees. Bounded: blocks of
 * KSM_CACHE_MAX_BLOCK bytes at most, KSM_CACHE_SLOTS blocks and KSM_CACHE_THREAD_BYTES a
 * thread, KSM_CACHE_PROCESS_BYTES in all; counted (cached_blocks, cached_bytes); given back to
 * the allocator when unused (KSM_CACHE_IDLE_MISSES requests in a row that it could not serve)
 * and when the thread exits. */
#ifndef KSMPRELOAD_BLOCK_CACHE_H
#define KSMPRELOAD_BLOCK_CACHE_H

#include <stddef.h>

#define KSM_CACHE_SLOTS 4
#define KSM_CACHE_MAX_BLOCK ((size_t)512 * 1024)
#define KSM_CACHE_THREAD_BYTES ((size_t)1024 * 1024)
#define KSM_CACHE_PROCESS_BYTES ((size_t)8 * 1024 * 1024)
#define KSM_CACHE_IDLE_MISSES 32

struct ksm_cache_calls {
    void (*release)(void *block);         /* hands a block back to the allocator, as free would */
    int (*pins_free_memory)(void *block); /* keeping it would keep free memory from the system (or NULL) */
};

/* Blocks of `threshold` usable bytes or more are kept (smaller ones serve no large request). */
void ksm_cache_start(size_t threshold, const struct ksm_cache_calls *calls);
/* A cached block with room for `size` bytes and `most` usable bytes at most, taken out, and
 * its usable size; else NULL. */
void *ksm_cache_take(size_t size, size_t most, size_t *usable);
/* Keeps a freed page-aligned block of `usable` bytes that the shim made (`made`: the program's
 * own blocks, of a jemalloc arena or mimalloc heap it may destroy, are never kept); 0 when the
 * caller must free it. A block freed twice on its thread is handed back to the allocator once,
 * and the caller's free is its second; freed again on another thread while kept, the process
 * aborts, as glibc's would. */
int ksm_cache_keep(void *block, size_t usable, int made);

#endif
