/* malloc and calloc are no cancellation points: a thread with a cancel request pending
 * (deferred, the default) must come back from them, whatever the shim does inside (it opens
 * its counters file at the first large block, reads /proc/self/maps for a new arena). Prints
 * whether the thread came back from each call; exit 1 if not. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static volatile int reached;
static void *calls(void *arg)
{
    long which = (long)arg;
    pthread_cancel(pthread_self()); /* pending until a cancellation point */
    void *p = which == 0 ? malloc(1 << 20) : calloc(1, 300 * 1024);
    reached = 1; /* not a cancellation point */
    free(p);
    return NULL;
}
int main(void)
{
    const char *name[] = {"malloc(1 MiB), the process's first large block", "calloc(300 KiB) on a second thread"};
    int bad = 0;
    for (long which = 0; which < 2; which++) {
        void *big = which ? malloc(1 << 20) : NULL; /* the first large event is over before calloc's test */
        free(big);
        reached = 0;
        pthread_t t;
        pthread_create(&t, NULL, calls, (void *)which);
        void *result;
        pthread_join(t, &result);
        printf("%s: %s\n", name[which], reached ? "returned" : "THE THREAD WAS CANCELLED INSIDE IT");
        bad |= !reached;
    }
    return bad;
}
