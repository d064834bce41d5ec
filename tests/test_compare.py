"""`ksmpreload compare` end to end on the real kernel: two arms, JSON, Markdown and PNG."""
import json
import subprocess

from conftest import require_root_ksm

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_compare_two_arms_with_json_markdown_and_plot(c_programs, tmp_path):
    require_root_ksm()
    markdown, plot = tmp_path / "compare.md", tmp_path / "compare.png"
    done = subprocess.run(["ksmpreload", "compare", "--strategies", "none,prctl", "--timeout", "60", "--json",
                           "--markdown", str(markdown), "--plot", str(plot), "--",
                           c_programs("unaligned_madvise"), "64"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    arms = {arm["strategy"]: arm for arm in json.loads(done.stdout)}
    held = 64 * 256 * 1024  # 64 blocks of the same bytes: all but one page of content can go
    assert arms["none"]["saved_bytes"] == 0, arms["none"]
    assert arms["prctl"]["saved_bytes"] >= 0.9 * held, arms["prctl"]
    assert arms["prctl"]["saved_percent"] > 50 and arms["prctl"]["rmap_items"] > 0
    assert arms["prctl"]["seconds_to_90"] is not None
    text = markdown.read_text()
    assert "| glibc | none | 1 | 0.0 |" in text and "| glibc | prctl | 1 |" in text, text
    assert plot.read_bytes()[:8] == PNG_MAGIC and plot.stat().st_size > 10_000


def test_compare_rejects_an_unknown_strategy():
    done = subprocess.run(["ksmpreload", "compare", "--strategies", "none,fast", "--", "true"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "fast" in done.stderr, done.stderr
