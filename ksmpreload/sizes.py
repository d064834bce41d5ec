"""Sizes as people write them: 65536, 64K, 2M, 1G, 64KiB (powers of 1024)."""
import re

import click

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


def parse_size(text):
    """Bytes in `text`; ValueError names what is wrong."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"'{text}' is not a size (write it like 65536, 64K or 2M)")
    return int(match.group(1)) << _SHIFT[match.group(2).lower()]


class SizeParam(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)
