"""A deliberately plain per-run reference: one run at a time, one step at a time, numpy.

Used by the tests (vectorized engine == this loop on the same seeds) and by bench/ (the
engine's speedup over a straightforward loop). Mathematics as in sim.engine; the random
draws are the same counter-based hash (sim.rng), reimplemented on numpy uint64 so that
both draw identical numbers; advantages come from sim.estimators (the only advantage
functions in the project), on a zero-copy torch view of the numpy rewards.

Shapes for one run: P prompts, K responses, G group size, k/s private/shared dims.
"""

from __future__ import annotations

import numpy as np
import torch

from sim import estimators
from sim.config import RunConfig
from sim.problems import make_problem

_M = np.uint64


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer on uint64 (wraps natively)."""
    z = x + _M(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _M(30))) * _M(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _M(27))) * _M(0x94D049BB133111EB)
    return z ^ (z >> _M(31))


def uniforms(seed: int, step: int, stream: int, shape: tuple[int, ...]) -> np.ndarray:
    """The draws of sim.rng.uniforms for one run, [*shape] float64."""
    with np.errstate(over="ignore"):
        key = _mix64(_mix64(np.array([seed], dtype=np.uint64)) ^ _M(4 * step + stream))
        n = int(np.prod(shape))
        idx = np.arange(n, dtype=np.uint64) * _M(0x9E3779B97F4A7C15)
        h = _mix64(key + idx)
    return ((h >> _M(11)).astype(np.float64) * 2.0**-53).reshape(shape)


def train_one(run: RunConfig) -> dict[str, np.ndarray]:
    """Train one run; returns {"J": [T+1], "sigma": [T+1, P], "theta_private": [P, k], "theta_shared": [s]}."""
    prob = make_problem(run.problem)
    b, rbar, q, c = (prob.bias.numpy(), prob.rbar.numpy(), prob.q.numpy(), prob.scale.numpy())
    U, V = prob.U.numpy(), prob.V.numpy()
    so, s1 = float(prob.sqrt_o), float(prob.sqrt_1mo)
    P, K = b.shape
    t = run.train
    th_p = np.zeros((P, U.shape[-1]))
    th_s = np.zeros(V.shape[-1])
    J_hist, sig_hist = [], []
    for step in range(t.steps + 1):
        pis, mus, sigmas = [], [], []
        for i in range(P):
            z = b[i] + so * U[i] @ th_p[i] + s1 * V[i] @ th_s
            z = z - z.max()
            pi = np.exp(z) / np.exp(z).sum()
            mu = pi @ rbar[i]
            pis.append(pi)
            mus.append(mu)
            sigmas.append(np.sqrt(max(pi @ (rbar[i] - mu) ** 2, 0.0)))
        J_hist.append(np.mean(mus))
        sig_hist.append(np.array(sigmas))
        if step == t.steps:
            break
        if t.mode == "exact":
            scale = estimators.population_scale(t.estimator, torch.from_numpy(np.array(sigmas)),
                                                torch.from_numpy(np.array(mus)), t.eps).numpy()
            ws = [scale[i] * pis[i] * (rbar[i] - mus[i]) for i in range(P)]
        else:
            G = t.group_size
            u_pick = uniforms(t.seed, step, 0, (P, G))
            u_rew = uniforms(t.seed, step, 1, (P, G))
            ys = np.empty((P, G), dtype=np.int64)
            R = np.empty((P, G))
            for i in range(P):
                ys[i] = np.minimum(np.searchsorted(np.cumsum(pis[i]), u_pick[i], side="right"), K - 1)
                R[i] = c[i] * (u_rew[i] < q[i, ys[i]])
            A = estimators.advantages(t.estimator, torch.from_numpy(R), ddof=t.ddof, eps=t.eps,
                                      sigma=torch.from_numpy(np.array(sigmas))).numpy()
            ws = []
            for i in range(P):
                w = np.zeros(K)
                for kk in range(G):
                    w += A[i, kk] * (np.eye(K)[ys[i, kk]] - pis[i])
                ws.append(w / G)
        grad_s = np.zeros_like(th_s)
        for i in range(P):
            th_p[i] += t.lr / P * so * U[i].T @ ws[i]
            grad_s += s1 * V[i].T @ ws[i]
        th_s += t.lr / P * grad_s
    return {"J": np.array(J_hist), "sigma": np.stack(sig_hist), "theta_private": th_p, "theta_shared": th_s}
