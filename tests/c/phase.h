/* A probe's phases: the probe prints the phase's name, and the test, having looked at the
 * process, answers with a line on stdin; end of input ends the probe (exit 0). */
#ifndef KSM_TEST_PHASE_H
#define KSM_TEST_PHASE_H

#include <stdio.h>
#include <stdlib.h>

static inline void phase(const char *name)
{
    char line[16];
    printf("%s\n", name);
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin))
        exit(0);
}

#endif
