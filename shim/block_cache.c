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
 * allotment and its blocks back when it exits. A block lives in one cache at a time; a word
 * inside it holds the process's cookie while it is kept, so a second free of it, on any
 * thread, is seen (the program's allocator would have seen it too). */
#define _GNU_SOURCE
#include "block_cache.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>

#include "config.h"
#include "stats.h"

enum cache_state { UNOPENED, OPEN, CLOSED };

struct slot {
    void *block;
    size_t usable;
};

struct thread_cache {
    struct slot slots[KSM_CACHE_SLOTS]; /* oldest first */
    unsigned count;
    unsigned misses; /* requests in a row that no slot could serve */
    size_t bytes;
    enum cache_state state;
    /* what the counters show of this cache (publish) */
    unsigned published_count;
    size_t published_bytes;
    unsigned unpublished_hits;
};

static __thread struct thread_cache mine __attribute__((tls_model("initial-exec")));
static size_t page_size = 4096;
static size_t min_block; /* smaller blocks never serve a large request */
static void (*release_block)(void *block);
static pthread_key_t exit_key;
static int started;
static size_t allotted; /* bytes of the process's bound that threads hold */
static uint64_t cookie;

static uint64_t word_of(const void *block)
{
    uint64_t word;
    memcpy(&word, (const char *)block + sizeof word, sizeof word);
    return word;
}

static void set_word(void *block, uint64_t word) { memcpy((char *)block + sizeof word, &word, sizeof word); }

/* The counters are shared by every thread: two threads adding to them at each block made an
 * 8 KiB loop 60x slower than the allocator alone. So with threads, a cache shows its change
 * once it holds 2 blocks more or fewer than the counters show, or has served 64 blocks, and
 * when the thread exits: the gauges lag by one block a thread at most, the hits by 63. */
#define PUBLISH_HITS 64

static void publish(struct thread_cache *cache, int now)
{
    int64_t blocks = (int64_t)cache->count - cache->published_count;
    if (!now && !ksm_stats_single_threaded() && blocks < 2 && blocks > -2 && cache->unpublished_hits < PUBLISH_HITS)
        return;
    if (blocks) {
        ksm_stat_add(KSM_STAT_cached_blocks, (uint64_t)blocks);
        ksm_stat_add(KSM_STAT_cached_bytes, (uint64_t)(cache->bytes - cache->published_bytes));
    }
    if (cache->unpublished_hits)
        ksm_stat_add(KSM_STAT_cache_hits, cache->unpublished_hits);
    cache->published_count = cache->count;
    cache->published_bytes = cache->bytes;
    cache->unpublished_hits = 0;
}

/* Takes slot `at` out of the cache and returns its block (its cookie cleared). */
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

static void release_slot(struct thread_cache *cache, unsigned at)
{
    release_block(take_slot(cache, at));
    publish(cache, 0);
}

static void give_back_allotment(void) { __atomic_fetch_sub(&allotted, KSM_CACHE_THREAD_BYTES, __ATOMIC_RELAXED); }

static void close_at_thread_exit(void *arg)
{
    struct thread_cache *cache = arg;
    cache->state = CLOSED;
    while (cache->count)
        release_block(take_slot(cache, cache->count - 1));
    publish(cache, 1);
    give_back_allotment();
}

/* The thread's allotment, and its exit handler; CLOSED for good when either is missing. */
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

/* A block of `usable` bytes serves a request of `size` when it wastes at most a page and an
 * eighth of the request: the spread of most allocators' size classes. */
static int serves(size_t usable, size_t size) { return usable >= size && usable - size < page_size + size / 8; }

void *ksm_cache_take(size_t size, size_t *usable)
{
    struct thread_cache *cache = &mine;
    if (!cache->count)
        return NULL;
    for (unsigned at = cache->count; at-- > 0;)
        if (serves(cache->slots[at].usable, size)) {
            cache->misses = 0;
            cache->unpublished_hits++;
            *usable = cache->slots[at].usable;
            void *block = take_slot(cache, at);
            publish(cache, 0);
            return block;
        }
    if (++cache->misses >= KSM_CACHE_IDLE_MISSES) {
        cache->misses = 0;
        release_slot(cache, 0);
    }
    return NULL;
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

int ksm_cache_keep(void *block, size_t usable)
{
    struct thread_cache *cache = &mine;
    if (usable < min_block || usable > KSM_CACHE_MAX_BLOCK || (cache->state != OPEN && (cache->state == CLOSED || !open_cache(cache))))
        return 0;
    int kept_at = slot_of(cache, block);
    if (kept_at >= 0) { /* freed twice: the allocator gets both frees, and says what it says */
        release_slot(cache, (unsigned)kept_at);
        return 0;
    }
    if (word_of(block) == cookie)
        double_free();
    while (cache->count == KSM_CACHE_SLOTS || cache->bytes + usable > KSM_CACHE_THREAD_BYTES)
        release_slot(cache, 0);
    cache->slots[cache->count++] = (struct slot){block, usable};
    cache->bytes += usable;
    set_word(block, cookie);
    publish(cache, 0);
    return 1;
}

/* fork: the child has the forking thread alone; the other threads' allotments are free again
 * (their blocks stay with them, unused, as glibc's own thread caches do). */
static void after_fork_in_child(void)
{
    allotted = mine.state == OPEN ? KSM_CACHE_THREAD_BYTES : 0;
}

static uint64_t random_cookie(void)
{
    uint64_t word = 0x6b736d636f6f6b69ull; /* without AT_RANDOM: still not a pointer or a small number */
    const unsigned char *bytes = (const unsigned char *)getauxval(AT_RANDOM);
    if (bytes)
        memcpy(&word, bytes + 8, sizeof word);
    return word | 1;
}

void ksm_cache_start(size_t chosen_page_size, size_t threshold, void (*release)(void *block))
{
    page_size = chosen_page_size;
    min_block = threshold > 2 * sizeof(uint64_t) ? threshold : 2 * sizeof(uint64_t);
    release_block = release;
    cookie = random_cookie();
    if (pthread_key_create(&exit_key, close_at_thread_exit) != 0)
        return;
    pthread_atfork(NULL, NULL, after_fork_in_child);
    started = 1;
}
