"""The shim as a guest, tried as a hostile user would: its counters file must never kill
the program (full filesystem, file size limit), never be adopted from, or made in, a
directory someone else controls, never be published by a setuid program, and a fork
child must never write into its parent's file. On the real system, as root."""

import json
import os
import shutil
import subprocess
import tempfile

import pytest

from conftest import REPO, require
from ksmpreload import shimstats

THRESHOLD = 16384
NOBODY = 65534  # nobody and nogroup on Debian
PROBE_SOURCE = os.path.join(REPO, "tests", "c", "stats_probe.c")


def require_root(why):
    require(os.geteuid() == 0, f"needs root {why}")


def probe_env(shim, stats_dir, **settings):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSMPRELOAD_")}
    env.update(LD_PRELOAD=shim, KSMPRELOAD_STATS_DIR=str(stats_dir), KSMPRELOAD_THRESHOLD=str(THRESHOLD))
    env.update({f"KSMPRELOAD_{name.upper()}": str(value) for name, value in settings.items()})
    return env


def run(command, env, **options):
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, **options)


class Probe:
    """stats_probe running, its lines read one at a time; next() lets it go on."""

    def __init__(self, command, env, **options):
        self.proc = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **options,
        )

    def line(self):
        text = self.proc.stdout.readline()
        assert text, f"the probe ended early: exit {self.proc.wait(timeout=30)}, {self.proc.stderr.read()}"
        return json.loads(text) if text.startswith("{") else text.strip()

    def next(self):
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self):
        self.proc.stdin.close()
        stderr = self.proc.stderr.read()
        return self.proc.wait(timeout=30), stderr

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def stats_files(directory):
    return sorted(name for name in os.listdir(directory) if name.endswith(".stats"))


def files_while_running(command, env, watched, **options):
    """(pid, the .stats files in `watched`) while stats_probe waits; it must then end cleanly."""
    probe = Probe(command, env, **options)
    try:
        pid = probe.line()["pid"]
        files = stats_files(watched)
    finally:
        status, stderr = probe.finish()
    assert status == 0 and stderr == ""
    return pid, files


# ---- the filesystem under the file ---------------------------------------------------------

FILL_AND_RUN = """
mount -t tmpfs -o size=64k,mode=0700 ksmpreload-full "$KSMPRELOAD_STATS_DIR" || exit 90
cat /dev/zero > "$KSMPRELOAD_STATS_DIR/fill" 2>/dev/null
LD_PRELOAD="$PROBE_PRELOAD" "$@"
status=$?
echo "files: $(ls -A "$KSMPRELOAD_STATS_DIR" | tr '\\n' ' ')"
exit $status
"""


@pytest.mark.parametrize("preload", [False, True], ids=["without-shim", "with-shim"])
def test_full_filesystem_does_not_kill_the_program(c_programs, shim, tmp_path, preload):
    """A full 64 KiB tmpfs as the counters directory: the program exits 0 as without the shim
    (a sparse file would be mapped, and the first write to it would raise SIGBUS)."""
    require_root("to mount a tmpfs in a private mount namespace")
    mount_point = tmp_path / "full"
    mount_point.mkdir(mode=0o700)
    env = probe_env("", mount_point)
    del env["LD_PRELOAD"]
    env["PROBE_PRELOAD"] = shim if preload else ""
    result = run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            FILL_AND_RUN,
            "sh",
            c_programs("stats_probe"),
            "alloc",
        ],
        env,
    )
    assert result.returncode == 0, f"exit {result.returncode}: {result.stdout} {result.stderr}"
    assert result.stdout.splitlines()[-1].split() == ["files:", "fill"], result.stdout
    assert json.loads(result.stdout.splitlines()[0])["aligned"] is preload


def test_file_size_limit_is_respected(c_programs, shim, tmp_path):
    """RLIMIT_FSIZE below the file's size: no SIGXFSZ, no file, the program runs on."""
    stats_dir = tmp_path / "stats"
    result = run(["prlimit", "--fsize=65536", c_programs("stats_probe"), "alloc"], probe_env(shim, stats_dir))
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    assert json.loads(result.stdout)["aligned"]
    assert not stats_dir.exists() or stats_files(stats_dir) == []


# ---- whose directory, whose file -------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, owner", [(0o1777, 0), (0o777, 0), (0o770, 0), (0o700, NOBODY)], ids=["1777", "0777", "0770", "nobody's"]
)
def test_directory_others_control_is_refused(c_programs, shim, tmp_path, mode, owner):
    require_root("to give a directory to nobody")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    os.chown(shared, owner, owner)
    assert files_while_running([c_programs("stats_probe"), "wait"], probe_env(shim, shared), shared)[1] == []


def test_refusal_is_said_when_verbose(c_programs, shim, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    result = run([c_programs("stats_probe"), "alloc"], probe_env(shim, shared, verbose=1))
    assert result.returncode == 0
    lines = [line for line in result.stderr.splitlines() if str(shared) in line]
    assert len(lines) == 1 and lines[0].startswith("ksmpreload: "), result.stderr
    assert stats_files(shared) == []


def start_with_known_pid(probe_args, env):
    """The probe behind `sh -c 'echo $$; read; exec'`: its pid is known before it starts."""
    script = 'echo $$; read line; export LD_PRELOAD="$PROBE_PRELOAD"; exec "$0" "$@"'
    env = dict(env, PROBE_PRELOAD=env.pop("LD_PRELOAD", ""))
    probe = Probe(["sh", "-c", script, *probe_args], env)
    return probe, int(probe.line())


@pytest.mark.parametrize("owner", [NOBODY, 0], ids=["nobody's", "ours"])
def test_file_of_the_same_name_is_adopted_never(c_programs, shim, tmp_path, owner):
    """A <pid>.stats made before the process starts: nobody's is left alone (neither removed
    nor written; the counters stay private); ours (a left-over of an earlier image of the
    pid) is replaced by the process's own file, removed at its exit."""
    require_root("to give a file to nobody")
    stats_dir = tmp_path / "stats"
    stats_dir.mkdir(mode=0o700)
    probe, pid = start_with_known_pid([c_programs("stats_probe"), "wait"], probe_env(shim, stats_dir))
    planted = stats_dir / f"{pid}.stats"
    try:
        planted.write_bytes(b"planted")
        os.chown(planted, owner, owner)
        os.chmod(planted, 0o666)
        probe.next()
        assert probe.line()["pid"] == pid
        counters = shimstats.read_process_stats(pid, str(stats_dir))
        if owner == NOBODY:
            assert counters is None
            assert planted.read_bytes() == b"planted" and planted.stat().st_uid == NOBODY
        else:
            assert counters is not None and counters["pid"] == pid and counters["heap_regions"] == 4
            assert planted.stat().st_uid == 0 and oct(planted.stat().st_mode & 0o777) == "0o600"
    finally:
        status, stderr = probe.finish()
    assert status == 0 and stderr == ""
    if owner == NOBODY:
        assert planted.read_bytes() == b"planted", "not removed at exit either"
    else:
        assert not planted.exists(), "the process's own file is removed at exit"


def test_exit_removes_only_the_file_it_created(c_programs, shim, tmp_path):
    """The name now holds another file (a reader replaced it): it stays at exit."""
    stats_dir = tmp_path / "stats"
    probe = Probe([c_programs("stats_probe"), "wait"], probe_env(shim, stats_dir))
    try:
        name = stats_dir / f"{probe.line()['pid']}.stats"
        assert name.exists()
        (stats_dir / "other").write_bytes(b"other")
        os.replace(stats_dir / "other", name)
    finally:
        status, stderr = probe.finish()
    assert status == 0 and stderr == ""
    assert name.read_bytes() == b"other"


# ---- the path ----------------------------------------------------------------------------


def test_relative_directory_is_refused(c_programs, shim, tmp_path):
    """A relative directory is refused at start: nothing is made in the working directory
    at start, nor in the one the program later moves to."""
    start, later = tmp_path / "start", tmp_path / "later"
    start.mkdir()
    (later / "stats").mkdir(parents=True, mode=0o700)
    command = [c_programs("stats_probe"), "chdir", str(later)]
    assert files_while_running(command, probe_env(shim, "stats"), later / "stats", cwd=start)[1] == []
    assert not (start / "stats").exists()


@pytest.mark.parametrize("path", ["link", "link/", "link/.", "parent-link/real"])
def test_symlink_anywhere_in_the_path_is_refused(c_programs, shim, tmp_path, path):
    real = tmp_path / "parent" / "real"
    real.mkdir(parents=True, mode=0o700)
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "parent-link").symlink_to(tmp_path / "parent")
    env = probe_env(shim, f"{tmp_path}/{path}")
    assert files_while_running([c_programs("stats_probe"), "wait"], env, real)[1] == []


def test_plain_directory_with_trailing_dot_is_accepted(c_programs, shim, tmp_path):
    """The refusals above are about symlinks: the same directory named directly works."""
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    pid, files = files_while_running([c_programs("stats_probe"), "wait"], probe_env(shim, f"{real}/./"), real)
    assert files == [f"{pid}.stats"]
    assert stats_files(real) == [], "removed at exit"


@pytest.mark.parametrize("spelling", ["{real}/./", "{real}//", "/{real}", "{parent}/./real", "{parent}//real"])
def test_tools_read_the_counters_under_any_spelling_the_shim_takes(c_programs, shim, tmp_path, spelling):
    """A directory the shim accepts under a spelling that is not the kernel's (/./, //) is read
    by the tools under that same spelling: /proc/<pid>/maps names the file in normal form."""
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    directory = spelling.format(real=real, parent=tmp_path)
    probe = Probe([c_programs("stats_probe"), "wait"], probe_env(shim, directory))
    try:
        pid = probe.line()["pid"]
        assert stats_files(real) == [f"{pid}.stats"]
        assert shimstats.read_process_stats(pid, directory) is not None
        assert pid in shimstats.all_process_stats(directory, prune=False)
    finally:
        status, stderr = probe.finish()
    assert status == 0 and stderr == ""


# ---- a setuid-root program -----------------------------------------------------------------


@pytest.fixture
def setuid_probe(shim):
    """stats_probe linked against the shim (DT_NEEDED), setuid root, in a directory nobody
    can reach (pytest's tmp_path is not). Returns (that directory, the probe)."""
    require_root("to make a setuid-root program")
    work = tempfile.mkdtemp(prefix="ksmpreload-setuid-")
    try:
        os.chmod(work, 0o755)
        shutil.copy(shim, os.path.join(work, "libksmpreload.so"))
        probe = os.path.join(work, "stats_probe")
        subprocess.run(
            [
                "cc",
                "-O1",
                "-o",
                probe,
                PROBE_SOURCE,
                f"-L{work}",
                "-Wl,--no-as-needed",
                "-lksmpreload",
                f"-Wl,-rpath,{work}",
            ],
            check=True,
            capture_output=True,
        )
        os.chmod(probe, 0o4755)
        yield work, probe
    finally:
        shutil.rmtree(work)


@pytest.mark.parametrize("target", ["existing", "missing"])
def test_setuid_program_publishes_nothing(setuid_probe, shim, target):
    """Run by nobody, a setuid-root program with KSMPRELOAD_STATS_DIR naming a root-only
    directory: nothing created, made or removed there, nothing said; it still runs, its
    large blocks still aligned."""
    require(shutil.which("setpriv"), "setpriv (util-linux) is missing")
    work, program = setuid_probe
    secret = os.path.join(work, "secret")
    os.mkdir(secret, 0o700)
    stats_dir = secret if target == "existing" else os.path.join(secret, "new")
    env = probe_env("", stats_dir, verbose=1, strategy="bogus")
    del env["LD_PRELOAD"]
    command = [
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "sh",
        "-c",
        'echo $$; read line; exec "$0" alloc',
        program,
    ]
    probe = Probe(command, env)
    pid = int(probe.line())
    planted = os.path.join(secret, f"{pid}.stats")
    with open(planted, "wb") as f:
        f.write(b"root's")
    probe.next()
    out = probe.line()
    status, stderr = probe.finish()
    require(out["secure"] == 1, "the setuid bit did not take (a nosuid mount?)")
    assert status == 0 and out["euid"] == 0 and out["aligned"], out
    assert os.listdir(secret) == [f"{pid}.stats"]
    with open(planted, "rb") as f:
        assert f.read() == b"root's"
    assert stderr == "", "configuration from the environment is ignored (AT_SECURE)"


# ---- fork, _Fork and clone ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["fork", "_Fork", "clone"])
def test_child_counts_in_its_own_file(c_programs, shim, tmp_path, how):
    """The parent's counters and pid slot are untouched by its child (fork runs the atfork
    handlers; _Fork and a raw clone do not); the child gets a file of its own; each process
    removes only its own file."""
    stats_dir = tmp_path / "stats"
    probe = Probe([c_programs("stats_probe"), how], probe_env(shim, stats_dir))

    def counters(pid):
        found = shimstats.read_process_stats(pid, str(stats_dir))
        assert found is not None, f"{pid} publishes no counters: {stats_files(stats_dir)}"
        return found["pid"], found["heap_regions"], found["threshold"]

    try:
        parent = probe.line()["parent"]
        assert counters(parent) == (parent, 4, THRESHOLD)
        probe.next()
        child = probe.line()["child"]
        assert counters(parent) == (parent, 4, THRESHOLD)
        assert counters(child) == (child, 3, THRESHOLD)
        probe.next()
        assert probe.line()["child_status"] == 0
        assert stats_files(stats_dir) == [f"{parent}.stats"], "the child removed its own file only"
        assert counters(parent) == (parent, 5, THRESHOLD)
        probe.next()
    finally:
        status, stderr = probe.finish()
    assert status == 0 and stderr == ""
    assert stats_files(stats_dir) == []


def test_threads_count_in_batches_and_a_fork_child_starts_from_zero(c_programs, shim, tmp_path):
    """With threads, each thread adds its large blocks to the counters 64 at a time (two
    threads adding at every block made a loop of 8 KiB blocks 4.5x slower: docs/BENCHMARKS.md);
    a fork child counts none of what its parent's forking thread had waiting."""
    stats_dir = tmp_path / "stats"
    probe = Probe([c_programs("stats_probe"), "threads-fork"], probe_env(shim, stats_dir))
    try:
        parent = probe.line()["parent"]
        counted = shimstats.read_process_stats(parent, str(stats_dir))["heap_regions"]
        assert counted == 128, "the thread's two whole batches; its last 2 and the main thread's 60 wait"
        probe.next()
        child = probe.line()["child"]
        assert shimstats.read_process_stats(child, str(stats_dir))["heap_regions"] == 0, (
            "the child's 10 wait; with the parent's 60 carried over it would have counted 64"
        )
        probe.next()
    finally:
        status, stderr = probe.finish()
    assert status == 0 and stderr == ""


# ---- what the shim says --------------------------------------------------------------------


def test_invalid_value_is_escaped_on_one_line(c_programs, shim, tmp_path):
    env = probe_env(shim, tmp_path / "stats", strategy="fast\x1b[2J\nksmpreload: forged \\ \u00e9")
    result = run([c_programs("stats_probe"), "alloc"], env)
    assert result.returncode == 0
    assert result.stderr == (
        "ksmpreload: KSMPRELOAD_STRATEGY='fast\\x1b[2J\\x0aksmpreload: forged \\x5c \\xc3\\xa9'"
        " is not auto, prctl, madvise or observe; using auto\n"
    )
