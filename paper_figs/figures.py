"""Figure functions: pure functions (runs, steps DataFrames) -> matplotlib Figure.

They read results only (sim.load_results format, DESIGN.md §6); nothing here trains. A
missing input raises FigureInputError with one line naming what is missing.
"""

from __future__ import annotations

import math
import textwrap

import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, NullFormatter

from sim.results import ResultsError
from sim.analysis import ADAPTIVE_TOLERANCE, adaptive_scorecard, cell_speedups, censor_mark, mean_t_interval
from sim.estimators import ADAPTIVE_NAMES, ALL_NAMES
from paper_figs.style import DOUBLE_COLUMN, OKABE_ITO, SEQUENCE, SINGLE_COLUMN, apply_style, estimator_style


class FigureInputError(ResultsError):
    """Results that cannot make a figure. str(e) is one line (the CLI prints it, exit code 2)."""


def require(df: pd.DataFrame | None, columns, figure: str, what: str = "results") -> pd.DataFrame:
    if df is None or len(df) == 0:
        raise FigureInputError(f"figure {figure}: no {what}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise FigureInputError(f"figure {figure}: {what} lack column(s) {', '.join(missing)}")
    return df


def _rows(runs: pd.DataFrame, figure: str, **eq) -> pd.DataFrame:
    out = runs[runs["selected"]] if "selected" in runs.columns else runs
    for col, val in eq.items():
        out = out[out[col].isin(val if isinstance(val, (list, tuple, set)) else [val])]
    if out.empty:
        raise FigureInputError(f"figure {figure}: no runs with {', '.join(f'{k}={v}' for k, v in eq.items())}")
    return out


def _plain_log_ticks(axis, ticks) -> None:
    """Log axis with plain-number tick labels at ``ticks`` (no 2x10^0 clutter)."""
    axis.set_major_locator(plt.FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def learning_curves(runs: pd.DataFrame, steps: pd.DataFrame) -> Figure:
    """Fig. 1: J_t / J* for GRPO vs REINFORCE (and Dr. GRPO, RLOO), mean and 95% band over seeds,
    one panel per orthogonality."""
    name = "learning_curves"
    require(runs, ["run_id", "orthogonality", "estimator", "seed", "j_star"], name, "runs")
    require(steps, ["run_id", "step", "J"], name, "steps")
    sel = _rows(runs, name)
    orths = sorted(sel["orthogonality"].unique())
    with apply_style():
        fig, axes = plt.subplots(1, len(orths), figsize=(DOUBLE_COLUMN, 2.3), sharey=True, squeeze=False)
        for ax, o in zip(axes[0], orths):
            cell = sel[sel["orthogonality"] == o]
            for est in [e for e in ALL_NAMES if e in set(cell.estimator)]:
                rr = cell[cell["estimator"] == est].set_index("run_id")
                st_ = steps[steps["run_id"].isin(rr.index)].copy()
                st_["frac"] = st_["J"] / st_["run_id"].map(rr["j_star"])
                agg = st_.groupby("step")["frac"].apply(lambda v: mean_t_interval(v.to_numpy()))
                x = agg.index.to_numpy()
                m = np.array([a[0] for a in agg])
                h = np.array([a[1] for a in agg])
                sty = estimator_style(est)
                ax.plot(x, m, color=sty["color"], linestyle=sty["linestyle"], label=sty["label"])
                ax.fill_between(x, m - h, m + h, color=sty["color"], alpha=0.2, linewidth=0)
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlabel("training step")
            ax.set_title(f"orthogonality o = {o:g}")
            ax.axhline(float(cell["target_fraction"].iloc[0]) if "target_fraction" in cell else 0.9,
                       color="0.6", linewidth=0.6, linestyle=":")
        axes[0][0].set_ylabel("mean reward J / J*")
        axes[0][-1].legend(loc="lower right")
        fig.tight_layout()
    return fig


def _speedup_by_cell(runs: pd.DataFrame, name: str, cell_cols: list[str], estimator: str = "grpo") -> pd.DataFrame:
    """sim.analysis.cell_speedups of ``estimator`` over ``cell_cols`` (columns speedup, lo, hi,
    censored, predicted_gain); cells without a REINFORCE partner are dropped, and a figure with
    none left fails with one line."""
    require(runs, ["estimator"] + cell_cols, name, "runs")
    sel = _rows(runs, name, estimator=estimator)
    require(sel, cell_cols + ["speedup", "speedup_censored"], name, "runs")
    cells = cell_speedups(sel, cell_cols).drop(columns=["estimator", "n"])
    cells = cells.rename(columns={"speedup_lo": "lo", "speedup_hi": "hi", "speedup_censored": "censored"})
    cells = cells[np.isfinite(cells["speedup"].to_numpy(dtype=float))]
    if cells.empty:
        raise FigureInputError(f"figure {name}: speedups need REINFORCE runs in the same cells")
    return cells.reset_index(drop=True)


def speedup_heatmap(runs: pd.DataFrame, steps: pd.DataFrame | None = None) -> Figure:
    """Fig. 2: speedup of GRPO over REINFORCE (geometric mean over seeds) over orthogonality x
    difficulty spread (the heterogeneity of the per-prompt reward std). Marks (sim.analysis.censor_mark):
    ≥ / ≤ some seeds' speedups are lower / upper bounds, ~ censoring of mixed direction, – no seed of
    either method reached the target, with "0-succ" where runs ended with prompts whose groups are
    almost surely all failures (stuck_prompts: zero advantage for both estimators)."""
    name = "speedup_heatmap"
    cells = _speedup_by_cell(runs, name, ["orthogonality", "difficulty_spread"])
    grid = cells.pivot(index="orthogonality", columns="difficulty_spread", values="speedup").sort_index()
    cens = cells.pivot(index="orthogonality", columns="difficulty_spread", values="censored").sort_index()
    sel = runs[runs["selected"]] if "selected" in runs else runs
    stuck = (sel.groupby(["orthogonality", "difficulty_spread"])["stuck_prompts"].mean().unstack()
             .reindex(index=grid.index, columns=grid.columns).fillna(0.0) if "stuck_prompts" in sel
             else grid * 0.0)
    with apply_style():
        fig, ax = plt.subplots(figsize=(SINGLE_COLUMN, 2.6))
        vals = grid.to_numpy()
        vmax = max(float(np.nanmax(np.abs(np.log(vals)))), 0.05)
        norm = mcolors.TwoSlopeNorm(vmin=-vmax, vcenter=0.0, vmax=vmax)
        im = ax.imshow(np.log(vals), cmap="PuOr_r", norm=norm, origin="lower", aspect="auto")
        ax.set_xticks(range(grid.shape[1]), [f"{c:g}" for c in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [f"{r:g}" for r in grid.index])
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                mark = censor_mark(cens.iat[i, j])
                if not np.isfinite(vals[i, j]):
                    text = "n/a"
                elif mark == "–":  # no seed of either method reached the target: say why where we know
                    text = "–\n0-succ" if stuck.iat[i, j] > 0 else "–"
                else:
                    text = f"{mark}{vals[i, j]:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=6)
        ax.set_xlabel("difficulty spread (logit half-width / logit 0.99)")
        ax.set_ylabel("feature orthogonality o")
        cb = fig.colorbar(im, ax=ax)
        ticks = np.linspace(-vmax, vmax, 5)
        cb.set_ticks(ticks, labels=[f"{math.exp(t):.2g}" for t in ticks])
        cb.set_label("GRPO speedup (steps ratio, log scale)")
        fig.tight_layout()
    return fig


def predicted_vs_measured(runs: pd.DataFrame, steps: pd.DataFrame | None = None) -> Figure:
    """Fig. 3: the measured speedup against (a) G_pred = sigma_max / sigma_bar, the ratio of the rate
    bounds, and (b) the orthogonal-case time-change prediction with finite groups
    (predicted_speedup), one point per sweep cell; orthogonal (o = 1) and non-orthogonal cells
    marked differently, hollow where the measured value is a lower bound; y = x lines."""
    name = "predicted_vs_measured"
    require(runs, ["orthogonality", "predicted_gain", "predicted_speedup"], name, "runs")
    cols = [c for c in ("orthogonality", "difficulty_spread", "reward_scale_spread", "kind", "reward_noise",
                        "group_size", "mode") if c in runs.columns]
    cells = _speedup_by_cell(runs, name, cols)
    panels = (("predicted_gain", "(a) G_pred = sigma_max / sigma_bar"),
              ("predicted_speedup", "(b) time change, finite G"))
    with apply_style():
        fig, axes = plt.subplots(1, 2, figsize=(DOUBLE_COLUMN, 2.8), sharey=True)
        finite = cells[np.isfinite(cells[[c for c, _ in panels]].to_numpy(dtype=float)).all(1)]
        lo = min(finite[[c for c, _ in panels] + ["speedup"]].min().min(), 1.0) * 0.9
        hi = max(finite[[c for c, _ in panels] + ["speedup"]].max().max(), 1.0) * 1.1
        ticks = [t for t in (0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 12, 20, 30) if lo <= t <= hi]
        for ax, (col, label) in zip(axes, panels):
            ax.plot([lo, hi], [lo, hi], color="0.5", linestyle="--", linewidth=0.8, label="y = x")
            for orth, sty in ((True, {"marker": "o", "color": OKABE_ITO["blue"], "label": "orthogonal (o = 1)"}),
                              (False, {"marker": "^", "color": OKABE_ITO["vermillion"],
                                       "label": "non-orthogonal (o < 1)"})):
                part = finite[(finite["orthogonality"] == 1.0) == orth]
                if part.empty:
                    continue
                full = ~part["censored"].str.contains("lower")
                ax.scatter(part.loc[full, col], part.loc[full, "speedup"], marker=sty["marker"],
                           color=sty["color"], s=14, label=sty["label"], zorder=3)
                if (~full).any():
                    ax.scatter(part.loc[~full, col], part.loc[~full, "speedup"], marker=sty["marker"],
                               facecolors="none", edgecolors=sty["color"], s=14, zorder=3,
                               label=f"{sty['label']}, lower bound")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            _plain_log_ticks(ax.xaxis, ticks)
            _plain_log_ticks(ax.yaxis, ticks)
            ax.set_xlabel(f"predicted: {label}")
        axes[0].set_ylabel("measured speedup (steps ratio)")
        axes[0].legend(loc="upper left")
        fig.tight_layout()
    return fig


def m_bound_validation(runs: pd.DataFrame, steps: pd.DataFrame) -> Figure:
    """Fig. 4: the M-bound along trajectories: (a) empirical max_i ||Hess J_i|| / sigma_i against the
    analytic max_i M_i(theta) at every logged step, y = x line; (b) the per-prompt worst ratio
    (||Hess J_i|| / sigma_i) / M_i(theta), which the bound keeps <= 1."""
    name = "m_bound_validation"
    require(runs, ["run_id", "kind", "orthogonality"], name, "runs")
    require(steps, ["run_id", "step", "empirical_M", "analytic_M", "m_bound_ratio"], name, "steps")
    sel = _rows(runs, name)
    st_ = steps[steps["run_id"].isin(sel["run_id"])].merge(sel[["run_id", "kind", "orthogonality"]], on="run_id")
    st_ = st_[st_["empirical_M"] > 0]
    if st_.empty:
        raise FigureInputError(f"figure {name}: no logged step with a non-zero reward std")
    with apply_style():
        fig, (a, b) = plt.subplots(1, 2, figsize=(DOUBLE_COLUMN, 2.5))
        for i, ((kind, o), g) in enumerate(st_.groupby(["kind", "orthogonality"])):
            a.scatter(g["analytic_M"], g["empirical_M"], s=5, color=SEQUENCE[i % len(SEQUENCE)],
                      label=f"{kind}, o = {o:g}", alpha=0.7, linewidths=0)
        top = float(max(st_["analytic_M"].max(), st_["empirical_M"].max())) * 1.05
        a.plot([0, top], [0, top], color="0.5", linestyle="--", linewidth=0.8, label="y = x")
        a.set_xlabel("analytic M: max_i sqrt(E ||phi - phibar||^4)")
        a.set_ylabel("empirical max_i ||Hess J_i|| / sigma_i")
        a.legend(loc="upper left", fontsize=6)
        a.set_title("(a) along trajectories")
        b.hist(st_["m_bound_ratio"], bins=40, color=OKABE_ITO["blue"])
        b.axvline(1.0, color=OKABE_ITO["vermillion"], linestyle="--", label="bound (ratio = 1)")
        b.set_xlabel("worst per-prompt ratio (||Hess J_i|| / sigma_i) / M_i")
        b.set_ylabel("logged steps")
        b.set_title(f"(b) max ratio {st_['m_bound_ratio'].max():.2f} over {len(st_)} steps")
        b.legend(loc="upper left")
        fig.tight_layout()
    return fig


PHASE_COLOURS = {"I": OKABE_ITO["orange"], "II": OKABE_ITO["sky"], "III": "0.6"}


PHASE_PANELS = (("sigma_bar", "reward std σ̄"), ("rho", "orthogonality ρ"), ("gain", "per-step gain G/R"))


def _phase_column(axes, s: pd.DataFrame, sparse: bool = False) -> None:
    """sigma_bar, rho and the measured gain of one run's steps ``s`` over training on three axes, the
    phase labels shaded behind (theory.phases), the gain with +- 2 standard errors where the steps
    have them. ``sparse`` (an LLM run, diagnosed every n steps, its other steps unlabelled): a linear
    step axis, the defined points joined (and marked, up to 60 of them), each label shaded up to halfway to
    the next labelled step, the standard errors as error bars; else a symlog axis with gaps where a
    value is undefined (fig. 5)."""
    x = s["step"].to_numpy()
    lab = s["phase"].to_numpy()
    if sparse:  # the labelled steps only: an undiagnosed step has no phase of its own
        keep = np.array([isinstance(v, str) and v in PHASE_COLOURS for v in lab])
        xl, lab = x[keep], lab[keep]
    else:
        xl = x
    if len(xl) > 1:
        edges = np.concatenate([[min(xl[0], x[0])], (xl[1:] + xl[:-1]) / 2, [max(xl[-1], x[-1])]])
    elif len(xl) == 1:
        edges = np.array([min(xl[0], x[0]) - 0.5, max(xl[0], x[-1]) + 0.5])
    else:
        edges = np.array([])
    for ax, (col, label) in zip(axes, PHASE_PANELS):
        for k in range(len(xl)):
            ax.axvspan(edges[k], edges[k + 1], color=PHASE_COLOURS.get(lab[k], "white"), alpha=0.25, linewidth=0)
        y = s[col].to_numpy(dtype=float)
        seen = np.isfinite(y)
        if sparse:
            ax.plot(x[seen], y[seen], color="black", marker="." if seen.sum() <= 60 else None)
        else:
            ax.plot(x, y, color="black")
            ax.set_xscale("symlog", linthresh=1)
        ax.set_ylabel(label)
        if col == "gain":
            if "gain_se" in s:
                se = s["gain_se"].to_numpy(dtype=float)
                if sparse:
                    bar = seen & np.isfinite(se)
                    if bar.any():
                        ax.errorbar(x[bar], y[bar], yerr=2 * se[bar], fmt="none", ecolor="0.5", elinewidth=0.8)
                else:
                    ax.fill_between(x, y - 2 * se, y + 2 * se, color="0.6", alpha=0.4, linewidth=0)
            ax.axhline(1.0, color="0.4", linestyle=":", linewidth=0.8)
            g = y[seen]
            if g.size:  # late sampled gains of a stalled REINFORCE step swing far: keep 1 readable
                ax.set_ylim(max(-1.5, float(g.min()) - 0.2), min(6.0, float(g.max()) + 0.2))


#: training_phases draws at most this many runs (the first, in run order).
TRAINING_PHASES_COLUMNS = 4


def training_phases(runs: pd.DataFrame, steps: pd.DataFrame) -> Figure:
    """Any training run's phases, as fig. 5 draws the simulator's: sigma_bar, rho_t and the measured
    per-step gain over training with the phase labels shaded, one column per run (the first
    TRAINING_PHASES_COLUMNS, in run order; titled estimator (backend), and the results directory
    ``source`` where it is not the estimator's name), for results directories of the LLM runner and
    the TRL callback (``sim figures --from DIR``) as well as the simulator's."""
    name = "training_phases"
    require(runs, ["run_id", "estimator"], name, "runs")
    require(steps, ["run_id", "step", "sigma_bar", "rho", "gain", "phase"], name, "steps")
    sel = runs[runs["run_id"].isin(steps["run_id"])].head(TRAINING_PHASES_COLUMNS)
    if sel.empty:
        raise FigureInputError(f"figure {name}: no steps of any run")
    with apply_style():
        fig, axes = plt.subplots(3, len(sel), figsize=(DOUBLE_COLUMN, 4.2), sharex="col", squeeze=False)
        for j, (_, run) in enumerate(sel.iterrows()):
            s = steps[steps["run_id"] == run["run_id"]].sort_values("step")
            _phase_column([axes[i][j] for i in range(3)], s, sparse=True)
            where, source = run.get("backend"), run.get("source")
            title = str(run["estimator"]) + (f" ({where})" if isinstance(where, str) and where else "")
            if isinstance(source, str) and source and source != run["estimator"]:
                title = f"{source}: {title}"
            axes[0][j].set_title(title)
            axes[2][j].set_xlabel("training step")
        handles = [Patch(color=c, alpha=0.4, label=f"phase {p}") for p, c in PHASE_COLOURS.items()]
        axes[0][-1].legend(handles=handles, loc="upper right")
        fig.tight_layout()
    return fig


def phases(runs: pd.DataFrame, steps: pd.DataFrame) -> Figure:
    """Fig. 5: sigma_bar_t, rho_t and the measured per-step gain dJ_GRPO / dJ_REINFORCE from GRPO's
    theta_t (sim.step_gain; +- 2 standard errors shaded, undefined steps left out) over training,
    with the phase labels of theory.phases shaded; one column per value of the problem setting that
    varies (failure_mode, else orthogonality; first seed's GRPO run)."""
    name = "phases"
    require(runs, ["run_id", "orthogonality", "estimator", "seed"], name, "runs")
    require(steps, ["run_id", "step", "sigma_bar", "rho", "gain", "phase"], name, "steps")
    sel = _rows(runs, name, estimator=["grpo"])
    axis = next((c for c in ("failure_mode", "orthogonality") if c in sel and sel[c].nunique() > 1), "orthogonality")
    orths = sorted(sel[axis].unique())
    with apply_style():
        fig, axes = plt.subplots(3, len(orths), figsize=(DOUBLE_COLUMN, 4.2), sharex="col", squeeze=False)
        for j, o in enumerate(orths):
            run = sel[sel[axis] == o].sort_values("seed").iloc[0]
            s = steps[steps["run_id"] == run["run_id"]].sort_values("step")
            _phase_column([axes[i][j] for i in range(3)], s)
            for i in range(3):
                ax = axes[i][j]
                if i == 0:
                    ax.set_title({"failure_mode": f"failure mode beta = {o:g}",
                                  "orthogonality": f"orthogonality o = {o:g}"}[axis])
                if i == 2:
                    ax.set_xlabel("training step")
        handles = [Patch(color=c, alpha=0.4, label=f"phase {p}") for p, c in PHASE_COLOURS.items()]
        axes[0][-1].legend(handles=handles, loc="upper right")
        fig.tight_layout()
    return fig


def convergence_rate(runs: pd.DataFrame, steps: pd.DataFrame) -> Figure:
    """Fig. 6: suboptimality 1 - J_t / J* against t (log-log) for each estimator in exact mode, with
    the least-squares slope of log(1 - J_t/J*) on log t over the last decade (t >= T/10) in the legend."""
    name = "convergence_rate"
    require(runs, ["run_id", "mode", "estimator", "seed", "j_star"], name, "runs")
    require(steps, ["run_id", "step", "J"], name, "steps")
    sel = _rows(runs, name, mode="exact")
    with apply_style():
        fig, ax = plt.subplots(figsize=(SINGLE_COLUMN, 2.6))
        for est in [e for e in ALL_NAMES if e in set(sel.estimator)]:
            run = sel[sel["estimator"] == est].sort_values("seed").iloc[0]
            s = steps[steps["run_id"] == run["run_id"]].sort_values("step")
            sub = 1.0 - s["J"].to_numpy() / float(run["j_star"])
            t = s["step"].to_numpy()
            ok = (t >= 1) & (sub > 1e-14)
            fit = ok & (t >= t.max() / 10)
            slope = np.polyfit(np.log(t[fit]), np.log(sub[fit]), 1)[0] if fit.sum() >= 2 else float("nan")
            sty = estimator_style(est)
            ax.plot(t[ok], sub[ok], color=sty["color"], linestyle=sty["linestyle"],
                    label=f"{sty['label']} (slope {slope:.2f})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training step t")
        ax.set_ylabel("suboptimality 1 - J_t / J*")
        ax.set_title("legend: slope of log-log fit over the last decade", fontsize=7)
        ax.legend(loc="lower left")
        fig.tight_layout()
    return fig


def group_size_eps(runs: pd.DataFrame, steps: pd.DataFrame | None = None) -> Figure:
    """Fig. 7: GRPO's speedup over REINFORCE against the group size G, one line per eps (sampled
    mode), geometric mean over seeds with 95% interval."""
    name = "group_size_eps"
    cells = _speedup_by_cell(runs, name, ["group_size", "eps"])
    with apply_style():
        fig, ax = plt.subplots(figsize=(SINGLE_COLUMN, 2.5))
        for i, (eps, g) in enumerate(cells.groupby("eps")):
            g = g.sort_values("group_size")
            ax.errorbar(g["group_size"], g["speedup"], yerr=[g["speedup"] - g["lo"], g["hi"] - g["speedup"]],
                        color=SEQUENCE[i % len(SEQUENCE)], marker="o", capsize=2, label=f"eps = {eps:g}")
        ax.axhline(1.0, color="0.5", linestyle=":", linewidth=0.8)
        ax.set_xscale("log", base=2)
        _plain_log_ticks(ax.xaxis, sorted(cells["group_size"].unique()))
        ax.set_xlabel("group size G (responses per prompt)")
        ax.set_ylabel("GRPO speedup over REINFORCE")
        ax.legend(loc="best")
        fig.tight_layout()
    return fig


def adaptive(runs: pd.DataFrame, steps: pd.DataFrame) -> Figure:
    """Fig. 8: each adaptive estimator's steps to the target against the best of GRPO, Dr. GRPO and
    REINFORCE (each at its tuned lr; sim.analysis.adaptive_scorecard), one point per cell, log-log:
    on or below y = x it is as fast as the best fixed choice, the band is the 10% target; filled
    points are cells where phase III appears, circles exact mode, triangles sampled."""
    name = "adaptive"
    require(runs, ["run_id", "estimator", "selected", "steps_to_target", "reached_target", "mode"], name, "runs")
    require(steps, ["run_id", "step", "phase"], name, "steps")
    chosen = [e for e in ADAPTIVE_NAMES if e in set(runs["estimator"])]
    if not chosen:
        raise FigureInputError(f"figure {name}: the results hold no adaptive estimator ({', '.join(ADAPTIVE_NAMES)})")
    with apply_style():
        fig, axes = plt.subplots(1, len(chosen), figsize=(DOUBLE_COLUMN, 3.1), squeeze=False)
        for ax, est in zip(axes[0], chosen):
            try:
                card = adaptive_scorecard(runs, steps, est)
            except ValueError as e:
                raise FigureInputError(f"figure {name}: {e}") from None
            sty = estimator_style(est)
            if "mode" not in card:  # one mode in the results: the scorecard has no mode column
                card = card.assign(mode=str(runs["mode"].iloc[0]))
            for mode, marker in (("exact", "o"), ("sampled", "^")):
                for iii in (False, True):
                    c = card[(card["mode"] == mode) & (card["phase_iii"] == iii)]
                    ax.scatter(c["best_steps"], c["adaptive_steps"], marker=marker, s=14,
                               facecolors=sty["color"] if iii else "none", edgecolors=sty["color"], linewidths=0.8,
                               label=f"{mode}{', phase III' if iii else ''}")
            lo = max(1.0, float(min(card["best_steps"].min(), card["adaptive_steps"].min())) / 1.5)
            hi = float(max(card["best_steps"].max(), card["adaptive_steps"].max())) * 1.5
            xs = np.array([lo, hi])
            ax.plot(xs, xs, color="0.3", linewidth=0.8)
            ax.fill_between(xs, xs, (1 + ADAPTIVE_TOLERANCE) * xs, color="0.8", alpha=0.6, linewidth=0)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            n_iii = int(card["phase_iii"].sum())
            # short lines, the label wrapped: four panels share a double column
            ax.set_title(f"{textwrap.fill(sty['label'], 24)}\nwithin 10%: {int(card['within'].sum())}/{len(card)} cells\n"
                         f"faster, phase III: {int((card['faster_than_each'] & card['phase_iii']).sum())}/{n_iii}",
                         fontsize=7)
            ax.set_xlabel("best of GRPO, Dr. GRPO,\nREINFORCE (steps)")
            ax.set_ylabel("steps to target")
        axes[0][0].legend(loc="upper left", fontsize=6)
        fig.tight_layout()
    return fig
