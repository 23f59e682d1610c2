"""AdamW with the usual split: weight decay on matrices, none on norms, biases and gains."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class AdamWSettings(Protocol):
    """The hyper-parameters AdamW takes (``loom.config.TrainConfig`` is one)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


def build_adamw(model: nn.Module, cfg: AdamWSettings, device: torch.device) -> torch.optim.AdamW:
    """torch's AdamW, fused where the device supports it (CUDA, CPU in torch >= 2.4)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=device.type in ("cuda", "cpu")
    )
