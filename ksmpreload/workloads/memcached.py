"""memcached: N servers holding the same keys and values loaded in the same order; and
(memcached-slabs) how the slab layout limits merging: two servers, the same data loaded in the
same or another order, under several slab layouts."""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from .. import kernel
from ..diagnosis import memcached_page_slab_sizes
from ..errors import KsmError
from . import Loaded, Run, counted, rate
from .data import aligned_value_pages, items, page_multiples, value_sizes
from .servers import free_port, require_module, start_server, stop

if TYPE_CHECKING:
    import subprocess

    from pymemcache.client.base import Client

DESCRIPTION = "N memcached servers holding the same keys and values, loaded in the same order"
SLABS_DESCRIPTION = "two memcached servers, the same data in the same or another order, under 8 slab layouts"
LOAD_BATCH_BYTES = 8 << 20
ITEM_HEADER = 48  # memcached 1.6's item header with CAS: slab class 1 holds it and -n bytes


def slab_layouts() -> tuple[tuple[list[str], str, str], ...]:
    """(memcached options, load order of the other servers, value sizes) of memcached-slabs."""
    page = kernel.page_size()
    return (
        ([], "same", "mixed"),
        ([], "shuffled", "mixed"),
        ([], "shuffled", "page multiples"),
        (["-f", "2"], "shuffled", "mixed"),
        (["-n", str(page - ITEM_HEADER), "-f", "2"], "shuffled", "mixed"),  # classes of 1, 2, 4... pages
        (["-n", str(page - ITEM_HEADER - 8), "-f", "2"], "shuffled", "mixed"),  # each 8 bytes short
        (["-o", "slab_chunk_max=16384"], "shuffled", "mixed"),
        (["-o", memcached_page_slab_sizes()], "shuffled", "mixed"),
    )


def start(strategy: str, options: list[str], workdir: str) -> tuple[subprocess.Popen, Client]:
    client_module = require_module("pymemcache.client.base", "pymemcache")
    port = free_port()
    as_root = ["-u", "root"] if os.geteuid() == 0 else []  # memcached refuses root without -u
    command = ["memcached", "-p", str(port), "-U", "0", "-m", "1024", "-l", "127.0.0.1", *as_root, *options]
    proc = start_server(command, strategy, port, workdir)
    return proc, client_module.Client(("127.0.0.1", port), timeout=120)


def load(client: Client, pairs: Iterable[tuple[bytes, bytes]]) -> None:
    """Sets the pairs in batches; KsmError when the server stops answering."""
    exceptions = require_module("pymemcache.exceptions", "pymemcache")
    try:
        _load(client, pairs)
    except (exceptions.MemcacheError, OSError) as error:
        raise KsmError(f"memcached on {client.server} stopped answering while loading: {error}") from None


def _load(client, pairs):
    batch, pending = {}, 0
    for key, data in pairs:
        batch[key] = data
        pending += len(data)
        if pending >= LOAD_BATCH_BYTES:
            client.set_many(batch, noreply=False)
            batch, pending = {}, 0
    client.set_many(batch, noreply=False)


@contextlib.contextmanager
def servers(
    sizes: list[int], processes: int, strategy: str, options: list[str], order: str, workdir: str
) -> Iterator[Loaded]:
    """`processes` servers with `options`; the first loads the values in index order, the others
    in the same order or each in its own shuffled order."""
    started_servers = []
    try:
        started = time.monotonic()
        for number in range(processes):
            indexes = list(range(len(sizes)))
            if order == "shuffled" and number > 0:
                random.Random(number).shuffle(indexes)
            started_servers.append(start(strategy, options, workdir))
            load(started_servers[-1][1], items(sizes, indexes))
        loaded = rate(processes * len(sizes), started, "sets/s", time.monotonic())
        yield Loaded({proc.pid: sum(sizes) for proc, _ in started_servers}, **loaded)
    finally:
        stop([proc for proc, _ in started_servers])


def run(
    sizes: list[int], processes: int, strategy: str, options: list[str], order: str, workdir: str, values: str = "mixed"
) -> Run:
    label = f"{counted(processes, 'server')}, {' '.join(options) or 'default options'}, {order} order"
    return Run(
        label,
        lambda: servers(sizes, processes, strategy, options, order, workdir),
        expected_saved_bytes=aligned_value_pages(sizes) * (processes - 1) * kernel.page_size(),
        details={"options": options, "order": order, "values": values, "value_count": len(sizes)},
    )


def runs(settings: dict, strategy: str, processes: int | None, method: str | None, workdir: str) -> list[Run]:
    return [run(value_sizes(settings["value_bytes"]), processes or 3, strategy, [], "same", workdir)]


def slab_runs(settings: dict, strategy: str, processes: int | None, method: str | None, workdir: str) -> list[Run]:
    mixed = value_sizes(settings["value_bytes"])
    layouts = []
    for options, order, values in slab_layouts():
        sizes = mixed if values == "mixed" else page_multiples(mixed)
        layout = run(sizes, processes or 2, strategy, options, order, workdir, values)
        layout.label += f", {values} value sizes"
        layouts.append(layout)
    return layouts
