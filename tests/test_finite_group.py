"""Finite-G theory (theory.finite_group): the closed form h_G(p) against exact enumeration with the
project's own estimator, its limits, and Monte Carlo of the sampled update it describes."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sim import estimators as E
from theory.finite_group import binomial_weights, expected_scale, grpo_expected_scale


def _grpo(ddof, eps):
    return lambda r: E.get("grpo").advantages(r.unsqueeze(-2), ddof=ddof, eps=eps).squeeze(-2)


@settings(deadline=None, max_examples=40)
@given(G=st.integers(2, 17), p=st.floats(0.0, 1.0), ddof=st.sampled_from([0, 1]),
       eps=st.sampled_from([0.0, 1e-6, 1e-4, 0.1]), c=st.sampled_from([1.0, 3.5, 0.2]))
def test_closed_form_equals_enumeration_of_the_project_estimator(G, p, ddof, eps, c):
    h = float(grpo_expected_scale(torch.tensor(p, dtype=torch.float64), G, ddof, eps, c))
    assert h == pytest.approx(expected_scale(_grpo(ddof, eps), p, c, G), rel=1e-12, abs=1e-12)


def test_limits():
    # p -> 0, eps = 0, ddof = 1: only j = 0 survives, (1 - 1/G) / sqrt((G-1)/(G(G-1))) / c = (G-1)/(sqrt(G) c)
    for G in (2, 4, 8, 32):
        h = float(grpo_expected_scale(torch.tensor(1e-12, dtype=torch.float64), G, 1, 0.0, 2.0))
        assert h == pytest.approx((G - 1) / math.sqrt(G) / 2.0, rel=1e-9)
    # G -> infinity: 1 / (c sqrt(p (1 - p)) + eps); the gap shrinks like 1/G
    p, c = 0.3, 1.5
    limit = 1 / (c * math.sqrt(p * (1 - p)) + 1e-4)
    errs = [abs(float(grpo_expected_scale(torch.tensor(p, dtype=torch.float64), G, 1, 1e-4, c)) / limit - 1)
            for G in (250, 1000, 4000)]
    assert errs[2] < 2e-3 and errs[1] < errs[0] / 2 and errs[2] < errs[1] / 2
    # binomial weights sum to 1 and are exact at the ends
    w = binomial_weights(torch.tensor([0.0, 0.37, 1.0], dtype=torch.float64), 9)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-14)
    assert float(w[0, 0]) == 1.0 and float(w[2, 9]) == 1.0


@pytest.mark.parametrize("G,noise", [(2, 0.0), (4, 0.2), (8, 0.0), (8, 0.3)])
def test_monte_carlo_of_the_sampled_update(G, noise):
    """E[(1/G) sum_g A_g (e_(y_g) - pi)] = h_G(p) pi (rbar - mu) for one prompt (K = 4 responses,
    response 0 correct, observed reward flipped with probability ``noise``), 400k groups."""
    gen = torch.Generator().manual_seed(G)
    K, N, c = 4, 400_000, 2.0
    pi = torch.tensor([0.15, 0.4, 0.25, 0.2], dtype=torch.float64)
    q = torch.full((K,), noise, dtype=torch.float64)
    q[0] = 1 - noise
    y = torch.multinomial(pi, N * G, replacement=True, generator=gen).view(N, G)
    R = c * (torch.rand(N, G, generator=gen, dtype=torch.float64) < q[y]).double()
    A = E.get("grpo").advantages(R.unsqueeze(-2), ddof=1, eps=1e-4).squeeze(-2)  # [N, G]
    onehot = torch.nn.functional.one_hot(y, K).double()  # [N, G, K]
    upd = ((A.unsqueeze(-1) * (onehot - pi)).mean(1))  # [N, K]
    mean, se = upd.mean(0), upd.std(0) / math.sqrt(N)
    rbar = c * q
    mu = float((pi * rbar).sum())
    expected = float(grpo_expected_scale(torch.tensor(mu / c, dtype=torch.float64), G, 1, 1e-4, c)) * pi * (rbar - mu)
    assert ((mean - expected).abs() <= 5 * se + 1e-12).all(), (mean, expected, se)
