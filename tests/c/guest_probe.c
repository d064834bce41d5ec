/* What the shim may cost its host, measured from inside; run by tests/integration/test_guest.py.
 *   guest_probe calloc MIB      calloc MIB MiB, check it reads zero, print the RSS it added (KiB);
 *                               with GUEST_PROBE_LIFT set, after freeing a 30 MiB block
 *   guest_probe reused SIZE     rounds of malloc(SIZE) filled with 0xab, free, calloc(SIZE):
 *                               prints "zeroed" when every calloc read zero throughout
 *   guest_probe padding         phases, each ended by a line on stdout and a line read from stdin:
 *                               "live" (blocks of many sizes held), "freed" (all freed),
 *                               "churned" (alloc/free/realloc churn, nothing held)
 *   guest_probe arena           a thread allocates 100000 bytes from its own arena, prints
 *                               "block <addr> stack <addr>" and waits for a line on stdin
 *   guest_probe refill          a thread fills its arena with 2,500 blocks of 60,000 bytes,
 *                               frees them (glibc deletes the emptied heaps), fills it again,
 *                               prints "refilled" and waits for a line on stdin
 *   guest_probe longpath DIR    maps a file whose path (under DIR) is near PATH_MAX, then runs
 *                               `arena`: a maps line longer than a read buffer
 *   guest_probe aligned0 SIZE   prints whether aligned_alloc(0, SIZE) and memalign(0, SIZE) succeed
 *   guest_probe churn SIZE N    N rounds of malloc(SIZE), a write to each of its pages, free;
 *                               prints "faults F peak_kib P" (minor faults, VmHWM)
 *   guest_probe forkfree        holds blocks of many sizes and forks; the child frees them, maps
 *                               1 MiB, prints "child" and waits for a line on stdin */
#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "phase.h"
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* A "Name: N kB" line of /proc/self/status. */
static long status_kib(const char *name)
{
    char line[256];
    long kib = -1;
    size_t length = strlen(name);
    FILE *status = fopen("/proc/self/status", "r");
    while (status && fgets(line, sizeof line, status))
        if (strncmp(line, name, length) == 0 && sscanf(line + length, " %ld kB", &kib) == 1)
            break;
    if (status)
        fclose(status);
    return kib;
}

static long rss_kib(void) { return status_kib("VmRSS:"); }

static int probe_calloc(size_t mib)
{
    size_t size = mib << 20;
    if (getenv("GUEST_PROBE_LIFT")) { /* a 30 MiB block freed lifts glibc's mmap threshold */
        volatile char *lift = malloc((size_t)30 << 20);
        lift[0] = 1;
        free((void *)lift);
    }
    long before = rss_kib();
    volatile unsigned char *block = calloc(1, size);
    if (!block)
        return 2;
    for (size_t at = 0; at < size; at += 4096)
        if (block[at] != 0 || block[at + 4095] != 0)
            return printf("not zero at %zu\n", at), 1;
    printf("rss_added_kib %ld\n", rss_kib() - before);
    free((void *)block);
    return 0;
}

static int probe_reused(size_t size)
{
    for (int round = 0; round < 4; round++) {
        unsigned char *dirty = malloc(size);
        memset(dirty, 0xab, round % 2 ? size / 2 : size); /* half-used memory too */
        free(dirty);
        unsigned char *block = calloc(1, size);
        for (size_t at = 0; at < size; at++)
            if (block[at] != 0)
                return printf("round %d: byte %zu is %d\n", round, at, block[at]), 1;
        free(block);
    }
    printf("zeroed\n");
    return 0;
}

static const size_t sizes[] = {8192, 10000, 12288, 20000, 65536, 100000, 300000, 1 << 20, 5000000};
#define SIZES (sizeof sizes / sizeof sizes[0])

static int probe_padding(void)
{
    void *held[4 * SIZES];
    for (size_t i = 0; i < SIZES; i++) {
        held[4 * i] = malloc(sizes[i]);
        held[4 * i + 1] = calloc(1, sizes[i]);
        held[4 * i + 2] = realloc(malloc(100), sizes[i]);
        if (posix_memalign(&held[4 * i + 3], 64, sizes[i]) != 0)
            return 2;
    }
    phase("live");
    for (size_t i = 0; i < 4 * SIZES; i++)
        free(held[i]);
    phase("freed");
    for (int round = 0; round < 10000; round++) {
        size_t size = sizes[round % SIZES];
        void *block = malloc(size);
        block = realloc(block, round % 3 ? size * 2 : 64); /* grow, or shrink below the threshold */
        free(block);
    }
    phase("churned");
    return 0;
}

static void *arena_thread(void *unused)
{
    int on_stack = 0;
    (void)unused;
    void *block = malloc(100000);
    memset(block, 1, 100000);
    printf("block %p stack %p\n", block, (void *)&on_stack);
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return block;
    return block;
}

static int probe_arena(void)
{
    pthread_t thread;
    return pthread_create(&thread, NULL, arena_thread, NULL) || pthread_join(thread, NULL);
}

#define REFILL_BLOCKS 2500
static void *refill_thread(void *unused)
{
    static void *blocks[REFILL_BLOCKS];
    (void)unused;
    for (int round = 0; round < 2; round++) {
        for (int i = 0; i < REFILL_BLOCKS; i++)
            memset(blocks[i] = malloc(60000), 7, 60000);
        if (round == 0)
            for (int i = REFILL_BLOCKS - 1; i >= 0; i--)
                free(blocks[i]);
    }
    phase("refilled");
    return NULL;
}

static int probe_refill(void)
{
    pthread_t thread;
    return pthread_create(&thread, NULL, refill_thread, NULL) || pthread_join(thread, NULL);
}

static int probe_longpath(const char *directory)
{
    char path[4200];
    snprintf(path, sizeof path, "%s", directory);
    while (strlen(path) < 4000) {
        strcat(path, "/");
        for (int i = 0; i < 200 && strlen(path) < 4070; i++)
            strcat(path, "a");
        if (mkdir(path, 0700) != 0)
            return 2;
    }
    strcat(path, "/f");
    int fd = open(path, O_RDWR | O_CREAT, 0600);
    if (fd < 0 || ftruncate(fd, 4096) != 0)
        return 2;
    /* low in the address space: its line comes before the arena's in the maps */
    if (mmap((void *)0x100000000, 4096, PROT_READ, MAP_SHARED, fd, 0) == MAP_FAILED)
        return 2;
    return probe_arena();
}

static int probe_aligned0(size_t size)
{
    void *a = aligned_alloc(0, size), *m = memalign(0, size);
    printf("aligned_alloc %s memalign %s\n", a ? "ok" : "null", m ? "ok" : "null");
    free(a);
    free(m);
    return 0;
}

static int probe_forkfree(void)
{
    void *held[SIZES];
    for (size_t i = 0; i < SIZES; i++)
        held[i] = malloc(sizes[i]);
    pid_t child = fork();
    if (child == 0) {
        for (size_t i = 0; i < SIZES; i++)
            free(held[i]);
        /* a large event with no padding, so that the child publishes its counters */
        if (mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) == MAP_FAILED)
            _exit(2);
        phase("child");
        _exit(0);
    }
    int status = 0;
    waitpid(child, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

static int probe_churn(size_t size, long rounds)
{
    for (long round = 0; round < rounds; round++) {
        volatile char *block = malloc(size);
        if (!block)
            return 2;
        for (size_t at = 0; at < size; at += 4096)
            block[at] = (char)round;
        free((void *)block);
    }
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    printf("faults %ld peak_kib %ld\n", usage.ru_minflt, status_kib("VmHWM:"));
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 3 && strcmp(argv[1], "calloc") == 0)
        return probe_calloc(strtoul(argv[2], NULL, 10));
    if (argc >= 3 && strcmp(argv[1], "reused") == 0)
        return probe_reused(strtoul(argv[2], NULL, 10));
    if (argc >= 2 && strcmp(argv[1], "padding") == 0)
        return probe_padding();
    if (argc >= 2 && strcmp(argv[1], "arena") == 0)
        return probe_arena();
    if (argc >= 2 && strcmp(argv[1], "refill") == 0)
        return probe_refill();
    if (argc >= 3 && strcmp(argv[1], "longpath") == 0)
        return probe_longpath(argv[2]);
    if (argc >= 4 && strcmp(argv[1], "churn") == 0)
        return probe_churn(strtoul(argv[2], NULL, 10), strtol(argv[3], NULL, 10));
    if (argc >= 2 && strcmp(argv[1], "forkfree") == 0)
        return probe_forkfree();
    if (argc >= 3 && strcmp(argv[1], "aligned0") == 0)
        return probe_aligned0(strtoul(argv[2], NULL, 10));
    fprintf(stderr, "usage: guest_probe calloc MIB | reused SIZE | padding | arena | aligned0 SIZE | forkfree | churn "
                    "SIZE N | refill | longpath DIR\n");
    return 2;
}
