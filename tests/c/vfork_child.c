/* A vfork child that has not run exec yet: it shares its parent's memory (the parent waits in
 * the kernel) while it blocks in read() on stdin, then exits. ksmpreload attach must refuse it:
 * turning merging on in it would turn it on in the parent.
 * usage: vfork_child */
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void)
{
    pid_t child = vfork();
    if (child == 0) {
        /* only raw system calls here: the child runs on the parent's stack */
        static const char ready[] = "ready\n";
        char byte;
        syscall(SYS_write, STDOUT_FILENO, ready, sizeof ready - 1);
        syscall(SYS_read, STDIN_FILENO, &byte, 1);
        syscall(SYS_exit, 0);
    }
    int status = 0;
    return child > 0 && waitpid(child, &status, 0) == child && WIFEXITED(status) ? 0 : 1;
}
