"""Loss curves from a run's metrics.jsonl.

Drawn on a standalone matplotlib ``Figure`` saved through the Agg canvas: no display, no
pyplot global state, so it is safe in tests, on servers and from several threads.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from loom.errors import LoomError
from loom.train.metrics import METRICS_FILE, read_metrics


def plot_loss(run_dir: Path, out: Path | None = None, log_y: bool = False) -> Path:
    """Draw training ``loss`` per step (and ``val_loss`` points) to a PNG; return its path.

    ``out`` defaults to ``RUN_DIR/loss.png``. ``log_y`` uses a log-scale y axis when every
    plotted value is positive (a loss of 0 or below stays on a linear axis).
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if _number(r.get("loss"))]
    val = [(r["step"], r["val_loss"]) for r in records if _number(r.get("val_loss"))]
    if not train and not val:
        raise LoomError(
            f"{run_dir / METRICS_FILE} has no loss to plot (missing, empty, or no 'loss' fields).",
            "pass the folder of a run that has trained at least one step (it writes metrics.jsonl).",
        )
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), linewidth=1.2, label="train loss")
    if val:
        ax.plot(*zip(*val), "o", markersize=4, label="val loss")
    if log_y and not any(v <= 0 for _, v in train + val):  # NaN (divergence) is no obstacle
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"loss: {run_dir.resolve().name}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _number(value: object) -> bool:
    return type(value) in (int, float)
