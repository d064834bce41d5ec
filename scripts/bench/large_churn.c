/* Large-block churn, the way real programs allocate: scripts/bench_large_churn.py runs it
 * with and without the shim. usage: large_churn PATTERN SIZE ROUNDS
 *   loop      malloc, write one byte in each page, free
 *   calloc    the same with calloc (each page read, and written once)
 *   realloc   malloc(SIZE/16), realloc doubling up to SIZE, writing each new page, free
 *   threads   two threads, each running `loop` for ROUNDS/2
 *   handoff   one thread allocates and writes, another frees (a queue of 16 blocks)
 *   mixed     four blocks of SIZE to SIZE + 6 pages in rotation, each round also replacing
 *             one of 4,096 long-lived small blocks (16-915 bytes) in turn
 * Prints one JSON line: seconds of the loop, minor faults, peak RSS (VmHWM: getrusage's
 * ru_maxrss survives exec and would show the parent's), a checksum of what was read back
 * (the same with and without the shim, or the shim changed a result). */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#define PAGE 4096
static size_t size;
static long rounds;

static uint64_t touch(volatile unsigned char *block, size_t from, size_t to, long round)
{
    uint64_t sum = 0;
    for (size_t at = from; at < to; at += PAGE) {
        sum += block[at];
        block[at] = (unsigned char)(round + at / PAGE);
    }
    return sum + block[from];
}

static uint64_t run_loop(long count, int zeroed)
{
    uint64_t sum = 0;
    for (long round = 0; round < count; round++) {
        unsigned char *block = zeroed ? calloc(1, size) : malloc(size);
        if (!block)
            exit(2);
        sum += zeroed ? touch(block, 0, size, round) : (touch(block, 0, size, round), 0);
        free(block);
    }
    return sum;
}

static uint64_t run_realloc(void)
{
    uint64_t sum = 0;
    for (long round = 0; round < rounds; round++) {
        size_t have = size / 16 < 16 ? 16 : size / 16;
        unsigned char *block = malloc(have);
        touch(block, 0, have, round);
        while (have < size) {
            size_t want = have * 2 < size ? have * 2 : size;
            if (!(block = realloc(block, want)))
                exit(2);
            touch(block, have, want, round);
            have = want;
        }
        sum += block[0];
        free(block);
    }
    return sum;
}

static uint64_t run_mixed(void)
{
    static void *blocks[4], *small[4096];
    unsigned seed = 12345;
    for (long round = 0; round < rounds; round++) {
        int slot = (int)(round % 4), small_slot = (int)(round % 4096);
        free(blocks[slot]);
        size_t length = size + (size_t)(round % 7) * PAGE;
        if (!(blocks[slot] = malloc(length)))
            exit(2);
        touch(blocks[slot], 0, length, round);
        free(small[small_slot]);
        small[small_slot] = malloc((size_t)(rand_r(&seed) % 900 + 16));
    }
    uint64_t sum = 0;
    for (int i = 0; i < 4; i++)
        sum += ((unsigned char *)blocks[i])[0];
    return sum;
}

static void *loop_thread(void *count)
{
    run_loop((long)(intptr_t)count, 0);
    return NULL;
}

static uint64_t run_threads(void)
{
    pthread_t a, b;
    pthread_create(&a, NULL, loop_thread, (void *)(intptr_t)(rounds / 2));
    pthread_create(&b, NULL, loop_thread, (void *)(intptr_t)(rounds / 2));
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    return 0;
}

#define QUEUE 16
static void *queue[QUEUE];
static long produced, consumed;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed = PTHREAD_COND_INITIALIZER;

static void *consumer(void *unused)
{
    (void)unused;
    for (long round = 0; round < rounds; round++) {
        pthread_mutex_lock(&lock);
        while (consumed == produced)
            pthread_cond_wait(&changed, &lock);
        void *block = queue[consumed % QUEUE];
        consumed++;
        pthread_cond_broadcast(&changed);
        pthread_mutex_unlock(&lock);
        free(block);
    }
    return NULL;
}

static uint64_t run_handoff(void)
{
    pthread_t other;
    pthread_create(&other, NULL, consumer, NULL);
    for (long round = 0; round < rounds; round++) {
        unsigned char *block = malloc(size);
        touch(block, 0, size, round);
        pthread_mutex_lock(&lock);
        while (produced - consumed == QUEUE)
            pthread_cond_wait(&changed, &lock);
        queue[produced % QUEUE] = block;
        produced++;
        pthread_cond_broadcast(&changed);
        pthread_mutex_unlock(&lock);
    }
    pthread_join(other, NULL);
    return 0;
}

static long peak_rss_kib(void)
{
    char line[256];
    long kib = -1;
    FILE *status = fopen("/proc/self/status", "r");
    while (status && fgets(line, sizeof line, status))
        if (sscanf(line, "VmHWM: %ld kB", &kib) == 1)
            break;
    if (status)
        fclose(status);
    return kib;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: large_churn loop|calloc|realloc|threads|handoff|mixed SIZE ROUNDS\n");
        return 2;
    }
    const char *pattern = argv[1];
    size = strtoul(argv[2], NULL, 10);
    rounds = strtol(argv[3], NULL, 10);
    struct timespec start, end;
    struct rusage usage;
    uint64_t sum = 0;
    clock_gettime(CLOCK_MONOTONIC, &start);
    if (!strcmp(pattern, "loop") || !strcmp(pattern, "calloc"))
        sum = run_loop(rounds, pattern[0] == 'c');
    else if (!strcmp(pattern, "realloc"))
        sum = run_realloc();
    else if (!strcmp(pattern, "threads"))
        sum = run_threads();
    else if (!strcmp(pattern, "handoff"))
        sum = run_handoff();
    else if (!strcmp(pattern, "mixed"))
        sum = run_mixed();
    else
        return 2;
    clock_gettime(CLOCK_MONOTONIC, &end);
    getrusage(RUSAGE_SELF, &usage);
    printf("{\"seconds\": %.6f, \"minor_faults\": %ld, \"max_rss_kib\": %ld, \"checksum\": %llu}\n",
           (double)(end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) / 1e9, usage.ru_minflt,
           peak_rss_kib(), (unsigned long long)sum);
    return 0;
}
