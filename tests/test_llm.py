"""LLM runner: rewards, data, the loss, the estimator wiring, CLI errors, and 2-process DDP."""

import dataclasses
import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from sim.config import ConfigError

pytest.importorskip("transformers", reason="the llm extra is not installed (pip install -e '.[llm]')")
pytest.importorskip("accelerate", reason="the llm extra is not installed (pip install -e '.[llm]')")

from sim import estimators  # noqa: E402
from sim.llm import data as data_mod  # noqa: E402
from sim.llm import model as model_mod  # noqa: E402
from sim.llm import rewards as R  # noqa: E402
from sim.llm import trainer as T  # noqa: E402
from helpers import TWO_PROCESS_LAUNCHERS, run_cli  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """An untrained tiny Llama with the char tokenizer, saved like make-tiny saves (fast)."""
    out = tmp_path_factory.mktemp("tiny")
    tok = model_mod.char_tokenizer()
    model_mod.tiny_model(len(tok), "tiny", seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("completion,reference,expected", [
    (" #### 7", "#### 7", 1.0),
    ("3 + 4 = 7\n#### 7", "#### 7", 1.0),
    ("#### 1,234", "#### 1234", 1.0),
    ("#### $10.", "#### 10", 1.0),
    ("#### 7.0", "#### 7", 1.0),
    ("#### -3", "#### -3", 1.0),
    ("#### 8", "#### 7", 0.0),
    ("7", "#### 7", 0.0),                        # no final-answer marker
    ("", "#### 7", 0.0),
    ("#### ", "#### 7", 0.0),
    ("#### seven", "#### 7", 0.0),
    ("#### 7 #### 8", "#### 7", 0.0),            # the last marker counts
    ("#### 8 #### 7", "#### 7", 1.0),
    ("####" * 500 + "7", "#### 7", 1.0),         # adversarial repetition
    ("\x00\ufffd#### 7", "#### 7", 1.0),
    (None, "#### 7", 0.0),                       # not even a string
    ("#### 1e400", "#### 7", 0.0),
])
def test_gsm8k_rewards(completion, reference, expected):
    assert R.gsm8k_reward(completion, reference) == expected


@pytest.mark.parametrize("completion,reference,expected", [
    ("so \\boxed{\\frac{5}{6}}", "\\boxed{\\frac{5}{6}}", 1.0),
    ("\\boxed{\\dfrac{5}{6}}", "\\boxed{\\frac{5}{6}}", 1.0),
    ("\\boxed{1024}", "$2^{10} = \\boxed{1024}$", 1.0),
    ("\\boxed{x = 3}", "\\boxed{3}", 1.0),
    ("\\boxed{1023}", "\\boxed{1024}", 0.0),
    ("\\boxed{\\frac{5}{6}", "\\boxed{\\frac{5}{6}}", 0.0),   # unbalanced braces
    ("no box here: 5/6", "\\boxed{\\frac{5}{6}}", 0.0),
    ("\\boxed{}", "\\boxed{3}", 0.0),
    ("\\boxed{" * 300, "\\boxed{3}", 0.0),
])
def test_math_rewards(completion, reference, expected):
    assert R.math_reward(completion, reference) == expected


def test_extract_boxed_nested():
    assert R.extract_boxed("a \\boxed{\\frac{a}{b}} then \\boxed{x^{2}}") == "x^{2}"
    assert R.normalize_math("\\left( 1, 2 \\right)") == "(1,2)"
    assert R.normalize_math("\\frac{2}{4}") == "1/2"


def test_loaders_read_sample_files_and_reject_malformed_rows(tmp_path):
    g = data_mod.load_data(f"gsm8k:{DATA / 'gsm8k_sample.jsonl'}")
    assert len(g) == 3 and g[0].prompt.startswith("Q: Natalia") and R.extract_gsm8k(g[0].answer) == "72"
    m = data_mod.load_data(f"math:{DATA / 'math_sample.jsonl'}")
    assert [R.extract_boxed(e.answer) for e in m] == ["\\frac{5}{6}", "1024", "3"]
    import pandas as pd

    pd.DataFrame([{"question": e.question, "answer": e.answer} for e in g]).to_parquet(tmp_path / "g.parquet")
    assert data_mod.load_data(f"gsm8k:{tmp_path / 'g.parquet'}") == g
    with pytest.raises(data_mod.DataError, match="row 2: missing or empty string field 'answer'"):
        data_mod.load_data(f"gsm8k:{DATA / 'gsm8k_malformed.jsonl'}")
    (tmp_path / "bad.jsonl").write_text('{"question": "x", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(data_mod.DataError, match="line 2: not valid JSON"):
        data_mod.load_data(f"gsm8k:{tmp_path / 'bad.jsonl'}")


def test_arithmetic_generator_is_deterministic_and_correct():
    a = data_mod.arithmetic_examples(50, difficulty=2, seed=3)
    assert a == data_mod.arithmetic_examples(50, difficulty=2, seed=3)
    for e in a:
        nums = [int(t) for t in re.findall(r"\d+", e.question)]
        x, y, z = nums  # has x, gets y more, gives away z
        assert R.extract_gsm8k(e.answer) == str(x + y - z)


def test_completion_mask_stops_after_first_eos():
    # prompt of 3 tokens, then completion: 5 6 EOS(2) PAD(0) PAD(0); a generated pad-id token (0)
    # before the eos counts, as in TRL's GRPOTrainer (every token up to and including the first eos)
    seqs = torch.tensor([[9, 9, 9, 5, 6, 2, 0, 0], [9, 9, 9, 5, 6, 7, 8, 3], [9, 9, 9, 0, 6, 2, 0, 0]])
    mask = T.completion_mask(seqs, prompt_len=3, eos_id=2, pad_id=0)
    # position j predicts token j+1: predicted completion tokens are positions 2..6
    assert mask[0].tolist() == [False, False, True, True, True, False, False]
    assert mask[1].tolist() == [False, False, True, True, True, True, True]
    assert mask[2].tolist() == [False, False, True, True, True, False, False]


def test_token_logprobs_are_those_of_the_tempered_distribution(tiny_dir):
    model, tok = model_mod.load(str(tiny_dir))
    torch.manual_seed(1)
    seqs = torch.randint(4, len(tok), (2, 7))
    attn = torch.ones_like(seqs)
    logits = model(input_ids=seqs, attention_mask=attn).logits[:, :-1].float()
    for temp in (1.0, 0.7, 1.6):
        want = torch.log_softmax(logits / temp, -1).gather(-1, seqs[:, 1:].unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(T.token_logprobs(model, seqs, attn, temp), want, rtol=1e-5, atol=1e-6)


def test_token_mean_uses_the_global_token_count_under_ddp():
    """Two ranks with 3 and 1 completion tokens: DDP averages their gradients, so token-mean (dapo)
    must give sum_ranks token sums / 4, token-mean-local (bnpo) the mean of per-rank token means."""
    logp = [torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-4.0, 0.0, 0.0]])]
    masks = [torch.tensor([[True, True, True]]), torch.tensor([[True, False, False]])]
    adv = torch.tensor([1.0])
    dapo = [T.pg_loss(lp, m, adv, "token-mean", 3, global_tokens=4, world_size=2) for lp, m in zip(logp, masks)]
    bnpo = [T.pg_loss(lp, m, adv, "token-mean-local", 3) for lp, m in zip(logp, masks)]
    # -(A log pi) summed: rank 0: 6, rank 1: 4. dapo: DDP mean of (6 * 2 / 4, 4 * 2 / 4) = 10 / 4
    assert float((dapo[0] + dapo[1]) / 2) == pytest.approx(10 / 4)
    assert float((bnpo[0] + bnpo[1]) / 2) == pytest.approx((6 / 3 + 4 / 1) / 2)
    one = T.pg_loss(torch.cat(logp, 0), torch.cat(masks, 0), torch.tensor([1.0, 1.0]), "token-mean", 3)
    assert float(one) == pytest.approx(10 / 4)  # one process: the same global mean


@pytest.mark.parametrize("agg", T.LOSS_AGGREGATIONS)
def test_loss_gradient_equals_hand_computed_policy_gradient(agg, tiny_dir):
    model, tok = model_mod.load(str(tiny_dir))
    torch.manual_seed(0)
    seqs = torch.randint(4, len(tok), (4, 10))
    attn = torch.ones_like(seqs)
    mask = T.completion_mask(seqs, prompt_len=4, eos_id=2, pad_id=0)
    mask[1, 7:] = False  # a shorter completion
    adv = torch.tensor([1.0, -0.5, 0.25, 2.0])
    params = [p for p in model.parameters()]
    loss = T.pg_loss(T.token_logprobs(model, seqs, attn), mask, adv, agg, max_new_tokens=6)
    auto = torch.autograd.grad(loss, params)
    # hand-computed: sum_k w_k A_k grad log pi(y_k | x) with the aggregation's weights w_k
    lens = mask.sum(-1).float()
    w = {"seq-mean-token-mean": 1 / (4 * lens), "token-mean": torch.full((4,), 1 / float(lens.sum())),
         "token-mean-local": torch.full((4,), 1 / float(lens.sum())),
         "seq-mean-token-sum-norm": torch.full((4,), 1 / (4 * 6.0))}[agg]
    hand = [torch.zeros_like(p) for p in params]
    for k in range(4):
        lp = T.token_logprobs(model, seqs[k:k + 1], attn[k:k + 1])
        g = torch.autograd.grad((lp * mask[k:k + 1]).sum(), params)  # grad log pi(y_k | x)
        for h, gi in zip(hand, g):
            h -= w[k] * adv[k] * gi
    for a, h in zip(auto, hand):
        torch.testing.assert_close(a, h, rtol=1e-4, atol=1e-6)


def test_measured_gain_is_the_ratio_of_first_order_changes(tiny_dir, tmp_path, monkeypatch):
    """If GRPO's advantages were exactly 2x REINFORCE's, its update would be 2x as long along the same
    direction: the measured gain (g_B . u_GRPO) / (g_B . u_REINFORCE) must be 2 (or undefined)."""
    real = estimators.advantages

    def doubled(name, rewards, **kw):
        return 2 * real("reinforce", rewards, **kw) if name == "grpo" else real(name, rewards, **kw)

    monkeypatch.setattr(T, "reward", lambda text, answer, kind: float(len(text) % 2))  # rewards that vary
    cfg = T.LLMConfig(model=str(tiny_dir), estimator="reinforce", steps=1, prompts_per_step=4, group_size=8,
                      diag_every=1, max_new_tokens=4)
    tr = T.Trainer(cfg, tmp_path / "g", log=lambda *a: None)
    monkeypatch.setattr(estimators, "advantages", doubled)
    rows = [tr.step(k) for k in range(6)]  # the sign of g_B . u is noise: some steps are undefined
    defined = [r for r in rows if r["gain_undefined"] == ""]
    assert defined and all(r["gain"] == pytest.approx(2.0, rel=1e-4) for r in defined)
    assert all(r["gain_undefined"] == "reinforce_not_improving" for r in rows if r not in defined)
    small = T.Trainer(dataclasses.replace(cfg, group_size=3), tmp_path / "s", log=lambda *a: None).step(0)
    assert small["gain_undefined"] == "group_too_small" and small["gain"] != small["gain"]


def test_trainer_uses_sim_estimators(tiny_dir, tmp_path, monkeypatch):
    calls = []
    real = estimators.advantages

    def spy(name, rewards, **kw):
        calls.append((name, tuple(rewards.shape)))
        return real(name, rewards, **kw)

    monkeypatch.setattr(estimators, "advantages", spy)
    cfg = T.LLMConfig(model=str(tiny_dir), estimator="rloo", steps=2, prompts_per_step=3, group_size=4,
                      diag_every=1, max_new_tokens=4)
    runs, steps = T.Trainer(cfg, tmp_path / "run", log=lambda *a: None).run()
    assert [c for c in calls if c[1] == (3, 4)] == [("rloo", (3, 4)), ("rloo", (3, 4))]  # the training updates
    # the measured gain's half-groups (2 of the 4 samples of each prompt), both steps diagnosed
    assert sorted(c for c in calls if c[1] != (3, 4)) == [("grpo", (3, 2))] * 2 + [("reinforce", (3, 2))] * 2
    assert (tmp_path / "run" / "runs.parquet").exists() and (tmp_path / "run" / "final" / "config.json").exists()
    assert {"J", "sigma_bar", "zero_std_frac", "rho", "empirical_M", "predicted_gain", "gain",
            "gain_undefined"} <= set(steps.columns)

    # and the update is driven by those advantages: all-zero advantages leave the model unchanged (SGD)
    monkeypatch.setattr(estimators, "advantages", lambda name, rewards, **kw: torch.zeros_like(rewards))
    cfg0 = dataclasses.replace(cfg, optimizer="sgd", diag_every=0)
    tr = T.Trainer(cfg0, tmp_path / "zero", log=lambda *a: None)
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.step(0)
    assert all(torch.equal(b, p) for b, p in zip(before, tr.model.parameters()))

    # a diverged step (here NaN advantages) stops with one line naming --lr, before it touches the model
    monkeypatch.setattr(estimators, "advantages", lambda name, rewards, **kw: torch.full_like(rewards, float("nan")))
    with pytest.raises(ConfigError, match=r"^lr: training diverged at step 0"):
        tr.step(0)
    assert all(torch.equal(b, p) for b, p in zip(before, tr.model.parameters()))


def test_an_adaptive_estimator_keeps_its_state_per_prompt_across_steps(tiny_dir, tmp_path):
    """grpo_finite in the native runner: each step's advantages come from the PromptStates of the
    step's prompts (the examples drawn), which then hold every prompt trained on."""
    cfg = T.LLMConfig(model=str(tiny_dir), estimator="grpo_finite", steps=3, prompts_per_step=3, group_size=4,
                      diag_every=0, max_new_tokens=4)
    tr = T.Trainer(cfg, tmp_path / "run", log=lambda *a: None)
    drawn = set()
    for step in range(3):
        drawn |= {e.prompt for e in tr._prompts(step)[0]}
        tr.step(step)
    assert set(tr.adaptive.table) == drawn
    assert all(0.0 <= p_bar <= 1.0 and c >= 0.0 for p_bar, c in tr.adaptive.table.values())
    # grpo_phase reads rho_t at every step (the per-prompt gradients of the diagnostic subset) into
    # its running mean, also on steps without diagnostics (diag_every = 0 here)
    seen = []
    real = estimators.phase_aware_alpha

    def spy(rho, state=None, **kw):
        seen.append(float(rho))
        return real(rho, state, **kw)

    import unittest.mock

    with unittest.mock.patch.object(estimators, "phase_aware_alpha", spy):
        tr = T.Trainer(dataclasses.replace(cfg, estimator="grpo_phase"), tmp_path / "phase", log=lambda *a: None)
        for step in range(3):
            tr.step(step)
    # one rho per step, each in [0, 1] or NaN (fewer than two prompts with a gradient: no measurement),
    # and the state is the rule's own over those measurements
    assert len(seen) == 3 and all(r != r or 0.0 <= r <= 1.0 for r in seen)
    state = None
    for r in seen:
        _, state = real(torch.tensor(r, dtype=torch.float64), state)
    assert torch.equal(tr.adaptive.state.rho_ema, state.rho_ema) or (
        torch.isnan(tr.adaptive.state.rho_ema) and torch.isnan(state.rho_ema))
    # grpo_shrunk and grpo_selfnorm (its state): both at once, a per-prompt table and the per-run
    # rho_peak that sets their baseline
    for name in ("grpo_shrunk", "grpo_selfnorm"):
        tr = T.Trainer(dataclasses.replace(cfg, estimator=name), tmp_path / name, log=lambda *a: None)
        drawn = set()
        for step in range(3):
            drawn |= {e.prompt for e in tr._prompts(step)[0]}
            tr.step(step)
        assert set(tr.adaptive.table) == drawn, name
        peak = float(tr.adaptive.state.rho_peak)
        assert peak != peak or 0.0 <= peak <= 1.0


def _cli(args, capsys):
    """(exit code, stderr) of ``sim <args>`` in this process (helpers.run_cli)."""
    code, _, err = run_cli(args, capsys)
    return code, err


def test_missing_or_corrupt_model_and_bad_data_are_one_line_errors(tiny_dir, tmp_path, capsys):
    code, err = _cli(["llm", "train", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.startswith("error: model:") and len(err.strip().splitlines()) == 1
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in tiny_dir.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    code, err = _cli(["llm", "train", "--model", str(corrupt), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.startswith("error: model: cannot load") and len(err.strip().splitlines()) == 1
    code, err = _cli(["llm", "train", "--model", str(tiny_dir), "--data", f"gsm8k:{DATA / 'gsm8k_malformed.jsonl'}",
                      "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "row 2" in err and len(err.strip().splitlines()) == 1
    code, err = _cli(["llm", "train", "--model", str(tiny_dir), "--estimator", "ppo"], capsys)
    assert code == 2 and err.startswith("error: estimator:")
    code, err = _cli(["llm", "compare", "--model", str(tiny_dir), "--estimators", "grpo,nope"], capsys)
    assert code == 2 and "nope" in err
    code, err = _cli(["llm", "train", "--model", str(tiny_dir), "--lr", "-1", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.startswith("error: lr:") and len(err.strip().splitlines()) == 1
    code, err = _cli(["llm", "compare", "--model", str(tiny_dir), "--seed", "x", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.startswith("error: seed:") and len(err.strip().splitlines()) == 1
    code, err = _cli(["llm", "make-tiny", "--out", str(tmp_path / "m"), "--device", "tpu"], capsys)
    assert code == 2 and err.startswith("error: device:") and not (tmp_path / "m").exists()
    if not torch.cuda.is_available():
        code, err = _cli(["llm", "make-tiny", "--out", str(tmp_path / "m"), "--device", "cuda"], capsys)
        assert code == 2 and err.startswith("error: device: cuda") and not (tmp_path / "m").exists()


def test_compare_runs_both_estimators_from_one_checkpoint(tiny_dir, tmp_path, capsys):
    code, err = _cli(["llm", "compare", "--model", str(tiny_dir), "--steps", "2", "--prompts-per-step", "2",
                      "--group-size", "2", "--max-new-tokens", "3", "--diag-every", "1",
                      "--out", str(tmp_path / "cmp")], capsys)
    assert code == 0, err
    import sim

    for est in ("grpo", "reinforce"):
        runs, steps = sim.load_results(tmp_path / "cmp" / est)
        assert runs.estimator.iloc[0] == est and len(steps) == 2
    # both runs' phases in one figure, from the stored results
    code, err = _cli(["figures", "--from", str(tmp_path / "cmp" / "grpo"), "--from", str(tmp_path / "cmp" / "reinforce")],
                     capsys)
    assert code == 0 and (tmp_path / "cmp" / "grpo" / "figures" / "training_phases.png").stat().st_size > 1000, err


@pytest.mark.parametrize("launcher", list(TWO_PROCESS_LAUNCHERS))
def test_two_process_ddp_ranks_end_with_identical_parameters(launcher, tiny_dir, tmp_path):
    worker = Path(__file__).parent / "llm_ddp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([*TWO_PROCESS_LAUNCHERS[launcher], str(worker), str(tiny_dir), str(tmp_path / "ddp")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    hashes = [(tmp_path / "ddp" / f"rank{r}.sha1").read_text() for r in (0, 1)]
    assert hashes[0] == hashes[1]
    # and training changed the parameters
    model, _ = model_mod.load(str(tiny_dir))
    h0 = hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    assert hashes[0] != h0


@pytest.mark.slow
def test_make_tiny_reaches_the_accuracy_band_and_reloads(tmp_path):
    """Slow (about 2 minutes): the offline default model as `sim llm make-tiny` builds it."""
    rec = model_mod.make_tiny(tmp_path / "tiny", log=lambda *a: None)
    assert 0.2 <= rec["sampled_accuracy"] <= 0.8
    model, tok = model_mod.load(str(tmp_path / "tiny"))  # the from_pretrained path of a real model
    held_out = data_mod.arithmetic_examples(200, 1, 10_000)
    acc = model_mod.sampled_accuracy(model, tok, held_out, seed=rec["steps"])
    assert acc == pytest.approx(rec["sampled_accuracy"])


def test_an_interrupted_llm_run_says_what_it_left(tiny_dir, tmp_path, capsys, monkeypatch):
    """Ctrl-C (here raised by the training loop) during an LLM run: exit 130 and one line naming the
    directory with the partial run and how to redo it, no traceback."""
    from sim.llm import trainer as trainer_mod

    def interrupted_run(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_mod.Trainer, "run", interrupted_run)
    out = tmp_path / "o"
    code, err = _cli(["llm", "train", "--model", str(tiny_dir), "--steps", "2", "--out", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 130 and len(lines) == 1, err
    assert lines[0] == (f"interrupted (SIGINT); the run in {out} did not finish (its files there are partial); "
                        "rerun the command to train it again")


def _qwen_with_biases():
    """A tiny Qwen2 (its q/k/v projections carry biases) on the char tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = model_mod.char_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).double(), tok


@pytest.mark.parametrize("spec", ["last-mlp", "mlp", "q_proj", "lm_head"])
def test_combined_gradients_in_one_pass_equal_one_backward_per_row(spec, monkeypatch):
    """The one-backward path (per-sequence gradients of nn.Linear weights and biases from the layer's
    input and output gradient) against the definition, one autograd pass per row, at a reference
    log-prob other than the current one (importance weights != 1); both row-forming forms."""
    model, tok = _qwen_with_biases()
    model.eval()
    gen = torch.Generator().manual_seed(1)
    N, L = 12, 9
    seqs = torch.randint(3, len(tok), (N, L), generator=gen)
    attn = torch.ones(N, L, dtype=torch.long)
    attn[0, -2:] = 0  # a shorter sequence (right padding)
    mask = torch.zeros(N, L - 1, dtype=torch.bool)
    mask[:, 4:] = True
    coeffs = torch.randn(5, N, generator=gen, dtype=torch.float64)
    ref = -torch.rand(N, generator=gen, dtype=torch.float64) - 20.0
    params = [p for _, p in T.diag_parameters(model, spec)]
    assert T._linear_owners(model, params) is not None  # the fast path is taken (q_proj: weights and biases)
    if spec == "q_proj":
        assert any(p.dim() == 1 for p in params)
    with torch.enable_grad():
        fast, logp = T.combined_gradients(model, params, seqs, attn, mask, coeffs, 1.3, ref)
        monkeypatch.setattr(T, "PER_SEQUENCE_BUDGET", 0)
        weighted, _ = T.combined_gradients(model, params, seqs, attn, mask, coeffs, 1.3, ref)
        monkeypatch.setattr(T, "_linear_owners", lambda m, p: None)
        slow, logp_slow = T.combined_gradients(model, params, seqs, attn, mask, coeffs, 1.3, ref)
    assert fast.shape == (5, sum(p.numel() for p in params)) and float(slow.abs().max()) > 0
    torch.testing.assert_close(logp, logp_slow)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6 * float(slow.abs().max()))
    torch.testing.assert_close(weighted, slow, rtol=1e-5, atol=1e-6 * float(slow.abs().max()))


def test_tied_weights_take_the_one_pass_per_row_path():
    # the tiny Llama ties lm_head to the input embedding: its gradient also flows through the lookup
    tok = model_mod.char_tokenizer()
    model = model_mod.tiny_model(len(tok), "tiny", seed=0)
    tied = [p for _, p in T.diag_parameters(model, "lm_head")]
    assert T._linear_owners(model, tied) is None
    assert T._linear_owners(model, [p for _, p in T.diag_parameters(model, "last-mlp")]) is not None


def test_combined_gradients_fall_back_when_a_layer_output_changes_in_place(monkeypatch):
    """A layer's output scaled in place after the call (here by a hook on its parent block) makes
    the captured output gradient that of the scaled value: the one-pass path must notice (tensor
    versions) and take one autograd pass per row, which sees the real graph."""
    model, tok = _qwen_with_biases()
    model.eval()
    mlp = model.model.layers[-1].mlp
    mlp.register_forward_hook(lambda mod, inputs, output: output.mul_(2.0))  # the MLP returns down_proj's output
    gen = torch.Generator().manual_seed(2)
    N, L = 6, 7
    seqs = torch.randint(3, len(tok), (N, L), generator=gen)
    attn = torch.ones(N, L, dtype=torch.long)
    mask = torch.ones(N, L - 1, dtype=torch.bool)
    coeffs = torch.randn(3, N, generator=gen, dtype=torch.float64)
    params = [mlp.down_proj.weight]
    with torch.enable_grad():
        got, _ = T.combined_gradients(model, params, seqs, attn, mask, coeffs)
        monkeypatch.setattr(T, "_linear_owners", lambda m, p: None)
        want, _ = T.combined_gradients(model, params, seqs, attn, mask, coeffs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def _grouped_batch(vocab: int, P: int, G: int, gen, layout: str):
    """P prompts of different lengths with G completions each (of different lengths), prompt-major,
    laid out as the TRL callback does ("right": prompt + completion, right-padded) or as the native
    runner's generate() does ("left": prompts left-padded to one width): (seqs, attn, mask)."""
    prompts = [torch.randint(3, vocab, (5 + 2 * i,), generator=gen) for i in range(P)]
    comps = [torch.randint(3, vocab, (1 + (k * 5) % 6,), generator=gen) for k in range(P * G)]
    pw, cw = max(len(x) for x in prompts), max(len(c) for c in comps)
    L = pw + cw
    seqs = torch.zeros(P * G, L, dtype=torch.long)
    attn = torch.zeros(P * G, L, dtype=torch.long)
    mask = torch.zeros(P * G, L - 1, dtype=torch.bool)
    for k, c in enumerate(comps):
        x = prompts[k // G]
        start = 0 if layout == "right" else pw - len(x)
        end = start + len(x) + len(c)
        seqs[k, start:end] = torch.cat([x, c])
        attn[k, start:end] = 1
        mask[k, start + len(x) - 1:end - 1] = True
    return seqs, attn, mask


@pytest.mark.parametrize("layout", ["right", "left"])
@pytest.mark.parametrize("spec, shared", [("last-mlp", True), ("lm_head", True), ("mlp", False)])
def test_shared_prefix_forward_gives_the_whole_sequence_gradients(spec, shared, layout, monkeypatch):
    """Each distinct prompt run once into a KV cache for its group, then the completions' windows:
    the same log-probs and rows as the whole sequences, in both layouts; taken where the cache does
    not depend on the subset (the last MLP; an untied lm_head), refused where it does (every MLP:
    earlier layers' MLPs feed later layers' keys and values)."""
    model, tok = _qwen_with_biases()
    model.eval()
    gen = torch.Generator().manual_seed(4)
    P, G = 3, 4
    seqs, attn, mask = _grouped_batch(len(tok), P, G, gen, layout)
    coeffs = torch.randn(4, P * G, generator=gen, dtype=torch.float64)
    ref = -torch.rand(P * G, generator=gen, dtype=torch.float64) - 10.0
    params = [p for _, p in T.diag_parameters(model, spec)]
    taken = []
    real = T._shared_prefix_logp
    monkeypatch.setattr(T, "_shared_prefix_logp", lambda *a: taken.append(real(*a)) or taken[-1])
    with torch.enable_grad():
        got, logp = T.combined_gradients(model, params, seqs, attn, mask, coeffs, 0.8, ref)
        want, logp_whole = T.combined_gradients(model, params, seqs, attn, mask, coeffs, 0.8, ref, shared_prefix=False)
    assert len(taken) == 1 and (taken[0] is not None) == shared
    assert float(want.abs().max()) > 0
    torch.testing.assert_close(logp, logp_whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_sequences_without_a_coefficient_are_not_run(tiny_dir, monkeypatch):
    """A zero-std group's sequences (every coefficient 0) and a sequence with no predicted token add
    nothing to a row: they are left out of the forward (their log-probs NaN: not computed; 0 with no
    token), and the rows equal the definition sum_k C_jk grad log pi(y_k) over all sequences."""
    model, tok = model_mod.load(str(tiny_dir), device="cpu")
    model.eval()
    gen = torch.Generator().manual_seed(5)
    P, G = 3, 4
    seqs, attn, mask = _grouped_batch(len(tok), P, G, gen, "right")
    coeffs = torch.randn(2, P * G, generator=gen, dtype=torch.float64)
    coeffs[:, G:2 * G] = 0.0  # prompt 1: a zero-std group
    mask[0] = False  # no predicted token
    params = [p for _, p in T.diag_parameters(model, "last-mlp")]
    batch = []
    real = T._shared_prefix_logp
    monkeypatch.setattr(T, "_shared_prefix_logp", lambda model, modules, s, *a: batch.append(s.shape[0]) or
                        real(model, modules, s, *a))
    with torch.enable_grad():
        rows, logp = T.combined_gradients(model, params, seqs, attn, mask, coeffs)
        whole = (T.token_logprobs(model, seqs, attn) * mask).sum(-1)
        want = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad((c.float() * whole).sum(), params,
                                                                                  retain_graph=True)])
                            for c in coeffs])
    assert batch == [P * G - G - 1]
    assert logp[0] == 0 and bool(logp[G:2 * G].isnan().all())
    live = torch.ones(P * G, dtype=torch.bool)
    live[0], live[G:2 * G] = False, False
    torch.testing.assert_close(logp[live], whole.detach()[live], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    with pytest.raises(ValueError, match="ref_logp"):  # a reference that was not computed, where it is needed
        T.combined_gradients(model, params, seqs, attn, mask, torch.ones(1, P * G), ref_logp=logp)


def test_a_model_that_ignores_the_cache_falls_back_to_whole_sequences(tiny_dir):
    """The shared-prefix forward is checked once per model against the whole sequences: a model
    whose forward drops the KV cache (its windows then miss the prompt) fails the check, is marked,
    and gets the whole-sequence numbers."""
    inner, tok = model_mod.load(str(tiny_dir), device="cpu")

    class DropsCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
            if past_key_values is not None:  # the window alone, numbered from 0
                attention_mask, position_ids = attention_mask[:, -input_ids.shape[1]:], None
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=use_cache)

    model = DropsCache().eval()
    gen = torch.Generator().manual_seed(6)
    seqs, attn, mask = _grouped_batch(len(tok), 2, 3, gen, "right")
    coeffs = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    params = [p for _, p in T.diag_parameters(model, "last-mlp")]
    with torch.enable_grad():
        got, logp = T.combined_gradients(model, params, seqs, attn, mask, coeffs)
        want, logp_whole = T.combined_gradients(model, params, seqs, attn, mask, coeffs, shared_prefix=False)
    assert T._PREFIX_AGREES.get(model) is False
    torch.testing.assert_close(logp, logp_whole)
    torch.testing.assert_close(got, want)


def test_half_group_rows_give_the_gain_of_separate_passes_on_the_two_halves(tiny_dir):
    """gain_from_rows(combined_gradients(half_group_rows)) against the gain computed from three
    separate autograd passes on the half-groups alone (the definition: g_B from the second half with
    its own mean baseline over P (G - G/2) samples, u_E from the first half with E's advantages)."""
    model, tok = model_mod.load(str(tiny_dir), device="cpu")
    model.eval()
    P, G, L = 3, 6, 8
    gen = torch.Generator().manual_seed(3)
    seqs = torch.randint(3, len(tok), (P * G, L), generator=gen)
    attn = torch.ones(P * G, L, dtype=torch.long)
    mask = torch.zeros(P * G, L - 1, dtype=torch.bool)
    mask[:, 3:] = True
    rewards = (torch.rand(P, G, generator=gen) < 0.5).double()
    rewards[0, :3] = torch.tensor([1.0, 0.0, 1.0])  # a spread in the first half of prompt 0
    params = [p for _, p in T.diag_parameters(model, "last-mlp")]
    with torch.enable_grad():
        rows, _ = T.combined_gradients(model, params, seqs, attn, mask, T.half_group_rows(rewards, 1, 1e-4))
        half = G // 2

        def summed(idx, coeff):  # sum_k coeff_k grad log pi(y_k) over the sequences idx
            logp = (T.token_logprobs(model, seqs[idx], attn[idx]) * mask[idx]).sum(-1)
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad((coeff.float() * logp).sum(), params)])

        a = torch.tensor([i * G + g for i in range(P) for g in range(half)])
        b = torch.tensor([i * G + g for i in range(P) for g in range(half, G)])
        r_a, r_b = rewards[:, :half], rewards[:, half:]
        g_b = summed(b, ((r_b - r_b.mean(-1, keepdim=True)) / (P * (G - half))).reshape(-1))
        u = {name: summed(a, (estimators.advantages(name, r_a, ddof=1, eps=1e-4) / (P * half)).reshape(-1))
             for name in ("grpo", "reinforce")}
    for j, want in enumerate((g_b, u["grpo"], u["reinforce"])):
        torch.testing.assert_close(rows[j], want, rtol=1e-4, atol=1e-6 * float(want.abs().max()) + 1e-12)
    change = {n: float(g_b.double() @ u[n].double()) for n in u}
    gain, reason = T.gain_from_rows(rows)
    if change["reinforce"] > 0:
        assert reason == "" and gain == pytest.approx(change["grpo"] / change["reinforce"], rel=1e-3)
    else:
        assert reason == "reinforce_not_improving" and gain != gain
    assert T.gain_from_rows(None)[1] == "group_too_small" and T.half_group_rows(rewards[:, :3], 1, 1e-4) is None
