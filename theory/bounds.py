"""Curvature bounds and ascent-lemma step sizes (DESIGN.md §3)."""

from __future__ import annotations

import torch


def global_curvature_bound(feature_norm_bound: float) -> float:
    """M <= 4 B^2 with B = max ||phi||.

    ||Hess J_i|| = ||E_pi[(rbar - mu)(phi - phibar)(phi - phibar)^T]||
                <= sigma_i sqrt(E_pi ||phi - phibar||^4)     (Cauchy-Schwarz)
                <= sigma_i (2B)^2                             (||phi - phibar|| <= 2B).
    """
    return 4.0 * feature_norm_bound**2


def theory_step_size(std_normalized: bool, M, sigma_max, num_prompts: int):
    """Ascent-lemma learning rate in the engine's convention.

    Per prompt block the lemma gives eta = 1/M for the GRPO step grad J_i / sigma_i and
    eta = 1/(M sigma_max) for the REINFORCE step grad J_i. The engine's gradient estimate
    averages over prompts ((1/P) sum_i), so the same per-block step needs lr = P * eta.
    M and sigma_max may be floats or tensors of one shape (one value per run); so is the result.
    """
    if (torch.as_tensor(M) <= 0).any():
        raise ValueError("curvature bound M must be positive")
    if std_normalized:
        return num_prompts / M
    if (torch.as_tensor(sigma_max) <= 0).any():
        raise ValueError("sigma_max must be positive for an unnormalized step")
    return num_prompts / (M * sigma_max)
