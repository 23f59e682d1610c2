"""What a rank's memory holds, measured: activations saved for backward, tensor bytes, peaks.

Activations (:class:`ActivationMeter`): while a micro-batch's forward runs, a saved-tensors
hook sees every tensor autograd keeps for backward (and every input a recomputed region
keeps, ``loom.model.recompute``). Each storage is counted once per micro-batch, whatever
number of views of it are saved; parameters (and views of them, e.g. the transposed weight
a linear saves) are model state, not activations, and are left out; autocast's 16-bit copies
of fp32 weights, which a micro-batch keeps until its backward, are counted apart
(``mem_weight_copy_bytes``). Forwards that run the same code on the same shapes (every
micro-batch of a plain step, of one pipeline chunk, in every step of a run) save the same
bytes: the first of them is measured and the others are credited with its figures, so the
hooks run in the run's first step only. A micro-batch's bytes stay live until its backward
ends (under zero-bubble: until its weight-gradient half W), so the step's peak is the largest sum over the micro-batches in flight at once: one
without a pipeline, up to p - r on stage r of 1F1B.

Not counted: the transient tensors of a backward (a recomputed block's activations exist
only while that block's backward runs) and the allocator's cache; the process's peak
resident memory (:func:`peak_host_bytes`) and, on CUDA, the allocator's peak
(:func:`peak_device_bytes`) bound what these categories leave out.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Hashable, Iterable, Iterator

import torch
from torch import nn


def _is_parameter(t: torch.Tensor) -> bool:
    """``t`` is a parameter or a view of one. ``type() is`` first: ``isinstance`` against
    ``nn.Parameter`` goes through its metaclass's check, the dearest step of the hook."""
    cls, base = type(t), t._base
    if cls is nn.Parameter or type(base) is nn.Parameter:
        return True
    if cls is torch.Tensor and (base is None or type(base) is torch.Tensor):
        return False
    return isinstance(t, nn.Parameter) or isinstance(base, nn.Parameter)  # subclasses of either


_CASTS_AND_VIEWS = frozenset({"ToCopyBackward0", "TBackward0", "ViewBackward0", "TransposeBackward0"})


def _is_weight_copy(t: torch.Tensor) -> bool:
    """A cast (or a view of a cast) of a parameter: autocast's 16-bit copy of an fp32 weight."""
    fn = t.grad_fn
    for _ in range(4):
        if fn is None:
            return False
        if type(fn).__name__ == "AccumulateGrad":
            return isinstance(fn.variable, nn.Parameter)
        if type(fn).__name__ not in _CASTS_AND_VIEWS:
            return False
        inputs = [f for f, _ in fn.next_functions if f is not None]
        if len(inputs) != 1:
            return False
        fn = inputs[0]
    return False


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


class ActivationMeter:
    """Activation bytes per micro-batch and their peak over a step (see the module docstring)."""

    def __init__(self) -> None:
        self.live: dict[Hashable, tuple[int, int]] = {}  # micro-batch -> (activation, weight-copy) bytes
        self.peak = (0, 0)  # at the step's largest activation total so far
        self.largest = 0  # the largest micro-batch of the step
        self.measured: dict[Hashable, tuple[int, int]] = {}  # a forward's figures, by ``alike``

    @contextlib.contextmanager
    def forward(self, key: Hashable, alike: Hashable | None = None) -> Iterator[None]:
        """Count what the forward inside saves for backward, as micro-batch ``key``.

        ``alike``: forwards that run the same code on tensors of the same shapes (a plain
        step's micro-batches, one pipeline chunk's, in every step) save the same bytes, so
        only the first of them is measured and the others are credited with its figures.
        The hook is a Python call for every tensor saved, several hundred a forward: 2% of
        the DDP benchmark's step (2 x 128 tokens a rank) and 3% of the pipeline benchmark's
        stages (8 micro-batches) when every forward paid it. ``None``: measure this one."""
        if alike is not None and alike in self.measured:
            yield
            self._add(key, self.measured[alike])
            return
        seen: set[int] = set()
        count = [0, 0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            # A parameter's address is not remembered: ZeRO-3 frees a unit's parameters after
            # its forward, and the allocator may hand that address to the next activation.
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in seen and not _is_parameter(t):
                nbytes = storage.nbytes()
                if nbytes:
                    seen.add(ptr)
                    count[1 if _is_weight_copy(t) else 0] += nbytes
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield
        if alike is not None:
            self.measured[alike] = (count[0], count[1])
        self._add(key, (count[0], count[1]))

    def _add(self, key: Hashable, count: tuple[int, int]) -> None:
        before = self.live.get(key, (0, 0))
        self.live[key] = (before[0] + count[0], before[1] + count[1])
        self.largest = max(self.largest, self.live[key][0])
        now = (sum(a for a, _ in self.live.values()), sum(w for _, w in self.live.values()))
        if now[0] >= self.peak[0]:
            self.peak = now

    def release(self, key: Hashable) -> None:
        """Micro-batch ``key``'s backward is over: its saved tensors are gone."""
        self.live.pop(key, None)

    def take_step(self) -> dict[str, int]:
        """The step's figures for a metrics record; the next step starts from zero (what was
        measured by ``alike`` is kept)."""
        out = {
            "mem_activation_bytes": self.peak[0],
            "mem_activation_microbatch_bytes": self.largest,
            "mem_weight_copy_bytes": self.peak[1],
        }
        self.live.clear()
        self.peak, self.largest = (0, 0), 0
        return out


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def peak_host_bytes() -> int:
    """The process's peak resident memory so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_device_bytes(device: torch.device) -> int | None:
    """The CUDA allocator's peak of allocated bytes so far on ``device`` (None elsewhere)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device)


def host_and_device_peaks(device: torch.device) -> dict[str, int]:
    """``mem_peak_host_bytes`` and, on CUDA, ``mem_peak_device_bytes``, for a metrics record."""
    out = {"mem_peak_host_bytes": peak_host_bytes()}
    if (device_peak := peak_device_bytes(device)) is not None:
        out["mem_peak_device_bytes"] = device_peak
    return out
