"""gunicorn hooks of the python-prefork workload (its --config file). Each worker, once started,
runs a full garbage collection, as a long-running worker does sooner or later: it writes the
header of every object the master built, so copy-on-write copies the master's pages into the
worker although their contents end up equal. Then it leaves a file in the ready directory."""

from __future__ import annotations

import gc
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gunicorn.arbiter import Arbiter
    from gunicorn.workers.base import Worker

READY = os.environ["KSMPRELOAD_PREFORK_READY"]


def when_ready(server: Arbiter) -> None:
    from ksmpreload.workloads.prefork_app import INDEX_BYTES

    with open(os.path.join(READY, "master"), "w") as f:
        f.write(str(INDEX_BYTES))


def post_worker_init(worker: Worker) -> None:
    gc.collect()
    open(os.path.join(READY, f"worker-{os.getpid()}"), "w").close()
