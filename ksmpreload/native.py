"""The compiled helper (python/native.c, built by cffi) with Python errors."""
import os

from ._native import lib


def _check(result):
    if result < 0:
        raise OSError(-result, os.strerror(-result))
    return result


def set_memory_merge(enable=True):
    """prctl(PR_SET_MEMORY_MERGE): every compatible mapping of this process (and, on Linux
    6.7+, of what it execs) becomes mergeable. OSError(EINVAL) where the kernel lacks it."""
    _check(lib.ksm_prctl_set_merge(1 if enable else 0))


def memory_merge_enabled():
    return bool(_check(lib.ksm_prctl_get_merge()))
