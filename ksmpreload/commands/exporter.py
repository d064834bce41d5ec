"""`ksmpreload exporter`: KSM's counters, each KSM process's and the shim's, as Prometheus metrics.

Every scrape reads /sys/kernel/mm/ksm, /proc/<pid>/ksm_stat and the shim's counters files
afresh; nothing is cached between scrapes.
"""

import socket
import socketserver
import time
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import click
from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .. import attribution, governor, groups, kernel, saving, shimstats
from ..errors import KsmError, NeedsRoot

DEFAULT_LISTEN = "127.0.0.1:9465"
PREFIX = "ksmpreload"
PROCESS_LABELS = ["pid", "command"]
DEFAULT_MAX_GROUPS = 50  # per grouping: bounds the series of the group metrics (README)
DEFAULT_REGION_PROCESSES = 50  # processes whose regions are shown: bounds a scrape's time and series

KNOB_HELP = {  # Documentation/admin-guide/mm/ksm.rst; a knob missing here gets its path as help
    "advisor_max_cpu": "Most CPU percent ksmd may use under the scan-time advisor.",
    "advisor_max_pages_to_scan": "Highest pages_to_scan the scan-time advisor sets.",
    "advisor_min_pages_to_scan": "Lowest pages_to_scan the scan-time advisor sets.",
    "advisor_target_scan_time": "Seconds per full scan the scan-time advisor aims at.",
    "full_scans": "Full scans of all mergeable memory ksmd has finished since boot.",
    "general_profit": "Bytes KSM saves machine-wide minus what its rmap_items cost (can be negative).",
    "ksm_zero_pages": "Empty pages KSM mapped to the kernel's zero page (use_zero_pages).",
    "max_page_sharing": "Most pages that may share one KSM page.",
    "merge_across_nodes": "1 when pages of different NUMA nodes may merge.",
    "pages_scanned": "Pages ksmd has scanned since boot.",
    "pages_shared": "KSM pages in use: one per set of identical pages merged.",
    "pages_sharing": "Pages that share a KSM page: with ksm_zero_pages, what KSM saves.",
    "pages_skipped": "Pages smart_scan has skipped since boot.",
    "pages_to_scan": "Pages ksmd scans each time it wakes.",
    "pages_unshared": "Pages unique so far, checked again at each scan.",
    "pages_volatile": "Pages changing too fast to be merged.",
    "run": "0 stopped, 1 merging, 2 unmerging everything.",
    "sleep_millisecs": "Milliseconds ksmd sleeps between two batches of pages_to_scan.",
    "smart_scan": "1 when ksmd skips pages that did not merge in earlier scans.",
    "stable_node_chains": "KSM pages that reached max_page_sharing and were duplicated.",
    "stable_node_chains_prune_millisecs": "Milliseconds between two prunes of stable node chains.",
    "stable_node_dups": "Duplicated KSM pages in stable node chains.",
    "use_zero_pages": "1 when empty pages are mapped to the kernel's zero page.",
}
CUMULATIVE_KNOBS = ("full_scans", "pages_scanned", "pages_skipped")  # only ever grow until reboot

PROCESS_FIELDS = {  # /proc/<pid>/ksm_stat field: help
    "ksm_merging_pages": "Pages of the process that KSM merged.",
    "ksm_zero_pages": "Empty pages of the process KSM mapped to the kernel's zero page.",
    "ksm_process_profit": "Bytes KSM saves for the process minus what its rmap_items cost (can be negative).",
    "ksm_rmap_items": "rmap_items KSM keeps for the process (one per page it looked at).",
}
SHIM_SETTINGS = ("pid", "strategy", "threshold", "align", "page_size")  # the rest count events


# ---- what one scrape reports ---------------------------------------------------------------


def knob_metrics(knobs):
    for name, value in knobs.items():
        if not isinstance(value, int):
            continue  # advisor_mode: a word, not a number
        help_text = KNOB_HELP.get(name, kernel.knob_path(name))
        family_type = CounterMetricFamily if name in CUMULATIVE_KNOBS else GaugeMetricFamily
        yield family_type(f"{PREFIX}_ksm_{name}", help_text, value=value)
    saved = kernel.pages_saved(knobs) * kernel.page_size()
    yield GaugeMetricFamily(
        f"{PREFIX}_saved_bytes",
        "Bytes KSM saves machine-wide: (pages_sharing + ksm_zero_pages) * page size.",
        value=saved,
    )


def estimated_savings(processes, knobs):
    """{pid: bytes KSM saves for it}, estimated from ksm_stat (saving.estimated_saved_pages)."""
    page = kernel.page_size()
    return {process["pid"]: saving.estimated_saved_pages(process, knobs) * page for process in processes}


def group_metrics(savings, max_groups):
    """Per cgroup, systemd unit, container and pod: the estimated saving of its processes and how
    many there are; per grouping at most `max_groups` groups, the rest summed as "other"."""
    labels = ["by", "group"]
    saved = GaugeMetricFamily(
        f"{PREFIX}_group_saved_bytes",
        f"Bytes KSM saves for the group's processes (the sum of {PREFIX}_process_saved_bytes); "
        'by: cgroup, unit, container or pod; groups beyond --max-groups are summed as group="other".',
        labels=labels,
    )
    count = GaugeMetricFamily(f"{PREFIX}_group_processes", "KSM processes of the group.", labels=labels)
    rows = [{"pid": pid, "saved_bytes": saved_bytes} for pid, saved_bytes in savings.items()]
    for by, names in groups.every_grouping([row["pid"] for row in rows]).items():
        for entry in groups.group_totals(rows, names, ("saved_bytes",), max_groups):
            saved.add_metric([by, entry["group"]], entry["saved_bytes"])
            count.add_metric([by, entry["group"]], entry["processes"])
    yield saved
    yield count


GOVERNOR_MODES = ("catch-up", "settled", "nothing")


def governor_metrics(state):
    """The governor's last decision (its state file), or only ksmpreload_governor_running 0."""
    yield GaugeMetricFamily(f"{PREFIX}_governor_running", "1 while ksmpreload governor runs.", value=int(bool(state)))
    if not state:
        return
    decision = state["decision"]
    mode = GaugeMetricFamily(f"{PREFIX}_governor_mode", "1 for the governor's mode now.", labels=["mode"])
    for name in GOVERNOR_MODES:
        mode.add_metric([name], int(decision["mode"] == name))
    yield mode
    for name, help_text, value in (
        ("pages_per_second", "The scan rate the governor chose.", decision["pages_per_second"]),
        ("pinned", "1 while the pin file keeps the governor's hands off the knobs.", int(state["pinned"])),
        ("merged_pages_per_cpu_second", "Pages merged per CPU second of ksmd over the last tick.",
         state.get("merged_per_cpu_second")),
        ("unscanned_bytes", "Memory of processes using KSM that ksmd has not looked at yet.",
         state.get("unscanned_bytes")),
    ):  # fmt: skip
        if isinstance(value, (int, float)):  # a field the state lacks is left out
            yield GaugeMetricFamily(f"{PREFIX}_governor_{name}", help_text, value=value)
    yield CounterMetricFamily(f"{PREFIX}_governor_unmarked_processes",
                              "Processes whose merging the governor's --unmark-idle turned off.",
                              value=state.get("unmarked_total") if isinstance(state.get("unmarked_total"), int) else 0)  # fmt: skip


def process_metrics(processes, savings):
    for field, help_text in PROCESS_FIELDS.items():
        family = GaugeMetricFamily(f"{PREFIX}_process_{field}", help_text, labels=PROCESS_LABELS)
        for process in processes:
            if field in process:
                family.add_metric([str(process["pid"]), process["comm"]], process[field])
        yield family
    saved = GaugeMetricFamily(
        f"{PREFIX}_process_saved_bytes",
        "Bytes KSM saves for the process, estimated from ksm_stat: merged pages x pages_sharing / "
        "(pages_sharing + pages_shared), plus zero pages (docs/SAVINGS.md); they add up to "
        f"{PREFIX}_saved_bytes.",
        labels=PROCESS_LABELS,
    )
    for process in processes:
        saved.add_metric([str(process["pid"]), process["comm"]], savings[process["pid"]])
    yield saved


def shim_metrics(counters, commands):
    """`counters`: {pid: the shim's slots}; `commands`: {pid: comm} of the processes to report."""
    reported = {pid: slots for pid, slots in counters.items() if pid in commands}
    info = GaugeMetricFamily(
        f"{PREFIX}_shim_info",
        "1 for each process running libksmpreload.so, with the shim's strategy.",
        labels=[*PROCESS_LABELS, "strategy"],
    )
    counted = {}
    for pid, slots in sorted(reported.items()):
        info.add_metric([str(pid), commands[pid], slots["strategy"]], 1)
        for slot, value in slots.items():
            if slot not in SHIM_SETTINGS:
                counted.setdefault(slot, []).append(([str(pid), commands[pid]], value))
    yield info
    for slot, samples in counted.items():
        family = CounterMetricFamily(
            f"{PREFIX}_shim_{slot}",
            f"The shim's {slot} counter since the process started (docs/COUNTERS.md).",
            labels=PROCESS_LABELS,
        )
        for labels, value in samples:
            family.add_metric(labels, value)
        yield family


REGION_MIN_KIB = 1024  # regions kinds with less anonymous memory and nothing merged are left out


def region_metrics(processes, limit=DEFAULT_REGION_PROCESSES):
    """Per process, its memory by what made it (attribution labels): anonymous and merged bytes,
    for the `limit` processes with the most merged pages (each costs a read of its smaps: 1,000
    processes took 2.6 s of a scrape; docs/BENCHMARKS.md)."""
    labels = [*PROCESS_LABELS, "made_by"]
    anonymous = GaugeMetricFamily(
        f"{PREFIX}_region_anonymous_bytes",
        "Anonymous memory of the process's regions, by what made them (ksmpreload report).",
        labels=labels,
    )
    merged = GaugeMetricFamily(
        f"{PREFIX}_region_ksm_bytes",
        "Memory of the process's regions mapped to KSM pages (smaps KSM:), by what made them.",
        labels=labels,
    )
    for process in sorted(processes, key=lambda p: -p.get("ksm_merging_pages", 0))[:limit]:
        try:
            found = attribution.process_attribution(process["pid"])
        except NeedsRoot:
            continue  # it became another user's (a setuid exec) since it was listed
        for made_by, totals in attribution.by_label(found).items() if found else ():
            if totals["ksm_kib"] or totals["anonymous_kib"] >= REGION_MIN_KIB:
                key = [str(process["pid"]), process["comm"], made_by]
                anonymous.add_metric(key, totals["anonymous_kib"] * 1024)
                merged.add_metric(key, totals["ksm_kib"] * 1024)
    yield anonymous
    yield merged


def shim_commands(counters, processes):
    """{pid: comm} of the processes with shim counters; those that ended meanwhile are left out."""
    known = {process["pid"]: process["comm"] for process in processes}
    commands = {}
    for pid in counters:
        comm = known.get(pid) or kernel.read_proc(pid, "comm")
        if comm is not None:
            commands[pid] = comm.strip()
    return commands


UNREADABLE_NOTE = (
    "other users' processes are left out: reading their /proc/PID/ksm_stat needs root "
    f"({PREFIX}_unreadable_processes counts them)"
)


def unreadable_metrics(processes, counters_files):
    yield GaugeMetricFamily(
        f"{PREFIX}_unreadable_processes",
        "Processes whose ksm_stat could not be read (other users' processes, without root): left out.",
        value=processes,
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_unreadable_counters_files",
        "Counters files of running processes that "
        "could not be read or parsed: left out (the exporter's stderr names them).",
        value=counters_files,
    )


class KsmCollector:
    """Reads everything afresh at each scrape (prometheus_client calls collect() per scrape).
    What it could not read is counted in metrics and said once on stderr."""

    def __init__(self, max_groups=DEFAULT_MAX_GROUPS, region_processes=DEFAULT_REGION_PROCESSES):
        self.noted, self.max_groups, self.region_processes, self.ksmd = set(), max_groups, region_processes, None

    def ksmd_metrics(self):
        """ksmd's CPU time, from its /proc stat (its pid looked up once, checked at each scrape)."""
        if self.ksmd is None or (kernel.read_proc(self.ksmd, "comm") or "").strip() != "ksmd":
            self.ksmd = kernel.ksmd_pid()
        seconds = kernel.cpu_seconds(self.ksmd) if self.ksmd else None
        if seconds is not None:
            yield CounterMetricFamily(
                f"{PREFIX}_ksmd_cpu_seconds", "CPU seconds the kernel thread ksmd has used since boot.", value=seconds
            )

    def note(self, notes):
        for note in notes:
            if note not in self.noted:
                self.noted.add(note)
                click.echo(f"ksmpreload exporter: {note}", err=True)

    def collect(self):
        started = time.perf_counter()
        knobs = kernel.read_knobs()
        yield from knob_metrics(knobs)
        yield from self.ksmd_metrics()
        if governor.state_known():  # else absent, not "none runs": the exporter runs without root
            yield from governor_metrics(governor.read_state())
        else:
            self.note([governor.STATE_UNKNOWN_NOTE])
        processes, unreadable = kernel.ksm_processes_and_unreadable()
        savings = estimated_savings(processes, knobs)
        yield from process_metrics(processes, savings)
        yield from group_metrics(savings, self.max_groups)
        yield from region_metrics(processes, self.region_processes)
        problems = []
        counters = shimstats.all_process_stats(prune=False, problems=problems)  # leave left-overs to others
        yield from shim_metrics(counters, shim_commands(counters, processes))
        yield from unreadable_metrics(unreadable, len(problems))
        self.note(problems + ([UNREADABLE_NOTE] if unreadable else []))
        yield GaugeMetricFamily(
            f"{PREFIX}_scrape_duration_seconds",
            "Seconds this scrape took to read KSM's and the shim's counters.",
            value=time.perf_counter() - started,
        )


def metrics_registry(max_groups=DEFAULT_MAX_GROUPS, region_processes=DEFAULT_REGION_PROCESSES):
    registry = CollectorRegistry()
    registry.register(KsmCollector(max_groups, region_processes))
    return registry


# ---- the HTTP server -----------------------------------------------------------------------


class ListenAddress(click.ParamType):
    """HOST:PORT, with an IPv6 host in brackets ([::1]:9465); port 0 picks a free one."""

    name = "HOST:PORT"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        host, colon, port = value.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not colon or not host or not port.isdigit() or int(port) > 65535:
            self.fail(f"{value!r} is not HOST:PORT (for example {DEFAULT_LISTEN})", param, ctx)
        return host, int(port)


class QuietRequestHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        """No line per scrape: Prometheus scrapes every few seconds."""


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


def metrics_server(host, port, app):
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
        return make_server(host, port, app, server_class, QuietRequestHandler)
    except OSError as error:
        raise KsmError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def url(server):
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/metrics"


@click.command()
@click.option(
    "--listen",
    type=ListenAddress(),
    default=DEFAULT_LISTEN,
    show_default=True,
    help="Address to serve /metrics on; 0.0.0.0:PORT to reach it from other machines.",
)
@click.option("--once", is_flag=True, help="Print the metrics once to stdout and exit (no server).")
@click.option(
    "--max-groups",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_GROUPS,
    show_default=True,
    help="Groups per grouping in ksmpreload_group_* (largest saving first); the rest are summed as 'other'.",
)
@click.option(
    "--region-processes",
    type=click.IntRange(min=0),
    default=DEFAULT_REGION_PROCESSES,
    show_default=True,
    help="Processes (most merged pages first) whose memory by what made it is shown (ksmpreload_region_*).",
)
def exporter(listen, once, max_groups, region_processes):
    """Serve KSM's metrics to Prometheus.

    Global KSM counters and knobs (ksmpreload_ksm_*, ksmpreload_saved_bytes), each process's
    ksm_stat (ksmpreload_process_*), ksmd's CPU time (ksmpreload_ksmd_cpu_seconds_total), the
    savings per cgroup, systemd unit, container and pod (ksmpreload_group_*, labels by and
    group), the memory of the --region-processes processes with most merged pages by what made
    it (ksmpreload_region_*, label made_by) and the counters of processes running the shim
    (ksmpreload_shim_*), read afresh at each scrape. Runs until Ctrl-C.
    """
    kernel.require_ksm()
    registry = metrics_registry(max_groups, region_processes)
    if once:
        click.echo(generate_latest(registry).decode(), nl=False)
        return
    server = metrics_server(*listen, make_wsgi_app(registry))
    click.echo(f"ksmpreload exporter: serving {url(server)} (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
