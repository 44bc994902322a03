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
               "How do GRPO, REINFORCE, Dr. GRPO and RLOO learn when prompts share few or many parameters?",
               'With sampled groups of 8 at theory step sizes the four estimators are indistinguishable for the first ~100 steps; GRPO pulls ahead once the easy prompts saturate (first to 90% of J* at o = 0.8; at o = 0.2 it leads the late climb, though no method reaches 90% within 3000 steps), and Dr. GRPO trails REINFORCE and RLOO throughout.'),
    FigureSpec("speedup_heatmap", "fig2_speedup_heatmap.toml", figures.speedup_heatmap,
               "Where in (orthogonality, reward-std heterogeneity) does GRPO's normalization pay off?",
               "GRPO's sampled-mode advantage grows with the difficulty spread, from 0.95-0.97 (slightly slower than REINFORCE) with equal difficulties to 1.2-1.35 at spread 0.75-1 for o >= 0.4; at o <= 0.2 with a large spread neither method reaches the target in 3000 steps (marked -)."),
    FigureSpec("predicted_vs_measured", "fig3_predicted_vs_measured.toml", figures.predicted_vs_measured,
               "Does the predicted gain sigma_max / sigma_bar match the measured speedup, and when not?",
               'Orthogonal cells (circles) sit on y = x from G_pred 1.2 to 4.5; non-orthogonal cells lie on or above it, further above as G_pred grows (measured up to 22 at G_pred 4), so in these problems G_pred predicts the gain with orthogonal features and is a lower bound without them.'),
    FigureSpec("m_bound_validation", "fig4_m_bound.toml", figures.m_bound_validation,
               "Does ||Hess J_i|| <= M sigma_i hold along real trajectories, and how tight is it?",
               'The bound never fails: over 2064 logged steps (tabular and linear features, three orthogonalities, exact and sampled training, noisy rewards) the worst per-prompt ratio (||Hess J_i|| / sigma_i) / M_i is 0.95, and the empirical max_i ||Hess J_i|| / sigma_i stays below 0.4 while the analytic M is 0.7-0.95: loose by 2-3x early in training, close to tight near convergence where both go to 0.'),
    FigureSpec("phases", "fig5_phases.toml", figures.phases,
               "Do the three phases (acceleration, transition, late) appear in simulated training?",
               'With the default thresholds phase I (high sigma_bar, per-step gain 1.2-1.3) ends at step 8 for o = 0.2 and near step 180 for o = 0.8, after which the runs stay in phase II; phase III never appears, because rho_t stays above 0.6 (threshold 0.25) and the per-step gain never stays below 1 for three logged steps.'),
    FigureSpec("convergence_rate", "fig6_convergence_rate.toml", figures.convergence_rate,
               "At what rate does each estimator's suboptimality fall with exact gradients?",
               'REINFORCE, Dr. GRPO and RLOO coincide (their exact-mode limits are all the true gradient) and converge like t^-1.0, while GRPO and batch-std GRPO converge like t^-1.9 and end about 1000x closer to J* after 20000 steps.'),
    FigureSpec("group_size_eps", "fig7_group_size_eps.toml", figures.group_size_eps,
               "How do the group size G and GRPO's eps change its advantage over REINFORCE?",
               'GRPO needs groups: with G = 2 or 4 it is slower than REINFORCE (0.4x and 0.75x), it breaks even near G = 8 and reaches 2.5x at G = 32; eps up to 1e-2 changes nothing visible, while eps = 0.1, comparable to the smaller per-prompt stds, removes about a third of the gain.'),
)

BY_NAME = {f.name: f for f in FIGURES}
