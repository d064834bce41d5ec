"""PyTorch: N python3 workers that each build a model and load the same weights (torch.save'd
once) into it. A worker is `python -m ksmpreload.workloads.pytorch WEIGHTS LAYERS WIDTH`."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..errors import KsmError
from ..processes import start_workers, stop_workers
from . import Loaded, Run, counted
from .servers import require_module, wrapped

if TYPE_CHECKING:
    from torch import nn

DESCRIPTION = "N python3 workers that load the same torch.save'd weights into their own model"


def build_model(layers: int, width: int) -> nn.Sequential:
    import torch

    return torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))


def model_bytes(layers: int, width: int) -> int:
    """The bytes of the model's parameters (float32 weights and biases)."""
    return layers * (width + 1) * width * 4


def worker(weights: str, layers: int, width: int) -> None:
    """Build the model (its own random weights), load the saved ones into it, hold them until
    stdin closes."""
    import torch

    torch.set_num_threads(1)
    model = build_model(layers, width)
    model.load_state_dict(torch.load(weights))
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"pid": os.getpid(), "bytes": held}), flush=True)
    sys.stdin.read()


@contextlib.contextmanager
def workers(layers: int, width: int, processes: int, strategy: str) -> Iterator[Loaded]:
    """`processes` workers holding the same weights, saved once to a temporary file."""
    torch = require_module("torch")
    with tempfile.TemporaryDirectory(prefix="ksmpreload-pytorch.") as workdir:
        weights = os.path.join(workdir, "weights.pt")
        torch.manual_seed(0)
        try:
            torch.save(build_model(layers, width).state_dict(), weights)
        except (OSError, RuntimeError) as error:  # torch reports a full disk as a RuntimeError
            raise KsmError(f"cannot save the model's weights to {weights}: {error}") from None
        command = wrapped([sys.executable, "-m", __name__, weights, str(layers), str(width)], strategy)
        started = start_workers([command] * processes)
        try:
            yield Loaded({proc.pid: proc.report["bytes"] for proc in started})
        finally:
            stop_workers(started)


def runs(settings: dict, strategy: str, processes: int | None, method: str | None, workdir: str) -> list[Run]:
    layers, width, processes = settings["torch_layers"], settings["torch_width"], processes or 3
    return [
        Run(
            f"{counted(processes, 'worker')}, {layers} x Linear({width}, {width})",
            lambda: workers(layers, width, processes, strategy),
            expected_saved_bytes=model_bytes(layers, width) * (processes - 1),
        )
    ]


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
