"""A CPython process holding the same bytes objects as its siblings, in another heap layout:
`python bytes_holder.py SEED [COUNT]` makes COUNT values of 12-60 KiB (value i is the same in
every process), in an order and between small allocations that SEED shuffles, prints "ready"
and waits until stdin closes. Equal data, different offsets within pages: what the doctor's
any-offset analysis (ksmpreload/layout.py) must see and whole-page hashing cannot."""

import random
import sys


def main(seed, count):
    sizes = random.Random(1)
    lengths = [sizes.randint(12 << 10, 60 << 10) for _ in range(count)]
    order = list(range(count))
    random.Random(seed).shuffle(order)
    noise = random.Random(seed + 100)
    held, small = [], []
    for index in order:
        small.append(bytes(noise.randint(16, 3000)))
        held.append(random.Random(index).randbytes(lengths[index]))
    print("ready", sum(lengths), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 600)
