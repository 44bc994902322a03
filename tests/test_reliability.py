"""Reliability (issue 15): bad or odd input to every command gives exit 2 and one line naming the
option or file, a run-time failure exit 1 and one line with the resume command, an interrupt
128 + signal with the resume command; no traceback, no new or changed files unless the command
succeeded; damaged results are repaired by --resume; no process outlives a sweep.

The named cases are the ones the issue lists; Hypothesis adds output directories, damaged results
and LLM data files (tests/test_fuzz_cli.py fuzzes options and config files)."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sim
from sim import results
from sim import sweep as S
from sim.cli import main
from helpers import run_cli

TINY = ["--num-prompts", "2", "--num-responses", "2", "--steps", "3", "--seeds", "1", "--log-points", "2"]


def cli(argv: list[str]) -> tuple[int, str, str]:
    """sim's main in this process: (exit code, stdout, stderr); a traceback escapes as an exception."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with (size, mtime_ns): what a refused command must leave alone."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def assert_refused(code: int, err: str, names: str | tuple[str, ...], before: dict, root: Path, want: int = 2):
    lines = err.strip().splitlines()
    assert code == want, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    names = (names,) if isinstance(names, str) else names
    assert any(n in lines[0] for n in names), (names, lines[0])
    assert snapshot(root) == before, "a refused command changed files"


# -- the named cases ---------------------------------------------------------------------

def _toml(body: str | bytes):
    def make(d):
        (d / "c.toml").write_bytes(body if isinstance(body, bytes) else body.encode())
        return ["sweep", "--num-prompts", "2", "--num-responses", "2", "--steps", "3", "--config", str(d / "c.toml"),
                "--out", str(d / "o")]
    return make


def _manifest(body: bytes):
    def make(d):
        (d / "o").mkdir()
        (d / "o" / "manifest.json").write_bytes(body)
        return ["sweep", *TINY, "--out", str(d / "o"), "--resume"]
    return make


def _data(body: bytes | None):
    def make(d):
        p = d / "data.jsonl"
        if body is None:
            p.mkdir()
        else:
            p.write_bytes(body)
        return ["llm", "train", "--model", str(TINY_MODEL), "--data", f"gsm8k:{p}", "--steps", "1",
                "--out", str(d / "o")]
    return make


NAMED = {
    "seeds = [true]": (_toml("[sweep]\nseeds = [true]\n"), "seeds"),
    "seeds = [0.5, 'a']": (_toml("[sweep]\nseeds = [0.5, \"a\"]\n"), "seeds"),
    "TOML date": (_toml("[sweep]\nsteps = 1979-05-27\n"), "steps"),
    "deeply nested TOML": (_toml("[sweep]\nsteps = " + "[" * 5000 + "]" * 5000 + "\n"), "config"),
    "group-size and group_size": (_toml("[sweep]\ngroup-size = 4\ngroup_size = 8\n"), "group-size"),
    "estimator and estimators": (_toml("[sweep]\nestimator = 'grpo'\nestimators = ['rloo']\n"), "estimator"),
    "keys above [sweep]": (_toml("steps = 5\n[sweep]\ngroup-size = 4\n"), "steps"),
    "unknown table": (_toml("[swep]\nsteps = 5\n"), "swep"),
    "config is a directory": (lambda d: ["sweep", "--config", str(d), "--out", str(d / "o")], "config"),
    "non-UTF-8 config": (_toml(b"steps = '\xff'\n"), "config"),
    "manifest []": (_manifest(b"[]"), "manifest.json"),
    "manifest null": (_manifest(b"null"), "manifest.json"),
    "manifest 1": (_manifest(b"1"), "manifest.json"),
    'manifest "x"': (_manifest(b'"x"'), "manifest.json"),
    "manifest NaN": (_manifest(b"NaN"), "manifest.json"),
    "manifest non-UTF-8": (_manifest(b"\xff\xfe\x00"), "manifest.json"),
    "--out ''": (lambda d: ["run", *TINY, "--out", ""], "out"),
    "--out ' '": (lambda d: ["sweep", *TINY, "--out", " "], "out"),
    "--out a regular file": (lambda d: (d / "f").write_text("x") and ["run", *TINY, "--out", str(d / "f")], "out"),
    "--out /dev/null": (lambda d: ["sweep", *TINY, "--out", "/dev/null"], "out"),
    "--out under a file": (lambda d: (d / "f").write_text("x") and ["run", *TINY, "--out", str(d / "f" / "x")],
                           "out"),
    "--out 256-byte name": (lambda d: ["run", *TINY, "--out", str(d / ("x" * 256))], "out"),
    "sim run --lr '0.5,1'": (lambda d: ["run", *TINY, "--lr", "0.5,1", "--out", str(d / "o")], "lr"),
    "parts is a file": (lambda d: _parts_file(d), "parts"),
    "features too large to hold": (lambda d: ["sweep", "--num-prompts", "64", "--num-responses", "4096", "--out",
                                              str(d / "o")], "num-responses"),
    "LLM data is a directory": (_data(None), "data"),
    "LLM data not UTF-8": (_data(b'{"question": "\xff"}\n'), "data"),
    "LLM data line too long": (_data(b'{"question": "' + b"a" * (2 << 20) + b'"}\n'), "data"),
    "LLM data not JSON": (_data(b"{\n"), "data"),
    "LLM model missing": (lambda d: ["llm", "train", "--model", str(d / "nope"), "--out", str(d / "o")], "model"),
    "LLM default model missing": (lambda d: ["llm", "train", "--model", "models/does-not-exist", "--out",
                                             str(d / "o")], "make-tiny"),
    "LLM hub model unreachable": (lambda d: ["llm", "compare", "--model", "some-org/some-model", "--out",
                                             str(d / "o")], "model"),
    "make-tiny --out a file": (lambda d: (d / "f").write_text("x") and ["llm", "make-tiny", "--out", str(d / "f")],
                               "out"),
}


def _parts_file(d: Path) -> list[str]:
    code, _, err = cli(["sweep", *TINY, "--out", str(d / "o")])
    assert code == 0, err
    shutil.rmtree(d / "o" / "parts")
    (d / "o" / "parts").write_text("not a directory")
    return ["sweep", *TINY, "--out", str(d / "o"), "--resume"]


TINY_MODEL: Path


@pytest.fixture(scope="module", autouse=True)
def tiny_model(tmp_path_factory):
    """A saved untrained tiny model (the LLM cases need one that loads, to reach the data)."""
    global TINY_MODEL
    from sim.llm import model as model_mod

    TINY_MODEL = tmp_path_factory.mktemp("model") / "tiny"
    tok = model_mod.char_tokenizer()
    model_mod.tiny_model(len(tok), "tiny", seed=0).save_pretrained(TINY_MODEL)
    tok.save_pretrained(TINY_MODEL)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is never reached from a test


@pytest.mark.parametrize("case", sorted(NAMED))
def test_named_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path):
    make, names = NAMED[case]
    argv = make(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = cli(argv)
    assert_refused(code, err, names, before, tmp_path)


def test_a_batch_larger_than_memory_is_refused_with_what_it_needs(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "machine_bytes", lambda: 8 * 2**30)
    before = snapshot(tmp_path)
    t0 = time.monotonic()
    code, _, err = cli(["sweep", "--num-prompts", "16", "--num-responses", "1024", "--out", str(tmp_path / "o")])
    assert time.monotonic() - t0 < 10  # before any problem is built
    assert_refused(code, err, "num-responses", before, tmp_path)
    # 5 seeds x 24 arrays x P K r float64 (sim.config.RUN_ARRAYS): 5 * 24 * 16 * 1024 * 1024 * 8 B = 15.0 GiB
    assert "needs about 15.0 GiB" in err and "8 GiB" in err


def test_out_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    code, _, err = cli(["run", *TINY, "--out", "~/res"])
    assert code == 0, err
    assert (tmp_path / "res" / "runs.parquet").exists() and not (tmp_path / "~").exists()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_results_files_get_the_permissions_of_the_umask(umask, tmp_path):
    """0666 less the umask, as open() gives (mkstemp alone would leave every file 0600)."""
    import os

    from sim import results

    old = os.umask(umask)
    try:
        results.write_json({"a": 1}, tmp_path / "x.json")
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~umask


# -- fuzz: output directories ------------------------------------------------------------------

out_parts = st.lists(st.sampled_from(["a", "file", "x" * 256, "", " ", "~", "..", ".", "é", "dir", "a b"]),
                     min_size=0, max_size=3)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(parts=out_parts, absolute=st.booleans())
def test_fuzz_output_directories(parts, absolute, tmp_path_factory):
    root = tmp_path_factory.mktemp("outs")
    (root / "file").write_text("x")
    (root / "dir").mkdir()
    text = "/".join(parts)
    out = str(root / text) if absolute else text
    before = snapshot(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        code, _, err = cli(["sweep", *TINY, "--estimators", "grpo", "--out", out])
    finally:
        os.chdir(cwd)
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 0:
        return
    assert_refused(code, err, "out", before, root)


def test_an_out_through_a_missing_directory_onto_a_file_leaves_nothing(tmp_path):
    """--out a/../file with ``file`` a file: POSIX resolves a/.. only once ``a`` exists, so the
    checks passed, mkdir made ``a`` and then failed on ``file``; the refused command left ``a``
    (found by test_fuzz_output_directories)."""
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code, _, err = cli(["sweep", *TINY, "--estimators", "grpo", "--out", "a/b/../../file"])
    finally:
        os.chdir(cwd)
    assert_refused(code, err, "out", before, tmp_path)


# -- damaged results on --resume -----------------------------------------------------------------

SWEEP = ["sweep", *TINY, "--orthogonality", "0.2,0.8", "--estimators", "reinforce,grpo"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished sweep of 4 runs in 2 parts, its results, and a part of another sweep."""
    root = tmp_path_factory.mktemp("finished")
    code, _, err = cli([*SWEEP, "--out", str(root / "ok")])
    assert code == 0, err
    code, _, err = cli(["sweep", *TINY, "--orthogonality", "0.5", "--out", str(root / "other")])
    assert code == 0, err
    return root, sim.load_results(root / "ok")


DAMAGE = ["truncate", "garbage", "delete_steps", "delete_runs", "drop_column", "foreign_part", "nan_final",
          "steps_of_other_part"]


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(damage=st.lists(st.sampled_from(DAMAGE), min_size=1, max_size=3), which=st.integers(0, 1),
       cut=st.floats(0.0, 0.95))
def test_fuzz_damaged_parts_are_moved_aside_and_recomputed(damage, which, cut, finished, tmp_path_factory):
    root, (runs0, steps0) = finished
    out = tmp_path_factory.mktemp("dmg") / "r"
    shutil.copytree(root / "ok", out)
    for f in (results.RUNS, results.STEPS):
        (out / f).unlink()  # an interrupted sweep: the parts only
    parts = sorted((out / "parts").glob("*.runs.parquet"))
    runs_p = parts[which % len(parts)]
    steps_p = runs_p.with_name(runs_p.name.replace(".runs.", ".steps."))
    for d in damage:
        target = runs_p if d != "delete_steps" else steps_p
        if d == "truncate" and runs_p.exists():
            data = runs_p.read_bytes()
            runs_p.write_bytes(data[: int(len(data) * cut)])
        elif d == "garbage" and runs_p.exists():
            runs_p.write_bytes(os.urandom(64))
        elif d in ("delete_steps", "delete_runs") and target.exists():
            target.unlink()
        elif d == "drop_column" and runs_p.exists():
            with contextlib.suppress(Exception):
                pd.read_parquet(runs_p).drop(columns=["final_J"]).to_parquet(runs_p)
        elif d == "nan_final" and runs_p.exists():
            with contextlib.suppress(Exception):
                df = pd.read_parquet(runs_p)
                df["final_J"] = float("nan")
                df.to_parquet(runs_p)
        elif d == "foreign_part":
            for f in (root / "other" / "parts").iterdir():
                shutil.copy(f, out / "parts" / f.name)
        elif d == "steps_of_other_part" and steps_p.exists():
            other = [p for p in sorted((out / "parts").glob("*.steps.parquet")) if p != steps_p]
            if other:
                shutil.copy(other[0], steps_p)
    code, stdout, err = cli([*SWEEP, "--out", str(out), "--resume"])
    assert code == 0, err
    runs, steps = sim.load_results(out)
    pd.testing.assert_frame_equal(runs.drop(columns=["engine"]), runs0.drop(columns=["engine"]))
    pd.testing.assert_frame_equal(steps, steps0)


def test_a_damaged_manifest_recovers_by_the_way_its_message_says(finished, tmp_path):
    root, (runs0, _) = finished
    out = tmp_path / "r"
    shutil.copytree(root / "ok", out)
    (out / "manifest.json").write_bytes(b"{truncated")
    before = snapshot(tmp_path)
    code, _, err = cli([*SWEEP, "--out", str(out), "--resume"])
    assert_refused(code, err, "manifest.json", before, tmp_path)
    assert "move it aside" in err
    (out / "manifest.json").rename(out / "manifest.json.bad")  # as the message says
    code, stdout, err = cli([*SWEEP, "--out", str(out), "--resume"])
    assert code == 0, err
    pd.testing.assert_frame_equal(sim.load_results(out)[0], runs0)


def test_full_disk_stops_with_one_line_and_resume_completes(finished, tmp_path, monkeypatch):
    root, (runs0, steps0) = finished
    real, calls = results.write_parquet, []

    def full_on_the_second_part(df, path):
        calls.append(path)
        if len(calls) == 3:  # the second part's steps file
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(df, path)

    monkeypatch.setattr(results, "write_parquet", full_on_the_second_part)
    out = tmp_path / "r"
    code, _, err = cli([*SWEEP, "--out", str(out)])
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "No space left on device" in lines[0], err
    assert "free space, then resume with: sim sweep" in lines[0] and "--resume" in lines[0]
    assert not list(out.rglob("*.tmp")), "a temp file was left behind"
    monkeypatch.setattr(results, "write_parquet", real)
    code, _, err = cli([*SWEEP, "--out", str(out), "--resume"])
    assert code == 0, err
    pd.testing.assert_frame_equal(sim.load_results(out)[0].drop(columns=["engine"]), runs0.drop(columns=["engine"]))


# -- the rest of the acceptance list -------------------------------------------------------------

def test_progress_is_a_line_per_batch_when_stdout_is_not_a_terminal(tmp_path):
    code, stdout, err = cli([*SWEEP, "--out", str(tmp_path / "r")])
    assert code == 0, err
    lines = [ln for ln in stdout.splitlines() if ln.endswith("runs committed")]
    # one line per batch, counting runs: the batches' cumulative sizes over the 4 runs
    from sim.cli import _parse_axes

    axes = _parse_axes({"num_prompts": "2", "num_responses": "2", "steps": "3", "log_points": "2",
                        "orthogonality": "0.2,0.8", "estimator": "reinforce,grpo"}, True)
    runs = S.expand(S.build_spec(axes, 1, None))
    sizes = sorted((len(b) for b in S.make_batches(list(runs))), reverse=True)
    cumulative = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    assert len(sizes) >= 2 and [ln.split()[1] for ln in lines] == [f"{c}/4" for c in cumulative]


def test_workers_are_capped_at_the_number_of_batches(tmp_path, monkeypatch):
    seen = []
    real = S._started_pool
    monkeypatch.setattr(S, "_started_pool", lambda n, *a: (seen.append(n), real(n, *a))[1])
    spec = S.SweepSpec.build({"num_prompts": [2], "num_responses": [2], "steps": [3],
                              "estimator": ["grpo", "reinforce"]}, seeds=1)
    S.run_sweep(spec, tmp_path / "r", workers=16)
    assert seen == [2]  # two batches (one per estimator): two workers, not 16


def test_unreachable_ray_address_is_one_line_and_writes_nothing(tmp_path):
    pytest.importorskip("ray")
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = snapshot(tmp_path)
    t0 = time.monotonic()
    code, _, err = cli([*SWEEP, "--backend", "ray", "--address", f"127.0.0.1:{port}", "--out", str(tmp_path / "r")])
    assert time.monotonic() - t0 < S.RAY_CONNECT_TIMEOUT + 30
    assert_refused(code, err, "address", before, tmp_path, want=1)


def test_divergence_is_said_out_loud(tmp_path):
    # lr 1000 is far above the theory step (1 / (L + ...) ~ 1 on this problem): every run unsafe
    code, stdout, err = cli(["run", *TINY, "--lr", "1000", "--out", str(tmp_path / "r")])
    assert code == 0, err
    runs, _ = sim.load_results(tmp_path / "r")
    unsafe = int((~runs["step_size_ok"].astype(bool)).sum())
    assert unsafe == len(runs) > 0
    assert f"{unsafe} of {len(runs)} ran above the safe step size" in " ".join(stdout.split())


def test_m_diameter_from_the_gram_matrix_equals_the_whole_difference_array():
    import torch

    from theory import curvature

    for shape in ((3, 37, 5), (2, 300, 40)):
        phi = torch.randn(*shape, dtype=torch.float64)
        diff = phi.unsqueeze(-2) - phi.unsqueeze(-3)  # the [P, K, K, D] array m_diameter avoids
        whole = (diff * diff).sum(-1).amax((-2, -1))
        # expansion rounding: a few ulps of ||phi||^2 (max over y of ||phi_y||^2 bounds it)
        scale = (phi * phi).sum(-1).amax(-1)
        assert ((curvature.m_diameter(phi) - whole).abs() <= 1e-13 * scale).all()
    onehot = torch.eye(6, dtype=torch.float64).expand(4, 6, 6)  # tabular: diam^2 = 2 exactly
    assert (curvature.m_diameter(onehot) == 2.0).all()


# -- interrupts and killed processes (subprocesses) -------------------------------------------------

# 4 shapes: 4 batches (runs of one shape train together) on 2 workers, so that work is left when the
# first part lands
#: A sweep that runs for seconds after its workers are up: 8 batches of about 1 s each, of which the
#: sweep process trains the cheapest 1-3 itself while its workers start (sim.sweep.run_sweep)
LONG = ["sweep", "--num-prompts", "48,56,64,72", "--num-responses", "16", "--steps", "50000", "--seeds", "2",
        "--estimators", "reinforce,grpo", "--workers", "2"]


def _start(out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "sim.cli", *LONG, "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)


def _wait_for_a_part(out: Path, p: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not list((out / "parts").glob("*.runs.parquet")) if (out / "parts").exists() else True:
        assert p.poll() is None, p.communicate()
        assert time.monotonic() - t0 < timeout, "no part committed"
        time.sleep(0.1)


def _session_left(sid: int, wait: float = 10) -> list[str]:
    """Processes still in session ``sid`` after up to ``wait`` seconds."""
    t0 = time.monotonic()
    while True:
        left = subprocess.run(["pgrep", "-s", str(sid)], capture_output=True, text=True).stdout.split()
        if not left or time.monotonic() - t0 > wait:
            return left
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_cleanly_with_the_resume_command(sig, tmp_path, capsys):
    out = tmp_path / "r"
    p = _start(out)
    _wait_for_a_part(out, p)
    if sig == signal.SIGINT:
        os.killpg(p.pid, sig)  # Ctrl-C reaches the whole foreground group
    else:
        p.send_signal(sig)
    stdout, err = p.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert p.returncode == 128 + sig, err
    assert len(lines) == 1 and lines[0].startswith(f"interrupted ({sig.name})") and "Traceback" not in err, err
    assert _session_left(p.pid) == []
    resume = lines[0].split("resume with: ", 1)[1]
    assert resume.startswith("sim sweep ") and resume.endswith(f"--out {out} --resume")
    if sig != signal.SIGINT:
        return  # the resume itself is run once, after Ctrl-C
    code, _, err = run_cli(resume.split()[1:], capsys)  # in-process (the interpreter's start-up costs seconds)
    assert code == 0, err
    runs, _ = sim.load_results(out)
    assert len(runs) == 16 and runs["run_id"].is_unique  # 4 x 2 x 2: none lost, none twice


def test_no_process_outlives_a_sweep_killed_with_sigkill(tmp_path):
    out = tmp_path / "r"
    p = _start(out)
    _wait_for_a_part(out, p)
    p.kill()
    p.wait(timeout=30)
    assert _session_left(p.pid) == []  # workers, fork server and resource tracker gone


def _workers_of(p: subprocess.Popen) -> list[str]:
    """The pids of the sweep ``p``'s pool workers (the fork server's children)."""
    kids = subprocess.run(["pgrep", "-s", str(p.pid), "-f", "forkserver"], capture_output=True,
                          text=True).stdout.split()
    return [w for k in kids for w in subprocess.run(["pgrep", "-P", k], capture_output=True,
                                                    text=True).stdout.split()]


def test_a_killed_worker_is_one_line_with_the_resume_command(tmp_path):
    out = tmp_path / "r"
    p = _start(out)
    _wait_for_a_part(out, p)  # (the sweep process's own: it trains while its workers start)
    t0 = time.monotonic()
    while len(workers := _workers_of(p)) < 2 and time.monotonic() - t0 < 60:
        assert p.poll() is None, p.communicate()
        time.sleep(0.1)
    assert workers, "no worker found"
    time.sleep(0.5)  # each has a batch of about a second (LONG)
    for w in workers:  # every worker: one of them holds a batch that is not committed
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(w), signal.SIGKILL)
    stdout, err = p.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, err
    assert "a worker process died (killed by SIGKILL)" in lines[0] and "resume with: sim sweep" in lines[0], err
    assert _session_left(p.pid) == []


@pytest.mark.parametrize("delay,sig", [(0.3, signal.SIGINT), (1.0, signal.SIGINT), (1.8, signal.SIGINT),
                                       (2.5, signal.SIGINT), (3.5, signal.SIGINT), (1.0, signal.SIGTERM),
                                       (2.5, signal.SIGTERM)])
def test_ctrl_c_at_any_moment_of_start_up_is_one_line(delay, sig, tmp_path):
    """SIGINT/SIGTERM to the process group while the console script imports torch and pandas,
    parses, loads the kernels or starts the workers: exit 128 + signal and one line, never a
    traceback, from the sweep or its fork server (sim.entry holds the signals until the sweep's
    workers are up, sim._interrupts; they were lost in LLVM's callbacks or ended the process by
    SIGINT with nothing said, and the fork server printed its own traceback)."""
    p = subprocess.Popen([sys.executable, "-m", "sim.entry", *LONG, "--out", str(tmp_path / "r")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    time.sleep(delay)
    os.killpg(p.pid, sig)
    _, err = p.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert p.returncode == 128 + sig and len(lines) == 1 and lines[0].startswith("interrupted"), err
    assert _session_left(p.pid) == []


SHORT = ["sweep", "--num-prompts", "6,7", "--num-responses", "8", "--steps", "300", "--seeds", "2",
         "--estimators", "reinforce,grpo", "--workers", "2"]


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05, 0.1, 0.2, 0.4])
def test_ctrl_c_as_the_sweep_ends_is_one_line_or_nothing(delay, tmp_path):
    """SIGINT to the process group ``delay`` s after the last batch is committed (the pool shutting
    down, the results finalized, the summary printed, the interpreter exiting): either exit 130 with
    one line saying every run is committed, or, once the command has ended, exit 0 with nothing on
    stderr. Before, it ended by SIGINT with nothing said (exit -2: the interpreter's exit restores
    the default handler), or printed "Exception ignored ... KeyboardInterrupt" (raised in a weakref
    callback of the pool's shutdown, swallowed) and went on."""
    out = tmp_path / "r"
    p = subprocess.Popen([sys.executable, "-m", "sim.entry", *SHORT, "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in p.stdout:  # a pipe: a line per committed batch, "HH:MM:SS done/total runs committed"
        if line.split()[1:2] == ["8/8"]:
            break
    time.sleep(delay)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert (p.returncode == 0 and lines == []) or (
        p.returncode == 130 and len(lines) == 1 and lines[0].startswith("interrupted (SIGINT); 8 of 8 runs")), err
    assert _session_left(p.pid) == []


#: Runs ``sim <argv>`` as the console script does, and prints one line per finalizer (a ``__del__``,
#: a weakref callback: WeakSet's ``_remove``, WeakValueDictionary's ``remove``, ``finalize``) that
#: ran in the main thread while SIGINT was neither held (sim._interrupts) nor ignored: a
#: KeyboardInterrupt raised there is swallowed ("Exception ignored in ...") and the command goes on.
_UNHELD_FINALIZERS = """
import signal, sys
def unheld(frame, event, arg):
    code = frame.f_code
    if event != 'call' or not (code.co_name == '__del__' or (
            'weakref' in code.co_filename and code.co_name in ('remove', '_remove', '__call__'))):
        return
    handler = signal.getsignal(signal.SIGINT)
    hold = getattr(handler, '__self__', None)
    if handler != signal.SIG_IGN and not (type(hold).__name__ == 'Hold' and not hold.released):
        where = frame.f_back
        print(f'UNHELD {code.co_filename}:{code.co_name} from {where.f_code.co_filename}:{where.f_lineno}',
              file=sys.stderr)
if __name__ == '__main__':
    sys.argv = ['sim', *sys.argv[1:]]
    sys.setprofile(unheld)  # this thread only: signals are the main thread's
    from sim.entry import main
    main()
"""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_no_finalizer_of_a_sweep_runs_where_ctrl_c_would_be_swallowed(workers, tmp_path):
    """Every finalizer the sweep command runs in its main thread, from the first import to the exit,
    runs with SIGINT held or ignored. Before, the workers' Process objects left
    multiprocessing.process._dangling (a WeakSet) as run_sweep returned, a ParquetWriter's __del__
    ran in each commit and in the summary, importlib.metadata's zip files and git's subprocess in
    the manifest, all unheld: a Ctrl-C at that moment was printed as "Exception ignored ...
    KeyboardInterrupt" and the sweep went on (test_ctrl_c_as_the_sweep_ends_is_one_line_or_nothing
    failed so in a fresh-clone CI run)."""
    argv = [*SHORT[:-1], workers, "--steps", "50", "--out", str(tmp_path / "r")]
    out = subprocess.run([sys.executable, "-c", _UNHELD_FINALIZERS, *argv], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert [ln for ln in out.stderr.splitlines() if ln.startswith("UNHELD")] == [], out.stderr


@pytest.mark.parametrize("argv,wanted", [
    (["sweep", "--workers", "2", "--engine", "torch"], True),
    (["run", "--workers=3", "--engine", "torch"], True),
    (["sweep", "--workers", "1", "--engine", "torch"], False),
    (["sweep", "--engine", "torch"], False),  # the default: one worker
    (["sweep", "--workers", "2", "--workers", "1", "--engine", "torch"], False),  # the last one counts
    (["sweep", "--workers", "2", "--backend", "ray", "--engine", "torch"], False),
    (["sweep", "--workers", "two", "--engine", "torch"], False),  # refused later, by the command
    (["sweep", "--workers", "\u0662", "--engine", "torch"], False),  # a non-ASCII digit
    (["figures", "--workers", "2", "--engine", "torch"], False),
    ([], False),
])
def test_which_command_lines_start_the_fork_server_before_their_imports(argv, wanted):
    """sim._fork_server.wanted_by, read by sim.entry before the command line's imports."""
    from sim import _fork_server

    assert _fork_server.wanted_by(argv) is wanted


def test_a_sweep_with_workers_starts_its_fork_server_before_importing_torch(tmp_path):
    """sim.entry starts the fork server first, so that its imports (about 2.7 s) run beside the
    command line's own; before, it started once the sweep had imported torch, pandas and numba."""
    code = ("import importlib.abc, sys\n"
            "class Spy(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'torch':\n"
            "            from multiprocessing import forkserver\n"
            "            print('fork server up', forkserver._forkserver._forkserver_pid is not None)\n"
            "            sys.meta_path.remove(self)\n"
            "if __name__ == '__main__':\n"
            "    sys.meta_path.insert(0, Spy())\n"
            "    sys.argv = ['sim', *sys.argv[1:]]\n"
            "    from sim.entry import main\n"
            "    main()\n")
    out = subprocess.run([sys.executable, "-c", code, "sweep", "--num-prompts", "3", "--steps", "20", "--seeds", "2",
                          "--estimators", "reinforce,grpo", "--workers", "2", "--engine", "torch",
                          "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "fork server up True", out.stdout


def test_the_fork_server_ignores_ctrl_c_from_its_first_instruction():
    """sim.sweep._start_fork_server: the fork server starts with SIGINT blocked (a SIGINT in its first
    ~100 ms, before sim._forkserver_guard ran, printed a KeyboardInterrupt traceback or "Fatal Python
    error" from it: CI failed on it), the guard then ignores and unblocks it, and a Ctrl-C to the
    sweep process while the fork server is spawned still reaches the sweep's handler."""
    code = ("import os, signal, time\n"
            "from multiprocessing import forkserver\n"
            "from sim import sweep\n"
            "def sig(pid, field):\n"
            "    line = [ln for ln in open(f'/proc/{pid}/status') if ln.startswith(field)][0]\n"
            "    return int(line.split()[1], 16) >> (signal.SIGINT - 1) & 1\n"
            "if __name__ == '__main__':\n"
            "    got = []\n"
            "    signal.signal(signal.SIGINT, lambda s, f: got.append(s))\n"
            "    real = forkserver.ensure_running\n"
            "    def ensure_running():  # a Ctrl-C to this process while the fork server starts\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "        real()\n"
            "    forkserver.ensure_running = ensure_running\n"
            "    sweep._start_fork_server()\n"
            "    pid = forkserver._forkserver._forkserver_pid\n"
            "    at_birth = sig(pid, 'SigBlk')\n"
            "    for delay in (0.01, 0.02, 0.03, 0.05, 0.1):\n"
            "        time.sleep(delay)\n"
            "        os.kill(pid, signal.SIGINT)\n"
            "    time.sleep(1.0)\n"
            "    print(at_birth, sig(pid, 'SigBlk'), sig(pid, 'SigIgn'), got == [signal.SIGINT])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # blocked at birth; after the guard: unblocked and ignored; the sweep's own Ctrl-C not lost
    assert out.returncode == 0 and out.stdout.split() == ["1", "0", "1", "True"], (out.stdout, out.stderr)
    assert "KeyboardInterrupt" not in out.stderr and "Fatal Python error" not in out.stderr, out.stderr


def test_held_interrupts_take_effect_at_release_for_the_handler_then_in_place():
    """sim._interrupts: a SIGINT during a hold raises KeyboardInterrupt only at release; a SIGTERM
    recorded by an outer hold reaches the handler installed after it (the CLI's SIGTERM-as-
    interrupt), and that handler is not replaced by the outer hold's release."""
    from sim import _interrupts

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with _interrupts.held():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # delivered and recorded, not raised
        with pytest.raises(KeyboardInterrupt):
            _interrupts.release()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before

    seen = []
    _interrupts.hold()  # as sim.entry
    outer_recorder = signal.getsignal(signal.SIGTERM)
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))  # as cli._sigterm_as_interrupt
    try:
        with _interrupts.held():  # as sim.sweep.run_sweep
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert seen == []
            _interrupts.release()  # every hold
            time.sleep(0.05)
        assert seen == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, outer_recorder)  # the later handler stays
    finally:
        signal.signal(signal.SIGTERM, previous)
    # the outer recorder, put back by the later handler's clean-up, acts as what it replaced
    assert signal.getsignal(signal.SIGTERM) == outer_recorder
    signal.signal(signal.SIGTERM, before[1])
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_broken_pool_names_the_most_telling_death():
    # a worker killed at the same moment as another can get exit code 255 from multiprocessing (the
    # fork server could not report it): the other's SIGKILL is what the line should say (CI once
    # said "exit code 255" for a worker this file had killed)
    import types

    def deaths(*codes):
        pool = types.SimpleNamespace(_processes=None)
        return S._death_of(pool, {i: types.SimpleNamespace(exitcode=c) for i, c in enumerate(codes)})

    assert deaths(S.UNREPORTED_EXIT, -signal.SIGKILL) == "killed by SIGKILL"
    assert deaths(S.UNREPORTED_EXIT, 1) == "exit code 1"
    assert deaths(S.UNREPORTED_EXIT, -signal.SIGTERM) == "exit code 255"  # SIGTERM: the pool's own, to survivors
    assert deaths(-signal.SIGTERM, None, 0) == "unknown cause"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="no /proc/self/status here")
def test_reading_the_umask_never_sets_it_where_proc_tells_it(monkeypatch):
    """Where /proc/self/status gives the umask, it is read, not set to 0 and back: a thread starting
    a worker meanwhile (the sweep's pool start) would hand it umask 0 for that instant."""
    from sim import results

    old = os.umask(0o027)
    try:
        def no_set(mask):
            raise AssertionError(f"os.umask({mask:o}) called")

        monkeypatch.setattr(os, "umask", no_set)
        assert results._umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(old)


def _exit_code_of_a_fork(child) -> int:
    """Run ``child()`` in a fork of this process; its exit code (0 when it returns)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            child()
        finally:
            os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_worker_whose_fork_server_died_before_it_ran_ends(monkeypatch):
    """A worker compares its parent with the fork server's pid recorded before the fork, not with the
    parent it sees when it starts: one forked in the instant before its fork server was killed has
    init (or a subreaper) as its parent by then, and would otherwise outlive the sweep."""
    import types

    from sim import sweep
    from sim._parent_death import die_with_parent

    me = os.getpid()  # (read here: in the child's lambda it would be the child's)
    assert _exit_code_of_a_fork(lambda: die_with_parent(me)) == 0  # its parent is this process
    assert _exit_code_of_a_fork(lambda: die_with_parent(me + 10**6)) == 1  # not the one it had
    # in a fork of the fork server: the guard's SERVER_PID is the parent it must have
    monkeypatch.setitem(sys.modules, "sim._forkserver_guard", types.SimpleNamespace(SERVER_PID=me + 10**6))
    assert _exit_code_of_a_fork(sweep._die_with_parent) == 1
    monkeypatch.setitem(sys.modules, "sim._forkserver_guard", types.SimpleNamespace(SERVER_PID=me))
    assert _exit_code_of_a_fork(sweep._die_with_parent) == 0


def test_a_fork_server_whose_sweep_died_before_its_guard_ran_ends():
    """The fork server's guard compares its parent with the sweep's pid that start_fork_server put in
    its environment, not with the parent it sees: a sweep killed in the fork server's first ~100 ms
    left it to init, and it then went on to import the engine and ended 2-3 s later."""
    import subprocess

    from sim._fork_server import SWEEP_PID_VAR

    def guard(env_pid):
        env = {k: v for k, v in os.environ.items() if k != SWEEP_PID_VAR}
        if env_pid is not None:
            env[SWEEP_PID_VAR] = str(env_pid)
        return subprocess.run([sys.executable, "-c", "import sim._forkserver_guard"], env=env, timeout=60).returncode

    me = os.getpid()  # the subprocess's parent
    assert guard(me) == 0
    assert guard(me + 10**6) == 1  # not the parent the sweep said it would have: gone
    assert guard(None) == 0  # no pid given: its parent now
