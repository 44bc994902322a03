"""grpo-sim's diagnostics inside TRL's GRPOTrainer (sim.llm.trl) on the project's tiny model, CPU."""

import math

import numpy as np
import pytest

pytest.importorskip("trl", reason="the trl extra is not installed (pip install -e '.[trl]')")

import sim  # noqa: E402
from sim.llm import model as model_mod  # noqa: E402
from sim.llm.trl import GrpoSimDiagnostics, tested_trl_installed  # noqa: E402


def test_the_installed_trl_is_the_tested_one_and_has_the_public_hooks():
    import inspect

    from trl import GRPOTrainer

    assert tested_trl_installed()
    # the reward kwargs the wrapper reads (TRL passes them to every reward function)
    src = inspect.getsource(GRPOTrainer._calculate_rewards)
    assert 'reward_kwargs["log_metric"]' in src and 'reward_kwargs["trainer_state"]' in src


def test_callback_logs_the_diagnostics_and_writes_a_results_directory(tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tok = model_mod.char_tokenizer()
    model = model_mod.tiny_model(len(tok), "tiny", seed=0)
    ds = Dataset.from_dict({"prompt": [f"{i}+{i}=" for i in range(64)]})
    seen = []

    def reward(prompts, completions, **kw):  # varies with the completion, so some groups have a spread
        out = [float(len(c) % 2) for c in completions]
        seen.append(out)
        return out

    diag = GrpoSimDiagnostics(num_generations=4, out=tmp_path / "res")
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, num_generations=4,
                      max_completion_length=6, max_steps=4, logging_steps=1, report_to=[], use_cpu=True,
                      save_strategy="no", beta=0.0, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=diag.wrap(reward), args=args, train_dataset=ds,
                          processing_class=tok, callbacks=[diag])
    trainer.train()
    assert diag.refused == ""
    logs = [h for h in trainer.state.log_history if "frac_reward_zero_std" in h]
    assert len(logs) == 4
    for h, rewards in zip(logs, seen):
        # TRL's own statistics, computed independently: the same rewards reached TRL unchanged
        assert h["reward"] == pytest.approx(np.mean(rewards), abs=1e-6)
        assert h["grpo_sim/zero_std_frac"] == pytest.approx(h["frac_reward_zero_std"], abs=1e-6)
        sigma = np.asarray(rewards).reshape(-1, 4).std(-1)  # population std per group
        assert h["grpo_sim/sigma_mean"] == pytest.approx(sigma.mean(), abs=1e-6)
        assert 0.0 <= h["grpo_sim/rho"] <= 1.0
    runs, steps = sim.load_results(tmp_path / "res")
    assert len(runs) == 1 and list(steps["step"]) == [0, 1, 2, 3]
    assert {"J", "sigma_bar", "zero_std_frac", "rho", "gain", "predicted_gain", "phase"} <= set(steps.columns)
    assert steps["phase"].notna().all()
    assert all(math.isnan(g) == (u != "") for g, u in zip(steps["gain"], steps["gain_undefined"].fillna("")))


def test_too_small_groups_are_refused_in_one_line():
    with pytest.raises(ValueError, match="num_generations"):
        GrpoSimDiagnostics(num_generations=1)
