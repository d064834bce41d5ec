/* Prints prctl(PR_GET_MEMORY_MERGE): 1 when this process merges as a whole.
 * Built statically by the tests, to see what ksm-wrap does where LD_PRELOAD cannot act. */
#include <stdio.h>
#include <sys/prctl.h>

int main(void)
{
    printf("%d\n", prctl(68 /* PR_GET_MEMORY_MERGE */, 0, 0, 0, 0));
    return 0;
}
