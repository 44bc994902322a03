"""Probe behind grpo_shrunk (README 'Adaptive normalization'): what a baseline costs through the
curvature, computed at theta = 0 on fig. 8's problems (linear, P = 16, K = 8, base success 0.3).

To second order, an update g at lr eta changes J by eta grad J . E g - (eta^2 / 2) E[-g^T H g]
(H = Hess J), so at its best lr it gains (grad J . E g)^2 / (2 E[-g^T H g]). A baseline that reads
only the other samples leaves E g alone; what it changes is the curvature-weighted second moment,
per prompt E[(R - b)^2 (-s^T H s)] over its scores s = grad log pi(y | x_i) (full vector: private
and shared blocks), minimised by b_H = E[R s^T H s] / E[s^T H s].

    python experiments/baseline_curvature.py            # per cell: sum_i E[s^T H s], median b_H / mu
    python experiments/baseline_curvature.py gain [G]   # one-step gain at the best lr / REINFORCE's,
                                                        # Monte Carlo over 20,000 groups (seed 0)

Measured 2026-12-07: sum_i E[s^T H s] = -0.158 at o = 0.3 against -0.016 at o = 1 (difficulty
spread 0.3; -0.099 against -0.010 at 1): a score costs 10x more where prompts share parameters, and
b_H / mu is 0.41 (0.23) at o = 0.3, about 0 on near-solved prompts. The gain ratio RLOO /
REINFORCE at G = 4, o = 0.3: 0.65 (difficulty spread 0.3, reward spread 1; measured steps ratio
1 / 1.49), 0.61 (0.3, 10; measured 1 / 1.29), 0.27 (1, 10; measured 1 / 1.22), 0.38 (1, 1; measured
1 / 1.61), the measured ones from 6 seeds at the tuned lr (README): the sign is right in every cell,
the size only in the first (one step from theta = 0 is not the run). At o = 1 REINFORCE's
E[-g^T H g] is not positive in two of the four cells (its noise costs nothing at theta = 0: no best
lr, printed nan), and the ratios say little.
"""

from __future__ import annotations

import sys

import torch

from sim import estimators as E
from sim.problems import ProblemConfig, make_problem
from theory.softmax import logits

CELLS = ((0.3, 1.0), (0.3, 10.0), (1.0, 10.0), (1.0, 1.0))  # (difficulty spread, reward-scale spread)


def _problem(o: float, ds: float, rs: float):
    pr = make_problem(ProblemConfig(orthogonality=o, difficulty_spread=ds, reward_scale_spread=rs))
    P, K, k = pr.phi_private.shape
    n = P * k + pr.phi_shared.shape[-1]

    def J(th):
        z = logits(pr.bias, pr.phi_private, pr.phi_shared, th[:P * k].view(P, k), th[P * k:])
        return (z.softmax(-1) * pr.rbar).sum(-1).mean()

    th = torch.zeros(n, dtype=torch.float64)
    H = torch.autograd.functional.hessian(J, th)  # [n, n]
    grad = torch.autograd.functional.jacobian(J, th)  # [n]
    pi = logits(pr.bias, pr.phi_private, pr.phi_shared, th[:P * k].view(P, k), th[P * k:]).softmax(-1)  # [P, K]
    return pr, P, K, k, n, H, grad, pi


def _scores(pr, P, K, k, n, pi) -> torch.Tensor:
    """s_iy = phi(x_i, y) - E_pi phi(x_i, .) as full vectors [P, K, n]."""
    sp = pr.phi_private - (pi.unsqueeze(-1) * pr.phi_private).sum(1, keepdim=True)
    ss = pr.phi_shared - (pi.unsqueeze(-1) * pr.phi_shared).sum(1, keepdim=True)
    S = torch.zeros(P, K, n, dtype=torch.float64)
    for i in range(P):
        S[i, :, i * k:(i + 1) * k] = sp[i]
        S[i, :, P * k:] = ss[i]
    return S


def curvature_baseline() -> None:
    for o in (0.3, 1.0):
        for ds, rs in CELLS[:1] + CELLS[3:]:
            pr, P, K, k, n, H, _, pi = _problem(o, ds, rs)
            S = _scores(pr, P, K, k, n, pi)
            sHs = torch.einsum("pkn,nm,pkm->pk", S, H, S)  # [P, K]
            mu = (pi * pr.rbar).sum(-1)
            b_H = (pi * pr.rbar * sHs).sum(-1) / (pi * sHs).sum(-1)
            print(f"o = {o}, difficulty spread {ds}: sum_i E[s^T H s] = {float((pi * sHs).sum()):.4f}, "
                  f"median b_H / mu = {float((b_H / mu).median()):.2f}")


def one_step_gain(G: int, draws: int = 20000) -> None:
    torch.manual_seed(0)
    for o in (0.3, 1.0):
        for ds, rs in CELLS:
            pr, P, K, k, n, H, grad, pi = _problem(o, ds, rs)
            y = torch.multinomial(pi.repeat(draws, 1), G, replacement=True).view(draws, P, G)
            R = torch.gather(pr.rbar.expand(draws, P, K), 2, y)  # noise-free rewards [N, P, G]
            gains = {}
            for name in ("reinforce", "rloo", "dr_grpo", "grpo", "grpo_finite"):
                A = E.get(name).advantages(R)
                w = torch.zeros(draws, P, K, dtype=torch.float64).scatter_add_(2, y, A) / (P * G)
                w = w - A.sum(-1, keepdim=True) / (P * G) * pi  # (1 / (P G)) sum_g A_g (e_y - pi)
                g = torch.cat([torch.einsum("npk,pkd->npd", w, pr.phi_private).reshape(draws, P * k),
                               torch.einsum("npk,pkd->nd", w, pr.phi_shared)], -1)  # [N, n]
                first, second = float(grad @ g.mean(0)), float(-torch.einsum("nd,de,ne->n", g, H, g).mean())
                gains[name] = first**2 / (2 * second) if second > 0 else float("inf")
            print(f"o = {o}, difficulty {ds}, reward spread {rs}, G = {G}: gain at the best lr / REINFORCE's: "
                  + ", ".join(f"{k} {v / gains['reinforce']:.2f}" for k, v in gains.items()))


if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)
    if sys.argv[1:2] == ["gain"]:
        one_step_gain(int(sys.argv[2]) if len(sys.argv) > 2 else 4)
    else:
        curvature_baseline()
