"""Executable theory of GRPO's std normalization (DESIGN.md §3): pure functions of arrays.

Nothing here imports from ``sim``. Dimension legend used throughout:
    ...  leading batch dims (e.g. R runs);  P prompts;  K responses;
    k private block size;  s shared block size;  T steps.
"""

from theory.softmax import logits, per_prompt_gradients, prompt_stats, summed_gradient  # noqa: F401
from theory.bounds import global_curvature_bound, theory_step_size  # noqa: F401
from theory.orthogonality import gradient_orthogonality  # noqa: F401
