/* The wrapped symbols, listed once. Everything else (function types, the
 * pointers to the real functions, their lookup and the check that the
 * required ones exist) is derived from this list.
 *
 * X(name, return type, parameters, required)
 * Required: the program cannot run correctly without the real function.
 * Optional: older or other allocators may lack it; the wrapper then reports
 * ENOSYS/ENOMEM as a C library without that function would. */
#ifndef KSMPRELOAD_HOOKS_H
#define KSMPRELOAD_HOOKS_H

#include <stddef.h>
#include <sys/types.h>

/* malloc comes last: wrappers take a non-NULL real_malloc to mean all are resolved.
 * reallocarray is wrapped too, on top of realloc, so it needs no real function. */
#define KSM_HOOKS(X)                                                                                                   \
    X(calloc, void *, (size_t count, size_t size), 1)                                                                  \
    X(realloc, void *, (void *ptr, size_t size), 1)                                                                    \
    X(free, void, (void *ptr), 1)                                                                                      \
    X(posix_memalign, int, (void **out, size_t align, size_t size), 1)                                                 \
    X(malloc_usable_size, size_t, (void *ptr), 1)                                                                      \
    X(aligned_alloc, void *, (size_t align, size_t size), 0)                                                           \
    X(memalign, void *, (size_t align, size_t size), 0)                                                                \
    X(valloc, void *, (size_t size), 0)                                                                                \
    X(pvalloc, void *, (size_t size), 0)                                                                               \
    X(mmap, void *, (void *addr, size_t len, int prot, int flags, int fd, off_t off), 1)                               \
    X(mmap64, void *, (void *addr, size_t len, int prot, int flags, int fd, off_t off), 0)                             \
    X(mremap, void *, (void *old, size_t old_len, size_t new_len, int flags, ...), 1)                                  \
    X(munmap, int, (void *addr, size_t len), 1)                                                                        \
    X(madvise, int, (void *addr, size_t len, int advice), 1)                                                           \
    X(malloc, void *, (size_t size), 1)

#define KSM_DECLARE_TYPE(name, ret, params, required) typedef ret(*name##_fn) params;
KSM_HOOKS(KSM_DECLARE_TYPE)
#undef KSM_DECLARE_TYPE

#endif
