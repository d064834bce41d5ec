"""The python-prefork workload's WSGI app. gunicorn --preload imports it in the master, which
builds an index of ordinary Python objects (dicts, str, lists, floats) before it forks the
workers; each request reads ITEMS_PER_REQUEST items of it and returns them as JSON."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable

OBJECTS = int(os.environ.get("KSMPRELOAD_PREFORK_OBJECTS", "100000"))
ITEMS_PER_REQUEST = 20
WORDS = [f"{stem}{n}" for stem in ("alpha", "bravo", "kilo", "sierra", "tango", "zulu") for n in range(20)]


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_index(count: int) -> dict[str, dict]:
    return {
        f"item:{i}": {
            "id": i,
            "name": f"item number {i}",
            "tags": [WORDS[i % 61], WORDS[i % 53], WORDS[i % 47]],
            "price": i * 0.25,
            "text": " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(8)),
        }
        for i in range(count)
    }


_before = resident_bytes()
INDEX = build_index(OBJECTS)
KEYS = list(INDEX)
INDEX_BYTES = resident_bytes() - _before  # what building the index added to the master


def app(environ: dict, start_response: Callable[[str, list[tuple[str, str]]], object]) -> list[bytes]:
    rng = random.Random(environ.get("QUERY_STRING", ""))
    body = json.dumps([INDEX[rng.choice(KEYS)] for _ in range(ITEMS_PER_REQUEST)]).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
