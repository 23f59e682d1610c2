"""Reversible residual blocks (RevNet, Gomez et al. 2017; Reformer, Kitaev et al. 2020).

The residual stream is carried twice, ``(x1, x2)``, both the embedding at the start. Block i
maps

    y1 = x1 + F_i(x2)        (F: the attention branch, its norm and dropout)
    y2 = x2 + G_i(y1)        (G: the MLP branch)

and the stage's output is ``(y1 + y2) / 2``. Each block's input follows from its output,

    x2 = y2 - G_i(y1),       x1 = y1 - F_i(x2),

so :class:`ReversibleStack` keeps only the last block's outputs for backward, whatever the
depth: backward walks the blocks in reverse, recomputes G then F with gradients on (their
dropout masks those of the first pass: each branch's random state is kept and restored),
takes their gradients and reconstructs the inputs. Parameter gradients accumulate into
``.grad`` as the branches' own backward produces them (DDP's and ZeRO-1/2's hooks see them
as usual). The reconstruction is exact up to floating-point rounding of x + f - f.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Branch = Callable[[torch.Tensor], torch.Tensor]


class _RandomState:
    """The CPU (and current CUDA device's) generator state, and the tp stream's, at one point."""

    def __init__(self, rng) -> None:  # noqa: ANN001
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        self.rng, self.tp = rng, getattr(rng, "_tp_state", None)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)
        if self.rng is not None:
            self.rng._tp_state = self.tp


class _Reversible(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, x2, branches, rng, *params):  # noqa: ANN001, ANN205
        states = []
        with torch.no_grad():
            for f, g in branches:
                f_state = _RandomState(rng)
                x1 = x1 + f(x2)
                g_state = _RandomState(rng)
                x2 = x2 + g(x1)
                states.append((f_state, g_state))
        ctx.branches, ctx.states, ctx.rng = branches, states, rng
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):  # noqa: ANN001, ANN205
        y1, y2 = ctx.saved_tensors
        after = _RandomState(ctx.rng)  # the forward's end: restored when done
        for (f, g), (f_state, g_state) in zip(reversed(ctx.branches), reversed(ctx.states)):
            with torch.enable_grad():
                z1 = y1.detach().requires_grad_(True)
                g_state.restore()
                gz = g(z1)
                torch.autograd.backward(gz, dy2)
            dz1 = dy1 + z1.grad
            x2 = (y2 - gz).detach()
            with torch.enable_grad():
                z2 = x2.requires_grad_(True)
                f_state.restore()
                fz = f(z2)
                torch.autograd.backward(fz, dz1)
            dy2 = dy2 + z2.grad
            y1, y2, dy1 = (y1 - fz).detach(), x2, dz1
        after.restore()
        return (dy1, dy2, None, None) + (None,) * (len(ctx.needs_input_grad) - 4)


def reversible(
    x: torch.Tensor,
    branches: Sequence[tuple[Branch, Branch]],
    params: Sequence[torch.Tensor],
    rng=None,  # noqa: ANN001
) -> torch.Tensor:
    """The reversible stack of ``branches`` ((F, G) per block) on ``x``: ``(y1 + y2) / 2``.
    ``params``: every parameter the branches use (so autograd knows the stack depends on them);
    ``rng``: the model's ``ParallelRNG`` whose tp stream the branches draw from, if any."""
    y1, y2 = _Reversible.apply(x, x, list(branches), rng, *params)
    return (y1 + y2) / 2
