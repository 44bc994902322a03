"""Objective mismatch (theory.normalized_objective): at o = 0 with spread reward scales REINFORCE ends
with the higher J and GRPO with the higher F = mean_i 2 arcsin sqrt(p_i), and the comparison says so;
with orthogonal prompts there is no mismatch (both reach J*)."""

import pandas as pd

from sim.analysis import add_comparisons, summarize
from sim.config import RunConfig, TrainConfig
from sim.engine import train_batch
from sim.problems import ProblemConfig, make_problem


def _compare(o):
    cfg = ProblemConfig(orthogonality=o, reward_scale_spread=10.0, num_prompts=8)
    prob = make_problem(cfg)
    runs = pd.concat([train_batch([RunConfig(cfg, TrainConfig(estimator=e, mode="exact", steps=1500,
                                                              lr=float(prob.theory_lr(e == "grpo"))))]).runs
                      for e in ("grpo", "reinforce")], ignore_index=True)
    return add_comparisons(runs).set_index("estimator")


def test_competing_prompts_with_spread_scales_are_flagged():
    out = _compare(0.0)
    assert out.loc["reinforce", "final_J"] > out.loc["grpo", "final_J"]
    assert out.loc["grpo", "final_F"] > out.loc["reinforce", "final_F"]
    assert bool(out.loc["grpo", "objective_mismatch"]) and not bool(out.loc["reinforce", "objective_mismatch"])
    assert summarize(out.reset_index()).set_index("estimator").loc["grpo", "objective_mismatch"] == 1


def test_orthogonal_prompts_have_no_mismatch():
    out = _compare(1.0)
    assert not out["objective_mismatch"].any()
