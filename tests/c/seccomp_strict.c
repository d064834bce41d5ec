/* Enters seccomp strict mode (only read, write, _exit and sigreturn allowed: any other system call
 * kills it), says so, then blocks in read() on stdin: a target ksmpreload attach must refuse.
 * usage: seccomp_strict */
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(void)
{
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT) != 0)
        return 2;
    static const char ready[] = "ready\n";
    if (write(STDOUT_FILENO, ready, sizeof ready - 1) < 0)
        syscall(SYS_exit, 3);
    char byte;
    ssize_t got = read(STDIN_FILENO, &byte, 1);
    syscall(SYS_exit, got < 0 ? 4 : 0); /* exit_group is not allowed in strict mode */
}
