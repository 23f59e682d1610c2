"""The process layout: which ranks share which group.

Every group is cut from one grid, ``arange(world).view(pp, dp, tp)``: tp innermost
(adjacent ranks, the fastest links), then dp, then pp. A rank's coordinate is its
index in that grid; its dp group is the ranks that differ from it only in the dp
coordinate, and so on. ``ParallelDims`` is pure arithmetic: it is validated before any
process starts, so a bad layout is a message, not a hang.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

from loom.errors import LoomError

DIM_ORDER = ("pp", "dp", "tp")  # outermost to innermost


class LayoutRequest(Protocol):
    """The sizes a run asks for (``loom.config.ParallelConfig`` is one): dp may be left to derive."""

    dp: int | None
    tp: int
    pp: int


class Coords(NamedTuple):
    pp: int
    dp: int
    tp: int


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the three parallel dimensions; ``dp * tp * pp == world_size``."""

    dp: int = 1
    tp: int = 1
    pp: int = 1

    @classmethod
    def resolve(cls, cfg: LayoutRequest, world_size: int) -> ParallelDims:
        """Dims from the config for ``world_size`` ranks, deriving dp when it is not set."""
        if world_size < 1:
            raise LoomError(f"the world size is {world_size}.", "start at least one process (--nproc 1 or more).")
        for name in ("tp", "pp"):
            if getattr(cfg, name) < 1:
                raise LoomError(
                    f"parallel.{name} = {getattr(cfg, name)} must be at least 1.", f"set parallel.{name} to 1 or more."
                )
        model_parallel = cfg.tp * cfg.pp
        dp = cfg.dp
        if dp is None:
            if world_size % model_parallel:
                raise LoomError(
                    f"{world_size} processes cannot be split into groups of parallel.tp x parallel.pp = "
                    f"{cfg.tp} x {cfg.pp} = {model_parallel}.",
                    f"start a multiple of {model_parallel} processes, or change parallel.tp / parallel.pp.",
                )
            dp = world_size // model_parallel
        if dp < 1:
            raise LoomError(f"parallel.dp = {dp} must be at least 1.", "set parallel.dp to 1 or more, or leave it out.")
        if dp * model_parallel != world_size:
            raise LoomError(
                f"parallel.dp x parallel.tp x parallel.pp = {dp} x {cfg.tp} x {cfg.pp} = {dp * model_parallel}, "
                f"but there are {world_size} processes.",
                f"make the product equal {world_size} (leave parallel.dp out to derive it), or start "
                f"{dp * model_parallel} processes.",
            )
        return cls(dp=dp, tp=cfg.tp, pp=cfg.pp)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def sizes(self) -> tuple[int, int, int]:
        """Grid shape in DIM_ORDER (pp, dp, tp)."""
        return (self.pp, self.dp, self.tp)

    def coords(self, rank: int) -> Coords:
        """(pp, dp, tp) coordinate of ``rank``: rank = (pp * dp_size + dp) * tp_size + tp."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        return Coords(pp=rank // (self.dp * self.tp), dp=(rank // self.tp) % self.dp, tp=rank % self.tp)

    def rank_of(self, coords: Coords) -> int:
        return (coords.pp * self.dp + coords.dp) * self.tp + coords.tp

    def group_ranks(self, dim: str, rank: int) -> list[int]:
        """Ranks sharing ``rank``'s ``dim`` group (those differing only in that coordinate)."""
        here = self.coords(rank)
        size = getattr(self, dim)
        return [self.rank_of(here._replace(**{dim: i})) for i in range(size)]

    def all_groups(self, dim: str) -> list[list[int]]:
        """Every ``dim`` group, each as its list of ranks; together they cover the world once."""
        seen: dict[int, list[int]] = {}
        for rank in range(self.world_size):
            group = self.group_ranks(dim, rank)
            seen.setdefault(group[0], group)
        return list(seen.values())

    def describe(self) -> str:
        return f"dp={self.dp} x tp={self.tp} x pp={self.pp} = {self.world_size} ranks"
