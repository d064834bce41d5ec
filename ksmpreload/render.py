"""Output shared by the commands: one renderer per format (JSON; text and tables with rich)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn, TextIO

import click
from rich.columns import Columns
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from .errors import KsmError

UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
TEXT_COLUMN_WIDTH = 40  # text cells longer than this are cut with '…'
PIPE_WIDTH = 160  # columns when stdout is not a terminal (rich would use 80) and no $COLUMNS


def print_json(obj: object, compact: bool = False) -> None:
    """`obj` as JSON on stdout: indented, or on one line (for one object per line streams)."""
    click.echo(json.dumps(obj, indent=None if compact else 2))


def console() -> Console:
    """A rich console on the current stdout, wide enough for a table row per line in a pipe."""
    result = Console(highlight=False)
    if not result.is_terminal and "COLUMNS" not in os.environ:
        result.width = PIPE_WIDTH
    return result


def print_rich(renderable: RenderableType) -> None:
    console().print(renderable, crop=False)  # a note longer than the width stays whole (note_lines)


def human_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'; negative counts keep their sign."""
    size = float(abs(count))
    for unit in UNITS:
        if size < 1024 or unit == UNITS[-1]:
            break
        size /= 1024
    sign = "-" if count < 0 else ""
    return f"{sign}{int(size)} B" if unit == "B" else f"{sign}{size:.1f} {unit}"


def note_lines(notes: Iterable[str]) -> list[Text]:
    """'note: ...' lines, one per note, to follow a command's output."""
    return [Text(f"note: {note}", no_wrap=True, overflow="ignore") for note in notes]  # one line each, for grep


def refresh_live(make_view: Callable[[], RenderableType], seconds: float) -> NoReturn:
    """The one live loop of status and top: make_view() redrawn in place every `seconds`
    until Ctrl-C (which the caller or the edge handles)."""
    from rich.live import Live

    with Live(make_view(), console=console(), auto_refresh=False) as live:
        while True:
            time.sleep(seconds)
            live.update(make_view(), refresh=True)


def key_value_lines(pairs: Iterable[tuple[str, object]]) -> Text:
    """'name: value' lines, one per pair, as the kernel documentation lists KSM counters."""
    return Text("\n".join(f"{name}: {value}" for name, value in pairs))


def key_value_columns(pairs: Iterable[tuple[str, object]]) -> Columns:
    """The same 'name: value' items laid out in columns, to fit a terminal's height."""
    return Columns([Text(f"{name}: {value}") for name, value in pairs], column_first=True, padding=(0, 3))


def shown(cell: object) -> str:
    """A cell as one line of printable text: control characters escaped (\\x1b), since names
    come from other processes (a command line, a cgroup)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(cell))


def table(columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[object]], title: str | None = None) -> Table:
    """A rich table, one line per row. `columns` are (header, justify) pairs; cells are
    shown as plain text. Left-justified (text) cells longer than TEXT_COLUMN_WIDTH, or too
    long for the terminal, are cut with '…'; numbers are never cut, headers wrap."""
    result = Table(title=title, title_justify="left")
    for index, (header, justify) in enumerate(columns):
        widest = max((len(str(row[index])) for row in rows), default=0)
        if justify == "left":
            result.add_column(header, justify=justify, no_wrap=True, overflow="ellipsis", max_width=TEXT_COLUMN_WIDTH)
        else:
            result.add_column(header, justify=justify, min_width=widest)
    for row in rows:
        result.add_row(*(Text(shown(cell)) for cell in row))
    return result


def markdown_table(
    columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[object]], title: str | None = None
) -> str:
    """The same table as GitHub-flavoured Markdown: a '### title' line, then a pipe table."""
    align = {"left": ":---", "right": "---:", "center": ":---:"}
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(header for header, _ in columns) + " |")
    lines.append("|" + "|".join(align[justify] for _, justify in columns) + "|")
    lines += ["| " + " | ".join(shown(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def check_output_path(ctx: click.Context, param: click.Parameter, path: str | None) -> str | None:
    """A click callback for an output file option: the file can be created where it is named,
    before a long run starts (a file named in a missing or read-only directory fails now)."""
    if path is None:
        return None
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise click.BadParameter(f"{path} is a directory")
    if not os.path.isdir(directory):
        raise click.BadParameter(f"no directory {directory}")
    if not os.access(directory, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise click.BadParameter(f"{path} cannot be written")
    return path


def write_output(path: str, write: Callable[[TextIO], object]) -> None:
    """write(file) into `path`; a failure (a full disk) as one line naming the file."""
    try:
        with open(path, "w") as f:
            write(f)
    except OSError as error:
        raise KsmError(f"cannot write {path}: {error.strerror or error}") from None


def plot_lines(
    path: str,
    series: dict[str, list[tuple[float, float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    styles: dict[str, dict[str, Any]] | None = None,
) -> None:
    """A PNG at `path` with one line per entry of `series` ({label: [(x, y), ...]}), drawn
    with styles[label] (matplotlib keywords such as color, linestyle) where given."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(8, 4.5), dpi=100)
    for label, points in series.items():
        axes.plot([x for x, _ in points], [y for _, y in points], label=label, **(styles or {}).get(label, {}))
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    try:
        figure.savefig(path)
    except OSError as error:
        raise KsmError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        pyplot.close(figure)
