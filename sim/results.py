"""Tidy results store (DESIGN.md §6).

Layout of a results directory
    manifest.json     resolved config of every run, package/library versions, git commit, time
    parts/            one committed part per finished batch: NAME.steps.parquet then NAME.runs.parquet
    runs.parquet      one row per run (config fields + summary metrics), written when all runs are done
    steps.parquet     long format: run_id, step, metric columns

Every file is written atomically (temporary file in the same directory, fsync, os.replace).
A part is committed by its runs file, written after its steps file, so a kill at any point
leaves either a whole part or an ignorable orphan steps file; ``--resume`` reruns exactly
the runs whose part was not committed. Settings are joined from the config columns, never
parsed from file names.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import pandas as pd

MANIFEST = "manifest.json"
RUNS = "runs.parquet"
STEPS = "steps.parquet"
PARTS = "parts"

#: Columns renamed since results were first written: old name -> new name (applied on load).
LEGACY_COLUMNS = {"sigma_max_bound": "sigma_bound", "step_gain": "exact_theory_step_gain"}


#: Failpoint for crash tests: GRPO_SIM_FAULT="POINT" or "POINT:N" ends the process with
#: os._exit(137), as SIGKILL would, the Nth time (default 1st) POINT is reached. Points:
#: "tmp-written" (a temp file written, not yet renamed), "part-steps" (a part's steps file
#: committed, its runs file not yet), "part-committed" (a whole part committed),
#: "final-steps" (steps.parquet replaced, runs.parquet not yet).
_FAULT_COUNTS: dict[str, int] = {}


def _failpoint(point: str) -> None:
    spec = os.environ.get("GRPO_SIM_FAULT")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _FAULT_COUNTS[point] = _FAULT_COUNTS.get(point, 0) + 1
    if _FAULT_COUNTS[point] == int(nth or 1):
        os._exit(137)


class ResultsError(ValueError):
    """A results directory that cannot be used as asked. str(e) is one line."""


def _umask() -> int:
    """The process's umask, read from /proc/self/status (Linux >= 4.7) where it can be: os has no
    read-only call, and setting it to 0 and back would, for an instant, give 0 to whatever another
    thread creates or starts meanwhile (the sweep's helper thread starts the workers while the sweep
    process writes its parts). Elsewhere it is read by setting it and setting it back."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write) -> None:
    """Write via ``write(tmp_path)`` to a temp file beside ``path``, fsync, then os.replace. Paths
    are made absolute first: pandas expands a leading '~', so a relative directory named '~' would
    otherwise be written in the home directory. The file gets the permissions open() would give it
    (0666 less the umask), not mkstemp's 0600: results are shared with a group or a cluster."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    if hasattr(os, "fchmod"):  # (POSIX; Windows has no modes to share)
        os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _failpoint("tmp-written")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    _atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_json(obj, path: Path) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
    _atomic_write(path, w)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    return dict(_installed_versions())


@functools.cache
def _installed_versions() -> dict[str, str]:
    """Versions of the packages a result depends on (looked up once per process: importlib.metadata is slow)."""
    out = {"python": platform.python_version()}
    for name in ("grpo-sim", "torch", "numpy", "pandas", "pyarrow", "scipy", "typer", "rich", "transformers",
                 "accelerate", "datasets", "trl"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def stable_id(obj, length: int | None = None) -> str:
    """sha1 of the canonical JSON of ``obj`` (sorted keys, compact separators, str() for other
    types), hex, cut to ``length``: the one id function of run ids, fingerprints, part names and
    figure results directories. Same object, same id, on any machine."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:length]


def fingerprint(spec: dict, run_rows: list[dict]) -> str:
    """Stable hash of what a results directory was written for."""
    return stable_id({"spec": spec, "runs": run_rows})


#: Longest file or directory name most file systems accept (bytes).
NAME_MAX = 255


def out_path(text, option: str = "out") -> Path:
    """The directory an ``--out`` option names, checked without creating anything: ``~`` expanded;
    refused (ResultsError naming ``option``) when empty, when a name in it is longer than NAME_MAX
    bytes, when it or an existing ancestor is not a directory, or when the nearest existing ancestor
    cannot be written."""
    raw = "" if text is None else str(text)
    if not raw.strip():
        raise ResultsError(f"{option}: empty path; name a directory")
    path = Path(os.path.expanduser(raw))
    long = [part for part in path.parts if len(os.fsencode(part)) > NAME_MAX]
    if long:
        raise ResultsError(f"{option}: the name {long[0][:40]!r}... is longer than {NAME_MAX} bytes")
    try:
        if path.exists() and not path.is_dir():
            raise ResultsError(f"{option}: {path} exists and is not a directory")
        ancestor = path
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        ancestor = ancestor if str(ancestor) else Path(".")
    except OSError as e:
        raise ResultsError(f"{option}: cannot use {raw!r}: {e.strerror or e}") from None
    if not ancestor.is_dir():
        raise ResultsError(f"{option}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ResultsError(f"{option}: {ancestor} is not writable")
    return path


def check_writable(out: Path) -> None:
    """Create ``out`` and check it can be written (ResultsError naming --out otherwise). Call it
    once the command has been validated: it is the first write."""
    out = out_path(out)
    # the directories this call may create (deepest first): removed again if it fails, so that a
    # refused --out leaves nothing ("a/../file" with file a file made "a", then failed)
    new = [d for d in (out, *out.parents) if d.name not in ("", ".", "..") and not os.path.lexists(d)]
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        for d in new:
            with contextlib.suppress(OSError):
                d.rmdir()  # (only an empty directory goes)
        raise ResultsError(f"out: cannot write to {out}: {e.strerror or e}") from None


def read_manifest(out: Path) -> dict:
    """``out``'s manifest.json as a dict; a damaged one (unreadable, not UTF-8 JSON, not an object
    with a fingerprint) raises one ResultsError that says how to recover."""
    path = out / MANIFEST
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        why = "" if isinstance(data, dict) and isinstance(data.get("fingerprint"), str) else \
            "not a grpo-sim manifest"
    except OSError as e:
        why = e.strerror or str(e)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        why = f"not UTF-8 JSON: {type(e).__name__}"
    if why:
        raise ResultsError(f"resume: {path} is damaged ({why}); to recover, move it aside "
                           f"(mv {path} {path}.bad) and rerun the same command with --resume: the committed "
                           "parts are checked against the sweep and kept")
    return data


#: Columns every committed part must hold beyond its runs' config fields (check_parts).
SUMMARY_COLUMNS = ("run_id", "final_J", "initial_J", "auc", "steps_to_target", "reached_target")
STEP_COLUMNS = ("run_id", "step", "J")
#: Where check_parts moves the parts it cannot keep.
DAMAGED = "damaged"


def _same(a, b) -> bool:
    """Config values equal as written and read back (None and NaN are the same missing value)."""
    missing = lambda v: v is None or (isinstance(v, float) and v != v)  # noqa: E731
    if missing(a) or missing(b):
        return missing(a) and missing(b)
    return a == b


def _part_defect(runs_path: Path, expected: dict[str, dict]) -> str:
    """Why the committed part ``runs_path`` cannot be kept ('' when it can): a file unreadable or
    missing, a column missing, a run not of this sweep (run id unknown, or config columns that do
    not match its run id), steps that do not cover its runs, or a NaN final J."""
    steps_path = runs_path.with_name(runs_path.name.replace(".runs.", ".steps."))
    try:
        runs = pd.read_parquet(runs_path.absolute()).rename(columns=LEGACY_COLUMNS)
    except Exception as e:  # pyarrow raises several types for truncated or corrupt files
        return f"unreadable runs file ({type(e).__name__})"
    if not steps_path.exists():
        return "its steps file is missing"
    try:
        steps = pd.read_parquet(steps_path.absolute(), columns=list(STEP_COLUMNS))
    except Exception as e:
        return f"unreadable steps file or missing columns ({type(e).__name__})"
    if "run_id" not in runs.columns or runs["run_id"].duplicated().any() or len(runs) == 0:
        return "no or duplicate run ids"
    config_cols = set().union(*(expected[r].keys() for r in runs["run_id"] if r in expected))
    missing = [c for c in (*SUMMARY_COLUMNS, *sorted(config_cols)) if c not in runs.columns]
    if missing:
        return f"missing column(s) {', '.join(missing[:3])}"
    foreign = [r for r in runs["run_id"] if r not in expected]
    if foreign:
        return f"{len(foreign)} run(s) not of this sweep"
    for row in runs.to_dict("records"):
        want = expected[row["run_id"]]
        if not all(_same(row[k], v) for k, v in want.items()):
            return f"run {row['run_id'][:12]}: config columns do not match its run id"
    if runs["final_J"].isna().any():
        return "NaN final J"
    if set(steps["run_id"]) != set(runs["run_id"]):
        return "its steps do not cover its runs"
    return ""


def check_parts(out: Path, expected: dict[str, dict]) -> list[tuple[str, str]]:
    """Validate every committed part of ``out`` against the sweep's runs ``expected``
    (run_id -> config fields) before any training: a part that cannot be kept (_part_defect) is
    moved, both files, to ``out/damaged/`` so that its runs are recomputed. Returns (part name,
    reason) of each part moved."""
    moved = []
    for runs_path in _committed_parts(out):
        why = _part_defect(runs_path, expected)
        if not why:
            continue
        dest = out / DAMAGED
        dest.mkdir(exist_ok=True)
        name = runs_path.name.replace(".runs.parquet", "")
        for f in (runs_path.with_name(f"{name}.steps.parquet"), runs_path):  # runs file last: the commit mark
            if f.exists():
                target = dest / f.name
                n = 1
                while target.exists():
                    target, n = dest / f"{f.name}.{n}", n + 1
                os.replace(f, target)
        moved.append((name, why))
    return moved


def open_results_dir(out: Path, spec: dict, run_rows: list[dict], resume: bool,
                     on_notice=None) -> set[str]:
    """Prepare ``out`` for a sweep; return the run_ids already committed (resume).

    A directory holding results needs ``resume``; resuming checks the fingerprint, so that a
    directory written by a different config refuses to continue, and validates every committed
    part (check_parts; the ones moved aside are reported through ``on_notice(line)``). A directory
    with parts but no manifest (one moved aside after damage) resumes the same way.
    """
    fp = fingerprint(spec, run_rows)
    manifest_path = out / MANIFEST
    notice = on_notice or (lambda line: None)
    if out.exists() and not out.is_dir():
        raise ResultsError(f"out: {out} exists and is not a directory")
    if (out / PARTS).exists() and not (out / PARTS).is_dir():
        raise ResultsError(f"out: {out / PARTS} is not a directory; move it aside, then rerun")
    has_parts = (out / PARTS).is_dir()
    if manifest_path.exists() or (resume and has_parts):
        if not resume:
            raise ResultsError(f"out: {out} already holds results; pass --resume to continue them "
                               "or choose another directory")
        extension_rows = []
        if manifest_path.exists():
            old = read_manifest(out)
            if old.get("fingerprint") != fp:
                raise ResultsError(f"resume: {out} was written by a different sweep config; "
                                   "rerun with the same options or choose another directory")
            extension_rows = [d for d in old.get("extension_runs") or [] if isinstance(d, dict) and "run_id" in d]
        _clear_stale_temp_files(out)
        expected = {r["run_id"]: r for r in (_with_ids(run_rows) + extension_rows)}
        expected = {k: {c: v for c, v in d.items() if c != "run_id"} for k, d in expected.items()}
        for name, why in check_parts(out, expected):
            notice(f"moved part {name} to {out / DAMAGED} ({why}); its runs will be recomputed")
        if not manifest_path.exists():
            write_manifest(out, spec, run_rows)
            notice(f"wrote a new {manifest_path} for the parts kept")
        return committed_run_ids(out)
    if out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise ResultsError(f"out: {out} exists and is not an empty results directory")
    if out.exists() and resume:
        _clear_stale_temp_files(out)  # a crash before the manifest landed
    check_writable(out)
    write_manifest(out, spec, run_rows)
    return set()


def _with_ids(run_rows: list[dict]) -> list[dict]:
    """Rows with their run_id (the manifest's run rows carry it; a plain config row gets it here)."""
    from sim.config import RunConfig

    return [r if "run_id" in r else {"run_id": RunConfig.from_flat_dict(r).run_id, **r} for r in run_rows]


def write_manifest(out: Path, spec: dict, run_rows: list[dict], **extra) -> None:
    """manifest.json (DESIGN.md §6): the resolved config of every run, the spec it came from, its
    fingerprint, the package and library versions, the git commit and the time; ``extra`` fields
    (e.g. kind="llm", world_size) are added. Every results directory, simulator or LLM, has one."""
    write_json({
        "package": "grpo-sim", "fingerprint": fingerprint(spec, run_rows),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(), "git_commit": _git_commit(),
        "versions": _versions(), "spec": spec, "runs": run_rows, **extra,
    }, out / MANIFEST)


def manifest_field(out: Path, name: str, default=None):
    """A field of ``out``'s manifest.json (``default`` when the file or the field is missing or unreadable)."""
    try:
        data = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return default
    return data.get(name, default) if isinstance(data, dict) else default


def _clear_stale_temp_files(out: Path) -> None:
    """Remove the temp files (.NAME.*.tmp) of writes that a crash cut short."""
    for stale in out.rglob(".*.tmp"):
        stale.unlink()


def _committed_parts(out: Path) -> list[Path]:
    return sorted((out / PARTS).glob("*.runs.parquet")) if (out / PARTS).exists() else []


def committed_run_ids(out: Path) -> set[str]:
    ids: set[str] = set()
    for p in _committed_parts(out):
        ids.update(_read_parquet(p, columns=["run_id"])["run_id"])
    return ids


def write_part(out: Path, runs: pd.DataFrame, steps: pd.DataFrame) -> None:
    """Commit one finished batch: steps file first, then the runs file that marks it done."""
    name = stable_id(sorted(runs["run_id"]), 16)
    write_parquet(steps, out / PARTS / f"{name}.steps.parquet")
    _failpoint("part-steps")
    write_parquet(runs, out / PARTS / f"{name}.runs.parquet")
    _failpoint("part-committed")


def read_parts(out: Path, with_steps: bool = True,
               cache: dict[Path, pd.DataFrame] | None = None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """All committed parts, sorted by run_id (and step): independent of batch order or sharding.
    ``with_steps`` False: the runs only (steps None). ``cache``: files already read, by path, filled
    here (a committed part never changes while one sweep runs: a tuned sweep reads its parts once per
    extension round, which read every file again each round)."""
    cache = {} if cache is None else cache

    def read(path: Path) -> pd.DataFrame:
        if path not in cache:
            cache[path] = _read_parquet(path)
        return cache[path]

    parts = _committed_parts(out)
    if not parts:
        raise ResultsError(f"{out}: no finished runs")
    runs = pd.concat([read(p) for p in parts], ignore_index=True).drop_duplicates("run_id")
    runs = runs.sort_values("run_id", kind="stable").reset_index(drop=True)
    if not with_steps:
        return runs, None
    steps = pd.concat([read(p.with_name(p.name.replace(".runs.", ".steps."))) for p in parts], ignore_index=True)
    steps = steps.drop_duplicates(["run_id", "step"])
    steps = steps[steps["run_id"].isin(runs["run_id"])]
    steps = steps.sort_values(["run_id", "step"], kind="stable").reset_index(drop=True)
    return runs, steps


def finalize(out: Path, runs: pd.DataFrame, steps: pd.DataFrame) -> None:
    """Write the consolidated steps.parquet, then runs.parquet (the completion marker)."""
    write_parquet(steps, out / STEPS)
    _failpoint("final-steps")
    write_parquet(runs, out / RUNS)


def _read_parquet(path: Path, columns=None) -> pd.DataFrame:
    """A results table, with the current names of renamed columns (LEGACY_COLUMNS)."""
    try:
        return pd.read_parquet(Path(path).absolute(), columns=columns).rename(columns=LEGACY_COLUMNS)
    except FileNotFoundError:
        raise ResultsError(f"missing results file {path}") from None
    except Exception as e:  # pyarrow raises several types for truncated/corrupt files
        raise ResultsError(f"{path}: unreadable or corrupt parquet file ({type(e).__name__})") from None


def load_results(path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, steps) DataFrames of a finished results directory (DESIGN.md §6); columns of older
    versions get their current names (LEGACY_COLUMNS)."""
    out = Path(path)
    if not out.is_dir():
        raise ResultsError(f"{out}: no such results directory")
    if not (out / MANIFEST).exists():
        raise ResultsError(f"{out}: not a results directory (no {MANIFEST})")
    if not (out / RUNS).exists():
        raise ResultsError(f"{out}: the sweep did not finish (no {RUNS}); rerun it with --resume")
    return _read_parquet(out / RUNS), _read_parquet(out / STEPS)
