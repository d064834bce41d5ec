"""Debian's redis-server: N servers holding the same keys and values; then one server whose keys
share a few distinct values. On loopback, without persistence."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from .. import kernel
from ..errors import KsmError
from . import Loaded, Run, counted, rate
from .data import aligned_value_pages, items, value, value_sizes
from .servers import free_port, require_module, start_server, stop

if TYPE_CHECKING:
    import os
    import subprocess

    from redis import Redis

DESCRIPTION = "N redis-servers holding the same keys and values, then one whose keys share 32 values"
LOAD_BATCH_BYTES = 8 << 20
DISTINCT_VALUES = 32


def server_command(port: int, *options: str, directory: str | os.PathLike[str] | None = None) -> list[str]:
    """redis-server's argv on 127.0.0.1:`port`, its files (if any) in `directory`, then `options`."""
    where = ["--dir", str(directory)] if directory is not None else []
    return ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            *where, *options]  # fmt: skip


def start(strategy: str, workdir: str) -> tuple[subprocess.Popen, Redis]:
    redis = require_module("redis")
    port = free_port()
    proc = start_server(server_command(port, directory=workdir), strategy, port, workdir)
    return proc, redis.Redis(host="127.0.0.1", port=port, socket_timeout=120)


def load(client: Redis, pairs: Iterable[tuple[bytes, bytes]]) -> None:
    """Sets the pairs in pipelined batches; KsmError when the server stops answering."""
    redis = require_module("redis")
    try:
        _load(client, pairs)
    except (redis.exceptions.RedisError, OSError) as error:
        port = client.connection_pool.connection_kwargs.get("port")
        raise KsmError(f"redis-server on port {port} stopped answering while loading: {error}") from None


def _load(client, pairs):
    pipe = client.pipeline(transaction=False)
    pending = 0
    for key, data in pairs:
        pipe.set(key, data)
        pending += len(data)
        if pending >= LOAD_BATCH_BYTES:
            pipe.execute()
            pending = 0
    pipe.execute()


@contextlib.contextmanager
def same_values(sizes: list[int], processes: int, strategy: str, workdir: str) -> Iterator[Loaded]:
    """`processes` servers, each loaded with the same keys and values."""
    servers = []
    try:
        started = time.monotonic()
        for _ in range(processes):
            servers.append(start(strategy, workdir))
            load(servers[-1][1], items(sizes, range(len(sizes))))
        loaded = rate(processes * len(sizes), started, "sets/s", time.monotonic())
        yield Loaded({proc.pid: sum(sizes) for proc, _ in servers}, **loaded)
    finally:
        stop([proc for proc, _ in servers])


@contextlib.contextmanager
def duplicate_values(sizes: list[int], distinct: int, strategy: str, workdir: str) -> Iterator[Loaded]:
    """One server; key i holds the value of index i mod `distinct`."""
    pool = sizes[:distinct]
    proc, client = start(strategy, workdir)
    try:
        load(client, ((f"key:{i}".encode(), value(i % distinct, pool[i % distinct])) for i in range(len(sizes))))
        yield Loaded({proc.pid: sum(pool[i % distinct] for i in range(len(sizes)))})
    finally:
        stop([proc])


def duplicate_expected_pages(sizes: list[int], distinct: int) -> int:
    pool = sizes[:distinct]
    copies = [len(range(index, len(sizes), distinct)) for index in range(distinct)]
    return sum(aligned_value_pages([size]) * (count - 1) for size, count in zip(pool, copies))


def runs(settings: dict, strategy: str, processes: int | None, method: str | None, workdir: str) -> list[Run]:
    sizes, processes, page = value_sizes(settings["value_bytes"]), processes or 3, kernel.page_size()
    return [
        Run(
            f"{counted(processes, 'server')}, same values",
            lambda: same_values(sizes, processes, strategy, workdir),
            expected_saved_bytes=aligned_value_pages(sizes) * (processes - 1) * page,
            details={"value_count": len(sizes)},
        ),
        Run(
            f"1 server, {len(sizes)} keys sharing {DISTINCT_VALUES} values",
            lambda: duplicate_values(sizes, DISTINCT_VALUES, strategy, workdir),
            expected_saved_bytes=duplicate_expected_pages(sizes, DISTINCT_VALUES) * page,
            details={"value_count": len(sizes)},
        ),
    ]
