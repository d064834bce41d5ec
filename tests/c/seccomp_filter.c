/* Runs under a seccomp filter that allows every system call (mode 2, as systemd's
 * SystemCallFilter= or a container runtime leaves a service), says so, then blocks in read() on
 * stdin and exits 0 once it reads a byte. ksmpreload attach must refuse it unless --force.
 * usage: seccomp_filter */
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <unistd.h>

int main(void)
{
    struct sock_filter allow = BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    struct sock_fprog program = {.len = 1, .filter = &allow};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program) != 0)
        return 2;
    printf("ready\n");
    fflush(stdout);
    char byte;
    return read(STDIN_FILENO, &byte, 1) == 1 ? 0 : 3;
}
