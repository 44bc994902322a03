"""How far the predictions are from the measured speedups, per sweep (README 'Theory beside measurement').

    python experiments/prediction_agreement.py DIR [DIR ...]

For each results directory: over GRPO's cells with no censored seed, the ratio predicted / measured
speedup of the time-change prediction (predicted_speedup), of G_pred and of its finite-G version,
with the largest and median |ratio - 1| of the time change (per group size when G varies).
"""

from __future__ import annotations

import sys

import sim
from sim import analysis


def agreement(directory: str) -> None:
    runs, _ = sim.load_results(directory)
    sel = runs[runs["selected"]]
    cells = analysis.cell_speedups(sel, analysis.cell_columns(sel))
    g = cells[(cells["estimator"] == "grpo") & (cells["speedup_censored"] == "")]
    ratio = g["predicted_speedup"] / g["speedup"]
    dev = (ratio - 1).abs()
    print(f"{directory}: {len(g)}/{int((cells['estimator'] == 'grpo').sum())} uncensored cells; time change "
          f"predicted/measured {ratio.min():.2f}-{ratio.max():.2f}, max |dev| {dev.max():.3f}, median "
          f"{dev.median():.3f}; G_pred {(g['predicted_gain'] / g['speedup']).min():.2f}-"
          f"{(g['predicted_gain'] / g['speedup']).max():.2f}; finite-G G_pred "
          f"{(g['predicted_gain_finite_g'] / g['speedup']).min():.2f}-"
          f"{(g['predicted_gain_finite_g'] / g['speedup']).max():.2f}")
    if "group_size" in g and g["group_size"].nunique() > 1:
        for G, part in g.groupby("group_size"):
            d = (part["predicted_speedup"] / part["speedup"] - 1).abs()
            print(f"  G = {G}: measured {part['speedup'].min():.2f}-{part['speedup'].max():.2f}, G_pred "
                  f"{part['predicted_gain'].min():.2f}-{part['predicted_gain'].max():.2f}, time change max |dev| "
                  f"{d.max():.3f}")


if __name__ == "__main__":
    for d in sys.argv[1:]:
        agreement(d)
