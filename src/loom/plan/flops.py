"""Parameters, training FLOPs and FLOP utilisation of a GPT-style model.

Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM"), l layers, hidden h, vocabulary V, sequence s, batch B (sequences per iteration):

- parameters (their Eq. 2): P = 12 l h^2 (1 + 13/(12h) + (V + s)/(12 l h));
- FLOPs per iteration with full recomputation (their Eq. 3):
  F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h)).

Both count the matmuls only: per layer forward 24Bsh^2 (QKV 6, output 2, MLP 16) plus
4Bs^2h (QK^T and attention over V), the logits 2BshV; backward costs twice the forward.
Korthikanti et al. 2022, Appendix A, separate what the model needs from what the hardware
runs: model FLOPs = 72 B s l h^2 (1 + s/(6h) + V/(12 l h)) (one forward and one backward);
hardware FLOPs add the recomputed forward: all of a layer's (Eq. 3) for full recomputation,
and for selective 72 B s l h^2 (1 + s/(3h) + V/(12 l h)), i.e. 12Bs^2h per layer: their
Appendix A counts that much for the recomputed core attention (three times its forward
matmuls), and their Table 5's HFU follows it, so loom does too. MFU and HFU are those FLOPs
per second over the devices' peak.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPTShape:
    layers: int
    hidden: int
    vocab: int
    seq: int
    attention_density: float = 1.0  # the fraction of the s x s scores computed (block-sparse: < 1)


def megatron_parameters(shape: GPTShape) -> float:
    """Narayanan et al. 2021, Eq. 2."""
    n, h = shape.layers, shape.hidden
    return 12 * n * h**2 * (1 + 13 / (12 * h) + (shape.vocab + shape.seq) / (12 * n * h))


def model_flops(shape: GPTShape, batch: int) -> float:
    """FLOPs one iteration of ``batch`` sequences needs: 72 B s l h^2 (1 + rho s/(6h) + V/(12 l h)),
    rho the fraction of the s^2 attention scores computed (1: dense, as Narayanan et al. count)."""
    b, s, n, h, v = batch, shape.seq, shape.layers, shape.hidden, shape.vocab
    return 72 * b * s * n * h**2 * (1 + shape.attention_density * s / (6 * h) + v / (12 * n * h))


def hardware_flops(shape: GPTShape, batch: int, recompute: str = "none", recomputed_layers: int | None = None) -> float:
    """FLOPs the devices run: model FLOPs plus, for each of ``recomputed_layers`` layers (all
    when None), the recomputed forward: 24Bsh^2 + 4Bs^2h for ``full`` (with every layer, this
    is Narayanan et al.'s Eq. 3), 12Bs^2h for ``selective`` (Korthikanti's Appendix A)."""
    b, s, h = batch, shape.seq, shape.hidden
    n = shape.layers if recomputed_layers is None else recomputed_layers
    rho = shape.attention_density
    extra = {"none": 0.0, "full": 24 * b * s * h**2 + 4 * rho * b * s**2 * h, "selective": 12 * rho * b * s**2 * h}
    extra = extra[recompute]
    return model_flops(shape, batch) + n * extra


def executed_flops(
    shape: GPTShape, batch: int, recompute: str = "none", kernel: str = "flash", recomputed_layers: int | None = None
) -> float:
    """FLOPs loom runs for one iteration, for the step time: model FLOPs plus, per recomputed layer,
    the forward ``full`` runs again (24Bsh^2 + 4 rho Bs^2h, as :func:`hardware_flops`), or for
    ``selective`` the core attention's: loom's dropout core (``kernel == "dropout"``) recomputes
    only its probabilities, QK^T, 2 rho Bs^2h; any other core runs under a checkpoint, its forward
    again, QK^T and the product with V, 4 rho Bs^2h. (Korthikanti's 12Bs^2h is kept for HFU.)"""
    if recompute != "selective":
        return hardware_flops(shape, batch, recompute, recomputed_layers)
    b, s, h = batch, shape.seq, shape.hidden
    n = shape.layers if recomputed_layers is None else recomputed_layers
    matmuls = 1 if kernel == "dropout" else 2
    return model_flops(shape, batch) + n * 2 * matmuls * shape.attention_density * b * s**2 * h


def megatron_eq3_flops(shape: GPTShape, batch: int) -> float:
    """Narayanan et al. 2021, Eq. 3 (full recomputation), as printed."""
    b, s, n, h, v = batch, shape.seq, shape.layers, shape.hidden, shape.vocab
    return 96 * b * s * n * h**2 * (1 + s / (6 * h) + v / (16 * n * h))


def utilisation(flops_per_iteration: float, seconds_per_iteration: float, devices: int, peak_flops: float) -> float:
    """Achieved FLOP/s over the devices' peak: MFU with model FLOPs, HFU with hardware FLOPs."""
    return flops_per_iteration / seconds_per_iteration / (devices * peak_flops)
