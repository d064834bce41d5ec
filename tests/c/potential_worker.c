/* Holds one private anonymous mapping, laid out as
 *   SHARED MiB of data every worker holds | PRIVATE MiB of this worker's own random data |
 *   ZERO MiB of zero pages (written, so each has its own frame) | TWIN MiB of data, twice,
 * prints {"pid", "address", "bytes"} and waits for stdin to close. SEED makes the private
 * and twin data differ between workers; with MERGEABLE=1 the mapping is madvised mergeable.
 * usage: potential_worker SHARED PRIVATE ZERO TWIN SEED [MERGEABLE] */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static void fill(unsigned char *to, size_t bytes, uint64_t seed)
{
    uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t at = 0; at < bytes; at += sizeof state) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        memcpy(to + at, &state, sizeof state);
    }
}

int main(int argc, char **argv)
{
    if (argc < 6) {
        fprintf(stderr, "usage: potential_worker SHARED PRIVATE ZERO TWIN SEED [MERGEABLE]\n");
        return 2;
    }
    size_t mib = 1 << 20, shared = atol(argv[1]) * mib, own = atol(argv[2]) * mib;
    size_t zero = atol(argv[3]) * mib, twin = atol(argv[4]) * mib;
    uint64_t seed = strtoull(argv[5], NULL, 10);
    size_t bytes = shared + own + zero + 2 * twin;
    unsigned char *data = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (data == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    madvise(data, bytes, MADV_NOHUGEPAGE); /* also keeps it apart from neighbouring VMAs */
    if (argc > 6 && atoi(argv[6]) == 1 && madvise(data, bytes, MADV_MERGEABLE) != 0)
        perror("madvise(MADV_MERGEABLE)");
    fill(data, shared, 1);
    fill(data + shared, own, seed * 2 + 1000);
    memset(data + shared + own, 0, zero);
    unsigned char *first = data + shared + own + zero;
    fill(first, twin, seed * 2 + 1001);
    memcpy(first + twin, first, twin);
    printf("{\"pid\": %d, \"address\": %lu, \"bytes\": %zu}\n", (int)getpid(), (unsigned long)data, bytes);
    fflush(stdout);
    char byte;
    while (read(STDIN_FILENO, &byte, 1) > 0)
        ;
    return 0;
}
