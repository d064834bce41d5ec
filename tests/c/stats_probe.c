/* A program that allocates large blocks under the shim, for tests/integration/test_hostile.py.
 * Each line it prints is JSON; "wait" means: read one byte from stdin.
 * usage: stats_probe alloc        4 blocks of 64 KiB, print {"pid", "euid", "secure", "aligned"}
 *        stats_probe wait         as alloc, then wait before exiting
 *        stats_probe chdir DIR    chdir(DIR) first, then as wait
 *        stats_probe fork|_Fork|clone
 *            parent: 4 blocks, print {"parent"}, wait; a child made with fork(), _Fork()
 *            (no atfork handlers) or a raw clone(SIGCHLD): 3 blocks, print {"child"},
 *            wait, exit(0); the parent then prints {"child_status"}, makes 1 block, waits.
 *        stats_probe threads-fork
 *            a thread makes 130 blocks; then the main thread 60, prints {"parent"}, waits; a
 *            fork() child makes 10, prints {"child"}, waits, exit(0); the parent waits for it
 *            (with threads the shim counts a thread's blocks in batches of 64). */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define BLOCK_BYTES (64 * 1024)

static int allocate(int count)
{
    int aligned = 1;
    for (int i = 0; i < count; i++) {
        char *block = malloc(BLOCK_BYTES);
        if (!block)
            exit(2);
        memset(block, i + 1, BLOCK_BYTES);
        aligned &= (uintptr_t)block % 4096 == 0; /* blocks are kept: the program holds them */
    }
    return aligned;
}

static void wait_for_line(void)
{
    char byte;
    if (read(STDIN_FILENO, &byte, 1) < 0)
        exit(3);
}

/* Prints {"<role>": <pid>} and waits for a line. */
static void announce_and_wait(const char *role)
{
    printf("{\"%s\": %d}\n", role, (int)getpid());
    fflush(stdout);
    wait_for_line();
}

static pid_t make_child(const char *how)
{
    fflush(stdout);
    if (strcmp(how, "fork") == 0)
        return fork();
    if (strcmp(how, "_Fork") == 0)
        return _Fork();
    return (pid_t)syscall(SYS_clone, SIGCHLD, NULL, NULL, NULL, NULL);
}

static int fork_and_count(const char *how)
{
    allocate(4);
    announce_and_wait("parent");
    pid_t child = make_child(how);
    if (child < 0)
        return 4;
    if (child == 0) {
        allocate(3);
        announce_and_wait("child");
        exit(0);
    }
    int status;
    if (waitpid(child, &status, 0) != child)
        return 5;
    allocate(1);
    printf("{\"child_status\": %d}\n", status);
    fflush(stdout);
    wait_for_line();
    return 0;
}

static void *allocate_130(void *unused)
{
    (void)unused;
    allocate(130);
    return NULL;
}

static int threads_then_fork(void)
{
    pthread_t thread;
    if (pthread_create(&thread, NULL, allocate_130, NULL) != 0 || pthread_join(thread, NULL) != 0)
        return 7;
    allocate(60);
    announce_and_wait("parent");
    pid_t child = fork();
    if (child < 0)
        return 4;
    if (child == 0) {
        allocate(10);
        announce_and_wait("child");
        exit(0);
    }
    int status;
    return waitpid(child, &status, 0) == child && status == 0 ? 0 : 5;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "alloc";
    if (strcmp(mode, "fork") == 0 || strcmp(mode, "_Fork") == 0 || strcmp(mode, "clone") == 0)
        return fork_and_count(mode);
    if (strcmp(mode, "threads-fork") == 0)
        return threads_then_fork();
    if (strcmp(mode, "chdir") == 0 && (argc < 3 || chdir(argv[2]) != 0))
        return 6;
    int aligned = allocate(4);
    printf("{\"pid\": %d, \"euid\": %d, \"secure\": %lu, \"aligned\": %s}\n", (int)getpid(), (int)geteuid(),
           getauxval(AT_SECURE), aligned ? "true" : "false");
    fflush(stdout);
    if (strcmp(mode, "wait") == 0 || strcmp(mode, "chdir") == 0)
        wait_for_line();
    return 0;
}
