"""Layout-independent initialisation.

Invariant: the value drawn for element (i, j) of a parameter depends only on
(seed, parameter name, i, j), never on how the tensor is split across ranks. The full
tensor is defined as a stack of row blocks of ``ROW_BLOCK`` rows, each drawn from its own
generator seeded by (seed, name, block index). A tensor-parallel shard that owns rows
[a, b) draws only the blocks it overlaps; one that owns columns draws its rows and keeps
its columns; a pipeline stage draws only its own layers, whose names are global. So any
shard equals the slice of the tensor a single process would have drawn.
"""

from __future__ import annotations

import math

import torch

from loom.parallel.random import stream_seed

ROW_BLOCK = 128


def normal_slice(
    seed: int,
    name: str,
    full_shape: tuple[int, ...],
    std: float,
    rows: slice = slice(None),
    cols: slice = slice(None),
) -> torch.Tensor:
    """Rows ``rows`` and columns ``cols`` of the full N(0, std^2) tensor named ``name`` (fp32, CPU)."""
    n_rows = full_shape[0]
    tail = tuple(full_shape[1:])
    start, stop, step = rows.indices(n_rows)
    if step != 1:
        raise ValueError("row slices must be contiguous")
    if stop <= start:
        return torch.empty((0, *tail))[:, cols] if tail else torch.empty(0)
    first, last = start // ROW_BLOCK, (stop - 1) // ROW_BLOCK
    blocks = []
    for block in range(first, last + 1):
        block_rows = min(ROW_BLOCK, n_rows - block * ROW_BLOCK)
        generator = torch.Generator().manual_seed(stream_seed(seed, name, block))
        blocks.append(torch.randn((block_rows, *tail), generator=generator) * std)
    full_rows = torch.cat(blocks)[start - first * ROW_BLOCK : stop - first * ROW_BLOCK]
    return full_rows[:, cols] if tail else full_rows


def init_rule(name: str, std: float, n_layers: int) -> tuple[str, float]:
    """How parameter ``name`` starts: ("ones" | "zeros" | "normal", std).

    Residual output projections get std / sqrt(2 * n_layers) (GPT-2 paper), so the
    residual stream's variance does not grow with depth.
    """
    if name.endswith("norm.weight"):
        return "ones", 0.0
    if name.endswith(".bias"):
        return "zeros", 0.0
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return "normal", std / math.sqrt(2 * n_layers)
    return "normal", std


@torch.no_grad()
def init_parameter(
    param: torch.Tensor,
    name: str,
    seed: int,
    std: float,
    n_layers: int,
    full_shape: tuple[int, ...] | None = None,
    rows: slice = slice(None),
    cols: slice = slice(None),
) -> None:
    """Fill ``param`` (possibly a shard ``[rows, cols]`` of ``full_shape``) in place.

    Rows past ``full_shape[0]`` are padding (a vocabulary padded to a multiple of the
    tensor-parallel size): they are zero and carry no drawn values.
    """
    kind, scale = init_rule(name, std, n_layers)
    if kind == "ones":
        param.fill_(1.0)
    elif kind == "zeros":
        param.zero_()
    else:
        shape = tuple(full_shape or param.shape)
        start, stop, _ = rows.indices(max(shape[0], rows.stop or 0))
        real_stop = min(stop, shape[0])
        param.zero_()
        if real_stop > start:
            values = normal_slice(seed, name, shape, scale, slice(start, real_stop), cols)
            param[: real_stop - start].copy_(values.to(param.dtype))
