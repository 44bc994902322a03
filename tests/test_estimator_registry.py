"""Generated from sim.estimators.REGISTRY: every entry's expected sampled update equals its stated
exact-mode limit (exactly at every G where the entry says so, as G grows where it is a limit).

Exact expectation, no sampling. Take P = 2 prompts; prompt i's observed reward is c_i with
probability p_i and 0 otherwise (independently across the G samples). For sample 1 of prompt 0,
y and the other rewards are independent given its own reward R (A depends on y only through
R), so with E[e_y | R] the response distribution given R:

    E[A_01 (e_y - pi)] = sum_R P(R) E[A_01 | R] (E[e_y | R] - pi),

and p (E[e_y | R=c] - pi) = pi (q - p) = -(1 - p)(E[e_y | R=0] - pi) with q_y = P(R=c | y), so

    E[(1/G) sum_g A_0g (e_(y_0g) - pi)] = s pi (rbar - mu),   s = (E[A_01 | R=c] - E[A_01 | R=0]) / c,

where rbar = c q, mu = c p: exactly the exact-mode update s_0 w_0 of the engine. E[A_01 | R]
is a finite sum over the counts of successes among the other G-1 rewards of prompt 0
(Binomial(G-1, p_0)) and the G rewards of prompt 1 (Binomial(G, p_1)): every advantage here is
symmetric in a group's samples, so one reward tensor per count pair gives the conditional value.
"""

import math

import pytest
import torch

from sim import estimators as E

C = (1.0, 2.5)   # reward scales c_0, c_1
P_OBS = (0.3, 0.6)  # success probabilities p_0, p_1 of an observed reward


def expected_scale(spec: E.EstimatorSpec, G: int, sigma: torch.Tensor, eps: float = 1e-4) -> float:
    """s of the module docstring for prompt 0, by exact enumeration. sigma [2]: the true sigma_i."""
    c0, c1 = C
    p0, p1 = P_OBS
    n0 = torch.arange(G)       # successes among the other G-1 samples of prompt 0
    n1 = torch.arange(G + 1)   # successes among the G samples of prompt 1
    w0 = torch.tensor([math.comb(G - 1, k) * p0**k * (1 - p0) ** (G - 1 - k) for k in range(G)], dtype=torch.float64)
    w1 = torch.tensor([math.comb(G, k) * p1**k * (1 - p1) ** (G - k) for k in range(G + 1)], dtype=torch.float64)
    idx = torch.arange(G)
    row1 = c1 * (idx[None, :] < n1[:, None]).double()  # [G+1, G]: n1 successes
    cond = []
    for own in (c0, 0.0):
        row0 = c0 * (idx[None, :] <= n0[:, None]).double()  # [G, G]: samples 1..n0 succeed
        row0[:, 0] = own  # sample 0's own reward
        rewards = torch.stack(torch.broadcast_tensors(row0[:, None, :], row1[None, :, :]), dim=-2)  # [G, G+1, 2, G]
        adv = spec.advantages(rewards, ddof=1, eps=eps, sigma=sigma.expand(G, G + 1, 2))  # [G, G+1, 2, G]
        cond.append(float((w0[:, None] * w1[None, :] * adv[..., 0, 0]).sum()))
    return (cond[0] - cond[1]) / c0


def noise_free_sigma() -> torch.Tensor:
    """Noise-free rewards: rbar = R, so sigma_i = c_i sqrt(p_i (1 - p_i)) and mu_i = c_i p_i."""
    return torch.tensor([c * math.sqrt(p * (1 - p)) for c, p in zip(C, P_OBS)], dtype=torch.float64)


def stated_limit(spec: E.EstimatorSpec, sigma: torch.Tensor, eps: float = 1e-4) -> float:
    mu = torch.tensor([c * p for c, p in zip(C, P_OBS)], dtype=torch.float64)
    return float(spec.scale(sigma, mu, eps)[0])


def test_enumeration_reproduces_a_hand_derived_case():
    # REINFORCE, any G: s = (E[R | R = c] - E[R | R = 0]) / c = (c - 0) / c = 1
    assert expected_scale(E.get("reinforce"), 3, noise_free_sigma()) == pytest.approx(1.0, abs=1e-14)
    # Dr. GRPO, G = 2: A_01 = (R_01 - R_02) / 2, E[A | R=c] - E[A | R=0] = c / 2, so s = 1/2 = (G-1)/G
    assert expected_scale(E.get("dr_grpo"), 2, noise_free_sigma()) == pytest.approx(0.5, abs=1e-14)


EXACT = [n for n, s in E.REGISTRY.items() if s.exact_factor is not None]
LIMIT = [n for n, s in E.REGISTRY.items() if s.exact_factor is None]


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("G", [2, 3, 8])
@pytest.mark.parametrize("noisy", [False, True])
def test_exact_entries_equal_their_limit_at_every_group_size(name, G, noisy):
    spec = E.get(name)
    # with observation noise the true sigma_i (std of the mean reward) is below the observed-reward
    # std; only grpo_oracle reads it, and it must be taken as given
    sigma = noise_free_sigma() * (0.6 if noisy else 1.0)
    want = spec.exact_factor(G) * stated_limit(spec, sigma)
    assert expected_scale(spec, G, sigma) == pytest.approx(want, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("name", LIMIT)
def test_limit_entries_converge_to_their_limit_as_G_grows(name):
    spec = E.get(name)
    sigma = noise_free_sigma()
    want = stated_limit(spec, sigma)
    err = {G: abs(expected_scale(spec, G, sigma) / want - 1) for G in (8, 32, 128)}
    # the sample std and the batch std are consistent with O(1/G) bias (delta method): the error
    # must shrink as G grows (by at least 2x per 4x here) and be small at G = 128
    assert err[128] < 0.02, err
    assert err[128] < err[32] / 2 < err[8] / 4, err


FINITE = [n for n, s in E.REGISTRY.items() if s.finite_scale is not None]


@pytest.mark.parametrize("name", FINITE)
@pytest.mark.parametrize("G", [2, 3, 8])
def test_finite_scale_entries_are_exact_at_every_group_size(name, G):
    """finite_scale (theory.finite_group, closed form) = the enumerated expected update at finite G."""
    spec = E.get(name)
    sigma = noise_free_sigma()
    mu = torch.tensor([c * p for c, p in zip(C, P_OBS)], dtype=torch.float64)
    h, exact = spec.expected_scale(sigma, mu, torch.tensor(C, dtype=torch.float64), exact=False, group_size=G,
                                   ddof=1, eps=1e-4)
    assert exact and float(h[0]) == pytest.approx(expected_scale(spec, G, sigma), rel=1e-12)


def test_finite_scale_is_given_for_grpo_and_its_plain_presets():
    assert set(FINITE) == {"grpo", "trl_group", "verl_grpo", "openrlhf_group_norm"}


def test_every_entry_is_tested_by_one_of_the_two():
    assert set(EXACT) | set(LIMIT) == set(E.ALL_NAMES) and not set(EXACT) & set(LIMIT)


def test_an_entry_without_its_limit_cannot_be_made():
    with pytest.raises(TypeError, match="exact-mode limit"):
        E.EstimatorSpec("new", "New", E.reinforce, None, None, False, 1, True, "none")
    with pytest.raises(TypeError):
        E.EstimatorSpec("new", "New", E.reinforce)  # the limit fields have no defaults
