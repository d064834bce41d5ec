/* A library whose constructor allocates before main (and before the shim's
 * own constructor has run, since preloaded libraries start last). */
#include <stdlib.h>
#include <string.h>

void *ctor_blocks[4];
size_t ctor_sizes[4] = {100, 40000, 1 << 20, 3000};

__attribute__((constructor)) static void allocate_early(void)
{
    for (int i = 0; i < 4; i++) {
        ctor_blocks[i] = i == 1 ? calloc(1, ctor_sizes[i]) : malloc(ctor_sizes[i]);
        memset(ctor_blocks[i], 'a' + i, ctor_sizes[i]);
    }
}
