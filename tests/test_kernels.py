"""The compiled engine (sim.kernels, numba) against the torch engine, the reference: same draws,
same numbers to rounding, for every registry estimator in both modes."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from numba import njit  # noqa: E402
import theory  # noqa: E402
from sim import estimators as E  # noqa: E402
from sim import kernels, rng  # noqa: E402
from sim.config import ProblemConfig, RunConfig, TrainConfig  # noqa: E402
from sim.engine import resolve_engine, train_batch  # noqa: E402
from sim.problems import make_problem  # noqa: E402

SETTINGS = settings(deadline=None, max_examples=int(__import__("os").environ.get("KERNEL_EXAMPLES", 5)), suppress_health_check=[HealthCheck.too_slow])

#: Diagnostics logged at theta: functions of theta computed by the same torch code under both
#: engines, so they inherit theta's rounding-level difference (tolerance 1e-12). gain (and
#: exact_theory_step_gain) is a ratio dJ_GRPO / dJ_REINFORCE of two one-step changes of J, each a
#: difference of O(1) numbers:
#: its rounding error is about 1e-16 (1 + |gain|) / |dJ_REINFORCE|, unbounded as REINFORCE's
#: step vanishes (gains of -4e4 occur), so it is compared at 1e-6 plus that error where
#: |gain| <= 100, and the phase labels built from it must be equal.
#: empirical_M and m_bound_ratio divide ||Hess J_i|| by sigma_i: a prompt whose sigma_i has fallen
#: near 0 gives them a rounding error of about 1e-16 / sigma_i (and one at the 1e-12 sigma floor
#: drops in or out of the max), so they are compared where every sigma_i >= 1e-3 sigma_bound.
#: rho is 1 - mean |cos| of per-prompt gradients: as a gradient vanishes its direction carries the
#: rounding of the terms that cancel in it (relative errors up to 1e-11 seen): compared at 1e-9, and
#: only where every sigma_i >= 1e-3 sigma_bound too: a converged prompt's gradient (sigma_i 2e-8, its
#: gradient 1e-16) is rounding noise, whose direction two summation orders draw differently (rho
#: 0.984 vs 0.996 in a random-profile example).
TIGHT = ("J", "sigma_bar", "sigma_min", "sigma_max", "grad_norm", "analytic_M")
PER_SIGMA = ("empirical_M", "m_bound_ratio")


@st.composite
def batches(draw):
    """2-3 runs of one random shape: problems, noise, reward scales, step sizes and seeds drawn."""
    P, K = draw(st.integers(1, 5)), draw(st.integers(2, 6))
    k, s = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    G = draw(st.integers(2, 6))
    runs = []
    for _ in range(draw(st.integers(2, 3))):
        p = ProblemConfig(num_prompts=P, num_responses=K, private_dim=k, shared_dim=s,
                          orthogonality=draw(st.sampled_from([0.0, 0.3, 0.8, 1.0])),
                          reward_noise=draw(st.sampled_from([0.0, 0.1])),
                          reward_scale_spread=draw(st.sampled_from([1.0, 3.0])),
                          difficulty_spread=draw(st.sampled_from([0.0, 0.6])),
                          problem_seed=draw(st.integers(0, 50)))
        try:
            prob = make_problem(p)
        except ValueError:  # degenerate features (nothing to learn): the CLI refuses these
            assume(False)
        # and no prompt whose responses share one feature vector: its gradient is rounding noise,
        # which the two engines' different summation orders amplify differently
        assume(float(theory.m_diameter(theory.local_features(prob.phi_private, prob.phi_shared)).min()) > 1e-3)
        runs.append((p, draw(st.floats(0.1, 1.0)), draw(st.integers(0, 2**40))))
    return runs, G


def _runs(drawn, estimator, mode, steps=25):
    """Runs at lr = factor x the theory step size (factor <= 1): beyond it gradient ascent can be
    unstable, and an unstable trajectory amplifies any rounding difference exponentially, whatever
    the two implementations."""
    runs, G = drawn
    normalized = E.get(estimator).std_normalized
    return [RunConfig(p, TrainConfig(estimator=estimator, mode=mode, group_size=G, steps=steps, seed=seed,
                                     lr=factor * float(make_problem(p).theory_lr(normalized)), log_points=8))
            for p, factor, seed in runs]


#: Largest growth of a rounding-level perturbation of theta_0 over a run (``_amplification``) for which
#: the two engines' rounding differences (about 1e-16 per operation) stay below the 1e-12 compared.
MAX_AMPLIFICATION = 1e3


def _amplification(runs) -> float:
    """max |theta_T' - theta_T| / delta for the torch trajectory from theta_0 + delta z (z standard
    normal, delta = 1e-13): how much the run amplifies rounding. An unstable equilibrium (prompts
    whose shared-parameter pulls cancel at theta_0, e.g. o = 0 with equal difficulties) grows it
    exponentially (1e5 over 25 steps seen), and then any two implementations part at 1e-11
    whatever their correctness; a sampled step that flips a draw shows here too."""
    from sim.engine import _with_stats, init_state, step

    delta = 1e-13
    a, b = init_state(runs), init_state(runs)
    gen = torch.Generator().manual_seed(0)
    b.theta_private += delta * torch.randn(b.theta_private.shape, generator=gen, dtype=b.theta_private.dtype)
    b.theta_shared += delta * torch.randn(b.theta_shared.shape, generator=gen, dtype=b.theta_shared.dtype)
    b = _with_stats(b)
    with torch.no_grad():
        for _ in range(runs[0].train.steps):
            a, b = step(a), step(b)
    dev = max(float((a.theta_private - b.theta_private).abs().max()), float((a.theta_shared - b.theta_shared).abs().max()))
    return dev / delta


@pytest.mark.parametrize("mode", ["exact", "sampled"])
@pytest.mark.parametrize("estimator", [n for n in E.ALL_NAMES if n not in E.ADAPTIVE_NAMES])
@SETTINGS
@given(drawn=batches())
def test_numba_engine_equals_torch_engine(estimator, mode, drawn):
    runs = _runs(drawn, estimator, mode)
    assume(_amplification(runs) <= MAX_AMPLIFICATION)  # else 1e-12 agreement is not a property of the code
    ref, got = train_batch(runs, engine="torch"), train_batch(runs, engine="numba")
    close = dict(rtol=1e-12, atol=1e-12)
    # theta's entries are sums of terms as large as its largest entry (the shared block mixes every
    # prompt's): their rounding is relative to that scale, so a small entry is compared at 1e-12 of it
    scale = max(1.0, float(ref.theta_private.abs().max()), float(ref.theta_shared.abs().max()))
    np.testing.assert_allclose(got.theta_private.numpy(), ref.theta_private.numpy(), rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(got.theta_shared.numpy(), ref.theta_shared.numpy(), rtol=1e-12, atol=1e-12 * scale)
    for col in TIGHT:
        np.testing.assert_allclose(got.steps[col], ref.steps[col], err_msg=col, **close)
    bound = ref.steps.run_id.map(ref.runs.drop_duplicates("run_id").set_index("run_id").sigma_bound)
    live = ref.steps.sigma_min >= 1e-3 * bound
    np.testing.assert_allclose(got.steps.rho[live], ref.steps.rho[live], rtol=1e-9, atol=1e-12)
    for col in PER_SIGMA:
        np.testing.assert_allclose(got.steps[col][live], ref.steps[col][live], err_msg=col, **close)
    np.testing.assert_allclose(np.stack(got.steps.sigma_per_prompt), np.stack(ref.steps.sigma_per_prompt), **close)
    np.testing.assert_allclose(np.stack(got.steps.mu_per_prompt), np.stack(ref.steps.mu_per_prompt), **close)
    for col in ("dJ_grpo", "dJ_reinforce", "dJ_run"):
        np.testing.assert_allclose(got.steps[col], ref.steps[col], err_msg=col, rtol=1e-9, atol=1e-12)
    # gain = a / b and gain_se = std(a_n - gain b_n) / (sqrt(N) |b|) from per-draw changes a_n, b_n
    # whose rounding error delta is about 1e-16 (1 + |J|) (the sampled changes are computed by each
    # engine's own code): their errors are about delta (1 + |gain|) / |b| and that over sqrt(N)
    delta = 1e-15 * (1 + ref.steps.J.abs())
    rounding = delta * (1 + ref.steps.gain.abs().fillna(0)) / ref.steps.dJ_reinforce.abs().clip(lower=1e-300)
    N = 1 if mode == "exact" else runs[0].train.gain_draws
    for col, atol in (("gain", rounding), ("gain_se", rounding / N**0.5), ("exact_theory_step_gain", 1e-12)):
        conditioned = ~(ref.steps[col].abs() > 100)  # NaN (undefined) positions are compared too
        g, r = got.steps[col][conditioned], ref.steps[col][conditioned]
        assert (g.isna() == r.isna()).all(), col
        err, allowed = (g - r).abs(), 1e-6 * r.abs() + (atol[conditioned] if not np.isscalar(atol) else atol)
        assert (err[r.notna()] <= allowed[r.notna()]).all(), (col, float((err - allowed).max()))
    assert (got.steps.gain_undefined == ref.steps.gain_undefined).all()
    assert (got.steps.phase == ref.steps.phase).all()
    a, b = ref.runs.drop(columns="engine"), got.runs.drop(columns="engine")
    for col in a.columns:
        if a[col].dtype.kind == "f":
            np.testing.assert_allclose(b[col], a[col], err_msg=col, **close)
        else:
            assert (a[col] == b[col]).all(), col
    assert set(ref.runs.engine) == {"torch"} and set(got.runs.engine) == {"numba"}


@pytest.mark.parametrize("binary", [True, False])
def test_kernel_draws_are_sim_rngs_bit_for_bit(binary):
    keys = rng.run_keys([0, 7, 2**40 + 3])
    P, G = 3, 5
    m = P * G  # hashes per step of the [2, P, G] draw
    for step in (0, 1, 12345):
        want = rng.uniforms_np(keys, step, (2, P, G), leading=1 if binary else None).reshape(3, -1)
        for r, key in enumerate(keys):
            u = np.empty(2 * P * G)
            n = P * G if binary else 2 * P * G
            kernels._fill_uniforms(key, step, m, n, u)
            assert np.array_equal(u[:n], want[r])


@njit
def _exps(x, out):  # the kernels' exp over an array, as their softmax loops call it
    for i in range(x.shape[0]):
        out[i] = kernels._exp_nonpositive(x[i])


def test_the_kernels_exp_is_libms_to_within_two_ulp_down_to_underflow():
    """sim.kernels._exp_nonpositive against numpy's exp (libm) over the softmax's range x <= 0:
    relative error <= 2 ulp (2 x 2.2e-16) wherever exp(x) is a normal number (a reassociated
    reduction, n ln2 in one part, would be off by about |n| ulp: 2e-14 at x = -700), absolute
    error below the smallest normal in the subnormal range, and the edge values exact."""
    gen = np.random.default_rng(0)
    x = -np.concatenate([gen.exponential(3.0, 20000), gen.uniform(0, 745, 20000), np.arange(0, 746.0, 0.25),
                         np.ldexp(1.0, -np.arange(1, 60))])  # tiny |x|: exp(x) = 1 - |x| to the last bit
    got, want = np.empty_like(x), np.exp(x)
    _exps(x, got)
    normal = want >= np.finfo(np.float64).tiny
    assert np.max(np.abs(got[normal] - want[normal]) / want[normal]) <= 2 * np.finfo(np.float64).eps
    assert np.max(np.abs(got[~normal] - want[~normal])) < np.finfo(np.float64).tiny
    edges = np.array([0.0, -0.0, -np.inf, -746.0, -1e300, np.nan])
    out = np.empty_like(edges)
    _exps(edges, out)
    assert out[:5].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0] and np.isnan(out[5])


def test_results_do_not_depend_on_threads_or_on_the_batch():
    runs = _runs(([(ProblemConfig(num_prompts=6, num_responses=4, orthogonality=o), 1.0, s)
                   for o, s in ((0.2, 1), (0.7, 2), (0.5, 3))], 4), "grpo", "sampled", steps=60)
    before = kernels.get_threads()
    try:
        kernels.set_threads(1)
        one = train_batch(runs, engine="numba")
        kernels.set_threads(2)
        two = train_batch(runs, engine="numba")
    finally:
        kernels.set_threads(before)
    assert torch.equal(one.theta_private, two.theta_private) and torch.equal(one.theta_shared, two.theta_shared)
    for r, run in enumerate(runs):
        alone = train_batch([run], engine="numba")
        assert torch.equal(alone.theta_private[0], one.theta_private[r])
        assert alone.runs.drop(columns="run_id").iloc[0].equals(one.runs.drop(columns="run_id").iloc[r])


def test_engine_choice():
    assert resolve_engine("auto") == "numba" and resolve_engine("torch") == "torch"
    assert resolve_engine("auto", dtype=torch.float32) == "torch"  # the kernels are float64
    with pytest.raises(ValueError, match="engine: numba runs float64 on the CPU"):
        resolve_engine("numba", dtype=torch.float32)
    with pytest.raises(ValueError, match="engine: unknown value"):
        resolve_engine("jax")
    # the kernels do not carry an adaptive estimator's state: auto trains them with torch, and
    # asking for numba is refused (every other entry runs in the kernels: the test above)
    for name in E.ADAPTIVE_NAMES:
        assert resolve_engine("auto", estimator=name) == "torch"
        with pytest.raises(ValueError, match=f"engine: numba does not run the adaptive estimator {name}"):
            resolve_engine("numba", estimator=name)


def test_float32_runs_on_the_torch_engine_without_overflow():
    # predicted_gain's cap was 1e300, which float32 cannot hold
    run = RunConfig(ProblemConfig(num_prompts=3, num_responses=3), TrainConfig(steps=20, log_points=5))
    res = train_batch([run], dtype=torch.float32)
    assert res.runs.engine.iloc[0] == "torch" and np.isfinite(res.runs.predicted_gain).all()


def test_cache_lives_under_the_users_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kernels.cache_dir() == tmp_path / "grpo-sim" / "numba"
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    assert kernels.cache_dir() == tmp_path / "mine"
    kernels.warm_up()
    assert kernels.is_cached()  # the kernels this process loaded are on disk


@pytest.mark.parametrize("control_variate,ddof,eps", [(True, 1, 1e-4), (False, 1, 1e-4), (True, 0, 0.0)])
@SETTINGS
@given(drawn=batches(), draws=st.integers(2, 9), t=st.integers(0, 40))
def test_compiled_gain_draws_equal_the_torch_ones(control_variate, ddof, eps, drawn, draws, t):
    # sim.step_gain's per-draw one-step changes dJ, every stateless estimator at once, from one theta
    # reached by a few torch steps: the kernel and the torch code draw the same responses and rewards
    from sim import step_gain
    from sim.engine import init_state, step, lane_layout

    runs = _runs(drawn, "grpo", "sampled")
    state = init_state(runs)
    for _ in range(3):
        state = step(state)
    prob = state.batch.problem
    g_p, g_s = theory.per_prompt_gradients(state.w, prob.phi_private, prob.phi_shared)
    R = len(runs)
    names = [n for n in E.ALL_NAMES if n not in E.ADAPTIVE_NAMES]
    lrs = {n: torch.linspace(0.5, 2.0, R, dtype=torch.float64) * (1 + i) for i, n in enumerate(names)}
    G = runs[0].train.group_size
    args = (prob, state.theta_private, state.theta_shared, state.batch.keys, t, G, lrs, ddof, eps, draws)
    ref = step_gain.sampled_changes(state.pi, state.sigma, state.mu, state.w, *args, control_variate=control_variate)
    got = step_gain.sampled_changes_compiled(state.pi, state.sigma, state.mu, g_p, g_s, *args,
                                             lane_layout(state), control_variate=control_variate)
    assert set(got) == set(names)
    for n in names:
        assert got[n].shape == (R, draws)
        np.testing.assert_allclose(got[n].numpy(), ref[n].numpy(), rtol=1e-9, atol=1e-13, err_msg=n)
    with pytest.raises(ValueError, match="grpo_phase is adaptive"):
        step_gain.sampled_changes_compiled(state.pi, state.sigma, state.mu, g_p, g_s, *args[:6],
                                           {"grpo_phase": lrs["grpo"]}, *args[7:], lane_layout(state))


def test_a_stale_cache_does_not_count_as_cached(monkeypatch):
    # numba keeps stale index files after the source changes (an edit, an upgrade); they are no
    # cache: the CLI then says it compiles, and the sweep's workers wait for the driver's compile
    kernels.warm_up()
    assert kernels.is_cached()
    index = kernels.gain_changes._cache._cache_file
    monkeypatch.setattr(index, "_source_stamp", (0.0, 0))  # as if the source file had changed
    assert not kernels.is_cached()
