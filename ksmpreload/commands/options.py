"""Options that several subcommands share."""

import click

from .. import groups


def by_option(help_text: str):
    """--by process|cgroup|unit|container|pod (groups.GROUPINGS), default process."""
    return click.option(
        "--by", type=click.Choice(groups.GROUPINGS), default="process", show_default=True, help=help_text
    )
