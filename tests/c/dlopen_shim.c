/* Loads the shim with dlopen (not preloaded) and uses its exported functions:
 * its constructor must run quietly, and its malloc must align large blocks and
 * pair with its free. usage: dlopen_shim PATH_TO_LIBKSMPRELOAD */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 2) {
        printf("usage: dlopen_shim PATH_TO_LIBKSMPRELOAD\n");
        return 2;
    }
    void *shim = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!shim) {
        printf("FAIL dlopen: %s\n", dlerror());
        return 1;
    }
    void *(*shim_malloc)(size_t) = (void *(*)(size_t))dlsym(shim, "malloc");
    void (*shim_free)(void *) = (void (*)(void *))dlsym(shim, "free");
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    for (size_t size = 1 << 16; size <= (8 << 20); size *= 4) {
        unsigned char *block = shim_malloc(size);
        if (!block || (uintptr_t)block % page) {
            printf("FAIL shim malloc(%zu) = %p is not page-aligned\n", size, (void *)block);
            return 1;
        }
        memset(block, 0x5a, size);
        shim_free(block);
    }
    if (dlsym(shim, "ksm_stats") || dlsym(shim, "ksm_config_read")) {
        printf("FAIL internal symbols are exported\n");
        return 1;
    }
    dlclose(shim);
    printf("ok dlopen\n");
    return 0;
}
