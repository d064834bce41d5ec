/* malloc_heavy: a malloc-heavy workload for measuring what an allocator shim
 * (libksmpreload.so) costs. Each thread keeps a working set of blocks and, for
 * M iterations, picks a slot at random: an empty slot gets a new block (malloc,
 * sometimes calloc), a full one is freed or, sometimes, realloc'ed. So blocks
 * are freed in a varying order, not LIFO. Sizes are 8..1024 bytes, mostly small;
 * --large-fraction makes that fraction of new blocks 16 KiB..256 KiB.
 *
 * Every block is written (first and last byte) and read back when freed; the
 * bytes read go into a checksum that depends only on the arguments, never on
 * addresses, so it must be identical with any allocator and with or without a
 * shim. Pointers escape through an empty asm (as in heaptrack's
 * tests/benchutil.h) so the compiler cannot drop malloc/free pairs.
 *
 * Prints one JSON line: threads, iterations (per thread), seconds (wall time of
 * the allocation loops, CLOCK_MONOTONIC, from the start barrier to the last
 * join), ops (allocator calls made in that time), checksum.
 *
 * Build: cc -O2 -pthread -o malloc_heavy malloc_heavy.c */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static inline void escape(void *p)
{
    __asm__ volatile("" : : "g"(p) : "memory");
}

struct options {
    int threads;
    long iterations;
    long slots;
    double large_fraction;
    uint64_t seed;
};

struct worker {
    pthread_t thread;
    int index;
    const struct options *opt;
    pthread_barrier_t *start;
    uint64_t checksum;
    uint64_t ops;
    int failed;
};

static inline uint64_t next_random(uint64_t *state) /* xorshift64* */
{
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

/* 8..1024 bytes, mostly small: 60% 8..64, 30% 65..256, 10% 257..1024.
 * A fraction `large_cut / 2^32` of them is 16 KiB..256 KiB instead. */
static inline size_t pick_size(uint64_t r, uint32_t large_cut)
{
    uint32_t low = (uint32_t)r;
    uint32_t high = (uint32_t)(r >> 32);
    if (low < large_cut)
        return 16384 + high % (262144 - 16384 + 1);
    unsigned bucket = high % 10;
    high /= 10;
    if (bucket < 6)
        return 8 + high % 57;
    if (bucket < 9)
        return 65 + high % 192;
    return 257 + high % 768;
}

static inline unsigned char tag_of(uint64_t r) { return (unsigned char)((r >> 56) | 1); }

struct slot {
    unsigned char *p;
    size_t size;
};

/* The timed part, kept out of line so callgrind can count it alone (--toggle-collect=allocation_loop). */
__attribute__((noinline)) void allocation_loop(struct worker *w, struct slot *slots)
{
    const struct options *opt = w->opt;
    uint64_t state = opt->seed * 0x9E3779B97F4A7C15ULL + (uint64_t)w->index * 0xD1B54A32D192ED03ULL + 1;
    double cut = opt->large_fraction * 4294967296.0;
    uint32_t large_cut = cut > 4294967295.0 ? 4294967295u : (uint32_t)cut;
    long nslots = opt->slots;
    uint64_t sum = 0, ops = 0;

    for (long i = 0; i < opt->iterations; i++) {
        uint64_t r = next_random(&state);
        struct slot *s = &slots[(r >> 40) % (uint64_t)nslots];
        unsigned choice = (unsigned)(r >> 32) & 15;
        uint64_t r2 = next_random(&state);
        if (!s->p) {
            size_t size = pick_size(r2, large_cut);
            unsigned char *p;
            if (choice == 0) { /* 1 in 16 new blocks: calloc, which must come back zeroed */
                p = calloc(1, size);
                if (p)
                    sum += (uint64_t)p[0] + p[size - 1] + p[size / 2];
            } else {
                p = malloc(size);
            }
            ops++;
            if (!p) {
                w->failed = 1;
                break;
            }
            p[0] = tag_of(r2);
            p[size - 1] = (unsigned char)(tag_of(r2) ^ 0x5a);
            escape(p);
            s->p = p;
            s->size = size;
        } else if (choice < 3) { /* 3 in 16 full slots: realloc, contents must survive */
            size_t size = pick_size(r2, large_cut);
            size_t keep = size < s->size ? size : s->size;
            unsigned char first = s->p[0], last_kept = s->p[keep - 1];
            unsigned char *p = realloc(s->p, size);
            ops++;
            if (!p) {
                w->failed = 1;
                break;
            }
            escape(p);
            sum += (uint64_t)(p[0] == first) + (uint64_t)(p[keep - 1] == last_kept) * 2 + p[0];
            p[size - 1] = (unsigned char)(tag_of(r2) ^ 0xa5);
            s->p = p;
            s->size = size;
        } else { /* the rest: free, in whatever order the slots come up */
            sum = sum * 31 + s->p[0] + ((uint64_t)s->p[s->size - 1] << 8) + s->size;
            escape(s->p);
            free(s->p);
            ops++;
            s->p = NULL;
        }
    }
    for (long k = 0; k < nslots; k++) /* what is left, freed in slot order */
        if (slots[k].p) {
            sum += slots[k].p[0] + slots[k].size;
            free(slots[k].p);
            ops++;
            slots[k].p = NULL;
        }
    w->checksum = sum;
    w->ops = ops;
}

static void *bench_thread(void *arg)
{
    struct worker *w = arg;
    /* Untimed: allocated before the start barrier. */
    struct slot *slots = calloc((size_t)w->opt->slots, sizeof *slots);
    if (!slots)
        w->failed = 1;
    pthread_barrier_wait(w->start);
    if (slots)
        allocation_loop(w, slots);
    free(slots);
    return NULL;
}

static void usage(const char *name)
{
    fprintf(stderr,
            "usage: %s [-t THREADS] [-n ITERATIONS] [-w SLOTS] [-l LARGE_FRACTION] [-s SEED]\n"
            "  -t threads (default 2)\n"
            "  -n iterations per thread (default 4000000)\n"
            "  -w working-set slots per thread (default 4096)\n"
            "  -l fraction of new blocks that are 16 KiB..256 KiB (default 0)\n"
            "  -s seed (default 1)\n",
            name);
}

int main(int argc, char **argv)
{
    struct options opt = {2, 4000000, 4096, 0.0, 1};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v || a[0] != '-' || a[1] == '\0' || a[2] != '\0') {
            usage(argv[0]);
            return 2;
        }
        char *end;
        switch (a[1]) {
        case 't': opt.threads = (int)strtol(v, &end, 10); break;
        case 'n': opt.iterations = strtol(v, &end, 10); break;
        case 'w': opt.slots = strtol(v, &end, 10); break;
        case 'l': opt.large_fraction = strtod(v, &end); break;
        case 's': opt.seed = strtoull(v, &end, 10); break;
        default: usage(argv[0]); return 2;
        }
        if (*end != '\0') {
            usage(argv[0]);
            return 2;
        }
        i++;
    }
    if (opt.threads < 1 || opt.iterations < 0 || opt.slots < 1 || opt.large_fraction < 0 || opt.large_fraction > 1) {
        usage(argv[0]);
        return 2;
    }

    struct worker *workers = calloc((size_t)opt.threads, sizeof *workers);
    pthread_barrier_t start;
    if (!workers || pthread_barrier_init(&start, NULL, (unsigned)opt.threads + 1) != 0) {
        fprintf(stderr, "malloc_heavy: setup failed\n");
        return 1;
    }
    for (int t = 0; t < opt.threads; t++) {
        workers[t].index = t;
        workers[t].opt = &opt;
        workers[t].start = &start;
        if (pthread_create(&workers[t].thread, NULL, bench_thread, &workers[t]) != 0) {
            fprintf(stderr, "malloc_heavy: pthread_create failed\n");
            return 1;
        }
    }
    struct timespec t0, t1;
    pthread_barrier_wait(&start);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int t = 0; t < opt.threads; t++)
        pthread_join(workers[t].thread, NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);

    uint64_t checksum = 0, ops = 0;
    int failed = 0;
    for (int t = 0; t < opt.threads; t++) {
        /* combined per thread index, so the order threads finish in does not matter */
        checksum ^= workers[t].checksum * (2 * (uint64_t)t + 1);
        ops += workers[t].ops;
        failed |= workers[t].failed;
    }
    if (failed) {
        fprintf(stderr, "malloc_heavy: an allocation failed\n");
        return 1;
    }
    double seconds = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("{\"threads\":%d,\"iterations\":%ld,\"seconds\":%.6f,\"ops\":%llu,\"checksum\":\"%016llx\"}\n",
           opt.threads, opt.iterations, seconds, (unsigned long long)ops, (unsigned long long)checksum);
    free(workers);
    return 0;
}
