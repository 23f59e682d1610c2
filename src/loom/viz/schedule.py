"""Pipeline timelines drawn like the schedule figures of the Megatron-LM paper.

One row per device, time to the right. Forward blue, backward green; a split backward is
purple (input gradient, I) then orange (weight gradient, W). The micro-batch number sits
in each block; with virtual chunks, later chunks are lighter shades of the same colour.
Idle time is the grey row background showing between blocks. The title carries the
bubble fraction and each device's peak number of activations held.
"""

from __future__ import annotations

from pathlib import Path
from statistics import median

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from loom.parallel.pipeline.simulate import Timeline

KIND_COLOURS = {"F": "#2f6db5", "B": "#3f9b45", "I": "#8559b0", "W": "#e8862a"}
KIND_NAMES = {"F": "forward", "B": "backward", "I": "input grad (I)", "W": "weight grad (W)"}
IDLE_COLOUR = "#e6e6e6"
ROW_HEIGHT = 0.8  # of one row's unit height
MARGIN_IN = 1.9  # left + right margin of the axes, inches


def draw_timeline(timeline: Timeline, out: Path, title: str | None = None) -> Path:
    """Draw ``timeline`` to the PNG ``out`` and return its path.

    The figure grows with the makespan (about a third of an inch per forward) so blocks
    stay readable, capped at 60 inches wide.
    """
    p, vp = timeline.pp, timeline.vp
    makespan = timeline.makespan or 1.0
    durations = [s.end - s.start for spans in timeline.ranks for s in spans if s.end > s.start]
    forwards = [s.end - s.start for spans in timeline.ranks for s in spans if s.action.kind == "F" and s.end > s.start]
    unit = median(forwards or durations or [makespan])
    width = min(max(7.0, MARGIN_IN + 0.34 * makespan / unit), 60.0)
    height = 1.7 + 0.5 * p
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((1.2 / width, 0.85 / height, 1 - MARGIN_IN / width, 1 - 1.65 / height))
    points_per_unit = (width - MARGIN_IN) * 72 / makespan

    idle, peaks = timeline.idle, timeline.peak_inflight
    for r, spans in enumerate(timeline.ranks):
        y = p - 1 - r  # device 0 on top
        ax.add_patch(Rectangle((0, y - ROW_HEIGHT / 2), makespan, ROW_HEIGHT, facecolor=IDLE_COLOUR, linewidth=0))
        for span in spans:
            colour = _shade(KIND_COLOURS[span.action.kind], span.action.chunk, vp)
            ax.add_patch(
                Rectangle(
                    (span.start, y - ROW_HEIGHT / 2),
                    span.end - span.start,
                    ROW_HEIGHT,
                    facecolor=colour,
                    edgecolor="white",
                    linewidth=0.6,
                )
            )
            label = str(span.action.microbatch)
            size = min(9.0, (span.end - span.start) * points_per_unit * 0.85 / (0.62 * len(label)))
            if size >= 4.5:
                ax.text(
                    (span.start + span.end) / 2,
                    y,
                    label,
                    ha="center",
                    va="center",
                    fontsize=size,
                    color="white" if _dark(colour) else "black",
                )
        share = idle[r] / timeline.makespan if timeline.makespan else 0.0
        ax.text(makespan * 1.005, y, f"idle {share:.0%}", va="center", ha="left", fontsize=8, color="#555555")

    ax.set_xlim(0, makespan)
    ax.set_ylim(-0.6, p - 0.4)
    ax.set_yticks(range(p))
    ax.set_yticklabels([f"device {r}\npeak {peaks[r]}" for r in reversed(range(p))], fontsize=8)
    ax.set_xlabel("time (s)" if timeline.measured else "time (cost units)", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.tick_params(axis="y", length=0)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)

    kinds = [k for k in KIND_COLOURS if any(s.action.kind == k for spans in timeline.ranks for s in spans)]
    handles = [Patch(facecolor=KIND_COLOURS[k], label=KIND_NAMES[k]) for k in kinds]
    if vp > 1:
        handles += [Patch(facecolor=_shade("#555555", c, vp), label=f"chunk {c}") for c in range(vp)]
    handles.append(Patch(facecolor=IDLE_COLOUR, label="idle"))
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.48 / (height - 1.65)),
        ncol=len(handles),
        fontsize=8,
        frameon=False,
        handlelength=1.4,
        columnspacing=1.2,
    )

    source = "measured" if timeline.measured else "simulated"
    heading = title or f"pipeline timeline ({source})"
    fig.suptitle(
        f"{heading}\nbubble {timeline.bubble_fraction:.1%} of busy time, makespan {timeline.makespan:.4g}, "
        f"peak activations held per device {peaks} (micro-batch{' chunks' if vp > 1 else 'es'})",
        fontsize=10,
        y=1 - 0.12 / height,
        va="top",
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _shade(colour: str, chunk: int, vp: int) -> tuple[float, float, float]:
    """Chunk 0 in full colour, later chunks mixed towards white (at most 60%)."""
    mix = 0.6 * chunk / (vp - 1) if vp > 1 else 0.0
    return tuple(c + (1 - c) * mix for c in to_rgb(colour))


def _dark(rgb: tuple[float, float, float]) -> bool:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b < 0.6
