"""LLM step time, native runner vs TRL's GRPOTrainer, with and without grpo-sim's diagnostics (not part of
the test suite). Run: python bench/llm_backends.py [--model DIR] [--steps N] [--rounds R] [--reward coin|task]

Same model, batch (P prompts x G completions), completion length and optimizer in every case; each
case is timed over N steps after one warm-up step, in R alternating rounds (medians), as this
machine's speed drifts. Diagnostics every step (the worst case; the default is every 10).
Prints seconds per step and the ratios the issue's goals name: callback overhead (TRL with / without
the callback) and native / TRL.

Rewards (--reward): "coin" (default), a fair coin per distinct completion text (crc32 parity), so
almost every group has a spread and the diagnostics run on every sequence, their worst case; "task"
the arithmetic task's own reward, all 0 for an untrained model (every group zero-std: the
diagnostics skip all sequences, their best case).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import zlib
from pathlib import Path

import torch


def _tiny(d: Path) -> str:
    from sim.llm import model as M

    tok = M.char_tokenizer()
    M.tiny_model(len(tok), "tiny", seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def coin_reward(completion: str, answer, kind) -> float:
    """1 or 0 by the parity of the completion text's crc32: a fair coin per distinct completion."""
    return float(zlib.crc32(completion.encode()) & 1)


def use_reward(name: str):
    """The reward both backends score with (the native runner's is patched in sim.llm.trainer)."""
    import sim.llm.trainer as trainer
    from sim.llm.rewards import reward

    trainer.reward = coin_reward if name == "coin" else reward
    return trainer.reward


def native_step_seconds(model: str, steps: int, P: int, G: int, diag: bool, out: Path) -> float:
    from sim.llm.trainer import LLMConfig, Trainer

    cfg = LLMConfig(model=model, steps=steps, prompts_per_step=P, group_size=G, max_new_tokens=8,
                    diag_every=1 if diag else 0, device="cpu")
    tr = Trainer(cfg, out, log=lambda *a: None)
    tr.step(0)  # warm-up
    t0 = time.perf_counter()
    for s in range(1, steps + 1):
        tr.step(s)
    return (time.perf_counter() - t0) / steps


def trl_step_seconds(model: str, steps: int, P: int, G: int, callback: bool, out: Path, reward_name: str = "coin",
                     zero_std: list | None = None) -> float:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from sim.llm import data as data_mod
    from sim.llm import model as model_mod
    from sim.llm.trl import GrpoSimDiagnostics

    m, tok = model_mod.load(model, device="cpu")
    ex = data_mod.load_data("arith", seed=0)
    ds = Dataset.from_dict({"prompt": [e.prompt for e in ex], "answer": [e.answer for e in ex],
                            "kind": [e.kind for e in ex]})

    reward = use_reward(reward_name)

    def task_reward(prompts, completions, answer, kind, **kw):
        return [reward(c, a, k) for c, a, k in zip(completions, answer, kind)]

    class Clock(TrainerCallback):  # time from the end of the warm-up step to the end of the last
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                self.t0 = time.perf_counter()
            self.t1 = time.perf_counter()

    clock = Clock()
    diag = GrpoSimDiagnostics(num_generations=G, every=1)
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=P * G, num_generations=G,
                      max_completion_length=8, learning_rate=5e-4, max_steps=steps + 1, beta=0.0, report_to=[],
                      save_strategy="no", use_cpu=True, logging_steps=10_000, disable_tqdm=True)
    trainer = GRPOTrainer(model=m, args=args, train_dataset=ds, processing_class=tok,
                          reward_funcs=diag.wrap(task_reward) if callback else task_reward,
                          callbacks=[clock] + ([diag] if callback else []))
    trainer.train()
    if zero_std is not None and callback:
        zero_std.extend(r["zero_std_frac"] for r in diag.rows)
    return (clock.t1 - clock.t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model directory (default: an untrained tiny model)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--reward", choices=("coin", "task"), default="coin")
    a = ap.parse_args()
    use_reward(a.reward)
    zero_std: list[float] = []
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as d:
        model = a.model or _tiny(Path(d) / "tiny")
        cases = {"native": lambda: native_step_seconds(model, a.steps, a.prompts, a.group_size, False, Path(d) / "n"),
                 "native + diagnostics": lambda: native_step_seconds(model, a.steps, a.prompts, a.group_size, True,
                                                                     Path(d) / "nd"),
                 "TRL": lambda: trl_step_seconds(model, a.steps, a.prompts, a.group_size, False, Path(d) / "t",
                                                 a.reward),
                 "TRL + callback": lambda: trl_step_seconds(model, a.steps, a.prompts, a.group_size, True,
                                                            Path(d) / "tc", a.reward, zero_std)}
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(a.rounds):
            for k, fn in cases.items():
                times[k].append(fn())
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"P = {a.prompts} prompts x G = {a.group_size}, 8 new tokens, {a.steps} steps x {a.rounds} rounds (medians), "
          f"{a.reward} reward: zero-std groups {100 * sum(zero_std) / max(1, len(zero_std)):.0f}% (TRL + callback)")
    for k, v in med.items():
        print(f"  {k:22s} {v:.3f} s/step")

    def ratio(num: str, den: str) -> str:  # per-round ratios (one machine speed each): median [min, max]
        r = sorted(n / d for n, d in zip(times[num], times[den]))
        return f"{r[len(r) // 2]:.2f} [{r[0]:.2f}, {r[-1]:.2f}]"

    print(f"  per-round ratios, median [min, max]: TRL with / without the callback {ratio('TRL + callback', 'TRL')}"
          f" (goal <= 1.15); native / TRL {ratio('native', 'TRL')} (goal <= 1); native with / without "
          f"diagnostics {ratio('native + diagnostics', 'native')}")


if __name__ == "__main__":
    main()
