/* The floor for any wrapper that page-aligns large blocks through the allocator's own API:
 * blocks of 8 KiB and more come from posix_memalign(4096), nothing else is done (no padding
 * count, no marking, no table). scripts/bench_large_churn.py preloads it as the `floor` arm,
 * so the shim's cost splits into what aligning costs the allocator and what the shim adds.
 * malloc only: the benchmark runs it for the patterns that use nothing else. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>

#define THRESHOLD 8192
#define PAGE 4096

static void *(*next_malloc)(size_t);
static int (*next_posix_memalign)(void **, size_t, size_t);

void *malloc(size_t size)
{
    if (!next_malloc) { /* dlsym does not call malloc on glibc 2.34 and later */
        next_posix_memalign = (int (*)(void **, size_t, size_t))dlsym(RTLD_NEXT, "posix_memalign");
        next_malloc = (void *(*)(size_t))dlsym(RTLD_NEXT, "malloc");
    }
    void *ptr;
    if (size < THRESHOLD)
        return next_malloc(size);
    return next_posix_memalign(&ptr, PAGE, size) ? NULL : ptr;
}
