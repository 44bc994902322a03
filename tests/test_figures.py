"""Figure functions on synthetic results; the pipeline reuses stored results without training; one
quick figure (fig. 8, both engines in one sweep) trained end to end."""

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from paper_figs import FIGURES
from paper_figs.figures import FigureInputError


def synthetic_results(seed=0):
    """Runs and steps covering every column the figure functions read (values are made up,
    with the structure of real results: one REINFORCE partner per cell and seed)."""
    rng = np.random.default_rng(seed)
    runs, steps = [], []
    grid = itertools.product(["tabular", "linear"], [0.2, 1.0], [0.0, 1.0], [2, 8], [1e-4, 1e-1],
                             ["reinforce", "grpo", "dr_grpo", "rloo", "grpo_batch", "grpo_phase", "grpo_finite"],
                             [0, 1])
    for i, (kind, o, spread, G, eps, est, seed_) in enumerate(grid):
        rid = f"r{i:04d}"
        speed = 1.0 if est == "reinforce" else float(np.exp(rng.normal(0.3, 0.2)))
        runs.append({"run_id": rid, "kind": kind, "orthogonality": o, "difficulty_spread": spread,
                     "reward_scale_spread": 1.0, "reward_noise": 0.0, "group_size": G, "eps": eps,
                     "estimator": est, "seed": seed_, "mode": "exact" if G == 2 else "sampled", "selected": True,
                     "speedup": speed, "speedup_censored": "lower" if (o == 0.2 and spread == 1.0) else "",
                     "predicted_gain": 1 + abs(rng.normal(0.5, 0.3)), "predicted_speedup": speed * 1.05,
                     "stuck_prompts": int(o == 0.2 and spread == 1.0), "j_star": 1.0, "target_fraction": 0.9,
                     "steps": 200, "steps_to_target": int(100 / speed), "reached_target": True})
        t = np.array([0, 1, 2, 4, 8, 16, 32, 64, 128])
        J = 1 - 0.6 * (1 + t) ** -0.8
        phase = ["I"] * 3 + ["II"] * 3 + ["III"] * 3
        for k in range(len(t)):
            steps.append({"run_id": rid, "step": int(t[k]), "J": J[k], "sigma_bar": 0.3 / (1 + t[k]) ** 0.5,
                          "rho": 0.9 - 0.05 * k, "gain": 1.5 - 0.1 * k, "gain_se": 0.05, "phase": phase[k],
                          "empirical_M": 0.3 + 0.01 * k, "analytic_M": 0.9, "m_bound_ratio": 0.4 + 0.02 * k})
    return pd.DataFrame(runs), pd.DataFrame(steps)


def _labelled(ax, which):
    label = ax.get_xlabel() if which == "x" else ax.get_ylabel()
    if label:
        return True
    shared = ax.get_shared_x_axes() if which == "x" else ax.get_shared_y_axes()
    return any((s.get_xlabel() if which == "x" else s.get_ylabel()) for s in shared.get_siblings(ax))


@pytest.mark.parametrize("spec", FIGURES, ids=[f.name for f in FIGURES])
def test_every_figure_renders_with_labelled_axes(spec, tmp_path):
    runs, steps = synthetic_results()
    fig = spec.render(runs, steps)
    for ax in fig.axes:
        if hasattr(ax, "_colorbar"):
            assert ax.get_ylabel() or ax.get_xlabel(), f"{spec.name}: colorbar without a label"
            continue
        assert _labelled(ax, "x") and _labelled(ax, "y"), f"{spec.name}: an axis has no label"
    for ext in ("pdf", "png"):
        path = tmp_path / f"{spec.name}.{ext}"
        fig.savefig(path, format=ext)
        assert path.exists() and path.stat().st_size > 1000


@pytest.mark.parametrize("spec", FIGURES, ids=[f.name for f in FIGURES])
def test_missing_inputs_fail_with_one_clear_line(spec):
    runs, steps = synthetic_results()
    for bad_runs, bad_steps in ((runs.iloc[:0], steps), (runs, steps.drop(columns=["J", "phase", "empirical_M"])),
                                (runs.drop(columns=["speedup", "orthogonality"]), steps)):
        try:
            spec.render(bad_runs, bad_steps)
        except FigureInputError as e:
            assert str(e).startswith(f"figure {spec.name}:") and "\n" not in str(e)
        else:
            # a figure that does not read the dropped inputs may render; it must not crash otherwise
            pass
    with pytest.raises(FigureInputError, match=f"figure {spec.name}"):
        spec.render(runs.iloc[:0], steps.iloc[:0])


def test_pipeline_reuses_stored_results_without_training(tmp_path, monkeypatch):
    from paper_figs import build as figures
    from sim import engine, sweep

    out, root = tmp_path / "figs", tmp_path / "results"
    first = figures.build_figures(out, only="m_bound_validation", quick=True, results_root=root)
    assert not first[0].reused and (out / "m_bound_validation.png").stat().st_size > 1000

    def no_training(*a, **k):
        raise AssertionError("a simulation ran although its results were stored")

    monkeypatch.setattr(engine, "train_batch", no_training)
    monkeypatch.setattr(sweep, "train_batch", no_training)
    second = figures.build_figures(out, only="m_bound_validation", quick=True, results_root=root)
    assert second[0].reused and second[0].results_dir == first[0].results_dir


def test_censoring_marks():
    from sim.analysis import censor_mark

    assert [censor_mark(c) for c in ("", "lower", "upper", "both", "both,lower", "lower,upper", "both,upper")] == \
        ["", "≥", "≤", "–", "~", "~", "~"]


def test_heatmap_says_why_no_seed_reached_the_target():
    from paper_figs.figures import speedup_heatmap

    runs, steps = synthetic_results()
    runs = runs[(runs["kind"] == "linear") & (runs["group_size"] == 8) & (runs["eps"] == 1e-4)].copy()
    cell = (runs["orthogonality"] == 0.2) & (runs["difficulty_spread"] == 1.0)
    runs.loc[cell & (runs["estimator"] != "reinforce"), "speedup_censored"] = "both"
    texts = [t.get_text() for t in speedup_heatmap(runs).axes[0].texts]
    assert "–\n0-succ" in texts and not any(t.startswith("≥") for t in texts)


def test_unknown_figure_is_one_line_exit_2(capsys):
    from sim.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["figures", "--only", "nope"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: only: unknown figure") and len(err.strip().splitlines()) == 1


def _results_dir(path, runs, steps):
    """A finished results directory holding ``runs`` and ``steps`` (as the LLM runner writes one)."""
    from sim import results

    results.write_manifest(path, {"llm": {}}, runs.to_dict("records"), kind="llm")
    results.write_parquet(steps, path / results.STEPS)
    results.write_parquet(runs, path / results.RUNS)
    return path


def test_training_phases_draws_one_labelled_column_per_run_at_most_four():
    from paper_figs.figures import TRAINING_PHASES_COLUMNS, training_phases

    runs, steps = synthetic_results()
    for n in (1, 3, 9):
        sel = runs.head(n)
        fig = training_phases(sel, steps[steps["run_id"].isin(sel["run_id"])])
        cols = min(n, TRAINING_PHASES_COLUMNS)
        assert len(fig.axes) == 3 * cols
        assert [ax.get_title() for ax in fig.axes[:cols]] == list(sel["estimator"][:cols])
        assert all(_labelled(ax, "x") and _labelled(ax, "y") for ax in fig.axes)
    # an LLM run: a row every step, diagnosed (rho, gain, phase) every 10th; each label shaded up to
    # halfway to the next, the gain's standard errors as bars on its points
    n = 30
    diag = np.arange(n) % 10 == 0
    llm = pd.DataFrame({"run_id": "llm", "step": np.arange(n), "sigma_bar": np.linspace(0.4, 0.1, n),
                        "rho": np.where(diag, 0.8, np.nan), "gain": np.where(diag, 1.2, np.nan),
                        "gain_se": np.where(diag, 0.1, np.nan), "phase": np.where(diag, "I", None)})
    llm.loc[20, "phase"] = "III"
    fig = training_phases(pd.DataFrame([{"run_id": "llm", "estimator": "grpo"}]), llm)
    sigma_ax, rho_ax, gain_ax = fig.axes
    spans = [(p.get_x(), p.get_x() + p.get_width()) for p in rho_ax.patches]
    assert spans == [(0, 5), (5, 15), (15, 29)]  # steps 0, 10, 20 labelled; the run ends at step 29
    assert list(rho_ax.get_lines()[0].get_xdata()) == [0, 10, 20] and len(gain_ax.collections) == 1
    # a run of one step: its one point is drawn (marked), not an invisible line
    one = llm.iloc[:1]
    fig = training_phases(pd.DataFrame([{"run_id": "llm", "estimator": "grpo"}]), one)
    assert all(len(ax.get_lines()[0].get_xydata()) == 1 and ax.get_lines()[0].get_marker() == "." for ax in fig.axes)
    with pytest.raises(FigureInputError, match="figure training_phases: steps lack"):
        training_phases(runs, steps.drop(columns=["rho"]))
    with pytest.raises(FigureInputError, match="figure training_phases: no steps"):
        training_phases(runs, steps.iloc[:0])
    import matplotlib.pyplot as plt

    plt.close("all")


def test_figures_from_results_directories_join_them_and_refuse_bad_input_in_one_line(tmp_path, capsys,
                                                                                     monkeypatch):
    from helpers import run_cli
    from paper_figs import build

    runs, steps = synthetic_results()
    first, second = runs["run_id"][0], runs["run_id"][1]
    # as sim llm compare writes them (DIR/ESTIMATOR), and a second run of one config shares its id
    a = _results_dir(tmp_path / "grpo", runs.head(1).assign(estimator="grpo"), steps[steps["run_id"] == first])
    b = _results_dir(tmp_path / "b", runs.iloc[[1]].assign(run_id=first),
                     steps[steps["run_id"] == second].assign(run_id=first))
    code, out, err = run_cli(["figures", "--from", str(a), "--from", str(b)], capsys)
    assert code == 0, err
    png = a / "figures" / "training_phases.png"  # default: the first directory's figures/
    assert png.stat().st_size > 1000 and "training_phases" in out and not (tmp_path / "paper_figs").exists()
    drawn = []
    monkeypatch.setattr(build, "_draw", lambda figure: drawn.append(figure) or {})
    build.render_from([a, b, a], tmp_path / "f")  # the same directory twice is drawn once
    (fig,) = drawn
    assert len(fig.axes) == 3 * 2
    # titles name the directory where it is not the estimator; each run drew its own steps
    assert [ax.get_title() for ax in fig.axes[:2]] == ["grpo", f"b: {runs['estimator'][1]}"]
    drawn.clear()
    c = _results_dir(tmp_path / "other" / "grpo", runs.head(1), steps[steps["run_id"] == first])
    build.render_from([a, c], tmp_path / "f")  # two directories named grpo: their parents tell them apart
    assert [ax.get_title() for ax in drawn[0].axes[:2]] == [f"{tmp_path.name}/grpo: grpo",
                                                            f"other/grpo: {runs['estimator'][0]}"]
    rho = [ax.get_lines()[0].get_ydata() for ax in fig.axes[2:4]]
    assert list(rho[0]) == list(steps[steps["run_id"] == first].sort_values("step")["rho"])
    assert list(rho[1]) == list(steps[steps["run_id"] == second].sort_values("step")["rho"])
    monkeypatch.undo()
    # a sweep's many runs: the first four are drawn, and the line says so
    many = _results_dir(tmp_path / "many", runs, steps)
    code, out, err = run_cli(["figures", "--from", str(many), "--out", str(tmp_path / "m")], capsys)
    assert code == 0 and f"the first 4 of {len(runs)} runs drawn" in out
    # a directory name that looks like markup is printed as it is; ~ in --out is the home directory
    odd = _results_dir(tmp_path / "x[red]y[/]", runs.head(1), steps[steps["run_id"] == first])
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    code, out, err = run_cli(["figures", "--from", str(odd), "--out", "~/figs"], capsys)
    assert code == 0 and "x[red]y[/]" in out and (tmp_path / "home" / "figs" / "training_phases.png").exists(), err
    assert not (tmp_path / "~").exists() and not Path("~").exists()
    one_step = _results_dir(tmp_path / "one", runs.head(1), steps[steps["run_id"] == first].head(1))
    thin = _results_dir(tmp_path / "thin", runs.head(1)[["run_id", "estimator"]], steps[steps["run_id"] == first])
    bad = [(["--from", str(tmp_path / "nope")], "no such results directory"),
           (["--from", str(a), "--only", "bogus"], "only: unknown figure 'bogus'"),
           (["--from", str(thin), "--only", "speedup_heatmap"], "figure speedup_heatmap: runs lack"),
           (["--from", str(a), "--from", str(tmp_path / "nope")], "no such results directory"),
           (["--from", str(a), "--quick", "--engine", "torch"], "from: --quick, --engine choose how sweeps run"),
           # given at their defaults, they are still given: refused, not silently dropped
           (["--from", str(a), "--results", "results/figures", "--backend", "local"],
            "from: --results, --backend choose how sweeps run"),
           (["--from", str(a), "--engine", "auto"], "from: --engine choose how sweeps run"),
           (["--from", str(one_step), "--only", "convergence_rate"], "figure convergence_rate:")]
    for args, why in bad:
        code, out, err = run_cli(["figures", *args, "--out", str(tmp_path / "never")], capsys)
        assert code == 2 and why in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not (tmp_path / "never").exists()


def test_quick_adaptive_figure_trains_end_to_end(tmp_path, capsys):
    """`sim figures --quick --only adaptive` with the default engine: a real tuned sweep in which the
    fixed estimators train on the compiled engine and the adaptive ones on torch (a resolved engine
    once refused them here), then the figure."""
    from helpers import run_cli

    import sim

    code, _, err = run_cli(["figures", "--quick", "--only", "adaptive", "--results", str(tmp_path / "res"),
                            "--out", str(tmp_path / "figs")], capsys)
    assert code == 0, err
    assert (tmp_path / "figs" / "adaptive.png").stat().st_size > 0
    (rdir,) = (tmp_path / "res").iterdir()
    runs, _ = sim.load_results(rdir)
    engines = runs.groupby("estimator")["engine"].unique().map(tuple).to_dict()
    assert engines == {"reinforce": ("numba",), "dr_grpo": ("numba",), "grpo": ("numba",),
                       "grpo_phase": ("torch",), "grpo_finite": ("torch",), "grpo_shrunk": ("torch",),
                       "grpo_selfnorm": ("torch",)}
