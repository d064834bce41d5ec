/* libksmpreload.so: preloaded into an unmodified program, it makes large
 * allocations page-aligned (so identical buffers give identical pages) and
 * gets them merged by KSM, through prctl(PR_SET_MEMORY_MERGE) for the whole
 * process or madvise(MADV_MERGEABLE) region by region.
 *
 * A guest in someone else's process: every wrapper keeps errno, never shows a
 * failure of ours to the program, and below the threshold costs one comparison. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>

#include "block_cache.h"
#include "config.h"
#include "runtime.h"
#include "sys.h"
#include "glibc_chunks.h"
#include "hooks.h"
#include "jemalloc.h"
#include "marking.h"
#include "padding.h"
#include "zeroing.h"
#include "stats.h"

#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#endif

#define EXPORT __attribute__((visibility("default")))
/* The large paths stay out of line so the small path needs no stack frame. */
#define SLOW_PATH __attribute__((noinline, cold))
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#define LIKELY(x) __builtin_expect(!!(x), 1)

struct ksm_runtime ksm_runtime = {.page_size = 4096};
/* free's and realloc's fast paths take only pointers inside a page: the shim's
 * aligned blocks start on a page, and their padding must be taken back. */
static uintptr_t page_offset_mask = 4095;
/* 0 until the real functions are known, so that every call takes the slow path
 * that finds them; then SIZE_MAX (all pass through) until the constructor sets
 * the configured threshold. The fast path is then one comparison. */
static size_t large_threshold;

/* ---- the real functions ------------------------------------------------ */

static __thread int resolving __attribute__((tls_model("initial-exec")));

#define KSM_DECLARE_REAL(name, ret, params, required) static name##_fn real_##name;
KSM_HOOKS(KSM_DECLARE_REAL)
#undef KSM_DECLARE_REAL

/* dlsym may call calloc or malloc: while it runs, those are served from here,
 * and free ignores these blocks. Each block keeps its size 16 bytes before it. */
static char bootstrap_pool[64 * 1024] __attribute__((aligned(16)));
static size_t bootstrap_used;

/* free's fast path: one comparison. Until the real functions are known every
 * pointer falls in this window, so the call takes the slow path that finds them. */
static uintptr_t free_slow_window = UINTPTR_MAX;

static int in_free_slow_window(const void *ptr)
{
    return (uintptr_t)ptr - (uintptr_t)bootstrap_pool < free_slow_window;
}

static int in_bootstrap_pool(const void *ptr)
{
    return (uintptr_t)ptr - (uintptr_t)bootstrap_pool < sizeof bootstrap_pool; /* one comparison */
}

static void *bootstrap_alloc(size_t size)
{
    size_t need = 16 + ((size + 15) & ~(size_t)15);
    size_t at = __atomic_fetch_add(&bootstrap_used, need, __ATOMIC_RELAXED);
    if (size > sizeof bootstrap_pool || at + need > sizeof bootstrap_pool)
        return NULL;
    memcpy(bootstrap_pool + at, &size, sizeof size);
    return bootstrap_pool + at + 16;
}

static size_t bootstrap_size(const void *ptr)
{
    size_t size;
    memcpy(&size, (const char *)ptr - 16, sizeof size);
    return size;
}

typedef void *(*next_symbol_fn)(const char *name);

static int same_object(const void *a, const void *b)
{
    Dl_info of_a, of_b;
    return a && b && dladdr(a, &of_a) && dladdr(b, &of_b) && of_a.dli_fbase == of_b.dli_fbase;
}

/* Exported: `name` as the objects after this copy of the shim define it, past any
 * later copies, so that a second copy (preloaded twice) is never in the chain. */
EXPORT void *ksmpreload_next_symbol(const char *name)
{
    void *symbol = dlsym(RTLD_NEXT, name);
    next_symbol_fn later_copy = (next_symbol_fn)dlsym(RTLD_NEXT, "ksmpreload_next_symbol");
    return later_copy && same_object(symbol, (void *)later_copy) ? later_copy(name) : symbol;
}

__attribute__((noinline)) static void resolve_real_functions(void)
{
    resolving = 1;
#define KSM_RESOLVE(name, ret, params, required)                                                                       \
    if (!real_##name)                                                                                                  \
        __atomic_store_n(&real_##name, (name##_fn)ksmpreload_next_symbol(#name), __ATOMIC_RELEASE);                    \
    if (required && !real_##name) {                                                                                    \
        ksm_say("no '" #name "' after libksmpreload in the link order; cannot run");                                   \
        _exit(127);                                                                                                    \
    }
    KSM_HOOKS(KSM_RESOLVE)
#undef KSM_RESOLVE
    size_t unresolved = 0;
    __atomic_compare_exchange_n(&large_threshold, &unresolved, SIZE_MAX, 0, __ATOMIC_RELEASE, __ATOMIC_RELAXED);
    __atomic_store_n(&free_slow_window, sizeof bootstrap_pool, __ATOMIC_RELEASE);
    resolving = 0;
}

/* The first calls, before the real functions are known: resolve them, or tell
 * the caller to use the pool while dlsym itself allocates. */
SLOW_PATH static int resolve_or_use_pool(void)
{
    if (resolving)
        return 1;
    resolve_real_functions();
    return 0;
}

/* The threshold for the slow paths: a call racing the first resolution may see 0. */
static size_t threshold_now(void)
{
    size_t threshold = __atomic_load_n(&large_threshold, __ATOMIC_ACQUIRE);
    return threshold ? threshold : SIZE_MAX;
}

/* True when the caller must serve from the bootstrap pool. */
#define NEEDS_POOL() (UNLIKELY(!real_malloc) && resolve_or_use_pool())

/* ---- what the wrappers hand to the marking policy ----------------------- */

static int is_page_aligned(const void *ptr) { return ((uintptr_t)ptr & (ksm_runtime.page_size - 1)) == 0; }

/* Another allocator's usable size for an unaligned request (mimalloc's mi_good_size,
 * tcmalloc's nallocx), so that padding counts what alignment adds, not size classes. */
typedef size_t (*good_size_fn)(size_t);
typedef size_t (*nallocx_flags_fn)(size_t, int);
static good_size_fn other_good_size;
static nallocx_flags_fn other_nallocx;

static void *from_malloc_library(const char *name)
{
    void *symbol = dlsym(RTLD_NEXT, name);
    return same_object((void *)real_malloc, symbol) ? symbol : NULL;
}

static void find_other_size_classes(void)
{
    other_good_size = (good_size_fn)from_malloc_library("mi_good_size");
    if (!other_good_size)
        other_nallocx = (nallocx_flags_fn)from_malloc_library("nallocx");
}

static size_t other_unaligned_usable(size_t size)
{
    if (other_good_size)
        return other_good_size(size);
    return other_nallocx ? other_nallocx(size, 0) : size;
}

/* ---- the allocator that serves the program ------------------------------ */

/* What the shim asks of the allocator, one backend chosen by the constructor: glibc (its
 * chunk headers: glibc_chunks.c), jemalloc (its aligned calls: jemalloc.c), an allocator
 * whose size classes are whole pages (mimalloc, tcmalloc: "sized"), or one the shim knows
 * nothing of (valgrind's, a sanitizer's). */
struct backend {
    /* What the alignment costs: usable bytes beyond those of the same request unaligned. */
    size_t (*padding)(void *ptr, size_t size, size_t usable);
    /* A page-aligned block of `size` bytes made its own way, or NULL: posix_memalign then. */
    void *(*aligned_block)(size_t size);
    /* realloc to a page-aligned block; NULL, the old block intact, when there is no memory. */
    void *(*realloc_aligned)(void *old, size_t size);
};

static size_t jemalloc_padding(void *ptr, size_t size, size_t usable)
{
    (void)ptr;
    return ksm_jemalloc_padding(size, usable);
}

/* Only up to the end of the last page the request reaches: the program never touches the
 * whole pages beyond, so they cost no memory (mimalloc hands a page-aligned 1 MiB block
 * 1.5 MiB of usable size). */
static size_t sized_padding(void *ptr, size_t size, size_t usable)
{
    (void)ptr;
    size_t touched = (size + ksm_runtime.page_size - 1) & ~(ksm_runtime.page_size - 1);
    size_t usable_touched = usable < touched ? usable : touched;
    size_t unaligned = other_unaligned_usable(size);
    return usable_touched > unaligned ? usable_touched - unaligned : 0;
}

static void *glibc_aligned_block(size_t size)
{
    return ksm_glibc_will_map(size) ? NULL : ksm_glibc_aligned_block(size);
}

/* mimalloc and tcmalloc hand out most large blocks page-aligned already (their size classes
 * are whole pages): such a block is taken as malloc gives it, which keeps the allocator's own
 * reuse (mimalloc maps a fresh segment for each huge aligned block: docs/BENCHMARKS.md). */
static void *sized_aligned_block(size_t size)
{
    void *ptr = real_malloc(size);
    if (ptr && is_page_aligned(ptr))
        return ptr;
    real_free(ptr);
    return NULL;
}

static void *no_aligned_block(size_t size)
{
    (void)size;
    return NULL;
}

static void *realloc_keeping_alignment(void *old, size_t size);

static const struct backend glibc_backend = {ksm_glibc_padding, glibc_aligned_block, realloc_keeping_alignment};
static const struct backend jemalloc_backend = {jemalloc_padding, no_aligned_block, ksm_jemalloc_realloc_aligned};
static const struct backend sized_backend = {sized_padding, sized_aligned_block, realloc_keeping_alignment};
static const struct backend unknown_backend = {sized_padding, no_aligned_block, realloc_keeping_alignment};
static const struct backend *backend = &unknown_backend;

static const struct backend *choose_backend(void)
{
    if (ksm_runtime.allocator_is_glibc)
        return &glibc_backend;
    if (ksm_jemalloc_found())
        return &jemalloc_backend;
    find_other_size_classes();
    return other_good_size || other_nallocx ? &sized_backend : &unknown_backend;
}

/* `made`: the shim allocated the block (a realloc's result is made only when the old block was:
 * the allocator may have resized in place, or moved it within the program's own arena). */
static void mark_heap_block(void *ptr, size_t size, int made)
{
    if (ksm_runtime.config.align && is_page_aligned(ptr))
        ksm_padding_note(ptr, backend->padding(ptr, size, real_malloc_usable_size(ptr)), made);
    ksm_mark_heap_block(ptr, size);
}

/* A kept block, taken from the cache for a request of `size` (or NULL): one that has at most
 * a page and a quarter of the request more than the allocator gives the request unaligned
 * (mimalloc gives a page-aligned 150 KiB block 192 KiB, its size class 152 KiB). */
static void *take_from_cache(size_t size, size_t *usable)
{
    size_t most = other_unaligned_usable(size) + ksm_runtime.page_size + size / 4;
    return ksm_cache_take(size, most, usable);
}

/* A block the cache kept for a request of `size` (or NULL): marked and counted when it was
 * made, so only its padding for this request is noted. errno is untouched. */
static void *cached_block(size_t size)
{
    size_t usable;
    void *ptr = ksm_runtime.caching ? take_from_cache(size, &usable) : NULL; /* off: no call, nothing learned */
    if (ptr)
        ksm_padding_note(ptr, backend->padding(ptr, size, usable), 1);
    return ptr;
}

/* Anonymous private memory only: KSM ignores shared and file pages, and stacks
 * and huge pages are not worth a scan. */
static int mergeable_mapping(int flags)
{
    return (flags & MAP_TYPE) == MAP_PRIVATE && (flags & MAP_ANONYMOUS) &&
           !(flags & (MAP_GROWSDOWN | MAP_STACK | MAP_HUGETLB));
}

/* Set once the malloc library maps memory that is not private anonymous (tcmalloc under
 * TCMALLOC_MEMFS_MALLOC_PATH maps a file MAP_SHARED): a page it releases there loses its page
 * table entry but keeps its bytes, so the pagemap cannot say which pages were used, and
 * calloc clears every byte (zeroed_block). */
static int allocator_maps_other_memory;

static void note_allocator_mapping(void *ptr, int flags, const void *caller)
{
    if (ptr == MAP_FAILED || ((flags & MAP_TYPE) == MAP_PRIVATE && (flags & MAP_ANONYMOUS)) ||
        ksm_runtime.allocator_is_glibc || __atomic_load_n(&allocator_maps_other_memory, __ATOMIC_RELAXED))
        return;
    /* Before the real functions are known no lookup is safe: count it as the allocator's. */
    malloc_fn malloc_now = __atomic_load_n(&real_malloc, __ATOMIC_ACQUIRE);
    if (!malloc_now || same_object(caller, (void *)malloc_now))
        __atomic_store_n(&allocator_maps_other_memory, 1, __ATOMIC_RELAXED);
}

static void *mark_mapping(void *ptr, size_t len, int flags, const void *caller)
{
    note_allocator_mapping(ptr, flags, caller);
    if (ptr != MAP_FAILED && ksm_runtime.config.threshold && len >= ksm_runtime.config.threshold &&
        mergeable_mapping(flags)) {
        ksm_jemalloc_saw_mapping(ptr, len);
        ksm_mark_mapping(ptr, len, caller);
    }
    return ptr;
}

/* ---- large heap allocations -------------------------------------------- */

/* The size to ask the allocator for, for an aligned block of `size` bytes. */
static size_t aligned_request(size_t size)
{
    return ksm_runtime.allocator_is_glibc ? ksm_glibc_aligned_request(size) : size;
}

static size_t large_alignment(size_t align)
{
    return ksm_runtime.config.align && align < ksm_runtime.page_size ? ksm_runtime.page_size : align;
}

/* The allocator's own posix_memalign, asked for what aligned_request says; NULL on failure. */
static void *memaligned_block(size_t size, size_t alignment)
{
    void *ptr = NULL;
    return real_posix_memalign(&ptr, alignment, aligned_request(size)) == 0 ? ptr : NULL;
}

/* A block of `size` bytes at `alignment` (a page or more), or NULL: the backend's own page-
 * aligned block where it has one, else posix_memalign's. */
static void *aligned_block(size_t size, size_t alignment)
{
    void *ptr = alignment == ksm_runtime.page_size ? backend->aligned_block(size) : NULL;
    return ptr ? ptr : memaligned_block(size, alignment);
}

/* Returns a block of at least `size` bytes, page-aligned when aligning; errno kept on success. */
SLOW_PATH static void *allocate_large(size_t size, size_t align)
{
    size_t alignment = large_alignment(align);
    void *ptr = alignment == ksm_runtime.page_size ? cached_block(size) : NULL;
    if (ptr)
        return ptr;
    int saved_errno = errno;
    ptr = alignment <= 16 ? real_malloc(size) : aligned_block(size, alignment);
    if (!ptr) {
        errno = ENOMEM;
        return NULL;
    }
    mark_heap_block(ptr, size, 1);
    errno = saved_errno;
    return ptr;
}

/* glibc serves a mapped chunk straight from mmap: zero already, unless
 * MALLOC_PERTURB_ filled it (then its first byte is not zero). */
static int fresh_glibc_mapping(const void *ptr)
{
    return ksm_runtime.allocator_is_glibc && ksm_glibc_chunk_is_mapped(ptr) && *(const unsigned char *)ptr == 0;
}

/* glibc, mimalloc or tcmalloc: their blocks are private anonymous memory whose
 * never-used pages read zero. An allocator not known here (valgrind's, say, which
 * tracks what was written) gets every byte cleared. */
static int allocator_is_known(void)
{
    return ksm_runtime.allocator_is_glibc ||
           ((other_good_size || other_nallocx) && !__atomic_load_n(&allocator_maps_other_memory, __ATOMIC_RELAXED));
}

static void clear_unless_fresh(unsigned char *from, unsigned char *to, uintptr_t fresh_from, uintptr_t fresh_to)
{
    unsigned char *fresh_start = (unsigned char *)fresh_from, *fresh_end = (unsigned char *)fresh_to;
    if (fresh_end <= from || fresh_start >= to || *(fresh_start > from ? fresh_start : from) != 0) {
        memset(from, 0, (size_t)(to - from)); /* nothing fresh, or glibc's perturb byte filled it */
        return;
    }
    if (fresh_start > from)
        memset(from, 0, (size_t)(fresh_start - from));
    if (fresh_end < to)
        memset(fresh_end, 0, (size_t)(to - fresh_end));
}

/* glibc with one thread: the part of the block that its heap took from the kernel during
 * the one call that made it (the program break moved over it) is zero already; the rest is
 * cleared, as glibc's own calloc does with its top. When malloc's first try fails, the
 * break is read again: that try's chunk headers may lie in memory the break passed. No
 * other thread can have used that memory meanwhile. */
static void *glibc_zeroed_block(size_t total)
{
    int from_heap = !ksm_glibc_will_map(total);
    uintptr_t break_before = (uintptr_t)sbrk(0);
    unsigned char *ptr = from_heap ? ksm_glibc_reused_block(total) : NULL;
    if (!ptr) {
        break_before = (uintptr_t)sbrk(0);
        if (!(from_heap && (ptr = ksm_glibc_cut_block(total))) &&
            !(ptr = memaligned_block(total, ksm_runtime.page_size)))
            return NULL;
    }
    if (!fresh_glibc_mapping(ptr))
        clear_unless_fresh(ptr, ptr + total, break_before, (uintptr_t)sbrk(0));
    return ptr;
}

/* Memory fresh from the kernel is zero already: clearing it would make every
 * page of a sparse table resident. jemalloc knows which of its pages are and is
 * asked for a zeroed block; glibc with one thread leaves what the program break
 * passed (glibc_zeroed_block); with the other known allocators, and glibc with
 * threads, only the pages that were used are cleared (zeroing.c). */
static void *zeroed_block(size_t count, size_t size, size_t total)
{
    if (!ksm_runtime.config.align)
        return real_calloc(count, size);
    if (ksm_jemalloc_found())
        return ksm_jemalloc_zalloc_aligned(total);
    if (ksm_runtime.allocator_is_glibc && ksm_glibc_single_threaded())
        return glibc_zeroed_block(total);
    void *ptr = aligned_block(total, ksm_runtime.page_size);
    if (!ptr)
        return NULL;
    if (fresh_glibc_mapping(ptr))
        return ptr;
    if (allocator_is_known())
        ksm_clear_block(ptr, total, ksm_runtime.page_size);
    else
        memset(ptr, 0, total);
    return ptr;
}

/* calloc takes a kept block only when clearing all of it costs little: a larger one may have
 * pages never touched, which clearing would make resident (a sparse table). */
#define ZEROED_FROM_CACHE_PAGES 4

SLOW_PATH static void *allocate_large_zeroed(size_t count, size_t size, size_t total)
{
    void *ptr = ksm_runtime.config.align && total <= ZEROED_FROM_CACHE_PAGES * ksm_runtime.page_size
                    ? cached_block(total)
                    : NULL;
    if (ptr)
        return memset(ptr, 0, total);
    int saved_errno = errno;
    ptr = zeroed_block(count, size, total);
    if (!ptr) {
        errno = ENOMEM;
        return NULL;
    }
    mark_heap_block(ptr, total, 1);
    errno = saved_errno;
    return ptr;
}

/* Learned at run time: this allocator's realloc can move a page-aligned block
 * to an unaligned place; a growing block then moves straight to an aligned one
 * (one copy, not two). Not under glibc: its realloc grows a heap block in place
 * whenever the chunk after it is free, and mremaps a mapped one, so asking it
 * first saves more than the second copy of a rare move costs (the realloc
 * pattern in docs/BENCHMARKS.md, "Large blocks"). jemalloc is asked for aligned
 * blocks with rallocx instead. */
static int realloc_loses_alignment;

/* One copy of what the old block holds into a new page-aligned block; NULL
 * (the old block intact) when there is no memory for it. */
static void *move_to_aligned(void *old, size_t old_size, size_t size)
{
    void *ptr = aligned_block(size, ksm_runtime.page_size);
    if (!ptr)
        return NULL;
    memcpy(ptr, old, old_size < size ? old_size : size);
    real_free(old);
    ksm_stat_add(KSM_STAT_realloc_copies, 1);
    return ptr;
}

/* Aligned blocks go through the allocator's realloc while it keeps them
 * aligned (in place, or mremap for glibc's mapped chunks: no copy); others
 * move once, straight to an aligned block. */
static void *realloc_keeping_alignment(void *old, size_t size)
{
    size_t old_size = real_malloc_usable_size(old);
    if (!is_page_aligned(old) || (realloc_loses_alignment && size > old_size && !ksm_runtime.allocator_is_glibc))
        return move_to_aligned(old, old_size, size);
    void *ptr = real_realloc(old, size);
    if (ptr && !is_page_aligned(ptr)) {
        realloc_loses_alignment = 1;
        void *aligned = move_to_aligned(ptr, size, size);
        ptr = aligned ? aligned : ptr;
    }
    return ptr;
}

SLOW_PATH static void *reallocate_large(void *old, size_t size, int old_made)
{
    int saved_errno = errno;
    void *ptr;
    if (!ksm_runtime.config.align)
        ptr = real_realloc(old, size);
    else
        ptr = backend->realloc_aligned(old, size);
    if (!ptr) {
        errno = ENOMEM;
        return NULL;
    }
    mark_heap_block(ptr, size, old_made);
    errno = saved_errno;
    return ptr;
}

static void *reallocate_bootstrap_block(void *old, size_t size)
{
    void *ptr = malloc(size);
    if (ptr) {
        size_t old_size = bootstrap_size(old);
        memcpy(ptr, old, old_size < size ? old_size : size);
    }
    return ptr;
}

/* ---- the wrappers ------------------------------------------------------ */

/* malloc, calloc, realloc and free: the fast path is the condition and a tail
 * call to the real function; everything else (first calls, the bootstrap pool,
 * large blocks) is in the out-of-line *_slow functions. */

SLOW_PATH static void *malloc_slow(size_t size)
{
    if (NEEDS_POOL())
        return bootstrap_alloc(size);
    return size < threshold_now() ? real_malloc(size) : allocate_large(size, 16);
}

EXPORT void *malloc(size_t size)
{
    if (LIKELY(size < large_threshold))
        return real_malloc(size);
    return malloc_slow(size);
}

SLOW_PATH static void *calloc_slow(size_t count, size_t size)
{
    size_t total;
    if (NEEDS_POOL())
        return __builtin_mul_overflow(count, size, &total) ? NULL : bootstrap_alloc(total);
    if (__builtin_mul_overflow(count, size, &total) || total < threshold_now())
        return real_calloc(count, size);
    return allocate_large_zeroed(count, size, total);
}

EXPORT void *calloc(size_t count, size_t size)
{
    size_t total;
    if (LIKELY(!__builtin_mul_overflow(count, size, &total) && total < large_threshold))
        return real_calloc(count, size);
    return calloc_slow(count, size);
}

/* The old block's padding leaves the gauge; it comes back if realloc fails. */
static void *realloc_taking_padding(void *old, size_t size)
{
    int made;
    size_t padding = ksm_padding_forget(old, &made);
    void *ptr = size < threshold_now() ? real_realloc(old, size) : reallocate_large(old, size, made);
    if (!ptr && size)
        ksm_padding_note(old, padding, made);
    return ptr;
}

SLOW_PATH static void *realloc_slow(void *old, size_t size)
{
    if (in_bootstrap_pool(old))
        return reallocate_bootstrap_block(old, size);
    if (NEEDS_POOL())
        return old ? NULL : bootstrap_alloc(size);
    if (!old)
        return size < threshold_now() ? real_realloc(old, size) : allocate_large(size, 16);
    return realloc_taking_padding(old, size);
}

EXPORT void *realloc(void *old, size_t size)
{
    if (LIKELY(size < large_threshold && ((uintptr_t)old & page_offset_mask) && !in_bootstrap_pool(old)))
        return real_realloc(old, size);
    return realloc_slow(old, size);
}

EXPORT void *reallocarray(void *old, size_t count, size_t size)
{
    size_t total;
    if (__builtin_mul_overflow(count, size, &total)) {
        errno = ENOMEM;
        return NULL;
    }
    return realloc(old, total);
}

/* What free does with a block the cache does not keep (or gives back later). */
static void free_to_allocator(void *ptr)
{
    if (ksm_runtime.allocator_is_glibc && ptr)
        ksm_glibc_before_free(ptr);
    real_free(ptr);
}

SLOW_PATH static void free_slow(void *ptr)
{
    if (in_bootstrap_pool(ptr) || NEEDS_POOL())
        return;
    int made;
    ksm_padding_forget(ptr, &made);
    if (ptr && ksm_runtime.caching && is_page_aligned(ptr) && ksm_cache_keep(ptr, real_malloc_usable_size(ptr), made))
        return;
    free_to_allocator(ptr);
}

EXPORT void free(void *ptr)
{
    if (LIKELY(((uintptr_t)ptr & page_offset_mask) && !in_free_slow_window(ptr)))
        real_free(ptr);
    else
        free_slow(ptr);
}

EXPORT size_t malloc_usable_size(void *ptr)
{
    if (UNLIKELY(in_bootstrap_pool(ptr)))
        return bootstrap_size(ptr);
    if (NEEDS_POOL())
        return 0;
    return real_malloc_usable_size(ptr);
}

static int valid_posix_alignment(size_t align) { return align >= sizeof(void *) && (align & (align - 1)) == 0; }

EXPORT int posix_memalign(void **out, size_t align, size_t size)
{
    if (NEEDS_POOL())
        return ENOMEM;
    if (size < threshold_now() || !valid_posix_alignment(align))
        return real_posix_memalign(out, align, size);
    void *ptr = allocate_large(size, align);
    if (!ptr)
        return ENOMEM;
    *out = ptr;
    return 0;
}

/* aligned_alloc, memalign, valloc and pvalloc: large ones become page-aligned
 * posix_memalign blocks; small ones and alignments that are not a power of two
 * (0 included: some allocators refuse it) go to the real one, which answers as
 * it would at any size. */
static void *aligned_or_real(void *(*real)(size_t, size_t), size_t align, size_t size)
{
    if (size < threshold_now() || align == 0 || (align & (align - 1)) != 0 || !real)
        return real ? real(align, size) : (errno = ENOMEM, NULL);
    return allocate_large(size, align < sizeof(void *) ? sizeof(void *) : align);
}

EXPORT void *aligned_alloc(size_t align, size_t size)
{
    if (NEEDS_POOL())
        return NULL;
    return aligned_or_real(real_aligned_alloc, align, size);
}

EXPORT void *memalign(size_t align, size_t size)
{
    if (NEEDS_POOL())
        return NULL;
    return aligned_or_real(real_memalign, align, size);
}

EXPORT void *valloc(size_t size)
{
    if (NEEDS_POOL())
        return NULL;
    if (size < threshold_now() || !real_valloc)
        return real_valloc ? real_valloc(size) : (errno = ENOMEM, NULL);
    return allocate_large(size, ksm_runtime.page_size);
}

EXPORT void *pvalloc(size_t size)
{
    if (NEEDS_POOL())
        return NULL;
    if (size < threshold_now() || !real_pvalloc || size > SIZE_MAX - ksm_runtime.page_size)
        return real_pvalloc ? real_pvalloc(size) : (errno = ENOMEM, NULL);
    return allocate_large((size + ksm_runtime.page_size - 1) & ~(ksm_runtime.page_size - 1), ksm_runtime.page_size);
}

/* Before the real functions are known (jemalloc maps memory from its own constructor, and
 * dlsym could deadlock then), the system calls themselves serve. */
EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    mmap_fn real = __atomic_load_n(&real_mmap, __ATOMIC_ACQUIRE);
    return mark_mapping((real ? real : ksm_sys_mmap)(addr, len, prot, flags, fd, off), len, flags,
                        __builtin_return_address(0));
}

EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    mmap_fn real = __atomic_load_n(&real_mmap64, __ATOMIC_ACQUIRE);
    return mark_mapping((real ? real : ksm_sys_mmap)(addr, len, prot, flags, fd, off), len, flags,
                        __builtin_return_address(0));
}

EXPORT void *mremap(void *old, size_t old_len, size_t new_len, int flags, ...)
{
    void *new_addr = NULL;
    if (flags & MREMAP_FIXED) {
        va_list ap;
        va_start(ap, flags);
        new_addr = va_arg(ap, void *);
        va_end(ap);
    }
    mremap_fn real = __atomic_load_n(&real_mremap, __ATOMIC_ACQUIRE);
    if (!real)
        return ksm_sys_mremap(old, old_len, new_len, flags, new_addr);
    return real(old, old_len, new_len, flags, new_addr);
}

EXPORT int munmap(void *addr, size_t len)
{
    munmap_fn real = __atomic_load_n(&real_munmap, __ATOMIC_ACQUIRE);
    int result = real ? real(addr, len) : ksm_sys_munmap(addr, len);
    if (result == 0 && ksm_runtime.config.threshold && len >= ksm_runtime.config.threshold)
        ksm_stat_add(KSM_STAT_unmapped_bytes, len);
    return result;
}

/* The program's own madvise: counted when it asks for merging, so that a
 * diagnosis can say why its calls "return -1", and when it unmarks memory
 * (stress-ng does at random), so that it can say who unmarked it; errno and
 * result unchanged. */
EXPORT int madvise(void *addr, size_t len, int advice)
{
    madvise_fn real = __atomic_load_n(&real_madvise, __ATOMIC_ACQUIRE);
    int result = real ? real(addr, len, advice) : ksm_sys_madvise(addr, len, advice);
    if (advice == MADV_MERGEABLE) {
        ksm_stats_publish_pending(); /* keeps errno */
        ksm_stat_add(KSM_STAT_program_madvise_mergeable, 1);
        if (result != 0)
            ksm_stat_add(errno == EINVAL ? KSM_STAT_program_madvise_einval : KSM_STAT_program_madvise_failed, 1);
    } else if (advice == MADV_UNMERGEABLE && result == 0) {
        ksm_stats_publish_pending();
        ksm_stat_add(KSM_STAT_program_madvise_unmergeable, 1);
        ksm_stat_add(KSM_STAT_program_unmerged_bytes, len);
    }
    return result;
}

/* ---- start-up, fork and exit ------------------------------------------- */

static void default_stats_dir(char *dir, size_t size)
{
    if (geteuid() == 0)
        snprintf(dir, size, "/run/ksmpreload");
    else
        snprintf(dir, size, "/tmp/ksmpreload-%u", (unsigned)geteuid());
}

/* start_brk is field 47 of /proc/self/stat: the bottom of the brk heap. */
static uintptr_t read_heap_start(void)
{
    char text[2048];
    int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t len = read(fd, text, sizeof text - 1);
    close(fd);
    if (len <= 0)
        return 0;
    text[len] = '\0';
    char *field = strrchr(text, ')'); /* the command name may hold spaces */
    for (int index = 2; field && index < 47; index++)
        field = strchr(field + 1, ' ');
    return field ? (uintptr_t)strtoull(field + 1, NULL, 10) : 0;
}

static uint64_t read_max_map_count(void)
{
    char text[32] = {0};
    int fd = open("/proc/sys/vm/max_map_count", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 65530;
    ssize_t len = read(fd, text, sizeof text - 1);
    close(fd);
    return len > 0 ? strtoull(text, NULL, 10) : 65530;
}

/* glibc's malloc, whose chunk headers the marking may read (marking.c). The
 * symbol alone is not enough: valgrind and sanitizers serve libc's malloc
 * symbol with blocks of their own. On 64 bits glibc rounds a 100-byte request
 * to a 112-byte chunk, of which 104 bytes are usable; those give back 100. */
static int malloc_is_glibc(void)
{
    Dl_info info;
    if (!dladdr((void *)real_malloc, &info) || !info.dli_fname || !strstr(info.dli_fname, "/libc.so"))
        return 0;
    void *probe = real_malloc(100);
    size_t usable = probe ? real_malloc_usable_size(probe) : 0;
    real_free(probe);
    return sizeof(size_t) == 8 && usable == 104;
}

static void choose_marking(void)
{
    if (ksm_runtime.config.strategy == KSM_STRATEGY_MADVISE || ksm_runtime.config.strategy == KSM_STRATEGY_OBSERVE)
        return;
    if (prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) == 0) {
        ksm_runtime.by_prctl = 1;
        return;
    }
    if (ksm_runtime.config.verbose) {
        char text[160];
        snprintf(text, sizeof text, "prctl(PR_SET_MEMORY_MERGE) refused (%s); marking with madvise instead",
                 strerror(errno));
        ksm_say(text);
    }
}

/* The malloc library is a checking (debug) build: its name says so. */
static int malloc_library_checks(void)
{
    Dl_info info;
    return dladdr((void *)real_malloc, &info) && info.dli_fname && strstr(info.dli_fname, "debug");
}

static void say_configuration(void)
{
    char text[256];
    snprintf(text, sizeof text, "pid %d: strategy %s, threshold %zu bytes, %s", (int)getpid(),
             ksm_runtime.config.strategy == KSM_STRATEGY_OBSERVE ? "observe"
             : ksm_runtime.by_prctl                              ? "prctl"
                                                                 : "madvise",
             ksm_runtime.config.threshold, ksm_runtime.config.align ? "large blocks page-aligned" : "no alignment");
    ksm_say(text);
}

static void after_fork_in_child(void)
{
    ksm_marking_after_fork(); /* the counters need no handler: _Fork would skip it (stats.h) */
}

/* Exported, so that a lookup finds the first copy of the shim in the process;
 * the alias is this copy's own. A second copy (preloaded twice under two
 * paths, or dlopen'ed into a process that preloads one) stays inert: its
 * wrappers pass every call on, and it marks, aligns and publishes nothing. */
EXPORT const char ksmpreload_instance = 1;
extern const char own_instance __attribute__((alias("ksmpreload_instance"), visibility("hidden")));

static int another_copy_comes_first(void)
{
    const void *first = dlsym(RTLD_DEFAULT, "ksmpreload_instance");
    return first && first != &own_instance;
}

__attribute__((constructor)) static void ksmpreload_start(void)
{
    int saved_errno = errno;
    ksm_runtime.page_size = getauxval(AT_PAGESZ) ? getauxval(AT_PAGESZ) : 4096;
    resolve_real_functions();
    if (another_copy_comes_first()) {
        __atomic_store_n(&large_threshold, SIZE_MAX, __ATOMIC_RELEASE);
        errno = saved_errno;
        return;
    }
    page_offset_mask = ksm_runtime.page_size - 1;
    ksm_padding_start(ksm_runtime.page_size);
    ksm_config_read(&ksm_runtime.config, ksm_runtime.page_size);
    choose_marking();
    ksm_runtime.allocator_is_glibc = malloc_is_glibc();
    struct ksm_marking marking = {.main_heap_start = read_heap_start(), .vma_budget = read_max_map_count() / 4};
    ksm_marking_start(&marking);
    struct ksm_glibc_calls glibc = {real_malloc, real_realloc, real_free, real_malloc_usable_size};
    ksm_glibc_start(ksm_glibc_thresholds_fixed(), ksm_runtime.config.align && ksm_runtime.config.cache, &glibc);
    ksm_jemalloc_start((void *)real_malloc, ksm_runtime.config.threshold, ksm_runtime.config.jemalloc_hooks);
    backend = choose_backend();
    /* Not under another allocator (valgrind's, a sanitizer's) nor a checking build of a known
     * one (libtcmalloc_minimal_debug): a block kept here would hide its free from the tool
     * that checks the program's memory. */
    if (ksm_runtime.config.align && ksm_runtime.config.cache && backend != &unknown_backend &&
        !malloc_library_checks()) {
        struct ksm_cache_calls cache_calls = {free_to_allocator,
                                              ksm_runtime.allocator_is_glibc ? ksm_glibc_pins_free_memory : NULL};
        ksm_cache_start(ksm_runtime.config.threshold, &cache_calls);
        ksm_runtime.caching = 1;
    }
    if (other_nallocx && getenv("TCMALLOC_MEMFS_MALLOC_PATH")) /* its file may be mapped already */
        allocator_maps_other_memory = 1;

    ksm_stat_set(KSM_STAT_pid, (uint64_t)getpid());
    ksm_stat_set(KSM_STAT_strategy, ksm_runtime.config.strategy == KSM_STRATEGY_OBSERVE ? 3
                                    : ksm_runtime.by_prctl                              ? 1
                                                                                        : 2);
    ksm_stat_set(KSM_STAT_threshold, ksm_runtime.config.threshold);
    ksm_stat_set(KSM_STAT_align, (uint64_t)ksm_runtime.config.align);
    ksm_stat_set(KSM_STAT_page_size, ksm_runtime.page_size);
    char dir[256];
    if (!ksm_runtime.config.stats_dir)
        default_stats_dir(dir, sizeof dir);
    ksm_stats_publish(ksm_runtime.config.stats_dir ? ksm_runtime.config.stats_dir : dir, ksm_runtime.config.verbose);
    pthread_atfork(NULL, NULL, after_fork_in_child);
    if (ksm_runtime.config.verbose)
        say_configuration();
    __atomic_store_n(&large_threshold, ksm_runtime.config.threshold, __ATOMIC_RELEASE);
    ksm_mark_existing_mappings(ksm_runtime.config.threshold);
    errno = saved_errno;
}

__attribute__((destructor)) static void ksmpreload_stop(void)
{
    int saved_errno = errno;
    ksm_stats_unpublish();
    errno = saved_errno;
}
