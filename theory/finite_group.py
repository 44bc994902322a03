"""Finite groups: the exact expected sampled update of a group estimator (DESIGN.md §3-4).

Rewards in {0, c} (the family's observed rewards, noise included), success probability
p = mu_i / c_i for every sample of prompt i, G samples per group. The sampled update of prompt i
is (1/G) sum_g A_ig (e_(y_ig) - pi_i). Given its own reward R_1, sample 1's response y_1 is
independent of the other rewards, and A_1 depends on y_1 only through R_1, so with
a_R = E[A_1 | R_1 = R] (the other G-1 rewards Binomial(G-1, p)):

    E[update_i] = sum_y pi_y (e_y - pi) (q_y a_c + (1 - q_y) a_0) = (a_c - a_0) sum_y pi_y q_y (e_y - pi)
                = h_G(p) grad_z J_i,        h_G(p) = (a_c - a_0) / c,

since grad_z J_i = pi (rbar - mu) = c sum_y pi_y q_y (e_y - pi) (q_y = P(R = c | y)). So each
prompt's expected step is its exact gradient times a scalar h_G(p_i): the finite-G analogue of
the exact-mode scale s_i (REINFORCE: h = 1; Dr. GRPO: (G-1)/G; GRPO: below).

GRPO, A_g = (R_g - mean R) / (std(R; ddof) + eps): with k successes in the group,
std = c s_k, s_k = sqrt(k (G - k) / (G (G - ddof))), and

    h_G(p) = (1/c) sum_{j=0}^{G-1} Binom(j; G-1, p) [ (1 - (j+1)/G) / (s_(j+1) + eps/c)
                                                      + (j/G) / (s_j + eps/c) ]

(a constant group, k = 0 or G, contributes 0). As G -> infinity, h_G(p) -> 1 / (c sqrt(p(1-p)) + eps),
1 / (sigma_i + eps) for noise-free rewards (with noise the observed std c sqrt(p(1-p)) exceeds
sigma_i). As p -> 0 with eps = 0 and ddof = 1, only j = 0 survives: h_G -> (G-1) / (sqrt(G) c),
a cap where the population scale 1/sigma_i grows without bound: normalization's gain on a
near-solved or near-hopeless prompt is capped at sigma_bound h_G = (G-1) / (2 sqrt(G)) (0.35, 0.75,
1.24, 2.74 for G = 2, 4, 8, 32) against REINFORCE at its theory step.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from theory.shapes import check_shapes


def binomial_weights(p: torch.Tensor, n: int) -> torch.Tensor:
    """Binom(j; n, p) for j = 0..n, [...] -> [..., n+1] (exact at p = 0 and p = 1)."""
    j = torch.arange(n + 1, dtype=p.dtype, device=p.device)
    log_comb = torch.tensor([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(n + 1)],
                            dtype=p.dtype, device=p.device)
    pp = p.unsqueeze(-1)
    # in logs (no overflow for large n), with 0 log 0 = 0 so that p = 0 and p = 1 are exact
    return (log_comb + torch.special.xlogy(j, pp) + torch.special.xlogy(n - j, 1 - pp)).exp()


def grpo_expected_scale(p: torch.Tensor, G: int, ddof: int = 1, eps: float = 1e-4,
                        c: torch.Tensor | float = 1.0) -> torch.Tensor:
    """h_G(p) of the module docstring: E[sampled GRPO update of prompt i] = h_G(p_i) grad J_i, for
    rewards in {0, c}, group size G, the estimator's ddof and eps. p, c [...] -> [...]."""
    if G < 1:
        raise ValueError("G must be >= 1")
    p = torch.as_tensor(p, dtype=torch.float64) if not torch.is_tensor(p) else p
    c = torch.as_tensor(c, dtype=p.dtype, device=p.device)
    k = torch.arange(G + 1, dtype=p.dtype, device=p.device)
    s = (k * (G - k) / (G * (G - ddof))).sqrt() if G - ddof > 0 else torch.zeros_like(k)  # [G+1]
    den = s + eps / c.unsqueeze(-1)  # [..., G+1]
    num_success = 1 - k / G  # own success, k = j + 1 successes in all
    num_failure = k / G      # own failure, k = j
    inv = lambda x, d: torch.where(x == 0, torch.zeros_like(d), x / torch.where(d > 0, d, torch.ones_like(d)))  # noqa: E731
    term = inv(num_success[1:], den[..., 1:]) + inv(num_failure[:-1], den[..., :-1])  # [..., G]: j = 0..G-1
    return (binomial_weights(p, G - 1) * term).sum(-1) / c


def expected_scale(advantage: Callable[[torch.Tensor], torch.Tensor], p: float, c: float, G: int) -> float:
    """h_G(p) for any per-group advantage function A(rewards [..., G]) -> [..., G] that is symmetric
    in the group's samples, by exact enumeration over the number of successes among the other
    G - 1 samples (module docstring): (E[A_1 | R_1 = c] - E[A_1 | R_1 = 0]) / c."""
    w = binomial_weights(torch.tensor(float(p), dtype=torch.float64), G - 1)  # [G]
    idx = torch.arange(G)
    cond = []
    for own in (c, 0.0):
        rows = c * ((idx[None, :] >= 1) & (idx[None, :] <= torch.arange(G)[:, None])).double()  # j others succeed
        rows[:, 0] = own
        cond.append(float((w * advantage(rows)[:, 0]).sum()))
    return (cond[0] - cond[1]) / c


def effective_sigma(scale: torch.Tensor) -> torch.Tensor:
    """sigma_eff = 1 / h: the std a population-normalized step would have to divide by to take
    the expected finite-G step (inf where h = 0, which no GRPO prompt with 0 < p < 1 has). [...]."""
    check_shapes("effective_sigma", scale=(scale, "..."))
    return torch.where(scale > 0, 1 / torch.where(scale > 0, scale, torch.ones_like(scale)),
                       torch.full_like(scale, math.inf))


def loo_expected_scale(p: torch.Tensor, G: int, c: torch.Tensor | float = 1.0, eps: float = 1e-4,
                       p_bar: torch.Tensor | float = 0.0, prior: float = 0.0) -> torch.Tensor:
    """h~_G(p) with E[sampled update of prompt i] = h~_G(p) grad J_i exactly for the finite-G-corrected
    GRPO (sim.estimators.grpo_finite) with its state (p_bar, c) and ``prior`` pseudo-samples n0
    (0: the first step), rewards in {0, c}:

        h~_G(p) = sum_{j=0}^{G-1} Binom(j; G-1, p) / (c sqrt(pt_j (1 - pt_j)) + eps),
        pt_j = (j + n0 p_bar + 1/2) / (G + n0).

    Sample g's baseline and scale read only the other G - 1 samples (j successes) and the state,
    which are independent of its own reward, so E[A_g (e_(y_g) - pi)] = E[scale] grad_z J_i (the
    module docstring's argument with a_c - a_0 = c E[scale]). p, c, p_bar [...] -> [...]."""
    if G < 2:
        raise ValueError("G must be >= 2")
    p = torch.as_tensor(p, dtype=torch.float64) if not torch.is_tensor(p) else p
    c = torch.as_tensor(c, dtype=p.dtype, device=p.device).unsqueeze(-1)
    pb = torch.as_tensor(p_bar, dtype=p.dtype, device=p.device).unsqueeze(-1)
    j = torch.arange(G, dtype=p.dtype, device=p.device)  # [G]
    pt = (j + prior * pb + 0.5) / (G + prior)  # [..., G]
    return (binomial_weights(p, G - 1) / (c * (pt * (1 - pt)).sqrt() + eps)).sum(-1)
