"""grpo-sim's diagnostics inside TRL's GRPOTrainer (sim.llm.trl) on the project's tiny model, CPU."""

import math
import subprocess

import numpy as np
import pytest

pytest.importorskip("trl", reason="the trl extra is not installed (pip install -e '.[trl]')")

import sim  # noqa: E402
from sim.llm import model as model_mod  # noqa: E402
from sim.llm.trl import GrpoSimDiagnostics  # noqa: E402
from sim.llm.trl import tested_trl_installed as trl_in_tested_range  # noqa: E402
from helpers import TWO_PROCESS_LAUNCHERS, run_cli  # noqa: E402


def test_the_installed_trl_is_the_tested_one_and_has_the_public_hooks():
    import inspect

    from trl import GRPOTrainer

    assert trl_in_tested_range()
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
    # a step's empirical M is measured after its update, so TRL logs it with the next step's metrics
    assert "grpo_sim/empirical_M" not in logs[0]
    assert all(h["grpo_sim/empirical_M"] >= 0 for h in logs[1:])
    runs, steps = sim.load_results(tmp_path / "res")
    assert len(runs) == 1 and list(steps["step"]) == [0, 1, 2, 3]
    assert {"J", "sigma_bar", "zero_std_frac", "rho", "gain", "predicted_gain", "phase",
            "empirical_M"} <= set(steps.columns)
    assert steps["empirical_M"].notna().all() and (steps["empirical_M"] >= 0).all()
    assert [h["grpo_sim/empirical_M"] for h in logs[1:]] == pytest.approx(list(steps["empirical_M"][:3]))
    assert steps["phase"].notna().all()
    assert all(math.isnan(g) == (u != "") for g, u in zip(steps["gain"], steps["gain_undefined"].fillna("")))
    # and sim figures draws its phases from it, as fig. 5 does the simulator's
    from paper_figs import build

    (drawn,) = build.render_from([tmp_path / "res"], tmp_path / "fig")
    assert [f.name for f in drawn.files] == ["training_phases.pdf", "training_phases.png"]
    assert all(f.stat().st_size > 1000 for f in drawn.files)


def test_too_small_groups_are_refused_in_one_line():
    with pytest.raises(ValueError, match="num_generations"):
        GrpoSimDiagnostics(num_generations=1)


def _sim_trainer(tmp_path, estimator, reward_fn, steps=1):
    from datasets import Dataset
    from trl import GRPOConfig

    from sim.llm.trl import sim_grpo_trainer

    tok = model_mod.char_tokenizer()
    model = model_mod.tiny_model(len(tok), "tiny", seed=0)
    ds = Dataset.from_dict({"prompt": [f"{i}*{i}=" for i in range(32)]})
    diag = GrpoSimDiagnostics(num_generations=4, every=0)
    args = GRPOConfig(output_dir=str(tmp_path / estimator), per_device_train_batch_size=16, num_generations=4,
                      max_completion_length=6, max_steps=steps, report_to=[], use_cpu=True, save_strategy="no",
                      beta=0.0, seed=1, scale_rewards="group")
    trainer = sim_grpo_trainer()(model=model, args=args, train_dataset=ds, processing_class=tok,
                                 reward_funcs=diag.wrap(reward_fn), callbacks=[diag], sim_estimator=estimator,
                                 sim_diagnostics=diag)
    trainer.train()
    return trainer, diag


def _varying(prompts, completions, **kw):
    return [float(len(c) % 3) / 2 for c in completions]


def test_the_private_hook_exists():
    from trl import GRPOTrainer

    assert callable(getattr(GRPOTrainer, "_generate_and_score_completions", None))


def test_trl_preset_reproduces_trls_own_advantages_and_reinforce_runs_inside_trl(tmp_path):
    import torch

    trainer, diag = _sim_trainer(tmp_path, "trl_group", _varying)  # TRL scale_rewards="group", eps 1e-4
    rewards = torch.as_tensor(diag.last_rewards)
    assert rewards.std() > 0  # the check below is not about all-zero advantages
    own = trainer.trl_advantages
    from sim import estimators

    ours = estimators.advantages("trl_group", rewards.view(-1, 4)).reshape(-1)
    torch.testing.assert_close(ours.float(), own.float(), rtol=1e-5, atol=1e-6)
    trainer, diag = _sim_trainer(tmp_path, "reinforce", _varying)  # GRPOTrainer has no REINFORCE: ours
    rewards = torch.as_tensor(diag.last_rewards, dtype=torch.float32)
    # the advantages TRL trained on are the rewards themselves (no baseline), not TRL's group-normalized ones
    torch.testing.assert_close(trainer._sim_last_advantages, rewards)
    assert not torch.allclose(trainer.trl_advantages, rewards)


def test_both_backends_compute_the_same_advantages_from_the_same_rewards(tmp_path, monkeypatch):
    """The native runner's _advantages and the TRL backend apply one function (sim.estimators) with
    the run's ddof and eps: on the same rewards they give the same numbers."""
    import torch

    from sim.llm import trainer as T

    (tmp_path / "tiny").mkdir()
    tok = model_mod.char_tokenizer()
    model_mod.tiny_model(len(tok), "tiny", seed=0).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    from sim import estimators

    tables = []  # the per-prompt state before each of TRL's steps
    real_call = estimators.PromptStates.__call__

    def recording(self, rewards, keys, rho=None):
        tables.append(dict(self.table))
        return real_call(self, rewards, keys, rho)

    monkeypatch.setattr(estimators.PromptStates, "__call__", recording)
    for name in ("rloo", "grpo", "reinforce", "grpo_finite"):
        steps = 2 if name == "grpo_finite" else 1  # an adaptive estimator: its per-prompt state after a step
        trainer, diag = _sim_trainer(tmp_path, name, _varying, steps=steps)
        rewards = torch.as_tensor(diag.last_rewards).view(-1, 4)
        native = T.Trainer(T.LLMConfig(model=str(tmp_path / "tiny"), estimator=name, group_size=4,
                                       prompts_per_step=rewards.shape[0]), tmp_path / f"n-{name}", log=lambda *a: None)
        batch = None
        if name == "grpo_finite":  # the same state as TRL's before its last step, and the same prompts
            keys = diag.last_prompts[::4]
            assert len(tables) == 2 and tables[1] and set(trainer.sim_adaptive.table) >= set(keys)
            native.adaptive.table = dict(tables[1])
            batch = [type("Example", (), {"prompt": k})() for k in keys]
        _, adv = native._advantages(rewards, batch)
        torch.testing.assert_close(adv.reshape(-1), trainer._sim_last_advantages.float(), rtol=1e-6, atol=1e-7)


def test_adaptive_estimators_run_inside_trl_with_their_state():
    """grpo_finite keeps a state per prompt (keyed by TRL's prompt text) and grpo_phase reads rho_t,
    which the diagnostics' reward wrapper measures at every step for it (every = 0 here); grpo_shrunk
    does both."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        trainer, diag = _sim_trainer(Path(d), "grpo_finite", _varying, steps=2)
        prompts = {f"{i}*{i}=" for i in range(32)}
        assert trainer.sim_adaptive.table and set(trainer.sim_adaptive.table) <= prompts
        trainer, diag = _sim_trainer(Path(d), "grpo_phase", _varying, steps=2)
        assert diag.rho_every_step and diag.last_rho is not None and 0.0 <= diag.last_rho <= 1.0
        assert 0.0 <= float(trainer.sim_adaptive.state.rho_ema) <= 1.0
        trainer, diag = _sim_trainer(Path(d), "grpo_shrunk", _varying, steps=2)  # both: a table and rho_peak
        assert diag.rho_every_step and set(trainer.sim_adaptive.table) <= prompts
        assert 0.0 <= float(trainer.sim_adaptive.state.rho_peak) <= 1.0


def test_cli_trl_backend_writes_results(tmp_path, capsys):
    tok = model_mod.char_tokenizer()
    model_mod.tiny_model(len(tok), "tiny", seed=0).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    code, _, err = run_cli(["llm", "train", "--backend", "trl", "--model", str(tmp_path / "tiny"), "--steps", "2",
                            "--prompts-per-step", "2", "--group-size", "4", "--diag-every", "1", "--max-new-tokens",
                            "4", "--estimator", "rloo", "--out", str(tmp_path / "run")], capsys)  # in-process
    assert code == 0, err[-2000:]
    runs, steps = sim.load_results(tmp_path / "run")
    assert runs["estimator"].iloc[0] == "rloo" and runs["backend"].iloc[0] == "trl" and len(steps) == 2
    # compare --backend trl trains each estimator inside TRL (it ran the native runner before)
    code, out, err = run_cli(["llm", "compare", "--backend", "trl", "--model", str(tmp_path / "tiny"), "--steps",
                              "1", "--prompts-per-step", "2", "--group-size", "4", "--diag-every", "1",
                              "--max-new-tokens", "4", "--estimators", "grpo,grpo_finite", "--out",
                              str(tmp_path / "cmp")], capsys)
    assert code == 0, err[-2000:]
    assert "grpo vs grpo_finite" in out and "trl backend" in out
    for est in ("grpo", "grpo_finite"):
        runs, steps = sim.load_results(tmp_path / "cmp" / est)
        assert runs["estimator"].iloc[0] == est and runs["backend"].iloc[0] == "trl" and len(steps) == 1
    code, out, err = run_cli(["figures", "--from", str(tmp_path / "cmp" / "grpo"), "--from",
                              str(tmp_path / "cmp" / "grpo_finite"), "--out", str(tmp_path / "figs")], capsys)
    assert code == 0 and (tmp_path / "figs" / "training_phases.png").stat().st_size > 1000, err


@pytest.mark.parametrize("launcher", list(TWO_PROCESS_LAUNCHERS))
def test_two_process_run_gathers_every_group(launcher, tmp_path):
    """2 CPU processes (gloo) under torch.distributed.run and under accelerate launch: each rank holds
    half the completions, the reward statistics cover every group of both (TRL's own zero-std
    fraction, computed on its gathered rewards, agrees on both ranks), and rank 0 writes the results
    directory."""
    import json
    import os
    from pathlib import Path

    worker = Path(__file__).parent / "trl_ddp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([*TWO_PROCESS_LAUNCHERS[launcher], str(worker), str(tmp_path)], capture_output=True, text=True,
                       env=env, timeout=600)
    # on failure show the workers' own error lines (a native abort, a Python error), not only the
    # launcher's summary, which is all the last 2000 characters would hold
    errors = [ln for ln in p.stderr.splitlines() if any(
        k in ln for k in ("Error", "error:", "terminate", "what()", "Fatal", "File \"", "Abort", "gloo"))]
    assert p.returncode == 0, "\n".join(errors[:60]) + "\n---\n" + p.stderr[-1500:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rec in ranks:
        assert rec["world"] == 2 and rec["refused"] == "" and len(rec["logs"]) == 3
        # 8 completions per process, groups of 4: 4 groups per step in all, both processes' groups
        assert rec["groups"] == [4, 4, 4]
        for h in rec["logs"]:
            assert h["grpo_sim/zero_std_frac"] == pytest.approx(h["frac_reward_zero_std"], abs=1e-6)
            assert "grpo_sim/rho" in h
    assert ranks[0]["logs"] == ranks[1]["logs"]
    runs, steps = sim.load_results(tmp_path / "res")
    assert len(steps) == 3


def test_empirical_m_is_the_change_of_the_per_prompt_gradients_over_the_update(monkeypatch):
    """on_step_end against the definition, computed here with one autograd pass per prompt (the
    generic path): max_i ||g_i(theta') - g_i(theta)|| / ||theta' - theta|| / sigma_i over prompts with
    sigma_i > 0, g_i at theta' on the same samples importance-weighted; a constant group is left out."""
    import types

    import torch

    from sim.llm import trainer as T

    tok = model_mod.char_tokenizer()
    model = model_mod.tiny_model(len(tok), "tiny", seed=0)
    diag = GrpoSimDiagnostics(num_generations=4)
    diag.on_train_begin(types.SimpleNamespace(temperature=0.7), None, None, model=model, processing_class=tok)
    gen = torch.Generator().manual_seed(0)
    prompts = [f"{i}+{i}=" for i in range(3) for _ in range(4)]
    completions = [torch.randint(3, len(tok), (5,), generator=gen).tolist() for _ in prompts]
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]  # group 1 constant: sigma 0
    measured = diag._gradient_diagnostics(prompts, completions, rewards, gain=True)
    assert "rho" in measured and diag._pending_m is not None
    row = {"step": 0, "gain": measured["gain"]}
    diag.rows = [row, {"step": 1}]  # the row is the one _measure hands over, not the last one
    diag._pending_m["row"] = row
    ids, attn, mask, centred, logp = diag._pending_m["inputs"]
    params = [p for _, p in T.diag_parameters(model, "last-mlp")]
    theta = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    monkeypatch.setattr(T, "_linear_owners", lambda m, p: None)  # the reference: one pass per prompt
    model.eval()
    with torch.enable_grad():
        before, _ = T.per_prompt_gradients(model, params, ids, attn, mask, centred, 0.7)
    with torch.no_grad():  # an update of the diagnostic layer and of another one
        for p in (params[0], model.model.layers[0].self_attn.q_proj.weight):
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    with torch.enable_grad():
        after, _ = T.per_prompt_gradients(model, params, ids, attn, mask, centred, 0.7, ref_logp=logp)
    monkeypatch.undo()
    dtheta = float((torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - theta).norm())
    sigma = torch.tensor(rewards).reshape(3, 4).double().std(-1, correction=0)
    want = max(float((after[i] - before[i]).norm()) / dtheta / float(sigma[i]) for i in (0, 2))
    diag.on_step_end(None, None, None)
    assert diag.refused == ""
    assert diag.rows[0]["empirical_M"] == pytest.approx(want, rel=1e-4) and "empirical_M" not in diag.rows[1]
    assert diag.last_empirical_M == diag.rows[0]["empirical_M"] and diag._pending_m is None
    # an update that does not move theta measures nothing (NaN, not logged), not rounding over 1e-30
    diag._gradient_diagnostics(prompts, completions, rewards, gain=True)
    diag._pending_m["row"] = row
    diag.on_step_end(None, None, None)
    assert math.isnan(row["empirical_M"]) and diag.last_empirical_M is None


def test_the_empirical_m_pass_deferred_to_the_next_rewards_gives_the_same_numbers(tmp_path):
    """Where TRL generates before every update (accumulation 1, steps_per_generation 1: defer_m),
    on_step_end leaves the empirical M's pass at theta_t+1 to the next training reward call, which
    runs it in the same forward as that step's diagnostics: the same empirical M (logged with the
    next step's metrics), rho and gain as a callback that runs the pass in on_step_end; the last
    step's is computed at the end and written with its row."""
    import types

    import pandas as pd
    import torch

    tok = model_mod.char_tokenizer()
    model = model_mod.tiny_model(len(tok), "tiny", seed=0)
    model.train()  # TRL's training mode: the reward calls are training steps
    deferring = GrpoSimDiagnostics(num_generations=4, out=tmp_path / "res")
    deferring.on_train_begin(types.SimpleNamespace(temperature=0.7, gradient_accumulation_steps=1,
                                                   steps_per_generation=1, num_iterations=1), None, None,
                             model=model, processing_class=tok)
    direct = GrpoSimDiagnostics(num_generations=4)
    direct.on_train_begin(types.SimpleNamespace(temperature=0.7, gradient_accumulation_steps=1,
                                                steps_per_generation=2, num_iterations=1), None, None,
                          model=model, processing_class=tok)
    # (one generation per two updates: the update between them has no reward call to wait for)
    assert deferring.defer_m and not direct.defer_m
    gen = torch.Generator().manual_seed(7)
    logged = {id(deferring): [], id(direct): []}

    def step(t):
        prompts = [f"{t}{i}+{i}=" for i in range(3) for _ in range(4)]
        completions = [torch.randint(3, len(tok), (2 + (k % 4),), generator=gen).tolist() for k in range(12)]
        rewards = [float(x) for x in torch.rand(12, generator=gen).round()]
        rewards[:4] = [1.0, 0.0, 1.0, 0.0]  # a spread in group 0
        for diag in (deferring, direct):
            kw = {"trainer_state": types.SimpleNamespace(global_step=t),
                  "log_metric": lambda name, value, d=diag: logged[id(d)].append((t, name, value))}
            diag._measure(prompts, completions, rewards, kw)
        with torch.no_grad():  # the update
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
        for diag in (deferring, direct):
            diag.on_step_end(None, None, None)

    step(0)
    assert "empirical_M" not in deferring.rows[0] and deferring._pending_m["updated"]
    assert direct.rows[0]["empirical_M"] > 0
    step(1)
    assert deferring.rows[0]["empirical_M"] == pytest.approx(direct.rows[0]["empirical_M"], rel=1e-4)
    for name in ("rho", "gain"):
        assert deferring.rows[1][name] == pytest.approx(direct.rows[1][name], rel=1e-4, abs=1e-6)
    m_logged = [(t, v) for t, n, v in logged[id(deferring)] if n == "grpo_sim/empirical_M"]
    assert m_logged == [(1, deferring.rows[0]["empirical_M"])]
    deferring.on_train_end(None, types.SimpleNamespace(is_world_process_zero=True), None)
    written = pd.read_parquet(tmp_path / "res" / "steps.parquet")
    assert written["empirical_M"].tolist() == pytest.approx([direct.rows[0]["empirical_M"],
                                                              direct.rows[1]["empirical_M"]], rel=1e-4)


def test_a_deferred_empirical_m_runs_alone_on_an_undiagnosed_step_and_is_nan_when_lost(tmp_path, monkeypatch):
    """Deferred (defer_m) with every=2: step 1 is not diagnosed, so step 0's empirical M runs alone at
    step 1's reward call and equals the direct callback's; a second update before any reward call
    leaves theta_t+1 behind (NaN, not a stale value); a merged pass that fails leaves NaN too."""
    import types

    import torch

    from sim.llm import trainer as T

    tok = model_mod.char_tokenizer()
    model = model_mod.tiny_model(len(tok), "tiny", seed=0)
    model.train()
    args = dict(temperature=0.7, gradient_accumulation_steps=1, num_iterations=1)
    deferring, direct = GrpoSimDiagnostics(num_generations=4, every=2), GrpoSimDiagnostics(num_generations=4, every=2)
    deferring.on_train_begin(types.SimpleNamespace(steps_per_generation=1, **args), None, None,
                             model=model, processing_class=tok)
    direct.on_train_begin(types.SimpleNamespace(steps_per_generation=2, **args), None, None,
                          model=model, processing_class=tok)
    assert deferring.defer_m and not direct.defer_m
    gen = torch.Generator().manual_seed(3)
    prompts = [f"{i}+{i}=" for i in range(3) for _ in range(4)]

    def measure(t, diags):
        completions = [torch.randint(3, len(tok), (3 + (k % 3),), generator=gen).tolist() for k in range(12)]
        rewards = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
        for diag in diags:
            diag._measure(prompts, completions, rewards, {"trainer_state": types.SimpleNamespace(global_step=t)})

    def update(diags):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
        for diag in diags:
            diag.on_step_end(None, None, None)

    both = (deferring, direct)
    measure(0, both)
    update(both)
    assert "empirical_M" not in deferring.rows[0] and direct.rows[0]["empirical_M"] > 0
    measure(1, both)  # not diagnosed (every=2): the deferred pass runs alone
    assert "rho" not in deferring.rows[1] and deferring.refused == ""
    assert deferring.rows[0]["empirical_M"] == pytest.approx(direct.rows[0]["empirical_M"], rel=1e-4)
    update(both)
    measure(2, [deferring])  # diagnosed again: its M waits for the next reward call ...
    update([deferring])
    update([deferring])  # ... but a second update comes first: theta_t+1 is gone
    assert math.isnan(deferring.rows[2]["empirical_M"]) and deferring._pending_m is None
    measure(4, [deferring])
    update([deferring])
    assert "empirical_M" not in deferring.rows[3] and deferring._pending_m["updated"]

    def broken(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(T, "prompt_and_gain_gradients", broken)
    completions = [torch.randint(3, len(tok), (4,), generator=gen).tolist() for _ in range(12)]
    reward = deferring.wrap(lambda prompts, completions, completion_ids, **kw: [1.0, 0.0] * 6)
    # the merged pass (step 6 is diagnosed) fails inside TRL's reward call: training goes on, the
    # rewards come back unchanged, step 4's M is unknown
    assert reward(prompts, ["x"] * 12, completion_ids=completions,
                  trainer_state=types.SimpleNamespace(global_step=6)) == [1.0, 0.0] * 6
    assert math.isnan(deferring.rows[3]["empirical_M"]) and "out of memory" in deferring.refused


def test_a_failed_empirical_m_pass_on_step_end_is_nan_and_training_goes_on(monkeypatch):
    """The empirical M's own pass (on_step_end, not deferred) raising: the diagnosed step's row holds
    NaN (unknown, not missing), the callback says why in one line, nothing propagates."""
    import types

    import torch

    from sim.llm import trainer as T

    tok = model_mod.char_tokenizer()
    model = model_mod.tiny_model(len(tok), "tiny", seed=0)
    model.train()
    diag = GrpoSimDiagnostics(num_generations=4)
    diag.on_train_begin(types.SimpleNamespace(temperature=0.7, gradient_accumulation_steps=1, steps_per_generation=2,
                                              num_iterations=1), None, None, model=model, processing_class=tok)
    assert not diag.defer_m
    gen = torch.Generator().manual_seed(5)
    prompts = [f"{i}+{i}=" for i in range(3) for _ in range(4)]
    completions = [torch.randint(3, len(tok), (4,), generator=gen).tolist() for _ in prompts]
    diag._measure(prompts, completions, [1.0, 0.0] * 6, {"trainer_state": types.SimpleNamespace(global_step=0)})
    assert "rho" in diag.rows[0] and diag._pending_m is not None

    def broken(*a, **k):
        raise RuntimeError("device lost")

    monkeypatch.setattr(T, "batched_gradients", broken)
    diag.on_step_end(None, None, None)
    assert math.isnan(diag.rows[0]["empirical_M"]) and diag.refused.endswith("RuntimeError: device lost")
    assert diag.last_empirical_M is None and diag._pending_m is None


def test_an_evaluation_call_is_not_diagnosed_and_keeps_the_training_rho():
    # TRL's evaluate calls the reward functions with the model in eval mode: no row, no pending M,
    # the rewards recorded (SimGRPOTrainer reads them) and rho_t left at the last training step's
    import types

    tok = model_mod.char_tokenizer()
    model = model_mod.tiny_model(len(tok), "tiny", seed=0)
    diag = GrpoSimDiagnostics(num_generations=2)
    diag.on_train_begin(types.SimpleNamespace(temperature=1.0), None, None, model=model, processing_class=tok)
    diag.last_rho = 0.7
    model.eval()
    diag._measure(["1+1=", "1+1="], [[5, 6], [7]], [1.0, 0.0], {})
    assert diag.rows == [] and diag._pending_m is None and diag.last_rho == 0.7
    assert list(diag.last_rewards) == [1.0, 0.0]
    model.train()
    diag._measure(["1+1=", "1+1="] * 2, [[5, 6], [7], [5], [6]], [1.0, 0.0, 0.0, 1.0], {})
    assert len(diag.rows) == 1 and diag.last_rho is None  # a training call measures (two groups: rho)
