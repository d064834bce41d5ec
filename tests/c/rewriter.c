/* Data that changes faster than KSM scans: a buffer of identical pages, all
 * rewritten with a new value every millisecond. Prints its pid, then runs
 * until killed.
 * usage: rewriter [MIB] */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    size_t bytes = (size_t)(argc > 1 ? atoi(argv[1]) : 32) << 20;
    long page = sysconf(_SC_PAGESIZE);
    uint64_t *buffer = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buffer == MAP_FAILED)
        return 1;
    memset(buffer, 1, bytes);
    printf("{\"pid\": %d}\n", (int)getpid());
    fflush(stdout);
    const struct timespec pause_between = {0, 1000000};
    for (uint64_t round = 0;; round++) {
        for (size_t at = 0; at < bytes / sizeof *buffer; at += (size_t)page / sizeof *buffer)
            buffer[at] = round;
        nanosleep(&pause_between, NULL);
    }
}
