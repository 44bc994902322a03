"""Executable theory of GRPO's std normalization (DESIGN.md §3): pure functions of arrays.

Nothing here imports from ``sim``. Dimension legend used throughout:
    ...  leading batch dims (e.g. R runs);  P prompts;  K responses;
    k private block size;  s shared block size;  D = k + s local coordinates;  T steps.

Modules: softmax (policy, J_i, sigma_i, gradients), curvature (Hessian, M-bounds),
bounds (step sizes), gains (predicted gain, rate bounds, one-step decomposition),
orthogonality (rho_t, feature overlap), conditions (checks), phases (I/II/III labels),
finite_group (the exact expected sampled update at group size G).
"""

from theory.softmax import (logits, per_prompt_gradients, prompt_stats, safe_reciprocal,  # noqa: F401
                            summed_gradient)
from theory.bounds import global_curvature_bound, reward_std_bound, step_scale, theory_step_size  # noqa: F401
from theory.orthogonality import block_gram, feature_overlap, gradient_orthogonality  # noqa: F401
from theory.curvature import (centered_features, curvature_constant, gradient_bound, hessian_over_sigma,  # noqa: F401
                              local_features, m_diameter,
                              m_directional, m_fourth_moment, prompt_curvature, prompt_gradient, prompt_hessian,
                              reduced_features, spectral_norm, two_valued)
from theory.gains import (one_step_change, per_step_gain, predicted_gain, rate_bounds,  # noqa: F401
                          normalized_objective, reinforce_steps_by_time_change, step_decomposition)
from theory.conditions import (Condition, m_bound_condition, orthogonality_condition,  # noqa: F401
                               relaxed_condition, step_size_condition)
from theory.phases import PhaseThresholds, label_phases  # noqa: F401
from theory.finite_group import effective_sigma, expected_scale, grpo_expected_scale  # noqa: F401
