"""Problem family (DESIGN.md §2): determinism, initial success rates, features, storage."""

import math

import numpy as np
import pytest
import torch

from sim.problems import ProblemConfig, make_problem, stack_problems


@pytest.mark.parametrize("kind", ["tabular", "linear"])
def test_deterministic_from_problem_seed(kind):
    a = make_problem(ProblemConfig(kind=kind, problem_seed=3))
    b = make_problem(ProblemConfig(kind=kind, problem_seed=3))
    c = make_problem(ProblemConfig(kind=kind, problem_seed=4, difficulty_layout="random"))
    for name in ("bias", "rbar", "phi_private", "phi_shared", "scale"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.phi_shared, c.phi_shared)


def test_initial_success_rates_are_the_configured_spread():
    cfg = ProblemConfig(num_prompts=5, num_responses=6, base_success=0.3, difficulty_spread=0.5)
    prob = make_problem(cfg)
    p0 = torch.softmax(prob.bias, -1)[:, 0].numpy()
    # logit(p_i) = logit(0.3) + 0.5 * logit(0.99) * [-1, -.5, 0, .5, 1]
    logit = math.log(0.3 / 0.7) + 0.5 * math.log(99) * np.linspace(-1, 1, 5)
    np.testing.assert_allclose(p0, 1 / (1 + np.exp(-logit)), rtol=1e-12)


def test_rewards_noise_and_scales():
    cfg = ProblemConfig(num_prompts=4, num_responses=3, reward_scale_spread=8.0, reward_noise=0.1)
    prob = make_problem(cfg)
    # c_i are the log-even points 8^(0, 1/3, 2/3, 1) = 1, 2, 4, 8 in some order
    np.testing.assert_allclose(np.sort(prob.scale.numpy()), [1, 2, 4, 8], rtol=1e-12)
    np.testing.assert_allclose(prob.rbar[:, 0].numpy(), 0.9 * prob.scale.numpy())
    np.testing.assert_allclose(prob.rbar[:, 1:].numpy(), 0.1 * prob.scale.numpy()[:, None].repeat(2, 1))
    # sigma_bound = max_i c_i (1 - 2f) / 2 = 8 * .8 / 2
    assert float(prob.sigma_bound) == pytest.approx(3.2)
    assert float(prob.j_star) == pytest.approx(0.9 * 15 / 4)


@pytest.mark.parametrize("kind", ["tabular", "linear"])
@pytest.mark.parametrize("o", [0.0, 0.3, 1.0])
def test_features_have_unit_norm_and_block_storage(kind, o):
    cfg = ProblemConfig(kind=kind, num_prompts=6, num_responses=5, orthogonality=o)
    prob = make_problem(cfg)
    # per prompt, never [P, K, P*k+s]
    assert prob.phi_private.shape == (6, 5, 5) and prob.phi_shared.shape == (6, 5, 5)
    norm2 = (prob.phi_private**2).sum(-1) + (prob.phi_shared**2).sum(-1)  # ||phi(x_i, y)||^2
    torch.testing.assert_close(norm2, torch.ones(6, 5, dtype=torch.float64))


def test_tabular_orthogonal_is_the_one_hot_bandit():
    prob = make_problem(ProblemConfig(kind="tabular", num_prompts=3, num_responses=4, orthogonality=1.0))
    assert torch.equal(prob.phi_private, torch.eye(4, dtype=torch.float64).expand(3, 4, 4))
    assert torch.equal(prob.phi_shared, torch.zeros(3, 4, 4, dtype=torch.float64))


def test_tabular_rejects_other_block_sizes():
    with pytest.raises(ValueError, match="private-dim"):
        make_problem(ProblemConfig(kind="tabular", num_responses=4, private_dim=3))


def test_stack_problems_adds_run_dim():
    ps = [make_problem(ProblemConfig(orthogonality=o)) for o in (0.2, 0.8)]
    st = stack_problems(ps)
    assert st.phi_private.shape[0] == 2 and st.orthogonality.shape == (2,)
