"""Sizes as the shim reads them (shim/config.c parse_size): digits, then K, M, G or T (powers of
1024), then i, iB, B or b, both optional: 65536, 64K, 2M, 64KiB. As the shim's strtoull allows,
blanks and a '+' may come first; nothing may follow."""

from __future__ import annotations

import re

import click

MIB = 1 << 20  # the one MiB of every figure the tool prints

_SIZE = re.compile(r"[ \t\n\v\f\r]*\+?([0-9]+)([kKmMgGtT]?)(iB|i|B|b)?")
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


def parse_size(text: str) -> int:
    """Bytes in `text`; ValueError names what is wrong."""
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise ValueError(f"{str(text)!r} is not a size (write it like 65536, 64K or 2M)")
    return int(match.group(1)) << _SHIFT[match.group(2).lower()]


def short_size(size: int) -> str:
    """`size` in the largest of K, M, G, T that divides it: 4096 -> 4K, 1 << 40 -> 1T."""
    for suffix, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size and size % (1 << shift) == 0:
            return f"{size >> shift}{suffix}"
    return str(size)


class SizeParam(click.ParamType):
    """A size from `minimum` to `maximum` bytes."""

    name = "SIZE"

    def __init__(self, minimum: int, maximum: int) -> None:
        self.minimum, self.maximum = minimum, maximum

    def convert(self, value: str | int, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            size = parse_size(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)
        if not self.minimum <= size <= self.maximum:
            self.fail(f"{value!r} is not from {short_size(self.minimum)} to {short_size(self.maximum)}", param, ctx)
        return size
