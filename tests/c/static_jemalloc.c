/* Carries its own jemalloc, linked statically, as upstream Redis builds do: the
 * shim's malloc never sees its allocations, only the mappings jemalloc makes.
 * Holds 64 MiB in 1 MiB blocks, prints its pid, waits for stdin to close. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(void)
{
    void *blocks[64];
    for (int i = 0; i < 64; i++) {
        blocks[i] = malloc(1 << 20);
        memset(blocks[i], i, 1 << 20);
    }
    printf("%d\n", (int)getpid());
    fflush(stdout);
    char byte;
    while (read(STDIN_FILENO, &byte, 1) > 0)
        ;
    for (int i = 0; i < 64; i++)
        free(blocks[i]);
    return 0;
}
