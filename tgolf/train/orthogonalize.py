"""Muon's orthogonalisation: odd quintic polynomials p(x) = a·x + b·x³ + c·x⁵ applied to a matrix's singular values.

Each step maps X ← a·X + (b·XXᵀ + c·(XXᵀ)²)·X, which applies p to every singular value and leaves the singular
vectors alone, so a few steps push the spectrum of the (norm-scaled) update towards 1: X → U·Vᵀ.

Two choices of polynomials:

- ``newton_schulz``: one quintic repeated (Jordan et al., 2024, "Muon"), tuned for a steep slope at 0. After 5 steps
  (on singular values as fractions of the update's Frobenius norm) those from 0.01 up land in [0.68, 1.13], and one
  at 0.001 reaches only 0.47.
- ``polar_express``: a different quintic per step (Amsel, Persson, Musco and Gower, 2025, "The Polar Express:
  Optimal Matrix Sign Methods and Their Application to the Muon Algorithm", arXiv:2505.16932): step t uses the
  odd quintic closest to 1 in the worst case over the interval [l_t, u_t] that the singular values can be in, and
  the next interval is that polynomial's range. From [0.001, 1], 5 steps land every singular value in
  [0.876, 1.124] ([0.852, 1.124] with the safety factor below). The 1.0611 parameter-golf record trained with it.

The Polar Express polynomials are computed here (a Remez exchange in float64), with the paper's two guards for bf16:
the lower end of the fitted interval is kept at or above ``cushion`` of its upper end, and every step but the last
is evaluated at x / ``safety``, so a singular value that bf16 rounding puts a little above the interval does not
grow.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from tgolf.config import MUON_BACKENDS

Quintic = tuple[float, float, float]

NEWTON_SCHULZ: Quintic = (3.4445, -4.7750, 2.0315)


def evaluate_quintic(quintic: Quintic, x: float) -> float:
    a, b, c = quintic
    return a * x + b * x ** 3 + c * x ** 5


def optimal_odd_quintic(lower: float, upper: float, rounds: int = 100) -> tuple[Quintic, float]:
    """The odd quintic p minimising max |1 - p(x)| over lower <= x <= upper, and that maximum error.

    Remez exchange: the best p - 1 alternates in sign at four points, the two ends and p's two turning points inside,
    with equal magnitude. Solve for (a, b, c, error) at the current points, move the inner points to the turning
    points of that p (roots of p'(x) = a + 3b·x² + 5c·x⁴), repeat until they stop moving."""
    if not 0 < lower < upper:
        raise ValueError(f"optimal_odd_quintic: need 0 < lower < upper, got lower={lower}, upper={upper}")
    if upper - lower < 1e-3 * upper:
        # the exchange's linear system turns singular as the interval shrinks; the minimax quintic tends to the one
        # that touches 1 to third order at the midpoint m: p(x) = (15(x/m) - 10(x/m)³ + 3(x/m)⁵) / 8
        m = (lower + upper) / 2
        tangent = (15 / 8 / m, -10 / 8 / m ** 3, 3 / 8 / m ** 5)
        return tangent, max(abs(1 - evaluate_quintic(tangent, x)) for x in (lower, upper))
    points = np.linspace(lower, upper, 4)
    signs = np.array([1.0, -1.0, 1.0, -1.0])  # p(lower) = 1 - e, p(x1) = 1 + e, p(x2) = 1 - e, p(upper) = 1 + e
    for _ in range(rounds):
        system = np.stack([points, points ** 3, points ** 5, signs], axis=1)
        a, b, c, error = np.linalg.solve(system, np.ones(4))
        turning = np.sqrt(np.sort(np.roots([5 * c, 3 * b, a]).real))  # x² solves 5c·y² + 3b·y + a = 0
        moved = np.array([lower, turning[0], turning[1], upper])
        if np.allclose(moved, points, rtol=0, atol=1e-15):
            break
        points = moved
    return (float(a), float(b), float(c)), float(abs(error))


@functools.lru_cache(maxsize=None)
def polar_express_coefficients(steps: int, lower: float = 1e-3, cushion: float = 0.02407327424182761,
                               safety: float = 1.01) -> tuple[Quintic, ...]:
    """The Polar Express quintics for ``steps`` steps, for singular values in [lower, 1] (after the update is divided
    by its Frobenius norm, which is at least its largest singular value). ``cushion`` and ``safety``: see the module
    docstring (the paper's values; safety=1 gives the bare minimax polynomials)."""
    if steps <= 0:
        raise ValueError(f"polar_express_coefficients: steps={steps} must be > 0")
    low, high, polynomials = lower, 1.0, []
    for _ in range(steps):
        fitted, _ = optimal_odd_quintic(max(low, cushion * high), high)
        # fitted on the cushioned interval, p is centred on 1 over that one: re-centre it over [low, high]
        scale = 2 / (evaluate_quintic(fitted, low) + evaluate_quintic(fitted, high))
        quintic = (fitted[0] * scale, fitted[1] * scale, fitted[2] * scale)
        polynomials.append(quintic)
        low = evaluate_quintic(quintic, low)  # the worst case moves to the ends: p(low) = 1 - e, p(high) = 1 + e
        high = 2 - low
    guarded = [(a / safety, b / safety ** 3, c / safety ** 5) for a, b, c in polynomials[:-1]]
    return tuple(guarded + polynomials[-1:])


def muon_polynomials(backend: str, steps: int) -> tuple[Quintic, ...]:
    """The quintic of each of Muon's ``steps`` orthogonalisation steps under ``backend`` (one of MUON_BACKENDS)."""
    if backend == "newton_schulz":
        return (NEWTON_SCHULZ,) * steps
    if backend == "polar_express":
        return polar_express_coefficients(steps)
    raise ValueError(f"muon backend {backend!r}: expected one of {MUON_BACKENDS}")


def orthogonalize(g: torch.Tensor, polynomials: tuple[Quintic, ...], eps: float = 1e-7) -> torch.Tensor:
    """Approximately U·Vᵀ of each matrix g = U·S·Vᵀ of ``g`` ([rows, cols] or a batch [n, rows, cols] of one shape),
    one step per quintic; bf16 on GPUs (as Muon does), fp32 on the CPU."""
    x = g.bfloat16() if g.is_cuda else g.float()
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    transposed = g.size(-2) > g.size(-1)
    if transposed:  # the Gram matrix of the shorter side is the cheaper one
        x = x.mT
    for a, b, c in polynomials:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transposed else x
