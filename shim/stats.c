/* Counters shared with the outside through a small file mapped MAP_SHARED:
 * an increment is one atomic add, and a reader always sees current values. */
#define _GNU_SOURCE
#include "stats.h"
#include "config.h"
#include "sys.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
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
struct ksm_region_table {
    char magic[8]; /* "KSMREGN1" */
    uint64_t capacity;
    uint64_t written; /* records ever written; the last `capacity` are kept, a ring */
    struct region_record records[KSM_REGION_CAPACITY];
};
#define FILE_BYTES (REGIONS_OFFSET + sizeof(struct ksm_region_table))

#ifndef MADV_WIPEONFORK
#define MADV_WIPEONFORK 18
#endif

static uint64_t private_slots[KSM_STAT_COUNT];
static struct ksm_region_table private_regions;
static struct ksm_stats_home private_home = {private_slots, &private_regions};
struct ksm_stats_home *ksm_stats_home = &private_home;

/* Made with the file, marked MADV_WIPEONFORK: in a fork child all of it reads 0. */
static struct wiped_on_fork {
    struct ksm_stats_home home;
    int taking_over; /* in a fork child: set by the thread that takes the counters over */
    dev_t file_dev;  /* the file this process created; 0 before */
    ino_t file_ino;
} * wiped;

/* Only the records written: the table is mostly untouched (zero) pages. */
static void copy_regions(struct ksm_region_table *to, const struct ksm_region_table *from)
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
    ksm_stats_slots(); /* a fork child takes over first: these may be its parent's records */
    struct ksm_stats_home *home = __atomic_load_n(&ksm_stats_home, __ATOMIC_ACQUIRE);
    struct ksm_region_table *table = __atomic_load_n(&home->regions, __ATOMIC_ACQUIRE);
    uint64_t index = __atomic_fetch_add(&table->written, 1, __ATOMIC_RELAXED) % KSM_REGION_CAPACITY;
    struct region_record *record = &table->records[index];
    __atomic_store_n(&record->kind, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&record->start, start, __ATOMIC_RELAXED);
    __atomic_store_n(&record->length, length, __ATOMIC_RELAXED);
    __atomic_store_n(&record->caller, (uint64_t)(uintptr_t)caller, __ATOMIC_RELAXED);
    __atomic_store_n(&record->kind, (uint64_t)kind, __ATOMIC_RELEASE);
}

static char stats_dir[PATH_MAX]; /* absolute, checked at start; "" for none */
static char *stats_map;          /* the file's mapping; in a fork child, its parent's */
static int publish_pending;

/* Raw system calls: our own mmap wrapper has nothing to do with these mappings. */
static void *raw_mmap(size_t size, int flags, int fd)
{
    void *p = ksm_sys_mmap(NULL, size, PROT_READ | PROT_WRITE, flags, fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

static struct wiped_on_fork *map_wiped_page(void)
{
    void *page = raw_mmap(sizeof *wiped, MAP_PRIVATE | MAP_ANONYMOUS, -1);
    if (page && ksm_sys_madvise(page, sizeof *wiped, MADV_WIPEONFORK) != 0) {
        ksm_sys_munmap(page, sizeof *wiped);
        page = NULL;
    }
    return page;
}

/* An absolute path opened one component at a time, each with O_NOFOLLOW, so that a
 * symlink anywhere in it fails; with make_last, a missing last component is made. */
static int open_dir_nofollow(const char *path, int make_last)
{
    int fd = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    const char *at = path + strspn(path, "/");
    while (fd >= 0 && *at) {
        size_t len = strcspn(at, "/");
        char name[NAME_MAX + 1];
        if (len > NAME_MAX) {
            close(fd);
            return -1;
        }
        memcpy(name, at, len);
        name[len] = '\0';
        at += len + strspn(at + len, "/");
        int next = openat(fd, name, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (next < 0 && errno == ENOENT && make_last && !*at && mkdirat(fd, name, 0700) == 0)
            next = openat(fd, name, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        close(fd);
        fd = next;
    }
    return fd;
}

/* The counters directory, checked at each use (no descriptor is kept: the program may
 * close it, or reuse its number): ours, and no one else can write in it. -1 if not. */
static int open_stats_dir(int make_last)
{
    struct stat st;
    int fd = stats_dir[0] == '/' ? open_dir_nofollow(stats_dir, make_last) : -1;
    if (fd >= 0 &&
        (fstat(fd, &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & (S_IWGRP | S_IWOTH)))) {
        close(fd);
        fd = -1;
    }
    return fd;
}

/* Space reserved before the file is mapped, so that no access to it can fault (SIGBUS on
 * a full filesystem); the size limit checked first, as growing past it raises SIGXFSZ. */
static int reserve_space(int fd)
{
    struct rlimit limit;
    if (getrlimit(RLIMIT_FSIZE, &limit) != 0 || (limit.rlim_cur != RLIM_INFINITY && limit.rlim_cur < FILE_BYTES))
        return 0;
    return posix_fallocate(fd, 0, FILE_BYTES) == 0;
}

/* A file of this name that is ours was left by an earlier image of this pid (execve, or a
 * process that ended without exit); anyone else's stays, and then we make no file. */
static void remove_left_over(int dir_fd, const char *name)
{
    struct stat st;
    if (fstatat(dir_fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode) && st.st_uid == geteuid())
        unlinkat(dir_fd, name, 0);
}

static char *create_file(int dir_fd, const char *name)
{
    remove_left_over(dir_fd, name);
    int fd = openat(dir_fd, name, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return NULL;
    struct stat st;
    char *map = reserve_space(fd) && fstat(fd, &st) == 0 ? raw_mmap(FILE_BYTES, MAP_SHARED, fd) : NULL;
    close(fd);
    if (!map) {
        unlinkat(dir_fd, name, 0);
        return NULL;
    }
    wiped->file_dev = st.st_dev;
    wiped->file_ino = st.st_ino;
    return map;
}

static void file_name(char *name, size_t size) { snprintf(name, size, "%d.stats", (int)getpid()); }

/* The current counters and records go into the new file, which takes over from them. */
static void start_file(char *map)
{
    memcpy(map, "KSMPRLD1", 8);
    uint64_t count = KSM_STAT_COUNT;
    memcpy(map + 8, &count, sizeof count);
    memcpy(map + HEADER_BYTES + VALUES_BYTES, slot_names, sizeof slot_names);
    uint64_t *values = (uint64_t *)(map + HEADER_BYTES);
    memcpy(values, ksm_stats_slots(), VALUES_BYTES);
    values[KSM_STAT_pid] = (uint64_t)getpid();
    struct ksm_region_table *table = (struct ksm_region_table *)(map + REGIONS_OFFSET);
    copy_regions(table, ksm_stats_home->regions);
    stats_map = map;
    __atomic_store_n(&wiped->home.regions, table, __ATOMIC_RELEASE);
    __atomic_store_n(&wiped->home.slots, values, __ATOMIC_RELEASE);
    __atomic_store_n(&ksm_stats_home, &wiped->home, __ATOMIC_RELEASE);
}

/* Any failure leaves the counters in private memory. */
static void publish(void)
{
    int saved_errno = errno, cancel = ksm_cancel_off();
    char name[32];
    file_name(name, sizeof name);
    int dir_fd = open_stats_dir(0);
    if (dir_fd >= 0) {
        char *map = wiped || (wiped = map_wiped_page()) ? create_file(dir_fd, name) : NULL;
        if (map)
            start_file(map);
        close(dir_fd);
    }
    ksm_cancel_restore(cancel);
    errno = saved_errno;
}

static void say_refused(const char *dir)
{
    char shown[4 * 96 + 1], text[512];
    ksm_escape(shown, sizeof shown, dir, 96);
    snprintf(text, sizeof text,
             "counters not published: '%s' is not an absolute path, without symlinks, "
             "to a directory of uid %u that only it can write",
             shown, (unsigned)geteuid());
    ksm_say(text);
}

void ksm_stats_publish(const char *dir, int verbose)
{
    if (!dir || !*dir || strcmp(dir, "off") == 0)
        return;
    int dir_fd = -1;
    if (strlen(dir) < sizeof stats_dir) {
        strcpy(stats_dir, dir);
        dir_fd = open_stats_dir(1);
    }
    if (dir_fd < 0) {
        stats_dir[0] = '\0';
        if (verbose)
            say_refused(dir);
        return;
    }
    close(dir_fd);
    /* Most processes (shell utilities, subshells) never allocate anything large and
     * some leave with _exit: a process gets its file on its first large event. */
    __atomic_store_n(&publish_pending, 1, __ATOMIC_RELEASE);
}

/* Gauges describe live blocks, which a child inherits with the memory: they are kept. */
static int is_gauge(int slot)
{
    return slot == KSM_STAT_padding_bytes || slot == KSM_STAT_padded_blocks || slot == KSM_STAT_padding_table_bytes ||
           slot == KSM_STAT_cached_blocks || slot == KSM_STAT_cached_bytes;
}

/* A fork child's first write: counters of its own, from zero but for the configuration
 * and the gauges, and its parent's records (it has the same mappings); the parent's file
 * is unmapped, never written; the child gets a file of its own at its own first large event. */
static void take_over_counters(void)
{
    if (stats_map) {
        memcpy(private_slots, stats_map + HEADER_BYTES, KSM_STAT_COUNT * sizeof(uint64_t));
        copy_regions(&private_regions, (const struct ksm_region_table *)(stats_map + REGIONS_OFFSET));
        ksm_sys_munmap(stats_map, FILE_BYTES);
        stats_map = NULL;
    }
    for (int slot = KSM_STAT_heap_regions; slot < KSM_STAT_COUNT; slot++)
        if (!is_gauge(slot))
            private_slots[slot] = 0;
    private_slots[KSM_STAT_pid] = (uint64_t)getpid();
    __atomic_store_n(&wiped->home.regions, &private_regions, __ATOMIC_RELEASE);
    __atomic_store_n(&wiped->home.slots, private_slots, __ATOMIC_RELEASE);
    __atomic_store_n(&publish_pending, 1, __ATOMIC_RELEASE);
}

uint64_t *ksm_stats_in_fork_child(void)
{
    int saved_errno = errno;
    if (__atomic_exchange_n(&wiped->taking_over, 1, __ATOMIC_ACQUIRE) == 0)
        take_over_counters();
    while (!__atomic_load_n(&wiped->home.slots, __ATOMIC_ACQUIRE))
        sched_yield(); /* another thread of the child is taking them over */
    errno = saved_errno;
    return wiped->home.slots;
}

void ksm_stats_publish_pending(void)
{
    ksm_stats_slots(); /* a fork child takes its counters over first */
    if (__atomic_load_n(&publish_pending, __ATOMIC_ACQUIRE) &&
        __atomic_exchange_n(&publish_pending, 0, __ATOMIC_ACQ_REL))
        publish();
}

void ksm_stats_unpublish(void)
{
    if (!wiped || !wiped->file_ino)
        return; /* no file, or a fork child's parent's */
    char name[32];
    file_name(name, sizeof name);
    struct stat st;
    int dir_fd = open_stats_dir(0);
    if (dir_fd < 0)
        return;
    if (fstatat(dir_fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 && st.st_dev == wiped->file_dev &&
        st.st_ino == wiped->file_ino)
        unlinkat(dir_fd, name, 0);
    close(dir_fd);
}
