/* A signed overflow on purpose, in a program built with UBSan: with the shim
 * built with UBSan preloaded, libubsan must still report it and stop the
 * program, though its report path allocates and maps memory through the
 * shim's wrappers. Shows that a finding inside the shim would be seen.
 * usage: ubsan_probe (exits 1 through UBSan; 0 would mean no report) */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
    (void)argv;
    char *block = malloc(1 << 20); /* a large block: the shim's slow path */
    memset(block, 1, 1 << 20);
    int big = INT_MAX - 1 + block[0] * argc;
    printf("%d\n", big + argc); /* INT_MAX + 1 */
    free(block);
    return 0;
}
