/* Helpers compiled into ksmpreload._native. Each returns 0 (or a value) on
 * success and -errno on failure, so Python can raise OSError with the code. */
#include <errno.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>

#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#define PR_GET_MEMORY_MERGE 68
#endif

static int ksm_prctl_set_merge(int enable)
{
    return prctl(PR_SET_MEMORY_MERGE, enable, 0, 0, 0) == 0 ? 0 : -errno;
}

static int ksm_prctl_get_merge(void)
{
    int merge = prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0);
    return merge >= 0 ? merge : -errno;
}

static int ksm_madvise_mergeable(void *addr, size_t length)
{
    return madvise(addr, length, MADV_MERGEABLE) == 0 ? 0 : -errno;
}

static long ksm_page_size(void)
{
    return sysconf(_SC_PAGESIZE);
}
