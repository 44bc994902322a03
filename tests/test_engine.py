"""Vectorized engine == plain per-run numpy loop; batch invariance; reproducibility."""

import numpy as np
import pandas as pd
import pytest
import torch

from sim.config import RunConfig, TrainConfig
from sim.engine import train_batch
from sim.problems import ProblemConfig
from sim.reference import train_one
from sim.reference import uniforms as np_uniforms
from sim.rng import at_step, mix64, run_keys
from sim.rng import uniforms as torch_uniforms


def _splitmix64_outputs(state: int, count: int) -> list[int]:
    """The SplitMix64 generator in plain Python integers (Steele, Lea, Flood 2014)."""
    out, mask = [], (1 << 64) - 1
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


def test_rng_is_splitmix64_and_reference_draws_match():
    # published first output of SplitMix64 from state 0
    assert _splitmix64_outputs(0, 1) == [0xE220A8397B1DCDAF]
    assert int(mix64(np.array([0], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF
    # uniforms: counter c of run r is hashed from key_r + c * GOLDEN, i.e. the SplitMix64 stream
    # started at state key_r; a step of n draws uses the stream's outputs step*m .. step*m + m - 1
    seeds = torch.tensor([0, 1, 2**40 + 7], dtype=torch.int64)
    keys = run_keys(seeds)
    u = torch_uniforms(keys, 12, (3, 5))  # n = 15 draws, m = 8 hashes per step
    for r, s in enumerate(seeds.tolist()):
        assert int(keys[r]) == _splitmix64_outputs(s, 1)[0]
        h = _splitmix64_outputs(int(keys[r]), 12 * 8 + 8)[12 * 8:]
        halves = [x for v in h for x in (v & 0xFFFFFFFF, v >> 32)][:15]  # low 32 bits first
        expect = [((x - 2**32 if x >= 2**31 else x) + 2**31 + 0.5) * 2.0**-32 for x in halves]
        assert u[r].reshape(-1).tolist() == expect
        assert np.array_equal(u[r].numpy(), np_uniforms(s, 12, (3, 5)))
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    for shape in ((2, 3, 5), (3, 1, 1), (2, 7)):  # leading rows only: the same draws, fewer hashes
        full = torch_uniforms(run_keys(seeds), 4, shape)
        assert torch.equal(torch_uniforms(run_keys(seeds), 4, shape, leading=1), full[:, :1])
    # at_step: keys whose step-0 draws are the given steps' (one call draws rows at different steps)
    steps = np.array([0, 5, 2**33 + 1])
    shifted = torch_uniforms(at_step(run_keys(seeds), steps, (3, 5)), 0, (3, 5))
    for r, s in enumerate(steps.tolist()):
        assert torch.equal(shifted[r], torch_uniforms(run_keys(seeds), s, (3, 5))[r])
    odd = torch_uniforms(run_keys(seeds), 3, (7,))  # odd count: the last hash gives one draw
    assert odd.shape == (3, 7) and np.array_equal(odd[1].numpy(), np_uniforms(1, 3, (7,)))
    # mean 1/2, variance 1/12 over 40k draws: the mean's standard error is sqrt(1/12/40000) = 0.0014
    big = torch_uniforms(run_keys(torch.arange(4)), 3, (10_000,))
    assert abs(float(big.mean()) - 0.5) < 0.006 and abs(float(big.var()) - 1 / 12) < 0.003
    # consecutive steps and neighbouring seeds are uncorrelated
    a, b = torch_uniforms(run_keys(torch.tensor([5, 6])), 0, (20_000,)), torch_uniforms(run_keys(torch.tensor([5])), 1, (20_000,))
    assert abs(float(torch.corrcoef(torch.stack([a[0], a[1], b[0]]))[0, 1:].abs().max())) < 0.03


def mixed_runs(mode, estimator, steps=30, G=4):
    runs = []
    for o, seed, lr, noise in [(0.3, 0, 2.0, 0.0), (0.9, 1, 5.0, 0.1), (0.0, 2, 1.0, 0.0)]:
        p = ProblemConfig(num_prompts=4, num_responses=5, orthogonality=o, private_dim=3, shared_dim=4,
                          reward_noise=noise, reward_scale_spread=2.0)
        runs.append(RunConfig(p, TrainConfig(estimator=estimator, mode=mode, group_size=G, steps=steps,
                                             lr=lr, seed=seed, log_points=steps)))
    return runs


@pytest.mark.parametrize("mode,estimator", [("exact", "reinforce"), ("exact", "grpo"), ("exact", "grpo_batch"),
                                            ("sampled", "grpo"), ("sampled", "rloo"), ("sampled", "grpo_oracle"),
                                            ("sampled", "verl_rfpp_baseline")])
@pytest.mark.parametrize("engine", ["torch", "numba"])
def test_vectorized_engine_equals_per_run_loop(mode, estimator, engine):
    runs = mixed_runs(mode, estimator)
    _assert_equals_per_run_loop(runs, train_batch(runs, engine=engine))


def _assert_equals_per_run_loop(runs, res):
    """Each run of the batch result ``res`` against sim.reference.train_one: J at the logged steps
    and the final parameters."""
    for r, run in enumerate(runs):
        ref = train_one(run)
        got = res.steps[res.steps.run_id == run.run_id].sort_values("step")
        np.testing.assert_allclose(got["J"].to_numpy(), ref["J"][got["step"].to_numpy()], rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(res.theta_private[r].numpy(), ref["theta_private"], rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(res.theta_shared[r].numpy(), ref["theta_shared"], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("engine", ["torch", "numba"])
@pytest.mark.parametrize("estimator", ["grpo", "grpo_batch", "verl_rfpp_baseline", "openrlhf_reinforce_baseline"])
def test_run_alone_equals_run_in_batch_bit_for_bit(engine, estimator):
    """Every reduction runs along a run's own row (batch stds and whitening variances written out:
    torch's std / var rounded differently with the batch size), so a run's numbers cannot depend on
    the runs beside it."""
    runs = mixed_runs("sampled", estimator, steps=40)
    together = train_batch(runs, engine=engine)
    for r, run in enumerate(runs):
        alone = train_batch([run], engine=engine)
        assert torch.equal(alone.theta_private[0], together.theta_private[r])
        a = alone.runs.drop(columns="run_id").iloc[0]
        b = together.runs.drop(columns="run_id").iloc[r]
        assert a.equals(b)


@pytest.mark.parametrize("engine,mode,estimator,binary", [
    ("torch", "sampled", "grpo", False), ("numba", "sampled", "rloo", False), ("numba", "sampled", "grpo", True),
    ("torch", "sampled", "grpo", True), ("numba", "exact", "grpo", False), ("torch", "sampled", "grpo_phase", False),
    ("torch", "exact", "grpo_phase", False), ("torch", "sampled", "grpo_finite", False),
    ("torch", "sampled", "grpo_shrunk", False), ("torch", "sampled", "grpo_selfnorm", False)])
def test_log_steps_diagnosed_together_equal_them_one_by_one(engine, mode, estimator, binary, monkeypatch):
    """The Recorder computes several log steps' diagnostics in one call on their stacked rows (the
    gain draws' steps folded into their keys; ``binary``: no reward noise, so the draws' second half
    is never made; adaptive estimators: their states stacked too): the same numbers, bit for bit, as
    one call per log step (DIAGNOSTIC_ROWS 1, or DIAGNOSTIC_BYTES 0: the memory cap), and with a
    remainder (2 log steps per call for 3 runs)."""
    import dataclasses

    from sim import engine as eng

    runs = mixed_runs(mode, estimator, steps=30)
    if binary:
        runs = [RunConfig(dataclasses.replace(r.problem, reward_noise=0.0), r.train) for r in runs]
    together = train_batch(runs, engine=engine)
    for name, value in (("DIAGNOSTIC_ROWS", 1), ("DIAGNOSTIC_ROWS", 7), ("DIAGNOSTIC_BYTES", 0)):
        with monkeypatch.context() as m:
            m.setattr(eng, name, value)
            apart = train_batch(runs, engine=engine)
        pd.testing.assert_frame_equal(together.steps, apart.steps, check_exact=True)
        pd.testing.assert_frame_equal(together.runs, apart.runs, check_exact=True)


@pytest.mark.parametrize("engine", ["torch", "numba"])
def test_same_config_and_seed_same_numbers_other_seed_differs(engine):
    runs = mixed_runs("sampled", "rloo", steps=25)
    a, b = train_batch(runs, engine=engine), train_batch(runs, engine=engine)
    assert torch.equal(a.theta_private, b.theta_private)
    other = [RunConfig(r.problem, TrainConfig(**{**r.train.__dict__, "seed": r.train.seed + 100})) for r in runs]
    assert not torch.equal(a.theta_private, train_batch(other, engine=engine).theta_private)


def test_summary_metrics_follow_the_curve():
    runs = mixed_runs("exact", "grpo", steps=200)
    res = train_batch(runs)
    for _, row in res.runs.iterrows():
        curve = res.steps[res.steps.run_id == row.run_id].sort_values("step")
        assert row.final_J == curve.J.iloc[-1]
        assert row.target_J == pytest.approx(0.9 * row.j_star)
        if row.reached_target:
            # the first logged step at or after steps_to_target is above target, every earlier logged one below
            before = curve[curve.step < row.steps_to_target]
            after = curve[curve.step >= row.steps_to_target]
            assert (before.J < row.target_J).all() and after.J.iloc[0] >= row.target_J
        assert 0 < row.auc <= 1.0  # auc = mean_t J_t / J*


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the engine's device option)")
def test_engine_on_gpu_agrees_with_cpu_to_rounding():
    for mode, estimator in (("sampled", "grpo"), ("exact", "grpo")):
        runs = mixed_runs(mode, estimator, steps=30)
        cpu, gpu = train_batch(runs), train_batch(runs, device="cuda")
        np.testing.assert_allclose(gpu.runs.final_J, cpu.runs.final_J, rtol=1e-9)
        np.testing.assert_allclose(gpu.theta_private.numpy(), cpu.theta_private.numpy(), rtol=1e-7, atol=1e-9)


def test_step_history_equals_the_per_step_reductions_for_any_chunk():
    from sim.engine import StepHistory

    torch.manual_seed(0)
    R, P, T = 3, 5, 70
    mu, sigma = torch.rand(T + 1, R, P, dtype=torch.float64), torch.rand(T + 1, R, P, dtype=torch.float64)
    sigma[10, 0, 2] = 0.0  # a ratio out of 0 is not defined: skipped, as are ratios below the floor
    sigma[11, 1, :] = 1e-20
    floor = torch.full((R, 1), 1e-9, dtype=torch.float64)
    live = sigma[:-1] > floor  # step by step: sigma_i(t) / sigma_i(t-1) where sigma_i(t-1) is above the floor
    ratio = torch.where(live, sigma[1:] / torch.where(live, sigma[:-1], torch.ones_like(sigma[1:])),
                        torch.full_like(sigma[1:], float("inf")))
    for chunk in (1, 3, 32, 100):
        h = StepHistory(R, P, T, torch.float64, floor, chunk=chunk)
        for t in range(T + 1):
            h.add(mu[t], sigma[t])
        h.flush()
        assert torch.equal(h.J, mu.mean(-1).T) and torch.equal(h.sigma_bar, sigma.mean(-1).T)
        assert torch.equal(h.min_sigma_ratio, ratio.amin(-1).amin(0))


@pytest.mark.parametrize("preset,base,eps", [("trl_group", "grpo", 1e-4), ("verl_grpo", "grpo", 1e-6),
                                             ("trl_none", "dr_grpo", 0.0), ("verl_rloo", "rloo", 0.0)])
def test_exact_mode_preset_is_its_base_estimator_at_the_presets_eps(preset, base, eps):
    # a preset without whitening has its base estimator's limit with its own eps (whatever --eps says)
    runs = mixed_runs("exact", preset, steps=20)
    runs = [RunConfig(r.problem, TrainConfig(**{**r.train.__dict__, "eps": 0.5})) for r in runs]
    same = [RunConfig(r.problem, TrainConfig(**{**r.train.__dict__, "estimator": base, "eps": eps})) for r in runs]
    for engine in ("torch", "numba"):
        assert torch.equal(train_batch(runs, engine=engine).theta_private, train_batch(same, engine=engine).theta_private)


@pytest.mark.parametrize("mode,estimator", [("exact", "grpo_phase"), ("sampled", "grpo_phase"),
                                            ("sampled", "grpo_finite"), ("exact", "grpo_finite"),
                                            ("sampled", "grpo_shrunk"), ("exact", "grpo_shrunk"),
                                            ("sampled", "grpo_selfnorm"), ("exact", "grpo_selfnorm")])
def test_adaptive_estimators_thread_their_state_as_the_per_run_loop(mode, estimator):
    """The engine carries each run's state (and measures rho_t) as the plain loop does, one run at a
    time with the full Gram matrix written out (sim.reference); the numba engine does not run them
    (test_kernels), so 'auto' trains them with torch."""
    runs = mixed_runs(mode, estimator)
    res = train_batch(runs)
    assert set(res.runs.engine) == {"torch"}
    _assert_equals_per_run_loop(runs, res)
    # the state matters: the adaptive runs are not GRPO's (mixed_runs' problems are not orthogonal)
    grpo = train_batch(mixed_runs(mode, "grpo"), engine="torch")
    if estimator in ("grpo_finite", "grpo_shrunk", "grpo_selfnorm") and mode == "exact":  # G -> infinity: exact grpo, bit for bit
        assert torch.equal(grpo.theta_shared, res.theta_shared) and torch.equal(grpo.theta_private, res.theta_private)
    else:
        assert not torch.allclose(grpo.theta_shared, res.theta_shared, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_adaptive_runs_alone_equal_runs_in_a_batch_bit_for_bit(mode):
    runs = mixed_runs(mode, "grpo_phase", steps=25) + mixed_runs(mode, "grpo_phase", steps=25)[:1]
    together = train_batch(runs)
    for r, run in enumerate(runs[:3]):
        alone = train_batch([run])
        assert torch.equal(alone.theta_private[0], together.theta_private[r])
        assert torch.equal(alone.theta_shared[0], together.theta_shared[r])
