"""Hypothesis properties of every lemma in DESIGN.md §3 (theory/)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import theory
from sim import estimators
from sim.problems import ProblemConfig, make_problem
from theory.phases import PHASE_NAMES, raw_phases

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # examples: tests/conftest.py


@st.composite
def problems(draw, orthogonal=None):
    kind = draw(st.sampled_from(["tabular", "linear"]))
    K = draw(st.integers(2, 5))
    dims = {} if kind == "tabular" else {"private_dim": draw(st.integers(1, 5)), "shared_dim": draw(st.integers(1, 4))}
    o = 1.0 if orthogonal else draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]) | st.floats(0.0, 1.0))
    cfg = ProblemConfig(kind=kind, num_prompts=draw(st.integers(1, 4)), num_responses=K, orthogonality=o,
                        base_success=draw(st.floats(0.02, 0.98)), difficulty_spread=draw(st.floats(0.0, 1.0)),
                        difficulty_layout=draw(st.sampled_from(["even", "random"])),
                        reward_scale_spread=draw(st.floats(1.0, 10.0)), reward_noise=draw(st.floats(0.0, 0.4)),
                        problem_seed=draw(st.integers(0, 1000)), **dims)
    try:
        return make_problem(cfg)
    except ValueError:  # degenerate features (every response looks the same): rejected by design
        assume(False)


@st.composite
def thetas(draw, prob, max_scale=3.0):
    scale = draw(st.floats(0.0, max_scale))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    P = prob.bias.shape[0]
    return (scale * torch.randn(P, prob.phi_private.shape[-1], generator=g, dtype=torch.float64),
            scale * torch.randn(prob.phi_shared.shape[-1], generator=g, dtype=torch.float64))


def stats_at(prob, tp, ts):
    pi, mu, sigma, w = theory.prompt_stats(theory.logits(prob.bias, prob.phi_private, prob.phi_shared, tp, ts),
                                           prob.rbar)
    d = theory.centered_features(pi, theory.local_features(prob.phi_private, prob.phi_shared))
    return pi, mu, sigma, d


def prompt_objective(prob, tp, ts, i):
    """J_i as a function of its local coordinates x = [theta_i ; theta_sh]."""
    k = tp.shape[-1]

    def f(x):
        tp_x = tp.clone()
        tp_x[i] = x[:k]
        return theory.prompt_stats(theory.logits(prob.bias, prob.phi_private, prob.phi_shared, tp_x, x[k:]),
                                   prob.rbar)[1][i]
    return f, torch.cat([tp[i], ts])


@SETTINGS
@given(data=st.data())
def test_gradient_and_hessian_equal_autograd_and_finite_differences(data):
    prob = data.draw(problems())
    tp, ts = data.draw(thetas(prob))
    pi, mu, sigma, d = stats_at(prob, tp, ts)
    g = theory.prompt_gradient(pi, prob.rbar, mu, d)
    H = theory.prompt_hessian(pi, prob.rbar, mu, d)
    i = data.draw(st.integers(0, prob.bias.shape[0] - 1))
    f, x0 = prompt_objective(prob, tp, ts, i)
    g_auto = torch.autograd.functional.jacobian(f, x0)
    H_auto = torch.autograd.functional.hessian(f, x0)
    torch.testing.assert_close(g[i], g_auto, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(H[i], H_auto, rtol=1e-9, atol=1e-12)
    # central differences: O(h^2) truncation with h = 1e-5 and third derivative <= 4 sigma_bound diam^3
    h = 1e-5
    D = x0.numel()
    eye = torch.eye(D, dtype=torch.float64)
    g_fd = torch.stack([(f(x0 + h * eye[j]) - f(x0 - h * eye[j])) / (2 * h) for j in range(D)])
    torch.testing.assert_close(g[i], g_fd, rtol=0, atol=1e-8 * (1 + float(prob.scale.max())))
    grad = lambda x: torch.autograd.functional.jacobian(f, x)  # noqa: E731
    H_fd = torch.stack([(grad(x0 + h * eye[j]) - grad(x0 - h * eye[j])) / (2 * h) for j in range(D)])
    torch.testing.assert_close(H[i], H_fd, rtol=0, atol=1e-7 * (1 + float(prob.scale.max())))


@SETTINGS
@given(data=st.data())
def test_m_bound_chain_and_gradient_bound_never_fail(data):
    prob = data.draw(problems())
    tp, ts = data.draw(thetas(prob, max_scale=6.0))
    pi, mu, sigma, d = stats_at(prob, tp, ts)
    H = theory.prompt_hessian(pi, prob.rbar, mu, d)
    hess_norm = theory.spectral_norm(H)
    m_dir = theory.m_directional(pi, d, H)
    m_4 = theory.m_fourth_moment(pi, d)
    m_diam = theory.m_diameter(theory.local_features(prob.phi_private, prob.phi_shared))
    tol = 1e-9
    # ||Hess J_i|| <= sigma_i M_dir <= sigma_i sqrt(E||d||^4) <= sigma_i diam^2 <= sigma_i 4 B^2
    assert (hess_norm <= sigma * m_dir * (1 + tol) + 1e-13).all()
    assert (m_dir <= m_4 * (1 + tol) + 1e-13).all()
    assert (m_4 <= m_diam * (1 + tol) + 1e-12).all()  # rounding: d ~ 1e-16 where every feature is equal
    assert (m_diam <= theory.global_curvature_bound(prob.feature_norm_bound) * (1 + tol)).all()
    g = theory.prompt_gradient(pi, prob.rbar, mu, d)
    assert (g.norm(dim=-1) <= theory.gradient_bound(pi, d, sigma) * (1 + tol) + 1e-13).all()
    # the engine's r = min(K, D) coordinates (same Gram matrix) give the same ||Hess||, M and ||grad||
    d_red = theory.centered_features(pi, theory.reduced_features(theory.local_features(prob.phi_private,
                                                                                       prob.phi_shared)))
    assert d_red.shape[-1] == min(d.shape[-2], d.shape[-1])
    scale = 1e-12 * (1 + float(prob.scale.max()))
    torch.testing.assert_close(theory.spectral_norm(theory.prompt_hessian(pi, prob.rbar, mu, d_red)), hess_norm,
                               rtol=1e-9, atol=scale)
    torch.testing.assert_close(theory.m_fourth_moment(pi, d_red), m_4, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(theory.prompt_gradient(pi, prob.rbar, mu, d_red).norm(dim=-1), g.norm(dim=-1),
                               rtol=1e-9, atol=scale)


@SETTINGS
@given(data=st.data())
def test_curvature_constant_bounds_the_hessian_at_every_theta(data):
    """||Hess J_i|| <= M_i sigma_i with the engine's M_i (diam^2/4 for two-valued rewards, proved in
    theory.curvature), at random thetas of random problems of the family."""
    prob = data.draw(problems())
    tp, ts = data.draw(thetas(prob, max_scale=6.0))
    pi, mu, sigma, d = stats_at(prob, tp, ts)
    M = theory.curvature_constant(theory.local_features(prob.phi_private, prob.phi_shared), prob.rbar)
    assert bool(theory.two_valued(prob.rbar).all())  # the family's rewards: {c (1 - f), c f}
    hess_norm = theory.spectral_norm(theory.prompt_hessian(pi, prob.rbar, mu, d))
    assert (hess_norm <= sigma * M * (1 + 1e-9) + 1e-13).all()


@SETTINGS
@given(K=st.integers(2, 16), seed=st.integers(0, 2**31), two=st.booleans())
def test_curvature_constant_holds_for_any_features_and_is_tight(K, seed, two):
    """Random features, logits and rewards (two-valued or not): ||Hess J_i|| / sigma_i never exceeds
    curvature_constant; and the K = 2 tabular prompt at pi_0 = q, q(1-q) = 1/8 attains diam^2/4 = 1/2."""
    g = torch.Generator().manual_seed(seed)
    N, D = 256, int(torch.randint(1, 6, (), generator=g))
    phi = torch.randn(N, 1, K, D, generator=g, dtype=torch.float64)
    pi = torch.softmax(4 * torch.randn(N, 1, K, generator=g, dtype=torch.float64), -1)
    if two:
        rbar = (torch.rand(N, 1, K, generator=g) < 0.5).double() * 3.0 + 0.5
    else:
        rbar = torch.rand(N, 1, K, generator=g, dtype=torch.float64)
    mu = (pi * rbar).sum(-1)
    sigma = (pi * (rbar - mu.unsqueeze(-1)) ** 2).sum(-1).sqrt()
    d, H = theory.prompt_curvature(pi, rbar, mu, phi)
    M = theory.curvature_constant(phi, rbar)
    assert (theory.spectral_norm(H) <= sigma * M * (1 + 1e-9) + 1e-13).all()
    q = (1 - math.sqrt(0.5)) / 2  # q (1 - q) = 1/8
    pi2 = torch.tensor([[[q, 1 - q]]], dtype=torch.float64)
    r2 = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    phi2 = torch.eye(2, dtype=torch.float64).expand(1, 1, 2, 2)
    sigma2 = math.sqrt(q * (1 - q))
    _, H2 = theory.prompt_curvature(pi2, r2, (pi2 * r2).sum(-1), phi2)
    assert float(theory.curvature_constant(phi2, r2)) == 0.5
    assert float(theory.spectral_norm(H2)) / sigma2 == pytest.approx(0.5, rel=1e-12)


@SETTINGS
@given(data=st.data(), estimator=st.sampled_from(["reinforce", "grpo"]))
def test_theory_steps_never_decrease_any_prompt_on_orthogonal_problems(data, estimator):
    """Exact gradients, theory step sizes (P/M, P/(M sigma_bound)), o = 1: every J_i is non-decreasing."""
    prob = data.draw(problems(orthogonal=True))
    P = prob.bias.shape[0]
    lr = float(prob.theory_lr(estimators.is_std_normalized(estimator)))
    tp = torch.zeros(P, prob.phi_private.shape[-1], dtype=torch.float64)
    ts = torch.zeros(prob.phi_shared.shape[-1], dtype=torch.float64)
    for _ in range(40):
        z = theory.logits(prob.bias, prob.phi_private, prob.phi_shared, tp, ts)
        _, mu, sigma, w = theory.prompt_stats(z, prob.rbar)
        w = w * estimators.population_scale(estimator, sigma, mu, 0.0).unsqueeze(-1)
        g_p, g_s = theory.summed_gradient(w, prob.phi_private, prob.phi_shared)
        tp, ts = tp + lr / P * g_p, ts + lr / P * g_s
        mu_new = theory.prompt_stats(theory.logits(prob.bias, prob.phi_private, prob.phi_shared, tp, ts),
                                     prob.rbar)[1]
        assert (mu_new >= mu - 1e-12 * prob.scale).all(), (mu_new - mu).min()


@SETTINGS
@given(hist=st.lists(st.lists(st.floats(0.0, 5.0), min_size=1, max_size=6), min_size=1, max_size=8)
       .filter(lambda h: len({len(r) for r in h}) == 1),
       extra=st.floats(0.0, 3.0))
def test_predicted_gain_at_least_one(hist, extra):
    sigma = torch.tensor(hist, dtype=torch.float64)  # [T, P]
    g = theory.predicted_gain(sigma, float(sigma.max()) + extra)
    assert float(g) >= 1.0 - 1e-12 and math.isfinite(float(g))
    assert float(theory.predicted_gain(sigma)) >= 1.0 - 1e-12


@SETTINGS
@given(value=st.floats(1e-6, 5.0), T=st.integers(1, 20), P=st.integers(1, 8))
def test_predicted_gain_is_one_for_equal_sigmas(value, T, P):
    sigma = torch.full((T, P), value, dtype=torch.float64)
    assert float(theory.predicted_gain(sigma)) == pytest.approx(1.0, rel=1e-12)
    assert float(theory.predicted_gain(sigma, value)) == pytest.approx(1.0, rel=1e-12)
    # and sigma_bound / sigma_bar in general: all equal to 'value' with sigma_bound = 2 value gives 2
    assert float(theory.predicted_gain(sigma, 2 * value)) == pytest.approx(2.0, rel=1e-12)


@SETTINGS
@given(data=st.data(), normalized=st.booleans(), lr_factor=st.floats(0.1, 4.0))
def test_decomposition_adds_up_to_the_actual_change(data, normalized, lr_factor):
    prob = data.draw(problems())
    tp, ts = data.draw(thetas(prob))
    P = prob.bias.shape[0]
    _, mu, sigma, _ = stats_at(prob, tp, ts)
    lr = lr_factor * float(prob.theory_lr(normalized))
    scale = lr / P * (estimators.population_scale("grpo", sigma, mu, 0.0) if normalized else torch.ones_like(sigma))
    dec = theory.step_decomposition(prob.bias, prob.rbar, prob.phi_private, prob.phi_shared, tp, ts, scale)
    rounding = 1e-12 * (1 + float(prob.scale.max()))
    assert (dec["remainder"].abs() <= dec["remainder_bound"] + rounding).all()
    # own is a sum of squares: never negative; orthogonal problems have no cross term
    assert (dec["own"] >= 0).all()
    if float(prob.orthogonality) == 1.0:
        assert (dec["cross"].abs() <= rounding).all()


PHASE_VALUES = {  # (sigma_bar, rho, gain) ranges that the default thresholds read as each phase
    0: ((0.6, 1.0), (0.6, 1.0), (1.2, 5.0)),
    1: ((0.05, 1.0), (0.3, 1.0), (1.0, 1.09)),
    2: ((0.0, 1.0), (0.0, 0.2), (0.5, 1.5)),
}


@SETTINGS
@given(data=st.data(), lengths=st.lists(st.integers(3, 25), min_size=3, max_size=3),
       skip_first=st.booleans())
def test_phase_rule_recovers_planted_phases(data, lengths, skip_first):
    planted = []
    series = []
    for phase, n in enumerate(lengths):
        if skip_first and phase == 0:
            continue
        (s_lo, s_hi), (r_lo, r_hi), (g_lo, g_hi) = PHASE_VALUES[phase]
        for _ in range(n):
            series.append((data.draw(st.floats(s_lo, s_hi)), data.draw(st.floats(r_lo, r_hi)),
                           data.draw(st.floats(g_lo, g_hi))))
            planted.append(theory.phases.PHASE_NAMES[phase])
    s, r, g = (np.array(x) for x in zip(*series))
    s[0] = 1.0  # the peak sigma_bar sits in the first segment, as in training
    labels = theory.label_phases(s, r, g)
    assert list(labels) == planted


def test_phase_rule_ignores_single_step_blips():
    s = np.ones(30)
    r = np.full(30, 0.9)
    g = np.concatenate([np.full(10, 2.0), np.full(10, 1.05), np.full(10, 0.9)])
    g[4] = 0.5   # one-step blip inside phase I
    r[14] = 0.1  # one-step blip inside phase II
    labels = theory.label_phases(s, r, g)
    assert list(labels) == ["I"] * 10 + ["II"] * 10 + ["III"] * 10


@SETTINGS
@given(data=st.data())
def test_normalized_objective_is_what_exact_grpo_ascends(data):
    """grad F_i = grad J_i / sigma_i with F_i = 2 arcsin sqrt(p_i) (two-valued rewards): the
    gradient of theory.normalized_objective (autograd) equals the population GRPO direction."""
    prob = data.draw(problems())
    tp, ts = data.draw(thetas(prob, max_scale=2.0))
    P = prob.bias.shape[0]
    tp, ts = tp.requires_grad_(), ts.requires_grad_()
    _, mu, sigma, w = theory.prompt_stats(theory.logits(prob.bias, prob.phi_private, prob.phi_shared, tp, ts),
                                          prob.rbar)
    assume(bool((sigma > 1e-3 * (prob.rbar.amax(-1) - prob.rbar.amin(-1))).all()))
    F = theory.normalized_objective(mu, prob.rbar.amin(-1), prob.rbar.amax(-1)) * P  # sum_i F_i
    g_tp, g_ts = torch.autograd.grad(F, (tp, ts))
    with torch.no_grad():
        s_p, s_s = theory.summed_gradient(w / sigma.unsqueeze(-1), prob.phi_private, prob.phi_shared)
    torch.testing.assert_close(g_tp, s_p, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(g_ts, s_s, rtol=1e-7, atol=1e-10)


def test_phase_rule_counts_steps_not_logged_points():
    """One planted run (I until step 300, II until 1500, III after, and a 30-step dip of the gain
    at 1000) logged at 96 and at 200 log-spaced points: the same phases at the same steps (up to
    the coarser grid's spacing), and the dip, shorter than its window (0.25 * 1000 steps), ignored
    at both densities."""
    from sim.engine import log_spaced_steps

    def series(t):
        gain = np.where(t < 300, 2.0, np.where(t < 1500, 1.05, 0.8))
        gain = np.where((t >= 1000) & (t < 1030), 0.5, gain)
        return np.ones(len(t)), np.full(len(t), 0.9), gain

    first = {}
    for n in (96, 200):
        t = log_spaced_steps(2000, n)
        labels = theory.label_phases(*series(t), steps=t)
        assert list(labels) == sorted(labels, key=["I", "II", "III"].index)  # never back
        first[n] = {ph: int(t[list(labels).index(ph)]) for ph in ("II", "III")}
        assert labels[t < 1500].tolist().count("III") == 0
    for ph, at in (("II", 300), ("III", 1500)):
        coarse = log_spaced_steps(2000, 96)
        gap = int(np.diff(coarse)[np.searchsorted(coarse, at) - 1])
        assert at <= first[96][ph] <= at + gap and at <= first[200][ph] <= at + gap


def test_phase_rule_reads_the_gain_with_its_standard_error():
    s, r = np.ones(12), np.full(12, 0.9)
    g = np.full(12, 0.9)  # below 1, but within 2 standard errors of it: not evidence of phase III
    assert set(theory.label_phases(s, r, g, gain_se=np.full(12, 0.1))) == {"II"}
    assert set(theory.label_phases(s, r, g, gain_se=np.full(12, 0.01))) == {"III"}
    g_nan = np.full(12, np.nan)  # undefined gain: neither I nor III by gain
    assert set(theory.label_phases(s, r, g_nan)) == {"II"}


def _phases_one_by_one(raw, t, th):
    """The phase rule written out step by step (theory/phases.py's docstring), for one run's raw labels."""
    out, current = [], -1
    for j in range(len(t)):
        window = [raw[i] for i in range(j, len(t)) if t[i] < t[j] + max(th.persist, 1, th.persist_frac * t[j])]
        current = max(current, min(window or [raw[j]]))
        out.append(current)
    return out


@settings(deadline=None)
@given(R=st.integers(1, 4), T=st.integers(1, 30), data=st.data())
def test_phases_of_many_runs_at_once_equal_each_run_alone_and_the_rule(R, T, data):
    """label_phases on [R, T] series (the engine labels a batch in one call) equals one call per run,
    and both equal the rule applied step by step (running phase, window min over persist steps)."""
    th = theory.PhaseThresholds()
    values = st.floats(0.0, 3.0) | st.just(float("nan"))
    arrays = [np.array(data.draw(st.lists(values, min_size=R * T, max_size=R * T))).reshape(R, T) for _ in range(4)]
    sigma_bar, rho, gain, se = np.abs(arrays[0]), np.nan_to_num(arrays[1]) / 3, arrays[2], np.abs(arrays[3]) / 10
    t = np.cumsum(np.array(data.draw(st.lists(st.integers(1, 40), min_size=T, max_size=T)), dtype=float)) - 1
    batch = theory.label_phases(sigma_bar, rho, gain, steps=t, gain_se=se)
    assert batch.shape == (R, T)
    for r in range(R):
        alone = theory.label_phases(sigma_bar[r], rho[r], gain[r], steps=t, gain_se=se[r])
        assert list(batch[r]) == list(alone)
        raw = raw_phases(sigma_bar[r], rho[r], gain[r], th, se[r])
        assert list(alone) == [PHASE_NAMES[i] for i in _phases_one_by_one(list(raw), t, th)]


def test_feature_overlap_of_tabular_problems_is_one_minus_o():
    # shared one-hot blocks: the shared parts of two prompts' subspaces coincide, scaled by sqrt(1-o)
    # on both sides, so the largest principal cosine is (1 - o) / (o + (1 - o)) = 1 - o
    for o in (1.0, 0.75, 0.3):
        prob = make_problem(ProblemConfig(kind="tabular", num_prompts=4, num_responses=3, orthogonality=o))
        ov = theory.feature_overlap(prob.phi_private, prob.phi_shared)
        off = ov[~torch.eye(4, dtype=torch.bool)]
        torch.testing.assert_close(off, torch.full_like(off, 1 - o), rtol=1e-9, atol=1e-12)
