"""This rank's part of each global tensor, as boxes: what a sharded checkpoint writes and reads.

A *global tensor* is one the single-process run holds: a parameter at its full, unpadded
shape (``model/NAME``), or one of its AdamW moments (``optim/NAME/exp_avg``,
``optim/NAME/exp_avg_sq``; ``optim/NAME/step`` is a 0-d tensor). A *piece* is a box of one
(``offsets`` and sizes per dimension) with this rank's values.

Invariant: whatever the layout, every element of every global tensor is written by exactly
one rank (:func:`coverage` checks it when a checkpoint is assembled):

- tp: a split parameter's part is the box ``part`` along ``tp_dim``; a replica (an unsplit
  tensor, a K/V head shared by several ranks) is written by its owner only;
- pp: the copy of a tied parameter on the last stage is not written (``pp_owner``);
- dp without ZeRO: every dp rank holds the same values, so each parameter is written by
  one dp rank, the parameters spread over the replicas by size (:func:`spread`);
- ZeRO: the owned slice of a flat buffer covers a range of each parameter's flattened local
  tensor; a range of a row-major tensor is a few boxes (:func:`flat_boxes`);
- a 0-d step counter is written with the piece that holds the global tensor's first element.

Reading is the inverse: a rank asks a :class:`Reader` for exactly the boxes it holds, and
the reader assembles each from whichever pieces overlap it, whatever layout wrote them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from loom.parallel.placement import Placement, Placements

MOMENTS = ("exp_avg", "exp_avg_sq")

Box = tuple[tuple[int, ...], tuple[int, ...]]  # offsets, sizes


@dataclass
class Piece:
    """Values of the box at ``offsets`` (sizes: ``data.shape``) of global tensor ``key`` of ``shape``."""

    key: str
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    data: torch.Tensor


class Reader(Protocol):
    """Boxes of the global tensors of a checkpoint (``loom.train.sharded_checkpoint``)."""

    def shape(self, key: str) -> tuple[int, ...] | None:
        """The global shape of ``key``, or None when the checkpoint has no such tensor."""

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The box ``offsets``/``sizes`` of ``key`` as a new tensor of ``dtype``."""


def model_key(name: str) -> str:
    return f"model/{name}"


def optim_key(name: str, what: str) -> str:
    return f"optim/{name}/{what}"


# ----------------------------------------------------------------------------- geometry


def real_shape(placement: Placement) -> tuple[int, ...]:
    """The shape of this rank's real part (its local tensor without padding rows)."""
    shape = list(placement.full_shape)
    if placement.tp_dim is not None:
        part = placement.part
        shape[placement.tp_dim] = part.stop - part.start
    return tuple(shape)


def to_global(placement: Placement, offsets: tuple[int, ...]) -> tuple[int, ...]:
    """Offsets in this rank's real part -> offsets in the full tensor."""
    if placement.tp_dim is None:
        return offsets
    shifted = list(offsets)
    shifted[placement.tp_dim] += placement.part.start
    return tuple(shifted)


def flat_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[Box]:
    """The boxes covering elements ``[start, stop)`` of a row-major tensor of ``shape``, in order.

    At most a partial first row, a run of whole rows and a partial last row per dimension,
    so 2(d - 1) + 1 boxes for d dimensions; a 0-d tensor is one empty box.
    """
    if start >= stop:
        return []
    if not shape:
        return [((), ())]
    if len(shape) == 1:
        return [((start,), (stop - start,))]
    inner = math.prod(shape[1:])
    boxes: list[Box] = []
    row, col = divmod(start, inner)
    if col or stop < (row + 1) * inner:  # a partial first row
        end = min(stop, (row + 1) * inner)
        boxes += [((row, *o), (1, *s)) for o, s in flat_boxes(shape[1:], col, end - row * inner)]
        if end == stop:
            return boxes
        row += 1
    whole = (stop - row * inner) // inner
    if whole:
        boxes.append(((row, *(0,) * (len(shape) - 1)), (whole, *shape[1:])))
        row += whole
    if stop > row * inner:  # a partial last row
        boxes += [((row, *o), (1, *s)) for o, s in flat_boxes(shape[1:], 0, stop - row * inner)]
    return boxes


def coverage(shape: tuple[int, ...], boxes: list[Box]) -> str | None:
    """None when ``boxes`` cover a tensor of ``shape`` exactly once, else what is wrong.

    Boxes must lie inside the tensor, and their sizes must add up to its element count; with
    the writers' disjointness (module docstring) that is an exact cover.
    """
    total = 0
    for offsets, sizes in boxes:
        if len(offsets) != len(shape) or any(o < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape)):
            return f"a piece at {offsets} of {sizes} lies outside the shape {shape}"
        total += math.prod(sizes)
    want = math.prod(shape)
    return None if total == want else f"its pieces hold {total} elements of {want}"


# ----------------------------------------------------------------------------- the plain path


def spread(sizes: list[int], n: int) -> list[int]:
    """Which of ``n`` writers writes each item: largest first, each to the least loaded so far
    (ties to the lowest rank), so every replica computes the same answer and the bytes
    written per rank are within one item of even."""
    load = [0] * n
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owner[i] = min(range(n), key=lambda r: (load[r], r))
        load[owner[i]] += sizes[i]
    return owner


def plain_pieces(placements: Placements, optim_state: dict[str, dict], dp_rank: int, dp_size: int) -> list[Piece]:
    """What this rank writes without ZeRO: its parameters' real parts and their AdamW state
    (``optim_state``: name -> torch AdamW's per-parameter entry), replicas spread over dp."""
    counted = [(name, param, place) for name, param, place in placements.named() if place.counted]
    writer = spread([math.prod(real_shape(place)) for _, _, place in counted], dp_size)
    pieces = []
    for (name, param, place), rank in zip(counted, writer):
        if rank != dp_rank:
            continue
        offsets = to_global(place, (0,) * len(place.full_shape))
        pieces.append(Piece(model_key(name), place.full_shape, offsets, place.real(param.detach())))
        entry = optim_state.get(name, {})
        for what in MOMENTS:
            if what in entry:
                pieces.append(Piece(optim_key(name, what), place.full_shape, offsets, place.real(entry[what])))
        if "step" in entry and not any(offsets):
            pieces.append(Piece(optim_key(name, "step"), (), (), entry["step"].detach().float().reshape(())))
    return pieces


def check_shape(reader: Reader, name: str, placement: Placement) -> None:
    """ValueError unless the checkpoint holds parameter ``name`` at the shape this model has."""
    saved = reader.shape(model_key(name))
    if saved is None:
        raise ValueError(f"it has no {name!r}")
    if tuple(saved) != tuple(placement.full_shape):
        raise ValueError(f"{name!r} is {tuple(saved)} there, {tuple(placement.full_shape)} here")


@torch.no_grad()
def load_plain(placements: Placements, optimizer: torch.optim.Optimizer, reader: Reader) -> None:
    """Fill this rank's parameters and AdamW state with the boxes it holds (ValueError: the
    checkpoint is of another model). A parameter whose moments the checkpoint lacks (saved
    before its first update) starts with none, as a fresh optimizer."""
    for name, _, place in placements.named():
        check_shape(reader, name, place)
    index_of = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    state = {}
    for name, param, place in placements.named():
        offsets = to_global(place, (0,) * len(place.full_shape))
        sizes = real_shape(place)
        param.zero_()  # padding rows stay zero
        place.real(param).copy_(reader.read(model_key(name), offsets, sizes, param.dtype))
        if id(param) not in index_of or reader.shape(optim_key(name, MOMENTS[0])) is None:
            continue
        entry = {"step": reader.read(optim_key(name, "step"), (), (), torch.float32)}
        for what in MOMENTS:
            value = torch.zeros_like(param)
            place.real(value).copy_(reader.read(optim_key(name, what), offsets, sizes, param.dtype))
            entry[what] = value
        state[index_of[id(param)]] = entry
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------- 1-bit Adam's buffers

ONEBIT_DTYPES = {"last_signs": torch.uint8}  # the rest are fp32


def onebit_key(kind: str, places: Sequence[tuple[int, int]], what: str) -> str:
    """The key of one rank's 1-bit Adam buffer ``what``: per-rank state (error feedback), not a slice
    of a global tensor, so it is named by the layout that wrote it (``kind``: "plain" or "zero";
    ``places``: (rank, size) in dp, tp and pp) and only that layout reads it back."""
    layout = ".".join(f"{name}{size}" for name, (_, size) in zip(("dp", "tp", "pp"), places, strict=True))
    return f"onebit/{kind}.{layout}/{'.'.join(str(rank) for rank, _ in places)}/{what}"


def onebit_pieces(kind: str, places: Sequence[tuple[int, int]], state: dict[str, torch.Tensor]) -> list[Piece]:
    """This rank's 1-bit Adam buffers as whole-tensor pieces (each written by this rank alone)."""
    return [Piece(onebit_key(kind, places, what), tuple(t.shape), (0,) * t.dim(), t) for what, t in state.items()]


def read_onebit(reader: Reader, kind: str, places: Sequence[tuple[int, int]], names: Sequence[str]) -> dict | None:
    """The buffers :func:`onebit_pieces` wrote for this rank in this layout; None when the checkpoint
    has none (another layout, or saved before the compressed phase)."""
    out = {}
    for what in names:
        key = onebit_key(kind, places, what)
        shape = reader.shape(key)
        if shape is None:
            return None
        out[what] = reader.read(key, (0,) * len(shape), shape, ONEBIT_DTYPES.get(what, torch.float32))
    return out
