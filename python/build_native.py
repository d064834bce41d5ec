"""cffi build script for ksmpreload._native: the syscalls the toolkit makes itself."""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffibuilder = FFI()
ffibuilder.cdef("""
    int ksm_prctl_set_merge(int enable);
    int ksm_prctl_get_merge(void);
    int ksm_madvise_mergeable(void *addr, size_t length);
    long ksm_page_size(void);
""")
with open(os.path.join(HERE, "native.c")) as source:
    ffibuilder.set_source("ksmpreload._native", source.read(), extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
