"""Test oracle: a deliberately plain per-run reference, one run at a time, one step at a time, numpy.

Not part of the product's code paths: the tests check the vectorized engine against this loop
on the same seeds, and bench/ measures the engine's speedup over it. Mathematics as in sim.engine; the random
draws come from the same counter-based hash (sim.rng, one run at a time), and advantages
from sim.estimators (the only advantage functions in the project), on a zero-copy torch
view of the numpy rewards.

Shapes for one run: P prompts, K responses, G group size, k/s private/shared dims.
"""

from __future__ import annotations

import numpy as np
import torch

from sim import estimators, rng
from sim.config import RunConfig
from sim.problems import make_problem

def uniforms(seed: int, step: int, shape: tuple[int, ...]) -> np.ndarray:
    """The draws of sim.rng.uniforms for one run, [*shape] float64."""
    return rng.uniforms_np(rng.run_keys([seed]), step, shape)[0]


def train_one(run: RunConfig) -> dict[str, np.ndarray]:
    """Train one run; returns {"J": [T+1], "sigma": [T+1, P], "theta_private": [P, k], "theta_shared": [s]}.

    Numpy, vectorized over prompts only: the loop a careful researcher would write for one run.
    """
    prob = make_problem(run.problem)
    b, rbar, q, c = (prob.bias.numpy(), prob.rbar.numpy(), prob.q.numpy(), prob.scale.numpy())
    U, V = prob.phi_private.numpy(), prob.phi_shared.numpy()
    P, K = b.shape
    t = run.train
    G = t.group_size
    th_p = np.zeros((P, U.shape[-1]))
    th_s = np.zeros(V.shape[-1])
    J_hist, sig_hist = [], []
    rows = np.arange(P)[:, None]
    spec = estimators.get(t.estimator)
    rule, state = spec.adaptive, None  # an adaptive estimator's rule and its state (None: before step 0)
    for step in range(t.steps + 1):
        z = b + np.einsum("pKk,pk->pK", U, th_p) + V @ th_s  # [P, K]
        z = z - z.max(-1, keepdims=True)
        e = np.exp(z)
        pi = e / e.sum(-1, keepdims=True)
        mu = (pi * rbar).sum(-1)  # [P]
        sigma = np.sqrt(np.maximum((pi * (rbar - mu[:, None]) ** 2).sum(-1), 0.0))
        J_hist.append(mu.mean())
        sig_hist.append(sigma)
        if step == t.steps:
            break
        if t.mode == "exact":
            w_exact = pi * (rbar - mu[:, None])  # [P, K]: grad J_i = sum_y w_iy phi(x_i, y)
            if rule is None:
                scale = estimators.population_scale(t.estimator, torch.from_numpy(sigma), torch.from_numpy(mu),
                                                    t.eps).numpy()
            else:
                rho = _rho(w_exact, U, V) if rule.needs_rho_exact else None
                scale, state = rule.scale_step(torch.from_numpy(sigma), torch.from_numpy(mu), state, rho, t.eps)
                scale = scale.numpy()
            w = scale[:, None] * w_exact  # [P, K]
        else:
            u_pick, u_rew = uniforms(t.seed, step, (2, P, G))
            cdf = np.cumsum(pi, -1)  # [P, K]
            y = np.minimum((u_pick[:, :, None] >= cdf[:, None, :]).sum(-1), K - 1)  # [P, G]
            rewards = c[:, None] * (u_rew < q[rows, y])  # [P, G]
            onehot = np.eye(K)[y]  # [P, G, K]
            if rule is None:
                A = estimators.advantages(t.estimator, torch.from_numpy(rewards), ddof=t.ddof, eps=t.eps,
                                          sigma=torch.from_numpy(sigma)).numpy()
            else:  # rho from the centred advantages' per-prompt gradients (their directions are the run's)
                d = rewards - rewards[:, :1]  # relative to the first reward: exactly 0 for a constant group
                centred = d - d.mean(-1, keepdims=True)
                rho = _rho((centred[:, :, None] * (onehot - pi[:, None, :])).mean(1), U, V,
                           1e-12 * np.abs(centred).mean(-1)) if rule.needs_rho else None
                A, state = rule.step(torch.from_numpy(rewards), state, rho, ddof=t.ddof, eps=t.eps)
                A = A.numpy()
            w = (A[:, :, None] * (onehot - pi[:, None, :])).mean(1)  # [P, K]
        th_p += t.lr / P * np.einsum("pKk,pK->pk", U, w)
        th_s += t.lr / P * np.einsum("pKs,pK->s", V, w)
    return {"J": np.array(J_hist), "sigma": np.stack(sig_hist), "theta_private": th_p, "theta_shared": th_s}


def _rho(w: np.ndarray, U: np.ndarray, V: np.ndarray, floor=None) -> torch.Tensor:
    """rho = 1 - mean |cos(g_i, g_j)| over the pairs i != j of non-zero per-prompt gradients
    g_i = sum_y w_iy phi(x_i, y) (NaN without such a pair: what the adaptive rule reads), written out
    on the full parameter vector [P*k + s] (prompt i's private block at i). w [P, K]; a gradient of
    norm <= floor[i] has no direction (rounding noise), as a zero one."""
    P, _, k = U.shape
    g = np.zeros((P, P * k + V.shape[-1]))
    for i in range(P):
        g[i, i * k:(i + 1) * k] = w[i] @ U[i]
        g[i, P * k:] = w[i] @ V[i]
    norms = np.linalg.norm(g, axis=1)
    if floor is not None:
        norms = np.where(norms > floor, norms, 0.0)
    total, pairs = 0.0, 0
    for i in range(P):
        for j in range(P):
            if i != j and norms[i] > 0 and norms[j] > 0:
                total += abs(g[i] @ g[j]) / (norms[i] * norms[j])
                pairs += 1
    return torch.tensor(1.0 - total / pairs if pairs else float("nan"), dtype=torch.float64)
