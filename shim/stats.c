/* Counters shared with the outside through a small file mapped MAP_SHARED:
 * an increment is one atomic add, and a reader always sees current values. */
#define _GNU_SOURCE
#include "stats.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static const char slot_names[] =
#define KSM_STAT_NAME(name) #name "\0"
    KSM_STAT_SLOTS(KSM_STAT_NAME)
#undef KSM_STAT_NAME
    ;

#define HEADER_BYTES 16
#define VALUES_BYTES (KSM_STAT_COUNT * sizeof(uint64_t))
#define FILE_BYTES (HEADER_BYTES + VALUES_BYTES + sizeof(slot_names))

static uint64_t private_slots[KSM_STAT_COUNT];
uint64_t *ksm_stats = private_slots;

static char stats_dir[PATH_MAX];
static char stats_path[PATH_MAX];
static void *stats_map;
static int publish_pending;

/* Raw syscalls: our own mmap wrapper has nothing to do with this file. */
static void *map_shared(int fd)
{
    long p = syscall(SYS_mmap, NULL, FILE_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return p < 0 && p > -4096 ? NULL : (void *)p;
}

static int dir_is_ours(const char *dir)
{
    struct stat st;
    if (mkdir(dir, 0700) != 0 && errno != EEXIST)
        return 0;
    return lstat(dir, &st) == 0 && S_ISDIR(st.st_mode) && st.st_uid == geteuid();
}

static void *create_file(void)
{
    int fd = open(stats_path, O_RDWR | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return NULL;
    void *map = ftruncate(fd, FILE_BYTES) == 0 ? map_shared(fd) : NULL;
    close(fd);
    if (!map)
        unlink(stats_path);
    return map;
}

static void publish(void)
{
    int saved_errno = errno;
    snprintf(stats_path, sizeof stats_path, "%s/%d.stats", stats_dir, (int)getpid());
    char *map = create_file();
    if (map) {
        memcpy(map, "KSMPRLD1", 8);
        uint64_t count = KSM_STAT_COUNT;
        memcpy(map + 8, &count, sizeof count);
        memcpy(map + HEADER_BYTES + VALUES_BYTES, slot_names, sizeof slot_names);
        uint64_t *values = (uint64_t *)(map + HEADER_BYTES);
        memcpy(values, ksm_stats, VALUES_BYTES);
        values[KSM_STAT_pid] = (uint64_t)getpid();
        stats_map = map;
        __atomic_store_n(&ksm_stats, values, __ATOMIC_RELEASE);
    }
    errno = saved_errno;
}

void ksm_stats_publish(const char *dir)
{
    if (!dir || !*dir || strcmp(dir, "off") == 0 || strlen(dir) >= sizeof stats_dir - 32)
        return;
    if (!dir_is_ours(dir))
        return;
    strcpy(stats_dir, dir);
    /* A file for this pid was left by the image this process exec'd from. */
    snprintf(stats_path, sizeof stats_path, "%s/%d.stats", stats_dir, (int)getpid());
    unlink(stats_path);
    /* Most processes (shell utilities, subshells) never allocate anything large and
     * some leave with _exit: a process gets its file on its first large event. */
    __atomic_store_n(&publish_pending, 1, __ATOMIC_RELEASE);
}

void ksm_stats_after_fork(void)
{
    for (int slot = KSM_STAT_heap_regions; slot < KSM_STAT_COUNT; slot++)
        ksm_stats[slot] = 0;
    ksm_stats[KSM_STAT_pid] = (uint64_t)getpid();
    if (!stats_map)
        return; /* a pending publication stays pending in the child */
    /* The parent's file stays the parent's: copy into private slots, then publish anew. */
    memcpy(private_slots, ksm_stats, VALUES_BYTES);
    ksm_stats = private_slots;
    syscall(SYS_munmap, stats_map, FILE_BYTES);
    stats_map = NULL;
    publish_pending = 1;
}

void ksm_stats_publish_pending(void)
{
    if (__atomic_exchange_n(&publish_pending, 0, __ATOMIC_ACQ_REL))
        publish();
}

void ksm_stats_unpublish(void)
{
    if (stats_map && (pid_t)ksm_stats[KSM_STAT_pid] == getpid())
        unlink(stats_path);
}
