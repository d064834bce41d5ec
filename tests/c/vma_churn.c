/* One million mixed allocations and frees across the shim's threshold, in the
 * main thread and in other threads (glibc gives those their own arenas), while
 * counting the process's mappings (lines of /proc/self/maps).
 * usage: vma_churn [OPERATIONS_PER_THREAD] [THREADS] [dump]
 * Prints one JSON line: the largest and the final mapping count. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SLOTS 2048

static long operations = 250000;
static int peak_maps;
static pthread_mutex_t peak_lock = PTHREAD_MUTEX_INITIALIZER;

static int count_maps(void)
{
    FILE *maps = fopen("/proc/self/maps", "r");
    int lines = 0, c;
    while ((c = getc(maps)) != EOF)
        lines += c == '\n';
    fclose(maps);
    return lines;
}

static void note_maps(void)
{
    int now = count_maps();
    pthread_mutex_lock(&peak_lock);
    if (now > peak_maps)
        peak_maps = now;
    pthread_mutex_unlock(&peak_lock);
}

static size_t next_size(uint64_t *state)
{
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    unsigned pick = (unsigned)(*state % 100);
    if (pick < 70)
        return 16 + (*state >> 8) % 4000; /* small */
    if (pick < 95)
        return 8192 + (*state >> 8) % (120 << 10);  /* large, below glibc's mmap threshold */
    return (128 << 10) + (*state >> 8) % (4 << 20); /* large, mapped by glibc */
}

static void *churn(void *arg)
{
    uint64_t state = 0x9E3779B97F4A7C15ull * ((uintptr_t)arg + 1);
    void **slots = calloc(SLOTS, sizeof *slots);
    for (long op = 0; op < operations; op++) {
        size_t slot = (state >> 20) % SLOTS, size = next_size(&state);
        if (slots[slot] && (state & 3) == 0) {
            slots[slot] = realloc(slots[slot], size);
        } else {
            free(slots[slot]);
            slots[slot] = malloc(size);
        }
        memset(slots[slot], (int)op, size < 64 ? size : 64);
        if (op % 20000 == 0)
            note_maps();
    }
    for (int slot = 0; slot < SLOTS; slot++)
        free(slots[slot]);
    free(slots);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc > 1)
        operations = atol(argv[1]);
    int threads = argc > 2 ? atoi(argv[2]) : 4;
    int at_start = count_maps();
    pthread_t ids[64];
    for (int t = 1; t < threads; t++)
        pthread_create(&ids[t], NULL, churn, (void *)(uintptr_t)t);
    churn(NULL);
    for (int t = 1; t < threads; t++)
        pthread_join(ids[t], NULL);
    note_maps();
    if (argc > 3) { /* "dump": show the mappings left at the end */
        char line[512];
        FILE *maps = fopen("/proc/self/maps", "r");
        while (fgets(line, sizeof line, maps))
            fputs(line, stderr);
        fclose(maps);
    }
    printf("{\"operations\": %ld, \"threads\": %d, \"maps_at_start\": %d, \"maps_peak\": %d, \"maps_end\": %d}\n",
           operations * threads, threads, at_start, peak_maps, count_maps());
    return 0;
}
