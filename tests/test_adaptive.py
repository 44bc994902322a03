"""Adaptive normalization (issue 16, first part): grpo_interpolated and the phase-aware rule."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sim import estimators as E
from theory.orthogonality import block_gram, gradient_orthogonality

def _rewards(gen, shape=(3, 4, 5), binary=True):
    r = torch.rand(shape, generator=gen, dtype=torch.float64)
    return (r < 0.5).double() * 2.5 if binary else r * 3


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), binary=st.booleans(), eps=st.sampled_from([0.0, 1e-4]),
       ddof=st.sampled_from([0, 1]))
def test_the_ends_are_grpo_and_grpo_batch_bit_for_bit(seed, binary, eps, ddof):
    r = _rewards(torch.Generator().manual_seed(seed), binary=binary)
    assert torch.equal(E.grpo_interpolated(r, alpha=1.0, ddof=ddof, eps=eps), E.grpo(r, ddof=ddof, eps=eps))
    assert torch.equal(E.grpo_interpolated(r, alpha=0.0, ddof=ddof, eps=eps), E.grpo_batch(r, ddof=ddof, eps=eps))
    # per-run alpha: each batch element takes its own end (compared within the same batched call
    # shapes: a reduction over [3, 20] and over [20] may round differently)
    mixed = E.grpo_interpolated(r, alpha=torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), ddof=ddof, eps=eps)
    assert torch.equal(mixed[0], E.grpo(r, ddof=ddof, eps=eps)[0])
    assert torch.equal(mixed[1], E.grpo_batch(r, ddof=ddof, eps=eps)[1])


def test_in_between_the_weight_ratio_is_the_std_ratio_to_the_power_alpha():
    # two prompts with group stds 1 and 4 (rewards +-1 and +-4 around their means), eps = 0:
    # the advantage magnitude per prompt is |R - mean| / (std_i^a std_B^(1-a)), so the ratio of the
    # two prompts' magnitudes is (4 / 1) * (std_1 / std_2)^a = 4 * 4^(-a)
    r = torch.tensor([[0.0, 2.0], [0.0, 8.0]], dtype=torch.float64)  # ddof 0: std = 1 and 4
    for a in (0.0, 0.25, 0.5, 0.75, 1.0):
        A = E.grpo_interpolated(r, alpha=a, ddof=0, eps=0.0)
        assert math.isclose(float(A[1, 1] / A[0, 1]), 4 * 4 ** (-a), rel_tol=1e-12)
    # scale invariance at any alpha (as GRPO and the batch std): rewards x 7 give the same advantages
    assert torch.allclose(E.grpo_interpolated(7 * r, alpha=0.3, ddof=0, eps=0.0),
                          E.grpo_interpolated(r, alpha=0.3, ddof=0, eps=0.0), rtol=1e-13, atol=0)


def test_constant_groups_and_zero_eps_give_zeros_not_nan():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)  # every std 0
    for a in (0.0, 0.5, 1.0):
        A = E.grpo_interpolated(r, alpha=a, ddof=1, eps=0.0)
        assert torch.equal(A, torch.zeros_like(r))
    with pytest.raises(ValueError, match="alpha"):
        E.grpo_interpolated(r, alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        E.grpo_interpolated(r, alpha=float("nan"))


def test_phase_aware_alpha_is_the_orthogonality_left_of_the_runs_peak():
    f = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    alpha, state = E.phase_aware_alpha(f(0.8))
    assert float(alpha) == 1.0  # the first step: rho_ema = rho_peak = rho_1
    alpha, state = E.phase_aware_alpha(f(0.4), state, decay=0.75)
    # rho_ema = 0.8 + 0.25 (0.4 - 0.8) = 0.7 against the peak 0.8: alpha = 0.875
    assert math.isclose(float(alpha), 0.875, rel_tol=1e-15) and float(state.rho_peak) == 0.8
    alpha, state = E.phase_aware_alpha(f(1.0), state, decay=0.75)
    # rho_ema = 0.7 + 0.25 * 0.3 = 0.775, still under the peak
    assert math.isclose(float(alpha), 0.775 / 0.8, rel_tol=1e-15)
    # a static rho, however low, is not a loss: alpha stays 1 (GRPO), and rho = 0 throughout gives 1
    state = None
    for _ in range(5):
        alpha, state = E.phase_aware_alpha(f(0.3), state)
        assert float(alpha) == 1.0
    assert float(E.phase_aware_alpha(f(0.0), E.phase_aware_alpha(f(0.0))[1])[0]) == 1.0
    with pytest.raises(ValueError, match="decay"):
        E.phase_aware_alpha(torch.tensor(0.5), decay=1.0)
    # NaN (fewer than two prompts with a gradient) is no measurement: the state stays, alpha 1 before any
    alpha, state = E.phase_aware_alpha(f(float("nan")))
    assert float(alpha) == 1.0
    alpha, state = E.phase_aware_alpha(f(0.6), state)
    assert float(alpha) == 1.0 and float(state.rho_ema) == 0.6 and float(state.rho_peak) == 0.6
    alpha, state = E.phase_aware_alpha(f(0.3), state, decay=0.5)  # 0.45 of the peak 0.6
    again, kept = E.phase_aware_alpha(f(float("nan")), state)
    assert float(alpha) == float(again) == pytest.approx(0.75) and kept == state


def test_rho_for_the_rule_counts_only_prompts_with_a_gradient():
    """live_only: two identical live gradients and two zero ones (solved prompts) have rho = 0 (aligned),
    not the 1 - 2/12 = 0.833 of counting the zero ones as orthogonal."""
    g = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    gram = g @ g.T
    assert float(gradient_orthogonality(gram)) == pytest.approx(1 - 2 / 12)
    assert float(gradient_orthogonality(gram, live_only=True)) == pytest.approx(0.0, abs=1e-15)
    assert math.isnan(float(gradient_orthogonality(gram[2:, 2:], live_only=True)))
    assert math.isnan(float(gradient_orthogonality(gram[:1, :1], live_only=True)))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), P=st.integers(2, 16), dtype=st.sampled_from([torch.float32, torch.float64]),
       zeros=st.integers(0, 3), live_only=st.booleans())
def test_orthogonal_gradients_have_rho_exactly_one_in_every_dtype(seed, P, dtype, zeros, live_only):
    """Per-prompt gradients in disjoint (private) blocks, as the engines' block_gram builds them at
    o = 1, some of them zero (solved prompts): no off-diagonal cosine, so rho = 1 exactly and the
    adaptive rules read the orthogonal case as such. (The earlier total-minus-diagonal sum left
    1 - 2^-24 in float32 for about 1 Gram matrix in 500: this test failed on it.)"""
    gen = torch.Generator().manual_seed(seed)
    R, k, s = 64, 8, 4
    g_private = torch.randn(R, P, k, generator=gen, dtype=torch.float64).to(dtype)
    g_private = g_private * 10.0 ** torch.randint(-3, 4, (R, P, 1), generator=gen).to(dtype)
    g_private[:, :min(zeros, P - 2)] = 0  # solved prompts (at least two live ones stay)
    gram = block_gram(g_private, torch.zeros(R, P, s, dtype=dtype))
    rho = gradient_orthogonality(gram, live_only=live_only)
    assert rho.dtype == dtype and torch.equal(rho, torch.ones(R, dtype=dtype))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), steps=st.integers(1, 30), decay=st.floats(0.0, 0.99))
def test_in_the_orthogonal_case_the_rule_is_grpo_at_every_step(seed, steps, decay):
    """The convergence statement's premise, checked: per-prompt gradients in orthogonal subspaces
    (disjoint coordinates, as for orthogonal features) have rho_t = 1 exactly, so alpha_t = 1 and
    the adaptive advantages are GRPO's at every step; the trajectory, and its rate, are GRPO's."""
    gen = torch.Generator().manual_seed(seed)
    P, d = 4, 3
    state = None
    for _ in range(steps):
        g = torch.zeros(P, P * d, dtype=torch.float64)
        for i in range(P):  # prompt i's gradient lives in its own block of coordinates
            g[i, i * d:(i + 1) * d] = torch.randn(d, generator=gen, dtype=torch.float64)
        rho = gradient_orthogonality(g @ g.T)
        assert float(rho) == 1.0
        alpha, state = E.phase_aware_alpha(rho, state, decay=decay)
        r = _rewards(gen, shape=(P, 6))
        assert torch.equal(E.grpo_interpolated(r, alpha=alpha), E.grpo(r))


# -- the finite-G-corrected GRPO (grpo_finite) -----------------------------------------------------

from theory.finite_group import expected_scale, grpo_expected_scale, loo_expected_scale  # noqa: E402


def _finite_g_advantage(p_bar: float, c: float, prior: float):
    """grpo_finite at a fixed state, as a function of one group's rewards [n, G] (the enumerator's form)."""
    def adv(rows):
        n = rows.shape[0]
        state = E.FiniteGState(torch.full((n, 1), p_bar, dtype=torch.float64), torch.full((n, 1), c, dtype=torch.float64),
                               torch.ones(n, 1, dtype=torch.bool))
        return E.grpo_finite(rows.unsqueeze(-2), state=state, prior=prior).squeeze(-2)
    return adv


@settings(max_examples=40, deadline=None)
@given(G=st.integers(2, 10), p=st.floats(0.01, 0.99), p_bar=st.floats(0.0, 1.0), c=st.floats(0.5, 5.0),
       prior=st.sampled_from([0.0, 2.0, 8.0]))
def test_finite_g_expected_step_is_its_closed_form_at_every_group_size(G, p, p_bar, c, prior):
    """E[update_i] = h~_G(p) grad J_i exactly: the closed form (theory.finite_group.loo_expected_scale)
    against exact enumeration over the group's success counts (theory.finite_group.expected_scale,
    the same enumerator that checks GRPO's h_G)."""
    want = expected_scale(_finite_g_advantage(p_bar, c, prior), p, c, G)
    got = float(loo_expected_scale(torch.tensor(p, dtype=torch.float64), G, c, 1e-4, p_bar, prior))
    assert got == pytest.approx(want, rel=1e-12)


def test_finite_g_lifts_grpos_cap_on_near_solved_prompts_and_tends_to_the_population_scale():
    c, eps = 1.0, 1e-4
    for G in (4, 8):
        # p = 0.95 with the state at p (p_bar = p, 8 pseudo-samples): GRPO's h_G is capped near
        # (G - 1) / sqrt(G) (1.5 and 2.47); the population scale is 1 / sqrt(0.95 * 0.05) = 4.59
        p = torch.tensor(0.95, dtype=torch.float64)
        grpo = float(grpo_expected_scale(p, G, 1, eps, c))
        fixed = float(loo_expected_scale(p, G, c, eps, 0.95, 8.0))
        population = 1 / (math.sqrt(0.95 * 0.05) + eps)
        assert grpo < (G - 1) / math.sqrt(G) + 1e-9 < fixed < population, (G, grpo, fixed)
    # G -> infinity: pt -> p, so h~ -> 1 / (c sqrt(p (1 - p)) + eps), whatever the state (here a
    # stale p_bar = 0.9 against p = 0.3); the prior's and the sampling's errors are O(1/G): at
    # least 2.5x smaller per 4x in G once G >> n0
    p = torch.tensor(0.3, dtype=torch.float64)
    err = {G: abs(float(loo_expected_scale(p, G, c, eps, 0.9, 8.0)) * (math.sqrt(0.21) + eps) - 1)
           for G in (64, 256, 1024)}
    assert err[1024] < 0.005 and err[1024] < err[256] / 2.5 < err[64] / 2.5**2, err


def test_finite_g_constant_groups_are_zero_and_nothing_is_nan():
    zeros = torch.zeros(3, 4, dtype=torch.float64)
    ones = torch.full((3, 4), 2.5, dtype=torch.float64)
    state = E.FiniteGState(torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
                           torch.tensor([True, True, False]))
    for r in (zeros, ones):
        for st_ in (None, state):
            for eps in (0.0, 1e-4):
                A = E.grpo_finite(r, eps=eps, state=st_)
                assert torch.equal(A, torch.zeros_like(r))
    # a first success on a prompt whose state has only seen 0 (p_bar = 0, c = 0): finite, c from the group
    r = torch.tensor([[0.0, 0.0, 0.0, 3.0]], dtype=torch.float64)
    A = E.grpo_finite(r, eps=0.0, state=E.FiniteGState(torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                                                       torch.ones(1, dtype=torch.bool)))
    assert torch.isfinite(A).all() and float(A[0, 3]) > 0 > float(A[0, 0])
    with pytest.raises(ValueError, match="G >= 2"):
        E.grpo_finite(torch.ones(2, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="rewards >= 0"):  # {-1, 0} rewards would divide by eps alone
        E.grpo_finite(torch.tensor([[-1.0, 0.0, 0.0]], dtype=torch.float64))


def test_finite_g_state_follows_the_groups_success_rate():
    rule = E.get("grpo_finite").adaptive
    r = torch.tensor([[0.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    A0, s0 = rule.step(r, None, None, ddof=1, eps=1e-4)
    assert torch.equal(A0, E.grpo_finite(r))  # first step: no prior
    assert s0.p_bar.tolist() == [0.5, 0.0] and s0.c.tolist() == [2.0, 0.0]
    r1 = torch.tensor([[2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 5.0, 0.0]], dtype=torch.float64)
    A1, s1 = rule.step(r1, s0, None, ddof=1, eps=1e-4)
    assert torch.equal(A1, E.grpo_finite(r1, state=s0))  # the step reads the state before this group
    # p_bar <- p_bar + (1 - 0.9) (rate - p_bar): 0.5 + 0.1 * 0.5 = 0.55 and 0 + 0.1 * 0.25 = 0.025
    assert s1.p_bar.tolist() == pytest.approx([0.55, 0.025], abs=1e-15) and s1.c.tolist() == [2.0, 5.0]
    # a prompt not seen before (the LLM runners' data sets) takes no prior and starts its rate anew
    fresh = E.FiniteGState(s0.p_bar, s0.c, torch.tensor([True, False]))
    A2, s2 = rule.step(r1, fresh, None, ddof=1, eps=1e-4)
    assert torch.equal(A2[1], E.grpo_finite(r1[1:])[0]) and s2.p_bar.tolist() == pytest.approx([0.55, 0.25])
    assert s2.seen.all()
    z = torch.zeros(2, dtype=torch.float64)
    unseen = E.FiniteGState(z, z, torch.zeros(2, dtype=torch.bool))  # prompts never trained on
    assert torch.equal(rule.step(r1, unseen, None, ddof=1, eps=1e-4)[0], E.grpo_finite(r1))


def test_phase_aware_rule_in_the_engine_is_grpo_on_orthogonal_prompts():
    """The convergence statement in the engine: on orthogonal prompts (o = 1: gradients in disjoint
    private blocks, rho_t = 1 exactly) the phase-aware run is the GRPO run, bit for bit, in both modes."""
    from sim.config import RunConfig, TrainConfig
    from sim.engine import train_batch
    from sim.problems import ProblemConfig

    p = ProblemConfig(num_prompts=5, num_responses=4, orthogonality=1.0, private_dim=3, shared_dim=3,
                      reward_scale_spread=3.0, difficulty_spread=1.0)
    for mode in ("exact", "sampled"):
        runs = {e: [RunConfig(p, TrainConfig(estimator=e, mode=mode, group_size=4, steps=40, lr=3.0, seed=s,
                                             log_points=6)) for s in (0, 1)] for e in ("grpo", "grpo_phase")}
        a, b = train_batch(runs["grpo"], engine="torch"), train_batch(runs["grpo_phase"])
        assert torch.equal(a.theta_private, b.theta_private) and torch.equal(a.theta_shared, b.theta_shared)
        assert (b.steps.rho == 1.0).all()


def test_scorecard_compares_each_cell_with_the_best_fixed_choice():
    """sim.analysis.adaptive_scorecard on hand-made runs whose answers are known: per cell the median
    over seeds of steps to target (never reached = steps + 1), the best of GRPO / Dr. GRPO /
    REINFORCE, the ratio, and phase III from the selected GRPO runs' logged phases; exact cells that
    differ only in G are one."""
    import pandas as pd

    from sim.analysis import adaptive_scorecard

    # (mode, G) -> estimator -> steps of seeds 0 and 1; None = never reached (counts as 1000 + 1)
    table = {("sampled", 4): {"grpo": (100, 110), "dr_grpo": (120, 130), "reinforce": (150, 150),
                              "grpo_phase": (108, 118), "grpo_finite": (90, 96)},
             ("sampled", 16): {"grpo": (50, 50), "dr_grpo": (40, 44), "reinforce": (None, None),
                               "grpo_phase": (60, 60), "grpo_finite": (40, 45)},
             ("exact", 4): {"grpo": (30, 30), "dr_grpo": (60, 60), "reinforce": (60, 60),
                            "grpo_phase": (30, 30), "grpo_finite": (30, 30)},
             ("sampled", 8): {e: (7, 9) for e in ("grpo", "dr_grpo", "reinforce", "grpo_phase", "grpo_finite")}}
    table[("exact", 16)] = table[("exact", 4)]  # the same runs: exact mode has no groups
    # GRPO's first step labelled III: before its target (step 0 of 110 steps), after it (step 60 > 50),
    # or at step 3 of a run that takes 9 (seed 1 of the tied cell)
    phase_iii_at = {("sampled", 4, 1): 0, ("sampled", 16, 0): 60, ("sampled", 8, 1): 3}
    rows, steps = [], []
    for (mode, G), by_est in table.items():
        for est, per_seed in by_est.items():
            for seed, n in enumerate(per_seed):
                rid = f"{mode}{G}{est}{seed}"
                rows.append({"run_id": rid, "mode": mode, "group_size": G, "orthogonality": 0.5, "estimator": est,
                             "lr": 1.0, "seed": seed, "selected": True, "steps": 1000,
                             "steps_to_target": 1000 if n is None else n, "reached_target": n is not None})
                steps.append({"run_id": rid, "step": 0, "phase": "I"})
                if est == "grpo" and (mode, G, seed) in phase_iii_at:
                    steps.append({"run_id": rid, "step": phase_iii_at[mode, G, seed], "phase": "III"})
    card = adaptive_scorecard(pd.DataFrame(rows), pd.DataFrame(steps), "grpo_finite").set_index(["mode", "group_size"])
    assert len(card) == 4  # the two exact cells are one
    s4, s16, ex = card.loc[("sampled", 4)], card.loc[("sampled", 16)], card.loc[("exact", 0)]
    assert (s4.best, s4.best_steps, s4.adaptive_steps) == ("grpo", 105, 93)  # medians of (100, 110), (90, 96)
    assert s4.faster_than_each and s4.within and s4.phase_iii and s4.phase_iii_before_target
    assert (s16.best, s16.best_steps, s16.adaptive_steps) == ("dr_grpo", 42, 42.5)  # 42.5 / 42 = 1.012
    assert s16.within and not s16.faster_than_each
    assert s16.phase_iii and not s16.phase_iii_before_target  # labelled at step 60, the target reached at 50
    assert ex.ratio == 1.0 and not ex.faster_than_each  # a tie is not strictly faster
    assert not ex.all_tied  # grpo_finite ties GRPO, not Dr. GRPO or REINFORCE
    tied = card.loc[("sampled", 8)]
    assert tied.all_tied and tied.phase_iii_before_target and tied.ratio == 1.0 and not tied.faster_than_each
    assert not (s4.all_tied or s16.all_tied)
    phase = adaptive_scorecard(pd.DataFrame(rows), pd.DataFrame(steps), "grpo_phase").set_index(["mode", "group_size"])
    assert phase.loc[("sampled", 16)].ratio == pytest.approx(60 / 42) and not phase.loc[("sampled", 16)].within
    assert phase.loc[("sampled", 4)].ratio == pytest.approx(113 / 105) and phase.loc[("sampled", 4)].within
    with pytest.raises(ValueError, match="no selected runs of grpo_oracle"):
        adaptive_scorecard(pd.DataFrame(rows), pd.DataFrame(steps), "grpo_oracle")


def test_the_seed_bootstrap_of_the_scorecard_gives_each_cells_chance_of_being_within():
    """Per cell the share of paired seed resamples in which the adaptive estimator is within 10% of the
    best fixed one. Two seeds: a resample is seeds {0, 0}, {1, 1} (1/4 each) or one of each (1/2)."""
    import pandas as pd

    from sim.analysis import adaptive_scorecard, scorecard_seed_bootstrap

    # orthogonality -> estimator -> steps of seeds 0 and 1
    table = {0.1: {"grpo": (100, 100), "dr_grpo": (200, 200), "reinforce": (300, 300), "grpo_finite": (105, 105)},
             0.2: {"grpo": (100, 100), "dr_grpo": (200, 200), "reinforce": (300, 300), "grpo_finite": (130, 130)},
             # {0,0}: 100 against 150, within; {1,1}: 200 against 150, not; one of each: 150 = 150, within -> 3/4
             0.3: {"grpo": (150, 150), "dr_grpo": (400, 400), "reinforce": (400, 400), "grpo_finite": (100, 200)}}
    rows = [{"run_id": f"{o}{est}{seed}", "orthogonality": o, "mode": "sampled", "group_size": 4, "estimator": est,
             "lr": 1.0, "seed": seed, "selected": True, "steps": 1000, "steps_to_target": n, "reached_target": True}
            for o, by_est in table.items() for est, per_seed in by_est.items() for seed, n in enumerate(per_seed)]
    # a cell with its own seed (2, which the others lack) and no Dr. GRPO run: resampled from its own
    # seeds, the best of the baselines it has (105 against 100: within)
    rows += [{**rows[0], "run_id": f"0.4{est}", "orthogonality": 0.4, "estimator": est, "seed": 2, "steps_to_target": n}
             for est, n in (("grpo", 100), ("reinforce", 300), ("grpo_finite", 105))]
    runs = pd.DataFrame(rows)
    cells, counts = scorecard_seed_bootstrap(runs, "grpo_finite", draws=4000)
    p = dict(zip(cells["orthogonality"], cells["p_within"]))
    assert p[0.1] == 1.0 and p[0.2] == 0.0 and p[0.4] == 1.0  # seeds alike: the verdict itself
    card = adaptive_scorecard(runs, pd.DataFrame({"run_id": [], "step": [], "phase": []}), "grpo_finite")
    assert list(card["within"]) == [True, False, True, True]  # the stored seeds: 150 against 150 at o = 0.3
    assert p[0.3] == pytest.approx(0.75, abs=0.03)  # binomial sd of the share at 4000 draws: 0.007
    assert counts.shape == (4000,) and set(counts) == {2, 3} and counts.mean() == pytest.approx(sum(p.values()))
    with pytest.raises(ValueError, match="draws must be >= 1"):
        scorecard_seed_bootstrap(runs, "grpo_finite", draws=0)


@settings(max_examples=60, deadline=None)
@given(G=st.integers(2, 1024), p=st.floats(0.0005, 0.9995), prior=st.floats(0.0, 64.0),
       eps=st.sampled_from([0.0, 1e-4, 1e-2]), ddof=st.sampled_from([0, 1]), c=st.floats(0.1, 10.0))
def test_finite_g_is_not_slower_than_grpo_in_the_orthogonal_case(G, p, prior, eps, ddof, c):
    """The convergence statement of grpo_finite (its docstring): with orthogonal prompts each moves at
    its own expected rate h grad J_i, and at the state's fixed point p_bar = p the finite-G-corrected
    scale h~_G(p) is at least GRPO's h_G(p) (either ddof), so no prompt, and no run, is slower than
    GRPO's at the same lr. Both scales are exact (each checked against enumeration above)."""
    pt = torch.tensor(p, dtype=torch.float64)
    grpo = float(grpo_expected_scale(pt, G, ddof, eps, c))
    fixed = float(loo_expected_scale(pt, G, c, eps, p, prior))
    assert fixed >= grpo, (fixed, grpo)


def test_prompt_states_keep_a_state_per_prompt_across_batches():
    """The LLM runners' PromptStates: the same advantages as the rule on a fixed set of prompts, with
    the rows of each batch gathered from (and scattered to) the prompt's own state."""
    rule = E.get("grpo_finite").adaptive
    gen = torch.Generator().manual_seed(3)
    keys = ["a", "b", "c"]
    tracker = E.PromptStates("grpo_finite", ddof=1, eps=1e-4)
    state = None
    for _ in range(4):  # all prompts every step: the engine's case
        r = (torch.rand(3, 6, generator=gen, dtype=torch.float64) < 0.4).double() * 2
        want, state = rule.step(r, state, None, ddof=1, eps=1e-4)
        assert torch.equal(tracker(r, keys), want)
    # a batch that re-orders two prompts and brings a new one: each row reads its own prompt's state
    r = (torch.rand(3, 6, generator=gen, dtype=torch.float64) < 0.4).double() * 2
    mixed = tracker(r, ["c", "new", "a"])
    own = E.FiniteGState(state.p_bar[[2, 0, 0]] * torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64),
                         state.c[[2, 0, 0]] * torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64),
                         torch.tensor([True, False, True]))  # the new prompt: no state (p_bar = c = 0)
    assert torch.equal(mixed, E.grpo_finite(r, state=own))
    # a group TRL could not score: advantage 0, and its prompt's state stays
    before = tracker.table["b"]
    r2 = r.clone()
    r2[0, 1] = float("nan")
    out = tracker(r2, ["b", "a", "c"])
    assert torch.equal(out[0], torch.zeros(6, dtype=torch.float64)) and tracker.table["b"] == before
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="not an adaptive estimator"):
        E.PromptStates("grpo", 1, 1e-4)
    with pytest.raises(ValueError, match="needs the step's rho_t"):
        E.PromptStates("grpo_phase", 1, 1e-4)(r, keys)


# -- grpo_finite with a shrunk baseline (grpo_shrunk) ------------------------------------------------

def _shrunk_advantage(p_bar: float, c: float, prior: float, fraction: float, estimator=E.grpo_shrunk):
    """grpo_shrunk (or ``estimator``, any with its arguments) at a fixed state (seen, largest reward c)
    and baseline fraction, as a function of one group's rewards [n, G]."""
    def adv(rows):
        n = rows.shape[0]
        state = E.FiniteGState(torch.full((n, 1), p_bar, dtype=torch.float64), torch.full((n, 1), c, dtype=torch.float64),
                               torch.ones(n, 1, dtype=torch.bool))
        return estimator(rows.unsqueeze(-2), state=state, prior=prior, fraction=fraction).squeeze(-2)
    return adv


@settings(max_examples=40, deadline=None)
@given(G=st.integers(2, 10), p=st.floats(0.01, 0.99), p_bar=st.floats(0.0, 1.0), c=st.floats(0.5, 5.0),
       prior=st.sampled_from([0.0, 8.0]), fraction=st.floats(0.0, 1.0))
def test_shrunk_baseline_moves_only_the_variance_not_the_expected_step(G, p, p_bar, c, prior, fraction):
    """The baseline reads only the other samples, so E[update_i] = h~_G(p) grad J_i (grpo_finite's
    closed form) for every fraction lambda: exact enumeration over the group's success counts."""
    want = float(loo_expected_scale(torch.tensor(p, dtype=torch.float64), G, c, 1e-4, p_bar, prior))
    got = expected_scale(_shrunk_advantage(p_bar, c, prior, fraction), p, c, G)
    assert got == pytest.approx(want, rel=1e-10)


def _assert_per_run_fractions_are_each_runs_own(estimator, r, state):
    """One lambda per run (a [3] fraction for rewards [3, P, G]) gives each run its own advantages."""
    lam = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    per_run = estimator(r, state=state, fraction=lam)
    for i in range(3):
        one = E.FiniteGState(state.p_bar[i], state.c[i], state.seen[i])
        assert torch.equal(per_run[i], estimator(r[i], state=one, fraction=float(lam[i])))


def test_shrunk_baseline_ends_are_grpo_finite_and_its_scale_without_a_baseline():
    gen = torch.Generator().manual_seed(5)
    r = _rewards(gen, shape=(3, 4, 6))
    state = E.FiniteGState(torch.rand(3, 4, generator=gen, dtype=torch.float64), torch.full((3, 4), 2.5, dtype=torch.float64),
                           torch.rand(3, 4, generator=gen) < 0.7)
    assert torch.equal(E.grpo_shrunk(r, state=state, fraction=1.0), E.grpo_finite(r, state=state))
    # lambda = 0: A = R / (c sqrt(pt (1 - pt)) + eps), i.e. grpo_finite's advantage times R / (R - mean_others)
    none = E.grpo_shrunk(r, state=state, fraction=0.0)
    finite = E.grpo_finite(r, state=state)
    loo = r - (r.sum(-1, keepdim=True) - r) / 5
    mask = loo != 0
    assert torch.allclose(none[mask], (finite * r)[mask] / loo[mask], rtol=1e-12)
    _assert_per_run_fractions_are_each_runs_own(E.grpo_shrunk, r, state)
    with pytest.raises(ValueError, match="fraction must lie in"):
        E.grpo_shrunk(r, fraction=1.5)
    with pytest.raises(ValueError, match="rewards >= 0"):
        E.grpo_shrunk(-r)


def test_shrunk_baseline_constant_groups_and_zero_eps_give_no_nan():
    """A constant group of successes gets (1 - lambda) R / scale (REINFORCE's push, finite-G scaled),
    one of failures 0; with eps = 0 and a prompt never rewarded (c = 0) the advantage is 0, not NaN."""
    ones = torch.full((2, 4), 2.0, dtype=torch.float64)
    A = E.grpo_shrunk(ones, fraction=0.25)
    pt = (3 + 0.5) / 4  # the other 3 all succeed, no prior
    assert torch.allclose(A, torch.full_like(ones, 0.75 * 2.0 / (2.0 * math.sqrt(pt * (1 - pt)) + 1e-4)), rtol=1e-12)
    assert torch.equal(E.grpo_shrunk(ones, fraction=1.0), torch.zeros_like(ones))
    zeros = torch.zeros(2, 4, dtype=torch.float64)
    assert torch.equal(E.grpo_shrunk(zeros, eps=0.0, fraction=0.0), zeros)


def test_shrunk_rule_takes_lambda_from_the_runs_peak_orthogonality():
    """lambda_t = rho_peak_t^2, rho_peak the largest running mean of rho_t (phase_aware_alpha's state),
    read with this step's rho_t; NaN (nothing measured) reads as lambda = 1; the per-prompt state is
    grpo_finite's."""
    rule = E.get("grpo_shrunk").adaptive
    gen = torch.Generator().manual_seed(2)
    r = _rewards(gen, shape=(2, 3, 5))
    A, s = rule.step(r, None, torch.tensor([0.6, float("nan")], dtype=torch.float64), ddof=1, eps=1e-4)
    assert torch.equal(A, E.grpo_shrunk(r, fraction=torch.tensor([0.36, 1.0], dtype=torch.float64)))
    fin = E.get("grpo_finite").adaptive.next_prompt_state(r, None)
    assert torch.equal(s.p_bar, fin.p_bar) and torch.equal(s.c, fin.c)
    # rho_ema <- 0.6 + 0.1 (0.9 - 0.6) = 0.63 is the new peak; then rho falls: the peak, and lambda, stay
    r1 = _rewards(gen, shape=(2, 3, 5))
    A1, s1 = rule.step(r1, s, torch.tensor([0.9, 0.5], dtype=torch.float64), ddof=1, eps=1e-4)
    assert s1.rho_peak.tolist() == pytest.approx([0.63, 0.5], abs=1e-15)
    assert torch.allclose(A1, E.grpo_shrunk(r1, state=s, fraction=s1.rho_peak**2), rtol=0, atol=0)
    _, s2 = rule.step(r1, s1, torch.tensor([0.1, 0.1], dtype=torch.float64), ddof=1, eps=1e-4)
    assert torch.equal(s2.rho_peak, s1.rho_peak) and float(s2.rho_ema[0]) < float(s1.rho_ema[0])
    assert torch.equal(rule.at(r1, s2, ddof=1, eps=1e-4), E.grpo_shrunk(r1, state=s2, fraction=s2.rho_peak**2))
    # float32 orthogonal prompts (rho = 1 exactly: test_orthogonal_gradients_have_rho_exactly_one_in_every_dtype)
    state = None
    for rho in (torch.ones(1), torch.ones(1), torch.ones(1)):
        _, state = rule.step(torch.full((1, 2, 4), 2.0, dtype=torch.float32), state, rho, ddof=1, eps=1e-4)
    assert torch.equal(rule.at(torch.full((1, 2, 4), 2.0, dtype=torch.float32), state, ddof=1, eps=1e-4),
                       torch.zeros(1, 2, 4))  # a constant group: 0, as grpo_finite gives
    for dtype in (torch.float32, torch.float64):  # a peak below 1 is taken as it is, however near
        below = torch.tensor(1.0, dtype=dtype) - torch.finfo(dtype).eps
        lam = float(E.baseline_fraction(below))
        assert lam < 1 and lam == pytest.approx(float(below) ** 2, rel=1e-7)
    with pytest.raises(ValueError, match="exponent must be > 0"):
        E.ShrunkBaseline(exponent=0.0)
    # no rho given (a probe rule that does not read it): no measurement, lambda stays 1 on a fresh state
    A_none, s_none = rule.step(r, None, None, ddof=1, eps=1e-4)
    assert torch.equal(A_none, E.grpo_finite(r)) and torch.isnan(s_none.rho_peak).all()


def test_shrunk_rule_in_the_engine_is_grpo_finite_on_orthogonal_prompts():
    """The convergence statement of grpo_shrunk: on orthogonal prompts (o = 1, rho_t = 1 exactly)
    lambda = 1 at every step, so the run is grpo_finite's, bit for bit, in both modes (and so its
    rate is not slower than GRPO's: test_finite_g_is_not_slower_than_grpo_in_the_orthogonal_case)."""
    from sim.config import RunConfig, TrainConfig
    from sim.engine import train_batch
    from sim.problems import ProblemConfig

    p = ProblemConfig(num_prompts=5, num_responses=4, orthogonality=1.0, private_dim=3, shared_dim=3,
                      reward_scale_spread=3.0, difficulty_spread=1.0)
    for mode in ("exact", "sampled"):
        runs = {e: [RunConfig(p, TrainConfig(estimator=e, mode=mode, group_size=4, steps=40, lr=3.0, seed=s,
                                             log_points=6)) for s in (0, 1)] for e in ("grpo_finite", "grpo_shrunk")}
        a, b = train_batch(runs["grpo_finite"]), train_batch(runs["grpo_shrunk"])
        assert a.runs["final_J"].tolist() == b.runs["final_J"].tolist(), mode
    # and it is not grpo_finite where prompts share parameters (o = 0.3: rho_t < 1, lambda < 1)
    shared = ProblemConfig(num_prompts=5, num_responses=4, orthogonality=0.3, private_dim=3, shared_dim=3)
    runs = {e: [RunConfig(shared, TrainConfig(estimator=e, mode="sampled", group_size=4, steps=40, lr=3.0, seed=0,
                                              log_points=6))] for e in ("grpo_finite", "grpo_shrunk")}
    assert train_batch(runs["grpo_finite"]).runs["final_J"].tolist() != train_batch(runs["grpo_shrunk"]).runs["final_J"].tolist()



def test_exact_mode_shrunk_rule_measures_no_rho(monkeypatch):
    """Exact mode is grpo_finite's limit, which reads no rho: the engine does not measure it there
    (O(P^2 s) per step for nothing), while sampled mode does."""
    from sim import engine
    from sim.config import RunConfig, TrainConfig
    from sim.problems import ProblemConfig

    calls = []
    real = engine.batch_rho
    monkeypatch.setattr(engine, "batch_rho", lambda *a, **k: calls.append(1) or real(*a, **k))
    p = ProblemConfig(num_prompts=4, num_responses=4, orthogonality=0.3, private_dim=3, shared_dim=3)
    for mode in ("exact", "sampled"):
        engine.train_batch([RunConfig(p, TrainConfig(estimator="grpo_shrunk", mode=mode, group_size=4, steps=5, lr=1.0,
                                                     log_points=2))])
        assert (len(calls) > 0) == (mode == "sampled"), (mode, len(calls))


@pytest.mark.parametrize("name", ["grpo_shrunk", "grpo_selfnorm"])
def test_prompt_states_keep_the_shrunk_rules_run_state_beside_its_table(name):
    """grpo_shrunk (and grpo_selfnorm, its state) in the LLM runners: per-prompt p_bar and c in the
    table, rho_ema and rho_peak per run; on a fixed set of prompts the same advantages as the rule itself."""
    rule = E.get(name).adaptive
    gen = torch.Generator().manual_seed(4)
    keys = ["a", "b", "c"]
    tracker = E.PromptStates(name, ddof=1, eps=1e-4)
    state = None
    for rho in (0.7, 0.8, 0.5):
        r = (torch.rand(3, 6, generator=gen, dtype=torch.float64) < 0.4).double() * 2
        rho_t = torch.tensor(rho, dtype=torch.float64)
        want, state = rule.step(r, state, rho_t, ddof=1, eps=1e-4)
        assert torch.equal(tracker(r, keys, rho_t), want)
    assert float(tracker.state.rho_peak) == pytest.approx(float(state.rho_peak), abs=0)
    assert set(tracker.table) == set(keys)
    with pytest.raises(ValueError, match="needs the step's rho_t"):
        tracker(r, keys)


# -- GRPO's raw std with its hard-side finite-G cap lifted (grpo_selfnorm) ----------------------------

def _selfnorm_advantage(p_bar: float, c: float, prior: float, fraction: float = 1.0):
    """grpo_selfnorm at a fixed state and baseline fraction, as a function of one group's rewards [n, G]."""
    return _shrunk_advantage(p_bar, c, prior, fraction, estimator=E.grpo_selfnorm)


def _lift(G: int, p_bar: float, c: float, prior: float, eps: float = 1e-4) -> float:
    """kappa of grpo_selfnorm's docstring, by hand: the finite-G target over GRPO's h_G at the smoothed
    rate ps, at least 1, on the hard side (ps < 1/2) only."""
    n = G + prior
    ps = (n * p_bar + 0.5) / (n + 1)
    if ps >= 0.5:
        return 1.0
    h = float(grpo_expected_scale(torch.tensor(ps, dtype=torch.float64), G, 1, eps, c))
    return max(1.0, 1 / ((c * math.sqrt(ps * (1 - ps)) + eps) * h))


@settings(max_examples=40, deadline=None)
@given(G=st.integers(2, 10), p=st.floats(0.01, 0.99), p_bar=st.floats(0.0, 1.0), c=st.floats(0.5, 5.0),
       prior=st.sampled_from([0.0, 8.0]))
def test_selfnorm_expected_step_is_grpos_times_its_lift(G, p, p_bar, c, prior):
    """kappa reads only the state, so at lambda = 1 E[update_i] = kappa G / (G - 1) h_G(p) grad J_i
    (the leave-one-out centring is G / (G - 1) times GRPO's): exact enumeration over the group's
    success counts against GRPO's closed-form h_G (itself checked against the same enumeration)."""
    h = float(grpo_expected_scale(torch.tensor(p, dtype=torch.float64), G, 1, 1e-4, c))
    want = _lift(G, p_bar, c, prior) * G / (G - 1) * h
    got = expected_scale(_selfnorm_advantage(p_bar, c, prior), p, c, G)
    assert got == pytest.approx(want, rel=1e-10)


@settings(max_examples=60, deadline=None)
@given(G=st.integers(2, 64), p=st.floats(0.0005, 0.9995), p_bar=st.floats(0.0, 1.0), prior=st.floats(0.0, 64.0),
       c=st.floats(0.1, 10.0))
def test_selfnorm_is_not_slower_than_grpo_in_the_orthogonal_case(G, p, p_bar, prior, c):
    """The convergence statement of grpo_selfnorm (its docstring): on orthogonal prompts rho_t = 1, so
    lambda = 1, and each prompt's expected step (enumerated) is at least GRPO's h_G(p) grad J_i at any
    state, so no prompt, and no run, is slower than GRPO's at the same lr."""
    got = expected_scale(_selfnorm_advantage(p_bar, c, prior), p, c, G)
    grpo = float(grpo_expected_scale(torch.tensor(p, dtype=torch.float64), G, 1, 1e-4, c))
    assert got >= grpo * (1 - 1e-12), (got, grpo)


def test_selfnorm_is_grpo_on_near_solved_prompts_and_lifts_a_hard_prompts_rare_success():
    gen = torch.Generator().manual_seed(6)
    r = _rewards(gen, shape=(3, 4, 6))
    G = r.shape[-1]
    # no state (the first step), and a near-solved state: GRPO's advantages times G / (G - 1)
    near_solved = E.FiniteGState(torch.full((3, 4), 0.9, dtype=torch.float64), torch.full((3, 4), 2.5, dtype=torch.float64),
                                 torch.ones(3, 4, dtype=torch.bool))
    for state in (None, near_solved):
        assert torch.allclose(E.grpo_selfnorm(r, state=state), E.grpo(r) * G / (G - 1), rtol=1e-12, atol=1e-12)
    # a hard prompt (p_bar = 0.05, G = 8): one success in 8; kappa = target / h_G > 1, by hand
    one = torch.tensor([[2.5] + [0.0] * 7], dtype=torch.float64)
    hard = E.FiniteGState(torch.tensor([0.05], dtype=torch.float64), torch.tensor([2.5], dtype=torch.float64),
                          torch.ones(1, dtype=torch.bool))
    kappa = _lift(8, 0.05, 2.5, 8.0)
    assert kappa > 1.5  # GRPO's cap binds at p ~ 0.05 (h_G -> (G - 1) / (sqrt(G) c) as p -> 0)
    A = E.grpo_selfnorm(one, state=hard)
    assert torch.allclose(A, E.grpo(one) * 8 / 7 * kappa, rtol=1e-12)
    # an unseen prompt is not lifted; per-run fractions are each run's own; bad input is refused
    unseen = E.FiniteGState(hard.p_bar, hard.c, torch.zeros(1, dtype=torch.bool))
    assert torch.allclose(E.grpo_selfnorm(one, state=unseen), E.grpo(one) * 8 / 7, rtol=1e-12)
    _assert_per_run_fractions_are_each_runs_own(E.grpo_selfnorm, r, near_solved)
    with pytest.raises(ValueError, match="fraction must lie in"):
        E.grpo_selfnorm(r, fraction=-0.1)
    with pytest.raises(ValueError, match="rewards >= 0"):
        E.grpo_selfnorm(-r)


def test_selfnorm_constant_groups_huge_rewards_and_zero_eps_give_no_nan():
    """A constant group has std 0: grpo_shrunk's denominator, so 0 at lambda = 1 and (1 - lambda) R /
    scale below it; a prompt never rewarded (c = 0) with eps = 0 gives 0, and rewards of 1e300 stay finite."""
    ones = torch.full((2, 4), 2.0, dtype=torch.float64)
    assert torch.equal(E.grpo_selfnorm(ones, fraction=1.0), torch.zeros_like(ones))
    assert torch.equal(E.grpo_selfnorm(ones, fraction=0.25), E.grpo_shrunk(ones, fraction=0.25))
    zeros = torch.zeros(2, 4, dtype=torch.float64)
    never = E.FiniteGState(torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.bool))
    for state in (None, never):
        assert torch.equal(E.grpo_selfnorm(zeros, eps=0.0, fraction=0.0, state=state), zeros)
    huge = torch.tensor([[1e300, 0.0, 0.0, 0.0]], dtype=torch.float64)
    st_ = E.FiniteGState(torch.tensor([0.1], dtype=torch.float64), torch.tensor([1e300], dtype=torch.float64),
                         torch.ones(1, dtype=torch.bool))
    assert torch.isfinite(E.grpo_selfnorm(huge, state=st_)).all()
