"""Vocabulary parallelism: the embedding and the cross-entropy split by vocabulary across tp.

The vocabulary ``V`` is padded to ``P = padded_vocab(V, t)``, the smallest multiple of
``t``, and rank ``r`` owns the padded ids ``[r P/t, (r+1) P/t)``. Padding sits at the
end, so only the last ranks hold padded rows; they are zero, never looked up, and their
logit columns are masked to -inf in the loss, so every result equals the unpadded one.

Embedding: each rank looks up the ids it owns (others give zero rows) and the partial
embeddings are summed by ``TensorParallel.exit`` (all-reduce, or reduce-scatter along the
sequence under SP). Cross-entropy: the logits stay split by vocabulary; per position the
max is all-reduced over tp, then the sum of exp and the target's logit together (2
all-reduces, of N and 2N fp32 values, N the number of positions), so the full (N, V)
logits never exist on a rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.parallel.placement import split
from loom.parallel.tensor import TensorParallel, shard_range

IGNORE_INDEX = -100


def padded_vocab(vocab_size: int, tp_size: int) -> int:
    """The smallest multiple of ``tp_size`` that is >= ``vocab_size``."""
    if vocab_size < 1 or tp_size < 1:
        raise ValueError(f"vocab_size and tp_size must be positive, got {vocab_size} and {tp_size}")
    return -(-vocab_size // tp_size) * tp_size


class VocabParallelEmbedding(nn.Module):
    """Token ids -> embeddings with the (padded) vocabulary split by rows across tp.

    Output: replicated (b, s, h) without SP, this rank's (b, s/t, h) slice with SP.

    Placement: split by rows over tp (``placement["weight"]``), ``part`` the real ids
    ``[vocab_start, vocab_end)`` this rank owns, the first ``vocab_end - vocab_start`` rows
    of ``weight``; the ``pad_rows`` rows after them are padding, zeroed here and left zero
    (layout-independent init fills only the real rows, :func:`loom.model.init.init_parameter`).
    """

    def __init__(self, vocab_size: int, dim: int, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.padded_size = padded_vocab(vocab_size, tp.size)
        owned = shard_range(self.padded_size, tp.size, tp.rank)
        self.vocab_start = owned.start  # global id of local row 0 (also the first local logit column)
        self.vocab_end = max(owned.start, min(owned.stop, vocab_size))  # end of the real ids owned
        self.local_size = owned.stop - owned.start
        self.pad_rows = owned.stop - self.vocab_end
        self.weight = nn.Parameter(torch.empty(self.local_size, dim))
        with torch.no_grad():
            self.weight[self.local_size - self.pad_rows :].zero_()
        self.placement = {"weight": split((vocab_size, dim), 0, owned, self.local_size, tp.rank)}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_start + self.local_size)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.exit(partial)

    def extra_repr(self) -> str:
        return (
            f"vocab={self.vocab_size} (padded {self.padded_size}), rows [{self.vocab_start}, "
            f"{self.vocab_start + self.local_size}) of which {self.pad_rows} padding, dim={self.weight.shape[1]}"
        )


def padded_columns(n_local: int, vocab_start: int, vocab_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Bool (n_local,): which local logit columns are padding (global index >= vocab_size)."""
    return torch.arange(vocab_start, vocab_start + n_local, device=device) >= vocab_size


def mask_padded_logits(logits_local: torch.Tensor, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """``logits_local`` (..., V_local) with padded columns set to -inf (out of place)."""
    pad = padded_columns(logits_local.shape[-1], vocab_start, vocab_size, logits_local.device)
    return logits_local.masked_fill(pad, float("-inf"))


def gather_vocab_logits(logits_local: torch.Tensor, tp: TensorParallel, vocab_size: int) -> torch.Tensor:
    """Full (..., vocab_size) logits on every rank from each rank's vocab shard (for generation).

    One all-gather of the padded logits over tp (tag "tp-logits"); padding is dropped.
    Not differentiable: training uses :func:`vocab_parallel_cross_entropy`.
    """
    if tp.size == 1:
        return logits_local[..., :vocab_size]
    local = logits_local.detach().contiguous()
    out = torch.empty((tp.size, *local.shape), dtype=local.dtype, device=local.device)
    tp.comm.all_gather(out.view(-1), local.view(-1), tag="tp-logits")
    return torch.cat(out.unbind(0), dim=-1)[..., :vocab_size]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """loss = mean over valid positions of log(sum_v exp(z_v)) - z_target, z split by vocab.

    One collective: each rank r finds per position its local max m_r, its local sum
    s_r = sum exp(z - m_r) and its part of the target logit t_r (0 unless it owns the
    target), and one all-gather hands every rank all (m_r, s_r, t_r). Then with M = max_r m_r:
    sum_v exp(z_v - M) = sum_r s_r exp(m_r - M), and the target logit is sum_r t_r. The
    softmax's local slice is exp(z - m_r) * exp(m_r - M) / S; backward is local:
    dz = (softmax - onehot) * grad / N_valid.
    """

    @staticmethod
    def forward(
        ctx,
        logits_local: torch.Tensor,
        targets: torch.Tensor,
        tp: TensorParallel,
        vocab_start: int,
        vocab_size: int,
        ignore_index: int,
    ) -> torch.Tensor:
        n_local = logits_local.shape[-1]
        z = logits_local.detach().reshape(-1, n_local).float()
        if vocab_start + n_local > vocab_size:  # this shard holds padding
            z = z.masked_fill(padded_columns(n_local, vocab_start, vocab_size, z.device), float("-inf"))
        t = targets.reshape(-1)
        if t.shape[0] != z.shape[0]:
            raise ValueError(f"{t.shape[0]} targets for {z.shape[0]} positions of logits")
        comm, n = tp.comm, z.shape[0]

        local = torch.empty((3, n), dtype=z.dtype, device=z.device)  # rows: max, sum of exp, target logit
        torch.amax(z, dim=-1, out=local[0])
        local[0].masked_fill_(torch.isinf(local[0]), 0.0)  # a shard of padding only: any finite shift
        exp = torch.exp(z - local[0].unsqueeze(-1))  # padded columns: exp(-inf) = 0
        torch.sum(exp, dim=-1, out=local[1])
        valid = t != ignore_index
        local_t = t - vocab_start
        owned = valid & (local_t >= 0) & (local_t < n_local)
        index = local_t.masked_fill(~owned, 0).unsqueeze(-1)
        torch.gather(z, -1, index, out=local[2].unsqueeze(-1))
        local[2].masked_fill_(~owned, 0.0)
        if comm.size == 1:
            every = local.unsqueeze(0)
        else:
            every = torch.empty((comm.size, 3, n), dtype=z.dtype, device=z.device)
            comm.all_gather(every.view(-1), local.view(-1), tag="tp-ce")
        zmax = every[:, 0].amax(dim=0)
        sum_exp = (every[:, 1] * torch.exp(every[:, 0] - zmax)).sum(dim=0)
        target_z = every[:, 2].sum(dim=0)

        n_valid = valid.sum()
        per_position = (torch.log(sum_exp) + zmax - target_z).masked_fill(~valid, 0.0)
        loss = per_position.sum() / n_valid

        exp.mul_((torch.exp(local[0] - zmax) / sum_exp).unsqueeze(-1))  # now the local slice of the softmax
        ctx.save_for_backward(exp, index, owned, valid, n_valid)
        ctx.logits_shape, ctx.logits_dtype = logits_local.shape, logits_local.dtype
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.used:  # the saved softmax became the gradient in place (no (N, V_local) copy)
            raise RuntimeError("vocab_parallel_cross_entropy supports one backward per forward")
        ctx.used = True
        softmax, index, owned, valid, n_valid = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, index, -owned.to(grad.dtype).unsqueeze(-1))
        grad.mul_((valid.to(grad.dtype) * (grad_out.float() / n_valid)).unsqueeze(-1))
        return grad.view(ctx.logits_shape).to(ctx.logits_dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits_local: torch.Tensor,
    targets: torch.Tensor,
    tp: TensorParallel,
    vocab_start: int,
    vocab_size: int,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean cross-entropy (fp32) of logits split by vocabulary across ``tp``.

    ``logits_local`` (..., V_local): columns [vocab_start, vocab_start + V_local) of the
    logits over the padded vocabulary; columns >= ``vocab_size`` are padding and ignored.
    ``targets`` (...): ids < ``vocab_size``; ``ignore_index`` ones are left out of the mean.
    Sends one all-gather over ``tp.comm`` (tag "tp-ce") of 3N fp32 values per rank,
    N = targets.numel() (one blocking call where max-then-sum needs two; the bytes, (t-1) 3N
    values per rank, equal two all-reduces' at t = 2 and are small next to a layer's b*s*h);
    backward sends nothing. With ``tp.size == 1`` it equals ``F.cross_entropy``.
    """
    return _VocabParallelCrossEntropy.apply(logits_local, targets, tp, vocab_start, vocab_size, ignore_index)
