"""Predicted gain, rate bounds and the one-step decomposition (DESIGN.md §3).

Ascent lemma per prompt block (orthogonal case), M the curvature constant of the M-bound:
  REINFORCE  theta_i += eta g_i,         eta = 1/(M sigma_bound):  J_i gain >= ||g_i||^2 / (2 M sigma_bound)
  GRPO       theta_i += eta g_i/sigma_i, eta = 1/M:              J_i gain >= ||g_i||^2 / (2 M sigma_i)
(the GRPO line needs sigma_i along the step to stay below sigma_i at its start; see
theory.conditions.relaxed_condition). Summing over t < T and prompts, with
Delta = mean_i (J_i* - J_i(0)) and Cauchy-Schwarz on the average gradient norm:

  REINFORCE  (1/PT) sum_{i,t} ||g_i,t|| <= sqrt(2 M sigma_bound Delta / T)
  GRPO       (1/PT) sum_{i,t} ||g_i,t|| <= sqrt(2 M sigma_bar Delta / T),
             sigma_bar = (1/PT) sum_{i,t} sigma_i,t  (GRPO's own trajectory)

so the number of steps either bound needs to certify a gradient norm differs by the factor
G_pred = sigma_bound / sigma_bar >= 1 (our reconstruction; the paper's exact statement may differ).
sigma_bound >= every sigma_i is DESIGN.md's sigma_max (theory.bounds.reward_std_bound).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from theory.shapes import check_shapes

from theory.bounds import reward_std_bound
from theory.curvature import local_features, m_diameter, prompt_curvature
from theory.softmax import logits, per_prompt_gradients, prompt_stats


def predicted_gain(sigma_history: torch.Tensor, sigma_bound: torch.Tensor | float | None = None) -> torch.Tensor:
    """G_pred = sigma_bound / sigma_bar, sigma_bar the mean of sigma_history [..., T, P] over T and P.

    ``sigma_bound`` None takes the largest sigma in the history (the tightest REINFORCE step that is
    safe along this very trajectory), so equal sigmas give exactly 1. G_pred >= 1 whenever
    sigma_bound bounds every sigma. A history of zeros (nothing left to learn) gives 1; the ratio is
    capped at min(1e300, the dtype's largest float) so a subnormal sigma_bar cannot overflow to inf. -> [...].
    """
    check_shapes("predicted_gain", sigma_history=(sigma_history, "... T P"))
    sigma_bar = sigma_history.mean((-2, -1))
    if sigma_bound is None:
        smax = sigma_history.amax((-2, -1))
    else:
        smax = torch.as_tensor(sigma_bound, dtype=sigma_history.dtype).expand_as(sigma_bar)
    ok = sigma_bar > 0
    ratio = smax / torch.where(ok, sigma_bar, torch.ones_like(sigma_bar))
    # a sigma_bar near the smallest float would overflow to inf: cap it (1e300 in float64, stays finite)
    cap = min(1e300, torch.finfo(sigma_bar.dtype).max)
    return torch.where(ok, ratio.clamp(max=cap), torch.ones_like(sigma_bar))


def rate_bounds(steps: int, M: float, delta_j: float, sigma_bound: float, sigma_bar: float) -> tuple[float, float]:
    """(REINFORCE, GRPO) bounds on the average per-prompt gradient norm after T = ``steps`` steps:
    (1/PT) sum ||g_i,t|| <= sqrt(2 M sigma_bound Delta / T) and <= sqrt(2 M sigma_bar Delta / T)
    (derivation in the module docstring; DESIGN.md §3)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    return (math.sqrt(2 * M * sigma_bound * delta_j / steps), math.sqrt(2 * M * sigma_bar * delta_j / steps))


def mean_objective(bias, rbar, phi_private, phi_shared, theta_private, theta_shared) -> torch.Tensor:
    """J_i(theta) = E_pi[rbar(x_i, .)] for every prompt (DESIGN.md §3): [..., P]."""
    _, mu, _, _ = prompt_stats(logits(bias, phi_private, phi_shared, theta_private, theta_shared), rbar)
    return mu


def exact_step(w: torch.Tensor, step_scale: torch.Tensor, phi_private: torch.Tensor, phi_shared: torch.Tensor):
    """The step Delta = sum_j a_j grad J_j with per-prompt scales a_j = step_scale [..., P]
    (REINFORCE: a_j = lr/P; GRPO: a_j = lr/(P sigma_j)), w = pi (rbar - mu) [..., P, K].
    Returns (Delta_private [..., P, k], Delta_shared [..., s])."""
    g_p, g_s = per_prompt_gradients(w, phi_private, phi_shared)
    a = step_scale.unsqueeze(-1)
    return a * g_p, (a * g_s).sum(-2)


def one_step_change(bias, rbar, phi_private, phi_shared, theta_private, theta_shared,
                    step_scale: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """dJ = J(theta + Delta) - J(theta), J = mean_i J_i, for the exact step Delta = sum_j a_j grad J_j: [...].

    ``stats`` = (mu [..., P], w [..., P, K]) of prompt_stats at theta, when the caller has them.
    """
    if stats is None:
        _, mu, _, w = prompt_stats(logits(bias, phi_private, phi_shared, theta_private, theta_shared), rbar)
    else:
        mu, w = stats
    check_shapes("one_step_change", mu=(mu, "... P"), w=(w, "... P K"), step_scale=(step_scale, "... P"))
    d_p, d_s = exact_step(w, step_scale, phi_private, phi_shared)
    mu_new = mean_objective(bias, rbar, phi_private, phi_shared, theta_private + d_p, theta_shared + d_s)
    return (mu_new - mu).mean(-1)


def per_step_gain(dj_grpo: torch.Tensor, dj_reinforce: torch.Tensor, tiny: float = 1e-12) -> torch.Tensor:
    """dJ_GRPO / dJ_REINFORCE at the same theta; NaN where REINFORCE's change is <= tiny (the ratio
    is undefined there: no placeholder number)."""
    moving = dj_reinforce > tiny
    ratio = dj_grpo / torch.where(moving, dj_reinforce, torch.ones_like(dj_reinforce))
    return torch.where(moving, ratio, torch.full_like(ratio, float("nan")))


def step_decomposition(bias, rbar, phi_private, phi_shared, theta_private, theta_shared,
                       step_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-prompt decomposition of the one-step change of J_i under Delta = sum_j a_j grad J_j.

    With g_i = grad J_i and Delta_i = (private block i of Delta, shared block of Delta):
      own_i       = a_i ||g_i||^2                          (prompt i's own step)
      cross_i     = sum_{j != i} a_j <g_i, g_j>            (interference through the shared block)
      second_i    = Delta_i^T Hess J_i Delta_i / 2         (curvature; |.| <= M_i sigma_i ||Delta_i||^2 / 2)
      actual_i    = J_i(theta + Delta) - J_i(theta)
      remainder_i = actual_i - own_i - cross_i - second_i,
      |remainder_i| <= remainder_bound_i = (4/6) sigma_bound,i diam_i^3 ||Delta_i||^3
    (Taylor's theorem with the third-derivative bound |d^3/dt^3 J_i(theta + t v)| <= 4 sigma_bound,i
    diam_i^3 ||v||^3: the third joint cumulant E[r~ s~^3] - 3 E[r~ s~] E[s~^2] of the reward and
    s = v.phi, with |s~| <= ||v|| diam_i and SD(r) <= sigma_bound,i). All [..., P].
    """
    z = logits(bias, phi_private, phi_shared, theta_private, theta_shared)
    pi, mu, sigma, w = prompt_stats(z, rbar)
    check_shapes("step_decomposition", rbar=(rbar, "... P K"), step_scale=(step_scale, "... P"))
    g_p, g_s = per_prompt_gradients(w, phi_private, phi_shared)  # [..., P, k], [..., P, s]
    a = step_scale
    d_p, d_s = exact_step(w, a, phi_private, phi_shared)  # Delta blocks
    own = a * ((g_p * g_p).sum(-1) + (g_s * g_s).sum(-1))
    cross = (g_s * (d_s.unsqueeze(-2) - a.unsqueeze(-1) * g_s)).sum(-1)
    phi_loc = local_features(phi_private, phi_shared)
    _, H = prompt_curvature(pi, rbar, mu, phi_loc)  # [..., P, D, D]
    delta_loc = torch.cat([d_p, d_s.unsqueeze(-2).expand_as(g_s)], dim=-1)  # [..., P, D]
    second = 0.5 * (delta_loc.unsqueeze(-2) @ H @ delta_loc.unsqueeze(-1)).squeeze(-1).squeeze(-1)
    mu_new = mean_objective(bias, rbar, phi_private, phi_shared, theta_private + d_p, theta_shared + d_s)
    actual = mu_new - mu
    diam = m_diameter(phi_loc).sqrt()  # [..., P]
    smax = reward_std_bound(rbar.amin(-1), rbar.amax(-1))
    step_norm = delta_loc.norm(dim=-1)
    return {"own": own, "cross": cross, "second": second, "actual": actual,
            "remainder": actual - own - cross - second,
            "remainder_bound": (4.0 / 6.0) * smax * diam**3 * step_norm**3, "step_norm": step_norm,
            "sigma": sigma}


def reinforce_steps_by_time_change(steps, mu, rate, target: float) -> float:
    """Predicted steps for REINFORCE to reach ``target`` (mean_i J_i >= target), from another run's
    per-prompt trajectory, by the orthogonal-case time change.

    With orthogonal prompts every estimator whose expected step on prompt i is a positive multiple
    of grad J_i moves J_i along the same gradient-flow path, only at another speed: a step of
    this run, of size lr h_i(t) grad J_i (h_i its expected scale, finite G included:
    theory.finite_group), is worth rate_i(t) = lr h_i(t) / lr_R steps of REINFORCE at lr_R on
    that prompt (REINFORCE's expected step is lr_R grad J_i). So REINFORCE's prompt i at its
    step tau is where this run's prompt i was at the step t with tau_i(t) = sum_{t' < t} rate_i(t'),
    and J_R(tau) = mean_i J_i(t_i(tau)). Exact in the small-step limit of an orthogonal problem;
    the discrete steps, the sampling noise and (without orthogonality) the cross-prompt terms are
    what it leaves out, so a measured speedup off this prediction measures those.

    steps [L] the run's logged steps (increasing, from 0); mu, rate [L, P] per-prompt J_i and
    rate_i at them (tau_i by the trapezoid rule between logged steps, J_i linear between them and
    held at its last value). Returns the first integer tau with J_R(tau) >= target, or NaN when
    J_R never reaches it on the trajectory given.
    """
    steps = np.asarray(steps, dtype=float)
    mu = np.asarray(mu, dtype=float)
    rate = np.asarray(rate, dtype=float)
    if not (steps.ndim == 1 and mu.shape == rate.shape and mu.shape[0] == steps.shape[0]):
        raise ValueError(f"reinforce_steps_by_time_change: steps [L], mu and rate [L, P], got shapes "
                         f"{list(steps.shape)}, {list(mu.shape)}, {list(rate.shape)}")
    if not np.isfinite(rate).all() or (rate < 0).any():
        return math.nan
    tau = np.concatenate([np.zeros((1, mu.shape[1])),
                          np.cumsum(np.diff(steps)[:, None] * (rate[1:] + rate[:-1]) / 2, axis=0)])  # [L, P]
    knots = np.unique(tau)  # J_R is linear between consecutive knots of all prompts
    J = np.mean([np.interp(knots, tau[:, i], mu[:, i]) for i in range(mu.shape[1])], axis=0)
    hit = np.nonzero(J >= target)[0]
    if len(hit) == 0:
        return math.nan
    j = int(hit[0])
    if j == 0:
        return 0.0
    a, b = knots[j - 1], knots[j]  # the crossing lies in (a, b]: solve the linear piece
    t_cross = a + (b - a) * (target - J[j - 1]) / (J[j] - J[j - 1])
    return float(math.ceil(t_cross - 1e-9))


def normalized_objective(mu: torch.Tensor, r_lo: torch.Tensor, r_hi: torch.Tensor) -> torch.Tensor:
    """F = mean_i 2 arcsin sqrt(p_i), p_i = (J_i - r_lo,i) / (r_hi,i - r_lo,i): the objective that
    exact (population) GRPO ascends when each prompt's rewards take two values. There
    sigma_i = Delta_i sqrt(p_i (1 - p_i)) and grad J_i = Delta_i grad p_i, so
    grad J_i / sigma_i = grad p_i / sqrt(p_i (1 - p_i)) = grad (2 arcsin sqrt(p_i)) (Davis and Recht,
    2025): scale-free, blind to the reward scales c_i. Where prompts compete for parameters GRPO
    settles where F is best, not J; REINFORCE ending with a higher J while GRPO ends with a higher F
    is this objective mismatch, not a loss of normalization's speed. mu, r_lo, r_hi [..., P] -> [...]."""
    check_shapes("normalized_objective", mu=(mu, "... P"), r_lo=(r_lo, "... P"), r_hi=(r_hi, "... P"))
    width = (r_hi - r_lo)
    p = torch.where(width > 0, (mu - r_lo) / torch.where(width > 0, width, torch.ones_like(width)),
                    torch.zeros_like(mu)).clamp(0.0, 1.0)
    return (2 * torch.asin(p.sqrt())).mean(-1)
