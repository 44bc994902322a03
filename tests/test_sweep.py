"""Sweep expansion, lr rules, selection, speedup with censoring, kill-and-resume."""

import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import json

import pandas as pd
import pytest

import sim
from sim import analysis as A
from sim import sweep as S
from sim.problems import ProblemConfig
from helpers import run_cli


def test_expand_grid_ids_and_theory_lr():
    spec = S.SweepSpec.build({"orthogonality": [0.2, 0.8], "estimator": ["reinforce", "grpo"],
                              "reward_scale_spread": [4.0], "kind": ["tabular"]}, seeds=3, lr="theory")
    runs = S.expand(spec)
    assert len(runs) == 2 * 2 * 3
    assert len({r.run_id for r in runs}) == len(runs)
    assert [r.run_id for r in runs] == [r.run_id for r in S.expand(spec)]  # stable
    P = ProblemConfig().num_prompts
    for r in runs:
        # tabular: diam^2 = ||e_y - e_y'||^2 = o * 2 + (1 - o) * 2 = 2 and two-valued rewards: M = diam^2/4
        # = 1/2; sigma_bound = c_max / 2 = 2 -> GRPO P/M = 2P, REINFORCE P/(M sigma_bound) = P
        expected = 2 * P if r.train.estimator == "grpo" else P
        assert r.train.lr == pytest.approx(expected) and r.train.lr_rule == "theory"
    tuned = S.expand(S.SweepSpec.build({"estimator": ["grpo"], "kind": ["tabular"]}, seeds=1, lr="tuned"))
    assert sorted(r.train.lr for r in tuned) == pytest.approx([2 * P * 2.0**j for j in range(-1, 5)])  # theory lr 2P


def fake_runs(rows):
    """Minimal runs table for add_comparisons: one cell (orthogonality 0.5)."""
    df = pd.DataFrame(rows, columns=["estimator", "lr", "seed", "steps_to_target", "reached_target", "auc"])
    df["orthogonality"] = 0.5
    df["steps"] = 100
    df["run_id"] = [f"r{i:03d}" for i in range(len(df))]
    df["final_J"] = 1.0
    df["j_star"] = 1.0
    df["predicted_gain"] = 1.0
    df["conditions_ok"] = True
    return df


def test_selection_and_speedup_with_censoring():
    runs = fake_runs([
        # REINFORCE: lr 1 (median 80) beats lr 2 (never reaches -> 101)
        ("reinforce", 1.0, 0, 80, True, 0.5), ("reinforce", 1.0, 1, 90, True, 0.5), ("reinforce", 1.0, 2, 100, False, 0.4),
        ("reinforce", 2.0, 0, 100, False, 0.3), ("reinforce", 2.0, 1, 100, False, 0.3), ("reinforce", 2.0, 2, 100, False, 0.3),
        # GRPO: lr 4 and lr 8 tie on median 20 -> higher AUC (lr 8) wins
        ("grpo", 4.0, 0, 20, True, 0.6), ("grpo", 4.0, 1, 20, True, 0.6), ("grpo", 4.0, 2, 30, True, 0.6),
        ("grpo", 8.0, 0, 20, True, 0.7), ("grpo", 8.0, 1, 20, True, 0.7), ("grpo", 8.0, 2, 100, False, 0.7),
    ])
    out = A.add_comparisons(runs)
    sel = out[out.selected].set_index(["estimator", "seed"])
    assert set(out[out.selected & (out.estimator == "reinforce")].lr) == {1.0}
    assert set(out[out.selected & (out.estimator == "grpo")].lr) == {8.0}
    # speedups: seed 0: 80/20; seed 1: 90/20; seed 2: REINFORCE censored (100) / GRPO censored (100)
    assert sel.loc[("grpo", 0), "speedup"] == 4.0 and sel.loc[("grpo", 0), "speedup_censored"] == ""
    assert sel.loc[("grpo", 1), "speedup"] == 4.5
    assert sel.loc[("grpo", 2), "speedup_censored"] == "both"
    assert sel.loc[("reinforce", 2), "speedup"] == 1.0
    assert (out[~out.selected].speedup_censored == "not-selected").all()
    table = A.summarize(out).set_index("estimator")
    # geometric mean of (4, 4.5, 1)
    assert table.loc["grpo", "speedup"] == pytest.approx((4 * 4.5 * 1) ** (1 / 3))
    assert table.loc["grpo", "speedup_lo"] < table.loc["grpo", "speedup"] < table.loc["grpo", "speedup_hi"]


def test_lr_edges_are_found_and_marked():
    rows = [("grpo", lr, seed, steps, True, 0.5) for lr, steps in ((1.0, 50), (2.0, 40), (4.0, 30)) for seed in (0, 1)]
    rows += [("reinforce", lr, seed, steps, True, 0.5) for lr, steps in ((1.0, 60), (2.0, 70), (4.0, 80))
             for seed in (0, 1)]
    runs = fake_runs(rows)
    runs["lr_rule"] = "tuned"
    edges = A.lr_edges(runs).set_index("estimator")
    assert edges.loc["grpo", "edge"] == "top" and edges.loc["grpo", "lr"] == 4.0       # fastest at the largest lr
    assert edges.loc["reinforce", "edge"] == "bottom" and edges.loc["reinforce", "lr"] == 1.0
    out = A.add_comparisons(runs)
    assert set(out[out.selected].groupby("estimator").lr_edge.first().items()) == {("grpo", "top"),
                                                                                   ("reinforce", "bottom")}
    assert (out[~out.selected].lr_edge == "").all()
    runs.loc[runs.lr == 4.0, "steps_to_target"] = 45  # now lr 2 is best for GRPO: interior, not an edge
    assert "grpo" not in set(A.lr_edges(runs).estimator)
    runs["lr_rule"] = "theory"  # a theory or fixed rate has no grid to be at the edge of
    assert A.lr_edges(runs).empty


def test_tuned_sweep_extends_its_grid_until_the_choice_is_interior(tmp_path):
    """A tiny tuned sweep whose best rates lie beyond the initial grid: the sweep adds rates a factor 2
    further until each choice is interior or MAX_LR_EXTENSIONS rounds ran, lists them in the
    manifest, and a --resume of the finished directory reproduces it."""
    spec = S.SweepSpec.build({"estimator": ["reinforce", "grpo"], "num_prompts": [2], "num_responses": [3],
                              "steps": [60], "mode": ["exact"], "orthogonality": [1.0]}, seeds=1, lr="tuned")
    runs, _ = S.run_sweep(spec, tmp_path / "r")
    grid = len(S.TUNED_FACTORS)
    tried = runs.groupby("estimator").lr.nunique()
    assert (tried > grid).any()  # exact mode at 60 steps: the fastest safe rate lies above 16 x theory
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert len(manifest["extension_runs"]) == len(runs) - len(manifest["runs"])
    sel = runs[runs.selected]
    for est, g in runs.groupby("estimator"):
        edge = sel[sel.estimator == est].lr_edge.iloc[0]
        chosen = sel[sel.estimator == est].lr.iloc[0]
        assert edge == ("top" if chosen == g.lr.max() else "bottom" if chosen == g.lr.min() else "")
        assert edge == "" or g.lr.nunique() == grid + S.MAX_LR_EXTENSIONS
    again, _ = S.run_sweep(spec, tmp_path / "r", resume=True)
    pd.testing.assert_frame_equal(again, runs)


def test_a_tuned_sweep_killed_inside_a_grid_extension_resumes_to_the_uninterrupted_result(tmp_path):
    """One run per part (max_batch 1), killed right after the first extension run is committed: its
    other seed is still missing. The resume runs the extension runs the manifest lists before it
    proposes new ones, so it ends with exactly the uninterrupted results."""
    axes = {"estimator": ["reinforce", "grpo"], "num_prompts": [2], "num_responses": [3], "steps": [60],
            "mode": ["exact"], "orthogonality": [1.0], "log_points": [2]}  # 2: less per-part diagnostics time
    initial = 2 * len(S.TUNED_FACTORS) * 2  # estimators x grid x seeds, one part each
    code = ("import sys; from pathlib import Path; from sim import sweep as S\n"
            f"S.run_sweep(S.SweepSpec.build({axes!r}, seeds=2, lr='tuned'), Path(sys.argv[1]), max_batch=1)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRPO_SIM_FAULT": f"part-committed:{initial + 1}"}
    out = tmp_path / "killed"
    crashed = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env)
    assert crashed.returncode == 137, crashed.stderr
    assert len(json.loads((out / "manifest.json").read_text())["extension_runs"]) >= 2
    spec = S.SweepSpec.build(axes, seeds=2, lr="tuned")
    resumed, _ = S.run_sweep(spec, out, resume=True, max_batch=1)
    full, _ = S.run_sweep(spec, tmp_path / "full", max_batch=1)
    pd.testing.assert_frame_equal(resumed, full)


def test_geometric_ci_closed_form():
    # logs of (e, e^3): mean 2, sd sqrt(2), n 2 -> half width t_{.975,1} * sqrt(2)/sqrt(2) = 12.706
    m, lo, hi = A.geometric_ci(np.array([math.e, math.e**3]))
    assert m == pytest.approx(math.e**2)
    assert math.log(hi) - 2 == pytest.approx(12.7062047, rel=1e-6)
    assert A.geometric_ci(np.array([2.0])) == (2.0, 2.0, 2.0)


RESUME_ARGS = ["sweep", "--num-prompts", "3,4,5,6", "--num-responses", "4", "--estimators", "reinforce,grpo,rloo",
               "--steps", "1500", "--seeds", "2", "--orthogonality", "0.5"]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, capsys):
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sim.cli", *RESUME_ARGS, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    parts = killed / "parts"
    while time.time() < deadline and not (parts.exists() and list(parts.glob("*.runs.parquet"))):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_parts = len(list(parts.glob("*.runs.parquet")))
    assert 1 <= n_parts < 12, "the kill must land mid-sweep (12 batches)"
    assert not (killed / "runs.parquet").exists()
    with pytest.raises(ValueError, match="did not finish"):
        sim.load_results(killed)

    code, _, err = run_cli([*RESUME_ARGS, "--out", str(killed), "--resume"], capsys)  # in-process: no start-up
    assert code == 0, err
    full = tmp_path / "full"
    S.run_sweep(S.SweepSpec.build({"num_prompts": [3, 4, 5, 6], "num_responses": [4], "orthogonality": [0.5],
                                   "estimator": ["reinforce", "grpo", "rloo"], "steps": [1500]}, seeds=2),
                full)
    a_runs, a_steps = sim.load_results(killed)
    b_runs, b_steps = sim.load_results(full)
    assert len(a_runs) == 4 * 3 * 2
    pd.testing.assert_frame_equal(a_runs, b_runs)
    pd.testing.assert_frame_equal(a_steps, b_steps)


def test_a_local_worker_commits_its_batch_and_replies_in_one_atomic_pipe_write(tmp_path):
    """A local worker writes its part itself and replies with a few bytes: a pipe write of at most
    PIPE_BUF (4096) bytes is atomic, so a worker killed at any moment cannot leave half a reply in
    the pool's result pipe (a batch's frames, sent back whole, could; the pool's manager thread then
    waited for the rest forever and an interrupted sweep hung at exit). The worker's part holds
    exactly what train_batch makes."""
    import pickle
    from concurrent.futures.process import _ResultItem

    from sim import results
    from sim.engine import train_batch

    spec = S.SweepSpec.build({"num_prompts": [4], "num_responses": [3], "estimator": ["grpo"], "steps": [200]},
                            seeds=3)
    runs = S.expand(spec)
    results.open_results_dir(tmp_path, spec.as_dict(), [r.as_flat_dict() for r in runs], False)
    import torch

    from sim import kernels

    threads = torch.get_num_threads(), kernels.get_threads()  # a worker's function sets them to 1
    try:
        reply = S._commit_batch_in_worker(str(tmp_path), [r.as_flat_dict() for r in runs], "cpu", "torch")
    finally:
        torch.set_num_threads(threads[0])
        kernels.set_threads(threads[1])
    sent = pickle.dumps(_ResultItem(2**40, result=reply))  # what the pool sends: a work id and the reply
    assert reply == 3 and len(sent) + 8 <= S.REPLY_BYTES  # + the connection's length header
    direct = train_batch(runs, engine="torch")
    assert len(pickle.dumps((direct.runs, direct.steps))) > S.REPLY_BYTES  # what the reply used to be
    got_runs, got_steps = results.read_parts(tmp_path)
    pd.testing.assert_frame_equal(got_runs, direct.runs.sort_values("run_id").reset_index(drop=True))
    pd.testing.assert_frame_equal(got_steps, direct.steps.sort_values(["run_id", "step"]).reset_index(drop=True))


def test_workers_start_with_the_kernels_their_fork_server_loaded():
    """sim._worker_preload: the fork server loads the cached kernels once and each worker, its fork,
    starts with them (a worker loading them itself costs ~0.7 s). In a fresh interpreter: this
    process's fork server may have started before the kernels were cached."""
    pytest.importorskip("numba")
    loaded = ("(len(__import__('sim.kernels').kernels.advance.overloads), "
              "len(__import__('sim.kernels').kernels.gain_changes.overloads))")  # evaluated in the worker
    code = ("from concurrent.futures import ProcessPoolExecutor\n"
            "from sim import kernels, sweep\n"
            "if __name__ == '__main__':\n"
            "    kernels.warm_up()  # compiled into the cache if it is not there yet\n"
            "    sweep._start_fork_server()\n"
            "    with ProcessPoolExecutor(1, mp_context=sweep.worker_context()) as pool:\n"
            f"        print(*pool.submit(eval, {loaded!r}).result())\n")
    from sim import kernels

    kernels.warm_up()
    if not kernels.is_cached():
        pytest.skip("the numba cache is not writable here: nothing for the fork server to load")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    n_advance, n_gain = map(int, out.stdout.split())
    assert n_advance >= 1 and n_gain >= 1, out.stdout  # 0 0 when the worker would load them itself


def test_with_workers_each_part_is_written_by_the_process_that_trained_it(tmp_path, monkeypatch):
    """run_all with a pool: the workers commit their parts, and the sweep process writes only those
    of the batches it trained itself while the workers started (sim.sweep.run_sweep); the same
    numbers as one process. A sweep process that wrote a worker's part, or a worker that sent its
    frames back for it, fails here."""
    from sim import results

    spec = S.SweepSpec.build({"num_prompts": [3, 4], "num_responses": [3], "estimator": ["reinforce", "grpo"],
                              "steps": [40]}, seeds=2)
    one = S.run_sweep(spec, tmp_path / "one", workers=1)
    trained_here, written_here = [], []
    real_train, real_write = S.train_batch, results.write_part
    # in this process only: the workers fork from the fork server, which has neither patch
    monkeypatch.setattr(S, "train_batch", lambda b, **kw: (trained_here.append(sorted(r.run_id for r in b)),
                                                          real_train(b, **kw))[1])
    monkeypatch.setattr(results, "write_part", lambda out, runs, steps: (
        written_here.append(sorted(runs.run_id)), real_write(out, runs, steps))[1])
    two = S.run_sweep(spec, tmp_path / "two", workers=2)
    assert written_here == trained_here
    batches = S.make_batches(list(S.expand(spec)), S.MAX_BATCH)
    assert len(list((tmp_path / "two" / "parts").glob("*.runs.parquet"))) == len(batches)
    pd.testing.assert_frame_equal(one[0], two[0])
    pd.testing.assert_frame_equal(one[1], two[1])


def test_two_workers_equal_one_worker_bit_for_bit(tmp_path):
    spec = S.SweepSpec.build({"num_prompts": [3, 4], "num_responses": [3], "estimator": ["reinforce", "grpo"],
                              "steps": [60]}, seeds=2)
    one = S.run_sweep(spec, tmp_path / "one", workers=1)
    two = S.run_sweep(spec, tmp_path / "two", workers=2)
    pd.testing.assert_frame_equal(one[0], two[0])
    pd.testing.assert_frame_equal(one[1], two[1])
    # and with batches cut differently (one run per batch): still the same numbers
    small = S.run_sweep(spec, tmp_path / "small", max_batch=1)
    pd.testing.assert_frame_equal(one[0], small[0])


@pytest.mark.parametrize("fault", ["tmp-written:1", "tmp-written:4", "part-steps:2", "part-committed:3",
                                   "final-steps"])
def test_kill_at_failpoint_then_resume_equals_uninterrupted(fault, tmp_path, capsys):
    """A crash (os._exit(137), as SIGKILL) at each write stage, then --resume: exactly the uninterrupted results."""
    args = ["sweep", "--num-prompts", "3,4", "--num-responses", "3", "--estimators", "reinforce,grpo",
            "--steps", "40", "--seeds", "2", "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRPO_SIM_FAULT": fault}
    out = tmp_path / "killed"
    crashed = subprocess.run([sys.executable, "-m", "sim.cli", *args, str(out)], capture_output=True, text=True,
                             env=env)
    assert crashed.returncode == 137, crashed.stderr
    assert not (out / "runs.parquet").exists()
    code, _, err = run_cli([*args, str(out), "--resume"], capsys)  # in-process, without the fault
    assert code == 0, err
    full = S.run_sweep(S.SweepSpec.build({"num_prompts": [3, 4], "num_responses": [3], "steps": [40],
                                          "estimator": ["reinforce", "grpo"]}, seeds=2), tmp_path / "full")
    a_runs, a_steps = sim.load_results(out)
    pd.testing.assert_frame_equal(a_runs, full[0])
    pd.testing.assert_frame_equal(a_steps, full[1])
    assert not list(out.rglob("*.tmp"))  # a crash's temp files are cleared by the resume


def test_ray_backend_equals_local_bit_for_bit(tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
    import ray

    spec = S.SweepSpec.build({"num_prompts": [3, 4], "num_responses": [3], "estimator": ["reinforce", "grpo"],
                              "mode": ["exact", "sampled"], "steps": [50]}, seeds=2)
    local = S.run_sweep(spec, tmp_path / "local")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        remote = S.run_sweep(spec, tmp_path / "ray", backend="ray", max_batch=3)  # other sharding too
    finally:
        ray.shutdown()
    pd.testing.assert_frame_equal(local[0], remote[0])
    pd.testing.assert_frame_equal(local[1], remote[1])


def test_unknown_or_missing_backend_is_one_line(tmp_path, capsys):
    from sim.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--backend", "dask", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("error: backend: unknown value 'dask'")
    assert not (tmp_path / "x").exists()


def test_truncated_or_corrupt_results_files_are_detected_on_load(tmp_path):
    spec = S.SweepSpec.build({"num_prompts": [3], "num_responses": [3], "estimator": ["reinforce"],
                              "steps": [10]}, seeds=1)
    out = tmp_path / "r"
    S.run_sweep(spec, out)
    first = sim.load_results(out)
    data = (out / "runs.parquet").read_bytes()
    (out / "runs.parquet").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=r"runs.parquet: unreadable or corrupt parquet file"):
        sim.load_results(out)
    (out / "runs.parquet").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable or corrupt"):
        sim.load_results(out)
    (out / "steps.parquet").unlink()
    (out / "runs.parquet").write_bytes(data)
    with pytest.raises(ValueError, match="missing results file"):
        sim.load_results(out)
    # a corrupt committed part is found on resume before anything trains, moved aside (said where)
    # and recomputed: the resumed results equal the first ones
    part = next((out / "parts").glob("*.runs.parquet"))
    part.write_bytes(b"garbage")
    notices = []
    S.run_sweep(spec, out, resume=True, on_notice=notices.append)
    assert len(notices) == 1 and "damaged" in notices[0] and "unreadable runs file" in notices[0]
    assert (out / "damaged" / part.name).read_bytes() == b"garbage"
    again = sim.load_results(out)
    pd.testing.assert_frame_equal(first[0], again[0])
    pd.testing.assert_frame_equal(first[1], again[1])


def test_a_sweep_resumed_under_the_other_engine_agrees_with_either(tmp_path, capsys):
    """A sweep crashed under --engine torch and resumed under numba mixes engines (each run records
    its own): its numbers agree with an all-numba and an all-torch sweep to rounding."""
    args = ["sweep", "--num-prompts", "3,4", "--num-responses", "3", "--estimators", "reinforce,grpo",
            "--steps", "40", "--seeds", "2", "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRPO_SIM_FAULT": "part-committed:1"}
    out = tmp_path / "mixed"
    crashed = subprocess.run([sys.executable, "-m", "sim.cli", *args, str(out), "--engine", "torch"],
                             capture_output=True, text=True, env=env)
    assert crashed.returncode == 137, crashed.stderr
    code, _, err = run_cli([*args, str(out), "--resume", "--engine", "numba"], capsys)  # in-process
    assert code == 0, err
    mixed, _ = sim.load_results(out)
    assert set(mixed.engine) == {"torch", "numba"}
    spec = S.SweepSpec.build({"num_prompts": [3, 4], "num_responses": [3], "steps": [40],
                              "estimator": ["reinforce", "grpo"]}, seeds=2)
    for engine in ("torch", "numba"):
        full, _ = S.run_sweep(spec, tmp_path / engine, engine=engine)
        assert set(full.engine) == {engine}
        assert (full.run_id == mixed.run_id).all() and (full.steps_to_target == mixed.steps_to_target).all()
        np.testing.assert_allclose(mixed.final_J, full.final_J, rtol=1e-12)
        np.testing.assert_allclose(mixed.auc, full.auc, rtol=1e-12)


def test_bad_engine_is_one_line_exit_2(tmp_path, capsys):
    from sim.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--num-prompts", "3", "--steps", "5", "--engine", "jax", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: engine: unknown value 'jax'") and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_auto_trains_adaptive_estimators_with_torch_beside_numba(tmp_path, capsys, workers):
    """--engine auto (the default) on the CPU: the kernels train the fixed estimators and torch the
    adaptive ones (their state is not in the kernels), in one sweep, each run recording its engine."""
    from sim.cli import main

    out = tmp_path / "mix"
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--num-prompts", "3", "--steps", "5", "--estimators", "grpo,grpo_phase,grpo_finite",
              "--seeds", "1", "--workers", str(workers), "--out", str(out)])
    assert exc.value.code == 0, capsys.readouterr().err
    runs, _ = sim.load_results(out)
    assert dict(zip(runs.estimator, runs.engine)) == {"grpo": "numba", "grpo_phase": "torch", "grpo_finite": "torch"}


def test_a_finer_tuned_grid_has_n_rates_per_octave_over_the_same_span(tmp_path, capsys):
    """lr 'tuned:2': lr_theory * 2^(j/2), j = -2..8 (the factor-2 grid's rates and the ones between),
    extended a factor sqrt 2 per round by MAX_LR_EXTENSIONS octaves at most; 'tuned:1' is 'tuned'
    (the same results directory key); N outside [1, 8] is one line, exit 2."""
    from sim.cli import main

    assert S.tuned_factors(1) == S.TUNED_FACTORS == (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    fine = S.tuned_factors(2)
    assert len(fine) == 11 and fine[::2] == S.TUNED_FACTORS and fine[1] == pytest.approx(2 ** -0.5)
    assert S.SweepSpec.build({}, lr="tuned:1").as_dict() == S.SweepSpec.build({}, lr="tuned").as_dict()
    spec = S.SweepSpec.build({"estimator": ["reinforce", "grpo"], "num_prompts": [2], "num_responses": [3],
                              "steps": [60], "mode": ["exact"], "orthogonality": [1.0]}, seeds=1, lr="tuned:2")
    runs, _ = S.run_sweep(spec, tmp_path / "r")
    assert set(runs.lr_rule) == {"tuned"}
    for est, g in runs.groupby("estimator"):
        ratios = np.sort(g.lr.to_numpy() / g.lr_theory.iloc[0])
        # the grid, then (exact mode at 60 steps: the best rate lies above 16 x theory) sqrt 2 steps up
        np.testing.assert_allclose(ratios[:11], fine, rtol=1e-12)
        np.testing.assert_allclose(ratios[1:] / ratios[:-1], 2 ** 0.5, rtol=1e-9)
        # interior, or still at the top after MAX_LR_EXTENSIONS octaves of 2 rates each
        edge = runs[runs.selected & (runs.estimator == est)].lr_edge.iloc[0]
        assert (edge == "" and len(ratios) < 11 + 2 * S.MAX_LR_EXTENSIONS) or len(ratios) == 11 + 2 * S.MAX_LR_EXTENSIONS
    assert runs.groupby("estimator").lr.nunique().max() == 11 + 2 * S.MAX_LR_EXTENSIONS  # (REINFORCE here)
    for bad in ("tuned:0", "tuned:9", "tuned:x", "tuned:\u00b2"):
        with pytest.raises(SystemExit) as exc:
            main(["sweep", "--num-prompts", "2", "--steps", "5", "--lr", bad, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith(f"error: lr: '{bad}'") and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_a_fine_grid_counts_a_choice_less_than_an_octave_inside_its_edge_as_at_the_edge():
    """tuned:2 (rates 2^(j/2)): a best one rate below the top (a factor sqrt 2 inside) is at the edge
    for the extension (within = 2^(1/2), sim.sweep.lr_extensions) but not for the lr_edge mark
    (within = 1); a best a whole octave inside (a factor 2) is at neither."""
    grid = [2.0 ** (j / 2) for j in range(5)]  # 1 .. 4

    def runs_with_best(best):
        runs = fake_runs([("grpo", lr, seed, 30 if lr == best else 50, True, 0.5) for lr in grid for seed in (0, 1)])
        runs["lr_rule"] = "tuned"
        return runs

    near = runs_with_best(grid[3])  # 2^1.5: one rate inside the top
    edges = A.lr_edges(near, within=2 ** 0.5)
    assert list(edges.edge) == ["top"] and edges.lr.iloc[0] == grid[3] and edges.lr_max.iloc[0] == grid[4]
    assert A.lr_edges(near).empty
    assert A.lr_edges(runs_with_best(grid[2]), within=2 ** 0.5).empty  # 2: an octave inside the top
    bottom = A.lr_edges(runs_with_best(grid[1]), within=2 ** 0.5)  # 2^0.5: one rate above the bottom
    assert list(bottom.edge) == ["bottom"] and bottom.lr_min.iloc[0] == grid[0]
