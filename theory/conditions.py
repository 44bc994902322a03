"""Condition checks of the theory (DESIGN.md §3): what holds, what fails, and by how much.

Each check returns a Condition: its name, whether it holds, the measured value, the threshold
it is compared with and a one-line statement of the condition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Condition:
    name: str
    holds: bool
    measured: float
    threshold: float
    statement: str

    def as_dict(self) -> dict:
        return asdict(self)


def orthogonality_condition(overlap: torch.Tensor, tol: float = 1e-9) -> Condition:
    """Prompts' gradient subspaces are orthogonal: max_{i != j} principal cosine <= tol.

    overlap: theory.orthogonality.feature_overlap [P, P]. Under this condition J decomposes per
    prompt and the per-block ascent lemma applies to the whole update."""
    worst = float(overlap.max()) if overlap.numel() else 0.0
    return Condition("orthogonality", worst <= tol, worst, tol,
                     "max over prompt pairs of the largest principal cosine between gradient subspaces <= tol")


def m_bound_condition(hess_over_sigma: torch.Tensor, analytic_m: torch.Tensor, rtol: float = 1e-9) -> Condition:
    """M-bound ||Hess J_i|| <= M_i(theta) sigma_i at every checked (theta, i).

    hess_over_sigma, analytic_m: same shape [..., P] (or flattened over a trajectory). Measured
    value: the worst ratio (||Hess J_i|| / sigma_i) / M_i, which must be <= 1."""
    ratio = hess_over_sigma / analytic_m.clamp_min(1e-300)
    worst = float(ratio.max()) if ratio.numel() else 0.0
    return Condition("M-bound", worst <= 1 + rtol, worst, 1.0,
                     "worst (||Hess J_i|| / sigma_i) / M_i(theta), M_i = sqrt(E||phi - phibar||^4)")


def step_size_condition(lr: float, lr_safe: float, rtol: float = 1e-12) -> Condition:
    """lr <= lr_safe: the learning rate does not exceed the ascent-lemma step (theory.bounds.theory_step_size)."""
    return Condition("step size", lr <= lr_safe * (1 + rtol), lr, lr_safe,
                     "lr <= P/M (GRPO-type) or P/(M sigma_bound) (REINFORCE-type)")


def relaxed_condition(min_sigma_ratio: float, factor: float = 2.0) -> Condition:
    """Local ('relaxed') condition: no sigma_i drops by more than ``factor`` within one step,
    sigma_i(theta_t+1) >= sigma_i(theta_t) / factor, so a GRPO step sized by 1/sigma_i(theta_t)
    stays matched to the curvature it meets. Measured: the smallest ratio seen."""
    return Condition("relaxed (local sigma)", min_sigma_ratio >= 1.0 / factor, min_sigma_ratio, 1.0 / factor,
                     f"sigma_i(t+1) / sigma_i(t) >= 1/{factor:g} at every step")
