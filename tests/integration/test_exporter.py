"""`ksmpreload exporter`: its metrics text, its HTTP server, and a real Prometheus scraping it."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO, free_port, ksm_stat, require
from ksmpreload import groups, kernel, scanning, shimstats
from test_status_cli import assert_one_clear_error, require_ksm, run

DISTINCT, COPIES = 64, 4  # dup_buffers: 64 buffers of 8 to 64 KiB, 4 copies of each
DEADLINE_SECONDS = 60


# ---- helpers -------------------------------------------------------------------------------


def samples_by_name(text):
    """{sample name as Prometheus stores it (counters with _total): [(labels, value)]}, and
    {family name: (type, help)} of a metrics text."""
    samples, families = {}, {}
    for family in text_string_to_metric_families(text):
        families[family.name] = (family.type, family.documentation)
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples, families


def value_for_pid(samples, name, pid):
    values = [value for labels, value in samples.get(name, []) if labels.get("pid") == str(pid)]
    assert len(values) == 1, f"{name}: {len(values)} series for pid {pid} in {samples.get(name)}"
    return values[0]


@contextlib.contextmanager
def dup_buffers_under_shim(program, stats_dir):
    """dup_buffers under ksm-wrap, its shim counters in `stats_dir`; stopped after the block."""
    env = {**os.environ, "KSMPRELOAD_STATS_DIR": str(stats_dir)}
    proc = subprocess.Popen(
        ["ksm-wrap", program, str(DISTINCT), str(COPIES)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        report = json.loads(proc.stdout.readline())
        assert report["pid"] == proc.pid
        yield proc
    finally:
        proc.stdin.close()
        wait_or_kill(proc, 30)


def wait_or_kill(proc, timeout):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def running(args, **popen_args):
    """A process for the block's duration, ended (SIGTERM, then SIGKILL) after it."""
    proc = subprocess.Popen(args, **popen_args)
    try:
        yield proc
    finally:
        proc.terminate()
        wait_or_kill(proc, 10)


@contextlib.contextmanager
def exporter_server(*args, env=None):
    """`ksmpreload exporter ARGS` as a server: yields (process, the line it printed)."""
    with running(
        ["ksmpreload", "exporter", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        yield proc, proc.stdout.readline()


def merging_pages(pid):
    return ksm_stat(pid)["ksm_merging_pages"]


def port_is_free(port):
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no obstacle
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# ---- --once --------------------------------------------------------------------------------


def test_once_reports_a_merging_process_and_the_global_counters(ksm_running, c_programs, tmp_path):
    stats_dir = tmp_path / "stats"
    with dup_buffers_under_shim(c_programs("dup_buffers"), stats_dir) as proc:
        scanning.wait_until_settled(lambda: merging_pages(proc.pid))
        before, scans_before = ksm_stat(proc.pid), scanning.full_scans()
        result = subprocess.run(
            ["ksmpreload", "exporter", "--once"],
            capture_output=True,
            text=True,
            env={**os.environ, "KSMPRELOAD_STATS_DIR": str(stats_dir)},
        )
        after = ksm_stat(proc.pid)
        shim_counters = shimstats.read_process_stats(proc.pid, str(stats_dir))
    assert (result.returncode, result.stderr) == (0, ""), result
    samples, families = samples_by_name(result.stdout)

    for field in ("ksm_merging_pages", "ksm_zero_pages", "ksm_process_profit", "ksm_rmap_items"):
        exported = value_for_pid(samples, f"ksmpreload_process_{field}", proc.pid)
        low, high = sorted((before[field], after[field]))
        assert low <= exported <= high, f"{field}: exported {exported}, ksm_stat {before[field]}..{after[field]}"
    merged = value_for_pid(samples, "ksmpreload_process_ksm_merging_pages", proc.pid)
    assert merged >= 0.9 * DISTINCT * COPIES
    labels = next(
        labels for labels, _ in samples["ksmpreload_process_ksm_merging_pages"] if labels["pid"] == str(proc.pid)
    )
    assert labels["command"] == "dup_buffers"
    by_region = {
        labels["made_by"]: value
        for labels, value in samples["ksmpreload_region_ksm_bytes"]
        if labels["pid"] == str(proc.pid)
    }
    assert by_region.get("brk heap", 0) >= 0.9 * merged * kernel.page_size(), by_region

    assert (
        value_for_pid(samples, "ksmpreload_shim_heap_regions_total", proc.pid)
        == shim_counters["heap_regions"]
        >= DISTINCT * COPIES
    )
    assert value_for_pid(samples, "ksmpreload_shim_madvise_einval_total", proc.pid) == 0
    info = [labels for labels, _ in samples["ksmpreload_shim_info"] if labels["pid"] == str(proc.pid)]
    assert info == [{"pid": str(proc.pid), "command": "dup_buffers", "strategy": shim_counters["strategy"]}]
    assert "ksmpreload_shim_pid_total" not in samples and "ksmpreload_shim_threshold_total" not in samples

    knobs = kernel.read_knobs()
    numeric = {name for name, value in knobs.items() if isinstance(value, int)}
    exported_knobs = {
        name.removeprefix("ksmpreload_ksm_").removesuffix("_total")
        for name in samples
        if name.startswith("ksmpreload_ksm_")
    }
    assert exported_knobs == numeric
    assert families["ksmpreload_ksm_full_scans"][0] == "counter"
    assert samples["ksmpreload_ksm_full_scans_total"][0][1] >= scans_before
    assert families["ksmpreload_ksm_pages_sharing"][0] == "gauge"
    value = {name: samples[f"ksmpreload_ksm_{name}"][0][1] for name in ("pages_sharing", "pages_shared")}
    assert value["pages_sharing"] + value["pages_shared"] >= merged
    zero_pages = samples.get("ksmpreload_ksm_ksm_zero_pages", [({}, 0)])[0][1]
    assert samples["ksmpreload_saved_bytes"][0][1] == (value["pages_sharing"] + zero_pages) * kernel.page_size()
    # per process: the estimate of docs/SAVINGS.md, which adds up to the machine's figure
    shares = sum(value for _, value in samples["ksmpreload_process_saved_bytes"])
    assert shares == pytest.approx(samples["ksmpreload_saved_bytes"][0][1], rel=0.01), shares
    assert value_for_pid(samples, "ksmpreload_process_saved_bytes", proc.pid) > 0
    assert 0 < samples["ksmpreload_scrape_duration_seconds"][0][1] < 5
    assert all(help_text for _, help_text in families.values())


def test_a_process_that_ends_during_the_scrape_is_left_out(monkeypatch):
    """Listed in /proc and in the shim's counters, gone when its files are read."""
    require_ksm()
    ended = subprocess.Popen(["true"])
    ended.wait()
    monkeypatch.setattr(kernel, "pids", lambda: [ended.pid, os.getpid()])
    monkeypatch.setattr(
        shimstats,
        "all_process_stats",
        lambda **_: {ended.pid: {"pid": ended.pid, "strategy": "prctl", "heap_regions": 3}},
    )
    result = run("exporter", "--once")
    assert (result.exit_code, result.stderr) == (0, ""), result
    samples, _ = samples_by_name(result.stdout)
    assert "ksmpreload_scrape_duration_seconds" in samples
    assert not [name for name, series in samples.items() for labels, _ in series if labels.get("pid") == str(ended.pid)]


# ---- --listen ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "listen", ["9465", "127.0.0.1", "127.0.0.1:", ":9465", "127.0.0.1:http", "127.0.0.1:65536", "127.0.0.1:-1"]
)
def test_a_malformed_listen_address_is_one_usage_line(listen):
    assert_one_clear_error(run("exporter", "--listen", listen), 2, "--listen", "HOST:PORT")


def test_an_address_in_use_is_one_line():
    require_ksm()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("exporter", "--listen", f"127.0.0.1:{port}")
    assert_one_clear_error(result, 1, f"cannot listen on 127.0.0.1:{port}", "in use")


def listening_addresses(pid):
    return {
        (conn.laddr.ip, conn.laddr.port)
        for conn in psutil.net_connections(kind="inet")
        if conn.pid == pid and conn.status == psutil.CONN_LISTEN
    }


def test_serves_on_loopback_by_default_and_ctrl_c_exits_0():
    require_ksm()
    require(port_is_free(9465), "port 9465 (the exporter's default) is taken on this machine")
    with exporter_server() as (proc, line):
        assert line == "ksmpreload exporter: serving http://127.0.0.1:9465/metrics (Ctrl-C to stop)\n"
        assert listening_addresses(proc.pid) == {("127.0.0.1", 9465)}
        with urllib.request.urlopen("http://127.0.0.1:9465/metrics", timeout=10) as response:
            samples, _ = samples_by_name(response.read().decode())
        assert samples["ksmpreload_ksm_run"][0][1] == kernel.read_knob("run")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    assert (proc.returncode, out, err) == (0, "", "")


def test_port_0_prints_the_port_it_got():
    require_ksm()
    with exporter_server("--listen", "127.0.0.1:0") as (proc, line):
        (port,) = [port for ip, port in listening_addresses(proc.pid)]
        assert line.startswith(f"ksmpreload exporter: serving http://127.0.0.1:{port}/metrics")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert b"ksmpreload_scrape_duration_seconds" in response.read()


# ---- a real Prometheus ---------------------------------------------------------------------

PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files: ["{rules}"]
scrape_configs:
  - job_name: ksmpreload
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


def prometheus_api(port, path, **params):
    """The `data` of a Prometheus HTTP API answer, or None while Prometheus is not up."""
    url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)["data"]
    except (urllib.error.URLError, ConnectionError):
        return None


def query(port, promql):
    """{pid label or '': value} of an instant query's series."""
    data = prometheus_api(port, "query", query=promql) or {"result": []}
    return {series["metric"].get("pid", ""): float(series["value"][1]) for series in data["result"]}


def why_not_scraped(port, log_path):
    targets = prometheus_api(port, "targets") or {"activeTargets": []}
    states = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets["activeTargets"]]
    log_tail = log_path.read_text().splitlines()[-5:]
    return f"targets: {states}; prometheus log ends: {log_tail}"


def test_prometheus_scrapes_the_process_series(ksm_running, c_programs, tmp_path):
    require(shutil.which("prometheus"), "no prometheus binary (apt-get install prometheus)")
    stats_dir = tmp_path / "stats"
    exporter_port, prometheus_port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        PROMETHEUS_CONFIG.format(port=exporter_port, rules=os.path.join(REPO, "docs", "prometheus", "rules.yml"))
    )
    log_path = tmp_path / "prometheus.log"
    env = {**os.environ, "KSMPRELOAD_STATS_DIR": str(stats_dir)}
    with contextlib.ExitStack() as stack:
        proc = stack.enter_context(dup_buffers_under_shim(c_programs("dup_buffers"), stats_dir))
        exporter, line = stack.enter_context(exporter_server("--listen", f"127.0.0.1:{exporter_port}", env=env))
        assert f"127.0.0.1:{exporter_port}" in line, (line, exporter.stderr.read())
        log = stack.enter_context(open(log_path, "w"))
        stack.enter_context(
            running(
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prometheus_port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )

        merging = f'ksmpreload_process_ksm_merging_pages{{pid="{proc.pid}"}}'
        deadline = time.monotonic() + DEADLINE_SECONDS
        while (found := query(prometheus_port, merging)).get(str(proc.pid), 0) <= 0:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"Prometheus had no {merging} above 0 after {DEADLINE_SECONDS} s (got {found}; "
                    f"ksm_stat says {merging_pages(proc.pid)} pages); "
                    f"{why_not_scraped(prometheus_port, log_path)}"
                )
            time.sleep(0.5)
        sharing = query(prometheus_port, 'ksmpreload_ksm_pages_sharing{job="ksmpreload"}')
        up = query(prometheus_port, 'up{job="ksmpreload"}')
        own_cgroup = groups.process_groups([proc.pid], "cgroup")[proc.pid]
        in_group = query(prometheus_port, f'ksmpreload_group_processes{{by="cgroup",group="{own_cgroup}"}}')
        deadline = time.monotonic() + DEADLINE_SECONDS  # the recording rules run every second
        while not (recorded := query(prometheus_port, 'ksmpreload:group_saved_bytes:sum{by="cgroup"}')):
            assert time.monotonic() < deadline, (
                f"no recording rule output; {why_not_scraped(prometheus_port, log_path)}"
            )
            time.sleep(0.5)
    assert sharing.get("", 0) > 0, sharing
    assert up == {"": 1.0}
    assert in_group.get("", 0) >= 1, in_group
    assert recorded.get("", 0) > 0, recorded
