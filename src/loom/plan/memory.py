"""Model-state memory and data-parallel traffic per rank under ZeRO (Rajbhandari et al., 2020).

Ψ parameters, N data-parallel ranks, parameters and gradients of ``param_bytes`` and
``grad_bytes`` each (2 in mixed precision), and K bytes of optimizer state per parameter
(K = 12 for mixed-precision Adam: fp32 master weights, momentum and variance). Bytes
per rank:

=====  =================  ========================  ==================  ================
stage  partitioned        params                    grads               optimizer
=====  =================  ========================  ==================  ================
0      nothing (DDP)      2Ψ                        2Ψ                  KΨ      = 16Ψ
1      optimizer states   2Ψ                        2Ψ                  KΨ/N    = 4Ψ + 12Ψ/N
2      + gradients        2Ψ                        2Ψ/N                KΨ/N    = 2Ψ + 14Ψ/N
3      + parameters       2Ψ/N                      2Ψ/N                KΨ/N    = 16Ψ/N
=====  =================  ========================  ==================  ================

Keeping gradients in fp32 (``grad_bytes=4``) doubles the gradient column. Training in fp32
(``param_bytes = grad_bytes = 4``) the parameters are their own master weights, so K = 8
(the moments) and the totals are again 16Ψ, 8Ψ + 8Ψ/N, 4Ψ + 12Ψ/N, 16Ψ/N.

Traffic per step (ring model): stages 0-2 move 2Ψ elements (DDP all-reduces the
gradients, 2(n-1)/n Ψ; stages 1-2 reduce-scatter them and all-gather the updated
parameters, (n-1)/n Ψ each); stage 3 moves 3Ψ (parameters all-gathered once for the
forward and once for the backward, gradients reduce-scattered).

Values are exact: an ``int`` when the formula gives whole bytes, else a ``float``.
"""

from __future__ import annotations

import math
from fractions import Fraction

STAGES = (0, 1, 2, 3)


def _plain(value: Fraction) -> int | float:
    return int(value) if value.denominator == 1 else float(value)


def _check(stage: int, psi: int, n: int) -> None:
    if stage not in STAGES:
        raise ValueError(f"ZeRO stage must be one of {STAGES}, got {stage}")
    if psi < 0 or n < 1:
        raise ValueError(f"need psi >= 0 and n >= 1, got psi={psi}, n={n}")


def model_state_bytes(
    stage: int, psi: int, n: int, param_bytes: int = 2, grad_bytes: int = 2, k: int = 12
) -> dict[str, int | float]:
    """Bytes per rank by category: ``{"params", "grads", "optim", "total"}`` (table above)."""
    _check(stage, psi, n)
    share = Fraction(psi, n)
    params = param_bytes * (share if stage >= 3 else psi)
    grads = grad_bytes * (share if stage >= 2 else psi)
    optim = k * (share if stage >= 1 else psi)
    parts = {"params": Fraction(params), "grads": Fraction(grads), "optim": Fraction(optim)}
    parts["total"] = sum(parts.values())
    return {key: _plain(value) for key, value in parts.items()}


def zero_memory_bytes(
    stage: int, psi: int, n: int, param_bytes: int = 2, grad_bytes: int = 2, k: int = 12
) -> int | float:
    """Total model-state bytes per rank: 16Ψ, 4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N, 16Ψ/N in mixed precision."""
    return model_state_bytes(stage, psi, n, param_bytes, grad_bytes, k)["total"]


def compression_state_bytes(psi: int | float, n: int, anchor: bool = False) -> float:
    """What 1-bit and 0/1 Adam hold per rank beyond AdamW's states once they compress
    (``loom.optim.onebit``, ``loom.optim.zero_one``, ``loom.parallel.zero.onebit``), for the Ψ
    parameters this rank updates (its tp/pp part): 1/D of the frozen variance (4Ψ), the worker's
    error feedback (4Ψ, padded to n chunks of a multiple of 8), the server's (4Ψ/n), the last
    message's packed signs (Ψ/8) and scales (4n); with ``anchor``, 0/1 Adam's copy of the
    parameters while local steps pend (4Ψ). With n = 1 nothing is compressed: 1/D alone."""
    inverse = 4 * psi + (4 * psi if anchor else 0)
    if n == 1:
        return float(inverse)
    chunk = 8 * math.ceil(psi / (8 * n))
    return float(inverse + 4 * chunk * n + 4 * chunk + chunk * n / 8 + 4 * n)


def dp_elements_per_step(stage: int, psi: int) -> int:
    """Elements moved through the dp group per step, before the ring's (n-1)/n: 2Ψ or 3Ψ."""
    _check(stage, psi, 1)
    return 3 * psi if stage == 3 else 2 * psi


def dp_bytes_per_step(stage: int, psi: int, n: int, param_bytes: int = 2, grad_bytes: int = 2) -> int | float:
    """Bytes each rank sends in the dp group per step (ring model, see the module docstring)."""
    _check(stage, psi, n)
    ring = Fraction(n - 1, n) * psi
    if stage == 0:
        return _plain(2 * ring * grad_bytes)
    gathers = 2 if stage == 3 else 1
    return _plain(ring * (grad_bytes + gathers * param_bytes))
