"""Every rank's figures in rank 0's records: ``<key>_max`` and ``<key>_sum`` over the world.

Each record of ``metrics.jsonl`` gives, beside rank 0's own communication and memory figures
(:data:`RANK_FIGURES`), their maximum and sum over every rank, so one file tells the run. They
travel in small all-gathers, never waited for at once: :class:`RankFigures` keeps a batch of
records, launches one gather for the whole batch once it holds ``every`` records, and waits for it
when the next batch is launched (by then it has long finished) or at :meth:`RankFigures.flush`
(before a checkpoint, at the loop's end). So a record is written at most ``2 * every`` steps late.

``every`` is sized to about :data:`BATCH_S` seconds of steps: after each gather, every rank sets it
to ``BATCH_S / s`` (between 1 and :data:`MAX_BATCH`), ``s`` the slowest ``step_s`` the gather
brought, of any rank and record. The gathered figures are the same on every rank, so every rank
picks the same ``every`` and the gathers match without a word between them. A gather a step cost
`loom train` about 3% of its time on 4 gloo ranks sharing 2 cores (`bench/ddp.py`'s job, 86 ms
steps; 0.4 ms a step on 2 ranks); one per second costs a tenth of that. Steps slower than
``BATCH_S`` gather every step, as the batch only saves a cost that such steps dwarf.

A gather's ledger entry leaves the pending list when the backend completes it
(``Handle.settle_on_completion``): a watchdog never takes a finished gather for a stuck one.
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
BATCH_S = 1.0  # seconds of steps whose records share one gather
MAX_BATCH = 64  # records per gather at most
_COLUMNS = (*RANK_FIGURES, "step_s")  # what a record sends: its figures, and its step time to size the batches


class RankFigures:
    """Completes each step's record with the figures over ``world``, then hands it to ``write``
    (rank 0's metrics writer; None on the other ranks, which only take part in the gathers).

    Every rank must call :meth:`add` once per step and :meth:`flush` at the same points.
    """

    def __init__(self, world: Comm, write: Callable[[dict], None] | None) -> None:
        self.world, self.write = world, write
        self.every = 1  # records per gather: the first alone, then BATCH_S of steps (see the module)
        self.gathers = 0  # gathers launched (for tests and reports)
        self._batch: list[dict] = []  # records not yet sent
        self._flight: tuple[list[dict], Handle, torch.Tensor] | None = None  # records whose gather is out

    def add(self, record: dict) -> None:
        """Take a step's record, complete but for the figures over ranks. Once ``every`` records
        wait, the previous gather's records are completed and written, and these go out.
        In one process the record is written at once."""
        if self.world.size == 1:
            self._write(record)
            return
        self._batch.append(record)
        if len(self._batch) >= self.every:
            self._land()
            self._launch()

    def flush(self) -> None:
        """Complete and write every record taken so far (every rank calls this at the same point)."""
        self._land()
        if self._batch:
            self._launch()
            self._land()

    def abandon(self) -> None:
        """After a failure: write the records not yet written with this rank's figures alone,
        without waiting (a peer may be gone)."""
        records = (self._flight[0] if self._flight is not None else []) + self._batch
        self._flight, self._batch = None, []
        for record in records:
            self._write(record)

    def _launch(self) -> None:
        records, self._batch = self._batch, []
        mine = torch.tensor(
            [[float(record.get(key) or 0) for key in _COLUMNS] for record in records], dtype=torch.float64
        )
        gathered = torch.empty(self.world.size * mine.numel(), dtype=torch.float64)
        handle = self.world.all_gather(gathered, mine.view(-1), async_op=True, tag="metrics")
        self._flight = (records, handle.settle_on_completion(), gathered)
        self.gathers += 1

    def _land(self) -> None:
        """Wait for the gather in flight, if any, write its records and size the next batches."""
        if self._flight is None:
            return
        records, handle, gathered = self._flight
        self._flight = None
        handle.wait()
        # as Python numbers: a tensor op and .item() per key and figure cost 0.15 ms a step (measured)
        by_rank = gathered.view(self.world.size, len(records), len(_COLUMNS)).tolist()
        for r, record in enumerate(records):
            for i, key in enumerate(RANK_FIGURES):
                if key in record:
                    column = [figures[r][i] for figures in by_rank]
                    record[f"{key}_max"] = _plain_number(max(column))
                    record[f"{key}_sum"] = _plain_number(math.fsum(column))
            self._write(record)
        slowest = max(figures[r][-1] for figures in by_rank for r in range(len(records)))
        self.every = max(1, min(MAX_BATCH, int(BATCH_S / slowest))) if slowest > 0 else 1

    def _write(self, record: dict) -> None:
        if self.write is not None:
            self.write(record)


def _plain_number(value: float) -> int | float:
    return int(value) if value.is_integer() else value
