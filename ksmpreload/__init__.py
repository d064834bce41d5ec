"""ksmpreload: Kernel Samepage Merging for unmodified programs."""

from __future__ import annotations

import os

__version__ = "0.1.0"

SHIM_ENV = "KSMPRELOAD_SHIM"


def shim_path() -> str:
    """Path of libksmpreload.so: $KSMPRELOAD_SHIM if set (development), else the packaged one."""
    return os.environ.get(SHIM_ENV) or os.path.join(os.path.dirname(__file__), "libksmpreload.so")
