"""Options that several subcommands share."""

import math

import click

from .. import groups


class FiniteRange(click.FloatRange):
    """click.FloatRange that refuses nan, which its bounds let through."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail("nan is not a number", param, ctx)
        return number


def by_option(help_text: str):
    """--by process|cgroup|unit|container|pod (groups.GROUPINGS), default process."""
    return click.option(
        "--by", type=click.Choice(groups.GROUPINGS), default="process", show_default=True, help=help_text
    )
