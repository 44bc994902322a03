"""The `sim` command line (typer). Thin: parses, validates, calls library functions.

Problem and training options are generated from the fields of ProblemConfig and TrainConfig
(their metadata holds help text and ranges), so a field exists once. Any bad value prints one
line ``error: <option>: <what is wrong>`` and exits with code 2 before any result is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import functools
import inspect
import os
import signal
import sys
from pathlib import Path
from typing import Optional, get_args

import typer
from rich.markup import escape as rich_escape
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from rich.table import Table

from sim import _interrupts, analysis, estimators, results
from sim import sweep as sweep_mod
from sim.config import (ConfigError, ProblemConfig, TrainConfig, check_device, field_type, option_name, parse_int, parse_value,
                        range_text, resolve_device)
from sim.results import ResultsError

def _click_classes(name: str) -> tuple[type, ...]:
    """Exception class ``name`` from click and from typer's vendored copy (typer >= 0.29, whose
    Abort lives in typer.exceptions)."""
    import importlib

    found = []
    for mod in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            cls = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
        if cls not in found:
            found.append(cls)
    return tuple(found)


USAGE_ERRORS = _click_classes("UsageError")
ABORTS = _click_classes("Abort")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="grpo-sim: when does GRPO's per-prompt std normalization beat REINFORCE?")
console = Console(width=None if sys.stdout.isatty() else 132)

#: Extra spellings of generated options (DESIGN.md §5 names).
ALIASES = {"estimator": ["--estimators"], "reward_noise": ["--noise"]}
#: Fields the sweep sets itself (not options).
NOT_OPTIONS = ("lr", "lr_rule", "seed")


def _int_option(name: str, text: Optional[str], default: int, lo: int, hi: int) -> int:
    """An integer option given as text, or its default when absent (sim.config.parse_int)."""
    return default if text is None else parse_int(name, text, lo, hi)


def _with_signature(command, params: list[inspect.Parameter], name: str, doc: str):
    """Give a generated command the signature typer reads its options from."""
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    command.__name__ = name
    return command


def _param(name: str, option, annotation=Optional[str]) -> inspect.Parameter:
    """A keyword-only parameter carrying a typer.Option."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=option)


def _axis_fields(classes=(ProblemConfig, TrainConfig)):
    for cls in classes:
        for f in dataclasses.fields(cls):
            if not (cls is TrainConfig and f.name in NOT_OPTIONS):  # sweeps take --lr and --seeds apart
                yield cls, f


#: Choice lists longer than this show as NAME in the option column, with the choices in the help.
MAX_INLINE_CHOICES = 4


def _type_text(cls, f: dataclasses.Field, list_valued: bool) -> tuple[str, str]:
    """(metavar, extra help) of a field's option from its type and metadata: INTEGER / FLOAT /
    [a|b] / NAME (long choice lists, listed in the help), ',...' for lists; ranges in the help."""
    typ = field_type(cls, f.name)
    choices = f.metadata.get("choices") or get_args(typ)
    extra = ""
    if choices:
        metavar = "[" + "|".join(choices) + "]" if len(choices) <= MAX_INLINE_CHOICES else "NAME"
        if len(choices) > MAX_INLINE_CHOICES:
            extra = f" (one of: {', '.join(choices)})"
    else:
        metavar = "INTEGER" if typ is int else "FLOAT" if typ is float else "TEXT"
        if "min" in f.metadata or "max" in f.metadata:
            extra = f" (accepted: {range_text(f.metadata)})"
    return (metavar + ",..." if list_valued else metavar), extra


def _option_params(list_valued: bool, classes=(ProblemConfig, TrainConfig),
                   list_fields: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One typer option per config field, typed in --help from the field (``_type_text``) with its
    default as a value; values arrive as text and are parsed by sim.config (one parser for the
    CLI and config files, one-line errors). ``list_fields`` take lists even when the rest do not."""
    params = []
    for cls, f in _axis_fields(classes):
        as_list = list_valued or f.name in list_fields
        default = f.default
        if cls is TrainConfig and f.name == "estimator":  # a sweep compares these unless told otherwise
            default = ",".join(sweep_mod.DEFAULT_ESTIMATORS)
        metavar, extra = _type_text(cls, f, as_list)
        help_text = f.metadata.get("help", "") + extra
        if as_list:
            help_text += " (comma-separated list)"
        decls = ALIASES.get(f.name, []) + [f"--{option_name(f.name)}"]
        params.append(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
            default=typer.Option(None, *decls, help=f"{help_text} [default: {default}]", metavar=metavar,
                                 rich_help_panel="Problem" if cls is ProblemConfig else "Training",
                                 show_default=False)))
    return params


#: `sim run` takes single values, except the estimators it compares (DESIGN.md §5).
RUN_LIST_FIELDS = ("estimator",)


def _parse_axes(values: dict[str, Optional[str]], list_valued: bool,
                classes=(ProblemConfig, TrainConfig), list_fields: tuple[str, ...] = ()) -> dict[str, tuple]:
    axes = {}
    for cls, f in _axis_fields(classes):
        text = values.get(f.name)
        if text is None:
            continue
        items = str(text).split(",") if list_valued or f.name in list_fields else [str(text)]
        if any(not t.strip() for t in items):
            raise ConfigError(f"{option_name(f.name)}: empty value in {text!r}")
        axes[f.name] = tuple(parse_value(cls, f.name, t) for t in items)
    return axes


def _spec_from_options(values: dict[str, Optional[str]], list_valued: bool, config: Optional[Path],
                       seeds: Optional[str], lr: Optional[str]) -> sweep_mod.SweepSpec:
    file_axes, file_seeds, file_lr = sweep_mod.load_config(config) if config is not None else ({}, None, None)
    list_fields = () if list_valued else RUN_LIST_FIELDS
    return sweep_mod.build_spec({**file_axes, **_parse_axes(values, list_valued, list_fields=list_fields)},
                                seeds if seeds is not None else file_seeds, lr if lr is not None else file_lr)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def print_summary(runs, spec: sweep_mod.SweepSpec, out: Path) -> None:
    """The end-of-sweep table: cell x estimator with steps-to-target, final J, speedup and CI."""
    table_df = analysis.summarize(runs, group_by=[c for c in spec.varying() if c in runs.columns])
    table_df["_order"] = (table_df["estimator"] != "reinforce").astype(int)  # REINFORCE first in each cell
    table_df = table_df.sort_values([c for c in spec.varying() if c in table_df.columns] + ["_order", "estimator"],
                                    kind="stable")
    t0 = runs.iloc[0]
    table = Table(title=f"GRPO-family vs REINFORCE: steps to {t0['target_fraction']:.0%} of J* "
                        f"({t0['mode']} mode, {int(t0['steps'])} steps, lr: "
                        f"{spec.lr if isinstance(spec.lr, str) else 'fixed list'})")
    show = [c for c in spec.varying() if c in table_df.columns]
    for c in show:
        table.add_column(option_name(c), justify="right")
    for c in ("estimator", "lr", "reached", "steps→target", "final J/J*", "speedup (95% CI)", "predicted",
              "G_pred", "conditions"):
        table.add_column(c, justify="right" if c != "estimator" else "left")
    for _, r in table_df.iterrows():
        steps = f"{r['steps_to_target']:.0f}"
        if r["reached"] < r["n"]:
            steps = f"≥{steps}" if r["reached"] * 2 < r["n"] else steps
        sp = "n/a"
        if r.get("speedup") == r.get("speedup"):  # not NaN: the sweep has a REINFORCE run
            mark = analysis.censor_mark(r.get("speedup_censored", ""))
            if mark == "–":
                sp = "– (neither)"
            else:
                sp = f"{mark}{r['speedup']:.2f}"
                if r["n"] > 1:
                    sp += f" ({r['speedup_lo']:.2f}–{r['speedup_hi']:.2f})"
        table.add_row(*[_fmt(r[c]) if isinstance(r[c], float) else str(r[c]) for c in show],
                      str(r["estimator"]), _fmt(r["lr"]) + {"top": "↑", "bottom": "↓"}.get(r.get("lr_edge", ""), ""),
                      f"{r['reached']}/{r['n']}", steps,
                      f"{r['final_J'] / r['j_star']:.3f}", sp,
                      f"{r['predicted_speedup']:.2f}" if r["predicted_speedup"] == r["predicted_speedup"] else "–",
                      f"{r['predicted_gain']:.2f}" if estimators.is_std_normalized(r["estimator"]) else "",
                      f"{r['conditions_ok']}/{r['n']}")
    console.print(table)
    notes = ["predicted = the speedup over REINFORCE at its theory step that the orthogonal-case time change "
             "predicts from the row's own trajectory, finite G included (README 'Theory beside measurement'); "
             "G_pred = sigma_bound / sigma_bar (the ratio of the two rate bounds, GRPO-type rows); conditions: runs "
             "where orthogonality, the M-bound, step-size safety and the relaxed sigma condition all hold",
             "speedup = REINFORCE steps / estimator steps, same cell and seed, each at its own lr; "
             "geometric mean over seeds, t-interval on the log scale; steps→target is the median over seeds "
             "(≥: most runs never reached it); ≥/≤ on a speedup: a lower / upper bound (some runs never reached the "
             "target), ~: censored in both directions"]
    if sweep_mod.tuned_per_octave(spec.lr) or not isinstance(spec.lr, str):
        notes.append(f"lr selection: {analysis.SELECTION_RULE}")
    mismatch = table_df[table_df["objective_mismatch"] > 0] if "objective_mismatch" in table_df else table_df.iloc[:0]
    if len(mismatch):
        notes.append(f"objective mismatch in {len(mismatch)} row(s) ({', '.join(sorted(set(mismatch['estimator'])))}): "
                     "REINFORCE ends with the higher J, the estimator with the higher F = mean_i 2 arcsin sqrt(p_i), "
                     "the scale-free objective population GRPO ascends; it optimizes another objective, "
                     "which is not phase III (theory.normalized_objective)")
    if "lr_edge" in table_df and (table_df["lr_edge"] != "").any():
        notes.append("lr↑ / lr↓: edge-limited, the chosen lr is still the largest / smallest tried after extending "
                     f"the grid by {sweep_mod.MAX_LR_EXTENSIONS} octaves (its speedup may be against a rate that is not the best)")
    for n in notes:
        console.print(f"[dim]{n}[/dim]")
    warning = divergence_warning(runs)
    if warning:
        console.print(f"[bold yellow]{warning}[/bold yellow]")
    console.print(f"results: {out}  (load with sim.load_results({str(out)!r}))", markup=False)


def divergence_warning(runs) -> str:
    """One line counting the runs that diverged (final J below the initial J) and the runs whose
    step size breaks the ascent-lemma safety condition (step_size_ok False), '' when there are none."""
    fell = int((runs["final_J"] < runs["initial_J"]).sum()) if "initial_J" in runs else 0
    unsafe = int((~runs["step_size_ok"].astype(bool)).sum()) if "step_size_ok" in runs else 0
    if not fell and not unsafe:
        return ""
    parts = []
    if fell:
        parts.append(f"{fell} of {len(runs)} runs ended below their starting J")
    if unsafe:
        parts.append(f"{unsafe} of {len(runs)} ran above the safe step size (step_size_ok = False)")
    return "warning: " + "; ".join(parts) + " (columns final_J, initial_J, step_size_ok of runs.parquet)"


ENGINE_HELP = ("numba: the compiled CPU loop; torch: the reference, and the GPU path; auto: numba on the CPU, "
               "torch on a GPU. They agree to rounding")


def _say_compiling() -> None:
    console.print("compiling kernels (first run only) ...")


class Interrupted(Exception):
    """A sweep stopped by SIGINT or SIGTERM: main prints ``str(e)`` and exits with ``code``."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class RuntimeFailure(Exception):
    """A command that failed at run time (exit code 1); str(e) is the one line to print."""


#: The argument list main() was called with (the resume hint repeats it).
_ARGV: list[str] = []


def resume_command(out: Path) -> str:
    """The command line that continues this sweep: the same arguments, --out DIR, --resume."""
    import shlex

    args, skip = [], False
    for a in _ARGV:
        if skip:
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        if a.startswith("--out=") or a == "--resume":
            continue
        args.append(a)
    return "sim " + shlex.join([*args, "--out", str(out), "--resume"])


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt in the main thread (as Ctrl-C does) while a sweep runs, so
    both stop it the same way; which signal it was is kept for the exit code (128 + signal)."""
    got = {"signal": signal.SIGINT}

    def on_term(signum, frame):
        got["signal"] = signal.SIGTERM
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield got
        return
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, previous)


def _execute(spec: sweep_mod.SweepSpec, out: Optional[Path], resume: bool, workers: int, prefix: str,
             backend: str = "local", address: Optional[str] = None, device: str = "cpu",
             engine: str = "auto") -> None:
    if out is None:
        if resume:
            raise ConfigError("resume: needs --out DIR naming the results directory to continue")
        out = Path("results") / f"{prefix}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    runs = sweep_mod.expand(spec)  # validates every run before anything is written
    console.print(f"{len(runs)} runs → {out}", markup=False)
    started = [False]

    def on_notice(line: str) -> None:
        console.print(f"note: {line}")

    def on_batch(done: int, total: int) -> None:
        started[0] = True
        if not console.is_terminal:  # a pipe or a log file: a line per batch, not a bar at the end
            print(f"{_dt.datetime.now():%H:%M:%S} {done}/{total} runs committed", flush=True)

    def stopped(what: str, then: str = "") -> str:
        n = len(results.committed_run_ids(out)) if (out / results.MANIFEST).exists() else 0
        return f"{what}; {n} of {len(runs)} runs are committed in {out}; {then}resume with: {resume_command(out)}"

    with _sigterm_as_interrupt() as got:
        try:
            with contextlib.ExitStack() as finishing, Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                          MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                          transient=False, disable=not console.is_terminal) as progress:
                task = progress.add_task("run-steps", total=None)

                def on_progress(done: int, total: int) -> None:
                    progress.update(task, completed=done, total=total)

                runs_df, _ = sweep_mod.run_sweep(spec, out, resume=resume, workers=workers, on_progress=on_progress,
                                                 backend=backend, address=address, device=device, engine=engine,
                                                 on_compile=_say_compiling, on_notice=on_notice, on_batch=on_batch)
                # every run is committed: Ctrl-C held until the summary is out (the bar's thread ends
                # here, where a KeyboardInterrupt would be swallowed), then the line says so
                finishing.enter_context(_interrupts.held())
                progress.stop()
                print_summary(runs_df, spec, out)
        except KeyboardInterrupt:
            name = signal.Signals(got["signal"]).name
            if not (out / results.MANIFEST).exists():
                raise Interrupted(f"interrupted ({name}) before any run started; nothing was written",
                                  128 + got["signal"]) from None
            raise Interrupted(stopped(f"interrupted ({name})"), 128 + got["signal"]) from None
        except sweep_mod.SweepFailure as e:
            if not (out / results.MANIFEST).exists():
                raise RuntimeFailure(str(e)) from None
            raise RuntimeFailure(stopped(str(e))) from None
        except OSError as e:  # a full disk, a directory removed under the sweep: what is committed stays
            where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
            msg = f"{e.strerror or e}{where}"
            if not (out / results.MANIFEST).exists():
                raise RuntimeFailure(msg) from None
            raise RuntimeFailure(stopped(msg, "free space, then " if e.errno == errno.ENOSPC else "")) from None


def _make_command(name: str, list_valued: bool, doc: str):
    def command(**kwargs):
        config = kwargs.pop("config", None)
        seeds = kwargs.pop("seeds")
        lr = kwargs.pop("lr")
        out = kwargs.pop("out")
        resume = kwargs.pop("resume")
        workers = _int_option("workers", kwargs.pop("workers"), 1, 1, 256)
        backend, address, device = kwargs.pop("backend"), kwargs.pop("address"), kwargs.pop("device")
        engine = kwargs.pop("engine")
        sweep_mod.check_backend(backend)
        check_device(device, backend, allow_auto=False)
        sweep_mod.check_engine(engine)
        spec = _spec_from_options(kwargs, list_valued, Path(config) if config else None, seeds, lr)
        if not list_valued and isinstance(spec.lr, tuple) and len(spec.lr) > 1:
            raise ConfigError(f"lr: sim run takes one learning rate (or theory / tuned / tuned:N), got {lr!r}; "
                              "sim sweep takes a list")
        _execute(spec, results.out_path(out) if out is not None else None, resume, workers, prefix=name,
                 backend=backend, address=address, device=device, engine=engine)

    params = []
    if list_valued:
        params.append(_param("config", typer.Option(None, "--config", metavar="PATH", help="sweep config TOML "
                                                             "(experiments/NAME.toml); options override it")))
    params += _option_params(list_valued, list_fields=() if list_valued else RUN_LIST_FIELDS)
    params += [
        _param("seeds", typer.Option(None, "--seeds", metavar="INTEGER", help="training seeds per setting [default: 5]")),
        _param("lr", typer.Option(None, "--lr", metavar="FLOAT,...|theory|tuned|tuned:N", help="learning rates: comma "
                                               "list, 'theory' (ascent-lemma step), 'tuned' (best of lr_theory*2^j, "
                                               "j=-1..4) or 'tuned:N' (the same span, N rates per octave) "
                                               "[default: theory]")),
        _param("out", typer.Option(None, "--out", metavar="DIR", help="results directory [default: "
                                               f"results/{name}-TIMESTAMP]")),
        _param("resume", typer.Option(False, "--resume", help="continue an interrupted sweep in --out"), bool),
        _param("workers", typer.Option(None, "--workers", metavar="INTEGER", help="local worker processes, or CPUs of a local "
                                       "Ray instance [default: 1]")),
        _param("backend", typer.Option("local", "--backend", metavar="[local|ray]", help="where the runs train (ray: the ray extra)"),
               str),
        _param("address", typer.Option(None, "--address", metavar="HOST:PORT", help="Ray cluster to join (ray backend); "
                                       "without it a local instance starts")),
        _param("device", typer.Option("cpu", "--device", metavar="[cpu|cuda]", help="where each batch trains "
                                      "(cuda: local backend)"), str),
        _param("engine", typer.Option("auto", "--engine", metavar="[auto|numba|torch]", help=ENGINE_HELP), str),
    ]
    return _with_signature(command, params, name, doc)


app.command("run")(_make_command(
    "run", False, "Train every estimator on one problem setting and compare them (single values)."))
app.command("sweep")(_make_command(
    "sweep", True, "Sweep a grid of problem/training settings (comma-separated lists) and compare "
                   "each GRPO-family estimator with REINFORCE."))


@app.command("figures")
def figures_command(
    ctx: typer.Context,
    out: Optional[str] = typer.Option(None, "--out", metavar="DIR", help="where the PDF/PNG files and README.md go "
                                      "[default: paper_figs; with --from, the first DIR's figures/]"),
    only: Optional[str] = typer.Option(None, "--only", metavar="NAME", help="build one figure (by name, see "
                                       "paper_figs/README.md; with --from also training_phases, its default)"),
    from_dirs: Optional[list[str]] = typer.Option(None, "--from", metavar="DIR", help="draw from stored results "
                                                  "instead (an LLM or TRL run's, a sweep's; repeat to join several), "
                                                  "running nothing"),
    quick: bool = typer.Option(False, "--quick", help="small configs (the [quick] table of each experiment)"),
    results_root: Optional[str] = typer.Option(None, "--results", metavar="DIR", help="where the sweeps' results are "
                                               "stored [default: results/figures]"),
    backend: str = typer.Option("local", "--backend", metavar="[local|ray]", help="where missing sweeps run"),
    address: Optional[str] = typer.Option(None, "--address", metavar="HOST:PORT", help="Ray cluster to join (ray backend)"),
    engine: str = typer.Option("auto", "--engine", metavar="[auto|numba|torch]", help=ENGINE_HELP),
) -> None:
    """Regenerate every paper figure from experiments/*.toml, running only the missing sweeps; or,
    with --from, draw one figure from stored results (an LLM runner's or TRL callback's run)."""
    from paper_figs import build as figures_mod  # the CLI is the one sim module that imports paper_figs

    if from_dirs:
        # given on the command line at all, even at its default (an explicit --results results/figures too)
        unused = [option for option, param in (("--quick", "quick"), ("--results", "results_root"),
                                               ("--backend", "backend"), ("--address", "address"), ("--engine", "engine"))
                  if getattr(ctx.get_parameter_source(param), "name", None) == "COMMANDLINE"]
        if unused:
            raise ConfigError(f"from: {', '.join(unused)} choose how sweeps run; --from runs none")
        dirs = [Path(d).expanduser() for d in from_dirs]
        target = results.out_path(out) if out is not None else dirs[0] / "figures"
        (o,) = figures_mod.render_from(dirs, target, only)
        console.print(f"{o.name} ← {', '.join(from_dirs)} → {', '.join(str(f) for f in o.files)}"
                      + (f" ({o.note})" if o.note else ""), markup=False, highlight=False)
        return
    out = results.out_path("paper_figs" if out is None else out)
    sweep_mod.check_backend(backend)
    sweep_mod.check_engine(engine)
    rows = []
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("figures", total=None)

        def on_figure(name, rdir):
            progress.update(task, description=f"{name}", completed=0, total=None)

        def on_progress(done, total):
            progress.update(task, completed=done, total=total)

        outcomes = figures_mod.build_figures(out, only=only, quick=quick,
                                             results_root=results.out_path(figures_mod.RESULTS_ROOT if results_root is None
                                                                           else results_root, "results"),
                                             on_progress=on_progress, on_figure=on_figure, backend=backend,
                                             engine=engine, on_compile=_say_compiling,
                                             address=address)
    table = Table(title=f"figures → {rich_escape(str(out))}")
    for c in ("figure", "results", "sweep", "seconds"):
        table.add_column(c)
    for o in outcomes:
        table.add_row(o.name, rich_escape(str(o.results_dir)), "reused" if o.reused else "ran", f"{o.seconds:.1f}")
        rows.append(o)
    console.print(table)


theory_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                         help="What the theory predicts for one problem, and whether its conditions hold.")
app.add_typer(theory_app, name="theory")


def _make_theory_command(name: str, doc: str, default_steps: int):
    def command(**kwargs):
        from sim import theory_report
        from sim.config import validate_run

        as_json = kwargs.pop("json")
        steps = _int_option("steps", kwargs.pop("steps"), default_steps, 1, 100_000)
        values = _parse_axes(kwargs, False, (ProblemConfig,))
        problem = sweep_mod.resolve_problem(ProblemConfig(**{k: v[0] for k, v in values.items()}))
        validate_run(sweep_mod.RunConfig(problem, TrainConfig()))
        sweep_mod.built_problem(problem)  # degenerate features -> one-line error
        report = getattr(theory_report, name)(problem, steps)
        if as_json:
            import json

            print(json.dumps(report, indent=1))
        else:
            print_theory_report(name, report)

    params = _option_params(False, (ProblemConfig,)) + [
        _param("steps", typer.Option(None, "--steps", metavar="INTEGER", help="length of the exact trajectories "
                                               f"checked [default: {default_steps}]")),
        _param("json", typer.Option(False, "--json", help="print the report as JSON"), bool),
    ]
    return _with_signature(command, params, name, doc)


def print_theory_report(kind: str, report: dict) -> None:
    if kind == "check":
        table = Table(title="theory conditions (exact trajectories at theory step sizes, "
                            f"{report['steps']} steps)")
        for c in ("condition", "holds", "measured", "threshold", "statement"):
            table.add_column(c, justify="left" if c in ("condition", "statement") else "right")
        for c in report["conditions"]:
            table.add_row(c["name"], "[green]yes[/green]" if c["holds"] else "[red]NO[/red]",
                          f"{c['measured']:.4g}", f"{c['threshold']:.4g}", c["statement"])
        console.print(table)
        console.print(f"feature overlap (max principal cosine) {report['feature_overlap_max']:.3f}; "
                      f"gradient orthogonality rho at theta_0 {report['rho_theta0']:.3f}; "
                      f"all conditions hold: {report['all_hold']}")
        return
    table = Table(title="theory prediction beside measurement (exact mode)")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for k, v in report["M"].items():
        table.add_row(f"M: {k}", f"{v:.4g}")
    table.add_row("sigma_bound (largest possible sigma_i)", f"{report['sigma_bound']:.4g}")
    table.add_row("safe lr GRPO (P/M)", f"{report['step_sizes']['grpo']:.4g}")
    table.add_row("safe lr REINFORCE (P/(M sigma_bound))", f"{report['step_sizes']['reinforce']:.4g}")
    table.add_row("sigma_bar (GRPO, before target)", f"{report['sigma_bar_grpo_to_target']:.4g}")
    table.add_row("[bold]predicted gain G_pred = sigma_bound / sigma_bar[/bold]", f"{report['predicted_gain']:.3f}")
    m = report["measured"]
    table.add_row(f"[bold]measured speedup (steps to {m['target']})[/bold]",
                  f"{m['speedup']:.3f}" + ("" if m["both_reached"] else " (censored)"))
    table.add_row("steps to target: GRPO / REINFORCE", f"{m['grpo_steps_to_target']} / {m['reinforce_steps_to_target']}")
    rb = report["rate_bounds_at_grpo_target_step"]
    table.add_row(f"rate bound on mean ||grad J_i|| at t={rb['t']}: REINFORCE / GRPO",
                  f"{rb['reinforce']:.4g} / {rb['grpo']:.4g}")
    for k, v in report["decomposition_theta0_grpo_step"].items():
        table.add_row(f"GRPO step at theta_0, mean over prompts: {k}", f"{v:.4g}")
    console.print(table)


theory_app.command("check")(_make_theory_command(
    "check", "Check the theorem conditions (orthogonality, M-bound, step size, relaxed sigma) on one problem.", 200))
theory_app.command("predict")(_make_theory_command(
    "predict", "M-bounds, safe step sizes and the predicted gain, beside the measured speedup.", 2000))


llm_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                      help="LLM-scale runner: GRPO vs REINFORCE on Hugging Face causal LMs (needs the llm extra).")
app.add_typer(llm_app, name="llm")


def _require_llm_extra() -> None:
    import importlib.util

    missing = [m for m in ("transformers", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"llm: {', '.join(missing)} not installed; run: pip install -e '.[llm]'")


@llm_app.command("make-tiny")
def llm_make_tiny(
    out: str = typer.Option("models/tiny", "--out", metavar="DIR", help="directory to save the model and tokenizer"),
    size: str = typer.Option("tiny", "--size", metavar="[tiny|small|base]", help="tiny (2 min on 2 CPU cores); small and base want a GPU"),
    difficulty: str = typer.Option("1", "--difficulty", metavar="INTEGER", help="difficulty of the arithmetic problems (accepted: [1, 3])"),
    seed: str = typer.Option("0", "--seed", metavar="INTEGER", help="seed of initialization and data"),
    device: str = typer.Option("auto", "--device", metavar="[auto|cpu|cuda]", help="auto: a GPU when present"),
) -> None:
    """Pretrain the offline default model on generated arithmetic problems and save it."""
    _require_llm_extra()
    from sim.llm import model as model_mod

    if size not in model_mod.SIZES:
        raise ConfigError(f"size: unknown value {size!r}; choose from {', '.join(model_mod.SIZES)}")
    level = _int_option("difficulty", difficulty, 1, 1, 3)
    seed_ = _int_option("seed", seed, 0, 0, 2**31)
    check_device(device)
    on = resolve_device(device)
    out = results.out_path(out)
    results.check_writable(out)
    rec = model_mod.make_tiny(Path(out), size=size, difficulty=level, seed=seed_, log=console.print, device=on)
    console.print(f"saved {out}: {rec['parameters']:,} parameters, sampled accuracy {rec['sampled_accuracy']:.2f} "
                  f"on {rec['held_out']} held-out problems after {rec['steps']} steps ({rec['seconds']:.0f} s)")


def _llm_command(name: str, doc: str):
    from sim.llm.trainer import LLMConfig

    def command(**kwargs):
        out = results.out_path(kwargs.pop("out"))
        with _sigterm_as_interrupt() as got:
            try:
                train_or_compare(out, **kwargs)
            except KeyboardInterrupt:
                sig = got["signal"]
                what = (f"the run in {out} did not finish (its files there are partial); rerun the command to "
                        "train it again" if out.exists() else "nothing was written")
                raise Interrupted(f"interrupted ({signal.Signals(sig).name}); {what}", 128 + sig) from None

    def train_or_compare(out: Path, **kwargs):
        _require_llm_extra()
        from sim.llm import trainer as trainer_mod

        ests = kwargs.pop("estimators", None)
        values = _parse_axes(kwargs, False, (LLMConfig,))
        cfg = LLMConfig(**{k: v[0] for k, v in values.items()})
        trainer_mod.validate(cfg)
        run_trl = None
        if cfg.backend == "trl":
            try:
                from sim.llm.trl import run_trl
            except ImportError:
                raise ConfigError("backend: trl is not installed; run: pip install -e '.[trl]'") from None
        if name == "train":
            if run_trl is not None:
                trainer_mod.preflight(cfg)  # run_trl loads model and data after --out exists: check first
                results.check_writable(out)
                runs, _ = run_trl(cfg, out, log=console.print)
                console.print(runs.drop(columns=[c for c in runs.columns if c.startswith("_")]).T.to_string())
                return
            trainer = trainer_mod.Trainer(cfg, out, log=console.print)
            results.check_writable(out)
            runs, _ = trainer.run()
            _print_llm_table([runs.iloc[0]], f"LLM run → {out}")
            return
        names = [e.strip() for e in (ests or "grpo,reinforce").split(",")]
        for e in names:
            if e not in estimators.LLM_NAMES:
                raise ConfigError(f"estimators: unknown estimator {e!r}; choose from "
                                  f"{', '.join(estimators.LLM_NAMES)}")
            trainer_mod.validate(dataclasses.replace(cfg, estimator=e))
        if run_trl is not None:
            trainer_mod.preflight(cfg)
        rows = []
        for i, e in enumerate(names):
            cfg_e = dataclasses.replace(cfg, estimator=e)
            if run_trl is not None:  # each estimator inside TRL's GRPOTrainer, with the diagnostics callback
                if i == 0:
                    results.check_writable(out)
                runs, steps = run_trl(cfg_e, out / e, log=console.print)
                runs = runs.assign(step_seconds=float("nan"), diag_overhead=float("nan"))  # TRL times its own steps
            else:
                trainer = trainer_mod.Trainer(cfg_e, out / e, log=console.print)
                if i == 0:
                    results.check_writable(out)
                runs, _ = trainer.run()
            rows.append(runs.iloc[0])
        _print_llm_table(rows, f"{' vs '.join(names)} from {cfg.model} ({cfg.backend} backend; same checkpoint, "
                               f"prompts and seed) → {out}")

    params = _option_params(False, (LLMConfig,))
    params.append(_param("out", typer.Option(f"results/llm-{name}", "--out", metavar="DIR", help="results directory"), str))
    if name == "compare":
        params = [p for p in params if p.name != "estimator"]
        params.append(_param("estimators", typer.Option(None, "--estimators", metavar="NAME,...",
                                                             help="estimators to compare [default: grpo,reinforce]")))
    return _with_signature(command, params, name, doc)


def _print_llm_table(rows, title: str) -> None:
    table = Table(title=title)
    for c in ("estimator", "reward first 20%", "reward last 20%", "mean reward", "G_pred", "empirical M",
              "phases", "s/step", "diag overhead"):
        table.add_column(c, justify="left" if c in ("estimator", "phases") else "right")
    for r in rows:
        table.add_row(str(r["estimator"]), f"{r['initial_J']:.3f}", f"{r['final_J']:.3f}", f"{r['auc']:.3f}",
                      f"{r['predicted_gain']:.2f}", f"{r.get('empirical_M', float('nan')):.3g}", str(r["phases"]),
                      f"{r['step_seconds']:.3f}", f"{r['diag_overhead']:.0%}")
    console.print(table)


llm_app.command("train")(_llm_command("train", "Train one causal LM with one estimator; results in the simulator's format."))
llm_app.command("compare")(_llm_command("compare", "Train each estimator (default GRPO and REINFORCE) from the same "
                                                   "checkpoint and seeds, natively or in TRL; print the side-by-side "
                                                   "table."))


#: Set to 1 to see the traceback of an unexpected error instead of its one line.
TRACEBACK_ENV = "GRPO_SIM_TRACEBACK"


@functools.cache
def _click_command():
    """The click command typer builds from ``app`` (built once per process: it costs ~30 ms)."""
    return typer.main.get_command(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point. Exit codes: 0 done; 2 a usage, config or input problem (one line
    ``error: <option or file>: <what is wrong>``, nothing written); 1 a failure at run time (one
    line; what was committed stays and the line says how to resume); 128 + signal when interrupted
    (SIGINT 130, SIGTERM 143), with the resume command."""
    args = list(argv if argv is not None else sys.argv[1:])
    _ARGV[:] = args
    with _sigterm_as_interrupt() as got:  # SIGTERM stops any command as Ctrl-C does (exit 143)
        try:
            _interrupts.release()  # sim.entry's hold over the imports: a signal meanwhile takes effect here
            rv = _click_command().main(args=args, prog_name="sim", standalone_mode=False)
        except USAGE_ERRORS as e:
            msg = " ".join(e.format_message().split())
            _fail(f"error: {msg}", 2)
        except (ConfigError, ResultsError) as e:
            _fail(f"error: {_one_line(e)}", 2)
        except RuntimeFailure as e:
            _fail(f"error: {_one_line(e)}", 1)
        except Interrupted as e:
            _fail(str(e), e.code)
        except (KeyboardInterrupt, *ABORTS):  # before a sweep started: nothing to clean up
            _interrupted(got["signal"], console_script=argv is None)
        except Exception as e:  # a bug or an unforeseen input: one line, the traceback on request
            if os.environ.get(TRACEBACK_ENV) == "1":
                raise
            _fail(f"error: internal error {type(e).__name__}: {_one_line(e)} (set {TRACEBACK_ENV}=1 for the "
                  "traceback, and please report it)", 1)
    if rv == TYPER_INTERRUPTED:  # typer turned a KeyboardInterrupt outside a sweep into this, silently
        _interrupted(got["signal"], console_script=argv is None)
    sys.exit(rv if isinstance(rv, int) else 0)


#: What typer's main returns (standalone_mode=False) for a KeyboardInterrupt it caught; no command
#: of sim returns it.
TYPER_INTERRUPTED = 130


def _interrupted(signum: int, console_script: bool) -> None:
    """Exit 128 + ``signum`` with the one line "interrupted (SIGNAME)": a signal before a sweep started
    (nothing to clean up). The console script leaves by os._exit, as sim.entry does: a KeyboardInterrupt
    that passed through an extension's PyRun_* call would end the interpreter by SIGINT (exit -2)."""
    print(f"interrupted ({signal.Signals(signum).name})", file=sys.stderr, flush=True)
    if console_script:
        sys.stdout.flush()
        os._exit(128 + signum)
    sys.exit(128 + signum)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:1000]


def _fail(line: str, code: int) -> None:
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
