/* glibc's malloc chunks: their layout, its dynamic mmap threshold, and page-aligned
 * blocks made the way its own memalign makes them, without the small remainders that
 * memalign leaves behind (glibc_chunks.c). Used only when the allocator is glibc. */
#ifndef KSMPRELOAD_GLIBC_CHUNKS_H
#define KSMPRELOAD_GLIBC_CHUNKS_H

#include <stddef.h>
#include <stdint.h>

/* glibc's own functions, as the shim found them. */
struct ksm_glibc_calls {
    void *(*malloc)(size_t);
    void *(*realloc)(void *, size_t);
    void (*free)(void *);
    size_t (*usable)(void *);
};

/* caching: the block cache is on (the part in front of a cut block is then larger). */
void ksm_glibc_start(int fixed_threshold, int caching, const struct ksm_glibc_calls *calls);
/* No second thread was ever created (glibc's __libc_single_threaded): glibc's malloc then
 * takes no locks, and nothing else can change its heap during a call. */
int ksm_glibc_single_threaded(void);
/* The block is a chunk with a mapping of its own (straight from mmap). */
int ksm_glibc_chunk_is_mapped(const void *ptr);
/* The block lives in a thread arena's heap. */
int ksm_glibc_chunk_in_arena_heap(const void *ptr);
/* The whole mapping of a mapped chunk. */
void ksm_glibc_chunk_mapping(const void *ptr, uintptr_t *start, size_t *length);
/* Bytes of `usable` beyond what malloc(size) would have given. */
size_t ksm_glibc_padding(void *ptr, size_t size, size_t usable);
/* Whether glibc will map an aligned block of `size` (else its heap serves it). */
int ksm_glibc_will_map(size_t size);
/* How many bytes to ask posix_memalign for, for a page-aligned block of `size` that glibc
 * maps (one page more, so that freeing it lifts glibc's mmap threshold). */
size_t ksm_glibc_aligned_request(size_t size);
/* A heap block right above a free chunk of 128 KiB or more (glibc's default trim threshold):
 * while it is held, glibc cannot join that chunk to the top of its heap and give it back. */
int ksm_glibc_pins_free_memory(void *ptr);
/* For a block about to be freed: follows glibc's mmap threshold, and notes an aligned one. */
void ksm_glibc_before_free(const void *ptr);
/* A page-aligned block of `size` that glibc's heap serves (ksm_glibc_will_map is false), made
 * without posix_memalign, whose small remainders wedge the heap (glibc_chunks.c); NULL when
 * none could be made this way (nothing is held then): the caller asks posix_memalign. It is
 * ksm_glibc_reused_block's block, or else ksm_glibc_cut_block's. */
void *ksm_glibc_aligned_block(size_t size);
/* malloc's own block, when an aligned block was freed lately and malloc returns this one
 * page-aligned (it takes the freed block's place: memory that was used); else NULL. */
void *ksm_glibc_reused_block(size_t size);
/* A block cut out of a larger one from malloc. glibc writes nothing inside the block while
 * it does so: no chunk header, no free-list pointer (calloc relies on it). */
void *ksm_glibc_cut_block(size_t size);

#endif
