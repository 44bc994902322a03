"""Exact gradient == autograd == finite differences; sampled estimates average to the exact
gradient times their known factor (DESIGN.md §3, §4)."""

import pytest
import torch

import theory
from sim.config import TrainConfig
from sim.engine import sampled_response_weights
from sim.problems import ProblemConfig, make_problem, stack_problems
from sim.rng import run_keys


def objective(prob, theta_p, theta_s):
    z = theory.logits(prob.bias, prob.phi_private, prob.phi_shared, theta_p, theta_s)
    return (torch.softmax(z, -1) * prob.rbar).sum(-1).mean(-1)  # J = (1/P) sum_i J_i


def exact_gradient(prob, theta_p, theta_s):
    z = theory.logits(prob.bias, prob.phi_private, prob.phi_shared, theta_p, theta_s)
    _, _, _, w = theory.prompt_stats(z, prob.rbar)
    g_p, g_s = theory.per_prompt_gradients(w, prob.phi_private, prob.phi_shared)
    P = prob.bias.shape[-2]
    return g_p / P, g_s.sum(-2) / P


def random_theta(prob, seed):
    g = torch.Generator().manual_seed(seed)
    P, K = prob.bias.shape
    return (torch.randn(P, prob.phi_private.shape[-1], generator=g, dtype=torch.float64),
            torch.randn(prob.phi_shared.shape[-1], generator=g, dtype=torch.float64))


@pytest.mark.parametrize("kind,o", [("linear", 0.3), ("linear", 1.0), ("tabular", 0.6), ("linear", 0.0)])
def test_exact_gradient_equals_autograd(kind, o):
    prob = make_problem(ProblemConfig(kind=kind, num_prompts=5, num_responses=4, orthogonality=o,
                                      reward_scale_spread=3.0, reward_noise=0.1))
    tp, ts = random_theta(prob, 1)
    tp.requires_grad_(True)
    ts.requires_grad_(True)
    objective(prob, tp, ts).backward()
    gp, gs = exact_gradient(prob, tp.detach(), ts.detach())
    torch.testing.assert_close(gp, tp.grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(gs, ts.grad, rtol=1e-10, atol=1e-13)


def test_exact_gradient_equals_finite_differences():
    prob = make_problem(ProblemConfig(num_prompts=3, num_responses=4, orthogonality=0.5, private_dim=3,
                                      shared_dim=2))
    tp, ts = random_theta(prob, 2)
    gp, gs = exact_gradient(prob, tp, ts)
    h = 1e-6
    for idx in [(0, 0), (1, 2), (2, 1)]:
        e = torch.zeros_like(tp)
        e[idx] = h
        fd = (objective(prob, tp + e, ts) - objective(prob, tp - e, ts)) / (2 * h)  # O(h^2) central difference
        assert float(fd) == pytest.approx(float(gp[idx]), abs=1e-9)
    for j in range(2):
        e = torch.zeros_like(ts)
        e[j] = h
        fd = (objective(prob, tp, ts + e) - objective(prob, tp, ts - e)) / (2 * h)
        assert float(fd) == pytest.approx(float(gs[j]), abs=1e-9)


@pytest.mark.parametrize("estimator,G,factor", [
    ("reinforce", 4, 1.0),          # E[R grad log pi] = grad J
    ("rloo", 4, 1.0),               # leave-one-out baseline is independent of the sample: unbiased
    ("dr_grpo", 4, 3 / 4),          # mean baseline includes the sample itself: (G-1)/G
    ("dr_grpo", 2, 1 / 2),
])
def test_sampled_mean_equals_exact_times_factor(estimator, G, factor):
    cfg = ProblemConfig(num_prompts=3, num_responses=4, orthogonality=0.7, reward_noise=0.15,
                        reward_scale_spread=2.0)
    prob1 = make_problem(cfg)
    draws = 40_000
    prob = stack_problems([prob1] * draws)  # many independent draws at the same theta
    tp, ts = random_theta(prob1, 3)
    z = theory.logits(prob1.bias, prob1.phi_private, prob1.phi_shared, tp, ts)
    pi, _, sigma, w_exact = theory.prompt_stats(z, prob1.rbar)
    train = TrainConfig(estimator=estimator, group_size=G)
    keys = run_keys(torch.arange(draws, dtype=torch.int64))
    w = sampled_response_weights(pi.expand(draws, -1, -1), sigma.expand(draws, -1), prob, keys, 0, train)
    mean, se = w.mean(0), w.std(0) / draws**0.5  # [P, K]
    err = (mean - factor * w_exact).abs()
    assert (err < 5 * se + 1e-12).all(), (err / se).max()
