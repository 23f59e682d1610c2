"""Dropout with a fast mask, for devices without a fused dropout kernel (CPU).

torch's CPU dropout draws its mask with ``bernoulli_`` on one thread (~7-12 ns an element
here) and keeps it in the input's dtype (4 bytes in fp32). :func:`keep_mask` takes 15 random
bits per element out of int64 draws (one generator call for four elements; ~2 ns an element
with the compare) and keeps the mask as uint8 (1 byte). ``p`` is rounded to a multiple of
2^-15 (:func:`quantized_p`: 0.1 becomes 0.100006) and the kept elements are scaled by
1 / (1 - p'), so E[dropout(x)] = x exactly.

The draws come from the active default generator, so torch's checkpoint (recomputation)
and loom's RNG streams (``loom.parallel.random``) replay them as they replay torch's own.
On CUDA :class:`Dropout` is torch's fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BITS = 15  # random bits per mask element: p is a multiple of 2^-15


def quantized_p(p: float) -> float:
    """The drop probability :func:`keep_mask` realises for ``p``: round(p x 2^15) / 2^15."""
    return round(p * (1 << BITS)) / (1 << BITS)


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device | str) -> torch.Tensor:
    """uint8 tensor of ``shape``, each element 1 with probability 1 - quantized_p(p), else 0,
    independently (:func:`fill_keep_mask`)."""
    return fill_keep_mask(torch.empty(shape, dtype=torch.uint8, device=device), p)


def fill_keep_mask(out: torch.Tensor, p: float) -> torch.Tensor:
    """Fill the contiguous uint8 tensor ``out`` with a keep mask and return it: the low 15 bits of
    each 16-bit lane of ceil(n / 4) int64 draws (``random_`` fills [0, 2^63), so every lane's low
    15 bits are uniform), kept where they are at least round(p x 2^15). Filling a tensor piece by
    piece, pieces of a multiple of 4 elements, draws what filling it at once would."""
    n = out.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=out.device).random_().view(torch.int16)[:n]
    # uint8, not bool: torch's CPU kernels vectorise a multiply by uint8, not by bool (4x here)
    torch.ge(bits.bitwise_and_(0x7FFF), round(p * (1 << BITS)), out=out.view(torch.bool).view(-1))
    return out


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
