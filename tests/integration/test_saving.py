"""The one definition of "saved" (saving.py) on the real kernel: fair shares by hand, and the
shares of every process using KSM add up to the machine's saving."""

import contextlib
import secrets

import pytest

from conftest import require_root_ksm
from ksmpreload import attribution, kernel, saving, scanning
from ksmpreload.processes import merged_pages
from mergeable_child import distinct_pages_process


@pytest.fixture(autouse=True)
def root_and_ksm():
    require_root_ksm()


def test_fair_shares_by_hand_and_they_add_up_to_the_machine():
    """A and B hold pages 0-199, C pages 0-99 of the same contents: pages 0-99 merge into KSM
    pages mapped 3 times (each mapping saves 2/3), pages 100-199 into pages mapped twice (1/2)."""
    token = secrets.token_hex(8)
    with contextlib.ExitStack() as stack:
        a, b, c = (stack.enter_context(distinct_pages_process(token, count)) for count in (200, 200, 100))
        pids = [a.pid, b.pid, c.pid]
        with scanning.fast_scanning():
            scanning.wait_until_settled(lambda: merged_pages(pids), timeout=60)
            shares = saving.savings(pids)
            report = attribution.attribution(pids)
            knobs = kernel.read_knobs()
            machine = kernel.pages_saved(knobs)
            users = kernel.ksm_processes()
            everyone = saving.savings([process["pid"] for process in users])
            estimates = [saving.estimated_saved_pages(process, knobs) for process in users]
    assert shares[a.pid].saved_pages == pytest.approx(100 * 2 / 3 + 100 / 2, abs=0.01)
    assert shares[b.pid].saved_pages == pytest.approx(100 * 2 / 3 + 100 / 2, abs=0.01)
    assert shares[c.pid].saved_pages == pytest.approx(100 * 2 / 3, abs=0.01)
    assert shares[a.pid].merged_pages == 200 and shares[c.pid].merged_pages == 100
    assert sum(share.saved_pages for share in everyone.values()) == pytest.approx(machine, rel=0.005)
    assert sum(estimates) == pytest.approx(machine, rel=0.005), "without root the estimates add up too"
    page = kernel.page_size()
    reported = {process.pid: process for process in report.processes}
    for pid in pids:
        assert reported[pid].saved_bytes == round(shares[pid].saved_pages * page)
        assert not reported[pid].saved_is_estimate
        assert reported[pid].net_saved_bytes == shares[pid].net_saved_bytes
