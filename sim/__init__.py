"""grpo-sim: why and when GRPO's per-prompt reward-std normalization beats REINFORCE."""

__version__ = "0.1.0"


def load_results(path):
    """Load a results directory: returns (runs, steps) pandas DataFrames (DESIGN.md §6)."""
    from sim.results import load_results as _load

    return _load(path)
