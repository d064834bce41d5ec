/* The shim's cache of freed aligned blocks, seen from a program; run by tests/test_guest.py.
 *   cache_probe phases   phases, each ended by a line on stdout and a line read from stdin:
 *                        "kept" (8 blocks of 64 KiB made and freed), "idle" (then 128 blocks of
 *                        20 KiB made and held), "threads" (12 threads each made and freed 4
 *                        blocks of 200 KiB and wait), "joined" (those threads have exited)
 *   cache_probe twice    frees a 64 KiB block twice on one thread
 *   cache_probe across   frees a 64 KiB block on a thread that stays, then again on main */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "phase.h"

#define THREADS 12

static pthread_barrier_t freed, leave;


static void make_and_free(int count, size_t size)
{
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
    make_and_free(4, 200 * 1024);
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
    fprintf(stderr, "usage: cache_probe phases|twice|across\n");
    return 2;
}
