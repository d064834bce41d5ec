"""What counts as a record of an attach (attached.valid): the shape attach writes, and nothing
a corrupt or hostile file could make detach act on."""

import pytest

from ksmpreload.attached import valid

GOOD = {"pid": 42, "started": 1795951194.04, "strategy": "madvise", "regions": [[4096, 8192]], "time": 1.0}


def test_the_shape_attach_writes_is_valid():
    assert valid(GOOD)["regions"] == [(4096, 8192)]
    assert valid({**GOOD, "strategy": "prctl", "regions": [], "started": None})


@pytest.mark.parametrize(
    "change",
    [
        {"pid": "42"},
        {"pid": True},
        {"strategy": "foo"},
        {"strategy": []},
        {"regions": None},
        {"regions": [[0, 1e23]]},
        {"regions": [[8192, 4096]]},
        {"regions": [[4095, 8192]]},
        {"regions": [[0, 1 << 65]]},
        {"regions": [[0]]},
        {"started": "yesterday"},
    ],
)
def test_anything_else_is_no_record(change):
    assert valid({**GOOD, **change}) is None


@pytest.mark.parametrize("record", [[], None, "x", 42])
def test_not_an_object_is_no_record(record):
    assert valid(record) is None
