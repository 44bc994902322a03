"""What a sweep measured, summarized once: lr selection, per-cell speedups and their confidence
intervals (DESIGN.md §3 'measured counterpart', §5 summary table). The CLI table
(``summarize``) and every figure (``cell_speedups``, ``mean_t_interval``) use these functions.

A cell is one setting of every config field except estimator, lr, lr_rule and seed
(``cell_columns``). Inputs are runs tables in the sim.load_results format.
"""

from __future__ import annotations

import math
import warnings

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


def _varying(runs: pd.DataFrame, cells: list[str]) -> list[str]:
    """The cell columns that take more than one value in ``runs``: grouping or merging by them
    gives the same groups as by every cell column (a constant column splits nothing), several times
    faster for the ~20 config columns of a cell."""
    return [c for c in cells if runs[c].nunique(dropna=False) > 1]


def _effective_steps(runs: pd.DataFrame) -> pd.Series:
    """steps_to_target with never-reached runs counted as steps + 1 (for ranking only)."""
    return runs["steps_to_target"].where(runs["reached_target"], runs["steps"] + 1)


def _selection(runs: pd.DataFrame, cells: list[str]) -> pd.DataFrame:
    """The chosen lr per (cell, estimator) (SELECTION_RULE), with the smallest and largest lr tried:
    columns cells + estimator, lr, lr_min, lr_max."""
    runs = runs.assign(_eff=_effective_steps(runs))
    score = (runs.groupby(cells + ["estimator", "lr"], dropna=False)
             .agg(med=("_eff", "median"), auc=("auc", "mean")).reset_index())
    score = score.sort_values(["med", "auc", "lr"], ascending=[True, False, True], kind="stable")
    best = score.drop_duplicates(cells + ["estimator"])[cells + ["estimator", "lr"]]
    span = runs.groupby(cells + ["estimator"], dropna=False)["lr"].agg(lr_min="min", lr_max="max").reset_index()
    return best.merge(span, on=cells + ["estimator"], how="left")


def lr_edges(runs: pd.DataFrame, within: float = 1.0) -> pd.DataFrame:
    """(cell, estimator) groups of tuned runs whose chosen lr is within a factor ``within`` of the
    largest ("top") or smallest ("bottom") one tried (1: the extreme rate itself): columns cells +
    estimator, lr (the chosen one), edge, lr_min, lr_max. Fixed and theory runs have none."""
    cells = cell_columns(runs)
    edges = _lr_edges(runs, _varying(runs, cells), within)
    constant = [c for c in cells if c not in edges.columns]
    if constant:  # the cell columns that split nothing: their one value
        first = runs[constant].iloc[0] if len(runs) else pd.Series(index=constant, dtype=object)
        edges = edges.assign(**{c: first[c] for c in constant})
    return edges[cells + ["estimator", "lr", "edge", "lr_min", "lr_max"]]


def _lr_edges(runs: pd.DataFrame, keys: list[str], within: float = 1.0) -> pd.DataFrame:
    """lr_edges with the cells told apart by the columns ``keys`` (columns keys + estimator, lr, edge,
    lr_min, lr_max). Rates compare with a relative slack of 1e-9 (a grid's rates lr_theory 2^(j/N)
    are a factor 2^(1/8) apart at least, so only rounding is forgiven)."""
    columns = keys + ["estimator", "lr", "edge", "lr_min", "lr_max"]
    tuned = runs[runs["lr_rule"] == "tuned"] if "lr_rule" in runs.columns else runs.iloc[:0]
    if tuned.empty:
        return pd.DataFrame(columns=columns)
    sel = _selection(tuned, keys)
    sel = sel[sel["lr_min"] < sel["lr_max"]]
    reach = within * (1 + 1e-9)
    sel["edge"] = np.where(sel["lr"] * reach >= sel["lr_max"], "top",
                           np.where(sel["lr"] <= sel["lr_min"] * reach, "bottom", ""))
    return sel[sel["edge"] != ""][columns].reset_index(drop=True)


def add_comparisons(runs: pd.DataFrame) -> pd.DataFrame:
    """Add ``selected`` (this run's lr is its estimator's choice in the cell, SELECTION_RULE)
    and, for selected runs, ``speedup`` = max(1, steps_R) / max(1, steps_X) against the selected
    REINFORCE run of the same cell and seed, with ``speedup_censored`` in
    {"", "lower", "upper", "both"}: "lower" when only REINFORCE never reached the target (the
    true speedup is at least the value), "upper" when only this run never did, "both" when neither.
    Rows without a REINFORCE partner (the sweep has none) get speedup NaN, censoring "no-reinforce".
    ``lr_edge`` ("top", "bottom" or ""): a tuned run's chosen lr is still the largest or smallest
    of its grid (the sweep extends the grid first, by sim.sweep.MAX_LR_EXTENSIONS octaves at most):
    the cell is edge-limited, its speedup measured against a rate that may not be the best.
    """
    runs = runs.copy()
    cells = _varying(runs, cell_columns(runs))  # cells told apart by the columns that vary
    best = _selection(runs, cells)[cells + ["estimator", "lr"]]
    best["selected"] = True
    runs = runs.drop(columns=["selected"], errors="ignore").merge(best, on=cells + ["estimator", "lr"], how="left")
    runs["selected"] = runs["selected"].fillna(False).astype(bool)
    edges = _lr_edges(runs, cells)[cells + ["estimator", "lr", "edge"]]
    runs = runs.drop(columns=["lr_edge"], errors="ignore").merge(
        edges.rename(columns={"edge": "lr_edge"}), on=cells + ["estimator", "lr"], how="left")
    runs["lr_edge"] = runs["lr_edge"].fillna("").where(runs["selected"], "").astype(str)

    ref_cols = (cells + ["seed", "steps_to_target", "reached_target", "lr"]
                + [c for c in ("lr_theory", "final_J", "final_F") if c in runs])
    ref = runs[runs["selected"] & (runs["estimator"] == "reinforce")][ref_cols]
    ref = ref.rename(columns={"steps_to_target": "_ref_steps", "reached_target": "_ref_reached", "lr": "_ref_lr",
                              "lr_theory": "_ref_lr_theory", "final_J": "_ref_J", "final_F": "_ref_F"})
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
    if "predicted_speedup" in runs and "_ref_lr_theory" in runs:
        # the time change's rate is proportional to 1 / lr_REINFORCE, so against the REINFORCE run
        # actually compared (its selected lr) the predicted steps scale by lr_theory / lr, exactly
        runs["predicted_speedup_vs_selected"] = np.where(
            has_ref, runs["predicted_speedup"] * runs["_ref_lr_theory"] / runs["_ref_lr"], np.nan)
    if "_ref_F" in runs:
        # REINFORCE ends with the higher J, this run with the higher normalized objective F
        # (theory.normalized_objective): it optimizes another objective, it is not slower
        runs["objective_mismatch"] = (has_ref & (runs["_ref_J"] > runs["final_J"] * (1 + 1e-3))
                                      & (runs["final_F"] > runs["_ref_F"] * (1 + 1e-3)))
    runs = runs.drop(columns=[c for c in ("_ref_steps", "_ref_reached", "_ref_lr", "_ref_lr_theory", "_ref_J",
                                          "_ref_F") if c in runs])
    return runs.sort_values("run_id", kind="stable").reset_index(drop=True)


def censor_mark(censored: str) -> str:
    """The mark of a cell's speedup from its censoring set (cell_speedups' comma-joined
    speedup_censored): "" none; "≥" some seeds are lower bounds (only REINFORCE missed the target);
    "≤" some are upper bounds; "–" no seed of either method reached it; "~" a mix whose direction
    is unknown (lower and upper, or seeds where neither reached it beside others)."""
    parts = set(str(censored).split(",")) - {""}
    if not parts:
        return ""
    if parts == {"both"}:
        return "–"
    if parts == {"lower"}:
        return "≥"
    if parts == {"upper"}:
        return "≤"
    return "~"


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
    runs' predicted_speedup_vs_selected, or predicted_speedup, where they have one), NaN when the
    runs lack them. The one place a speedup is aggregated.
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
        col = "predicted_speedup_vs_selected" if "predicted_speedup_vs_selected" in g else "predicted_speedup"
        pred = g[col].dropna().to_numpy() if col in g else np.array([])
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
    cells = _varying(sel, cell_columns(sel))  # the same groups as every cell column, faster
    if group_by is None:
        group_by = [c for c in cells if sel[c].nunique() > 1]
    speedups = cell_speedups(sel, cells)  # the same groups in the same order as the loop below
    rows = []
    for (_, g), (_, sp) in zip(sel.groupby(cells + ["estimator"], sort=True, dropna=False), speedups.iterrows(),
                               strict=True):
        row = {k: g[k].iloc[0] for k in group_by + ["estimator"]}
        reached = g["reached_target"].astype(bool)
        row["lr"] = float(g["lr"].iloc[0])
        row["lr_edge"] = str(g["lr_edge"].iloc[0]) if "lr_edge" in g else ""
        row["n"] = len(g)
        row["reached"] = int(reached.sum())
        row["steps_to_target"] = float(g["steps_to_target"].median())
        row["final_J"] = float(g["final_J"].mean())
        row["j_star"] = float(g["j_star"].mean())
        row["conditions_ok"] = int(g["conditions_ok"].sum())
        row["objective_mismatch"] = int(g["objective_mismatch"].sum()) if "objective_mismatch" in g else 0
        row.update({c: float(sp[c]) for c in PREDICTIONS})
        row.update({c: sp[c] for c in ("speedup", "speedup_lo", "speedup_hi", "speedup_censored")})
        rows.append(row)
    return pd.DataFrame(rows)


#: The fixed estimators an adaptive one is scored against (issue 16; README 'Adaptive normalization').
ADAPTIVE_BASELINES = ("grpo", "dr_grpo", "reinforce")
#: "Within" the best: at most this fraction more steps (issue 16's target; fig. 8's band).
ADAPTIVE_TOLERANCE = 0.10


def adaptive_scorecard(runs: pd.DataFrame, steps: pd.DataFrame, adaptive: str,
                       baselines: tuple[str, ...] = ADAPTIVE_BASELINES,
                       tolerance: float = ADAPTIVE_TOLERANCE) -> pd.DataFrame:
    """Per cell: ``adaptive``'s steps to the target against the best of ``baselines``', each at its
    selected (tuned) lr, from add_comparisons' runs table and the steps table.

    steps per (cell, estimator): the median over seeds of steps_to_target with a never-reached run
    counted as steps + 1 (the selection's ranking). Columns: the varying cell columns, adaptive_steps,
    best_steps, best (the baseline that is fastest; ties to the first of ``baselines``), ratio =
    adaptive_steps / best_steps, within (ratio <= 1 + tolerance), phase_iii (a logged step of a
    selected GRPO run of the cell is labelled III: normalization's measured per-step gain is lost,
    theory.phases), phase_iii_before_target (such a step comes before that run reaches the target,
    or the run never does: the label can bear on the steps to the target), all_tied (seed by seed,
    ``adaptive`` and every baseline take the same steps, e.g. where each run waits for its first
    success: no estimator that learns nothing from a group without one can be strictly faster there)
    and faster_than_each (adaptive strictly fewer steps than every baseline).
    Exact-mode cells that differ only in group_size are one cell (exact mode has no groups).
    """
    sel, cells = _scorecard_runs(runs, adaptive, baselines, "adaptive_scorecard")
    med = sel.groupby(cells + ["estimator"], dropna=False)["_eff"].median().unstack("estimator")
    base = med[list(baselines)]
    out = pd.DataFrame({"adaptive_steps": med[adaptive], "best_steps": base.min(axis=1),
                        "best": base.idxmin(axis=1)})
    out["ratio"] = out["adaptive_steps"] / out["best_steps"].clip(lower=1)
    out["within"] = out["ratio"] <= 1 + tolerance
    out["faster_than_each"] = (base.to_numpy() > med[[adaptive]].to_numpy()).all(axis=1)
    grpo = sel[sel["estimator"] == "grpo"]
    first_iii = steps.loc[steps["phase"] == "III"].groupby("run_id")["step"].min()
    first = grpo["run_id"].map(first_iii)  # NaN: no step labelled III
    grpo = grpo.assign(_iii=first.notna(), _iii_early=first < grpo["_eff"])
    for col, src in (("phase_iii", "_iii"), ("phase_iii_before_target", "_iii_early")):
        out[col] = grpo.groupby(cells, dropna=False)[src].any().reindex(out.index).fillna(False).astype(bool)
    n_steps = sel.groupby(cells + ["seed"], dropna=False)["_eff"].nunique()
    out["all_tied"] = (n_steps == 1).groupby(level=list(range(len(cells))), dropna=False).all().reindex(out.index)
    return out.reset_index().drop(columns=["_cell"], errors="ignore")


def _scorecard_runs(runs: pd.DataFrame, adaptive: str, baselines, caller: str) -> tuple[pd.DataFrame, list[str]]:
    """(selected runs of ``adaptive`` and ``baselines`` with _eff = effective steps, cell columns):
    exact-mode cells that differ only in group_size are one (group_size 0)."""
    sel = runs[runs["selected"] & runs["estimator"].isin((adaptive,) + tuple(baselines))]
    missing = set((adaptive,) + tuple(baselines)) - set(sel["estimator"])
    if missing:
        raise ValueError(f"{caller}: no selected runs of {', '.join(sorted(missing))}")
    sel = sel.assign(_eff=_effective_steps(sel))
    if "group_size" in sel and "mode" in sel:  # exact mode has no groups: one cell per other setting
        sel = sel.assign(group_size=sel["group_size"].where(sel["mode"] != "exact", 0))
    cells = _varying(sel, cell_columns(sel))
    if not cells:  # one cell
        sel, cells = sel.assign(_cell=0), ["_cell"]
    return sel, cells


def scorecard_seed_bootstrap(runs: pd.DataFrame, adaptive: str, baselines: tuple[str, ...] = ADAPTIVE_BASELINES,
                             tolerance: float = ADAPTIVE_TOLERANCE, draws: int = 2000,
                             seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """How much of ``adaptive_scorecard``'s "within" verdict is seed noise: a paired bootstrap over
    the training seeds (each draw resamples each cell's seeds with replacement, the same ones for
    every estimator of the cell, as a seed's runs share their counter draws: sim.rng), recomputing each
    estimator's median steps (never reached = steps + 1) and the verdict
    adaptive <= (1 + tolerance) * best baseline. The lr selection is not redone (each estimator keeps
    its selected rate). -> (per cell: the cell columns and p_within, the share of draws in which
    the cell is within; [draws] the number of cells within per draw). A cell whose seeds all give
    the same steps has p_within 0 or 1, equal to the scorecard's verdict."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    sel, cells = _scorecard_runs(runs, adaptive, baselines, "scorecard_seed_bootstrap")
    names = (adaptive,) + tuple(baselines)
    per_seed = sel.groupby(cells + ["estimator", "seed"], dropna=False)["_eff"].median().unstack(["estimator", "seed"])
    seeds = sorted(sel["seed"].unique())
    arr = np.stack([per_seed.reindex(columns=pd.MultiIndex.from_product([[e], seeds]))[e].to_numpy(float)
                    for e in names])  # [E, C, S] (NaN where a cell lacks a seed's run)
    rng = np.random.default_rng(seed)
    within = np.empty((draws, arr.shape[1]), dtype=bool)
    for c in range(arr.shape[1]):
        own = np.flatnonzero(~np.isnan(arr[:, c]).all(axis=0))  # the seeds this cell has
        pick = own[rng.integers(0, len(own), (draws, len(own)))]  # [draws, n_c]
        with warnings.catch_warnings():  # a resample without any run of a baseline: it is left out
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(arr[:, c][:, pick], axis=2)  # [E, draws]
            best = np.nanmin(med[1:], axis=0)
        within[:, c] = med[0] / np.maximum(best, 1) <= 1 + tolerance  # NaN (no adaptive run): not within
    out = per_seed.index.to_frame(index=False).assign(p_within=within.mean(axis=0))
    return out.drop(columns=["_cell"], errors="ignore"), within.sum(axis=1)
