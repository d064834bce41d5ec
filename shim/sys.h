/* The raw system calls of the shim, in one place. They bypass the libc symbols, which the
 * shim wraps (mmap, munmap, madvise, mremap) or which the program may have wrapped itself:
 * the shim's own bookkeeping must not come back through its wrappers. */
#ifndef KSMPRELOAD_SYS_H
#define KSMPRELOAD_SYS_H

#include <pthread.h>
#include <stddef.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

static inline void *ksm_sys_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    return (void *)syscall(SYS_mmap, addr, len, prot, flags, fd, off);
}

static inline int ksm_sys_munmap(void *addr, size_t len) { return (int)syscall(SYS_munmap, addr, len); }

static inline int ksm_sys_madvise(void *addr, size_t len, int advice)
{
    return (int)syscall(SYS_madvise, addr, len, advice);
}

static inline void *ksm_sys_mremap(void *old, size_t old_len, size_t new_len, int flags, void *new_addr)
{
    return (void *)syscall(SYS_mremap, old, old_len, new_len, flags, new_addr);
}

/* The shim's own file work (the counters file, /proc/self/maps, the pagemap) runs inside
 * malloc, calloc and realloc, which are no cancellation points, while open, read and close
 * are: a thread cancelled there would leak its block, or a file descriptor. */
static inline int ksm_cancel_off(void)
{
    int before;
    pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &before);
    return before;
}

static inline void ksm_cancel_restore(int before)
{
    int ignored;
    pthread_setcancelstate(before, &ignored);
}

#endif
