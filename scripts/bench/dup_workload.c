/* A process holding buffers of many sizes, some of them duplicated, allocated
 * with malloc between small allocations. Used to choose the threshold: which
 * blocks are worth aligning, and what the alignment costs in memory.
 *
 * usage: dup_workload MIB DUP_PERCENT COPIES MIN_SIZE MAX_SIZE SEED
 * Sizes are log-uniform in [MIN_SIZE, MAX_SIZE]. DUP_PERCENT of the buffers
 * come in COPIES identical copies; the rest hold unique data.
 * Prints one JSON line when ready, then waits for stdin to close. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static uint64_t state;
static uint64_t next_random(void)
{
    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
    return state;
}

static void fill(unsigned char *buffer, size_t size, uint64_t seed)
{
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < size; i += 8) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        for (size_t b = 0; b < 8 && i + b < size; b++)
            buffer[i + b] = (unsigned char)(x >> (8 * b));
    }
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: dup_workload MIB DUP_PERCENT COPIES MIN_SIZE MAX_SIZE SEED\n");
        return 2;
    }
    size_t budget = strtoull(argv[1], NULL, 10) << 20;
    int dup_percent = atoi(argv[2]), copies = atoi(argv[3]);
    double min_size = atof(argv[4]), max_size = atof(argv[5]);
    state = strtoull(argv[6], NULL, 10) * 2654435761u + 88172645463325252ull;
    size_t page = (size_t)sysconf(_SC_PAGESIZE), held = 0, buffers = 0, duplicate_pages = 0;
    uint64_t unique_seed = 1u << 30;
    for (uint64_t id = 1; held < budget; id++) {
        double unit = (double)(next_random() % 1000000) / 1000000.0;
        size_t size = (size_t)(min_size * pow(max_size / min_size, unit));
        int duplicated = (int)(next_random() % 100) < dup_percent;
        for (int copy = 0; copy < (duplicated ? copies : 1); copy++) {
            unsigned char *buffer = malloc(size);
            fill(buffer, size, duplicated ? id : unique_seed++);
            free(malloc(16 + next_random() % 300)); /* churn between buffers */
            (void)!malloc(16 + next_random() % 120); /* and small blocks that stay */
            held += size;
            buffers++;
            if (duplicated)
                duplicate_pages += size / page;
        }
    }
    printf("{\"pid\": %d, \"buffers\": %zu, \"held_bytes\": %zu, \"duplicate_pages_if_aligned\": %zu}\n",
           (int)getpid(), buffers, held, duplicate_pages);
    fflush(stdout);
    char byte;
    while (read(STDIN_FILENO, &byte, 1) > 0)
        ;
    return 0;
}
