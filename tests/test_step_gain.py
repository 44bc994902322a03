"""sim.step_gain: the measured per-step gain against a per-draw reference built from the engine's own
sampled update and theory's J, its control variate's unbiasedness, and its NaN reasons."""

import math

import pytest
import torch

import theory
from sim import estimators, step_gain
from sim.config import RunConfig, TrainConfig
from sim.engine import init_state, sampled_response_weights
from sim.problems import ProblemConfig, make_problem, stack_problems


def _state(o=0.5, noise=0.1, seeds=(0, 1)):
    cfg = ProblemConfig(num_prompts=4, num_responses=5, orthogonality=o, reward_noise=noise, difficulty_spread=0.5)
    runs = [RunConfig(cfg, TrainConfig(estimator="grpo", lr=3.0, seed=s)) for s in seeds]
    st = init_state(runs)
    g = torch.Generator().manual_seed(3)
    st.theta_private += 0.7 * torch.randn(st.theta_private.shape, generator=g, dtype=torch.float64)
    st.theta_shared += 0.7 * torch.randn(st.theta_shared.shape, generator=g, dtype=torch.float64)
    from sim.engine import _with_stats
    return _with_stats(st), cfg


@pytest.mark.parametrize("name", ["grpo", "reinforce", "grpo_batch", "trl_group"])
def test_sampled_changes_equal_a_per_draw_reference(name):
    st, cfg = _state()
    prob, R, P = st.batch.problem, st.theta_private.shape[0], st.theta_private.shape[1]
    N, step, G = 3, 7, 4
    lr = torch.tensor([3.0, 5.0], dtype=torch.float64)
    got = step_gain.sampled_changes(st.pi, st.sigma, st.mu, st.w, prob, st.theta_private, st.theta_shared,
                                    st.batch.keys, step, G, {name: lr}, 1, 1e-4, N)[name]  # [R, N]
    keys = step_gain.draw_keys(st.batch.keys, N).reshape(R, N)
    train = TrainConfig(estimator=name, group_size=G)
    spec = estimators.get(name)
    for r in range(R):
        one = stack_problems([make_problem(cfg)])
        g_p, g_s = theory.per_prompt_gradients(st.w[r:r + 1], one.phi_private, one.phi_shared)
        h, known = spec.expected_scale(st.sigma[r:r + 1], st.mu[r:r + 1], one.scale, exact=False, group_size=G,
                                       ddof=1, eps=1e-4)
        a = float(lr[r]) / P
        e_p, e_s = a * h.unsqueeze(-1) * g_p, a * (h.unsqueeze(-1) * g_s).sum(-2)  # E Delta
        for n in range(N):
            w = sampled_response_weights(st.pi[r:r + 1], st.sigma[r:r + 1], one, keys[r, n:n + 1], step, train)
            d_p, d_s = theory.summed_gradient(w, one.phi_private, one.phi_shared)
            d_p, d_s = a * d_p, a * d_s
            mu_new = theory.prompt_stats(theory.logits(one.bias, one.phi_private, one.phi_shared,
                                                       st.theta_private[r:r + 1] + d_p,
                                                       st.theta_shared[r:r + 1] + d_s), one.rbar)[1]
            ref = float(mu_new.mean() - st.mu[r].mean())
            if known:  # grad J = (1/P) sum_i g_i; control variate grad J . (Delta - E Delta)
                ref -= float(((g_p * (d_p - e_p)).sum() + (g_s.sum(-2) * (d_s - e_s)).sum()) / P)
            assert float(got[r, n]) == pytest.approx(ref, rel=1e-10, abs=1e-14)


def test_control_variate_leaves_the_mean_and_cuts_the_noise():
    """Mean over 4000 draws with and without the control variate agree within their errors."""
    st, _ = _state(o=1.0, noise=0.0)
    lrs = {"grpo": torch.tensor([1.0, 1.0], dtype=torch.float64)}
    args = (st.pi, st.sigma, st.mu, st.w, st.batch.problem, st.theta_private, st.theta_shared, st.batch.keys, 0, 8)
    with_cv = step_gain.sampled_changes(*args, lrs, 1, 1e-4, 4000)["grpo"]
    plain = step_gain.sampled_changes(*args, lrs, 1, 1e-4, 4000, control_variate=False)["grpo"]  # same draws
    se = (plain.std(-1) / math.sqrt(4000))
    assert ((with_cv.mean(-1) - plain.mean(-1)).abs() <= 4 * se).all()
    assert (with_cv.std(-1) < 0.5 * plain.std(-1)).all()


def test_gain_reasons_instead_of_placeholders():
    a = torch.tensor([[0.2, 0.4], [0.1, 0.1], [0.3, -0.1]], dtype=torch.float64)
    b = torch.tensor([[0.1, 0.2], [0.0, 0.0], [0.5, -0.45]], dtype=torch.float64)
    gain, se, reason = step_gain.gain_from_changes(a, b)
    assert float(gain[0]) == pytest.approx(2.0) and float(se[0]) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(gain[1]) and reason[1] == "reinforce_flat"
    # mean 0.025 with standard error std([0.5, -0.45]) / sqrt(2) = 0.475: not distinguishable from 0
    assert math.isnan(gain[2]) and reason[2] == "reinforce_noisy"
    assert list(reason[:1]) == [""]
    # exact mode (one 'draw'): the deterministic ratio, NaN only where REINFORCE does not move
    g1, _, r1 = step_gain.gain_from_changes(torch.tensor([[0.3], [0.2]]), torch.tensor([[0.1], [-1e-13]]))
    assert float(g1[0]) == pytest.approx(3.0) and math.isnan(g1[1]) and list(r1) == ["", "reinforce_flat"]
    assert math.isnan(theory.per_step_gain(torch.tensor([1.0]), torch.tensor([0.0]))[0])
