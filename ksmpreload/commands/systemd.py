"""`ksmpreload systemd UNIT`: a drop-in that makes a systemd service merge."""

import click

from .. import kernel
from .. import systemd as drop_ins
from ..errors import KsmError
from ..sizes import SizeParam, short_size
from ..wrap import MAX_THRESHOLD


@click.command()
@click.argument("unit")
@click.option("--memory-ksm", is_flag=True, help="Set MemoryKSM=yes (systemd 256+): prctl merging, no alignment.")
@click.option("--strategy", type=click.Choice(["auto", "prctl", "madvise", "observe"]), help="KSMPRELOAD_STRATEGY.")
@click.option("--threshold", type=SizeParam(kernel.page_size(), MAX_THRESHOLD), help="KSMPRELOAD_THRESHOLD (like 8K).")
@click.option("--install", is_flag=True, help="Write it to UNIT-DIR/UNIT.d/ksmpreload.conf instead of printing it.")
@click.option(
    "--unit-dir",
    default=drop_ins.DEFAULT_UNIT_DIR,
    show_default=True,
    type=click.Path(file_okay=False, exists=True),
    help="Where --install writes.",
)
def systemd(unit, memory_ksm, strategy, threshold, install, unit_dir):
    """Print (or --install) a drop-in that makes service UNIT merge its memory.

    By default the drop-in preloads libksmpreload.so into the service, as `ksm-wrap` would run
    it: large blocks page-aligned and marked. --memory-ksm sets systemd's own MemoryKSM=yes
    instead (whole-process merging, no alignment; it works from systemd 256). Then:
    systemctl daemon-reload && systemctl restart UNIT. Check it with systemd-analyze verify UNIT.
    """
    name = drop_ins.service_name(unit)
    if memory_ksm and (strategy or threshold):
        raise KsmError("--strategy and --threshold set the shim, which --memory-ksm does not use", 2)
    settings = {"strategy": strategy, "threshold": short_size(threshold) if threshold else None}
    settings = {key: value for key, value in settings.items() if value}
    if memory_ksm:
        text, warnings = drop_ins.memory_ksm_drop_in(name, drop_ins.systemd_version()), []
    else:
        text, warnings = drop_ins.preload_drop_in(name, settings)
    for warning in warnings:
        click.echo(f"ksmpreload: {warning}", err=True)
    if not install:
        click.echo(text, nl=False)
        return
    try:
        path = drop_ins.install(name, text, unit_dir)
    except OSError as error:
        where = error.filename or unit_dir
        raise KsmError(f"cannot write the drop-in at {where}: {error.strerror or error}") from None
    click.echo(f"wrote {path}; now: systemctl daemon-reload && systemctl restart {name}")
