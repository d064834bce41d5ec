"""The doctor's ksm-wrap prediction on content that repeats within its pages: figures read from
two redis-servers filled by redis-benchmark (every value one byte repeated), 2026-11-29."""

from ksmpreload.diagnosis import predictions
from ksmpreload.layout import LayoutReport
from ksmpreload.potential import PotentialReport

PAGE = 4096


def test_content_equal_page_by_page_wherever_it_sits_is_not_counted_twice():
    totals = {"saving_across": 2703, "saving_within": 219798}
    report = PotentialReport({}, totals, [], PAGE, True, 222501 + 213, 222501, None)
    layout = LayoutReport(bytes_read=947716096, duplicate_bytes=923448281, duplicate_chunk_bytes=929840278,
                          aligned_gain_bytes=768385291, aligned_runs=1163, run_edge_bytes=1905)  # fmt: skip
    saved = {entry["remedy"]: entry["saved_bytes"] for entry in predictions(report, layout)}
    zero_pages = 213 * PAGE
    assert saved["as-is"] == (222501 + 213) * PAGE
    assert saved["ksm-wrap"] == max(saved["as-is"], zero_pages + layout.duplicate_bytes) < layout.bytes_read
