"""Estimators and library presets against hand-derived values (DESIGN.md §4)."""

import math

import pytest
import torch

from sim import estimators as E

# P = 3 prompts, G = 4 samples; row 1 is a constant group.
R = torch.tensor([[1.0, 0.0, 0.0, 1.0],
                  [1.0, 1.0, 1.0, 1.0],
                  [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
# mean baseline: row0 mean .5, row2 mean .25
DR = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.25, -0.25, -0.25, 0.75]], dtype=torch.float64)
# within-group std, ddof=1: row0 var = 4 * .25 / 3 = 1/3; row2 var = (3 * .0625 + .5625) / 3 = .25
STD1 = torch.tensor([[math.sqrt(1 / 3)], [0.0], [0.5]], dtype=torch.float64)
# batch std over all 12 rewards, ddof=1: 7 ones, mean 7/12, var = (7 (5/12)^2 + 5 (7/12)^2) / 11 = 420/1584
BATCH_STD1 = math.sqrt(420 / 1584)
# whitening of DR over all 12 entries: mean 0, sum of squares = 4 * .25 + 3 * .0625 + .5625 = 1.75
SS = 1.75


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_reinforce_is_the_reward():
    close(E.advantages("reinforce", R), R)


def test_dr_grpo_mean_baseline():
    close(E.advantages("dr_grpo", R), DR)


def test_rloo_leave_one_out():
    # row0, k=0: 1 - (0 + 0 + 1)/3 = 2/3; row2, k=3: 1 - 0 = 1; k=0: 0 - 1/3
    expected = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0.0] * 4, [-1 / 3, -1 / 3, -1 / 3, 1.0]],
                            dtype=torch.float64)
    close(E.advantages("rloo", R), expected)
    close(E.advantages("rloo", R), DR * 4 / 3)  # = G/(G-1) (R - mean)


@pytest.mark.parametrize("eps", [1e-4, 1e-6, 0.0])
def test_grpo_group_std_ddof1(eps):
    expected = torch.where(STD1 > 0, DR / (STD1 + eps), torch.zeros_like(DR))
    close(E.advantages("grpo", R, ddof=1, eps=eps), expected)


def test_grpo_ddof0():
    std0 = torch.tensor([[0.5], [0.0], [math.sqrt(0.1875)]], dtype=torch.float64)  # row2: .75/4
    expected = torch.where(std0 > 0, DR / (std0 + 1e-4), torch.zeros_like(DR))
    close(E.advantages("grpo", R, ddof=0, eps=1e-4), expected)


def test_grpo_batch_uses_batch_std_and_group_mean():
    close(E.advantages("grpo_batch", R, ddof=1, eps=1e-4), DR / (BATCH_STD1 + 1e-4))


def test_grpo_oracle_uses_given_sigma():
    sigma = torch.tensor([0.5, 0.0, 0.25], dtype=torch.float64)
    expected = DR / (sigma[:, None] + 1e-4)
    close(E.advantages("grpo_oracle", R, eps=1e-4, sigma=sigma), expected)


def test_presets_match_library_formulas():
    # TRL scale_rewards: group -> (R - mean)/(std1 + 1e-4); batch -> (R - mean)/(batch std1 + 1e-4); none -> R - mean
    close(E.advantages("trl_group", R), torch.where(STD1 > 0, DR / (STD1 + 1e-4), torch.zeros_like(DR)))
    close(E.advantages("trl_batch", R), DR / (BATCH_STD1 + 1e-4))
    close(E.advantages("trl_none", R), DR)
    # verl grpo: eps 1e-6; OpenRLHF group_norm: eps 1e-9
    close(E.advantages("verl_grpo", R), torch.where(STD1 > 0, DR / (STD1 + 1e-6), torch.zeros_like(DR)))
    close(E.advantages("openrlhf_group_norm", R), torch.where(STD1 > 0, DR / (STD1 + 1e-9), torch.zeros_like(DR)))
    # verl rf++-baseline: mean baseline, then masked_whiten: unbiased var (SS/11), rsqrt(var + 1e-8)
    close(E.advantages("verl_rfpp_baseline", R), DR / math.sqrt(SS / 11 + 1e-8))
    # OpenRLHF reinforce_baseline: mean baseline, then biased var (SS/12) clamped at 1e-8
    close(E.advantages("openrlhf_reinforce_baseline", R), DR / math.sqrt(SS / 12))
    close(E.advantages("verl_rloo", R), DR * 4 / 3)
    close(E.advantages("openrlhf_rloo", R), DR * 4 / 3)


@pytest.mark.parametrize("name", [n for n, s in E.REGISTRY.items() if s.base != "reinforce"])
@pytest.mark.parametrize("value", [0.1, 1.0, 0.0, 7.3])
def test_constant_group_gives_exactly_zero(name, value):
    # 0.1 * 3 / 3 != 0.1 in floating point: the rule must not depend on rounding
    r = torch.full((2, 3), value, dtype=torch.float64)
    adv = E.advantages(name, r, ddof=1, eps=0.0, sigma=torch.zeros(2, dtype=torch.float64))
    assert torch.equal(adv, torch.zeros_like(adv))


def test_zero_eps_no_nan_on_whole_constant_batch():
    r = torch.zeros(4, 8, dtype=torch.float64)
    for name in E.ALL_NAMES:
        adv = E.advantages(name, r, eps=0.0, sigma=torch.zeros(4, dtype=torch.float64))
        assert torch.isfinite(adv).all(), name


@pytest.mark.parametrize("name", list(E.BASE_NAMES))
def test_leading_batch_dims_are_independent(name):
    g = torch.Generator().manual_seed(0)
    r = (torch.rand(5, 3, 6, generator=g, dtype=torch.float64) < 0.4).double() * 2.0
    sigma = torch.rand(5, 3, generator=g, dtype=torch.float64)
    batched = E.advantages(name, r, sigma=sigma)
    for b in range(5):
        close(batched[b], E.advantages(name, r[b], sigma=sigma[b]))


def test_rloo_needs_two():
    with pytest.raises(ValueError, match="G >= 2"):
        E.advantages("rloo", torch.ones(2, 1))


def test_unknown_estimator():
    with pytest.raises(ValueError, match="unknown estimator"):
        E.advantages("ppo", R)


def test_population_scale():
    sigma = torch.tensor([0.5, 0.0, 0.25], dtype=torch.float64)
    mu = torch.tensor([0.5, 1.0, 0.25], dtype=torch.float64)
    close(E.population_scale("reinforce", sigma, mu, 1e-4), torch.ones(3, dtype=torch.float64))
    close(E.population_scale("grpo", sigma, mu, 0.0), torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64))
    # sigma_B^2 = mean(.25, 0, .0625) + var(.5, 1, .25) = .3125/3 + (0 + .25 + .0625 - 3 * ... ) -> computed:
    mean_mu = (0.5 + 1.0 + 0.25) / 3
    var_b = (0.25 + 0.0 + 0.0625) / 3 + sum((m - mean_mu) ** 2 for m in (0.5, 1.0, 0.25)) / 3
    close(E.population_scale("grpo_batch", sigma, mu, 0.0), torch.full((3,), 1 / math.sqrt(var_b), dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown estimator"):
        E.population_scale("no_such_estimator", sigma, mu, 0.0)


def test_shapes_are_checked_at_the_entry_points():
    # a [P, 1] sigma used to broadcast silently into a [P, P, G] result
    with pytest.raises(ValueError, match=r"grpo_oracle: sigma has P = 1 .* rewards has P = 3"):
        E.advantages("grpo_oracle", R, sigma=torch.ones(3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"must have shape \[\.\.\., P, G\]"):
        E.advantages("grpo", torch.ones(4))
    with pytest.raises(ValueError, match="leading"):
        E.advantages("grpo_oracle", torch.ones(2, 3, 4), sigma=torch.ones(5, 3))
