"""Will the run fit? The planner's memory per rank against the memory the ranks will share.

A run is refused before any process starts when the most loaded rank's predicted bytes
(:class:`~loom.plan.rank_memory.RankMemory`: parameters, gradients, optimizer states,
activations, weight copies) exceed what it gets:

- on GPUs, each rank's device memory (``total`` of the device; offloaded optimizer state
  counts against the host instead);
- on CPUs, the host's memory shared by the ``local`` ranks of this host (every category),
  plus the offloaded optimizer state of GPU runs.

The prediction counts tensors only (no allocator caching, no framework overhead), so what
it refuses cannot run; a run it admits can still come close. ``train.memory_check = false``
starts anyway.
"""

from __future__ import annotations

from loom.errors import LoomError
from loom.plan.layout import Prediction

GIB = 2**30


def check_fits(prediction: Prediction, local: int, device: str, device_bytes: float, host_bytes: float) -> None:
    """Raise a :class:`LoomError` with the figures when the run cannot fit (module docstring)."""
    m = prediction.memory
    parts = (
        f"parameters {m.params / GIB:.2f}, gradients {m.grads / GIB:.2f}, optimizer {m.optim / GIB:.2f}, "
        f"activations {m.activations / GIB:.2f}, weight copies {m.weight_copies / GIB:.2f} GiB"
    )
    fix = (
        "shard more (zero.stage, parallel.tp/pp, more ranks), recompute activations (train.recompute), "
        "shrink train.micro_batch, or set train.memory_check = false to start anyway."
    )
    layout = prediction.layout.describe()
    if device == "cuda" and m.total > device_bytes:
        raise LoomError(
            f"the planner predicts {m.total / GIB:.2f} GiB on the most loaded rank of {layout} ({parts}), "
            f"and its GPU has {device_bytes / GIB:.2f} GiB.",
            fix,
        )
    on_host = local * (m.host_optim if device == "cuda" else m.total + m.host_optim)
    if on_host > host_bytes:
        raise LoomError(
            f"the planner predicts {on_host / GIB:.2f} GiB of host memory for the {local} rank(s) of {layout} on "
            f"this host ({m.total / GIB:.2f} GiB on the most loaded: {parts}), and the host has "
            f"{host_bytes / GIB:.2f} GiB.",
            fix,
        )
