"""Problems of your own: built from arrays in Python, saved and loaded as .npz (no pickle), run by
`sim run` / `sim sweep --problem-file`, with one-line errors for bad files."""

import numpy as np
import pytest
import torch
from helpers import run_cli

import sim
from sim.config import RunConfig, TrainConfig
from sim.engine import train_batch
from sim.problems import (ProblemConfig, load_problem_arrays, make_problem, problem_from_arrays,
                          resolve_problem_file, save_problem)


def _saved(tmp_path, **kw):
    cfg = ProblemConfig(num_prompts=4, num_responses=3, orthogonality=0.7, reward_noise=0.1, **kw)
    path = tmp_path / "p.npz"
    save_problem(make_problem(cfg), path)
    return cfg, path


def test_a_saved_problem_trains_exactly_like_the_family_one(tmp_path):
    cfg, path = _saved(tmp_path)
    own = resolve_problem_file(ProblemConfig(problem_file=str(path)))
    assert (own.num_prompts, own.num_responses, own.k, own.s) == (4, 3, 3, 3) and len(own.problem_sha256) == 64
    for mode in ("exact", "sampled"):
        a = train_batch([RunConfig(cfg, TrainConfig(mode=mode, steps=50, lr=2.0))])
        b = train_batch([RunConfig(own, TrainConfig(mode=mode, steps=50, lr=2.0))])
        assert torch.equal(a.theta_private, b.theta_private) and torch.equal(a.theta_shared, b.theta_shared)
        np.testing.assert_array_equal(a.steps.J, b.steps.J)


def test_problem_from_arrays_names_the_bad_array():
    P, K = 2, 3
    good = dict(bias=np.zeros((P, K)), q=np.eye(K)[[0, 0]], scale=np.ones(P), phi_private=np.eye(K)[None].repeat(P, 0),
                phi_shared=np.zeros((P, K, 2)))
    assert problem_from_arrays(**good).rbar.shape == (P, K)
    for change, msg in ((dict(q=np.full((P, K), 1.5)), "q: reward probabilities"),
                        (dict(scale=np.array([1.0, 0.0])), "scale: reward scales"),
                        (dict(bias=np.zeros((P, K + 1))), "q: dimension K is 3, but 4"),
                        (dict(phi_shared=np.zeros((P, K))), "phi_shared: expected shape"),
                        (dict(bias=np.full((P, K), np.nan)), "bias: holds NaN"),
                        (dict(phi_private=np.ones((P, K, 2))), "phi_private: no prompt's features")):
        with pytest.raises(ValueError, match=msg):
            problem_from_arrays(**{**good, **change})


def test_cli_runs_a_problem_file_and_records_its_digest(tmp_path, capsys):
    _, path = _saved(tmp_path)
    code, _, err = run_cli(["run", "--problem-file", str(path), "--estimators", "reinforce,grpo", "--steps", "100",
                            "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    runs, _ = sim.load_results(tmp_path / "out")
    assert set(runs.num_prompts) == {4} and set(runs.problem_file) == {str(path)}
    assert set(runs.problem_sha256) == {resolve_problem_file(ProblemConfig(problem_file=str(path))).problem_sha256}


def test_bad_problem_files_are_one_line_errors_and_write_nothing(tmp_path, capsys):
    _, path = _saved(tmp_path)
    text = tmp_path / "t.npz"
    text.write_text("not an archive")
    partial = tmp_path / "partial.npz"
    np.savez(partial, bias=np.zeros((2, 3)))
    cases = {str(tmp_path / "missing.npz"): "no such file", str(tmp_path): "is a directory",
             str(text): "not an .npz file", str(partial): "lacks the array"}
    for bad, msg in cases.items():
        out = tmp_path / "never"
        code, _, err = run_cli(["run", "--problem-file", bad, "--out", str(out)], capsys)
        assert code == 2 and msg in err and err.count("\n") == 1, err
        assert "Traceback" not in err and not out.exists()
    code, _, err = run_cli(["run", "--problem-file", str(path), "--problem-sha256", "0" * 64,
                            "--out", str(tmp_path / "never")], capsys)
    assert code == 2 and "problem-sha256" in err
    assert load_problem_arrays(path)["bias"].shape == (4, 3)
