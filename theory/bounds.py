"""Curvature bounds and ascent-lemma step sizes (DESIGN.md §3)."""

from __future__ import annotations

import torch

from theory.softmax import safe_reciprocal


def global_curvature_bound(feature_norm_bound: float) -> float:
    """M <= 4 B^2 with B = max ||phi||.

    ||Hess J_i|| = ||E_pi[(rbar - mu)(phi - phibar)(phi - phibar)^T]||
                <= sigma_i sqrt(E_pi ||phi - phibar||^4)     (Cauchy-Schwarz)
                <= sigma_i (2B)^2                             (||phi - phibar|| <= 2B).
    """
    return 4.0 * feature_norm_bound**2


def reward_std_bound(r_min, r_max):
    """sigma_bound = (r_max - r_min) / 2 >= SD(r) for any reward in [r_min, r_max] (Popoviciu's
    inequality; equality for mass 1/2 at each end): DESIGN.md §3's sigma_max, the bound on sigma_i
    that sizes REINFORCE's step (c / 2 for rewards in {0, c}). Floats or tensors."""
    return (r_max - r_min) / 2


def theory_step_size(std_normalized: bool, M, sigma_bound, num_prompts: int):
    """Ascent-lemma learning rate in the engine's convention.

    Per prompt block the lemma gives eta = 1/M for the GRPO step grad J_i / sigma_i and
    eta = 1/(M sigma_bound) for the REINFORCE step grad J_i (sigma_bound: DESIGN.md's sigma_max,
    see reward_std_bound). The engine's gradient estimate averages over prompts ((1/P) sum_i),
    so the same per-block step needs lr = P * eta. M and sigma_bound may be floats or tensors of
    one shape (one value per run); so is the result.
    """
    if (torch.as_tensor(M) <= 0).any():
        raise ValueError("curvature bound M must be positive")
    if std_normalized:
        return num_prompts / M
    if (torch.as_tensor(sigma_bound) <= 0).any():
        raise ValueError("sigma_bound must be positive for an unnormalized step")
    return num_prompts / (M * sigma_bound)


def step_scale(std_normalized: bool, M, sigma_bound, num_prompts: int, sigma: torch.Tensor) -> torch.Tensor:
    """Per-prompt scale a_i of grad J_i in one exact step at the theory learning rate,
    theta += sum_i a_i grad J_i (engine convention, lr / P times the population scale):

        GRPO       a_i = (lr / P) / sigma_i   (0 where sigma_i = 0, where grad J_i = 0 too)
        REINFORCE  a_i = lr / P,              lr = theory_step_size(...)

    M, sigma_bound: floats or [...] tensors; sigma [..., P] -> [..., P]."""
    lr_over_p = torch.as_tensor(theory_step_size(std_normalized, M, sigma_bound, num_prompts) / num_prompts,
                                dtype=sigma.dtype, device=sigma.device).unsqueeze(-1)  # [..., 1]
    if std_normalized:
        return safe_reciprocal(sigma) * lr_over_p
    return lr_over_p.expand_as(sigma)
