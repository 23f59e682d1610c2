"""Mixed-precision AdamW on flat fp32 shards: master weights and moments, one vector each.

ZeRO keeps, per rank, one contiguous fp32 slice of the master weights and of both Adam
moments (K = 12 bytes per parameter; 8 when fp32 parameters are their own master), on the
device or, for ZeRO-Offload, in host memory.
The update is torch's fused AdamW kernel (``torch._fused_adamw_``: one pass over the
shard, bit-identical to ``torch.optim.AdamW(fused=True)``, which the plain path uses),
with the decoupled decay applied first to the ranges that decay; where the kernel is not
available it is torch.optim.AdamW's single-tensor formula (:func:`adamw_update`, the same
in-place ops in the same order, bit-identical to torch's for-loop AdamW)::

    p   <- p * (1 - lr * wd)                          decoupled weight decay
    m   <- lerp(m, g, 1 - beta1)
    v   <- beta2 * v + (1 - beta2) * g * g
    p   <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Weight decay differs by parameter (matrices decay, norms and biases do not), so a shard
carries ``segments``: the ``(start, stop, weight_decay)`` ranges that decay (the rest of
the shard does not). Either way the update is vectorised over the whole shard, whatever
it holds, so it runs as fast on the CPU as memory bandwidth allows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Segment = tuple[int, int, float]
FUSED_DEVICES = ("cpu", "cuda", "mps")  # where torch ships the fused AdamW kernel


def adamw_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    segments: Sequence[Segment],
) -> None:
    """One AdamW step in place on flat fp32 tensors (``step`` counts from 1)."""
    beta1, beta2 = betas
    for start, stop, weight_decay in segments:
        if weight_decay:
            param[start:stop].mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


class FlatAdamW:
    """fp32 master weights and moments of one flat shard, updated from fp32 gradients.

    ``master`` is taken as is (its device is where the optimizer lives: the compute device,
    or the CPU for offload); ``segments`` name the ranges that decay and by how much.
    ``holds_master=False``: ``master`` is the fp32 parameters' own storage (fp32 training
    needs no second copy), so the optimizer's state is the moments alone, K = 8 bytes.
    """

    def __init__(
        self,
        master: torch.Tensor,
        segments: Sequence[Segment],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        holds_master: bool = True,
    ) -> None:
        if master.dtype != torch.float32 or master.dim() != 1:
            raise ValueError(f"master weights must be a flat fp32 tensor, got {master.dtype} {tuple(master.shape)}")
        self.master = master
        self.holds_master = holds_master
        self.exp_avg = torch.zeros_like(master)
        self.exp_avg_sq = torch.zeros_like(master)
        self.segments = list(segments)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.step_count = 0
        self.fused = master.device.type in FUSED_DEVICES and hasattr(torch, "_fused_adamw_")
        self._step_tensor = torch.zeros((), dtype=torch.float32, device=master.device)

    def step(self, grad: torch.Tensor, lr: float | None = None) -> None:
        """Update the master weights from ``grad`` (fp32, same length, on the same device)."""
        self.step_count += 1
        lr = self.lr if lr is None else lr
        if not self.fused:
            adamw_update(
                self.master,
                grad,
                self.exp_avg,
                self.exp_avg_sq,
                self.step_count,
                lr,
                self.betas,
                self.eps,
                self.segments,
            )
            return
        for start, stop, weight_decay in self.segments:  # the kernel's own decay is one value for all
            if weight_decay:
                self.master[start:stop].mul_(1 - lr * weight_decay)
        self._step_tensor.fill_(self.step_count)
        torch._fused_adamw_(
            [self.master],
            [grad],
            [self.exp_avg],
            [self.exp_avg_sq],
            [],
            [self._step_tensor],
            lr=lr,
            beta1=self.betas[0],
            beta2=self.betas[1],
            weight_decay=0.0,
            eps=self.eps,
            amsgrad=False,
            maximize=False,
        )

    @property
    def bytes_per_element(self) -> int:
        """K: 12 (master weights and both moments), or 8 when the master is the parameters."""
        return 12 if self.holds_master else 8

    @property
    def nbytes(self) -> int:
        """Bytes this optimizer holds: K per element of its shard."""
        held = (self.master, self.exp_avg, self.exp_avg_sq) if self.holds_master else (self.exp_avg, self.exp_avg_sq)
        return sum(t.numel() * t.element_size() for t in held)

    def state_dict(self) -> dict:
        return {
            "step": self.step_count,
            "master": self.master.clone(),
            "exp_avg": self.exp_avg.clone(),
            "exp_avg_sq": self.exp_avg_sq.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("master", "exp_avg", "exp_avg_sq"):
            value = state[key]
            if value.shape != self.master.shape:
                raise ValueError(f"{key} has shape {tuple(value.shape)}, this shard holds {tuple(self.master.shape)}")
            getattr(self, key).copy_(value)
        self.step_count = int(state["step"])
