"""Measured per-step gain of the estimators compared (DESIGN.md §3 'Phases'), at a logged theta.

For estimator E at learning rate lr_E, the expected one-step change of J = mean_i J_i from theta:

    dJ_E(theta) = E[ J(theta + (lr_E / P) g_E) ] - J(theta)

with g_E the update the engine would take: exact mode the population step sum_i s_E,i grad J_i
(deterministic), sampled mode the sampled update (1/G) sum_g A_ig grad log pi(y_ig), averaged
over N draws of responses and rewards from the counter RNG (sim.rng, its own stream: the
training draws are untouched), with a control variate where the expected update is known
(``sampled_changes``). Every estimator sees the same N draws (common random numbers), so the
ratio below has a small paired standard error. The measured gain is

    gain = dJ_GRPO / dJ_REINFORCE,

each at the same multiple of its own theory step as the run's learning rate is of the run
estimator's (at lr_rule = theory: each at its theory step). It is NaN, with a reason, where it is
undefined: REINFORCE's expected change is not positive ("reinforce_flat"), or in sampled mode not
distinguishable from 0 at 2 standard errors ("reinforce_noisy").

Dimension legend: R runs, N draws, P prompts, K responses, G group size, k / s private / shared dims.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

import theory
from sim import estimators
from sim.rng import GOLDEN, at_step, mix64, uniforms

#: Salt of the gain draws' stream: keys mix64(mix64(key ^ SALT) + n) for draw n (disjoint from training).
GAIN_SALT = np.uint64(0x6A09E667F3BCC908)
#: Reasons an undefined gain gives (the gain_undefined column; "" where it is defined).
UNDEFINED_REASONS = ("reinforce_flat", "reinforce_noisy")


def draw_keys(keys: np.ndarray, draws: int) -> np.ndarray:
    """uint64 [R * N] stream keys of the N gain draws of every run (run-major)."""
    base = mix64(np.asarray(keys, dtype=np.uint64) ^ GAIN_SALT)  # [R]
    with np.errstate(over="ignore"):
        return mix64(base[:, None] + np.arange(draws, dtype=np.uint64)[None, :] * GOLDEN).reshape(-1)


def _draw_streams(keys: np.ndarray, step, draws: int, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """(stream keys [R * N], step) of the gain draws at ``step``: an int, or [R] ints (rows logged at
    different steps in one call), which sim.rng.at_step folds into the keys (step 0 then)."""
    streams = draw_keys(keys, draws)
    if np.ndim(step) == 0:
        return streams, int(step)
    return at_step(streams, np.repeat(np.asarray(step), draws), shape), 0


def _mean_J(bias, rbar, phi_p, phi_s, theta_p, theta_s) -> torch.Tensor:
    """J = mean_i J_i at N thetas per run: theta_p [R, P, k, N], theta_s [R, s, N] -> [R, N]
    (theory.logits with the draws as the last dim: plain batched products, no feature copies)."""
    R, P, K, _ = phi_p.shape
    z = (bias.unsqueeze(-1) + phi_p @ theta_p
         + (phi_s.flatten(1, 2) @ theta_s).unflatten(1, (P, K)))  # [R, P, K, N]
    _, mu, _, _ = theory.prompt_stats(z.transpose(-1, -2).transpose(1, 2), rbar.unsqueeze(1))  # [R, N, P]
    return mu.mean(-1)


def _with_draw_dim(state):
    """An adaptive estimator's state with a draws dim after the runs' ([R, ...] -> [R, 1, ...]), so it
    broadcasts against rewards [R, N, P, G]; None stays None."""
    if state is None:
        return None
    return dataclasses.replace(state, **{f.name: getattr(state, f.name).unsqueeze(1)
                                         for f in dataclasses.fields(state)})


def sampled_changes(pi, sigma, mu, w_exact, problem, theta_p, theta_s, keys, step, group_size: int,
                    lrs: dict[str, torch.Tensor], ddof: int, eps: float, draws: int,
                    control_variate: bool = True, states: dict | None = None) -> dict[str, torch.Tensor]:
    """dJ per draw for every estimator in ``lrs`` (name -> lr [R]): {name: [R, N]}; an adaptive
    estimator's at its state in ``states`` (name -> state, EstimatorSpec.advantages).

    pi, w_exact [R, P, K] (w_exact = pi (rbar - mu)), sigma, mu [R, P]; theta_p [R, P, k],
    theta_s [R, s]; step: the logged step, an int or [R] ints. Where the estimator's expected update
    is known exactly
    (EstimatorSpec.expected_scale: REINFORCE, Dr. GRPO, RLOO, GRPO and its presets), each draw's
    change carries the control variate grad J . (Delta - E Delta): its first-order noise, whose
    expectation is 0, is subtracted, which leaves the mean unbiased and cuts its standard error
    several-fold."""
    R, P, K = pi.shape
    G = group_size
    streams, step = _draw_streams(keys, step, draws, (2, P, G))
    u = uniforms(streams, step, (2, P, G), pi.dtype).to(pi.device).view(R, draws, 2, P, G)
    cdf = pi.cumsum(-1)
    cdf[..., -1] = 2.0  # above every draw (sim.engine.sampled_response_weights)
    cdf = cdf.unsqueeze(1).expand(R, draws, P, K).contiguous()
    y = torch.searchsorted(cdf, u[:, :, 0].contiguous(), right=True)  # [R, N, P, G]
    q = problem.q.unsqueeze(1).expand(R, draws, P, K).gather(-1, y)
    rewards = problem.scale[:, None, :, None] * (u[:, :, 1] < q).to(pi.dtype)  # [R, N, P, G]
    phi_p, phi_s = problem.phi_private, problem.phi_shared
    phiT_p, phiT_s = phi_p.transpose(-1, -2), phi_s.flatten(1, 2).transpose(-1, -2)  # [R, P, k, K], [R, s, P*K]
    g_p, g_s = theory.per_prompt_gradients(w_exact, phi_p, phi_s)  # [R, P, k], [R, P, s]: grad J_i
    J0 = mu.mean(-1, keepdim=True)  # [R, 1]
    onehot_sum = torch.zeros(R, draws, P, K, dtype=pi.dtype, device=pi.device)
    out = {}
    for name, lr in lrs.items():
        spec = estimators.get(name)
        adv = spec.advantages(rewards, ddof=ddof, eps=eps, sigma=sigma.unsqueeze(1).expand(R, draws, P),
                              state=_with_draw_dim((states or {}).get(name)))
        per_response = onehot_sum.zero_().scatter_add_(-1, y, adv)
        w = (per_response - pi.unsqueeze(1) * adv.sum(-1, keepdim=True)) / G  # [R, N, P, K]
        w = w.permute(0, 2, 3, 1)  # [R, P, K, N]
        a = (lr / P).to(pi.dtype)
        d_p = a[:, None, None, None] * (phiT_p @ w)  # [R, P, k, N]
        d_s = a[:, None, None] * (phiT_s @ w.flatten(1, 2))  # [R, s, N]
        dJ = _mean_J(problem.bias, problem.rbar, phi_p, phi_s, theta_p.unsqueeze(-1) + d_p,
                     theta_s.unsqueeze(-1) + d_s) - J0
        h, known = spec.expected_scale(sigma, mu, problem.scale, exact=False, group_size=G, ddof=ddof, eps=eps)
        if known and control_variate:  # control variate: grad J . (Delta - E Delta), grad J = (1/P) sum_i g_i
            e_p = a[:, None, None] * h.unsqueeze(-1) * g_p  # [R, P, k]: E Delta, private blocks
            e_s = a[:, None] * (h.unsqueeze(-1) * g_s).sum(1)  # [R, s]
            lin = ((g_p.unsqueeze(-1) * (d_p - e_p.unsqueeze(-1))).sum((1, 2))
                   + (g_s.sum(1).unsqueeze(-1) * (d_s - e_s.unsqueeze(-1))).sum(1)) / P  # [R, N]
            dJ = dJ - lin
        out[name] = dJ
    return out


def sampled_changes_compiled(pi, sigma, mu, g_p, g_s, problem, theta_p, theta_s, keys, step, group_size: int,
                             lrs: dict[str, torch.Tensor], ddof: int, eps: float, draws: int, lanes,
                             control_variate: bool = True) -> dict[str, torch.Tensor]:
    """``sampled_changes`` for stateless estimators in one compiled call (sim.kernels.gain_changes;
    CPU float64): the same draws and formulas, sums in another order, so equal to rounding.
    g_p [R, P, k], g_s [R, P, s]: grad J_i's blocks (theory.per_prompt_gradients of pi (rbar - mu));
    lanes: the problem (bias, rbar, q, phi_private, phi_shared) in the kernels' lane layout
    (sim.engine.lane_layout)."""
    from sim import kernels

    R, P, K = pi.shape
    names = list(lrs)
    params = np.zeros((len(names), 6))
    flags = np.zeros((len(names), 2), dtype=np.bool_)
    h = np.zeros((len(names), R, P))
    for e, name in enumerate(names):
        spec = estimators.get(name)
        if spec.adaptive is not None:
            raise ValueError(f"sampled_changes_compiled: {name} is adaptive (use sampled_changes)")
        code, e_ddof, e_eps, whiten, w_ddof, w_floor, w_eps = kernels.estimator_params(spec, ddof, eps)
        params[e] = (code, e_ddof, e_eps, w_ddof, w_floor, w_eps)
        scale, known = spec.expected_scale(sigma, mu, problem.scale, exact=False, group_size=group_size, ddof=ddof,
                                           eps=eps)
        flags[e] = (whiten, known and control_variate)
        h[e] = scale.numpy()
    lr_over_p = np.stack([(lrs[name] / P).to(pi.dtype).numpy() for name in names])  # [E, R]
    out = np.empty((len(names), R, draws))
    arr = lambda x: np.ascontiguousarray(x.numpy())  # noqa: E731 -- CPU float64 tensors
    binary_q = bool(((problem.q == 0) | (problem.q == 1)).all())  # reward flips need no draws (sim.engine.Batch)
    streams, step = _draw_streams(keys, step, draws, (2, P, group_size))
    kernels.in_blocks(kernels.gain_changes, R, step, group_size, binary_q, streams.reshape(R, draws),
                      arr(pi), arr(sigma), *lanes[:3], arr(problem.scale), *lanes[3:], arr(theta_p), arr(theta_s),
                      arr(mu.mean(-1)), arr(g_p), arr(g_s), params, flags, lr_over_p, h, out)
    return {name: torch.from_numpy(out[e]) for e, name in enumerate(names)}


def exact_changes(mu, sigma, w, problem, theta_p, theta_s, lrs: dict[str, torch.Tensor],
                  eps: float, states: dict | None = None) -> dict[str, torch.Tensor]:
    """dJ of the exact-mode step of every estimator in ``lrs``: {name: [R, 1]}; an adaptive
    estimator's at its state in ``states`` (EstimatorSpec.scale)."""
    P = mu.shape[-1]
    out = {}
    for name, lr in lrs.items():
        s = estimators.get(name).scale(sigma, mu, eps, state=(states or {}).get(name))  # [R, P]
        a = (lr / P).to(mu.dtype).unsqueeze(-1) * s
        out[name] = theory.one_step_change(problem.bias, problem.rbar, problem.phi_private, problem.phi_shared,
                                           theta_p, theta_s, a, stats=(mu, w)).unsqueeze(-1)
    return out


def gain_from_changes(dj_grpo: torch.Tensor, dj_reinforce: torch.Tensor, tiny: float = 1e-12):
    """(gain [R], standard error [R], reason [R] str) from per-draw changes [R, N] (N = 1: exact).

    gain = mean dJ_GRPO / mean dJ_REINFORCE; its standard error by the delta method on the paired
    draws, var = Var(a - gain b) / (N b^2); NaN with a reason where REINFORCE's mean change is
    <= tiny ("reinforce_flat") or within 2 standard errors of 0 ("reinforce_noisy")."""
    N = dj_grpo.shape[-1]
    a, b = dj_grpo.mean(-1), dj_reinforce.mean(-1)
    ratio = a / torch.where(b > tiny, b, torch.ones_like(b))
    if N > 1:
        se_b = dj_reinforce.std(-1) / N**0.5
        resid = dj_grpo - ratio.unsqueeze(-1) * dj_reinforce
        se = resid.std(-1) / N**0.5 / b.abs().clamp_min(1e-300)
    else:
        se_b = torch.zeros_like(b)
        se = torch.zeros_like(b)
    flat, noisy = b <= tiny, b <= 2 * se_b
    reason = np.where(flat.cpu().numpy(), UNDEFINED_REASONS[0], np.where(noisy.cpu().numpy(), UNDEFINED_REASONS[1], ""))
    bad = flat | noisy
    nan = torch.full_like(ratio, float("nan"))
    return torch.where(bad, nan, ratio), torch.where(bad, nan, se), reason.astype(object)
