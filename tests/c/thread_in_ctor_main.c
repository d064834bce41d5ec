/* dlopen()s thread_in_ctor_lib (argv[1]) and says "loaded": see that library. */
#include <dlfcn.h>
#include <stdio.h>

int main(int argc, char **argv)
{
    if (argc != 2)
        return 2;
    void *library = dlopen(argv[1], RTLD_NOW);
    if (!library) {
        fprintf(stderr, "%s\n", dlerror());
        return 1;
    }
    puts("loaded");
    return dlclose(library) == 0 ? 0 : 1;
}
