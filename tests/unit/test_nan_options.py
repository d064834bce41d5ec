"""Every number option refuses nan in one line with exit 2 (click's ranges let it through)."""

import pytest
from click.testing import CliRunner

from ksmpreload.cli import group


@pytest.mark.parametrize(
    "arguments",
    [
        ["top", "--interval", "nan"],
        ["status", "--watch", "nan"],
        ["compare", "--timeout", "nan"],
        ["compare", "--warmup", "nan"],
        ["compare", "--load-timeout", "nan"],
        ["doctor", "--timeout", "nan"],
        ["governor", "--tick", "nan"],
        ["governor", "--max-cpu", "NaN", "--once"],
        ["governor", "--target-seconds", "nan"],
        ["governor", "--settled-seconds", "nan"],
        ["governor", "--unmark-idle", "--idle-seconds", "nan"],
    ],
)
def test_nan_is_refused(arguments):
    result = CliRunner().invoke(group, arguments)
    assert result.exit_code == 2 and "nan is not a number" in result.output, result.output
