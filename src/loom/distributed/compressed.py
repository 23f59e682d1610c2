"""Error-compensated 1-bit all-reduce (Tang et al. 2021, "1-bit Adam"), on the counted collectives.

Every one of the n ranks holds a vector of N values; the result on every rank approximates
their mean, each value sent as one sign bit plus a scale per chunk. The vector is padded to
``P = n x c`` (``c``, the chunk, a multiple of 8 so its signs fill whole bytes). One call:

1. worker compensation: ``y = x + e_w`` (``e_w``: this rank's error left by the last call);
2. compression, per destination chunk j: ``C(y_j) = s_j sign(y_j)`` with the scale
   ``s_j = ||y_j|| / sqrt(c_j)``, ``c_j`` the chunk's real (unpadded) elements (so
   ``||C(y_j)|| = ||y_j||``; padding is zero and decodes as zero); ``e_w <- y - C(y)``;
3. all-to-all: chunk j of every rank goes to rank j, as packed signs (8 per byte) and scales;
4. rank j, the server of chunk j: ``z = mean_i C(y_i)_j + e_s``, compressed again with one
   scale, ``e_s <- z - C(z)``;
5. all-gather of the servers' packed chunks and scales: every rank decodes the whole result.

Bytes each rank sends (what the ledger counts): two messages of ``(n - 1)/n x P/8`` packed
bytes plus ``(n - 1)`` scales each, against ``2 (n - 1)/n x 4P`` for a ring all-reduce of
fp32: about 1/32 (1/16 of 16-bit). Equal magnitudes in a chunk compress exactly; otherwise the
errors carry what each call dropped into the next, so the running mean of the results
converges to the true mean (the error stays bounded, the average error falls as 1/T).
"""

from __future__ import annotations

import math

import torch

from loom.distributed.comm import Comm

_BITS = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Signs of ``x`` (..., 8k) as bits, 8 per byte: (..., k) uint8 (1: x >= 0)."""
    bits = (x >= 0).to(torch.uint8).view(*x.shape[:-1], -1, 8)
    weights = torch.tensor(_BITS, dtype=torch.uint8, device=x.device)
    return (bits * weights).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of :func:`pack_signs`: (..., k) uint8 -> (..., 8k) of +1 and -1."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return (bits.to(dtype) * 2 - 1).view(*packed.shape[:-1], -1)


def _compress(chunks: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``chunks`` (rows, c): the scale ||row|| / sqrt(its real elements) (padding is
    zero and not counted) and the packed signs."""
    scales = chunks.norm(dim=-1) / real.sum(-1).clamp_min(1).sqrt()
    return scales, pack_signs(chunks)


class CompressedAllReduce:
    """The mean over ``comm`` of a vector of ``numel`` values, 1 bit each (module docstring). Holds
    the worker's and the server's error feedback, so one instance serves one vector for a run;
    :meth:`state_dict` / :meth:`load_state_dict` keep the errors across a checkpoint."""

    STATE = ("worker_error", "server_error", "last_signs", "last_scales")

    def __init__(self, numel: int, comm: Comm, device: torch.device | str = "cpu", tag: str = "onebit") -> None:
        self.numel, self.comm, self.tag = numel, comm, tag
        n = comm.size
        self.chunk = 8 * math.ceil(numel / (8 * n))
        self.padded = self.chunk * n
        self.worker_error = torch.zeros(self.padded, dtype=torch.float32, device=device)
        self.server_error = torch.zeros(self.chunk, dtype=torch.float32, device=device)
        # 1 where a position holds one of the numel values, 0 in the padding (decoded as 0)
        self.real = (torch.arange(self.padded, device=device) < numel).float().view(n, self.chunk)
        # the last result as sent: packed signs and the servers' scales (what :meth:`last` decodes)
        self.last_signs = torch.zeros(self.padded // 8, dtype=torch.uint8, device=device)
        self.last_scales = torch.zeros(n, dtype=torch.float32, device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The compressed mean of every rank's ``x`` (``numel`` values), as fp32 of x's shape."""
        n, c = self.comm.size, self.chunk
        y = self.worker_error.clone()
        y[: self.numel] += x.reshape(-1).float()
        rows = y.view(n, c)
        scales, packed = _compress(rows, self.real)
        self.worker_error = y - (unpack_signs(packed) * scales.unsqueeze(-1) * self.real).view(-1)
        # chunk j of every rank to rank j: packed signs and their scales
        got_signs = torch.empty(packed.numel(), dtype=torch.uint8, device=y.device)
        got_scales = torch.empty_like(scales)
        self.comm.all_to_all(got_signs, packed.reshape(-1), tag=self.tag)
        self.comm.all_to_all(got_scales, scales, tag=self.tag)
        mine = self.real[self.comm.rank]
        z = (unpack_signs(got_signs.view(n, c // 8)) * got_scales.unsqueeze(-1)).mean(0) * mine + self.server_error
        server_scale, server_signs = _compress(z.unsqueeze(0), mine.unsqueeze(0))
        self.server_error = z - unpack_signs(server_signs)[0] * server_scale * mine
        # every server's compressed chunk to every rank
        all_signs = torch.empty(n * (c // 8), dtype=torch.uint8, device=y.device)
        all_scales = torch.empty(n, dtype=torch.float32, device=y.device)
        self.comm.all_gather(all_signs, server_signs.reshape(-1), tag=self.tag)
        self.comm.all_gather(all_scales, server_scale.reshape(-1), tag=self.tag)
        self.last_signs, self.last_scales = all_signs, all_scales
        return self.last().view(x.shape)

    def last(self) -> torch.Tensor:
        """The last call's result again (``numel`` fp32 values), decoded from the 1/32-size message
        kept for it: what a caller needs next step without holding a full-precision copy."""
        n, c = self.comm.size, self.chunk
        decoded = unpack_signs(self.last_signs.view(n, c // 8)) * self.last_scales.unsqueeze(-1) * self.real
        return decoded.view(-1)[: self.numel]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The error feedback and the last result (packed): with them a resumed run continues bit
        for bit."""
        return {key: getattr(self, key).clone() for key in self.STATE}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key in (k for k in self.STATE if k in state):
            if state[key].shape != getattr(self, key).shape:
                raise ValueError(
                    f"{key} is {tuple(state[key].shape)} in the checkpoint, {tuple(getattr(self, key).shape)} "
                    "here: the error feedback belongs to one world size"
                )
            getattr(self, key).copy_(state[key])

    def reset(self) -> None:
        """Forget the error feedback (a new layout: the chunks mean other values)."""
        self.worker_error.zero_()
        self.server_error.zero_()
        self.last_signs.zero_()
        self.last_scales.zero_()


class CompressedMeans:
    """One :class:`CompressedAllReduce` per class of values, made at the first call of each.

    Values whose copies must stay equal on several ranks outside ``comm`` (a tensor-parallel
    replica: a norm's weight on every tp rank, a K/V head shared by some) are compressed in a
    vector of their own class, which holds the same values in the same order on each of those
    ranks: the chunks, scales and errors are then equal there too, and so is every decoded
    mean, bit for bit. (In one vector with a rank's own tp shards, each tp rank's chunk scales
    would differ and the replicas drift apart.)

    :meth:`state_dict` names each buffer ``CLASS.BUFFER``; :meth:`load_state_dict` keeps them
    until the class's reducer exists and drops a class whose sizes do not match (another layout).
    """

    def __init__(self, comm: Comm, device: torch.device | str = "cpu", tag: str = "onebit") -> None:
        self.comm, self.device, self.tag = comm, device, tag
        self.reducers: dict[str, CompressedAllReduce] = {}
        self._pending: dict[str, torch.Tensor] = {}

    def reducer(self, key: str, numel: int) -> CompressedAllReduce:
        if key not in self.reducers:
            reducer = CompressedAllReduce(numel, self.comm, self.device, tag=self.tag)
            saved = {
                what: self._pending.pop(f"{key}.{what}") for what in reducer.STATE if f"{key}.{what}" in self._pending
            }
            try:
                reducer.load_state_dict(saved)
            except ValueError:
                reducer.reset()
            self.reducers[key] = reducer
        return self.reducers[key]

    def __call__(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """The compressed mean over ``comm`` of every rank's ``x`` of class ``key``."""
        return self.reducer(key, x.numel())(x)

    @staticmethod
    def names(keys: list[str]) -> list[str]:
        """The buffer names :meth:`state_dict` gives the classes ``keys``."""
        return [f"{key}.{what}" for key in keys for what in CompressedAllReduce.STATE]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{key}.{what}": t for key, r in self.reducers.items() for what, t in r.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        """Buffers saved by :meth:`state_dict` (None: start afresh), taken as each class's reducer is made."""
        self.reducers, self._pending = {}, dict(state or {})

    @property
    def nbytes(self) -> int:
        held = (getattr(r, what) for r in self.reducers.values() for what in r.STATE)
        return sum(t.numel() * t.element_size() for t in held)
