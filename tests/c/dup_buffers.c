/* Holds `copies` copies of `distinct` buffers (sizes 8 to 64 KiB), allocated
 * with malloc between small allocations as real programs do, then waits for
 * stdin to close. Prints how many whole pages the copies could merge.
 * With DUP_BUFFERS_PURGE_FIRST=1 the buffers reuse memory that held other data
 * and that jemalloc purged (when jemalloc is the allocator). SHIFT (default 0): a block of SHIFT
 * bytes is allocated first, which moves every later block to other offsets in its pages (two
 * processes with other shifts: the same data in different heap layouts).
 * usage: dup_buffers DISTINCT COPIES [SHIFT] */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const size_t sizes[] = {8192, 12288, 16384, 20000, 32768, 40960, 50000, 65536};
#define SIZE_COUNT (sizeof sizes / sizeof sizes[0])

static void fill(unsigned char *buffer, size_t size, uint64_t seed)
{
    uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < size; i++) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        buffer[i] = (unsigned char)state;
    }
}

typedef int (*mallctl_fn)(const char *, void *, size_t *, void *, size_t);

/* Large blocks filled with unrelated data, freed, then purged from every arena. */
static void use_and_purge(int count)
{
    void **blocks = calloc((size_t)count, sizeof *blocks);
    for (int i = 0; i < count; i++) {
        blocks[i] = malloc(sizes[i % SIZE_COUNT]);
        fill(blocks[i], sizes[i % SIZE_COUNT], (uint64_t)i + 1000003);
    }
    for (int i = 0; i < count; i++)
        free(blocks[i]);
    free(blocks);
    mallctl_fn mallctl = (mallctl_fn)dlsym(RTLD_DEFAULT, "mallctl");
    if (mallctl && mallctl("arena.4096.purge", NULL, NULL, NULL, 0) != 0) /* 4096: all arenas */
        fprintf(stderr, "dup_buffers: arena.4096.purge failed\n");
}

int main(int argc, char **argv)
{
    int distinct = argc > 1 ? atoi(argv[1]) : 64, copies = argc > 2 ? atoi(argv[2]) : 4;
    long page = sysconf(_SC_PAGESIZE);
    size_t expected_pages = 0;
    void **keep = calloc((size_t)distinct * copies * 2 + 1, sizeof *keep);
    size_t kept = 0;
    const char *purge_first = getenv("DUP_BUFFERS_PURGE_FIRST");
    if (purge_first && purge_first[0] == '1')
        use_and_purge(distinct * copies);
    if (argc > 3)
        keep[kept++] = malloc((size_t)atoi(argv[3]));
    for (int copy = 0; copy < copies; copy++)
        for (int id = 0; id < distinct; id++) {
            size_t size = sizes[id % SIZE_COUNT];
            unsigned char *buffer = malloc(size);
            fill(buffer, size, (uint64_t)id + 1);
            keep[kept++] = buffer;
            keep[kept++] = malloc(24 + (size_t)(id * 7 + copy) % 200); /* small neighbours */
            expected_pages += size / (size_t)page;
        }
    printf("{\"pid\": %d, \"mergeable_pages\": %zu}\n", (int)getpid(), expected_pages);
    fflush(stdout);
    char byte;
    while (read(STDIN_FILENO, &byte, 1) > 0)
        ;
    for (size_t i = 0; i < kept; i++)
        free(keep[i]);
    free(keep);
    return 0;
}
