/* Freed page-aligned blocks, kept a while for the same thread's next aligned request.
 *
 * An aligned block costs the shim more than the allocator's own small loop costs it: glibc
 * cuts it out of a larger chunk and frees the parts around it (three calls for one), and every
 * allocator's block is then looked up and counted. An alloc/free loop of 8 KiB blocks ran 2-4x
 * slower than the allocator alone (docs/BENCHMARKS.md, "Large blocks"). A thread's last few
 * freed aligned blocks are kept here and handed back to its next request of about their size.
 *
 * Each thread has its own slots, touched by that thread alone: no lock, no atomic. A thread
 * takes its byte allotment from the process's bound when it first keeps a block, and gives the
 * allotment and its blocks back when it exits, through a pthread key's destructor (the key is
 * taken once, by the constructor). Not __cxa_thread_atexit_impl, which C++ thread_local uses:
 * it takes the loader's lock, and a thread that a dlopen'ed library's constructor started and
 * joined hung in free. Once the destructor has run, the thread's later frees go straight to
 * the allocator; a cache first opened by another key's destructor makes glibc call this one
 * (up to PTHREAD_DESTRUCTOR_ITERATIONS rounds): only a cache first opened in the last round,
 * after this key's turn, keeps its blocks (and its allotment) for good. A block lives in one cache at a time; a word
 * inside it holds a secret of the shim's, mixed with its address, while it is kept, so that a
 * second free of it, on any thread, is seen (the program's allocator would have seen it too). */
#define _GNU_SOURCE
#include "block_cache.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "config.h"
#include "stats.h"

enum cache_state { UNOPENED, OPEN, CLOSED };

/* A thread keeps blocks only while its requests are of the sizes it frees: a loop, not a
 * block growing by realloc past the sizes it frees, nor a thread that frees what others make
 * (it would only delay their frees, and the heap's joining of free neighbours with them). */
#define RECENT_FREES 4
#define USEFULNESS_MAX 8

struct slot {
    void *block;
    size_t usable;
};

struct thread_cache {
    struct slot slots[KSM_CACHE_SLOTS]; /* oldest first */
    unsigned count;
    unsigned misses; /* requests in a row that no slot could serve */
    /* Whether keeping blocks pays here: the usable sizes of the thread's last frees, and a
     * score that rises when one of them could have served a request, and falls otherwise. */
    size_t recent_frees[RECENT_FREES];
    unsigned next_recent, usefulness;
    unsigned sweep_countdown; /* release_pinning */
    size_t bytes;
    enum cache_state state;
    /* what the counters show of this cache (publish) */
    unsigned published_count;
    size_t published_bytes;
    unsigned unpublished_hits;
};

static __thread struct thread_cache mine __attribute__((tls_model("initial-exec")));
static size_t min_block; /* smaller blocks never serve a large request */
static struct ksm_cache_calls calls;
static int started;
static size_t allotted; /* bytes of the process's bound that threads hold */
static uint64_t secret;
static pthread_key_t exit_key; /* its destructor gives a thread's blocks back */

static uint64_t mark_of(const void *block) { return secret ^ (uint64_t)(uintptr_t)block; }

static uint64_t word_of(const void *block)
{
    uint64_t word;
    memcpy(&word, (const char *)block + sizeof word, sizeof word);
    return word;
}

static void set_word(void *block, uint64_t word) { memcpy((char *)block + sizeof word, &word, sizeof word); }

/* The counters are shared by every thread: two threads adding to them at each block made an
 * 8 KiB loop 60x slower than the allocator alone, and even alone the adds cost a loop as much
 * as its allocator. So a cache shows its change once it is empty, or holds 2 blocks or
 * PUBLISH_BYTES more or fewer than the counters show, or has served PUBLISH_HITS blocks, and
 * when the thread exits: the counters are at most one block and 64 KiB a thread behind. */
#define PUBLISH_HITS 64
#define PUBLISH_BYTES ((int64_t)64 * 1024)

static void publish(struct thread_cache *cache, int now)
{
    int64_t blocks = (int64_t)cache->count - cache->published_count;
    int64_t bytes = (int64_t)cache->bytes - (int64_t)cache->published_bytes;
    if (!now && (cache->count || !blocks) && blocks < 2 && blocks > -2 && bytes < PUBLISH_BYTES &&
        bytes > -PUBLISH_BYTES && cache->unpublished_hits < PUBLISH_HITS)
        return;
    if (blocks || bytes) {
        ksm_stat_add(KSM_STAT_cached_blocks, (uint64_t)blocks);
        ksm_stat_add(KSM_STAT_cached_bytes, (uint64_t)bytes);
    }
    if (cache->unpublished_hits)
        ksm_stat_add(KSM_STAT_cache_hits, cache->unpublished_hits);
    cache->published_count = cache->count;
    cache->published_bytes = cache->bytes;
    cache->unpublished_hits = 0;
}

/* Takes slot `at` (< count) out of the cache and returns its block (its mark cleared). */
static void *take_slot(struct thread_cache *cache, unsigned at)
{
    void *block = cache->slots[at].block;
    size_t usable = cache->slots[at].usable;
    for (cache->count--; at < cache->count; at++)
        cache->slots[at] = cache->slots[at + 1];
    cache->bytes -= usable;
    set_word(block, 0);
    return block;
}

static void release_slot(struct thread_cache *cache, unsigned at) { calls.release(take_slot(cache, at)); }

/* Blocks that keep the allocator from giving free memory back (glibc trims only the top of a
 * heap: a kept block above a large free chunk holds it) go back to the allocator: looked for
 * at every PIN_SWEEP-th request or free of the thread (each look costs a loop a tenth). */
#define PIN_SWEEP 16

static int pins_free_memory(void *block) { return calls.pins_free_memory && calls.pins_free_memory(block); }

static void release_pinning(struct thread_cache *cache)
{
    if (!calls.pins_free_memory || ++cache->sweep_countdown < PIN_SWEEP)
        return;
    cache->sweep_countdown = 0;
    for (unsigned at = cache->count; at-- > 0;)
        if (pins_free_memory(cache->slots[at].block))
            release_slot(cache, at);
}

static void give_back_allotment(void) { __atomic_fetch_sub(&allotted, KSM_CACHE_THREAD_BYTES, __ATOMIC_RELAXED); }

static void close_at_thread_exit(void *arg)
{
    struct thread_cache *cache = arg;
    cache->state = CLOSED; /* a later destructor's free goes straight to the allocator */
    while (cache->count)
        release_slot(cache, cache->count - 1);
    publish(cache, 1);
    give_back_allotment();
}

/* The thread's allotment, and its exit handler (pthread_setspecific takes no lock, and no
 * memory for a key among the first 32); CLOSED for good when either is missing. */
static int open_cache(struct thread_cache *cache)
{
    cache->state = CLOSED;
    if (!started)
        return 0;
    size_t before = __atomic_fetch_add(&allotted, KSM_CACHE_THREAD_BYTES, __ATOMIC_RELAXED);
    if (before + KSM_CACHE_THREAD_BYTES > KSM_CACHE_PROCESS_BYTES || pthread_setspecific(exit_key, cache) != 0) {
        give_back_allotment();
        return 0;
    }
    cache->state = OPEN;
    return 1;
}

/* A block of `usable` bytes serves a request of `size` up to `most` usable bytes. */
static int serves(size_t usable, size_t size, size_t most) { return usable >= size && usable <= most; }

static void learn_from_request(struct thread_cache *cache, size_t size, size_t most)
{
    for (unsigned at = 0; at < RECENT_FREES; at++)
        if (serves(cache->recent_frees[at], size, most)) {
            cache->usefulness = cache->usefulness + 2 < USEFULNESS_MAX ? cache->usefulness + 2 : USEFULNESS_MAX;
            return;
        }
    if (cache->usefulness)
        cache->usefulness--;
}

/* A block that would hold free memory is not handed out either: the program would hold it. */
static void *take_serving(struct thread_cache *cache, size_t size, size_t most, size_t *usable)
{
    for (unsigned at = cache->count; at-- > 0;)
        if (serves(cache->slots[at].usable, size, most) && pins_free_memory(cache->slots[at].block))
            release_slot(cache, at);
        else if (serves(cache->slots[at].usable, size, most)) {
            cache->misses = 0;
            cache->unpublished_hits++;
            *usable = cache->slots[at].usable;
            return take_slot(cache, at);
        }
    if (cache->count && ++cache->misses >= KSM_CACHE_IDLE_MISSES) { /* the loop may have emptied it */
        cache->misses = 0;
        release_slot(cache, 0);
    }
    return NULL;
}

void *ksm_cache_take(size_t size, size_t most, size_t *usable)
{
    struct thread_cache *cache = &mine;
    learn_from_request(cache, size, most);
    if (!cache->count)
        return NULL;
    release_pinning(cache);
    void *block = cache->count ? take_serving(cache, size, most, usable) : NULL;
    publish(cache, 0);
    return block;
}

static int slot_of(const struct thread_cache *cache, const void *block)
{
    for (unsigned at = 0; at < cache->count; at++)
        if (cache->slots[at].block == block)
            return (int)at;
    return -1;
}

__attribute__((noreturn, cold)) static void double_free(void)
{
    ksm_say("free(): double free detected (a block another thread freed already)");
    abort();
}

static int worth_keeping(struct thread_cache *cache, void *block)
{
    if (!cache->usefulness || pins_free_memory(block))
        return 0;
    return cache->state == OPEN || (cache->state == UNOPENED && open_cache(cache));
}

int ksm_cache_keep(void *block, size_t usable, int made)
{
    struct thread_cache *cache = &mine;
    if (usable < min_block || usable > KSM_CACHE_MAX_BLOCK)
        return 0;
    int kept_at = slot_of(cache, block);
    if (kept_at >= 0) { /* freed twice: the allocator gets both frees, and says what it says */
        release_slot(cache, (unsigned)kept_at);
        publish(cache, 0);
        return 0;
    }
    if (word_of(block) == mark_of(block))
        double_free();
    if (!made) /* the program's own block: it may belong to an arena or heap it destroys */
        return 0;
    cache->recent_frees[cache->next_recent++ % RECENT_FREES] = usable;
    if (!worth_keeping(cache, block))
        return 0;
    release_pinning(cache);
    while (cache->count == KSM_CACHE_SLOTS || (cache->count && cache->bytes + usable > KSM_CACHE_THREAD_BYTES))
        release_slot(cache, 0);
    cache->slots[cache->count++] = (struct slot){block, usable};
    cache->bytes += usable;
    set_word(block, mark_of(block));
    publish(cache, 0);
    return 1;
}

/* Not glibc's pointer guard (AT_RANDOM): a kept block's word must give away nothing of it. */
static uint64_t random_secret(void)
{
    uint64_t word;
    if (getrandom(&word, sizeof word, GRND_NONBLOCK) != (ssize_t)sizeof word) {
        word = (uint64_t)(uintptr_t)&word ^ ((uint64_t)getpid() << 32); /* early boot: still not a small number */
        word = (word ^ (word >> 31)) * 0x9E3779B97F4A7C15ull;
    }
    return word | 1;
}

void ksm_cache_start(size_t threshold, const struct ksm_cache_calls *chosen_calls)
{
    if (pthread_key_create(&exit_key, close_at_thread_exit) != 0)
        return; /* no way to give a thread's blocks back when it exits: no cache */
    min_block = threshold > 2 * sizeof(uint64_t) ? threshold : 2 * sizeof(uint64_t);
    calls = *chosen_calls;
    secret = random_secret();
    started = 1;
}
