"""Output shared by the commands: one renderer per format (JSON; text and tables with rich)."""
import json

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def print_json(obj, compact=False):
    """`obj` as JSON on stdout: indented, or on one line (for one object per line streams)."""
    click.echo(json.dumps(obj, indent=None if compact else 2))


def console():
    """A rich console on the current stdout (no guessing of colours for numbers)."""
    return Console(highlight=False)


def print_rich(renderable):
    console().print(renderable)


def human_bytes(count):
    """1536 -> '1.5 KiB'; negative counts keep their sign."""
    size = float(abs(count))
    for unit in UNITS:
        if size < 1024 or unit == UNITS[-1]:
            break
        size /= 1024
    sign = "-" if count < 0 else ""
    return f"{sign}{int(size)} B" if unit == "B" else f"{sign}{size:.1f} {unit}"


def key_value_lines(pairs):
    """'name: value' lines, one per pair, as the kernel documentation lists KSM counters."""
    return Text("\n".join(f"{name}: {value}" for name, value in pairs))


def table(columns, rows, title=None):
    """A rich table. `columns` are (header, justify) pairs; cells are converted with str()."""
    result = Table(title=title, title_justify="left")
    for header, justify in columns:
        result.add_column(header, justify=justify)
    for row in rows:
        result.add_row(*(str(cell) for cell in row))
    return result
