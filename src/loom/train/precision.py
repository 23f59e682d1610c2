"""Devices and numeric precision: the autocast context."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from loom.errors import LoomError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; an unavailable device is a LoomError."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoomError(f"train.device = {spec!r} but no CUDA device is available.", "use train.device=auto or cpu.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LoomError(f"train.device = {spec!r} but MPS is not available.", "use train.device=auto or cpu.")
    return device


@dataclass
class Precision:
    """fp32 runs as is; bf16 and fp16 run the forward under autocast with fp32 weights.

    fp16 also scales the loss (``loom.optim.scaler.DynamicLossScaler``, one per run, agreed over
    dp, tp and pp: the wiring builds it) so small gradients do not underflow.
    """

    name: str
    device: torch.device

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.name])
