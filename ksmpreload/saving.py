"""What KSM saves: the one definition every view uses.

- The machine: pages_sharing + ksm_zero_pages (kernel.pages_saved).
- A process: its fair share. A KSM page mapped c times saves c - 1 pages, and each of its c
  mappings is credited (c - 1)/c of a page (page frames through pagemap and kpagecount: root,
  sharing.py); each KSM zero page (use_zero_pages) saves a whole page. Over every process that
  uses KSM the shares add up to the machine's figure, so a set's saving is the sum of its
  members' shares, whoever else maps the same KSM pages.
- Without root (no page frames): an estimate from ksm_stat. A process's merged pages times the
  machine's pages_sharing / (pages_sharing + pages_shared), the share of a mapping of a KSM
  page on average, plus its zero pages: over every process these add up to the machine too.
- Net: saved - the shim's memory cost (padding of live aligned blocks, its table, kept blocks:
  shimstats.memory_cost_bytes) - rmap items x RMAP_ITEM_BYTES (what the kernel charges in
  general_profit).

A page that a process maps twice (two of its own mappings of one KSM page) counts as two
mappings. A child that a fork gave mappings of KSM pages is credited for them from the first
read, while ksm_merging_pages and pages_sharing count them only once ksmd has scanned the
child: until then its share is above its merged pages, and the shares add up to more than the
machine's figure. The machine's figure is ksmd's: with run 0 it stays as of its last scan,
processes that have ended included (docs/SAVINGS.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from . import kernel, shimstats


@dataclass
class Saving:
    pid: int
    merged_pages: int = 0  # ksm_merging_pages: its pages that map a KSM page
    zero_pages: int = 0  # ksm_zero_pages
    rmap_items: int = 0  # ksm_rmap_items: the pages ksmd tracks for it
    saved_pages: float = 0.0  # fair share of the KSM pages it maps + its zero pages
    padding_bytes: int = 0  # the shim's memory cost; 0 without the shim
    shim: bool = False  # the shim's counters file was found

    @property
    def saved_bytes(self) -> int:
        return round(self.saved_pages * kernel.page_size())

    @property
    def net_saved_bytes(self) -> int:
        return net_saved_bytes(self.saved_bytes, self.padding_bytes, self.rmap_items)


def net_saved_bytes(saved_bytes: int, padding_bytes: int, rmap_items: int) -> int:
    return saved_bytes - padding_bytes - rmap_items * kernel.RMAP_ITEM_BYTES


def savings(pids: Iterable[int]) -> dict[int, Saving]:
    """{pid: Saving} of the processes still there (root: page frame numbers)."""
    from .sharing import sharing  # the compiled helper: imported when needed, not with the CLI

    report = sharing(pids)
    result = {}
    for pid, process in report.processes.items():
        stat = kernel.process_ksm_stat(pid) or {}
        counters = shimstats.read_process_stats(pid) or {}
        zero_pages = stat.get("ksm_zero_pages", 0)
        result[pid] = Saving(
            pid,
            merged_pages=stat.get("ksm_merging_pages", 0),
            zero_pages=zero_pages,
            rmap_items=stat.get("ksm_rmap_items", 0),
            saved_pages=process.fair_saved + zero_pages,
            padding_bytes=shimstats.memory_cost_bytes(counters),
            shim=bool(counters),
        )
    return result


def estimated_saved_pages(stat: dict, knobs: dict) -> float:
    """A process's saving from its ksm_stat and the machine's counters, without page frames."""
    sharing, shared = knobs.get("pages_sharing") or 0, knobs.get("pages_shared") or 0
    per_mapping = sharing / (sharing + shared) if sharing + shared else 0.0
    return stat.get("ksm_merging_pages", 0) * per_mapping + stat.get("ksm_zero_pages", 0)


def saved_pages(pids: Iterable[int]) -> float:
    """The set's saving in pages: the sum of its members' fair shares."""
    return sum(saving.saved_pages for saving in savings(pids).values())
