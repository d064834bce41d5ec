"""A demo worker: holds MIB of data that every worker with the same seed holds too,
prints one JSON line when ready, and keeps it until stdin closes."""

from __future__ import annotations

import json
import os
import random
import sys

CHUNK = 256 * 1024


def hold(mib: int, seed: int) -> list[bytearray]:
    rng = random.Random(seed)
    return [bytearray(rng.randbytes(CHUNK)) for _ in range(mib * (1 << 20) // CHUNK)]


def main() -> None:
    mib, seed = int(sys.argv[1]), int(sys.argv[2])
    data = hold(mib, seed)
    print(json.dumps({"pid": os.getpid(), "bytes": sum(len(chunk) for chunk in data)}), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
