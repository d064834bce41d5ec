#!/usr/bin/env python3
"""The four workloads of "Exploring KSM with Modern Workloads" (shared/seed), reproduced:
Redis, memcached, PyTorch and stress-ng, each started under ksm-wrap (or not), loaded with
data, merged by KSM at a fast scan rate, and measured.

    python3 scripts/scenarios.py NAME [--size small|full] [--strategy auto|prctl|madvise|none]
                                      [--processes N] [--method M] [--json] [--serve]

NAME (each function of the same name returns the report as a dict):

    redis            N redis-servers holding the same keys and values (sizes 100 B to 64 KiB,
                     log-uniform: many small values, most bytes in large ones); then one
                     redis-server whose keys share a few distinct values
    memcached        N memcached servers holding the same keys and values, loaded in the
                     same order
    memcached-slabs  how memcached's slab layout limits merging: two servers, the same data
                     loaded in the same or in a different order, under several slab layouts
    pytorch          N python3 workers that each build a model and load the same weights
                     (torch.save'd once) into it
    stress-ng        stress-ng --vm 2 --vm-keep --vm-hang 0 --no-madvise (fill once, then hold)
                     for fill methods that write duplicate pages and for methods that write
                     random data

Every server or worker runs as `ksm-wrap --strategy STRATEGY COMMAND` (auto, ksm-wrap's
default: prctl on Linux 6.4+), or without ksm-wrap for --strategy none. Once the data is
loaded, KSM runs at a fast scan rate (scanning.fast_scanning: every knob put back after)
until the summed ksm_merging_pages of the processes has not moved by more than 64 pages or
0.5% for 9 full scans (scanning.wait_until_settled, or the size's timeout; not at all when
none of their memory is mergeable); then, still scanning, each process and the set are
measured:

    merged pages      ksm_merging_pages (ksm_stat): pages that map a KSM page
    saved             pages the set no longer needs: its pages that map a KSM page minus the
                      distinct KSM pages they map (PFNs through pagemap, sharing.sharing), plus
                      ksm_zero_pages (pages that map the zero page, with use_zero_pages). This
                      counts what merging saves whatever n processes hold each page; a KSM
                      page that processes outside the set map too is charged to the set. A
                      process's share: its merged pages x (set saving / set merged pages)
    % of RSS          saved / RSS (RSS counts a merged page in every process that maps it)
    padding           the shim's memory cost (shimstats.memory_cost_bytes: the padding of live
                      aligned blocks and its table, docs/COUNTERS.md); 0 without the shim
    net saved         saved - padding - rmap items x 64 B (what the kernel charges for each
                      rmap_item in general_profit)
    time to 90%       seconds from the start of fast scanning until the summed merged pages
                      first reached 90% of their final value (polled every 0.2 s)
    rmap items        ksm_rmap_items (ksm_stat): the pages ksmd tracks
    timeline          [seconds, summed merged pages] at each poll while merging settled
    throughput        redis, memcached: sets per second while loading all servers
    potential         the duplicate potential after merging (potential.potential: what could
                      be saved if every page with equal contents were merged); of it, the
                      non-zero part: pages whose equal contents are not all zeros; zero bytes:
                      the pages that are all zeros (merged, each saves a page but the last)
    expected          for redis and memcached: the pages entirely inside values of at least
                      8 KiB (ksm-wrap's default threshold, which page-aligns them) x (n - 1)

With --serve the script only starts and loads the processes of one scenario, prints a JSON
ready line ({"ready": true, "pids": [...], "throughput": ...}) and holds them until SIGTERM:
the workload that `ksmpreload compare --wait-ready` measures under each allocator and strategy.

Needs root (the KSM knobs, pagemap PFNs) and Debian's redis-server, memcached, stress-ng;
redis-py, pymemcache and torch for their scenarios. Sizes: `small` (tens of MiB per process,
for the tests) and `full` (hundreds of MiB per process).
"""

import argparse
import contextlib
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil

from ksmpreload import kernel, scanning, shimstats
from ksmpreload.processes import ksm_wrap_command, merged_pages, start_workers, stop_workers
from ksmpreload.potential import potential
from ksmpreload.sharing import sharing
from ksmpreload.workloads.redis import server_command

MIB = 1 << 20
PAGE = kernel.page_size()
STRATEGIES = ("auto", "prctl", "madvise", "none")
WRAP_THRESHOLD = 8 * 1024  # ksm-wrap's default --threshold
MIN_VALUE, MAX_VALUE = 100, 64 * 1024
LOAD_BATCH_BYTES = 8 * MIB

SIZES = {
    "small": {"value_bytes": 16 * MIB, "torch_layers": 5, "torch_width": 1024, "vm_bytes": 64 * MIB, "timeout": 60},
    "full": {"value_bytes": 400 * MIB, "torch_layers": 8, "torch_width": 3072, "vm_bytes": 1024 * MIB, "timeout": 600},
}

# Fill methods of stress-ng 0.15: the first two write pages of few distinct contents, the last
# two random data (what the blog post ran into); prime-incdec leaves most pages zero.
STRESS_METHODS = ("zero-one", "walk-0d", "prime-incdec", "rand-set", "flip")
STRESS_WORKERS = 2

# memcached-slabs: (memcached options, load order of the other servers, value sizes)
MEMCACHED_ITEM_HEADER = 48  # memcached 1.6's item header with CAS: slab class 1 holds it and -n bytes
PAGE_MULTIPLE_SLAB_SIZES = "slab_sizes=" + "-".join(str(PAGE << i) for i in range(8))
SLAB_LAYOUTS = (
    ([], "same", "mixed"),
    ([], "shuffled", "mixed"),
    ([], "shuffled", "page multiples"),
    (["-f", "2"], "shuffled", "mixed"),
    (["-n", str(PAGE - MEMCACHED_ITEM_HEADER), "-f", "2"], "shuffled", "mixed"),  # classes of 1, 2, 4... pages
    (["-n", str(PAGE - MEMCACHED_ITEM_HEADER - 8), "-f", "2"], "shuffled", "mixed"),  # each 8 bytes short
    (["-o", "slab_chunk_max=16384"], "shuffled", "mixed"),
    (["-o", PAGE_MULTIPLE_SLAB_SIZES], "shuffled", "mixed"),
)


def say(text):
    print(text, file=sys.stderr, flush=True)


# ---- data -------------------------------------------------------------------------------------


def value_sizes(total_bytes, seed=1):
    """Value sizes, log-uniform between MIN_VALUE and MAX_VALUE, adding up to about total_bytes."""
    rng = random.Random(seed)
    low, high = math.log(MIN_VALUE), math.log(MAX_VALUE)
    sizes = []
    while sum(sizes) < total_bytes:
        sizes.append(int(math.exp(rng.uniform(low, high))))
    return sizes


def value(index, size):
    return random.Random(index).randbytes(size)


def items(sizes, order):
    """(key, value) for each index of `order`: key:<index> holds value(index, sizes[index])."""
    for index in order:
        yield f"key:{index}".encode(), value(index, sizes[index])


def page_multiples(sizes):
    """Each size rounded down to a whole number of pages (at least one)."""
    return [max(PAGE, size // PAGE * PAGE) for size in sizes]


def aligned_value_pages(sizes):
    """Pages entirely inside the values that ksm-wrap page-aligns (those of WRAP_THRESHOLD and up)."""
    return sum(size // PAGE for size in sizes if size >= WRAP_THRESHOLD)


# ---- processes --------------------------------------------------------------------------------


def wrapped(command, strategy):
    return list(command) if strategy == "none" else [*ksm_wrap_command(), "--strategy", strategy, *command]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(command, strategy, port, workdir, timeout=30.0):
    """The server behind ksm-wrap (or not), once it accepts connections on `port`."""
    log_path = os.path.join(workdir, f"{os.path.basename(command[0])}-{port}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(wrapped(command, strategy), stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd="/")
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            stop([proc])
            with open(log_path) as log:
                raise RuntimeError(f"{command[0]} did not start on port {port}: {log.read()[-500:]}")
        time.sleep(0.05)


def process_tree(pid):
    """pid and its descendants (stress-ng forks its workers)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


def stop(procs):
    """Kill the processes and their descendants, and reap the processes. Each parent goes
    before its children: stress-ng restarts a worker killed by SIGKILL (it takes it for the
    OOM killer), and the new worker would outlive the run."""
    for proc in procs:
        for member in process_tree(proc.pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
    for proc in procs:
        proc.wait(timeout=30)


def loaded(data_by_pid, operations=None, started=None, unit="sets/s"):
    """What a scenario's loader yields: {pid: bytes of data it holds}, and the load rate
    (operations per second since `started`) when the workload has one."""
    rate = {}
    if operations:
        seconds = time.monotonic() - started
        rate = {"load_s": round(seconds, 2), "throughput": round(operations / seconds, 1), "throughput_unit": unit}
    return {"data_by_pid": data_by_pid, "rate": rate}


# ---- merging and measuring -------------------------------------------------------------------


def mergeable_kib(pids):
    """KiB of the processes' anonymous memory in VMAs marked mergeable (smaps VmFlags mg)."""
    return sum(kernel.mergeable_coverage(kernel.process_regions(pid) or [])[0] for pid in pids)


def time_to_fraction(timeline, final, fraction=0.9):
    """Seconds until the value first reached fraction x final; None if nothing merged."""
    if final <= 0:
        return None
    return next((seconds for seconds, value in timeline if value >= fraction * final), None)


def process_row(pid, saved_per_merged, data_bytes):
    stat = kernel.process_ksm_stat(pid) or {}
    counters = shimstats.read_process_stats(pid) or {}
    merged, zero = stat.get("ksm_merging_pages", 0), stat.get("ksm_zero_pages", 0)
    return {
        "pid": pid,
        "comm": (kernel.read_proc(pid, "comm") or "").strip(),
        "data_bytes": data_bytes,
        "rss_bytes": psutil.Process(pid).memory_info().rss,
        "ksm_merging_pages": merged,
        "ksm_zero_pages": zero,
        "rmap_items": stat.get("ksm_rmap_items", 0),
        "saved_bytes": round((merged * saved_per_merged + zero) * PAGE),
        "padding_bytes": shimstats.memory_cost_bytes(counters),
        "shim": bool(counters),
    }


def summed(rows):
    """The set's totals of the per-process rows, with the percentages and net saving."""
    keys = (
        "data_bytes",
        "rss_bytes",
        "ksm_merging_pages",
        "ksm_zero_pages",
        "rmap_items",
        "saved_bytes",
        "padding_bytes",
    )
    total = {key: sum(row[key] for row in rows) for key in keys}
    return with_net(total)


def with_net(row):
    row["saved_pct_of_rss"] = 100 * row["saved_bytes"] / row["rss_bytes"] if row["rss_bytes"] else 0.0
    row["net_saved_bytes"] = row["saved_bytes"] - row["padding_bytes"] - row["rmap_items"] * kernel.RMAP_ITEM_BYTES
    return row


def settle_through_chain_prunes(pids, start, timeout, timeline):
    """Settled, and still so after a prune of the stable node chains (content held more than
    max_page_sharing times lives in chains of KSM pages). A guard, not a seen need: a half
    merge of stress-ng once looked like a chain waiting for its prune, but the cause was
    stress-ng's random MADV_UNMERGEABLE; 16,384 equal pages have merged within 0.2 s here."""
    prune_seconds = (kernel.read_knob("stable_node_chains_prune_millisecs") or 2000) / 1000
    while True:
        settled = scanning.wait_until_settled(
            scanning.ignoring_flutter(lambda: merged_pages(pids)),
            timeout=max(timeout - (time.monotonic() - start), 1),
            on_progress=lambda merged: timeline.append((time.monotonic() - start, merged)),
        )
        time.sleep(1.5 * prune_seconds)
        if merged_pages(pids) - settled <= max(64, 0.005 * settled) or time.monotonic() - start > timeout:
            return


def measure(data_by_pid, timeout):
    """Merge at a fast scan rate until settled, then measure each process (data_by_pid: pid ->
    bytes of data it holds) and the set."""
    pids, timeline = list(data_by_pid), []
    # With nothing mergeable, ksmd may have no process to scan: full_scans would never advance.
    can_merge = mergeable_kib(pids) > 0
    with scanning.fast_scanning():
        start = time.monotonic()
        if can_merge:
            settle_through_chain_prunes(pids, start, timeout, timeline)
        settle_seconds, final = time.monotonic() - start, merged_pages(pids)
        report = sharing(pids)
        saved_per_merged = (
            (report.totals["mapped"] - report.totals["distinct"]) / report.totals["mapped"]
            if report.totals["mapped"]
            else 0.0
        )
        rows = [with_net(process_row(pid, saved_per_merged, data_by_pid[pid])) for pid in pids]
        duplicate = potential(pids)
    return {
        "processes": rows,
        "total": summed(rows),
        "potential_bytes": duplicate.potential_pages * duplicate.page_size,
        "nonzero_potential_bytes": (duplicate.totals["saving_across"] + duplicate.totals["saving_within"])
        * duplicate.page_size,
        "zero_bytes": duplicate.totals["zero_pages"] * duplicate.page_size,
        "time_to_90pct_s": time_to_fraction(timeline, final),
        "settle_s": settle_seconds,
        "timeline": [[round(seconds, 2), merged] for seconds, merged in timeline],
        "mergeable": can_merge,
        "settled": settle_seconds < timeout,
    }


# ---- redis ----------------------------------------------------------------------------------


def start_redis(strategy, workdir):
    import redis

    port = free_port()
    proc = start_server(
        server_command(port, directory=workdir),
        strategy,
        port,
        workdir,
    )
    return proc, redis.Redis(host="127.0.0.1", port=port, socket_timeout=120)


def load_redis(client, pairs):
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
def redis_servers(sizes, processes, strategy, workdir):
    """`processes` redis-servers, each loaded with the same keys and values."""
    servers = []
    try:
        started = time.monotonic()
        for _ in range(processes):
            servers.append(start_redis(strategy, workdir))
            load_redis(servers[-1][1], items(sizes, range(len(sizes))))
        yield loaded({proc.pid: sum(sizes) for proc, _ in servers}, processes * len(sizes), started)
    finally:
        stop([proc for proc, _ in servers])


def redis_same_values(sizes, processes, strategy, timeout, workdir):
    with redis_servers(sizes, processes, strategy, workdir) as load:
        result = measure(load["data_by_pid"], timeout)
    return {
        "label": f"{processes} servers, same values",
        "value_count": len(sizes),
        "expected_saved_bytes": aligned_value_pages(sizes) * (processes - 1) * PAGE,
        **load["rate"],
        **result,
    }


def redis_duplicate_values(sizes, distinct, strategy, timeout, workdir):
    """One server; key i holds the value of index i mod `distinct`."""
    pool = sizes[:distinct]
    proc, client = start_redis(strategy, workdir)
    try:
        load_redis(client, ((f"key:{i}".encode(), value(i % distinct, pool[i % distinct])) for i in range(len(sizes))))
        result = measure({proc.pid: sum(pool[i % distinct] for i in range(len(sizes)))}, timeout)
    finally:
        stop([proc])
    copies = [len(range(index, len(sizes), distinct)) for index in range(distinct)]
    expected = sum(aligned_value_pages([size]) * (count - 1) for size, count in zip(pool, copies))
    return {
        "label": f"1 server, {len(sizes)} keys sharing {distinct} values",
        "value_count": len(sizes),
        "expected_saved_bytes": expected * PAGE,
        **result,
    }


def redis(size="small", strategy="auto", processes=3):
    settings = SIZES[size]
    sizes = value_sizes(settings["value_bytes"])
    with tempfile.TemporaryDirectory(prefix="scenario-redis.") as workdir:
        runs = [
            redis_same_values(sizes, processes, strategy, settings["timeout"], workdir),
            redis_duplicate_values(sizes, 32, strategy, settings["timeout"], workdir),
        ]
    return {"scenario": "redis", "size": size, "strategy": strategy, "runs": runs}


# ---- memcached --------------------------------------------------------------------------------


def start_memcached(strategy, options, workdir):
    from pymemcache.client.base import Client

    port = free_port()
    as_root = ["-u", "root"] if os.geteuid() == 0 else []  # memcached refuses root without -u
    proc = start_server(
        ["memcached", "-p", str(port), "-U", "0", "-m", "1024", "-l", "127.0.0.1", *as_root, *options],
        strategy,
        port,
        workdir,
    )
    return proc, Client(("127.0.0.1", port), timeout=120)


def load_memcached(client, pairs):
    batch, pending = {}, 0
    for key, data in pairs:
        batch[key] = data
        pending += len(data)
        if pending >= LOAD_BATCH_BYTES:
            client.set_many(batch, noreply=False)
            batch, pending = {}, 0
    client.set_many(batch, noreply=False)


@contextlib.contextmanager
def memcached_servers(sizes, processes, strategy, options, order, workdir):
    """`processes` servers with `options`; the first loads the values in index order, the others
    in the same order or each in its own shuffled order."""
    servers = []
    try:
        started = time.monotonic()
        for number in range(processes):
            indexes = list(range(len(sizes)))
            if order == "shuffled" and number > 0:
                random.Random(number).shuffle(indexes)
            servers.append(start_memcached(strategy, options, workdir))
            load_memcached(servers[-1][1], items(sizes, indexes))
        yield loaded({proc.pid: sum(sizes) for proc, _ in servers}, processes * len(sizes), started)
    finally:
        stop([proc for proc, _ in servers])


def memcached_run(sizes, processes, strategy, options, order, timeout, workdir):
    with memcached_servers(sizes, processes, strategy, options, order, workdir) as load:
        result = measure(load["data_by_pid"], timeout)
    return {
        "label": f"{processes} servers, {' '.join(options) or 'default options'}, {order} order",
        "options": options,
        "order": order,
        "value_count": len(sizes),
        "expected_saved_bytes": aligned_value_pages(sizes) * (processes - 1) * PAGE,
        **load["rate"],
        **result,
    }


def memcached(size="small", strategy="auto", processes=3):
    settings = SIZES[size]
    sizes = value_sizes(settings["value_bytes"])
    with tempfile.TemporaryDirectory(prefix="scenario-memcached.") as workdir:
        runs = [memcached_run(sizes, processes, strategy, [], "same", settings["timeout"], workdir)]
    return {"scenario": "memcached", "size": size, "strategy": strategy, "runs": runs}


def memcached_slabs(size="small", strategy="auto", processes=2):
    settings = SIZES[size]
    mixed = value_sizes(settings["value_bytes"])
    runs = []
    with tempfile.TemporaryDirectory(prefix="scenario-memcached.") as workdir:
        for options, order, values in SLAB_LAYOUTS:
            sizes = mixed if values == "mixed" else page_multiples(mixed)
            run = memcached_run(sizes, processes, strategy, options, order, settings["timeout"], workdir)
            runs.append({**run, "values": values, "label": f"{run['label']}, {values} value sizes"})
            say(f"memcached-slabs: {runs[-1]['label']}")
    return {"scenario": "memcached-slabs", "size": size, "strategy": strategy, "runs": runs}


# ---- pytorch --------------------------------------------------------------------------------


def build_model(layers, width):
    import torch

    return torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))


def torch_worker(weights, layers, width):
    """Build the model (its own random weights), load the saved ones into it, hold them."""
    import torch

    torch.set_num_threads(1)
    model = build_model(layers, width)
    model.load_state_dict(torch.load(weights))
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"pid": os.getpid(), "bytes": held}), flush=True)
    sys.stdin.read()


def import_torch():
    try:
        import torch
    except ImportError:
        raise RuntimeError("the pytorch scenario needs torch: pip install torch") from None
    return torch


@contextlib.contextmanager
def torch_workers(layers, width, processes, strategy):
    """`processes` workers holding the same weights, saved once to a temporary file."""
    torch = import_torch()
    with tempfile.TemporaryDirectory(prefix="scenario-pytorch.") as workdir:
        weights = os.path.join(workdir, "weights.pt")
        torch.manual_seed(0)
        torch.save(build_model(layers, width).state_dict(), weights)
        command = wrapped(
            [sys.executable, os.path.abspath(__file__), "--torch-worker", weights, str(layers), str(width)], strategy
        )
        workers = start_workers([command] * processes)
        try:
            yield loaded({proc.pid: proc.report["bytes"] for proc in workers})
        finally:
            stop_workers(workers)


def pytorch(size="small", strategy="auto", processes=3):
    settings = SIZES[size]
    layers, width = settings["torch_layers"], settings["torch_width"]
    with torch_workers(layers, width, processes, strategy) as load:
        result = measure(load["data_by_pid"], settings["timeout"])
    run = {"label": f"{processes} workers, {layers} x Linear({width}, {width})", **result}
    return {"scenario": "pytorch", "size": size, "strategy": strategy, "runs": [run]}


# ---- stress-ng --------------------------------------------------------------------------------


def cpu_seconds(procs):
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += sum(proc.cpu_times()[:2])
    return total


def wait_until_filled(pid, worker_bytes, workers, timeout):
    """{pid: bytes held} of the process tree once `workers` of its processes hold `worker_bytes`
    each and the tree stopped using CPU (--vm-hang 0: each worker fills its memory once, then
    sleeps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tree = process_tree(pid)
        before = cpu_seconds(tree)
        time.sleep(0.5)
        with contextlib.suppress(psutil.NoSuchProcess):
            holding = {member.pid for member in tree if member.memory_info().rss >= worker_bytes}
            if len(holding) == workers and cpu_seconds(tree) - before < 0.05:
                return {member.pid: worker_bytes if member.pid in holding else 0 for member in tree}
    raise RuntimeError(f"stress-ng (pid {pid}) did not fill {workers} x {worker_bytes >> 20} MiB in {timeout:.0f} s")


@contextlib.contextmanager
def stress_ng_filled(method, vm_bytes, strategy, timeout):
    # --no-madvise: otherwise each worker madvises its buffer with random advice, at times
    # MADV_UNMERGEABLE, and that worker's memory stays unmerged (doctor: unmarked_by_program)
    command = [
        "stress-ng",
        "--vm",
        str(STRESS_WORKERS),
        "--vm-bytes",
        str(vm_bytes),
        "--vm-keep",
        "--vm-hang",
        "0",
        "--vm-method",
        method,
        "--no-madvise",
        "--quiet",
    ]
    proc = subprocess.Popen(wrapped(command, strategy), stdin=subprocess.DEVNULL, cwd="/")
    try:
        # stress-ng divides --vm-bytes among the workers
        yield loaded(wait_until_filled(proc.pid, vm_bytes // STRESS_WORKERS, STRESS_WORKERS, timeout))
    finally:
        stop([proc])


def stress_ng_method(method, vm_bytes, strategy, timeout):
    with stress_ng_filled(method, vm_bytes, strategy, timeout) as load:
        result = measure(load["data_by_pid"], timeout)
    return {"label": f"--vm-method {method}", "method": method, "workers": STRESS_WORKERS, **result}


def stress_ng(size="small", strategy="auto", methods=STRESS_METHODS):
    settings = SIZES[size]
    runs = [stress_ng_method(method, settings["vm_bytes"], strategy, settings["timeout"]) for method in methods]
    return {"scenario": "stress-ng", "size": size, "strategy": strategy, "runs": runs}


SCENARIOS = {
    "redis": redis,
    "memcached": memcached,
    "memcached-slabs": memcached_slabs,
    "pytorch": pytorch,
    "stress-ng": stress_ng,
}

# --serve: each scenario's loader (settings, strategy, processes or None, stress-ng method, workdir)
LOADERS = {
    "redis": lambda settings, strategy, processes, method, workdir: redis_servers(
        value_sizes(settings["value_bytes"]), processes or 3, strategy, workdir
    ),
    "memcached": lambda settings, strategy, processes, method, workdir: memcached_servers(
        value_sizes(settings["value_bytes"]), processes or 3, strategy, [], "same", workdir
    ),
    "pytorch": lambda settings, strategy, processes, method, workdir: torch_workers(
        settings["torch_layers"], settings["torch_width"], processes or 3, strategy
    ),
    "stress-ng": lambda settings, strategy, processes, method, workdir: stress_ng_filled(
        method, settings["vm_bytes"], strategy, settings["timeout"]
    ),
}


def serve(name, size, strategy, processes, method):
    """Start and load the scenario's processes, print the ready line that `ksmpreload compare
    --wait-ready` waits for, and hold them until SIGTERM or SIGINT."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with (
        tempfile.TemporaryDirectory(prefix=f"scenario-{name}.") as workdir,
        LOADERS[name](SIZES[size], strategy, processes, method, workdir) as load,
    ):
        data_by_pid = load["data_by_pid"]
        print(
            json.dumps(
                {
                    "ready": True,
                    "scenario": name,
                    "size": size,
                    "pids": list(data_by_pid),
                    "data_bytes": sum(data_by_pid.values()),
                    **load["rate"],
                }
            ),
            flush=True,
        )
        while True:
            signal.pause()


# ---- report -----------------------------------------------------------------------------------


def git_head():
    result = subprocess.run(
        ["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    )
    return result.stdout.strip() or None


def loadavg():
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def machine():
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "mem_total_gib": round(kernel.mem_total_bytes() / (1 << 30), 1),
        "commit": git_head(),
    }


def mib(value):
    return f"{value / MIB:,.1f}"


def print_table(report):
    print(f"{report['scenario']}, size {report['size']}, strategy {report['strategy']}")
    print(
        "| run | processes | data per process MiB | saved MiB | % of RSS | padding MiB | net saved MiB "
        "| time to 90% s | rmap items | expected MiB | potential MiB | non-zero potential MiB | settled in s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in report["runs"]:
        total, count = run["total"], len(run["processes"])
        holding = sum(1 for row in run["processes"] if row["data_bytes"]) or 1
        t90 = "-" if run["time_to_90pct_s"] is None else f"{run['time_to_90pct_s']:.1f}"
        expected = mib(run["expected_saved_bytes"]) if "expected_saved_bytes" in run else "-"
        settled = (
            f"{run['settle_s']:.0f}" + ("" if run["settled"] else " (timeout)")
            if run["mergeable"]
            else "nothing mergeable"
        )
        print(
            f"| {run['label']} | {count} | {mib(total['data_bytes'] / holding)} | {mib(total['saved_bytes'])} "
            f"| {total['saved_pct_of_rss']:.1f} | {mib(total['padding_bytes'])} | {mib(total['net_saved_bytes'])} "
            f"| {t90} | {total['rmap_items']:,} | {expected} | {mib(run['potential_bytes'])} "
            f"| {mib(run['nonzero_potential_bytes'])} | {settled} |"
        )
    m = report["machine"]
    print(
        f"machine: {m['nproc']} CPUs, {m['mem_total_gib']} GiB, kernel {m['kernel']}, commit {m['commit']}; "
        f"{report['date_utc']}; load average {report['load_before']} before, {report['load_after']} after"
    )


def main():
    if sys.argv[1:2] == ["--torch-worker"]:
        torch_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", choices=sorted(SCENARIOS))
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        help="ksm-wrap --strategy, or none: run without ksm-wrap (default auto; none with --serve)",
    )
    parser.add_argument(
        "--processes", type=int, help="servers or workers (redis, memcached: 3, memcached-slabs: 2, pytorch: 3)"
    )
    parser.add_argument(
        "--method",
        choices=STRESS_METHODS,
        help="stress-ng: only this fill method (with --serve: zero-one unless given)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument(
        "--serve",
        action="store_true",
        help="start and load the processes, print a JSON ready line with their pids, hold them "
        "until SIGTERM: the workload for `ksmpreload compare --wait-ready` (no measuring; "
        "the processes inherit the ksm-wrap this script was started under)",
    )
    args = parser.parse_args()
    if args.serve:
        if args.name not in LOADERS:
            parser.error(f"--serve knows {', '.join(LOADERS)}, not {args.name}")
        serve(args.name, args.size, args.strategy or "none", args.processes, args.method or "zero-one")
        return 0
    options = {} if args.processes is None or args.name == "stress-ng" else {"processes": args.processes}
    if args.name == "stress-ng" and args.method:
        options["methods"] = (args.method,)
    started = time.time()
    report = {
        "command": " ".join(["python3", os.path.relpath(os.path.abspath(sys.argv[0]))] + sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
        "load_before": loadavg(),
    }
    report.update(SCENARIOS[args.name](size=args.size, strategy=args.strategy or "auto", **options))
    report.update(load_after=loadavg(), duration_s=time.time() - started, machine=machine())
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
