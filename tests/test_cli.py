"""CLI: every bad option gives one line naming it, exit code 2, no traceback, no results."""

import subprocess
import sys

import pandas as pd
import pytest

import sim
from helpers import run_cli

SMALL = ["--num-prompts", "3", "--num-responses", "3", "--steps", "30", "--seeds", "2"]


@pytest.mark.parametrize("args,needle", [
    (["--orthogonality", "1.5"], "orthogonality"),
    (["--orthogonality", "0.2,abc"], "orthogonality"),
    (["--group-size", "1", "--estimators", "grpo"], "group-size"),
    (["--steps", "-5"], "steps"),
    (["--steps", "2.5"], "steps"),
    (["--estimators", "reinforce,ppo"], "estimator"),
    (["--mode", "exactly"], "mode"),
    (["--lr", "-1"], "lr"),
    (["--lr", "fast"], "lr"),
    (["--seeds", "0"], "seeds"),
    (["--workers", "0"], "workers"),
    (["--reward-noise", "0.5"], "reward-noise"),
    (["--noise", "nan"], "reward-noise"),
    (["--difficulty-spread", "-1"], "difficulty-spread"),
    (["--base-success", "1"], "base-success"),
    (["--kind", "tabular", "--private-dim", "2"], "private-dim"),
    (["--no-such-option", "1"], "no-such-option"),
    (["--num-prompts", "64", "--num-responses", "4096"], "num-responses"),  # 17 GiB of features: refused up front
    (["--resume"], "resume"),
    (["--config", "/nonexistent/x.toml"], "config"),
    (["--device", "tpu"], "device"),
    (["--device", "cuda", "--backend", "ray"], "device"),  # no GPU here, and cuda is local-only anyway
    (["--engine", "numba", "--estimators", "grpo,grpo_phase"], "engine"),  # the kernels carry no estimator state
])
def test_bad_sweep_option_one_line_exit_2_nothing_written(args, needle, capsys, tmp_path):
    out_dir = tmp_path / "res"
    code, out, err = run_cli(["sweep", *SMALL, "--out", str(out_dir), *args] if args != ["--resume"]
                             else ["sweep", *SMALL, "--resume"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error:"), err
    assert "Traceback" not in err + out
    assert not out_dir.exists()


def test_unwritable_out(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(["sweep", *SMALL, "--out", str(blocker / "sub")], capsys)
    assert code == 2 and err.strip().startswith("error: out:") and len(err.strip().splitlines()) == 1


def test_malformed_toml(capsys, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("orthogonality = [0.2, \n")
    code, _, err = run_cli(["sweep", "--config", str(cfg), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "config" in err and len(err.strip().splitlines()) == 1
    cfg.write_text("orthogonality = [0.2, 7.0]\n")
    code, _, err = run_cli(["sweep", "--config", str(cfg), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "orthogonality" in err
    cfg.write_text("wibble = 3\n")
    code, _, err = run_cli(["sweep", "--config", str(cfg), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "wibble" in err
    assert not (tmp_path / "r").exists()


def test_sweep_writes_results_that_load(capsys, tmp_path):
    out_dir = tmp_path / "res"
    code, out, err = run_cli(["sweep", *SMALL, "--orthogonality", "0.2,0.8", "--out", str(out_dir)], capsys)
    assert code == 0, err
    assert "speedup" in out and "reinforce" in out
    runs, steps = sim.load_results(out_dir)
    # 2 orthogonalities x 5 default estimators x 2 seeds
    assert len(runs) == 20 and set(runs.orthogonality) == {0.2, 0.8}
    assert set(steps.run_id) == set(runs.run_id)
    assert {"steps_to_target", "final_J", "auc", "speedup", "selected"} <= set(runs.columns)
    assert {"J", "sigma_bar", "grad_norm", "rho"} <= set(steps.columns)
    # same directory again: needs --resume; with it, nothing to do and the same results
    code, _, err = run_cli(["sweep", *SMALL, "--orthogonality", "0.2,0.8", "--out", str(out_dir)], capsys)
    assert code == 2 and "--resume" in err
    code, _, _ = run_cli(["sweep", *SMALL, "--orthogonality", "0.2,0.8", "--out", str(out_dir), "--resume"], capsys)
    assert code == 0
    pd.testing.assert_frame_equal(sim.load_results(out_dir)[0], runs)
    # a different config refuses to resume there
    code, _, err = run_cli(["sweep", *SMALL, "--orthogonality", "0.3", "--out", str(out_dir), "--resume"], capsys)
    assert code == 2 and "different sweep config" in err


def test_config_file_and_run_command(capsys, tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text('# what this answers\n[sweep]\northogonality = [0.5]\nestimators = ["reinforce", "grpo"]\n'
                   'num-prompts = 3\nnum-responses = 3\nsteps = 20\nseeds = 2\nmode = "exact"\n')
    code, _, err = run_cli(["sweep", "--config", str(cfg), "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    runs, _ = sim.load_results(tmp_path / "a")
    assert set(runs.estimator) == {"reinforce", "grpo"} and (runs["mode"] == "exact").all() and len(runs) == 4
    code, _, err = run_cli(["run", "--orthogonality", "0.4", "--estimators", "grpo", *SMALL,
                            "--out", str(tmp_path / "b")], capsys)
    assert code == 0, err
    code, _, err = run_cli(["run", "--orthogonality", "0.4,0.5", "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "orthogonality" in err
    code, _, err = run_cli(["run", "--estimators", "grpo,reinforce", *SMALL, "--out", str(tmp_path / "d")], capsys)
    assert code == 0, err
    assert set(sim.load_results(tmp_path / "d")[0].estimator) == {"grpo", "reinforce"}


def test_load_results_errors(tmp_path):
    with pytest.raises(ValueError, match="no such results directory"):
        sim.load_results(tmp_path / "nope")
    with pytest.raises(ValueError, match="not a results directory"):
        sim.load_results(tmp_path)


def test_console_script_bad_value_no_traceback(tmp_path):
    # the installed entry point, in a fresh process
    p = subprocess.run([sys.executable, "-m", "sim.cli", "sweep", "--orthogonality", "1.5",
                        "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["error: orthogonality: 1.5 is out of range; accepted: [0.0, 1.0]"]
    assert not (tmp_path / "x").exists()


def test_degenerate_features_are_a_config_error(capsys, tmp_path):
    # o = 0 with a 1-dim shared block: the two responses' shared vectors are +-1, equal for some seeds
    from sim.problems import ProblemConfig, make_problem

    def degenerate(seed):
        try:
            make_problem(ProblemConfig(num_prompts=1, num_responses=2, orthogonality=0.0, shared_dim=1,
                                       private_dim=1, problem_seed=seed))
            return False
        except ValueError:
            return True

    seed = next(s for s in range(100) if degenerate(s))
    args = ["--num-prompts", "1", "--num-responses", "2", "--orthogonality", "0", "--shared-dim", "1",
            "--private-dim", "1", "--problem-seed", str(seed)]
    for cmd in (["sweep", *args, "--lr", "1.0", "--out", str(tmp_path / "r")], ["theory", "check", *args]):
        code, _, err = run_cli(cmd, capsys)
        assert code == 2 and err.startswith("error: shared-dim:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("o,holds", [("1.0", True), ("0.2", False)])
def test_theory_check_reports_orthogonality(o, holds, capsys):
    import json

    code, out, err = run_cli(["theory", "check", "--orthogonality", o, "--difficulty-spread", "1.0",
                              "--steps", "30", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    orth = next(c for c in report["conditions"] if c["name"] == "orthogonality")
    assert orth["holds"] is holds
    if holds:
        assert report["all_hold"] is True
    else:
        assert orth["measured"] > 0.5  # random shared directions at o = 0.2 overlap strongly


def test_theory_predict_and_bad_option(capsys):
    import json

    code, out, _ = run_cli(["theory", "predict", "--orthogonality", "1.0", "--kind", "tabular",
                            "--steps", "300", "--json"], capsys)
    assert code == 0
    rep = json.loads(out)
    assert rep["predicted_gain"] >= 1.0 and rep["M"]["curvature_constant (used)"] == pytest.approx(0.5)
    code, _, err = run_cli(["theory", "check", "--orthogonality", "1.5"], capsys)
    assert code == 2 and err.strip() == "error: orthogonality: 1.5 is out of range; accepted: [0.0, 1.0]"


def test_help_shows_types_choices_ranges_and_default_values(capsys):
    code, out, _ = run_cli(["sweep", "--help"], capsys)
    assert code == 0 and "<str>" not in out
    flat = " ".join(out.split())
    for text in ("--num-prompts INTEGER,...", "--orthogonality FLOAT,...", "--kind [tabular|linear],...",
                 "--mode [exact|sampled],...", "(accepted: [0.0, 1.0])", "[default: reinforce,dr_grpo,rloo,grpo,grpo_batch]"):
        assert text in flat, text
    code, out, _ = run_cli(["run", "--help"], capsys)
    flat = " ".join(out.split())
    assert "--orthogonality FLOAT " in flat and "--estimators, --estimator NAME,..." in flat


@pytest.mark.parametrize("command", [["sweep"], ["run"], ["figures"], ["theory", "check"]])
def test_help_shows_each_default_once(command, capsys):
    # typer prints an Option's non-None default itself: a hand-written "[default: x]" beside it doubles
    import re

    code, out, _ = run_cli(command + ["--help"], capsys)
    flat = " ".join(out.split())
    assert code == 0 and "[default:" in flat
    twice = re.findall(r"\[default: ([^\]]*)\] \[default: \1\]", flat)
    assert not twice, twice


def test_llm_help_shows_the_estimator_default_as_a_value(capsys):
    pytest.importorskip("transformers")
    code, out, _ = run_cli(["llm", "train", "--help"], capsys)
    flat = " ".join(out.split())
    assert code == 0 and "DEFAULT_ESTIMATORS" not in flat and "<str>" not in flat
    assert "--estimator NAME" in flat and "[default: grpo]" in flat and "--device [auto|cpu|cuda]" in flat
