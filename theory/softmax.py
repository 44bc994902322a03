"""Exact per-prompt quantities of a linear-softmax policy with block features (DESIGN.md §3).

pi(y | x_i) = softmax_y(b_iy + phi_private[i, y] . theta_i + phi_shared[i, y] . theta_sh),
i.e. phi(x_i, y) = [phi_private[i, y] in prompt i's private block ; phi_shared[i, y] in the shared block].
Shapes: bias, rbar [..., P, K]; phi_private [..., P, K, k]; phi_shared [..., P, K, s];
theta_private [..., P, k]; theta_shared [..., s]. Cost O(P K (k + s)); no [P, K, P k + s] array.
"""

from __future__ import annotations

import torch

from theory.shapes import check_shapes


def logits(bias: torch.Tensor, phi_private: torch.Tensor, phi_shared: torch.Tensor,
           theta_private: torch.Tensor, theta_shared: torch.Tensor) -> torch.Tensor:
    """z_iy = b_iy + theta . phi(x_i, y), computed blockwise. -> [..., P, K]."""
    check_shapes("logits", bias=(bias, "... P K"), phi_private=(phi_private, "... P K k"),
                 phi_shared=(phi_shared, "... P K s"), theta_private=(theta_private, "... P k"),
                 theta_shared=(theta_shared, "... s"))
    z_private = (phi_private @ theta_private.unsqueeze(-1)).squeeze(-1)  # [..., P, K]
    flat = phi_shared.flatten(-3, -2)  # [..., P*K, s]
    z_shared = (flat @ theta_shared.unsqueeze(-1)).squeeze(-1).unflatten(-1, bias.shape[-2:])  # [..., P, K]
    return bias + z_private + z_shared


def safe_reciprocal(den: torch.Tensor) -> torch.Tensor:
    """1 / den where den > 0, else 0 (for den = a non-negative std): no inf or NaN. 1/den is capped
    at the largest finite float, so a subnormal den cannot make 0 * (1/den) = 0 * inf = NaN."""
    return torch.where(den > 0, den.reciprocal().clamp_max(torch.finfo(den.dtype).max), torch.zeros_like(den))


def prompt_stats(z: torch.Tensor, rbar: torch.Tensor):
    """Population statistics of each prompt under pi = softmax(z).

    Returns (pi [..., P, K], J_i = mu_i = E_pi rbar [..., P], sigma_i = SD_pi(rbar) [..., P],
    w [..., P, K]) where w_y = pi_y (rbar_y - mu_i), so that grad J_i = sum_y w_y phi(x_i, y)
    = Cov_pi(rbar, phi) (the score-function identity E_pi[(rbar - mu) (phi - phibar)]; the
    phibar term vanishes because sum_y w_y = 0). The max-shifted softmax keeps |z| up to 1e3
    (and beyond) finite.
    """
    check_shapes("prompt_stats", z=(z, "... P K"), rbar=(rbar, "... P K"))
    e = (z - z.amax(-1, keepdim=True)).exp()
    pi = e / e.sum(-1, keepdim=True)
    mu = (pi * rbar).sum(-1)
    dev = rbar - mu.unsqueeze(-1)
    w = pi * dev
    sigma = (w * dev).sum(-1).clamp_min(0).sqrt()
    return pi, mu, sigma, w


def per_prompt_gradients(w: torch.Tensor, phi_private: torch.Tensor, phi_shared: torch.Tensor):
    """Blocks of g_i = sum_y w_iy phi(x_i, y) for response weights w [..., P, K].

    Returns (g_private [..., P, k]: the only non-zero private block of g_i, and g_shared
    [..., P, s]). With w from ``prompt_stats`` g_i = grad J_i; with sampled weights
    (1/G) sum_g A_ig (e_(y_ig) - pi_i) it is the policy-gradient estimate of prompt i.
    """
    check_shapes("per_prompt_gradients", w=(w, "... P K"), phi_private=(phi_private, "... P K k"),
                 phi_shared=(phi_shared, "... P K s"))
    wr = w.unsqueeze(-2)  # [..., P, 1, K]
    return (wr @ phi_private).squeeze(-2), (wr @ phi_shared).squeeze(-2)


def summed_gradient(w: torch.Tensor, phi_private: torch.Tensor, phi_shared: torch.Tensor):
    """sum_i g_i in blocks, g_i = sum_y w_iy phi(x_i, y): (private [..., P, k], shared [..., s]);
    the shared block is summed over prompts in one product: sum_i sum_y w_iy phi_shared[i, y]."""
    check_shapes("summed_gradient", w=(w, "... P K"), phi_private=(phi_private, "... P K k"),
                 phi_shared=(phi_shared, "... P K s"))
    g_private = (w.unsqueeze(-2) @ phi_private).squeeze(-2)  # [..., P, k]
    g_shared = (w.flatten(-2).unsqueeze(-2) @ phi_shared.flatten(-3, -2)).squeeze(-2)  # [..., s]
    return g_private, g_shared
