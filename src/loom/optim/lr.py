"""Learning-rate schedule: linear warm-up, then cosine decay to a floor.

lr(s) = base * (s + 1) / warmup                          for s < warmup
lr(s) = floor + (base - floor) * (1 + cos(pi * t)) / 2   after, t = (s - warmup) / (total - warmup)
with floor = base * min_ratio. A pure function of the step, so resuming needs only the step.
"""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    floor = base_lr * min_ratio
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
