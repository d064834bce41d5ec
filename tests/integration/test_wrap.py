"""ksm-wrap as a user runs it: the installed command, real programs, real exit codes."""

import os
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import JEMALLOC


def wrap(*args, env=None, **kwargs):
    return subprocess.run(["ksm-wrap", *args], capture_output=True, text=True, timeout=60, env=env, **kwargs)


def one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ksm-wrap: ")
    return lines[0]


@pytest.mark.parametrize(
    "args, code, says",
    [
        (["--bogus", "true"], 2, "No such option '--bogus'"),
        ([], 2, "Missing argument 'COMMAND...'"),
        (["no-such-program-here"], 127, "command not found: no-such-program-here"),
        (["--threshold", "lots", "true"], 2, "'lots' is not a size"),
        (["--threshold", "100", "true"], 2, f"'100' is not from {os.sysconf('SC_PAGE_SIZE') // 1024}K to 1T"),
        (["--strategy", "fast", "true"], 2, "'fast' is not one of"),
        (["/"], 126, "not an executable file"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code(args, code, says):
    env = dict(os.environ, KSMPRELOAD_STATS_DIR="off")
    result = wrap(*args, env=env)
    assert result.returncode == code
    assert says in one_error_line(result)


def test_program_keeps_its_pid_and_sees_the_shim_first(shim):
    env = quiet_env(LD_PRELOAD=JEMALLOC)
    proc = subprocess.Popen(
        ["ksm-wrap", "sh", "-c", 'echo "$$ $LD_PRELOAD ${KSMPRELOAD_STRATEGY-unset}"'],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, _ = proc.communicate(timeout=30)
    pid, shim_first, kept, strategy = out.split()
    assert int(pid) == proc.pid, "ksm-wrap execs: the program has the launcher's pid"
    assert shim_first == shim and kept == JEMALLOC
    assert strategy == "unset", "no option, no setting: the shim's default (auto)"


def test_exit_status_and_output_are_the_programs():
    result = wrap("sh", "-c", "echo out; echo err >&2; exit 7", env=dict(os.environ, KSMPRELOAD_STATS_DIR="off"))
    assert result.returncode == 7
    assert result.stdout == "out\n"
    assert result.stderr.splitlines()[-1] == "err"


def test_options_reach_the_shim():
    result = wrap("--strategy", "madvise", "--threshold", "64K", "--no-align", "-v", "true")
    assert result.returncode == 0
    assert "strategy madvise, threshold 65536 bytes, no alignment" in result.stderr


def test_static_binary_gets_prctl_merging(c_programs):
    program = c_programs("merge_flag_static")
    assert subprocess.run([program], capture_output=True, text=True).stdout.strip() == "0"
    result = wrap(program)
    assert result.returncode == 0
    assert "is statically linked" in result.stderr and "prctl(PR_SET_MEMORY_MERGE)" in result.stderr
    assert result.stdout.strip() == "1", "the flag set by ksm-wrap survives exec into the program"


def test_setuid_binary_is_named(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("making a setuid file of another owner needs root")
    program = tmp_path / "id-setuid"
    shutil.copy("/usr/bin/id", program)
    os.chown(program, 65534, 65534)
    os.chmod(program, 0o755 | stat.S_ISUID)
    result = wrap(str(program))
    assert "is setuid" in result.stderr and "prctl(PR_SET_MEMORY_MERGE)" in result.stderr


def test_privileged_program_is_merged_only_at_roots_request(c_programs):
    """prctl(PR_SET_MEMORY_MERGE) survives exec into a setuid program: only root may ask."""
    from ksmpreload import binary
    from ksmpreload.wrap import may_merge_for

    program = c_programs("merge_flag_static")
    static = binary.inspect(program)
    setuid_root = binary.Binary(
        program, is_elf=True, static=True, secure_reason="is setuid (owner uid 0), so the loader ignores LD_PRELOAD"
    )
    assert may_merge_for(static, 65534) and may_merge_for(static, 0)
    assert may_merge_for(setuid_root, 0)
    assert not may_merge_for(setuid_root, 65534)


def test_enable_ksm_turns_it_on_and_says_what_changed(ksm_running):
    with open("/sys/kernel/mm/ksm/run", "w") as f:
        f.write("0")
    with open("/sys/kernel/mm/ksm/pages_to_scan", "w") as f:
        f.write("100")
    result = wrap("--enable-ksm", "true")
    assert result.returncode == 0
    assert "run 0 -> 1" in result.stderr and "pages_to_scan 100 -> " in result.stderr
    with open("/sys/kernel/mm/ksm/run") as f:
        assert f.read().strip() == "1"


def test_warns_when_ksm_is_off(ksm_running):
    with open("/sys/kernel/mm/ksm/run", "w") as f:
        f.write("0")
    result = wrap("true")
    assert result.returncode == 0
    assert "KSM is not running" in result.stderr and "--enable-ksm" in result.stderr


def test_enable_ksm_without_root_says_so(ksm_running):
    """Run as root with the effective uid of nobody (so the installed package stays readable)."""
    with open("/sys/kernel/mm/ksm/run", "w") as f:
        f.write("0")
    code = (
        "import os, sys, locale, gettext, ksmpreload.wrap as wrap, ksmpreload.kernel, ksmpreload.binary; "
        "os.seteuid(65534); sys.argv = ['ksm-wrap', '--enable-ksm', 'true']; wrap.main()"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 1
    assert "needs root" in one_error_line(result)


# ---- issue 11: ksm-wrap as a safe launcher ----------------------------------------------------


def quiet_env(**settings):
    """The test's environment without counters files, an inherited preload or shim settings
    (KSMPRELOAD_SHIM, which shim ksm-wrap preloads, is kept), plus `settings`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k == "KSMPRELOAD_SHIM" or not k.startswith("KSMPRELOAD_") and k != "LD_PRELOAD"
    }
    return dict(env, KSMPRELOAD_STATS_DIR="off", **settings)


PAGE = os.sysconf("SC_PAGE_SIZE")
TIB = 1 << 40


@pytest.mark.parametrize(
    "value, accepted",
    [
        (str(PAGE - 1), False),
        (str(PAGE), True),
        (f"{PAGE}B", True),
        (f"{PAGE}b", True),
        (f"{PAGE}i", True),
        (f"{PAGE}iB", True),
        (f"{PAGE:08d}", True),
        (str(TIB), True),
        (str(TIB + 1), False),
        ("1024G", True),
        ("1024GiB", True),
        ("1025G", False),
        ("1T", True),
        ("1Ti", True),
        ("2T", False),
        ("0x1000", False),
        ("-1", False),
        ("-4096", False),
        (" 8K", True),
        ("\t8K", True),
        ("+8K", True),
        ("8 K", False),
        ("8K ", False),
        ("8K\n", False),
        ("8KiB", True),
        ("8Kib", False),
        ("8KIB", False),
        ("8kb", True),
        ("8KB", True),
        ("8KK", False),
        ("\u0668K", False),
        ("", False),
        ("K", False),
        ("2m", True),
        ("1g", True),
        ("99999999999999999999999", False),
    ],
    ids=repr,
)
def test_threshold_is_accepted_exactly_when_the_shim_accepts_it(shim, value, accepted):
    """The shim's rule (shim/config.c parse_size and read_threshold), checked on the shim itself:
    a value it refuses gives its warning line; ksm-wrap refuses the same values with exit 2."""
    alone = subprocess.run(
        ["true"],
        capture_output=True,
        text=True,
        timeout=30,
        env=quiet_env(LD_PRELOAD=shim, KSMPRELOAD_VERBOSE="1", KSMPRELOAD_THRESHOLD=value),
    )
    assert ("KSMPRELOAD_THRESHOLD=" not in alone.stderr) == accepted, alone.stderr
    wrapped = wrap("-v", "--threshold", value, "true", env=quiet_env())
    assert wrapped.returncode == (0 if accepted else 2), wrapped.stderr
    if accepted:
        said = [
            line.split(": ", 1)[1]
            for line in alone.stderr.splitlines() + wrapped.stderr.splitlines()
            if "threshold" in line
        ]
        assert len(said) == 2 and said[0].split(", ")[1] == said[1].split(", ")[1], said
    else:
        assert "--threshold" in one_error_line(wrapped)


@pytest.mark.parametrize(
    "args, code",
    [
        (["--threshold", "8\x1b[2J", "true"], 2),
        (["no-such\x1b[2J-program"], 127),
        (["--strategy", "a\x1bb", "true"], 2),
        (["--bo\x1bgus", "true"], 2),
        (["/no\x07such/program"], 127),
    ],
)
def test_control_characters_in_bad_values_are_escaped(args, code):
    result = wrap(*args, env=quiet_env())
    assert result.returncode == code
    line = one_error_line(result)
    assert line.isprintable(), repr(line)
    assert "\\x1b" in line or "\\x07" in line


SHOW_PRELOAD = 'echo "$LD_PRELOAD"; grep libksmpreload /proc/$$/maps | awk "{print \\$6}" | sort -u'


def preload_seen(result):
    """(LD_PRELOAD, [shim files mapped]) that the SHOW_PRELOAD script printed."""
    lines = result.stdout.splitlines()
    return lines[0], lines[1:]


@pytest.mark.parametrize(
    "directory",
    ["with space", "with:colon", "with\ttab", "with\nnewline", "with$LIB"],
    ids=["space", "colon", "tab", "newline", "dollar"],
)
def test_shim_path_that_ld_preload_cannot_carry_is_refused(shim, tmp_path, directory):
    """LD_PRELOAD splits on spaces and colons and expands $LIB, $ORIGIN, $PLATFORM: the program
    would run without the shim. ksm-wrap says so in one line and runs nothing."""
    copy = tmp_path / directory / "libksmpreload.so"
    copy.parent.mkdir()
    shutil.copy(shim, copy)
    result = wrap("sh", "-c", "echo ran", env=quiet_env(KSMPRELOAD_SHIM=str(copy)))
    assert result.returncode == 1, result
    assert result.stdout == ""
    line = one_error_line(result)
    assert "LD_PRELOAD cannot carry" in line and "KSMPRELOAD_SHIM" in line
    assert not any(c in result.stderr[:-1] for c in "\t\n\x1b"), "control characters are escaped"


def test_relative_shim_path_still_reaches_the_program(shim, tmp_path):
    """A bare file name in LD_PRELOAD is searched in the library directories, not here."""
    shutil.copy(shim, tmp_path / "libksmpreload.so")
    result = wrap("sh", "-c", SHOW_PRELOAD, env=quiet_env(KSMPRELOAD_SHIM="libksmpreload.so"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert preload_seen(result) == (str(tmp_path / "libksmpreload.so"), [str(tmp_path / "libksmpreload.so")])


def test_preload_entries_already_there_are_kept_as_they_are(shim):
    existing = f"{JEMALLOC}::{JEMALLOC}"
    result = wrap("sh", "-c", SHOW_PRELOAD, env=quiet_env(LD_PRELOAD=existing))
    assert result.returncode == 0, result.stderr
    assert preload_seen(result) == (f"{shim} {existing}", [shim])


@pytest.mark.parametrize("kind", ["symlink", "copy", "same-path-after-jemalloc"])
def test_shim_already_preloaded_is_not_added_again(shim, tmp_path, kind):
    """LD_PRELOAD naming the same file (device and inode) or any libksmpreload.so is left as it is."""
    if kind == "symlink":
        other = tmp_path / "libother.so"
        other.symlink_to(shim)
        existing = str(other)
    elif kind == "copy":
        other = tmp_path / "libksmpreload.so"
        shutil.copy(shim, other)
        existing = f"{other}:{JEMALLOC}"
    else:
        other = shim
        existing = f"{JEMALLOC} {shim}"
    result = wrap("sh", "-c", SHOW_PRELOAD, env=quiet_env(LD_PRELOAD=existing))
    assert result.returncode == 0, result.stderr
    assert preload_seen(result) == (existing, [os.path.realpath(other)])


def test_settings_in_the_environment_are_kept_without_their_flags():
    env = quiet_env(
        KSMPRELOAD_STRATEGY="madvise", KSMPRELOAD_ALIGN="0", KSMPRELOAD_VERBOSE="1", KSMPRELOAD_THRESHOLD="64K"
    )
    result = wrap("true", env=env)
    assert result.returncode == 0, result.stderr
    assert "strategy madvise, threshold 65536 bytes, no alignment" in result.stderr
    result = wrap(
        "--strategy", "prctl", "--threshold", "16K", "--align", "-v", "true", env=dict(env, KSMPRELOAD_VERBOSE="0")
    )
    assert result.returncode == 0, result.stderr
    assert "strategy prctl, threshold 16384 bytes, large blocks page-aligned" in result.stderr


def test_help_says_which_settings_come_from_the_environment():
    result = wrap("--help")
    assert result.returncode == 0
    for name in ("KSMPRELOAD_STRATEGY", "KSMPRELOAD_THRESHOLD", "KSMPRELOAD_ALIGN", "KSMPRELOAD_VERBOSE"):
        assert name in result.stdout.replace("\n", " "), name


@pytest.mark.parametrize(
    "name, value, says",
    [
        (
            "KSMPRELOAD_STRATEGY",
            "fast",
            "KSMPRELOAD_STRATEGY='fast' is not auto, prctl, madvise or observe; using auto",
        ),
        ("KSMPRELOAD_ALIGN", "yes", "KSMPRELOAD_ALIGN='yes' is not 0 or 1; using 1"),
        ("KSMPRELOAD_THRESHOLD", "lots", "KSMPRELOAD_THRESHOLD='lots' is not a size"),
    ],
)
def test_invalid_setting_in_the_environment_is_reported_by_the_shim(name, value, says):
    """ksm-wrap passes the environment on unchanged; the shim names the variable and the
    default it uses, and the program runs."""
    result = wrap("sh", "-c", "echo ran", env=quiet_env(**{name: value}))
    assert result.returncode == 0 and result.stdout == "ran\n", result.stderr
    shim_lines = [line for line in result.stderr.splitlines() if line.startswith("ksmpreload: ")]
    assert len(shim_lines) == 1 and says in shim_lines[0], result.stderr


def test_script_without_shebang_runs_with_sh_as_execvp_would(shim, tmp_path):
    script = tmp_path / "no-shebang"
    script.write_text('echo "0=$0 n=$# args=$*"\necho err >&2\nexit 3\n')
    script.chmod(0o755)
    args = [str(script), "a", "b c"]
    direct = subprocess.run(["sh", "-c", '"$0" "$@"', *args], capture_output=True, text=True, timeout=30)
    wrapped = wrap(*args, env=quiet_env())
    assert (
        (wrapped.returncode, wrapped.stdout)
        == (direct.returncode, direct.stdout)
        == (3, f"0={script} n=2 args=a b c\n")
    )
    assert wrapped.stderr.splitlines()[-1] == "err"
    script.write_text(SHOW_PRELOAD + "\n")
    seen = wrap(str(script), env=quiet_env())
    assert seen.returncode == 0, seen.stderr
    assert preload_seen(seen) == (shim, [shim]), "the shell running the script has the shim"
