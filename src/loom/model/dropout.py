"""Dropout with a fast mask, for devices without a fused dropout kernel (CPU).

torch's CPU dropout draws its mask with ``bernoulli_`` on one thread (~7-12 ns an element
here) and keeps it in the input's dtype (4 bytes in fp32); its fastest generator call,
``random_`` on int64 (mt19937, one thread), still takes ~1 ns per 16 random bits.
:func:`keep_mask` takes one 64-bit seed from the active default generator, then draws 16 bits
an element from SFC64 generators (numpy's Small Fast Chaotic generator; passes PractRand and
BigCrush) in chunks of :data:`CHUNK` elements, chunk c's generator seeded with (seed, c), a large
mask's chunks spread over torch's intra-op threads (~0.6 ns an element on one thread here, the
compare included; 0.5 on two, for 2.6M elements and more). It keeps the mask as uint8 (1 byte).
``p`` is rounded to a multiple of 2^-16 (:func:`quantized_p`: 0.1 becomes 0.100006) and the kept
elements are scaled by 1 / (1 - p'), so E[dropout(x)] = x exactly.

The mask is a function of the seed alone (not of the thread count), and the seed comes from
the active default generator, so torch's checkpoint (recomputation) and loom's RNG streams
(``loom.parallel.random``) replay it as they replay torch's own draws.
On CUDA :class:`Dropout` is torch's fused kernel.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BITS = 16  # random bits per mask element: p is a multiple of 2^-16
CHUNK = 1 << 18  # mask elements per generator (and per task of a thread): 0.2 ms of drawing


def quantized_p(p: float) -> float:
    """The drop probability :func:`keep_mask` realises for ``p``: round(p x 2^16) / 2^16."""
    return round(p * (1 << BITS)) / (1 << BITS)


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device | str) -> torch.Tensor:
    """uint8 tensor of ``shape``, each element 1 with probability 1 - quantized_p(p), else 0,
    independently (:func:`fill_keep_mask`)."""
    return fill_keep_mask(torch.empty(shape, dtype=torch.uint8, device=device), p)


def draw_seed(device: torch.device | str) -> int:
    """One draw of [0, 2^63) from the default generator of ``device``: a mask's seed."""
    return int(torch.empty((), dtype=torch.int64, device=device).random_())


def fill_keep_mask(out: torch.Tensor, p: float, seed: int | None = None) -> torch.Tensor:
    """Fill the contiguous uint8 tensor ``out`` with a keep mask and return it: element i of chunk
    c (``CHUNK`` elements) is 1 where the i-th 16-bit lane of SFC64((seed, c))'s 64-bit outputs
    is at least round(p x 2^16), ``seed`` (when None, :func:`draw_seed` on ``out``'s device) the
    same mask again for the same seed. Off the CPU the mask is drawn on the host and copied over."""
    n = out.numel()
    seed = draw_seed(out.device) if seed is None else seed
    host = out if out.device.type == "cpu" else torch.empty(out.shape, dtype=torch.uint8)
    # uint8, not bool: torch's CPU kernels vectorise a multiply by uint8, not by bool (4x here)
    flat = host.view(-1).numpy().view(np.bool_)
    threshold = round(p * (1 << BITS))

    def draw(chunks: range) -> None:
        for c in chunks:
            start = c * CHUNK
            m = min(CHUNK, n - start)
            lanes = np.random.SFC64([seed, c]).random_raw((m + 3) // 4).view(np.uint16)[:m]
            np.greater_equal(lanes, threshold, out=flat[start : start + m])

    count = -(-n // CHUNK)
    threads = min(torch.get_num_threads(), count // 2)  # two chunks a thread at least: handing over costs
    if threads <= 1:
        draw(range(count))
    else:  # numpy releases the GIL while it draws and compares
        list(_pool(threads).map(draw, [range(t, count, threads) for t in range(threads)]))
    if host is not out:
        out.copy_(host)
    return out


_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """The mask's worker threads, per process (a forked child starts its own) and thread count."""
    key = (os.getpid(), threads)
    if key not in _pools:
        _pools[key] = ThreadPoolExecutor(threads, thread_name_prefix="loom-dropout-mask")
    return _pools[key]


class _Dropout(torch.autograd.Function):
    """x * keep / (1 - p'), keeping only the uint8 mask for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(tuple(x.shape), p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - quantized_p(p))
        return (x * keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return (grad * keep).mul_(ctx.scale), None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Dropout of ``x`` with probability ``p`` (module docstring); torch's on CUDA."""
    if not training or p == 0.0:
        return x
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if x.device.type == "cuda":
        return F.dropout(x, p, training=True)
    return _Dropout.apply(x, p)


class Dropout(nn.Module):
    """:func:`dropout` as a module (``nn.Dropout``'s interface: ``p``, active in training)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
