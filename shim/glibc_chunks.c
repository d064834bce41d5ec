/* glibc's malloc chunks (malloc/malloc.c, arena.c; the layout has not changed since glibc
 * 2.3): two size_t words before each block, prev_size, then the chunk's size with flag
 * bits. A chunk of its own mapping (IS_MMAPPED) records in prev_size how far into the
 * mapping it starts; a chunk of a thread's arena (NON_MAIN_ARENA) lives in a heap that
 * starts at a multiple of HEAP_MAX. The shim reads these words only once malloc_is_glibc
 * has seen glibc's own rounding, and writes them only as glibc's memalign does. */
#define _GNU_SOURCE
#include "glibc_chunks.h"
#include "runtime.h"

#include <stdint.h>
#include <string.h>

#define PREV_INUSE 0x1
#define IS_MMAPPED 0x2
#define NON_MAIN_ARENA 0x4
#define SIZE_BITS 0x7
#define SIZE_SZ sizeof(size_t)
#define MIN_CHUNK (4 * SIZE_SZ)
#define CHUNK_ALIGN_MASK (2 * SIZE_SZ - 1)
/* A chunk this large skips tcache (1,040-byte chunks at most by default) and the fastbins
 * when freed: it joins its free neighbours, or the top. A smaller one stays "in use" in a
 * cache between its neighbours, so they can never join: the heap grows instead. */
#define LEAVES_SMALL_CACHES 1056
/* On 64 bits glibc never lifts its mmap threshold above 32 MiB. */
#define MMAP_THRESHOLD_MAX ((size_t)4 * 1024 * 1024 * sizeof(long))

static struct ksm_glibc_calls glibc;
static int threshold_fixed;
static size_t least_lead = MIN_CHUNK; /* the part in front of a cut block: a chunk at least */
/* glibc's dynamic mmap threshold, followed from the frees the shim sees. */
static size_t mmap_threshold = 128 * 1024;

void ksm_glibc_start(int fixed_threshold, int caching, const struct ksm_glibc_calls *calls)
{
    least_lead = caching ? LEAVES_SMALL_CACHES : MIN_CHUNK;
    glibc = *calls;
    threshold_fixed = fixed_threshold;
    if (fixed_threshold) /* it never moves, and is not known: no block needs the page that lifts it */
        mmap_threshold = SIZE_MAX;
}

static uintptr_t page_up(uintptr_t address)
{
    return (address + ksm_runtime.page_size - 1) & ~(uintptr_t)(ksm_runtime.page_size - 1);
}

static size_t word_before(const void *ptr, int words)
{
    size_t word;
    memcpy(&word, (const char *)ptr - words * SIZE_SZ, sizeof word);
    return word;
}

static void set_word_before(uintptr_t block, int words, size_t word)
{
    memcpy((char *)block - words * SIZE_SZ, &word, sizeof word);
}

/* The chunk glibc makes for a request: size + 8 bytes rounded to 16, 32 at least. */
static size_t chunk_for(size_t size)
{
    size_t chunk = (size + SIZE_SZ + CHUNK_ALIGN_MASK) & ~(size_t)CHUNK_ALIGN_MASK;
    return chunk < MIN_CHUNK ? MIN_CHUNK : chunk;
}

int ksm_glibc_chunk_is_mapped(const void *ptr) { return (word_before(ptr, 1) & IS_MMAPPED) != 0; }

int ksm_glibc_chunk_in_arena_heap(const void *ptr) { return (word_before(ptr, 1) & NON_MAIN_ARENA) != 0; }

void ksm_glibc_chunk_mapping(const void *ptr, uintptr_t *start, size_t *length)
{
    size_t offset = word_before(ptr, 2), size = word_before(ptr, 1) & ~(size_t)SIZE_BITS;
    *start = (uintptr_t)ptr - 2 * SIZE_SZ - offset;
    *length = offset + size;
}

/* A mapped chunk costs the pages the program touches when it uses its block: aligned, the
 * page holding the chunk header in front of the block, and the block's own pages; the
 * extra page asked for (ksm_glibc_aligned_request) and the slack in front are never
 * touched. Unaligned, the header and the block share pages from the mapping's start. */
static size_t mapped_padding(size_t size)
{
    return ksm_runtime.page_size + page_up(size) - page_up(size + 2 * SIZE_SZ);
}

size_t ksm_glibc_padding(void *ptr, size_t size, size_t usable)
{
    if (ksm_glibc_chunk_is_mapped(ptr))
        return mapped_padding(size);
    size_t unaligned = chunk_for(size) - SIZE_SZ;
    return usable > unaligned ? usable - unaligned : 0;
}

#define DEFAULT_TRIM_THRESHOLD ((size_t)128 * 1024)

/* Reads the block's own header only: prev_size is the size of the chunk in front when that
 * chunk is free (PREV_INUSE clear). Racy with threads, and only a hint. */
int ksm_glibc_pins_free_memory(void *ptr)
{
    size_t size_word = word_before(ptr, 1);
    return !(size_word & (PREV_INUSE | IS_MMAPPED)) && word_before(ptr, 2) >= DEFAULT_TRIM_THRESHOLD;
}

/* ---- the dynamic mmap threshold ----------------------------------------- */

/* How many bytes to malloc to cut an aligned block of `size` from: room in front and behind
 * the block for parts that are always large enough to leave glibc's small caches when freed
 * (ksm_glibc_cut_block). */
static size_t carve_request(size_t size)
{
    return size + ksm_runtime.page_size + least_lead + MIN_CHUNK + LEAVES_SMALL_CACHES;
}

/* A size glibc cannot serve at all counts as mapped: it goes to posix_memalign, which refuses
 * it, before the request sizes here wrap around (a fixed threshold never compares). */
int ksm_glibc_will_map(size_t size)
{
    return size > PTRDIFF_MAX - 4 * ksm_runtime.page_size || (size > MMAP_THRESHOLD_MAX && !threshold_fixed) ||
           chunk_for(carve_request(size)) >= __atomic_load_n(&mmap_threshold, __ATOMIC_RELAXED);
}

/* A request at or above glibc's mmap threshold gets a mapping of its own, and freeing a
 * mapped chunk larger than it (up to 32 MiB) raises it to that chunk's size, so that a
 * malloc/free loop soon runs from the heap. An aligned mapped chunk is smaller than the
 * request glibc made for it (the alignment slack is cut off its front), so its free would
 * never lift the threshold past the next aligned request of the same size: every block a
 * fresh mmap and munmap, every page a fresh fault. One more page in the request of a block
 * that will be mapped makes its free lift the threshold as a plain malloc's does. */
size_t ksm_glibc_aligned_request(size_t size)
{
    return ksm_glibc_will_map(size) && size <= MMAP_THRESHOLD_MAX ? carve_request(size) : size;
}

/* ---- page-aligned blocks ------------------------------------------------ */

/* After the program frees an aligned heap block, the next block of that size most likely takes
 * its place and comes from malloc page-aligned already (an alloc/free loop), so malloc is
 * asked first. When its block was not aligned, it is not asked first for the next
 * PLAIN_BACKOFF blocks: where the freed block joined free memory in front of it, the first
 * try would fail every time. */
#define PLAIN_BACKOFF 64
static int aligned_block_freed;
static unsigned plain_backoff;

static int is_page_aligned(const void *ptr) { return ((uintptr_t)ptr & (ksm_runtime.page_size - 1)) == 0; }

void ksm_glibc_before_free(const void *ptr)
{
    size_t size_word = word_before(ptr, 1), size = size_word & ~(size_t)SIZE_BITS;
    if ((size_word & IS_MMAPPED) && !threshold_fixed && size > __atomic_load_n(&mmap_threshold, __ATOMIC_RELAXED) &&
        size <= MMAP_THRESHOLD_MAX)
        __atomic_store_n(&mmap_threshold, size, __ATOMIC_RELAXED);
    /* a mapped chunk's memory goes back to the kernel: no later block takes its place */
    if (!(size_word & IS_MMAPPED) && is_page_aligned(ptr) && !__atomic_load_n(&aligned_block_freed, __ATOMIC_RELAXED))
        __atomic_store_n(&aligned_block_freed, 1, __ATOMIC_RELAXED);
}

static int worth_asking_malloc_first(void)
{
    if (!__atomic_load_n(&aligned_block_freed, __ATOMIC_RELAXED))
        return 0;
    unsigned left = __atomic_load_n(&plain_backoff, __ATOMIC_RELAXED);
    if (left)
        __atomic_store_n(&plain_backoff, left - 1, __ATOMIC_RELAXED); /* a lost update only shortens the wait */
    return left == 0;
}

static void *malloc_if_aligned(size_t size)
{
    void *ptr = glibc.malloc(size);
    if (!ptr || is_page_aligned(ptr))
        return ptr;
    __atomic_store_n(&aligned_block_freed, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&plain_backoff, PLAIN_BACKOFF, __ATOMIC_RELAXED);
    ksm_glibc_before_free(ptr);
    glibc.free(ptr);
    return NULL;
}

/* glibc's own flag (2.32+): no second thread was ever created. glibc's malloc takes no
 * arena lock while it is set, and the chunk surgery below relies on it the same way. */
extern char __libc_single_threaded __attribute__((weak));

int ksm_glibc_single_threaded(void) { return &__libc_single_threaded && __libc_single_threaded; }

/* A mapped chunk moves its start: prev_size says how much of the mapping is in front.
 * Nobody else reads or writes these words. */
static void *move_mapped_chunk(void *raw, uintptr_t block)
{
    size_t lead = block - (uintptr_t)raw, whole = word_before(raw, 1) & ~(size_t)SIZE_BITS;
    set_word_before(block, 2, word_before(raw, 2) + lead);
    set_word_before(block, 1, (whole - lead) | IS_MMAPPED);
    return (void *)block;
}

/* glibc's memalign cuts an aligned chunk out of a larger one and frees both remainders; a
 * small one lands in tcache, wedged between the block and the free memory around it, and
 * the next block of the same size no longer fits there: each round of an alloc/free loop
 * grew the heap and faulted in fresh pages (docs/BENCHMARKS.md, "Large blocks"). Keeping
 * such a remainder in the block instead left holes that later blocks did not fit, among the
 * program's small blocks (peak memory up to 7x, the `mixed` pattern there). So the request
 * leaves a remainder behind the block that is always freed into glibc's bins, where it joins
 * its neighbours; one that is somehow smaller stays in the block (counted as padding). */
static void cut_tail(uintptr_t block, size_t size)
{
    size_t size_word = word_before((void *)block, 1), whole = size_word & ~(size_t)SIZE_BITS;
    size_t keep = chunk_for(size);
    if (whole < keep + LEAVES_SMALL_CACHES)
        return;
    uintptr_t tail = block + keep;
    set_word_before(tail, 1, (whole - keep) | PREV_INUSE | (size_word & NON_MAIN_ARENA));
    set_word_before(block, 1, keep | (size_word & SIZE_BITS));
    glibc.free((void *)tail);
}

/* One thread: the block is cut out of `raw` as glibc's memalign cuts it. The size words
 * written here hold flag bits that glibc changes when a neighbouring chunk is allocated
 * or freed, so this is done only while no other thread can be in malloc. */
static void *cut_out(void *raw, uintptr_t block, size_t size)
{
    size_t lead = block - (uintptr_t)raw, size_word = word_before(raw, 1);
    size_t whole = size_word & ~(size_t)SIZE_BITS;
    if (lead) {
        set_word_before(block, 1, (whole - lead) | PREV_INUSE | (size_word & NON_MAIN_ARENA));
        set_word_before((uintptr_t)raw, 1, lead | (size_word & SIZE_BITS));
        glibc.free(raw);
    }
    cut_tail(block, size);
    return (void *)block;
}

/* Several threads: glibc's own calls only. realloc shrinks `raw` in place to the part in
 * front and frees the rest, which joins the free memory after it; malloc then most likely
 * serves the block from there, at the page boundary. NULL when it did not. */
static void *hand_back_around(void *raw, uintptr_t block, size_t size)
{
    size_t lead = block - (uintptr_t)raw;
    if (!lead) {
        if (glibc.usable(raw) >= chunk_for(size) + LEAVES_SMALL_CACHES)
            return glibc.realloc(raw, size); /* shrinks in place: the part behind is freed */
        return raw;
    }
    void *front = glibc.realloc(raw, lead - SIZE_SZ);
    void *ptr = front ? glibc.malloc(size) : NULL;
    glibc.free(front ? front : raw);
    if (ptr && !is_page_aligned(ptr)) {
        glibc.free(ptr);
        ptr = NULL;
    }
    return ptr;
}

void *ksm_glibc_reused_block(size_t size) { return worth_asking_malloc_first() ? malloc_if_aligned(size) : NULL; }

void *ksm_glibc_cut_block(size_t size)
{
    void *raw = glibc.malloc(carve_request(size));
    if (!raw)
        return NULL;
    uintptr_t block = page_up((uintptr_t)raw);
    /* With the block cache, the part in front joins the free memory before it: a small one
     * would stay in tcache, in use as far as the heap knows, and hide that memory from
     * ksm_glibc_pins_free_memory. Without it, a small part keeps a freed block from joining
     * the memory in front, and malloc's first try (ksm_glibc_reused_block) finds it again. */
    if (block != (uintptr_t)raw && block - (uintptr_t)raw < least_lead)
        block += ksm_runtime.page_size;
    if (ksm_glibc_chunk_is_mapped(raw))
        return move_mapped_chunk(raw, block);
    return ksm_glibc_single_threaded() ? cut_out(raw, block, size) : hand_back_around(raw, block, size);
}

void *ksm_glibc_aligned_block(size_t size)
{
    void *ptr = ksm_glibc_reused_block(size);
    return ptr ? ptr : ksm_glibc_cut_block(size);
}
