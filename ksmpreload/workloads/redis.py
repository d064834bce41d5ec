"""Debian's redis-server as the benchmarks, scenarios and tests run it: on loopback, without
persistence (no RDB snapshots, no append-only file)."""


def server_command(port, *options, directory=None):
    """redis-server's argv on 127.0.0.1:`port`, its files (if any) in `directory`, then `options`."""
    where = ["--dir", str(directory)] if directory is not None else []
    return ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            *where, *options]  # fmt: skip
