/* Random large and small allocations in several threads that share their blocks (a block
 * is often freed by another thread than the one that made it), each block filled with a
 * pattern that is checked before it is freed or reallocated; run by tests/integration/test_large_blocks.py,
 * alone and under the shim, with glibc's tunables varied. Any block that reads back wrong,
 * is not aligned as asked, or is smaller than asked ends the run with exit 1; glibc aborts
 * on a corrupt heap of its own accord.
 *   mix_probe SEED ROUNDS THREADS   prints "ok"
 *   mix_probe handoff SIZE ROUNDS   one thread mallocs and fills blocks of SIZE, another
 *                                   checks and frees them, 16 in flight; prints "ok"
 *   mix_probe huge                  asks malloc, posix_memalign, aligned_alloc and calloc for
 *                                   sizes a page short of SIZE_MAX; prints what each returned */
#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SLOTS 192

struct slot {
    pthread_mutex_t lock;
    unsigned char *block;
    size_t size;
    unsigned char fill;
};

static struct slot slots[SLOTS];

static unsigned seed;
static long rounds;

static void fail(const char *what, size_t size)
{
    fprintf(stderr, "mix_probe: %s (size %zu)\n", what, size);
    exit(1);
}

/* Mostly 8 KiB to 2 MiB, some small, a few up to 20 MiB. */
static size_t random_size(unsigned *state)
{
    unsigned pick = rand_r(state) % 100;
    if (pick < 15)
        return 1 + rand_r(state) % 4096;
    if (pick < 95)
        return 8192 + (size_t)rand_r(state) % (2u << 20);
    return (4u << 20) + (size_t)rand_r(state) % (16u << 20);
}

/* What a block holds at `at`: its fill byte, with a stamp every 512 bytes. */
static unsigned char expected(const struct slot *slot, size_t at)
{
    return at % 512 ? slot->fill : (unsigned char)(slot->fill ^ (at / 512 % 255 + 1));
}

static void check(const struct slot *slot, size_t length)
{
    for (size_t at = 0; at < length; at += 512)
        for (size_t probe = at; probe < at + 512 && probe < length; probe += 85)
            if (slot->block[probe] != expected(slot, probe))
                fail("a block does not hold what was written to it", slot->size);
    if (length && slot->block[length - 1] != expected(slot, length - 1))
        fail("a block does not hold what was written to its end", slot->size);
}

static void fill(struct slot *slot, size_t from)
{
    memset(slot->block + from, slot->fill, slot->size - from);
    for (size_t at = (from + 511) / 512 * 512; at < slot->size; at += 512)
        slot->block[at] = expected(slot, at);
}

static void *allocate(unsigned *state, size_t size, int *zeroed, size_t *alignment)
{
    void *block = NULL;
    *zeroed = 0;
    *alignment = size < 16 ? 8 : 16; /* tcmalloc gives blocks under 16 bytes 8-byte alignment */
    switch (rand_r(state) % 5) {
    case 0:
        *zeroed = 1;
        return calloc(1, size);
    case 1:
        *alignment = 4096;
        return posix_memalign(&block, 4096, size) ? NULL : block;
    case 2:
        *alignment = 64;
        return aligned_alloc(64, (size + 63) & ~(size_t)63);
    default:
        return malloc(size);
    }
}

static void replace(unsigned *state, struct slot *slot)
{
    if (slot->block) {
        check(slot, slot->size);
        if (rand_r(state) % 3 == 0) { /* realloc: the old bytes must come along */
            size_t size = random_size(state);
            unsigned char *moved = realloc(slot->block, size);
            if (!moved)
                fail("realloc failed", size);
            size_t kept = size < slot->size ? size : slot->size;
            slot->block = moved;
            slot->size = kept;
            check(slot, kept);
            slot->size = size;
            fill(slot, kept);
            return;
        }
        free(slot->block);
    }
    int zeroed;
    size_t alignment;
    slot->size = random_size(state);
    slot->block = allocate(state, slot->size, &zeroed, &alignment);
    if (!slot->block)
        fail("allocation failed", slot->size);
    if ((uintptr_t)slot->block % alignment)
        fail("a block is not aligned as asked", slot->size);
    if (malloc_usable_size(slot->block) < slot->size)
        fail("malloc_usable_size is smaller than the request", slot->size);
    for (size_t at = 0; zeroed && at < slot->size; at++)
        if (slot->block[at])
            fail("calloc gave a block that is not zero", slot->size);
    slot->fill = (unsigned char)rand_r(state);
    fill(slot, 0);
}

static void *worker(void *number)
{
    unsigned state = seed * 7919u + (unsigned)(uintptr_t)number;
    for (long round = 0; round < rounds; round++) {
        struct slot *slot = &slots[rand_r(&state) % SLOTS];
        pthread_mutex_lock(&slot->lock);
        replace(&state, slot);
        pthread_mutex_unlock(&slot->lock);
    }
    return NULL;
}

#define QUEUE 16
static struct slot queue[QUEUE];
static long produced, consumed;
static pthread_mutex_t queue_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t queue_changed = PTHREAD_COND_INITIALIZER;

static void *consumer(void *unused)
{
    (void)unused;
    for (long round = 0; round < rounds; round++) {
        pthread_mutex_lock(&queue_lock);
        while (consumed == produced)
            pthread_cond_wait(&queue_changed, &queue_lock);
        struct slot slot = queue[consumed % QUEUE];
        consumed++;
        pthread_cond_broadcast(&queue_changed);
        pthread_mutex_unlock(&queue_lock);
        check(&slot, slot.size);
        free(slot.block);
    }
    return NULL;
}

/* The pattern that frees a chunk while the chunk after it is being made: glibc changes the
 * flag bits of the later chunk's size word as the shim may be writing it. */
static int handoff(size_t size)
{
    pthread_t other;
    pthread_create(&other, NULL, consumer, NULL);
    for (long round = 0; round < rounds; round++) {
        struct slot slot = {.size = size, .fill = (unsigned char)round, .block = malloc(size)};
        if (!slot.block)
            fail("malloc failed", size);
        fill(&slot, 0);
        pthread_mutex_lock(&queue_lock);
        while (produced - consumed == QUEUE)
            pthread_cond_wait(&queue_changed, &queue_lock);
        queue[produced % QUEUE] = slot;
        produced++;
        pthread_cond_broadcast(&queue_changed);
        pthread_mutex_unlock(&queue_lock);
    }
    pthread_join(other, NULL);
    puts("ok");
    return 0;
}

static int huge(void)
{
    volatile size_t size = SIZE_MAX - 100;
    void *block = NULL;
    void *from_malloc = malloc(size);
    int memalign_error = posix_memalign(&block, 4096, size);
    void *from_aligned_alloc = aligned_alloc(4096, size & ~(size_t)4095);
    void *from_calloc = calloc(2, size / 2 - 10);
    printf("malloc %s posix_memalign %d aligned_alloc %s calloc %s\n", from_malloc ? "block" : "null", memalign_error,
           from_aligned_alloc ? "block" : "null", from_calloc ? "block" : "null");
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "huge") == 0)
        return huge();
    if (argc == 4 && strcmp(argv[1], "handoff") == 0) {
        rounds = strtol(argv[3], NULL, 10);
        return handoff(strtoul(argv[2], NULL, 10));
    }
    if (argc != 4) {
        fprintf(stderr, "usage: mix_probe SEED ROUNDS THREADS | handoff SIZE ROUNDS\n");
        return 2;
    }
    seed = (unsigned)strtoul(argv[1], NULL, 10);
    rounds = strtol(argv[2], NULL, 10);
    int threads = atoi(argv[3]);
    pthread_t ids[16];
    if (threads < 1 || threads > 16)
        return 2;
    for (int i = 0; i < SLOTS; i++)
        pthread_mutex_init(&slots[i].lock, NULL);
    for (int i = 0; i < threads; i++)
        pthread_create(&ids[i], NULL, worker, (void *)(uintptr_t)i);
    for (int i = 0; i < threads; i++)
        pthread_join(ids[i], NULL);
    for (int i = 0; i < SLOTS; i++)
        if (slots[i].block) {
            check(&slots[i], slots[i].size);
            free(slots[i].block);
        }
    malloc_trim(0); /* walks every arena: a corrupt chunk list aborts here */
    puts("ok");
    return 0;
}
