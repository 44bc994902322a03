"""Adaptive normalization (issue 16, first part): grpo_interpolated and the phase-aware rule."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sim import estimators as E
from theory.orthogonality import gradient_orthogonality

def _rewards(gen, shape=(3, 4, 5), binary=True):
    r = torch.rand(shape, generator=gen, dtype=torch.float64)
    return (r < 0.5).double() * 2.5 if binary else r * 3


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), binary=st.booleans(), eps=st.sampled_from([0.0, 1e-4]),
       ddof=st.sampled_from([0, 1]))
def test_the_ends_are_grpo_and_grpo_batch_bit_for_bit(seed, binary, eps, ddof):
    r = _rewards(torch.Generator().manual_seed(seed), binary=binary)
    assert torch.equal(E.grpo_interpolated(r, alpha=1.0, ddof=ddof, eps=eps), E.grpo(r, ddof=ddof, eps=eps))
    assert torch.equal(E.grpo_interpolated(r, alpha=0.0, ddof=ddof, eps=eps), E.grpo_batch(r, ddof=ddof, eps=eps))
    # per-run alpha: each batch element takes its own end (compared within the same batched call
    # shapes: a reduction over [3, 20] and over [20] may round differently)
    mixed = E.grpo_interpolated(r, alpha=torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), ddof=ddof, eps=eps)
    assert torch.equal(mixed[0], E.grpo(r, ddof=ddof, eps=eps)[0])
    assert torch.equal(mixed[1], E.grpo_batch(r, ddof=ddof, eps=eps)[1])


def test_in_between_the_weight_ratio_is_the_std_ratio_to_the_power_alpha():
    # two prompts with group stds 1 and 4 (rewards +-1 and +-4 around their means), eps = 0:
    # the advantage magnitude per prompt is |R - mean| / (std_i^a std_B^(1-a)), so the ratio of the
    # two prompts' magnitudes is (4 / 1) * (std_1 / std_2)^a = 4 * 4^(-a)
    r = torch.tensor([[0.0, 2.0], [0.0, 8.0]], dtype=torch.float64)  # ddof 0: std = 1 and 4
    for a in (0.0, 0.25, 0.5, 0.75, 1.0):
        A = E.grpo_interpolated(r, alpha=a, ddof=0, eps=0.0)
        assert math.isclose(float(A[1, 1] / A[0, 1]), 4 * 4 ** (-a), rel_tol=1e-12)
    # scale invariance at any alpha (as GRPO and the batch std): rewards x 7 give the same advantages
    assert torch.allclose(E.grpo_interpolated(7 * r, alpha=0.3, ddof=0, eps=0.0),
                          E.grpo_interpolated(r, alpha=0.3, ddof=0, eps=0.0), rtol=1e-13, atol=0)


def test_constant_groups_and_zero_eps_give_zeros_not_nan():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)  # every std 0
    for a in (0.0, 0.5, 1.0):
        A = E.grpo_interpolated(r, alpha=a, ddof=1, eps=0.0)
        assert torch.equal(A, torch.zeros_like(r))
    with pytest.raises(ValueError, match="alpha"):
        E.grpo_interpolated(r, alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        E.grpo_interpolated(r, alpha=float("nan"))


def test_phase_aware_alpha_follows_rho_with_its_running_mean():
    alpha, state = E.phase_aware_alpha(torch.tensor(0.2, dtype=torch.float64))
    assert float(alpha) == 0.2  # the first step takes rho_1
    alpha, state = E.phase_aware_alpha(torch.tensor(1.0, dtype=torch.float64), state, decay=0.75)
    assert math.isclose(float(alpha), 0.2 + 0.25 * 0.8, rel_tol=1e-15)  # 0.4
    with pytest.raises(ValueError, match="decay"):
        E.phase_aware_alpha(torch.tensor(0.5), decay=1.0)
    with pytest.raises(ValueError, match="NaN"):
        E.phase_aware_alpha(torch.tensor(float("nan")))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), steps=st.integers(1, 30), decay=st.floats(0.0, 0.99))
def test_in_the_orthogonal_case_the_rule_is_grpo_at_every_step(seed, steps, decay):
    """The convergence statement's premise, checked: per-prompt gradients in orthogonal subspaces
    (disjoint coordinates, as for orthogonal features) have rho_t = 1 exactly, so alpha_t = 1 and
    the adaptive advantages are GRPO's at every step; the trajectory, and its rate, are GRPO's."""
    gen = torch.Generator().manual_seed(seed)
    P, d = 4, 3
    state = None
    for _ in range(steps):
        g = torch.zeros(P, P * d, dtype=torch.float64)
        for i in range(P):  # prompt i's gradient lives in its own block of coordinates
            g[i, i * d:(i + 1) * d] = torch.randn(d, generator=gen, dtype=torch.float64)
        rho = gradient_orthogonality(g @ g.T)
        assert float(rho) == 1.0
        alpha, state = E.phase_aware_alpha(rho, state, decay=decay)
        r = _rewards(gen, shape=(P, 6))
        assert torch.equal(E.grpo_interpolated(r, alpha=alpha), E.grpo(r))
