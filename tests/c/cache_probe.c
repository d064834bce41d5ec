/* The shim's cache of freed aligned blocks, seen from a program; run by tests/integration/test_guest.py.
 *   cache_probe phases   phases, each ended by a line on stdout and a line read from stdin:
 *                        "kept" (after a loop, 8 blocks of 64 KiB made and freed), "idle" (then
 *                        128 blocks of 20 KiB made and held), "threads" (12 threads each looped,
 *                        made and freed 4 blocks of 150 KiB, and wait), "joined" (those threads
 *                        have exited)
 *   cache_probe twice    frees a 64 KiB block twice on one thread
 *   cache_probe across   frees a 64 KiB block on a thread that stays, then again on main
 *   cache_probe pin      keeps a 12 KiB block above 100 MiB of small blocks, frees those, asks
 *                        for 16 more blocks; prints "freed KIB next KIB": RSS added after the
 *                        frees, and after those requests
 *   cache_probe emptied  keeps one block, misses 31 requests, then asks for a block of its size
 *                        once it holds free memory: the cache empties itself while serving
 *   cache_probe arena    (under jemalloc) frees a block of an arena of its own, destroys the
 *                        arena, asks for a block of that size: prints "ok", or "handed out" when
 *                        it got the destroyed arena's block back; "no jemalloc" without it
 *   cache_probe arena-realloc  the same, the block resized by realloc (in place) before its free */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "phase.h"

#define THREADS 12

static pthread_barrier_t freed, leave;

/* A few rounds of a loop first: a thread keeps blocks only once its requests show it reuses them. */
static void make_and_free(int count, size_t size)
{
    for (int round = 0; round < 4; round++)
        free(malloc(size));
    void *blocks[8];
    for (int i = 0; i < count; i++) {
        if (!(blocks[i] = malloc(size)))
            exit(2);
        memset(blocks[i], i + 1, size);
    }
    for (int i = 0; i < count; i++)
        free(blocks[i]);
}

static void *thread_caches(void *arg)
{
    (void)arg;
    make_and_free(4, 150 * 1024);
    pthread_barrier_wait(&freed);
    pthread_barrier_wait(&leave);
    return NULL;
}

static int run_phases(void)
{
    make_and_free(8, 64 * 1024);
    phase("kept");
    for (int i = 0; i < 128; i++)
        if (!malloc(20 * 1024)) /* held to the end: only misses */
            return 2;
    phase("idle");
    pthread_t threads[THREADS];
    pthread_barrier_init(&freed, NULL, THREADS + 1);
    pthread_barrier_init(&leave, NULL, THREADS + 1);
    for (int t = 0; t < THREADS; t++)
        if (pthread_create(&threads[t], NULL, thread_caches, NULL) != 0)
            return 2;
    pthread_barrier_wait(&freed);
    phase("threads");
    pthread_barrier_wait(&leave);
    for (int t = 0; t < THREADS; t++)
        pthread_join(threads[t], NULL);
    phase("joined");
    return 0;
}

static void *volatile shared_block;

static void *free_shared(void *arg)
{
    (void)arg;
    for (int round = 0; round < 4; round++) /* so that this thread keeps what it frees */
        free(malloc(64 * 1024));
    free(shared_block);
    pthread_barrier_wait(&freed);
    pthread_barrier_wait(&leave);
    return NULL;
}

static int free_across_threads(void)
{
    pthread_t thread;
    shared_block = malloc(64 * 1024);
    pthread_barrier_init(&freed, NULL, 2);
    pthread_barrier_init(&leave, NULL, 2);
    pthread_create(&thread, NULL, free_shared, NULL);
    pthread_barrier_wait(&freed);
    free(shared_block);
    pthread_barrier_wait(&leave);
    pthread_join(thread, NULL);
    return 0;
}

static long rss_kib(void)
{
    long pages = 0, resident = 0;
    FILE *statm = fopen("/proc/self/statm", "r");
    if (!statm || fscanf(statm, "%ld %ld", &pages, &resident) != 2)
        exit(2);
    fclose(statm);
    return resident * 4;
}

#define SMALL_BLOCKS (100 * 1024)

static int pin_free_memory(void)
{
    static char *small[SMALL_BLOCKS];
    make_and_free(0, 8192); /* the thread keeps blocks */
    long before = rss_kib();
    for (int i = 0; i < SMALL_BLOCKS; i++)
        memset(small[i] = malloc(1000), 1, 1000);
    free(memset(malloc(12 * 1024), 1, 12 * 1024)); /* kept, above the small blocks */
    for (int i = 0; i < SMALL_BLOCKS; i++)
        free(small[i]);
    long freed = rss_kib() - before;
    void *next[16];
    for (int i = 0; i < 16; i++)
        next[i] = malloc(8192);
    printf("freed %ld next %ld\n", freed, rss_kib() - before);
    for (int i = 0; i < 16; i++)
        free(next[i]);
    return 0;
}

static int empty_while_serving(void)
{
    static char *small[SMALL_BLOCKS];
    make_and_free(0, 12 * 1024);             /* the thread keeps blocks */
    memset(malloc(12 * 1024), 1, 12 * 1024); /* the block it kept, taken back and held */
    for (int i = 0; i < SMALL_BLOCKS; i++)
        memset(small[i] = malloc(1000), 1, 1000);
    free(memset(malloc(12 * 1024), 1, 12 * 1024)); /* the one kept block, above the small ones */
    for (int i = 0; i < 31; i++)                   /* requests it cannot serve, held */
        if (!malloc(20 * 1024))
            return 2;
    for (int i = 0; i < SMALL_BLOCKS; i++)
        free(small[i]);
    free(malloc(12 * 1024));
    printf("ok\n");
    return 0;
}

typedef int (*mallctl_fn)(const char *, void *, size_t *, void *, size_t);
typedef void *(*mallocx_fn)(size_t, int);
#define ARENA_FLAG(a) ((int)(((unsigned)(a) + 1) << 20)) /* MALLOCX_ARENA */
#define NO_TCACHE (1 << 8)                               /* MALLOCX_TCACHE_NONE */
#define PAGE_ALIGN_FLAG 12                               /* MALLOCX_LG_ALIGN(12) */

static int destroyed_arena_block(int resize)
{
    mallctl_fn mallctl = (mallctl_fn)dlsym(RTLD_DEFAULT, "mallctl");
    mallocx_fn mallocx = (mallocx_fn)dlsym(RTLD_DEFAULT, "mallocx");
    if (!mallctl || !mallocx) {
        printf("no jemalloc\n");
        return 0;
    }
    for (int round = 0; round < 8; round++) /* a loop: the thread's cache finds keeping worth it */
        free(malloc(16 * 1024));
    unsigned arena;
    size_t size = sizeof arena;
    if (mallctl("arenas.create", &arena, &size, NULL, 0) != 0)
        return 1;
    char *block = mallocx(16 * 1024, ARENA_FLAG(arena) | NO_TCACHE | PAGE_ALIGN_FLAG);
    if (!block)
        return 1;
    memset(block, 1, 16 * 1024);
    if (resize) /* through the shim's realloc: jemalloc resizes it in place, in its arena */
        block = realloc(block, 12 * 1024);
    free(block);
    char name[64];
    snprintf(name, sizeof name, "arena.%u.destroy", arena);
    if (mallctl(name, NULL, NULL, NULL, 0) != 0)
        return 1;
    char *again = malloc(resize ? 12 * 1024 : 16 * 1024);
    printf(again == block ? "handed out\n" : "ok\n");
    free(again);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && !strcmp(argv[1], "phases"))
        return run_phases();
    if (argc == 2 && !strcmp(argv[1], "twice")) {
        shared_block = malloc(64 * 1024);
        free(shared_block);
        free(shared_block);
        return 0;
    }
    if (argc == 2 && !strcmp(argv[1], "across"))
        return free_across_threads();
    if (argc == 2 && !strcmp(argv[1], "pin"))
        return pin_free_memory();
    if (argc == 2 && !strcmp(argv[1], "emptied"))
        return empty_while_serving();
    if (argc == 2 && !strcmp(argv[1], "arena"))
        return destroyed_arena_block(0);
    if (argc == 2 && !strcmp(argv[1], "arena-realloc"))
        return destroyed_arena_block(1);
    fprintf(stderr, "usage: cache_probe phases|twice|across|pin|emptied|arena|arena-realloc\n");
    return 2;
}
