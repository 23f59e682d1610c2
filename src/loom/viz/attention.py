"""Block-sparse attention layouts drawn as matrices: one panel per head, query blocks down,
key blocks across, a kept block dark. The title carries the density against a dense causal
layout (the work the kernel does relative to dense attention)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MAX_PANELS = 8


def causal_density(layout: torch.Tensor) -> float:
    """Kept blocks over the blocks of a dense causal layout (the lower triangle and diagonal)."""
    n = layout.shape[-1]
    return layout.bool().sum().item() / (layout.shape[0] * n * (n + 1) / 2)


def draw_layout(layout: torch.Tensor, out: Path, title: str) -> Path:
    """Draw the first ``MAX_PANELS`` heads of ``layout`` (heads, blocks, blocks) to the PNG ``out``."""
    heads = min(layout.shape[0], MAX_PANELS)
    cols = min(heads, 4)
    rows = math.ceil(heads / cols)
    fig = Figure(figsize=(3.2 * cols, 3.2 * rows + 0.6))
    FigureCanvasAgg(fig)
    for h in range(heads):
        ax = fig.add_subplot(rows, cols, h + 1)
        ax.imshow(layout[h].float().numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"head {h}: {causal_density(layout[h : h + 1]):.1%}", fontsize=9)
        ax.set_xlabel("key block", fontsize=8)
        ax.set_ylabel("query block", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
