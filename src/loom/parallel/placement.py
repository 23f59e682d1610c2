"""Where each parameter lives: one record per parameter, read by everything that must know.

Invariant: a parameter's :class:`Placement` says, for this rank, everything that differs
between its local tensor and the parameter of the single-process model:

- ``full_shape``: the single-process (unpadded) shape;
- tensor parallelism: ``tp_dim`` is the dimension split over the tp group (0 rows, 1
  columns; None when every tp rank holds the whole tensor), ``part`` the real slice of
  ``full_shape[tp_dim]`` this rank holds, and ``pad`` the padding rows after them (a
  vocabulary padded to a multiple of tp: zero, never looked up, masked in the loss);
- replication: ``replicas`` consecutive tp ranks hold the same values (tp rank r is in
  replica group r // replicas): 1 for a plain split, the whole group for an unsplit
  tensor, t / n_kv_heads for a K/V head shared by several ranks. The first of them is the
  ``owner``, whose copy counts once in the gradient norm and in a gathered full tensor;
- ``sequence_parallel``: an unsplit tensor fed this rank's slice of the sequence (norms,
  row-parallel biases, learned positions under SP);
- pipeline: ``tied`` when another stage holds the same parameter (the tied embedding on
  the first and the last stage); only the first stage's copy (``pp_owner``) counts.

A replica's gradient is *partial* (:attr:`Placement.partial_grad`) when the replicas saw
different data: under SP each saw 1/t of the tokens, and a shared K/V head served other
query heads on each rank. Partial gradients are summed over their replica group after
backward (:func:`loom.parallel.grads.sum_partial_grads`); the others are equal on every replica.

The layer that creates a parameter declares its record (``module.placement[name]``);
:meth:`Placements.of_model` collects every record of a model once, by parameter name, and
fails on a parameter nobody declared. Init, the gradient sums and norm, full-state
gathering for checkpoints, ZeRO and the pipeline read the collected records, and nothing else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Placement:
    """One parameter on this rank (see the module docstring for each field)."""

    full_shape: tuple[int, ...]
    tp_dim: int | None = None
    part: slice = field(default_factory=lambda: slice(None))
    pad: int = 0
    replicas: int = 1
    owner: bool = True
    sequence_parallel: bool = False
    tied: bool = False
    pp_owner: bool = True

    @property
    def replica_class(self) -> str:
        """Parameters of one class are held alike by the same tp ranks (``replicas`` consecutive
        ones): what must be compressed apart to stay equal there (``loom.distributed.compressed``)."""
        return f"tp-replicas-{self.replicas}"

    @property
    def rows(self) -> slice:
        """The rows of the full tensor this rank holds (all of them unless split by rows)."""
        return self.part if self.tp_dim == 0 else slice(None)

    @property
    def cols(self) -> slice:
        """The columns of the full tensor this rank holds (all of them unless split by columns)."""
        return self.part if self.tp_dim == 1 else slice(None)

    @property
    def partial_grad(self) -> bool:
        """Whether the replicas' gradients must be summed over the replica group."""
        return self.sequence_parallel or (self.tp_dim is not None and self.replicas > 1)

    @property
    def counted(self) -> bool:
        """Whether this copy counts in a global quantity (the gradient norm): once per model."""
        return self.owner and self.pp_owner

    def real(self, local: torch.Tensor) -> torch.Tensor:
        """``local`` without its padding rows."""
        return local[: local.shape[0] - self.pad] if self.pad else local

    def index(self, full: torch.Tensor) -> torch.Tensor:
        """The view of ``full`` (full shape) that this rank's real part is."""
        return full[self.rows][..., self.cols] if self.tp_dim == 1 else full[self.rows]


def split(full_shape: tuple[int, ...], dim: int, part: slice, local: int, tp_rank: int, replicas: int = 1) -> Placement:
    """A tensor split over tp along ``dim``: this rank holds ``part`` of it in ``local`` rows or
    columns; positions past ``full_shape[dim]`` are padding (rows only). ``replicas`` > 1: that
    many consecutive tp ranks hold the same part (a shared K/V head), the first owning it."""
    start, stop = part.start or 0, part.stop if part.stop is not None else full_shape[dim]
    real = slice(min(start, full_shape[dim]), max(min(start, full_shape[dim]), min(stop, full_shape[dim])))
    pad = local - (real.stop - real.start)
    if pad < 0 or (pad and dim != 0):
        raise ValueError(f"{local} local entries cannot hold part {part} of a dimension of {full_shape[dim]}")
    return Placement(tuple(full_shape), dim, real, pad, replicas, owner=tp_rank % replicas == 0)


def replicated(shape: tuple[int, ...], tp_size: int, tp_rank: int, sequence_parallel: bool = False) -> Placement:
    """A tensor every tp rank holds whole; tp rank 0's copy counts. ``sequence_parallel``: fed this
    rank's sequence slice, so the copies' gradients are partial."""
    return Placement(tuple(shape), replicas=tp_size, owner=tp_rank == 0, sequence_parallel=sequence_parallel)


def declare_replicated(module: nn.Module, tp_size: int, tp_rank: int, sequence_parallel: bool = False) -> nn.Module:
    """Declare every direct parameter of ``module`` replicated over tp; returns ``module``."""
    module.placement = {
        name: replicated(p.shape, tp_size, tp_rank, sequence_parallel)
        for name, p in module.named_parameters(recurse=False)
    }
    return module


class Placements(Mapping[str, Placement]):
    """Every parameter of one rank's model by name, with its record: collected once."""

    def __init__(self, records: dict[str, Placement], params: dict[str, nn.Parameter]) -> None:
        self._records = records
        self._params = params
        self._by_id = {id(p): name for name, p in params.items()}

    @classmethod
    def of_model(cls, model: nn.Module) -> Placements:
        """The records the model's layers declared, keyed by parameter name (a shared parameter
        once, under its first name, as ``named_parameters`` lists it)."""
        records, params = {}, dict(model.named_parameters())
        for prefix, module in model.named_modules():
            for name, record in getattr(module, "placement", {}).items():
                full = f"{prefix}.{name}" if prefix else name
                if full in params:
                    records[full] = record
        missing = [name for name in params if name not in records]
        if missing:
            raise ValueError(
                f"parameters without a placement record: {', '.join(missing)}; the layer that "
                "creates a parameter declares it (loom.parallel.placement)"
            )
        return cls(records, params)

    def __getitem__(self, name: str) -> Placement:
        return self._records[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def of(self, param: torch.Tensor) -> Placement:
        """The record of ``param`` (by identity)."""
        return self._records[self._by_id[id(param)]]

    def name_of(self, param: torch.Tensor) -> str:
        return self._by_id[id(param)]

    def param(self, name: str) -> nn.Parameter:
        return self._params[name]

    def named(self) -> Iterator[tuple[str, nn.Parameter, Placement]]:
        """(name, parameter, record) in the model's parameter order."""
        for name, param in self._params.items():
            yield name, param, self._records[name]

    def replace(self, name: str, **changes: object) -> None:
        """Change fields of one record (a decision taken after the layer was built)."""
        self._records[name] = dataclasses.replace(self._records[name], **changes)

    def rebind(self, old: nn.Parameter, new: nn.Parameter) -> None:
        """``new`` takes ``old``'s place (a parameter built on the meta device, materialised)."""
        name = self._by_id.pop(id(old))
        self._params[name] = new
        self._by_id[id(new)] = name
