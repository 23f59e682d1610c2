"""Every rank's figures in rank 0's records: ``<key>_max`` and ``<key>_sum`` over the world.

Each record of ``metrics.jsonl`` gives, beside rank 0's own communication and memory figures
(:data:`RANK_FIGURES`), their maximum and sum over every rank, so one file tells the run. They
travel in one small all-gather a step. Waited for at once, that gather held every rank at the
end of each step until the slowest arrived: on 2 gloo ranks of `bench/ddp.py`'s job, about 2%
of the loop's time. :class:`RankFigures` launches it when a step's record is complete and waits
at the next step's (by then it has long finished), so a record is written one step late, or at
:meth:`RankFigures.flush` (before a checkpoint, at the loop's end). Its ledger entry leaves the
pending list when the backend completes it (``Handle.settle_on_completion``): a watchdog never
takes a finished gather for a stuck one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from loom.distributed.comm import Comm, Handle

# per-rank figures that rank 0's records also give as max and sum over the world's ranks
RANK_FIGURES = (
    "comm_bytes_dp",
    "comm_bytes_tp",
    "comm_bytes_pp",
    "mem_params_bytes",
    "mem_grads_bytes",
    "mem_optim_bytes",
    "mem_activation_bytes",
    "mem_weight_copy_bytes",
    "mem_peak_host_bytes",
    "mem_peak_device_bytes",
)


class RankFigures:
    """Completes each step's record with the figures over ``world``, then hands it to ``write``
    (rank 0's metrics writer; None on the other ranks, which only take part in the gathers)."""

    def __init__(self, world: Comm, write: Callable[[dict], None] | None) -> None:
        self.world, self.write = world, write
        self._pending: tuple[dict, Handle | None, torch.Tensor] | None = None

    def add(self, record: dict) -> None:
        """Take a step's record, complete but for the figures over ranks; the previous step's
        record is completed and written first. In one process the record is written at once."""
        self.flush()
        if self.world.size == 1:
            self._write(record)
            return
        mine = torch.tensor([float(record.get(key) or 0) for key in RANK_FIGURES], dtype=torch.float64)
        every = torch.empty(self.world.size * len(RANK_FIGURES), dtype=torch.float64)
        handle = self.world.all_gather(every, mine, async_op=True, tag="metrics")
        self._pending = (record, handle.settle_on_completion(), every)

    def flush(self) -> None:
        """Wait for the pending record's figures (every rank calls this at the same point) and write it."""
        if self._pending is None:
            return
        record, handle, every = self._pending
        self._pending = None
        handle.wait()
        # as Python numbers: a tensor op and .item() per key and figure cost 0.15 ms a step (measured)
        by_rank = every.view(self.world.size, len(RANK_FIGURES)).tolist()
        for i, key in enumerate(RANK_FIGURES):
            if key in record:
                column = [figures[i] for figures in by_rank]
                record[f"{key}_max"] = _plain_number(max(column))
                record[f"{key}_sum"] = _plain_number(math.fsum(column))
        self._write(record)

    def abandon(self) -> None:
        """After a failure: write the pending record with this rank's figures alone, without
        waiting (a peer may be gone)."""
        if self._pending is not None:
            record, self._pending = self._pending[0], None
            self._write(record)

    def _write(self, record: dict) -> None:
        if self.write is not None:
            self.write(record)


def _plain_number(value: float) -> int | float:
    return int(value) if value.is_integer() else value
