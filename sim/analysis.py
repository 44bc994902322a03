"""What a sweep measured, summarized once: lr selection, per-cell speedups and their confidence
intervals (DESIGN.md §3 'measured counterpart', §5 summary table). The CLI table
(``summarize``) and every figure (``cell_speedups``, ``mean_t_interval``) use these functions.

A cell is one setting of every config field except estimator, lr, lr_rule and seed
(``cell_columns``). Inputs are runs tables in the sim.load_results format.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from sim.config import AXES

#: Config columns that do not define a cell (they vary within one).
NON_CELL = ("estimator", "lr", "lr_rule", "seed")
SELECTION_RULE = ("lr per (cell, estimator): lowest median steps-to-target over seeds "
                  "(never reached = steps + 1), ties to the higher mean AUC")


def cell_columns(runs: pd.DataFrame) -> list[str]:
    """The config columns of ``runs`` that define a cell."""
    return [c for c in AXES if c in runs.columns and c not in NON_CELL]


def _effective_steps(runs: pd.DataFrame) -> pd.Series:
    """steps_to_target with never-reached runs counted as steps + 1 (for ranking only)."""
    return runs["steps_to_target"].where(runs["reached_target"], runs["steps"] + 1)


def add_comparisons(runs: pd.DataFrame) -> pd.DataFrame:
    """Add ``selected`` (this run's lr is its estimator's choice in the cell, SELECTION_RULE)
    and, for selected runs, ``speedup`` = max(1, steps_R) / max(1, steps_X) against the selected
    REINFORCE run of the same cell and seed, with ``speedup_censored`` in
    {"", "lower", "upper", "both"}: "lower" when only REINFORCE never reached the target (the
    true speedup is at least the value), "upper" when only this run never did, "both" when neither.
    Rows without a REINFORCE partner (the sweep has none) get speedup NaN, censoring "no-reinforce".
    """
    runs = runs.copy()
    cells = cell_columns(runs)
    runs["_eff"] = _effective_steps(runs)
    score = (runs.groupby(cells + ["estimator", "lr"], dropna=False)
             .agg(med=("_eff", "median"), auc=("auc", "mean")).reset_index())
    score = score.sort_values(["med", "auc", "lr"], ascending=[True, False, True], kind="stable")
    best = score.drop_duplicates(cells + ["estimator"])[cells + ["estimator", "lr"]]
    best["selected"] = True
    runs = runs.merge(best, on=cells + ["estimator", "lr"], how="left")
    runs["selected"] = runs["selected"].fillna(False).astype(bool)

    ref = runs[runs["selected"] & (runs["estimator"] == "reinforce")][cells + ["seed", "steps_to_target",
                                                                              "reached_target"]]
    ref = ref.rename(columns={"steps_to_target": "_ref_steps", "reached_target": "_ref_reached"})
    runs = runs.merge(ref, on=cells + ["seed"], how="left")
    has_ref = runs["_ref_steps"].notna() & runs["selected"]
    ref_steps = runs["_ref_steps"].fillna(1).clip(lower=1)
    own_steps = runs["steps_to_target"].clip(lower=1)
    runs["speedup"] = np.where(has_ref, ref_steps / own_steps, np.nan)
    ref_reached = runs["_ref_reached"].fillna(True).astype(bool)
    own_reached = runs["reached_target"].astype(bool)
    cens = np.select([~has_ref, ~ref_reached & ~own_reached, ~ref_reached, ~own_reached],
                     ["no-reinforce", "both", "lower", "upper"], default="")
    runs["speedup_censored"] = np.where(runs["selected"], cens, "not-selected")
    runs["measured_gain"] = runs["speedup"]  # the measured counterpart of predicted_gain (DESIGN.md §3)
    runs = runs.drop(columns=["_eff", "_ref_steps", "_ref_reached"])
    return runs.sort_values("run_id", kind="stable").reset_index(drop=True)


def mean_t_interval(values, level: float = 0.95) -> tuple[float, float]:
    """Mean and half width t_{(1+level)/2, n-1} sd / sqrt(n) of its t-interval (0 for one value)."""
    from scipy.special import stdtrit  # the t quantile (what scipy.stats.t.ppf calls), 1 s cheaper to import

    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if len(v) < 2:
        return m, 0.0
    return m, float(stdtrit(len(v) - 1, (1 + level) / 2) * v.std(ddof=1) / math.sqrt(len(v)))


def geometric_ci(ratios: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Geometric mean of positive ratios and its t-interval on the log scale.

    exp(mean log r +- t_{(1+level)/2, n-1} sd(log r) / sqrt(n)). With n = 1 the interval is the
    point itself (no spread can be estimated; tables mark n).
    """
    m, half = mean_t_interval(np.log(np.asarray(ratios, dtype=float)), level)
    return math.exp(m), math.exp(m - half), math.exp(m + half)


#: The per-cell predictions beside each measured speedup (cell_speedups).
PREDICTIONS = ("predicted_gain", "predicted_gain_finite_g", "predicted_speedup")


def cell_speedups(runs: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Speedup over REINFORCE per (``by`` columns, estimator), from the selected runs.

    One row per group: n (runs), speedup with its 95% geometric t-interval (speedup_lo,
    speedup_hi) over the runs that have a REINFORCE partner, speedup_censored (the censoring
    marks present, comma-joined; "no-reinforce" and NaN speedups when no run has a partner),
    predicted_gain and predicted_gain_finite_g (means) and predicted_speedup (geometric mean of the
    runs that have one), NaN when the runs lack them. The one place a speedup is aggregated.
    """
    sel = runs[runs["selected"]] if "selected" in runs.columns else runs
    rows = []
    for key, g in sel.groupby(by + ["estimator"], sort=True, dropna=False):
        row = dict(zip(by + ["estimator"], key))
        row["n"] = len(g)
        ok = g["speedup_censored"] != "no-reinforce"
        if ok.any():
            sp, lo, hi = geometric_ci(g.loc[ok, "speedup"].to_numpy())
            row.update(speedup=sp, speedup_lo=lo, speedup_hi=hi,
                       speedup_censored=",".join(sorted(set(g.loc[ok, "speedup_censored"]) - {""})))
        else:  # no REINFORCE run in the sweep: nothing to compare with
            row.update(speedup=math.nan, speedup_lo=math.nan, speedup_hi=math.nan, speedup_censored="no-reinforce")
        for c in ("predicted_gain", "predicted_gain_finite_g"):
            row[c] = float(g[c].mean()) if c in g else math.nan
        pred = g["predicted_speedup"].dropna().to_numpy() if "predicted_speedup" in g else np.array([])
        pred = pred[pred > 0]
        row["predicted_speedup"] = float(np.exp(np.log(pred).mean())) if len(pred) else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=by + ["estimator", "n", "speedup", "speedup_lo", "speedup_hi",
                                            "speedup_censored"] + list(PREDICTIONS))


def summarize(runs: pd.DataFrame, group_by: list[str] | None = None) -> pd.DataFrame:
    """One row per (cell, estimator) of selected runs: lr, steps-to-target, final J, speedup + 95% CI.

    ``group_by`` picks the cell columns shown (default: those that vary).
    """
    sel = runs[runs["selected"]]
    cells = cell_columns(sel)
    if group_by is None:
        group_by = [c for c in cells if sel[c].nunique() > 1]
    speedups = cell_speedups(sel, cells).set_index(cells + ["estimator"])
    rows = []
    for key, g in sel.groupby(cells + ["estimator"], sort=True, dropna=False):
        d = dict(zip(cells + ["estimator"], key))
        row = {k: d[k] for k in group_by + ["estimator"]}
        reached = g["reached_target"].astype(bool)
        row["lr"] = float(g["lr"].iloc[0])
        row["n"] = len(g)
        row["reached"] = int(reached.sum())
        row["steps_to_target"] = float(g["steps_to_target"].median())
        row["final_J"] = float(g["final_J"].mean())
        row["j_star"] = float(g["j_star"].mean())
        row["conditions_ok"] = int(g["conditions_ok"].sum())
        sp = speedups.loc[key if isinstance(key, tuple) else (key,)]
        row.update({c: float(sp[c]) for c in PREDICTIONS})
        row.update({c: sp[c] for c in ("speedup", "speedup_lo", "speedup_hi", "speedup_censored")})
        rows.append(row)
    return pd.DataFrame(rows)
