/* A library whose constructor starts a thread and joins it. The thread frees page-aligned
 * blocks, so under KSMPRELOAD_CACHE=1 its first kept block opens its cache while the loader
 * holds its lock for this dlopen: the cache must not wait for that lock (it once did, through
 * __cxa_thread_atexit_impl, and the process hung). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

static void *churn(void *unused)
{
    (void)unused;
    for (int round = 0; round < 64; round++) {
        char *block = malloc(16384);
        if (!block)
            return NULL;
        memset(block, round, 16384);
        free(block);
    }
    return NULL;
}

__attribute__((constructor)) static void start_and_join(void)
{
    pthread_t thread;
    if (pthread_create(&thread, NULL, churn, NULL) == 0)
        pthread_join(thread, NULL);
}
