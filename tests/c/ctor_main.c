/* Uses, reallocates and frees the blocks a library constructor made before
 * main; then allocates as usual. Exits 0 when everything held. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern void *ctor_blocks[4];
extern size_t ctor_sizes[4];

static int filled_with(const unsigned char *block, size_t size, int value)
{
    for (size_t i = 0; i < size; i++)
        if (block[i] != value)
            return 0;
    return 1;
}

int main(void)
{
    for (int i = 0; i < 4; i++) {
        if (!filled_with(ctor_blocks[i], ctor_sizes[i], 'a' + i)) {
            printf("FAIL block %d made before main lost its content\n", i);
            return 1;
        }
        size_t grown = ctor_sizes[i] * 3;
        unsigned char *block = realloc(ctor_blocks[i], grown);
        if (!block || !filled_with(block, ctor_sizes[i], 'a' + i)) {
            printf("FAIL realloc of block %d made before main\n", i);
            return 1;
        }
        free(block);
    }
    void *late = malloc(1 << 20);
    int aligned = ((uintptr_t)late % (uintptr_t)sysconf(_SC_PAGESIZE)) == 0;
    free(late);
    printf("{\"late_block_aligned\": %s}\n", aligned ? "true" : "false");
    return 0;
}
