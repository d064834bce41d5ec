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
#define REGIONS_OFFSET ((HEADER_BYTES + VALUES_BYTES + sizeof(slot_names) + 7) & ~(size_t)7)

struct region_record {
    uint64_t start, length, kind, caller;
};
struct region_table {
    char magic[8];     /* "KSMREGN1" */
    uint64_t capacity;
    uint64_t written;  /* records ever written; the last `capacity` are kept, a ring */
    struct region_record records[KSM_REGION_CAPACITY];
};
#define FILE_BYTES (REGIONS_OFFSET + sizeof(struct region_table))

static uint64_t private_slots[KSM_STAT_COUNT];
uint64_t *ksm_stats = private_slots;
static struct region_table private_regions;
static struct region_table *regions = &private_regions;

/* Only the records written: the table is mostly untouched (zero) pages. */
static void copy_regions(struct region_table *to, const struct region_table *from)
{
    uint64_t written = __atomic_load_n(&from->written, __ATOMIC_ACQUIRE);
    uint64_t count = written < KSM_REGION_CAPACITY ? written : KSM_REGION_CAPACITY;
    memcpy(to->records, from->records, count * sizeof from->records[0]);
    to->written = written;
    memcpy(to->magic, "KSMREGN1", 8);
    to->capacity = KSM_REGION_CAPACITY;
}

/* The kind goes last: a reader takes a record with kind 0 as not written yet. */
void ksm_region_record(uintptr_t start, uint64_t length, enum ksm_region_kind kind, const void *caller)
{
    struct region_table *table = __atomic_load_n(&regions, __ATOMIC_ACQUIRE);
    uint64_t index = __atomic_fetch_add(&table->written, 1, __ATOMIC_RELAXED) % KSM_REGION_CAPACITY;
    struct region_record *record = &table->records[index];
    __atomic_store_n(&record->kind, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&record->start, start, __ATOMIC_RELAXED);
    __atomic_store_n(&record->length, length, __ATOMIC_RELAXED);
    __atomic_store_n(&record->caller, (uint64_t)(uintptr_t)caller, __ATOMIC_RELAXED);
    __atomic_store_n(&record->kind, (uint64_t)kind, __ATOMIC_RELEASE);
}

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
        struct region_table *table = (struct region_table *)(map + REGIONS_OFFSET);
        copy_regions(table, regions);
        stats_map = map;
        __atomic_store_n(&ksm_stats, values, __ATOMIC_RELEASE);
        __atomic_store_n(&regions, table, __ATOMIC_RELEASE);
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
    copy_regions(&private_regions, regions); /* the child has the parent's mappings */
    regions = &private_regions;
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
