"""Probes behind README 'Adaptive normalization': could any interpolation between GRPO and batch
std beat GRPO where phase III appears? Each estimator at its tuned lr, in fig. 5's problem family
(o = 0.3 and 1, failure mode 0.95, reward-scale spread 10, difficulty spread 0.6, 1500 steps, 2 seeds).

    python experiments/adaptive_probes.py switch DIR    # GRPO, then batch std from step 10/20/40/80
    python experiments/adaptive_probes.py alpha DIR     # fixed exponents a = 0.5, 1.5, 2
    python experiments/adaptive_probes.py shrink DIR    # grpo_shrunk's calibration (below)
    python experiments/adaptive_probes.py prior DIR     # grpo_shrunk's scale: its prior, its decay, a cap
    python experiments/adaptive_probes.py expected DIR  # the o = 1 failure-mode cells without sampling noise
    python experiments/adaptive_probes.py selfnorm DIR  # GRPO's raw std, its expected finite-G cap undone

Prints the median steps to 90% of J* per (orthogonality, mode, estimator). The probe estimators
are registered for this process only (the config's estimator check is widened to the registry),
so they never reach the CLI; both are grpo_interpolated with a fixed or switched exponent, whose
exact-mode limit is estimators.interpolated_limit. Measured 2026-12-01: switching never helped
(o = 0.3, exact: 386-473 steps against GRPO's 198; o = 1, exact: 30-47 against 30), and fixed a
won in at most one of the four cells.

``shrink`` is grpo_shrunk's calibration: grpo_finite's scale with its baseline times a fixed
lambda = 0.5 (shrink_fixed_0.5), times rho_peak (shrink_q1) and times rho_peak^2 (grpo_shrunk itself),
beside grpo_finite and the fixed three, on fig. 8's 32 sampled cells (experiments/fig8_adaptive.toml,
4 seeds, tuned:2); it prints each one's adaptive_scorecard. Measured 2026-12-07 (about 15 min on 2
cores): within 10% of the best in 28 (fixed 0.5), 28 (rho_peak) and 31 (rho_peak^2) of 32 cells,
grpo_finite 26; faster than each in 12, 12, 14 and 8 of the 27 phase-III cells.

``prior`` asks why GRPO's raw std beats grpo_shrunk in the sampled o = 1 failure-mode cells (its
scale, not its baseline: lambda = rho_peak^2 is 0.997 there, and grpo_finite, lambda = 1, loses
too). grpo_shrunk with its scale's prior n0 = 0, 2, 4 pseudo-samples (default 8), with the running
rate's decay 0.5 (default 0.9: a memory of about 10 steps), and with its weight capped at GRPO's
largest one, den >= c / sqrt(G) (shrink_cap; shrink_cap_solved: only on the near-solved side,
pt > 1/2), on the same 32 sampled cells, 6 seeds. Measured
2026-12-07 (README 'Adaptive normalization' has the counts): no variant is better than the default
beyond the seeds' noise; the cap loses broadly (24 of 32 within 10%, default 30), the
near-solved-side cap less (27).

``expected`` separates the expected step from the noise in those cells: exact-mode runs (no
sampling) whose per-prompt scale is GRPO's finite-G expected scale h_G(p) (exp_grpo_G4/16,
theory.finite_group.grpo_expected_scale) or grpo_finite's h~_G(p) at its fixed point p_bar = p
(exp_finite_G4/16, loo_expected_scale), beside exact GRPO (1 / sigma), REINFORCE and Dr. GRPO, at
o = 1 with the failure mode, fig. 8's difficulty and reward spreads, 6 seeds, tuned:2. Measured
2026-12-08 (6 min on one core): GRPO's expected steps are the slower ones, 147 / 111 / 145 / 63
median steps (difficulty spread 0.3 and 1, reward spread 1 and 10) at G = 16 against grpo_finite's
129 / 97 / 126 / 51; both cliffs (steps rising again with lr) at the same rate. So the sampled
cells GRPO wins there are won by its noise, not by its expected step.

``selfnorm`` keeps GRPO's raw std, the noise that wins there, and corrects its expected step:
A_ig = kappa_i (R_ig - lambda mean_(h != g) R_ih) / (std_g(R_i) + eps), lambda = grpo_shrunk's
rho_peak^2, kappa_i = (1 / (c_i sqrt(ps (1 - ps)) + eps)) / h_G(ps), ps = ((G + n0) p_bar_i + 1/2) /
(G + n0 + 1) the running success rate (kappa reads the state only once c_i is known, so then
E[update_i | state] = kappa_i G / (G - 1) h_G(p_i) grad J_i at lambda = 1): sn_both undoes GRPO's finite-G cap on both sides, sn_hard only on the hard side
(ps < 1/2, kappa >= 1: a hard prompt's rare success), sn_none not at all (kappa = 1: at lambda = 1,
GRPO times G / (G - 1), a rescaled lr). A constant group (std 0) falls back to grpo_shrunk's
denominator. Fig. 8's 32 sampled cells, 6 seeds; measured 2026-12-08 as the variants alone (31 min
on one core) scored beside fig. 8's runs. Within 10% / faster than each in the 26 phase-III cells /
geometric mean of steps / best over the 26 cells of more than 6 steps (grpo_shrunk: 30 / 14 / 0.902): sn_both 29 / 15 / 0.905, sn_hard
28 / 17 / 0.889, sn_none 28 / 14 / 0.949. sn_hard wins the o = 1 failure-mode cells at G = 4 (86.5
steps against GRPO's 101, 53 against 66, 147.5 against 178, 55 against 63) and loses o = 0.3, G = 4
(620.5 against 455 with the failure mode, 37.5 against REINFORCE's 32.5 without). sn_none (at lambda = 1
GRPO with every rate times G / (G - 1), 16/15) takes 57 steps where GRPO takes 46 (o = 1, failure mode, G = 16,
difficulty spread 0.3, reward spread 10): that cell's best is one grid rate just before a cliff.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

import sim.config
from sim import estimators as E
from sim import sweep
from sim.analysis import add_comparisons, adaptive_scorecard


@dataclass(frozen=True)
class StepCount:
    t: torch.Tensor  # [R] steps taken


class FixedShrink(E.ShrunkBaseline):
    """grpo_shrunk's rule with a fixed baseline fraction instead of rho_peak^q (it reads no rho)."""

    needs_rho = False

    def __init__(self, fraction: float):
        super().__init__()
        self.fixed = fraction

    def fraction_of_peak(self, rho_peak):
        return torch.tensor(self.fixed, dtype=torch.float64)


class CappedShrink(E.ShrunkBaseline):
    """grpo_shrunk with each weight capped at GRPO's largest, 1 / den <= sqrt(G) / c (GRPO's std of a
    group with one odd sample out is c / sqrt(G)); ``solved_side``: only where pt_ig > 1/2 (a rare
    failure of a near-solved prompt), a hard prompt's rare success keeps its full weight."""

    def __init__(self, solved_side: bool = False):
        super().__init__()
        self.solved_side = solved_side

    def advantages(self, rewards, state, *, ddof, eps, fraction):
        c, pt = E._finite_success_rate(rewards, state, self.prior)
        den = c * (pt * (1 - pt)).sqrt() + eps
        capped = torch.maximum(den, c / rewards.shape[-1] ** 0.5 + eps)
        if self.solved_side:
            capped = torch.where(pt > 0.5, capped, den)
        lam = torch.as_tensor(fraction, dtype=rewards.dtype)
        return E._safe_ratio(E._shrunk_centred(rewards, lam.reshape(lam.shape + (1, 1))), capped, eps)


class SelfNorm(E.ShrunkBaseline):
    """The ``selfnorm`` probe (module docstring): GRPO's raw std with grpo_shrunk's baseline fraction,
    times kappa_i, the finite-G target scale over GRPO's expected scale h_G at the running rate;
    ``side`` "hard" (sim.estimators.grpo_selfnorm itself: kappa only where ps < 1/2, at least 1),
    "both" (unclamped, both sides) or "none" (kappa = 1)."""

    def __init__(self, side: str):
        super().__init__()
        self.side = side

    def advantages(self, rewards, state, *, ddof, eps, fraction):
        if self.side == "hard":
            return E.grpo_selfnorm(rewards, ddof=ddof, eps=eps, state=state, prior=self.prior, fraction=fraction)
        adv = E._selfnorm_unlifted(rewards, state, self.prior, ddof, eps, torch.as_tensor(fraction, dtype=rewards.dtype))
        if state is None or self.side == "none":
            return adv
        return adv * E._finite_g_lift(rewards, state, self.prior, ddof, eps, hard_only=False).unsqueeze(-1)


class Switch:
    """grpo_interpolated at a = 1 before step ``start``, a = ``to`` from then on (an adaptive rule)."""

    needs_rho, per_prompt = False, False

    def __init__(self, start: int, to: float):
        self.start, self.to = start, to

    def _alpha(self, state):
        return 1.0 if state is None or float(state.t.flatten()[0]) < self.start else self.to

    def _next(self, state, like):
        return StepCount(torch.zeros(like.shape[0], dtype=like.dtype) if state is None else state.t + 1)

    def at(self, rewards, state, *, ddof, eps):
        return E.grpo_interpolated(rewards, alpha=self._alpha(state), ddof=ddof, eps=eps)

    def step(self, rewards, state, rho, *, ddof, eps):
        return self.at(rewards, state, ddof=ddof, eps=eps), self._next(state, rewards)

    def scale_at(self, sigma, mu, state, eps):
        return E.interpolated_limit(sigma, mu, eps, self._alpha(state))

    def scale_step(self, sigma, mu, state, rho, eps):
        return self.scale_at(sigma, mu, state, eps), self._next(state, sigma)


def _fixed(alpha: float):
    def advantage(rewards, *, ddof, eps, sigma=None):
        return E.grpo_interpolated(rewards, alpha=alpha, ddof=ddof, eps=eps) if alpha <= 1 else \
            E._safe_ratio(E._mean_centered(rewards), E.group_std(rewards, ddof).pow(alpha)
                          * E.batch_std(rewards, ddof).pow(1 - alpha) + eps, eps)

    def limit(sigma, mu, eps):
        if alpha <= 1:
            return E.interpolated_limit(sigma, mu, eps, alpha)
        return E._safe_ratio(torch.ones_like(sigma), sigma.pow(alpha) * E._batch_sigma(sigma, mu).pow(1 - alpha) + eps)

    return advantage, limit


def _p_and_c(sigma, mu):
    """(p, c) of rewards in {0, c} with mean mu and std sigma (noise-free: sigma^2 = c^2 p (1 - p))."""
    m2 = sigma ** 2 + mu ** 2
    c = torch.where(mu > 0, m2 / torch.where(mu > 0, mu, torch.ones_like(mu)), torch.ones_like(mu))
    return (mu / c).clamp(0, 1), c


def _expected_limit(kind: str, G: int, prior: float = 8.0):
    """An exact-mode scale: GRPO's finite-G expected scale h_G(p) ("grpo") or grpo_finite's h~_G(p)
    with p_bar = p ("finite"), from the population (sigma, mu)."""
    from theory.finite_group import grpo_expected_scale, loo_expected_scale

    def limit(sigma, mu, eps):
        p, c = _p_and_c(sigma, mu)
        if kind == "grpo":
            return grpo_expected_scale(p, G, 1, eps, c)
        return loo_expected_scale(p, G, c, eps, p_bar=p, prior=prior)

    return limit


def _exact_only(rewards, *, ddof, eps, sigma=None):
    raise ValueError("this probe estimator runs in exact mode only")


def register(kind: str) -> list[str]:
    names = []
    if kind == "switch":
        for at in (10, 20, 40, 80):
            name = f"switch_at_{at}"
            E.REGISTRY[name] = E.EstimatorSpec(name, name, E.grpo, E._group_std_limit, None, True, 2, False, "probe",
                                               adaptive=Switch(at, 0.0))
            names.append(name)
    elif kind == "alpha":
        for a in (0.5, 1.5, 2.0):
            name = f"alpha_{a:g}"
            E.REGISTRY[name] = E.EstimatorSpec(name, name, *_fixed(a), None, True, 2, False, "probe")
            names.append(name)
    elif kind == "shrink":
        base = E.REGISTRY["grpo_shrunk"]
        for name, rule in (("shrink_fixed_0.5", FixedShrink(0.5)), ("shrink_q1", E.ShrunkBaseline(exponent=1.0))):
            E.REGISTRY[name] = dataclasses.replace(base, name=name, label=name, base=name, adaptive=rule)
            names.append(name)
    elif kind == "prior":
        base = E.REGISTRY["grpo_shrunk"]
        rules = [(f"shrink_prior_{n:g}", E.ShrunkBaseline(prior=n)) for n in (0.0, 2.0, 4.0)]
        rules += [("shrink_decay_0.5", E.ShrunkBaseline(decay=0.5)), ("shrink_cap", CappedShrink()),
                  ("shrink_cap_solved", CappedShrink(solved_side=True))]
        for name, rule in rules:
            E.REGISTRY[name] = dataclasses.replace(base, name=name, label=name, base=name, adaptive=rule)
            names.append(name)
    elif kind == "selfnorm":
        base = E.REGISTRY["grpo_shrunk"]
        for side in ("both", "hard", "none"):
            name = f"sn_{side}"
            E.REGISTRY[name] = dataclasses.replace(base, name=name, label=name, base=name, adaptive=SelfNorm(side))
            names.append(name)
    elif kind == "expected":
        for k in ("grpo", "finite"):
            for G in (4, 16):
                name = f"exp_{k}_G{G}"
                E.REGISTRY[name] = E.EstimatorSpec(name, name, _exact_only, _expected_limit(k, G), None, True, 2,
                                                   False, "probe")
                names.append(name)
    else:
        raise SystemExit(f"unknown probe {kind!r}: switch, alpha, shrink, prior, expected or selfnorm")
    check = sim.config.check_value

    def widened(cls, field, value):  # the probe names are not CLI choices
        if field == "estimator" and value in E.REGISTRY:
            return
        check(cls, field, value)

    sim.config.check_value = sweep.check_value = widened
    return names


def shrink(out: str, names: list[str], seeds: int = 4) -> None:
    axes, _, lr = sweep.load_config(Path(__file__).with_name("fig8_adaptive.toml"))
    axes = {**axes, "mode": ("sampled",), "estimator": ("reinforce", "dr_grpo", "grpo", "grpo_finite", "grpo_shrunk", *names)}
    runs, steps = sweep.run_sweep(sweep.build_spec(axes, seeds, lr), Path(out), resume=(Path(out) / "manifest.json").exists())
    runs = add_comparisons(runs)
    for est in ("grpo_finite", "grpo_shrunk", *names):
        card = adaptive_scorecard(runs, steps, est)
        print(f"{est}: within 10% of the best in {int(card['within'].sum())} of {len(card)} cells, faster than "
              f"each in {int((card['faster_than_each'] & card['phase_iii']).sum())} of {int(card['phase_iii'].sum())} "
              "phase-III cells")


def expected(out: str, names: list[str]) -> None:
    from sim.analysis import _effective_steps

    axes, _, lr = sweep.load_config(Path(__file__).with_name("fig8_adaptive.toml"))
    axes = {**axes, "mode": ("exact",), "group_size": (4,), "orthogonality": (1.0,), "failure_mode": (0.95,),
            "estimator": ("reinforce", "dr_grpo", "grpo", *names)}
    runs, _ = sweep.run_sweep(sweep.build_spec(axes, 6, lr), Path(out), engine="torch",
                              resume=(Path(out) / "manifest.json").exists())
    sel = add_comparisons(runs)
    sel = sel[sel["selected"]].assign(steps=lambda d: _effective_steps(d))
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 20)
    print(sel.groupby(["difficulty_spread", "reward_scale_spread", "estimator"])["steps"].median().unstack("estimator"))


def main(kind: str, out: str) -> None:
    names = register(kind)
    if kind in ("shrink", "prior", "selfnorm"):
        return shrink(out, names, 4 if kind == "shrink" else 6)
    if kind == "expected":
        return expected(out, names)
    extra = ["grpo_batch"] if kind == "switch" else []
    axes = {"orthogonality": (0.3, 1.0), "failure_mode": (0.95,), "reward_scale_spread": (10.0,),
            "difficulty_spread": (0.6,), "estimator": tuple(["grpo"] + extra + names), "mode": ("exact", "sampled"),
            "steps": (1500,)}
    runs, _ = sweep.run_sweep(sweep.build_spec(axes, 2, "tuned"), Path(out), engine="torch")
    sel = runs[runs["selected"]]
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 20)
    print(sel.groupby(["orthogonality", "mode", "estimator"])["steps_to_target"].median().unstack("estimator"))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
