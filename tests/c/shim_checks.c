/* Checks of what the shim must keep and give, run under LD_PRELOAD by pytest.
 * usage: shim_checks CHECK [THRESHOLD]; exits 0 when the check holds, else
 * prints "FAIL <check>: <why>" and exits 1. For runs without the shim or under
 * valgrind (tests/integration/test_sanitized.py), from the environment:
 *   SHIM_CHECKS_ALIGNED=0   large blocks need not be page-aligned (ASan's own
 *                           allocator, which must stay first); the rest still runs
 *   SHIM_CHECKS_ROUNDS=N    rounds per allocating thread (default 20000) */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *check_name;
static size_t threshold = 16384;
static size_t page;
static int expect_aligned = 1;

#define EXPECT(condition, ...)                                                                                         \
    do {                                                                                                               \
        if (!(condition)) {                                                                                            \
            printf("FAIL %s: ", check_name);                                                                           \
            printf(__VA_ARGS__);                                                                                       \
            printf(" (%s:%d)\n", __FILE__, __LINE__);                                                                  \
            exit(1);                                                                                                   \
        }                                                                                                              \
    } while (0)

static int aligned(const void *ptr) { return !expect_aligned || ((uintptr_t)ptr % page) == 0; }

static void fill(unsigned char *buffer, size_t size, unsigned seed)
{
    for (size_t i = 0; i < size; i++)
        buffer[i] = (unsigned char)(seed * 31 + i * 7 + (i >> 12));
}

static int holds(const unsigned char *buffer, size_t size, unsigned seed)
{
    for (size_t i = 0; i < size; i++)
        if (buffer[i] != (unsigned char)(seed * 31 + i * 7 + (i >> 12)))
            return 0;
    return 1;
}

static void expect_large_block(void *ptr, size_t size, const char *how)
{
    EXPECT(ptr != NULL, "%s(%zu) returned NULL", how, size);
    EXPECT(aligned(ptr), "%s(%zu) = %p is not page-aligned", how, size, ptr);
    EXPECT(malloc_usable_size(ptr) >= size, "%s(%zu): usable size %zu", how, size, malloc_usable_size(ptr));
    fill(ptr, size, (unsigned)size);
    EXPECT(holds(ptr, size, (unsigned)size), "%s(%zu): content lost", how, size);
}

static void check_alignment(void)
{
    const size_t sizes[] = {threshold, threshold + 1, 20000, 100000, 1 << 20, 9 << 20};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        size_t size = sizes[i];
        void *blocks[8] = {0};
        blocks[0] = malloc(size);
        expect_large_block(blocks[0], size, "malloc");
        blocks[1] = calloc(1, size);
        for (size_t at = 0; at < size; at += 997)
            EXPECT(((unsigned char *)blocks[1])[at] == 0, "calloc(%zu) not zeroed at %zu", size, at);
        expect_large_block(blocks[1], size, "calloc");
        EXPECT(posix_memalign(&blocks[2], 64, size) == 0, "posix_memalign(64, %zu) failed", size);
        expect_large_block(blocks[2], size, "posix_memalign");
        blocks[3] = aligned_alloc(64, (size + 63) & ~(size_t)63); /* C11: a multiple of the alignment (ASan insists) */
        expect_large_block(blocks[3], size, "aligned_alloc");
        blocks[4] = memalign(32, size);
        expect_large_block(blocks[4], size, "memalign");
        blocks[5] = valloc(size);
        expect_large_block(blocks[5], size, "valloc");
        blocks[6] = realloc(NULL, size);
        expect_large_block(blocks[6], size, "realloc");
        blocks[7] = reallocarray(NULL, size, 1);
        expect_large_block(blocks[7], size, "reallocarray");
        for (int b = 0; b < 8; b++)
            free(blocks[b]);
    }
}

static void check_realloc(void)
{
    const size_t steps[] = {100, threshold * 4, 1 << 20, 50, threshold, threshold - 1, 3 << 20, 200};
    size_t size = steps[0];
    unsigned char *block = malloc(size);
    fill(block, size, 7);
    for (size_t i = 1; i < sizeof steps / sizeof steps[0]; i++) {
        size_t next = steps[i], kept = size < next ? size : next;
        block = realloc(block, next);
        EXPECT(block != NULL, "realloc(%zu -> %zu) returned NULL", size, next);
        EXPECT(holds(block, kept, 7), "realloc(%zu -> %zu) lost content", size, next);
        if (next >= threshold)
            EXPECT(aligned(block), "realloc(%zu -> %zu) = %p not page-aligned", size, next, (void *)block);
        fill(block, next, 7);
        size = next;
    }
    free(block);
}

static void expect_errno_kept(const char *what) { EXPECT(errno == 4242, "%s changed errno to %d", what, errno); }

static void check_errno(void)
{
    size_t sizes[] = {64, threshold * 2, 4 << 20};
    for (int i = 0; i < 3; i++) {
        size_t size = sizes[i];
        void *ptr;
        errno = 4242;
        ptr = malloc(size);
        expect_errno_kept("malloc");
        errno = 4242;
        ptr = realloc(ptr, size * 2);
        expect_errno_kept("realloc");
        errno = 4242;
        free(ptr);
        expect_errno_kept("free");
        errno = 4242;
        ptr = calloc(size, 1);
        expect_errno_kept("calloc");
        errno = 4242;
        free(ptr);
        expect_errno_kept("free");
        errno = 4242;
        EXPECT(posix_memalign(&ptr, 128, size) == 0, "posix_memalign");
        expect_errno_kept("posix_memalign");
        free(ptr);
        errno = 4242;
        ptr = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        expect_errno_kept("mmap");
        errno = 4242;
        munmap(ptr, size);
        expect_errno_kept("munmap");
    }
}

/* Failures as POSIX says: ENOMEM in errno, or returned by posix_memalign. */
static void check_enomem(void)
{
    errno = 0;
    EXPECT(malloc(SIZE_MAX - 4096) == NULL && errno == ENOMEM, "malloc(huge): errno %d, want ENOMEM", errno);
    errno = 0;
    EXPECT(calloc(SIZE_MAX / 2, 3) == NULL && errno == ENOMEM, "calloc overflow: errno %d", errno);
    errno = 0;
    EXPECT(reallocarray(NULL, SIZE_MAX / 2, 3) == NULL && errno == ENOMEM, "reallocarray overflow: errno %d", errno);
    void *ptr = NULL;
    EXPECT(posix_memalign(&ptr, 3, threshold * 2) == EINVAL, "posix_memalign(align 3) must return EINVAL");
    EXPECT(posix_memalign(&ptr, 64, SIZE_MAX - 4096) == ENOMEM, "posix_memalign(huge) must return ENOMEM");
    errno = 0;
    EXPECT(mmap(NULL, 0, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) == MAP_FAILED && errno == EINVAL,
           "mmap(len 0): errno %d, want EINVAL", errno);
}

#define THREADS 8
static int rounds = 20000; /* SHIM_CHECKS_ROUNDS: fewer under valgrind */

static void *churn(void *arg)
{
    unsigned seed = (unsigned)(uintptr_t)arg, state = seed * 2654435761u + 1;
    unsigned char *live[64] = {0};
    size_t sizes[64] = {0};
    for (int round = 0; round < rounds; round++) {
        state = state * 1103515245u + 12345u;
        int slot = (int)(state >> 8) % 64;
        if (live[slot]) {
            if (!holds(live[slot], sizes[slot], seed + (unsigned)slot))
                return (void *)1;
            free(live[slot]);
        }
        size_t size = (state >> 16) % 7 == 0 ? threshold + (state >> 4) % (200 << 10) : 1 + (state >> 4) % 2000;
        live[slot] = (state & 1) ? malloc(size) : calloc(1, size);
        if (!live[slot])
            return (void *)1;
        if (size >= threshold && !aligned(live[slot]))
            return (void *)2;
        fill(live[slot], size, seed + (unsigned)slot);
        sizes[slot] = size;
    }
    for (int slot = 0; slot < 64; slot++)
        free(live[slot]);
    return NULL;
}

static void check_threads(void)
{
    pthread_t threads[THREADS];
    for (uintptr_t t = 0; t < THREADS; t++)
        EXPECT(pthread_create(&threads[t], NULL, churn, (void *)t) == 0, "pthread_create");
    for (int t = 0; t < THREADS; t++) {
        void *result;
        pthread_join(threads[t], &result);
        EXPECT(result == NULL, "thread %d: %s", t, result == (void *)2 ? "large block not aligned" : "content lost");
    }
}

static void check_fork(void)
{
    size_t size = threshold * 8;
    unsigned char *block = malloc(size);
    fill(block, size, 3);
    pthread_t busy;
    pthread_create(&busy, NULL, churn, (void *)99); /* forks while another thread allocates */
    for (int child = 0; child < 20; child++) {
        pid_t pid = fork();
        EXPECT(pid >= 0, "fork failed");
        if (pid == 0) {
            int ok = holds(block, size, 3);
            unsigned char *mine = malloc(size * 2);
            ok = ok && mine && aligned(mine);
            fill(mine, size * 2, 5);
            ok = ok && holds(mine, size * 2, 5);
            free(mine);
            free(block);
            _exit(ok ? 0 : 1);
        }
        int status;
        waitpid(pid, &status, 0);
        EXPECT(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child %d failed (status %d)", child, status);
    }
    void *result;
    pthread_join(busy, &result);
    EXPECT(result == NULL, "the allocating thread failed during forks");
    EXPECT(holds(block, size, 3), "parent lost content after fork");
    free(block);
}

static void check_exec(const char *self)
{
    pid_t pid = fork();
    if (pid == 0) {
        char limit[32];
        snprintf(limit, sizeof limit, "%zu", threshold);
        execl(self, self, "alignment", limit, (char *)NULL);
        _exit(127);
    }
    int status;
    waitpid(pid, &status, 0);
    EXPECT(WIFEXITED(status) && WEXITSTATUS(status) == 0, "exec'd child failed (status %d)", status);
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    page = (size_t)sysconf(_SC_PAGESIZE);
    expect_aligned = !getenv("SHIM_CHECKS_ALIGNED") || strcmp(getenv("SHIM_CHECKS_ALIGNED"), "0") != 0;
    if (getenv("SHIM_CHECKS_ROUNDS"))
        rounds = atoi(getenv("SHIM_CHECKS_ROUNDS"));
    check_name = argc > 1 ? argv[1] : "";
    if (argc > 2)
        threshold = strtoull(argv[2], NULL, 10);
    if (!strcmp(check_name, "alignment"))
        check_alignment();
    else if (!strcmp(check_name, "realloc"))
        check_realloc();
    else if (!strcmp(check_name, "errno"))
        check_errno();
    else if (!strcmp(check_name, "enomem"))
        check_enomem();
    else if (!strcmp(check_name, "threads"))
        check_threads();
    else if (!strcmp(check_name, "fork"))
        check_fork();
    else if (!strcmp(check_name, "exec"))
        check_exec(argv[0]);
    else {
        printf("unknown check '%s'\n", check_name);
        return 2;
    }
    printf("ok %s\n", check_name);
    return 0;
}
