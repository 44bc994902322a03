"""Sweeps as data: a spec expands into a tuple of RunConfigs with stable ids (DESIGN.md §5, §8).

A spec maps every ProblemConfig/TrainConfig field (except lr, lr_rule and seed) to a tuple
of values; the grid is their product, times ``seeds`` training seeds, times the learning
rates that ``lr`` resolves to for each (problem, estimator):

    fixed   a list of numbers, each run separately
    theory  the ascent-lemma step (theory.theory_step_size): P/M for GRPO-type estimators,
            P/(M sigma_bound) for the others, M = max_i diam_i^2 <= 4 B^2 the global curvature
            bound of the problem (theory.curvature.m_diameter)
    tuned   the grid lr_theory * 2^j, j = -1..4; the lr kept per (cell, estimator) is chosen
            by sim.analysis.add_comparisons (rule: sim.analysis.SELECTION_RULE). Where the
            chosen lr is the largest (smallest) of the grid, the sweep runs that cell and
            estimator at twice (half) that lr too, until the choice is interior or the grid
            has grown by MAX_LR_EXTENSIONS octaves; a choice still at the edge is marked (lr_edge)
    tuned:N the same over the same span with N rates per octave (lr_theory * 2^(j/N),
            j = -N..4N; each extension a factor 2^(1/N) further, until the choice lies a whole
            octave inside the edge: sim.sweep.lr_extensions): a finer tuning, for comparisons
            whose tolerance is below the factor 2 between neighbouring rates

A cell is one setting of every config field except estimator, lr, lr_rule and seed.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import signal
import sys
import threading
import tomllib
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from sim import _interrupts, estimators, results
from sim._fork_server import start_fork_server as _start_fork_server, worker_context
from sim.analysis import add_comparisons
from sim.config import (AXES, PROBLEM_FIELDS, TRAIN_AXES, ConfigError, ProblemConfig, RunConfig, TrainConfig, check_value,
                        check_device, machine_bytes, parse_int, parse_value, run_bytes, validate_run)
from sim.engine import ENGINE_CHOICES, batch_key, resolve_engine, train_batch

#: The tuned grid's span in octaves around lr_theory: 2^-1 .. 2^4.
TUNED_OCTAVES = (-1, 4)
#: The most rates per octave a tuned grid takes (tuned:N).
MAX_LR_PER_OCTAVE = 8
#: Octaves a tuned grid is extended past its edge, at most (one rate per round).
MAX_LR_EXTENSIONS = 4


def tuned_factors(per_octave: int = 1) -> tuple[float, ...]:
    """The lr_theory multipliers of a tuned grid: 2^(j/N), j = -N..4N (N = per_octave; N = 1 is
    2^j, j = -1..4, exactly)."""
    lo, hi = TUNED_OCTAVES
    return tuple(2.0 ** (j / per_octave) for j in range(lo * per_octave, hi * per_octave + 1))


TUNED_FACTORS = tuned_factors(1)


def tuned_per_octave(lr) -> int | None:
    """N of a tuned lr rule ('tuned' is 1, 'tuned:N' is N); None for 'theory' or a list of rates."""
    if lr == "tuned":
        return 1
    if isinstance(lr, str) and lr.startswith("tuned:"):
        return int(lr.split(":", 1)[1])
    return None


def _parse_tuned(text: str) -> str:
    """'tuned' or 'tuned:N' (N in 1..MAX_LR_PER_OCTAVE) in its canonical spelling ('tuned:1' is
    'tuned'); a one-line ConfigError otherwise."""
    if text == "tuned":
        return text
    n = text.split(":", 1)[1].strip()
    if not (n.isascii() and n.isdigit()) or not 1 <= int(n) <= MAX_LR_PER_OCTAVE:  # ('²'.isdigit() holds)
        raise ConfigError(f"lr: {text!r}: tuned:N takes N rates per octave, an integer in [1, {MAX_LR_PER_OCTAVE}]")
    return "tuned" if int(n) == 1 else f"tuned:{int(n)}"
DEFAULT_ESTIMATORS = ("reinforce", "dr_grpo", "rloo", "grpo", "grpo_batch")
MAX_BATCH = 64
#: A sweep larger than this is refused before anything is built (a typo like --seeds 100000).
MAX_RUNS = 1_000_000
MAX_SEEDS = 100_000


class SweepFailure(RuntimeError):
    """A sweep that stopped at run time (a worker died, Ray unreachable); str(e) is one line. What
    was committed stays, and --resume continues."""


@dataclass(frozen=True)
class SweepSpec:
    """A sweep: axes (field -> tuple of values), number of seeds, and the lr rule or list."""

    axes: tuple[tuple[str, tuple], ...]
    seeds: int = 5
    lr: tuple[float, ...] | str = "theory"

    @staticmethod
    def build(axes: dict[str, Any] | None = None, seeds: int = 5, lr: Any = "theory") -> "SweepSpec":
        """Fill every axis (missing -> the field default; estimator -> DEFAULT_ESTIMATORS) and check values."""
        axes = dict(axes or {})
        unknown = set(axes) - set(AXES)
        if unknown:
            raise ConfigError(f"{sorted(unknown)[0].replace('_', '-')}: unknown sweep option")
        full = []
        defaults_p, defaults_t = ProblemConfig(), TrainConfig()
        for name in AXES:
            if name in axes:
                vals = axes[name]
                vals = tuple(vals) if isinstance(vals, (list, tuple)) else (vals,)
                if not vals:
                    raise ConfigError(f"{name.replace('_', '-')}: empty list")
            elif name == "estimator":
                vals = DEFAULT_ESTIMATORS
            else:
                vals = (getattr(defaults_p if name in PROBLEM_FIELDS else defaults_t, name),)
            cls = ProblemConfig if name in PROBLEM_FIELDS else TrainConfig
            for v in vals:
                check_value(cls, name, v)
            full.append((name, tuple(dict.fromkeys(vals))))
        if not isinstance(seeds, int):  # an int already parsed, not text (see build_spec)
            raise ConfigError(f"seeds: expected an integer in [1, {MAX_SEEDS}], got {seeds!r}")
        seeds = parse_int("seeds", seeds, 1, MAX_SEEDS)
        if isinstance(lr, str):
            if lr.startswith("tuned:"):
                lr = _parse_tuned(lr)
            elif lr not in ("theory", "tuned"):
                raise ConfigError(f"lr: expected a list of positive numbers, 'theory', 'tuned' or 'tuned:N', got {lr!r}")
        else:
            lr = tuple(float(x) for x in (lr if isinstance(lr, (list, tuple)) else (lr,)))
            if not lr or any(not (math.isfinite(x) and x > 0) for x in lr):
                raise ConfigError(f"lr: learning rates must be positive and finite, got {lr}")
        return SweepSpec(tuple(full), seeds, lr)

    def as_dict(self) -> dict:
        return {"axes": {k: list(v) for k, v in self.axes}, "seeds": self.seeds,
                "lr": self.lr if isinstance(self.lr, str) else list(self.lr)}

    def varying(self) -> list[str]:
        """Axes with more than one value, besides the estimator (for tables and figures)."""
        return [k for k, v in self.axes if len(v) > 1 and k != "estimator"]


def resolve_problem(problem: ProblemConfig) -> ProblemConfig:
    """A problem file's shapes and sha256 into the config (sim.problems.resolve_problem_file), its
    ValueError as a ConfigError; other configs unchanged."""
    if not problem.problem_file:
        return problem
    from sim.problems import resolve_problem_file

    try:
        return resolve_problem_file(problem)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def built_problem(problem: ProblemConfig):
    """make_problem with its ValueError (degenerate features) turned into a ConfigError."""
    from sim.problems import make_problem

    try:
        return make_problem(problem)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def parse_lr(text) -> tuple[float, ...] | str:
    """'theory' (default, None), 'tuned', 'tuned:N', or a comma-separated list / TOML list of numbers."""
    if text is None:
        return "theory"
    if isinstance(text, list):
        text = ",".join(map(str, text))
    text = str(text).strip()
    if text in ("theory", "tuned"):
        return text
    if text.startswith("tuned:"):
        return _parse_tuned(text)
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise ConfigError(f"lr: expected 'theory', 'tuned', 'tuned:N' or a comma-separated list of numbers, "
                          f"got {text!r}") from None


#: Extra spellings accepted in config files (as on the command line).
CONFIG_ALIASES = {"estimators": "estimator", "noise": "reward_noise"}


def _config_keys(table: dict, path: Path, where: str) -> dict:
    """A config table with its keys as field names (dashes -> underscores, CONFIG_ALIASES);
    two keys naming one field (group-size and group_size, estimator and estimators) are refused."""
    out, spelled = {}, {}
    for k, v in table.items():
        name = CONFIG_ALIASES.get(k.replace("-", "_"), k.replace("-", "_"))
        if name in spelled:
            raise ConfigError(f"config: {path}: {spelled[name]!r} and {k!r} in {where} both set "
                              f"{name.replace('_', '-')}; keep one")
        spelled[name], out[name] = k, v
    return out


def load_config(path: Path, quick: bool = False) -> tuple[dict[str, tuple], Any, Any]:
    """Read a sweep config TOML: (axes, seeds, lr) from its [sweep] table (or the top level).

    Keys are option names (dashes or underscores), values scalars or lists; ``quick`` applies
    the file's [quick] table on top (the figure pipeline's --quick). Errors name 'config'.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config: no such file {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config: {path} is a directory, not a TOML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config: cannot read {path}: {getattr(e, 'strerror', None) or type(e).__name__}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"config: {path} nests arrays or tables too deeply") from None
    if "sweep" in data:
        if not isinstance(data["sweep"], dict):
            raise ConfigError(f"config: {path}: [sweep] must be a table")
        outside = [k for k, v in data.items() if k not in ("sweep", "quick")]
        if outside:
            raise ConfigError(f"config: {path}: {outside[0]!r} is outside the [sweep] and [quick] tables; "
                              "move it into [sweep]")
        section = data["sweep"]
    else:
        tables = [k for k, v in data.items() if isinstance(v, dict) and k != "quick"]
        if tables:
            raise ConfigError(f"config: {path}: unknown table [{tables[0]}]; settings go in [sweep] (or the top level)")
        section = {k: v for k, v in data.items() if k != "quick"}
    raw = _config_keys(section, path, "[sweep]" if "sweep" in data else "the top level")
    if quick:
        q = data.get("quick", {})
        if not isinstance(q, dict):
            raise ConfigError(f"config: {path}: [quick] must be a table")
        raw.update(_config_keys(q, path, "[quick]"))
    seeds, lr = raw.pop("seeds", None), raw.pop("lr", None)
    axes = {}
    for k, v in raw.items():
        if k not in AXES:
            raise ConfigError(f"config: unknown key {k.replace('_', '-')!r} in {path}")
        vals = v if isinstance(v, list) else [v]
        cls = ProblemConfig if k in PROBLEM_FIELDS else TrainConfig
        axes[k] = tuple(parse_value(cls, k, x if not isinstance(x, (dict, list)) else repr(x)) for x in vals)
    return axes, seeds, lr


def build_spec(axes: dict[str, tuple], seeds, lr) -> SweepSpec:
    """SweepSpec from parsed axes and the seeds / lr settings as given (text, number or None)."""
    return SweepSpec.build(axes, seeds=5 if seeds is None else parse_int("seeds", seeds, 1, MAX_SEEDS),
                           lr=parse_lr(lr))


def expand(spec: SweepSpec) -> tuple[RunConfig, ...]:
    """Every run of the sweep, validated, in a deterministic order."""
    per_octave = tuned_per_octave(spec.lr)
    n_lr = 1 if spec.lr == "theory" else len(tuned_factors(per_octave)) if per_octave else len(spec.lr)
    n_runs = math.prod(len(v) for _, v in spec.axes) * spec.seeds * n_lr
    if n_runs > MAX_RUNS:
        raise ConfigError(f"sweep: {n_runs:,} runs exceed the limit of {MAX_RUNS:,}; shorten the lists or --seeds")
    names = [k for k, _ in spec.axes]
    runs = []
    built: dict[ProblemConfig, object] = {}
    for combo in itertools.product(*(v for _, v in spec.axes)):
        d = dict(zip(names, combo))
        problem = ProblemConfig(**{k: d[k] for k in PROBLEM_FIELDS})
        problem = resolve_problem(problem)
        base = {k: d[k] for k in TRAIN_AXES}
        validate_run(RunConfig(problem, TrainConfig(**base)))  # before anything builds the problem
        # its batch (the seeds and rates of one setting) must fit: checked before the problem is built
        check_memory([RunConfig(problem, TrainConfig(**base, seed=i)) for i in range(min(MAX_BATCH, spec.seeds * n_lr))])
        if problem not in built:
            built[problem] = built_problem(problem)
        if isinstance(spec.lr, str):
            lr0 = float(built[problem].theory_lr(estimators.is_std_normalized(d["estimator"])))
            lrs = [lr0] if spec.lr == "theory" else [lr0 * f for f in tuned_factors(per_octave)]
            rule = "theory" if spec.lr == "theory" else "tuned"
        else:
            lrs, rule = list(spec.lr), "fixed"
        for lr in lrs:
            for seed in range(spec.seeds):
                runs.append(RunConfig(problem, TrainConfig(**base, lr=lr, lr_rule=rule, seed=seed)))
    check_memory(runs)
    return tuple(runs)


def check_memory(runs: list[RunConfig], max_batch: int = MAX_BATCH) -> None:
    """ConfigError, before anything runs, when a batch would need more than 80% of this machine's
    memory (sim.config.run_bytes per run): the size the engine cannot hold is refused with the
    memory it would need instead of dying in the allocator."""
    avail = machine_bytes()
    if not avail or not runs:
        return
    worst = max(make_batches(runs, max_batch), key=lambda b: len(b) * run_bytes(b[0].problem))
    need = len(worst) * run_bytes(worst[0].problem)
    if need > 0.8 * avail:
        p = worst[0].problem
        raise ConfigError(f"num-responses: a batch of {len(worst)} runs at K = {p.num_responses}, P = "
                          f"{p.num_prompts} needs about {need / 2**30:.1f} GiB, more than 80% of this machine's "
                          f"{avail / 2**30:.0f} GiB; lower --num-responses or --num-prompts")


def lr_extensions(runs_df: pd.DataFrame, per_octave: int = 1) -> list[RunConfig]:
    """The next round of a tuned grid (``per_octave`` = N rates per octave): for every (cell,
    estimator) whose chosen lr is less than an octave inside the edge of the rates tried (among the
    N outermost: sim.analysis.lr_edges with within = 2^((N-1)/N); N = 1: the edge rate itself), its
    runs at 2^(1/N) times the largest ("top") or 2^(-1/N) times the smallest ("bottom") rate, every
    seed, the rest of the config unchanged. Deterministic in the finished runs.

    An octave, not one rate: at N rates per octave neighbouring rates differ by less than the
    seeds' noise, and a grid that stopped at the first interior best kept a noisy dip one rate
    inside the edge (fig. 8's cells at tuned:4: GRPO 88 steps at the dip, 63 one octave further)."""
    from sim.analysis import cell_columns, lr_edges

    edges = lr_edges(runs_df, within=2.0 ** ((per_octave - 1) / per_octave))
    if edges.empty:
        return []
    cells = cell_columns(runs_df)
    keys = cells + ["estimator", "lr"]
    # a grid is extended MAX_LR_EXTENSIONS times at most, counted in the rates it holds (so a
    # resumed sweep continues the same rounds instead of starting new ones)
    tried = runs_df.groupby(cells + ["estimator"], dropna=False)["lr"].nunique().rename("_tried").reset_index()
    edges = edges.merge(tried, on=cells + ["estimator"], how="left")
    edges = edges[edges["_tried"] < len(tuned_factors(per_octave)) + MAX_LR_EXTENSIONS * per_octave]
    # the runs the new rate copies: those at the edge rate itself (the chosen one or beyond it)
    edges = edges.assign(lr=edges["lr_max"].where(edges["edge"] == "top", edges["lr_min"]))
    edges = edges[keys + ["edge"]]
    step = 2.0 ** (1.0 / per_octave)
    chosen = runs_df.merge(edges, on=keys, how="inner")
    out = []
    for _, row in chosen.sort_values(["run_id"]).iterrows():
        new_lr = float(row["lr"]) * (step if row["edge"] == "top" else 1.0 / step)
        cfg = RunConfig.from_flat_dict({**row.to_dict(), "lr": new_lr})
        if new_lr <= 1e9:
            out.append(cfg)
    return out


def make_batches(runs: list[RunConfig], max_batch: int = MAX_BATCH) -> list[list[RunConfig]]:
    """Group runs by batch_key, sorted by run_id, chunked to at most ``max_batch`` runs."""
    groups: dict[tuple, list[RunConfig]] = {}
    for r in runs:
        groups.setdefault(batch_key(r), []).append(r)
    out = []
    for key in sorted(groups, key=repr):
        rs = sorted(groups[key], key=lambda r: r.run_id)
        out.extend(rs[i:i + max_batch] for i in range(0, len(rs), max_batch))
    return out


def batch_cost(batch: list[RunConfig]) -> int:
    """Rough work of a batch (run-steps x prompts x responses), to hand out the largest first:
    with p workers the last batches then finish close together (longest-processing-time order)."""
    p = batch[0].problem
    return len(batch) * batch[0].train.steps * p.num_prompts * p.num_responses


def _warm_worker() -> None:
    """Import what a batch needs and load the compiled kernels (when numba is there), so a worker's
    start-up overlaps the driver's preparations (about 1 ms in a fork of a fork server that did it)."""
    from sim import _worker_preload

    _worker_preload.load()


def _kernels_cached() -> bool:
    """True when no kernel compile is due (compiled kernels cached, or no numba): the fork server may
    then start before the driver loads them (it would otherwise see a half-written cache)."""
    try:
        from sim import kernels
    except ImportError:
        return True
    return kernels.is_cached()


def _die_with_parent() -> None:
    """In a worker: end this process when its parent does, however the parent dies (kill -9
    included). Linux: PR_SET_PDEATHSIG = SIGKILL (the parent is the fork server, which ends with the
    sweep's process); everywhere: a thread that exits when the parent pid changes (reparenting).
    A fork server's worker compares with the fork server's pid, recorded there before the fork
    (sim._forkserver_guard.SERVER_PID), not with the parent it sees now: a fork server killed in
    the instant between forking it and this call (the sweep killed as its workers start) left it
    to init, and both workers outlived the sweep, blocked on the pool's queue (CI, 2026-12-07)."""
    from sim._parent_death import die_with_parent

    guard = sys.modules.get("sim._forkserver_guard")  # present in a fork of the fork server only
    parent = die_with_parent(getattr(guard, "SERVER_PID", None))

    def watch():
        import time

        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="grpo-sim-parent-watch").start()


def _worker_init() -> None:
    """Local worker start-up: Ctrl-C is the sweep process's to handle (it stops the workers and
    says how to resume), not a traceback in every worker; and no worker outlives the sweep."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Stop a pool now: cancel what is queued and kill the workers (ProcessPoolExecutor can only
    wait for running tasks, and a batch can run for minutes; its private process table is the one
    handle on them)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.kill()
    for _ in range(2):  # and any worker the fork server was still starting (it would print a traceback)
        for pid in _forkserver_children():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.join(timeout=5)


def _forkserver_children() -> list[int]:
    """Pids of the fork server's children (Linux /proc; [] elsewhere or without a fork server)."""
    try:
        from multiprocessing import forkserver

        server = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
        if not server:
            return []
        kids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == server:
                    kids.append(int(stat.parent.name))
        return kids
    except Exception:  # a best effort: the workers die with their parent anyway
        return []


class _PoolStart:
    """A pool of ``workers`` local processes being started by a helper thread. ProcessPoolExecutor
    starts its workers inside ``submit``, each start waiting for the fork server to fork it: 2-3 s
    while a cold fork server imports torch and numba, in which the sweep's own thread sat idle in
    that call. Started here, the sweep process trains batches itself meanwhile (run_sweep). No
    signal reaches the helper thread, so no Ctrl-C can cut a start in half (a worker started that
    the pool never registered, which ``_stop_pool`` would miss)."""

    def __init__(self, workers: int) -> None:
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=worker_context(), initializer=_worker_init)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = threading.Thread(
            target=self._start, args=(workers,), daemon=True, name="grpo-sim-pool-start")
        self._thread.start()

    def _start(self, workers: int) -> None:
        try:
            for _ in range(workers):
                self.pool.submit(_warm_worker)
        except BaseException as e:  # (raised in the sweep's thread by wait())
            self._error = e

    def started(self) -> bool:
        """Whether every worker has been started (each then warms up in about 1 ms)."""
        return self._thread is None or not self._thread.is_alive()

    def wait(self) -> ProcessPoolExecutor:
        """The pool, once every worker has been started (the start's error, if it failed)."""
        if self._thread is not None:
            self._thread.join()
            with _interrupts.held():  # its Thread object leaves threading's WeakSet here (a finalizer)
                self._thread = None
        if self._error is not None:
            raise self._error
        return self.pool


@contextlib.contextmanager
def _started_pool(workers: int, seen: dict):
    """A ``_PoolStart`` of ``workers`` local processes (None for one): the workers import the
    engine while the driver prepares the sweep. Left by an exception (Ctrl-C, SIGTERM, a failure),
    the workers are killed at once. ``seen``: the caller's record of the pool's worker processes
    (pid -> Process, for ``_death_of``), emptied here when the pool has shut down."""
    if workers <= 1:
        yield None
        return
    _start_fork_server()  # (unless run_sweep started it already): SIGINT blocked from its start
    start = None
    try:
        start = _PoolStart(workers)
        yield start
    except BaseException:
        if start is not None:
            with _interrupts.held():  # every worker started (registered) before they are killed
                with contextlib.suppress(BaseException):
                    start.wait()
                _stop_pool(start.pool)
        raise
    # held: the pool's threads and queues end here, and its Process objects with ``seen`` (each
    # leaves multiprocessing.process._dangling, a WeakSet, and threading's): a KeyboardInterrupt
    # raised in their weakref callbacks was swallowed ("Exception ignored"), the sweep exiting 0
    with _interrupts.held():
        start.wait().shutdown(wait=True)
        seen.clear()


#: The exit code multiprocessing gives a fork-server child whose status the fork server could not
#: report (popen_forkserver: its pipe closed first), whatever the child's real end.
UNREPORTED_EXIT = 255


def _death_of(pool: ProcessPoolExecutor, seen: dict) -> str:
    """How the pool's workers ended, for the one line a broken pool gives: 'killed by SIGKILL',
    'exit code 1', or 'unknown cause'. A signal (other than the pool's own SIGTERM to the
    survivors) is the most telling and is preferred to an exit code, and an exit code to
    UNREPORTED_EXIT, which a worker killed at the same moment as another can get."""
    seen.update(getattr(pool, "_processes", None) or {})
    codes = [getattr(proc, "exitcode", None) for proc in seen.values()]
    for code in codes:
        if code is not None and code < 0 and -code != signal.SIGTERM:
            return f"killed by {signal.Signals(-code).name}"
    for code in sorted((c for c in codes if c is not None and c > 0), key=lambda c: c == UNREPORTED_EXIT):
        return f"exit code {code}"
    return "unknown cause"


def _run_batch_in_worker(rows: list[dict], device: str = "cpu", engine: str = "torch"):
    """One batch in a Ray task: one thread for torch and numba, the parallelism being across
    workers. Returns (runs, steps), which the driver writes."""
    set_threads(1)
    res = train_batch([RunConfig.from_flat_dict(r) for r in rows], device=device, engine=engine)
    return res.runs, res.steps


#: The most bytes a local worker's reply may take: POSIX's PIPE_BUF, below which a pipe write is
#: atomic. A worker killed while it sent a larger reply (a batch's frames, MBs) left half a message in
#: the result pipe, and ProcessPoolExecutor's manager thread then waited for the rest forever: the
#: sweep never learnt its pool broke, and an interrupted one hung at exit, after its one line.
REPLY_BYTES = 4096


def _commit_batch_in_worker(out: str, rows: list[dict], device: str = "cpu", engine: str = "torch") -> int:
    """One batch in a local worker, committed there (results.write_part: atomic, each part written
    by one process); returns its run count, a reply of a few bytes (REPLY_BYTES)."""
    runs, steps = _run_batch_in_worker(rows, device, engine)
    results.write_part(Path(out), runs, steps)
    return len(runs)


def set_threads(numba_threads: int | None, torch_threads: int | None = 1) -> tuple[int, int | None]:
    """Threads of this process: torch ``torch_threads`` (None: leave as is), numba ``numba_threads``
    (None: every CPU this process may use) for the compiled engine's blocks of runs. Returns the
    previous (torch, numba) thread counts."""
    import os

    import torch

    before = torch.get_num_threads(), None
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    if numba_threads is None:
        numba_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        from sim import kernels

        before = before[0], kernels.get_threads()
        kernels.set_threads(numba_threads)
    except ImportError:
        pass
    return before


@contextlib.contextmanager
def _threads(numba_threads: int | None, torch_threads: int | None = 1):
    """set_threads for the body, the previous counts restored after it."""
    torch_before, numba_before = set_threads(numba_threads, torch_threads)
    try:
        yield
    finally:
        import torch

        torch.set_num_threads(torch_before)
        if numba_before is not None:
            from sim import kernels

            kernels.set_threads(numba_before)


ENGINES = ENGINE_CHOICES  # auto, then sim.engine.ENGINES' names


def check_engine(engine: str) -> None:
    """One-line ConfigError for an engine name that is not a choice."""
    if engine not in ENGINES:
        raise ConfigError(f"engine: unknown value {engine!r}; choose from {', '.join(ENGINES)}")


def prepare_engine(engine: str, device: str = "cpu", on_compile: Callable[[], None] | None = None,
                   estimator_names: Sequence[str] = (), load: bool = True) -> str:
    """Resolve ``engine`` (sim.engine.resolve_engine) with a one-line ConfigError for a bad choice
    (numba asked for with an adaptive estimator among ``estimator_names`` is one);
    for numba (and ``load``), load the compiled kernels, compiling them first when they are not
    cached yet (``on_compile()`` is called before that, e.g. to say so). Returns "numba" or
    "torch"; the batches of adaptive estimators then train with torch (``batch_engine``)."""
    check_engine(engine)
    try:
        for name in estimator_names:
            resolve_engine(engine, device, estimator=name)
        name = resolve_engine(engine, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if name == "numba" and load:
        from sim import kernels

        if on_compile is not None and not kernels.is_cached():
            on_compile()
        kernels.warm_up()
    return name


def batch_engine(engine: str, batch: Sequence[RunConfig]) -> str:
    """The engine a batch trains with: ``engine`` (prepare_engine's), torch for an adaptive estimator
    (the compiled kernels do not carry its state)."""
    return "torch" if estimators.get(batch[0].train.estimator).adaptive is not None else engine


BACKENDS = ("local", "ray")


def check_backend(backend: str) -> None:
    """One-line ConfigError for an unknown backend or a missing optional install."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend: unknown value {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ConfigError("backend: ray is not installed; run: pip install -e '.[ray]'")


#: Seconds to wait for a Ray cluster's port before giving up (ray.init itself waits minutes).
RAY_CONNECT_TIMEOUT = 10.0


def check_ray_address(address: str, timeout: float = RAY_CONNECT_TIMEOUT) -> None:
    """SweepFailure in one line when the Ray cluster at ``address`` (HOST:PORT or ray://HOST:PORT;
    'auto' is left to Ray) does not accept a connection within ``timeout`` seconds."""
    import socket

    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        port_n = int(port)
    except ValueError:
        raise ConfigError(f"address: expected HOST:PORT, got {address!r}") from None
    try:
        socket.create_connection((host or "127.0.0.1", port_n), timeout=timeout).close()
    except OSError as e:
        raise SweepFailure(f"address: no Ray cluster answers at {address} within {timeout:.0f} s "
                           f"({e.strerror or type(e).__name__})") from None


def _ray_batches(batches, workers: int, address: str | None, on_result, engine: str = "torch") -> None:
    """Train batches as Ray tasks; results come back to the driver, which alone writes them."""
    import ray

    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"num_cpus": max(workers, 1)}
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
    task = ray.remote(num_cpus=1)(_run_batch_in_worker)
    futures = {task.remote([r.as_flat_dict() for r in b], "cpu", batch_engine(engine, b)): b for b in batches}
    pending = list(futures)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for f in done:
            on_result(futures[f], *ray.get(f))


def _start_up_held(fn):
    """Run ``fn`` with SIGINT/SIGTERM held (sim._interrupts) until it calls ``_interrupts.release()``
    once the lazy imports and the kernels' loading are done (where a KeyboardInterrupt can be
    lost); from there on a Ctrl-C stops it as one during training does."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _interrupts.held():
            return fn(*args, **kwargs)
    return wrapper


@_start_up_held
def run_sweep(spec: SweepSpec, out: Path, resume: bool = False, workers: int = 1,
              on_progress: Callable[[int, int], None] | None = None,
              max_batch: int = MAX_BATCH, backend: str = "local",
              address: str | None = None, device: str = "cpu", engine: str = "auto",
              on_compile: Callable[[], None] | None = None,
              threads: int | None = None, on_notice: Callable[[str], None] | None = None,
              on_batch: Callable[[int, int], None] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run every pending run of ``spec`` into ``out``; return (runs, steps) with summary columns.

    backend "local": in this process (workers = 1) or a pool of ``workers`` processes; "ray":
    Ray tasks on the cluster at ``address`` (a local instance with ``workers`` CPUs when None).
    Each part is written by one process: a local worker commits the batch it ran, a Ray task returns
    its frames to this process, which writes them. ``on_progress(steps_done, steps_total)`` is called as
    batches advance (steps summed over runs). ``device`` "cuda" trains each batch on the GPU
    (local backend); runs then agree with CPU ones to rounding, not bit for bit. ``engine``
    (prepare_engine): numba or torch, recorded per run (column ``engine``); the two agree to
    rounding, so a resumed sweep may mix them. ``threads``: the numba engine's threads in this
    process when it trains alone (default: every CPU it may use; workers use one each).
    ``on_notice(line)``: what the caller should tell the user (parts moved aside on --resume);
    ``on_batch(runs_committed, runs_total)``: after each committed batch.
    """
    check_backend(backend)
    check_device(device, backend, allow_auto=False)
    if backend == "ray" and address:
        check_ray_address(address)  # before anything is written: an unreachable cluster is one line
    runs = expand(spec)  # validates the whole sweep before any process starts
    # no more workers than batches (a worker is 0.2-0.35 GB; a 2-batch sweep needs 2)
    workers = max(1, min(workers, len(make_batches(list(runs), max_batch))))
    local_workers = workers if backend == "local" else 1
    names = dict(spec.axes).get("estimator", ())
    choice, engine = engine, prepare_engine(engine, device, estimator_names=names, load=False)  # a bad choice: no process yet
    if local_workers > 1 and (engine == "torch" or _kernels_cached()):  # (else it starts after the compile)
        _start_fork_server()  # its imports (~3 s) overlap the kernels' loading here
    # compiled (or loaded) before workers need them; from the user's choice, as "auto" lets adaptive
    # estimators train with torch beside numba, where a resolved "numba" refuses them
    prepare_engine(choice, device, on_compile, names)
    _interrupts.release()  # a Ctrl-C held over the imports and the kernels' loading takes effect here
    # one process: numba's blocks of runs on every CPU, torch (diagnostics only) on one thread, as
    # its OpenMP threads oversubscribe a busy machine (one default sweep with the torch engine took
    # 36.5 s against 6.1 s with one thread there); the torch engine alone keeps torch's threads
    # (on a quiet machine they halve its time). Workers: one thread each, the parallelism is theirs.
    one_process = local_workers <= 1
    torch_threads = None if one_process and engine == "torch" else 1
    seen_workers: dict = {}  # the pool's worker processes, for the line a broken pool gives (_death_of)
    with contextlib.ExitStack() as finishing, _threads(threads if one_process else 1, torch_threads), \
            _started_pool(local_workers, seen_workers) as pool_start:
        rows = [r.as_flat_dict() for r in runs]
        # a GPU sweep records its device in the manifest and fingerprint (its runs agree with CPU ones
        # to rounding only), so CPU and GPU runs never mix in one directory; CPU sweeps keep the
        # fingerprint they always had
        recorded = spec.as_dict() if device == "cpu" else {**spec.as_dict(), "device": device}
        with _interrupts.held():  # its manifest's versions (importlib.metadata) and git's subprocess end in
            # finalizers (__del__), where a Ctrl-C would be swallowed: it takes effect after the manifest
            done = results.open_results_dir(out, recorded, rows, resume, on_notice=on_notice)
        pending = [r for r in runs if r.run_id not in done]
        progress, total = [0], [0]
        runs_done, runs_total = [len(runs) - len(pending)], [len(runs) - len(pending)]
        parts_read: dict = {}  # committed part files read by this sweep (results.read_parts)

        def advance(n):
            progress[0] += n
            if on_progress:
                on_progress(progress[0], total[0])

        def batch_committed(b) -> None:
            runs_done[0] += len(b)
            if on_batch:
                on_batch(runs_done[0], runs_total[0])

        def write_part_here(runs_df, steps_df) -> None:
            """Commit a part from this process, Ctrl-C held (a ParquetWriter's __del__ would swallow it)."""
            with _interrupts.held():
                results.write_part(out, runs_df, steps_df)

        def commit(b, runs_df=None, steps_df=None):
            """A batch is committed: by this process (its frames given) or by the worker that ran it."""
            if runs_df is not None:
                write_part_here(runs_df, steps_df)
            advance(b[0].train.steps * len(b))
            batch_committed(b)

        def train_here(b: list[RunConfig]) -> None:
            """Train batch ``b`` in this process and commit it."""
            res = train_batch(b, on_progress=lambda n, size=len(b): advance(n * size), device=device,
                              engine=batch_engine(engine, b))
            write_part_here(res.runs, res.steps)
            batch_committed(b)

        def run_all(todo: list[RunConfig]) -> None:
            batches = sorted(make_batches(todo, max_batch), key=batch_cost, reverse=True)  # ties keep order
            total[0] += sum(b[0].train.steps * len(b) for b in batches)
            runs_total[0] += len(todo)
            advance(0)
            if backend == "ray":
                _ray_batches(batches, workers, address, commit, engine)
            elif workers <= 1:
                for b in batches:
                    train_here(b)
            else:
                where = str(Path(out).absolute())  # (the fork server's working directory may be another)
                # while the workers start (a cold fork server: 2-3 s of imports on one CPU), this
                # process trains the cheapest batches itself on the CPU the start leaves idle
                batches = list(batches)
                while batches and not pool_start.started():
                    train_here(batches.pop())
                pool = pool_start.pool
                try:  # (a worker that died as it started breaks the pool before the batches are submitted)
                    pool_start.wait()
                    futs = {pool.submit(_commit_batch_in_worker, where, [r.as_flat_dict() for r in b], device,
                                        batch_engine(engine, b)): b
                            for b in batches}
                    seen_workers.update(getattr(pool, "_processes", None) or {})
                    for fut in as_completed(futs):
                        seen_workers.update(getattr(pool, "_processes", None) or {})
                        fut.result()
                        commit(futs[fut])
                except BrokenProcessPool:
                    # what a worker committed before the pool broke stays (on disk, whether or not
                    # its reply came back)
                    done = results.committed_run_ids(out)
                    lost = sum(r.run_id not in done for b in batches for r in b)
                    raise SweepFailure(f"a worker process died ({_death_of(pool, seen_workers)}); "
                                       f"{lost} run(s) of this sweep's batches were not "
                                       "committed") from None

        run_all(pending)
        per_octave = tuned_per_octave(spec.lr)
        if per_octave:  # extend the grid where the best rate is at its edge (module docstring)
            extended = {d["run_id"]: d for d in results.manifest_field(out, "extension_runs", [])}
            # a resumed sweep first finishes the round it was in: a rate with some seeds committed
            # would otherwise count as tried, its missing seeds never run
            done = results.committed_run_ids(out)
            run_all([RunConfig.from_flat_dict(d) for rid, d in extended.items() if rid not in done])
            for _ in range(MAX_LR_EXTENSIONS * per_octave):  # one rate per edge group each round: the bound
                # beyond the committed rates only
                new = lr_extensions(results.read_parts(out, with_steps=False, cache=parts_read)[0], per_octave)
                if not new:
                    break
                extended.update({r.run_id: {"run_id": r.run_id, **r.as_flat_dict()} for r in new})
                # listed in the manifest before they run (its fingerprint stays the spec's, so --resume
                # still matches), so that a resume knows the round
                results.write_manifest(out, recorded, rows, extension_runs=list(extended.values()))
                run_all(new)
        # every run is committed: Ctrl-C is held from here to the pool's end (a few seconds at most),
        # then takes effect (the caller's "every run committed" line). Unheld, a KeyboardInterrupt
        # raised in a finalizer here (a ParquetWriter's __del__, the workers' Process objects leaving
        # multiprocessing's WeakSet) was swallowed as "Exception ignored" and the sweep exited 0.
        finishing.enter_context(_interrupts.held())
        runs_df, steps_df = results.read_parts(out, cache=parts_read)
        runs_df = add_comparisons(runs_df)
        results.finalize(out, runs_df, steps_df)
        parts_read.clear()  # (freed under the hold)
        return runs_df, steps_df
