/* What the constructor (shim.c ksmpreload_start) decides, once, before the shim handles a
 * call: the environment as read, the page size, how memory is marked and which allocator
 * serves the program. Every module reads it; none writes it after the constructor. */
#ifndef KSMPRELOAD_RUNTIME_H
#define KSMPRELOAD_RUNTIME_H

#include <stddef.h>

#include "config.h"

struct ksm_runtime {
    struct ksm_config config;
    size_t page_size;
    int by_prctl;           /* the whole process merges (PR_SET_MEMORY_MERGE): count, never madvise */
    int allocator_is_glibc; /* glibc's malloc: its chunk headers tell where a block lives */
    int caching;            /* freed aligned blocks are kept for reuse (block_cache.c) */
};

extern struct ksm_runtime ksm_runtime;

#endif
