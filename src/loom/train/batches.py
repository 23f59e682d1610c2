"""Batches: which windows of the token stream a step trains on, and who reads which rows.

A step's windows are a pure function of (seed, stream, step), so a resumed run and every
data-parallel layout see exactly the same rows.
"""

from __future__ import annotations

import numpy as np
import torch

from loom.errors import LoomError


def batch_offsets(n_tokens: int, seq_len: int, global_batch: int, seed: int, step: int, stream: int = 0) -> np.ndarray:
    """Start offsets (int64) of the ``global_batch`` windows of ``step``, in ``[0, n_tokens - seq_len - 1]``.

    A pure function of (seed, stream, step): no state is carried between steps, so a
    resumed run draws the same windows. Stream 0 is training, 1 validation.
    """
    _check_length(n_tokens, seq_len)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream, step])))
    return rng.integers(0, n_tokens - seq_len - 1, size=global_batch, endpoint=True, dtype=np.int64)


def batch_rows(micro_batch: int, grad_accum: int, dp_rank: int, micro_step: int) -> slice:
    """Rows of the global batch for micro-batch ``micro_step`` of data-parallel rank ``dp_rank``.

    Rank-major: rank r owns rows ``[r*micro*accum, (r+1)*micro*accum)``, split in order into
    its micro-batches, so every (dp, grad_accum) layout covers the global batch exactly once.
    """
    start = (dp_rank * grad_accum + micro_step) * micro_batch
    return slice(start, start + micro_batch)


def get_batch(
    tokens: np.ndarray, seq_len: int, offsets: np.ndarray, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``x[i] = tokens[o_i : o_i+seq_len]`` and targets ``y[i] = tokens[o_i+1 : o_i+seq_len+1]`` (int64)."""
    _check_length(len(tokens), seq_len)
    index = np.asarray(offsets, dtype=np.int64)[:, None] + np.arange(seq_len + 1)
    windows = torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))
    x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def _check_length(n_tokens: int, seq_len: int) -> None:
    if n_tokens < seq_len + 2:
        raise LoomError(
            f"the token stream has {n_tokens} tokens, too few for windows of train.seq_len = {seq_len} (needs at least {seq_len + 2}).",
            "lower train.seq_len, or use more text: a larger corpus, data.max_bytes=0, or (for the val split) a larger data.val_fraction.",
        )
