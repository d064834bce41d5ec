"""The data the server workloads load: values of log-uniform sizes, each value's bytes fixed
by its index, so that every server (and every run) holds the same values."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator

from .. import kernel

MIN_VALUE, MAX_VALUE = 100, 64 * 1024
WRAP_THRESHOLD = 8 * 1024  # ksm-wrap's default --threshold: the values it page-aligns


def value_sizes(total_bytes: int, seed: int = 1) -> list[int]:
    """Value sizes, log-uniform between MIN_VALUE and MAX_VALUE (many small values, most bytes in
    large ones), adding up to about total_bytes."""
    rng = random.Random(seed)
    low, high = math.log(MIN_VALUE), math.log(MAX_VALUE)
    sizes = []
    while sum(sizes) < total_bytes:
        sizes.append(int(math.exp(rng.uniform(low, high))))
    return sizes


def value(index: int, size: int) -> bytes:
    return random.Random(index).randbytes(size)


def items(sizes: list[int], order: Iterable[int]) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) for each index of `order`: key:<index> holds value(index, sizes[index])."""
    for index in order:
        yield f"key:{index}".encode(), value(index, sizes[index])


def page_multiples(sizes: Iterable[int]) -> list[int]:
    """Each size rounded down to a whole number of pages (at least one)."""
    page = kernel.page_size()
    return [max(page, size // page * page) for size in sizes]


def aligned_value_pages(sizes: Iterable[int]) -> int:
    """Pages entirely inside the values that ksm-wrap page-aligns (those of WRAP_THRESHOLD and up)."""
    page = kernel.page_size()
    return sum(size // page for size in sizes if size >= WRAP_THRESHOLD)
