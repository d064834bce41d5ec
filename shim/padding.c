/* The padding of live aligned blocks, as a gauge: each block whose alignment
 * costs bytes is kept in a table (block -> padding), so that free and realloc
 * take its padding back. The table is sharded hash tables with linear probing,
 * in memory mapped with raw system calls (never the program's allocator); it
 * grows by doubling and its size is published (padding_table_bytes). */
#define _GNU_SOURCE
#include "padding.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "runtime.h"
#include "stats.h"
#include "sys.h"

#define SHARDS 16
#define FIRST_CAPACITY 64 /* entries; the first arrays are static, so a program with few padded blocks maps nothing */

struct entry {
    uintptr_t block;  /* 0: empty */
    uint64_t padding; /* and MADE */
};

/* In an entry's padding word: the shim made the block itself (allocated it, or moved it to a
 * block it allocated), so the block cache may keep it. */
#define MADE (1ull << 63)

struct shard {
    pthread_mutex_t lock;
    struct entry *entries;
    size_t capacity; /* a power of two */
    size_t count;
};

static struct shard shards[SHARDS];
static struct entry first_entries[SHARDS][FIRST_CAPACITY];
static unsigned page_shift = 12;

static uint64_t hash_of(uintptr_t block) { return (uint64_t)(block >> page_shift) * 0x9E3779B97F4A7C15ull; }

static struct shard *shard_of(uintptr_t block) { return &shards[hash_of(block) >> 60]; /* the top 4 bits: 16 shards */ }

static struct entry *map_entries(size_t capacity)
{
    void *p =
        ksm_sys_mmap(NULL, capacity * sizeof(struct entry), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static void unmap_entries(struct entry *entries, size_t capacity)
{
    if (capacity > FIRST_CAPACITY)
        ksm_sys_munmap(entries, capacity * sizeof(struct entry));
    ksm_stat_add(KSM_STAT_padding_table_bytes, -(uint64_t)(capacity * sizeof(struct entry)));
}

static size_t home_of(const struct shard *shard, uintptr_t block)
{
    return (size_t)hash_of(block) & (shard->capacity - 1);
}

static void put_entry(struct shard *shard, uintptr_t block, uint64_t padding)
{
    size_t at = home_of(shard, block);
    while (shard->entries[at].block)
        at = (at + 1) & (shard->capacity - 1);
    shard->entries[at] = (struct entry){block, padding};
}

/* Twice the capacity, or the static first array; 0 when no memory could be mapped. */
static int grow(struct shard *shard)
{
    size_t capacity = shard->capacity ? shard->capacity * 2 : FIRST_CAPACITY;
    struct entry *old = shard->entries;
    struct entry *entries = shard->capacity ? map_entries(capacity) : first_entries[shard - shards];
    if (!entries)
        return 0;
    ksm_stat_add(KSM_STAT_padding_table_bytes, capacity * sizeof(struct entry));
    size_t old_capacity = shard->capacity;
    shard->entries = entries;
    shard->capacity = capacity;
    for (size_t i = 0; i < old_capacity; i++)
        if (old[i].block)
            put_entry(shard, old[i].block, old[i].padding);
    if (old)
        unmap_entries(old, old_capacity);
    return 1;
}

static struct entry *find(struct shard *shard, uintptr_t block)
{
    if (!shard->capacity)
        return NULL;
    for (size_t at = home_of(shard, block);; at = (at + 1) & (shard->capacity - 1)) {
        if (shard->entries[at].block == block)
            return &shard->entries[at];
        if (!shard->entries[at].block)
            return NULL;
    }
}

/* Linear probing without tombstones: later entries of the run move back into the hole. */
static void remove_entry(struct shard *shard, struct entry *hole)
{
    size_t mask = shard->capacity - 1, empty = (size_t)(hole - shard->entries);
    for (size_t at = (empty + 1) & mask; shard->entries[at].block; at = (at + 1) & mask) {
        size_t home = home_of(shard, shard->entries[at].block);
        if (((at - home) & mask) >= ((at - empty) & mask)) {
            shard->entries[empty] = shard->entries[at];
            empty = at;
        }
    }
    shard->entries[empty].block = 0;
    __atomic_store_n(&shard->count, shard->count - 1, __ATOMIC_RELAXED);
}

/* An entry of `padding` bytes comes (sign 1) or goes (-1): padded_blocks counts those with some. */
static void count_change(int sign, uint64_t padding)
{
    if (!padding)
        return;
    ksm_stat_add(KSM_STAT_padded_blocks, (uint64_t)(int64_t)sign);
    ksm_stat_add(KSM_STAT_padding_bytes, sign > 0 ? padding : -padding);
}

void ksm_padding_note(void *ptr, size_t padding, int made)
{
    /* A block without padding is not kept, unless the cache needs to know the shim made it
     * (block_cache.c keeps no other block). An entry left at its address by a block freed
     * behind the shim's back is taken out when this block is freed (ksm_padding_forget). */
    if (!padding && !(made && ksm_runtime.caching))
        return;
    int saved_errno = errno; /* a failed mmap in grow() is nobody's business */
    uintptr_t block = (uintptr_t)ptr;
    struct shard *shard = shard_of(block);
    pthread_mutex_lock(&shard->lock);
    struct entry *entry = find(shard, block);
    if (entry) { /* a block freed behind the shim's back (free in another library), now reused */
        count_change(-1, entry->padding & ~MADE);
        remove_entry(shard, entry);
    }
    if ((shard->count + 1) * 2 <= shard->capacity || grow(shard)) {
        put_entry(shard, block, padding | (made && ksm_runtime.caching ? MADE : 0));
        __atomic_store_n(&shard->count, shard->count + 1, __ATOMIC_RELAXED);
        count_change(1, padding);
    }
    pthread_mutex_unlock(&shard->lock);
    errno = saved_errno;
}

size_t ksm_padding_forget(void *ptr, int *made)
{
    uintptr_t block = (uintptr_t)ptr;
    struct shard *shard = shard_of(block);
    if (made)
        *made = 0;
    /* Unlocked: only this block's owner adds or takes out its entry, so an empty shard
     * cannot be about to hold it. */
    if (!ptr || !__atomic_load_n(&shard->count, __ATOMIC_RELAXED))
        return 0;
    pthread_mutex_lock(&shard->lock);
    struct entry *entry = find(shard, block);
    size_t padding = entry ? entry->padding & ~MADE : 0;
    if (entry) {
        if (made)
            *made = (entry->padding & MADE) != 0;
        count_change(-1, padding);
        remove_entry(shard, entry);
    }
    pthread_mutex_unlock(&shard->lock);
    return padding;
}

/* fork: no shard may be caught half-changed by another thread. */
static void lock_all(void)
{
    for (int i = 0; i < SHARDS; i++)
        pthread_mutex_lock(&shards[i].lock);
}

static void unlock_all(void)
{
    for (int i = SHARDS - 1; i >= 0; i--)
        pthread_mutex_unlock(&shards[i].lock);
}

static void reset_locks_in_child(void)
{
    for (int i = 0; i < SHARDS; i++)
        pthread_mutex_init(&shards[i].lock, NULL);
}

void ksm_padding_start(size_t page_size)
{
    page_shift = (unsigned)__builtin_ctzl(page_size);
    for (int i = 0; i < SHARDS; i++)
        pthread_mutex_init(&shards[i].lock, NULL);
    pthread_atfork(lock_all, unlock_all, reset_locks_in_child);
}
