"""Exact per-prompt quantities of a linear-softmax policy with block features (DESIGN.md §3).

pi(y | x_i) = softmax_y(b_iy + sqrt(o) u_(i,y) . theta_i + sqrt(1-o) v_(i,y) . theta_sh).
Shapes: bias, rbar [..., P, K]; U [..., P, K, k]; V [..., P, K, s]; sqrt_o, sqrt_1mo [...];
theta_private [..., P, k]; theta_shared [..., s].
"""

from __future__ import annotations

import torch


def logits(bias: torch.Tensor, U: torch.Tensor, V: torch.Tensor, sqrt_o: torch.Tensor,
           sqrt_1mo: torch.Tensor, theta_private: torch.Tensor, theta_shared: torch.Tensor) -> torch.Tensor:
    """z_iy = b_iy + theta . phi(x_i, y), computed blockwise in O(P K (k + s)). -> [..., P, K]."""
    z_private = torch.einsum("...pKk,...pk->...pK", U, theta_private)
    z_shared = torch.einsum("...pKs,...s->...pK", V, theta_shared)
    return bias + sqrt_o[..., None, None] * z_private + sqrt_1mo[..., None, None] * z_shared


def prompt_stats(z: torch.Tensor, rbar: torch.Tensor):
    """Population statistics of each prompt under pi = softmax(z).

    Returns (pi [..., P, K], J_i = mu_i = E_pi rbar [..., P], sigma_i = SD_pi(rbar) [..., P],
    w [..., P, K]) where w_y = pi_y (rbar_y - mu_i), so that grad J_i = sum_y w_y phi(x_i, y)
    = Cov_pi(rbar, phi) (the score-function identity E_pi[(rbar - mu) (phi - phibar)]; the
    phibar term vanishes because sum_y w_y = 0). log-softmax keeps |z| up to 1e3 finite.
    """
    pi = torch.softmax(z, dim=-1)
    mu = (pi * rbar).sum(-1)
    dev = rbar - mu[..., None]
    var = (pi * dev * dev).sum(-1)
    sigma = var.clamp_min(0).sqrt()
    return pi, mu, sigma, pi * dev


def per_prompt_gradients(w: torch.Tensor, U: torch.Tensor, V: torch.Tensor, sqrt_o: torch.Tensor,
                         sqrt_1mo: torch.Tensor):
    """Blocks of g_i = sum_y w_iy phi(x_i, y) for response weights w [..., P, K].

    Returns (g_private [..., P, k] = sqrt(o) U_i^T w_i, the only non-zero private block of g_i,
    and g_shared [..., P, s] = sqrt(1-o) V_i^T w_i). With w from ``prompt_stats`` this is
    grad J_i; with sampled weights (1/G) sum_k A_ik (e_(y_ik) - pi_i) it is the estimate.
    """
    g_private = sqrt_o[..., None, None] * torch.einsum("...pKk,...pK->...pk", U, w)
    g_shared = sqrt_1mo[..., None, None] * torch.einsum("...pKs,...pK->...ps", V, w)
    return g_private, g_shared
