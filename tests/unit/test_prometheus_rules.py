"""The Prometheus recording rules and alerts of docs/prometheus (issue 16): promtool checks them
and runs their unit tests (rules_test.yml: each rule's output and each alert's firing)."""

import os
import shutil
import subprocess

import pytest

from conftest import REPO

RULES = os.path.join(REPO, "docs", "prometheus")


def promtool(*args):
    if not shutil.which("promtool"):
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing (apt-get install prometheus)")
        pytest.skip("promtool is missing (apt-get install prometheus)")
    return subprocess.run(["promtool", *args], cwd=RULES, capture_output=True, text=True, timeout=120)


def test_the_rules_are_valid():
    done = promtool("check", "rules", "rules.yml")
    assert done.returncode == 0 and "SUCCESS: 7 rules found" in done.stdout, done.stdout + done.stderr


def test_the_rules_compute_and_fire_as_their_tests_expect():
    done = promtool("test", "rules", "rules_test.yml")
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
