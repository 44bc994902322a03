"""Problems that lose orthogonality as training goes on (ProblemConfig.failure_mode), and the three
phases in one run (experiments/fig5_phases.toml)."""

import math

import pytest
import torch

from sim.config import RunConfig, TrainConfig
from sim.engine import train_batch
from sim.problems import ProblemConfig, make_problem


@pytest.mark.parametrize("kind", ["linear", "tabular"])
def test_failure_mode_features(kind):
    beta = 0.9
    cfg = ProblemConfig(kind=kind, orthogonality=1.0, failure_mode=beta, num_prompts=6, num_responses=4)
    prob = make_problem(cfg)
    phi = torch.cat([prob.phi_private, prob.phi_shared], -1)  # [P, K, D]
    torch.testing.assert_close(phi.norm(dim=-1), torch.ones(6, 4, dtype=torch.float64))  # B = 1 kept
    # at o = 1 the correct response has no shared part, so cos(phi_0, phi_1) = beta exactly
    torch.testing.assert_close((phi[:, 0] * phi[:, 1]).sum(-1), torch.full((6,), beta, dtype=torch.float64))
    shared = prob.phi_shared[:, 1]  # [P, s]: +- sqrt(1 - beta^2) f, half the prompts each sign
    f = shared[0] / shared[0].norm()
    signs = (shared @ f) / math.sqrt(1 - beta**2)
    torch.testing.assert_close(signs.abs(), torch.ones(6, dtype=torch.float64))
    assert int((signs > 0).sum()) == 3
    assert torch.equal(make_problem(ProblemConfig(kind=kind, orthogonality=1.0, num_prompts=6, num_responses=4)
                                    ).phi_private[:, 2:], prob.phi_private[:, 2:])  # other responses unchanged


def _phase_runs(beta, steps=600):
    cfg = ProblemConfig(orthogonality=1.0, failure_mode=beta, reward_scale_spread=10.0, difficulty_spread=0.6)
    lr = float(make_problem(cfg).theory_lr(True))
    return train_batch([RunConfig(cfg, TrainConfig(estimator="grpo", mode="sampled", steps=steps, seed=0,
                                                   log_points=96, lr=lr))])


def test_rho_falls_below_a_quarter_and_the_three_phases_appear_in_order():
    """The documented config: rho_t starts near 1 and falls below 0.25; the phases go I -> II -> III
    on measured gain and rho. The control (no failure mode) keeps rho_t near 1 and never reaches III."""
    lost = _phase_runs(0.95).steps
    assert lost.rho.iloc[0] > 0.95 and lost.rho.min() < 0.25
    order = [p for i, p in enumerate(lost.phase) if i == 0 or p != lost.phase.iloc[i - 1]]
    assert order == ["I", "II", "III"]
    control = _phase_runs(0.0).steps
    assert control.rho.min() > 0.95 and "III" not in set(control.phase) and control.phase.iloc[0] == "I"
