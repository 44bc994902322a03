"""Paper figures: one pure function per figure (paper_figs.figures) and the registry that ties
each to its experiment config (experiments/NAME.toml), its question and its reading.

``sim figures`` (sim.figures.build_figures) runs what is missing and renders every entry.
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
               "READING"),
    FigureSpec("speedup_heatmap", "fig2_speedup_heatmap.toml", figures.speedup_heatmap,
               "Where in (orthogonality, reward-std heterogeneity) does GRPO's normalization pay off?",
               "READING"),
    FigureSpec("predicted_vs_measured", "fig3_predicted_vs_measured.toml", figures.predicted_vs_measured,
               "Does the predicted gain sigma_max / sigma_bar match the measured speedup, and when not?",
               "READING"),
    FigureSpec("m_bound_validation", "fig4_m_bound.toml", figures.m_bound_validation,
               "Does ||Hess J_i|| <= M sigma_i hold along real trajectories, and how tight is it?",
               "READING"),
    FigureSpec("phases", "fig5_phases.toml", figures.phases,
               "Do the three phases (acceleration, transition, late) appear in simulated training?",
               "READING"),
    FigureSpec("convergence_rate", "fig6_convergence_rate.toml", figures.convergence_rate,
               "At what rate does each estimator's suboptimality fall with exact gradients?",
               "READING"),
    FigureSpec("group_size_eps", "fig7_group_size_eps.toml", figures.group_size_eps,
               "How do the group size G and GRPO's eps change its advantage over REINFORCE?",
               "READING"),
)

BY_NAME = {f.name: f for f in FIGURES}
