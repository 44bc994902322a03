"""Paper figures: one pure function per figure (paper_figs.figures) and the registry that ties
each to its experiment config (experiments/NAME.toml), its question and its reading.

``sim figures`` (paper_figs.build.build_figures) runs what is missing and renders every entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from paper_figs import figures


@dataclass(frozen=True)
class FigureSpec:
    name: str
    experiment: str  # file name under experiments/
    render: Callable
    question: str
    reading: str  # one sentence, written after looking at the full-size figure


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("learning_curves", "fig1_learning_curves.toml", figures.learning_curves,
               'How do GRPO, REINFORCE, Dr. GRPO and RLOO learn when prompts share few or many parameters?',
               'With sampled groups of 8 at theory step sizes the four curves overlap for the first ~100 steps; at o = 0.8 GRPO reaches 90% of J* first (median 115 steps against 143-148 for REINFORCE and RLOO and 200 for Dr. GRPO); at o = 0.2 all four stall near 0.8 J* and reach 0.87-0.88 J* by step 3000 (GRPO reached the target in 15% of seeds, REINFORCE in none).'),
    FigureSpec("speedup_heatmap", "fig2_speedup_heatmap.toml", figures.speedup_heatmap,
               "Where in (orthogonality, reward-std heterogeneity) does GRPO's normalization pay off?",
               "GRPO's sampled-mode advantage grows with the difficulty spread: with equal difficulties it is slightly slower than REINFORCE for o >= 0.4 (0.91-0.95), at spread 0.75-1 it is 1.08-1.41x faster; at o <= 0.2 with a large spread most runs never reach the target: a mixed-censoring ~ cell and two cells (o = 0.1) where neither method does because 1-2 prompts per run end with groups that almost never hold a success (0-succ)."),
    FigureSpec("predicted_vs_measured", "fig3_predicted_vs_measured.toml", figures.predicted_vs_measured,
               'Does the predicted gain match the measured speedup, and when not?',
               "With orthogonal features both predictions sit on y = x (time change 1.00-1.14x the measured speedup, G_pred 0.83-1.07x, 12 exact cells); without orthogonality the measured speedup runs above both as it grows (up to 22, and one lower bound of 31), where the time change, which accounts for every prompt's own dynamics, is off by 0.26-1.49x: the cross-prompt terms it leaves out are what REINFORCE loses to."),
    FigureSpec("m_bound_validation", "fig4_m_bound.toml", figures.m_bound_validation,
               'Does ||Hess J_i|| <= M sigma_i hold along real trajectories, and how tight is it?',
               'The bound never fails: over 2064 logged steps (tabular and linear features, three orthogonalities, exact and sampled training, noisy rewards) the worst per-prompt ratio (||Hess J_i|| / sigma_i) / M_i(theta) is 0.99, and the empirical max_i ||Hess J_i|| / sigma_i stays below 0.49, under the proved global constant M = diam^2 / 4 (0.5 for tabular features, 0.78-0.90 for these linear ones) and the analytic M_i(theta) of up to 0.95.'),
    FigureSpec("phases", "fig5_phases.toml", figures.phases,
               'Do the three phases (acceleration, transition, late) appear in simulated training?',
               "Yes, when orthogonality is lost during training: with the shared failure mode (beta = 0.95) GRPO's measured per-step gain is 1.4-1.7 while rho_t stays near 1 (phase I, to step 27-32), then rho_t falls through 0.5 (phase II) and below 0.25 with the gain below 1 from step 37-44 on (phase III; rho_t ends at 0.025); in the control (beta = 0) rho_t stays 1, the gain stays 1.5-2.7 and the run moves from I to II at step 19-23 as sigma_bar falls, never to III. GRPO's early lead survives phase III: 2.3x (a lower bound: REINFORCE never reached the target) against 2.5x in the control."),
    FigureSpec("convergence_rate", "fig6_convergence_rate.toml", figures.convergence_rate,
               "At what rate does each estimator's suboptimality fall with exact gradients?",
               "REINFORCE, Dr. GRPO and RLOO coincide (their exact-mode limits are all the true gradient) and converge like t^-1.0, while GRPO converges like t^-1.83 and batch-std GRPO like t^-1.9, ending about 2000x closer to J* after 20000 steps; GRPO's t^-2 rate needs eps <= 1e-6 (slope -2.00 at eps = 0 and 1e-6): the default eps = 1e-4 caps 1 / (sigma_i + eps) once sigma_i < eps."),
    FigureSpec("group_size_eps", "fig7_group_size_eps.toml", figures.group_size_eps,
               "How do the group size G and GRPO's eps change its advantage over REINFORCE?",
               'GRPO needs groups, as the finite-G scale h_G predicts (time change: 0.35, 0.73, 1.19, 1.71, 2.26 for G = 2 to 32): measured 0.36x and 0.76x at G = 2 and 4, 1.19-1.25x at G = 8, 1.67-1.79x at 16 and 2.5x at 32; eps up to 1e-2 changes little, while eps = 0.1, comparable to the smaller per-prompt stds, removes a quarter to a third of the gain.'),
    FigureSpec("adaptive", "fig8_adaptive.toml", figures.adaptive,
               "Can a normalization that adapts to the phase beat the best fixed choice, each at its tuned lr?",
               "Half of what the targets ask. Tuned on two rates per octave (tuned:2, each choice a whole octave inside its grid), 6 seeds: grpo_shrunk, grpo_finite with its baseline shrunk as prompts share parameters (lambda = rho_peak^2), is within 10% of the best of GRPO, Dr. GRPO and REINFORCE in 46 of 48 cells (the 90% target; seed bootstrap 90% interval 40-45); grpo_selfnorm, GRPO's own std with grpo_shrunk's baseline and GRPO's finite-G cap lifted on hard prompts, in 44 (bootstrap 42-46), with the fewest steps on average (geometric mean 0.920x the best's, grpo_shrunk 0.929x) and the most phase-III wins: strictly faster than each in 19 of the 38 cells where phase III appears (grpo_shrunk 16), not in all. grpo_finite is within 10% in 41 cells (0.951x), grpo_phase in 31 (1.029x), plain GRPO in 44 (1.024x). grpo_phase wins where orthogonality is lost (o = 1 with the failure mode: 47 steps against GRPO's 83 exact) and loses where rho falls at o = 0.3 (494 against 239 exact); grpo_finite wins where GRPO's finite-G cap binds (sampled, o = 0.3, difficulty spread 1: 236.5 against 496.5 steps at G = 4, 56 against 217 at G = 16). The losses left: raw GRPO at o = 1 with the failure mode, G = 16, whose best rate sits just before a cliff (GRPO at 16/15 its rates takes 57 steps against 46), and o = 0.3, G = 4, difficulty spread 0.3, where REINFORCE or GRPO is fastest."),
)

BY_NAME = {f.name: f for f in FIGURES}
