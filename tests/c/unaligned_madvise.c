/* What the blog post's patched programs did: madvise(MADV_MERGEABLE) on
 * blocks straight from malloc. Their addresses are not page-aligned, so every
 * call fails with EINVAL ("returns -1") and nothing becomes mergeable.
 * Prints how many calls failed, then holds its memory until a signal.
 * usage: unaligned_madvise [BLOCKS] */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define BLOCK_BYTES (256 * 1024)

int main(int argc, char **argv)
{
    int blocks = argc > 1 ? atoi(argv[1]) : 64, failed = 0, einval = 0;
    for (int i = 0; i < blocks; i++) {
        char *block = malloc(BLOCK_BYTES);
        memset(block, 'k', BLOCK_BYTES); /* the same content in every block */
        if (madvise(block, BLOCK_BYTES, MADV_MERGEABLE) != 0) {
            failed++;
            einval += errno == EINVAL;
        }
    }
    printf("{\"pid\": %d, \"madvise_failed\": %d, \"einval\": %d}\n", (int)getpid(), failed, einval);
    fflush(stdout);
    pause();
    return 0;
}
