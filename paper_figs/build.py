"""The figure pipeline behind `sim figures`: experiment configs -> results -> PDF/PNG + README.

For every figure of paper_figs.FIGURES: expand its experiment config (experiments/NAME.toml,
with its [quick] table under --quick) into a sweep, reuse the stored results when that exact
sweep has finished, resume it when it was interrupted, run it otherwise; then render the
figure function on (runs, steps) and write NAME.pdf and NAME.png. Results live in
RESULTS_ROOT/<experiment>-<hash of the sweep>, so a changed config never reuses stale results.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from paper_figs import BY_NAME, FIGURES, figures
from sim import results, sweep
from sim.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO_ROOT / "experiments"
RESULTS_ROOT = Path("results") / "figures"


@dataclass
class FigureOutcome:
    name: str
    results_dir: Path
    reused: bool
    seconds: float
    files: list[Path]
    note: str = ""  # what the user should know about the drawing (sim figures --from prints it)


def results_dir_for(experiment: str, spec: sweep.SweepSpec, root: Path) -> Path:
    digest = results.stable_id(spec.as_dict(), 10)
    return root / f"{Path(experiment).stem}-{digest}"


def ensure_results(spec: sweep.SweepSpec, out: Path, on_progress: Callable | None = None, **run_kwargs):
    """(runs, steps, reused): load a finished sweep, else resume or run it (run_kwargs: backend, address,
    engine, on_compile)."""
    if (out / results.RUNS).exists():
        runs, steps = results.load_results(out)
        return runs, steps, True
    runs, steps = sweep.run_sweep(spec, out, resume=(out / results.MANIFEST).exists(), on_progress=on_progress,
                                  **run_kwargs)
    return runs, steps, False


def build_figures(out: Path, only: str | None = None, quick: bool = False, results_root: Path = RESULTS_ROOT,
                  on_progress: Callable | None = None, on_figure: Callable | None = None,
                  backend: str = "local", address: str | None = None, engine: str = "auto",
                  on_compile: Callable | None = None) -> list[FigureOutcome]:
    """Build every figure (or ``only`` one); returns what was done for each."""
    if only is not None and only not in BY_NAME:
        raise ConfigError(f"only: unknown figure {only!r}; choose from {', '.join(BY_NAME)}")
    chosen = [BY_NAME[only]] if only else list(FIGURES)
    specs = {}
    for fig in chosen:  # validate every config before running anything
        axes, seeds, lr = sweep.load_config(EXPERIMENTS / fig.experiment, quick=quick)
        specs[fig.name] = sweep.build_spec(axes, seeds, lr)
        sweep.expand(specs[fig.name])
    results.check_writable(Path(out))
    done = []
    for fig in chosen:
        t0 = time.perf_counter()
        rdir = results_dir_for(fig.experiment, specs[fig.name], Path(results_root))
        if on_figure:
            on_figure(fig.name, rdir)
        runs, steps, reused = ensure_results(specs[fig.name], rdir, on_progress, backend=backend, address=address,
                                             engine=engine, on_compile=on_compile)
        files = _save(fig.render(runs, steps), Path(out), fig.name)
        done.append(FigureOutcome(fig.name, rdir, reused, time.perf_counter() - t0, files))
    if only is None:
        write_readme(Path(out), quick)
    return done


def _draw(figure) -> dict[str, bytes]:
    """{"pdf": ..., "png": ...}: the figure drawn in memory (a figure that cannot be drawn leaves
    nothing behind); the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    try:
        blobs = {}
        for ext in ("pdf", "png"):
            buf = io.BytesIO()
            meta = {"CreationDate": None} if ext == "pdf" else {}  # byte-stable files for version control
            figure.savefig(buf, format=ext, metadata=meta)
            blobs[ext] = buf.getvalue()
        return blobs
    finally:
        plt.close(figure)


def _save(figure, out: Path, name: str) -> list[Path]:
    """NAME.pdf and NAME.png under ``out``, drawn first (_draw), then each written atomically."""
    return _write(_draw(figure), out, name)


def _write(blobs: dict[str, bytes], out: Path, name: str) -> list[Path]:
    files = []
    for ext, data in blobs.items():
        path = out / f"{name}.{ext}"
        results._atomic_write(path, lambda tmp, d=data: Path(tmp).write_bytes(d))
        files.append(path)
    return files


#: Figures drawn from results directories as they are (``sim figures --from DIR``), besides FIGURES.
FROM_RESULTS = {"training_phases": figures.training_phases}


def render_from(dirs: list[Path], out: Path, only: str | None = None) -> list[FigureOutcome]:
    """Draw one figure (``only``; default training_phases, or any name of FIGURES) from stored
    results directories, joined (runs and steps of every directory: e.g. each estimator of a
    ``sim llm compare``), without running anything: the LLM runner's and the TRL callback's results
    as well as a sweep's. Joining several, each run is tagged with its directory (``source``) and
    the run ids are made distinct across them (two runs of one config share an id). A missing directory or a
    figure whose inputs they lack is one ResultsError line, before anything is written."""
    import pandas as pd

    name = only or "training_phases"
    render = FROM_RESULTS.get(name) or (BY_NAME[name].render if name in BY_NAME else None)
    if render is None:
        raise ConfigError(f"only: unknown figure {name!r}; choose from {', '.join([*FROM_RESULTS, *BY_NAME])}")
    t0 = time.perf_counter()
    dirs = list(dict.fromkeys(Path(d).resolve() for d in dirs))  # the same directory twice is drawn once
    names = [d.name for d in dirs]
    if len(set(names)) < len(names):  # a/grpo and b/grpo: name them by their parent too
        names = [f"{d.parent.name}/{d.name}" for d in dirs]
    runs, steps = [], []
    for k, d in enumerate(dirs):
        r, s = results.load_results(d)
        if len(dirs) > 1:
            r, s = r.assign(run_id=f"{k}:" + r["run_id"].astype(str)), s.assign(run_id=f"{k}:" + s["run_id"].astype(str))
        runs.append(r.assign(source=names[k]) if len(dirs) > 1 else r)
        steps.append(s)
    runs, steps = pd.concat(runs, ignore_index=True), pd.concat(steps, ignore_index=True)
    try:  # a figure of FIGURES on results it was not made for (one step, no positive value on a log axis)
        blobs = _draw(render(runs, steps))
    except results.ResultsError:  # FigureInputError: already one line
        raise
    except ValueError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise figures.FigureInputError(f"figure {name}: these results cannot be drawn ({first})") from None
    results.check_writable(Path(out))  # the first write, once the figure is drawn
    files = _write(blobs, Path(out), name)
    drawn = int(runs["run_id"].isin(steps["run_id"]).sum()) if "run_id" in runs and "run_id" in steps else 0
    note = ""
    if name == "training_phases" and drawn > figures.TRAINING_PHASES_COLUMNS:
        note = f"the first {figures.TRAINING_PHASES_COLUMNS} of {drawn} runs drawn"
    return [FigureOutcome(name, dirs[0], True, time.perf_counter() - t0, files, note)]


def write_readme(out: Path, quick: bool) -> None:
    """paper_figs/README.md: every figure with its question, config, command and reading."""
    lines = ["# Paper figures", "",
             "Regenerate all of them with `sim figures` (or one with `sim figures --only NAME`; "
             "`--quick` for the small configs). Each figure is a pure function of the results in "
             "`paper_figs/figures.py`; its sweep is the config named below, and stored results are "
             "reused, so a second `sim figures` only re-renders. `sim figures --from DIR` draws an LLM or "
             "TRL run's phases (training_phases) from its results directory, running nothing.", ""]
    if quick:
        lines += ["These files were made with `--quick` (small configs): readings refer to the full figures.", ""]
    for i, f in enumerate(FIGURES, 1):
        lines += [f"## {i}. {f.name}", "", f"![{f.name}]({f.name}.png)", "",
                  f"- Question: {f.question}", f"- Config: `experiments/{f.experiment}`",
                  f"- Command: `sim figures --only {f.name}`", f"- Reading: {f.reading}", ""]
    text = "\n".join(lines)
    results._atomic_write(out / "README.md", lambda tmp: Path(tmp).write_text(text))
