"""grpo-sim's diagnostics inside TRL's GRPOTrainer, through its public hooks (tested with TRL 1.16).

A TRL user adds two things to a GRPOTrainer they already have:

    diag = GrpoSimDiagnostics(num_generations=args.num_generations, out="results/trl-run")
    trainer = GRPOTrainer(model=..., reward_funcs=diag.wrap(my_reward), args=args,
                          train_dataset=..., callbacks=[diag])

``wrap`` returns a reward function that calls theirs unchanged (TRL sees the same rewards) and, on
the way, measures what the simulator measures, logged through TRL's ``log_metric`` hook (so they
reach TRL's logs, wandb or tensorboard under ``grpo_sim/``):

    sigma_mean, sigma_max   mean and largest per-prompt reward std sigma_i (population form, ddof 0)
                            over the groups of the step (gathered across processes)
    zero_std_frac           fraction of groups whose rewards are all equal (zero advantage for every
                            std-normalized or mean-baseline estimator)
    predicted_gain          sigma_bound / running mean of sigma_bar (theory.predicted_gain;
                            sigma_bound = (r_max - r_min) / 2 of ``reward_range``)
and every ``every`` steps (0: never), on the parameter subset ``diag_params`` (sim.llm.trainer.diag_parameters):
    rho                     1 - mean |cos| of the per-prompt gradient estimates (1/G) sum_g (r - mean) grad log pi
    gain                    dJ_GRPO / dJ_REINFORCE, the first-order one-step changes along each
                            estimator's update from independent half-groups (sim.llm.trainer.half_group_rows)
    empirical_M             max_i ||g_i(theta_t+1) - g_i(theta_t)|| / ||theta_t+1 - theta_t|| / sigma_i, the
                            per-prompt estimates before and after the step's update on the same samples
                            (``on_step_end``; logged with the next step's metrics, TRL's being gathered
                            before the update)

At the end of training (``on_train_end``) the steps and a one-row runs table are written to ``out`` as
a grpo-sim results directory (manifest.json, runs.parquet, steps.parquet, with phase labels from
theory.label_phases) that ``sim.load_results`` reads.

Scope. Log-probabilities are recomputed from the prompt text (tokenized by the trainer's
processing class, as TRL does) and the completion ids TRL passes, at ``args.temperature``. The
gradient diagnostics use the process's own groups (only groups wholly on one process; the reward
statistics use every group, gathered); under DeepSpeed ZeRO-3 or FSDP the parameters are sharded,
and the gradient diagnostics are refused (``rho``/``gain``/``empirical_M`` are not logged) rather than computed on
shards. With several reward functions only the wrapped one is measured (wrap the sum yourself to
measure the total). Conversational prompts are not supported by the gradient diagnostics. The
gradients of a diagnosed step take one forward and one backward pass, and the empirical M one
more at theta_t+1, which runs in the same pass as the next step's diagnostics when TRL generates
before every update and that next step is itself diagnosed (or needs rho_t for an adaptive
estimator); otherwise it runs alone (sim.llm.trainer.combined_gradients, batched_gradients).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import TrainerCallback

import theory
from sim.llm.trainer import eval_mode
from sim.results import stable_id, write_manifest, write_parquet


#: The TRL versions this module is tested with (the hooks it uses: reward kwargs log_metric and
#: trainer_state, TrainerCallback.on_train_begin's model / processing_class).
TESTED_TRL = ">=1.16,<1.17"


class GrpoSimDiagnostics(TrainerCallback):
    """The callback and reward wrapper of the module docstring."""

    def __init__(self, num_generations: int, out: str | Path | None = None, every: int = 1,
                 diag_params: str = "last-mlp", reward_range: tuple[float, float] = (0.0, 1.0),
                 ddof: int = 1, eps: float = 1e-4, config: dict | None = None):
        if num_generations < 2:
            raise ValueError("num_generations: grpo-sim's diagnostics need groups of at least 2 completions")
        self.G, self.out, self.every, self.diag_params = num_generations, out, max(0, every), diag_params
        self.sigma_bound = float(theory.reward_std_bound(*reward_range))
        self.ddof, self.eps = ddof, eps
        self.config = dict(config or {})  # recorded with the run (manifest, runs.parquet)
        self.last_rewards = np.zeros(0)
        self.model = self.tokenizer = None
        self.temperature = 1.0
        self.rows: list[dict] = []
        self.refused = ""
        self.rho_every_step = False  # set by SimGRPOTrainer for an estimator that reads rho_t (grpo_phase)
        self.last_rho: float | None = None
        self._pending_m: dict | None = None  # what the empirical M of a diagnosed step needs after its update
        self.defer_m = False  # its pass waits for the next step's reward call (on_train_begin)
        self.last_empirical_M: float | None = None  # logged at the next step's rewards

    # -- TrainerCallback ------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.model = model
        self.tokenizer = processing_class if processing_class is not None else kwargs.get("tokenizer")
        self.temperature = float(getattr(args, "temperature", 1.0) or 1.0)
        self.args = args
        # TRL generates (and calls the reward functions) every steps_per_generation * num_iterations
        # micro-steps; when that divides the accumulation steps, the first training reward call after an
        # optimizer step comes before the next one, at theta_t+1, and the empirical M's pass runs there,
        # in the same forward as that step's diagnostics (sim.llm.trainer.batched_gradients)
        accumulate = getattr(args, "gradient_accumulation_steps", None) or 0
        generate_every = (getattr(args, "steps_per_generation", None) or accumulate) * \
            (getattr(args, "num_iterations", None) or 1)
        self.defer_m = bool(accumulate and generate_every) and accumulate % generate_every == 0
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            self.refused = "sharded parameters (DeepSpeed / FSDP): gradient diagnostics are not computed"

    def on_train_end(self, args, state, control, **kwargs):
        if self.out is None or not state.is_world_process_zero or not self.rows:
            return
        if self._pending_m is not None and self._pending_m.get("updated"):  # the last step's, at the final theta
            pending, self._pending_m = self._pending_m, None
            self._finish_m(pending)
        out = Path(self.out)
        out.mkdir(parents=True, exist_ok=True)
        steps = pd.DataFrame(self.rows)
        cfg = {"backend": "trl-callback", "estimator": "trl", **self.config, "num_generations": self.G,
               "every": self.every,
               "diag_params": self.diag_params, "sigma_bound": self.sigma_bound,
               "temperature": self.temperature, "model": getattr(getattr(self.model, "config", None),
                                                                 "_name_or_path", "")}
        rid = stable_id(cfg, 16)
        steps.insert(0, "run_id", rid)
        from sim.llm.trainer import phase_labels, run_summary

        diagnosed = steps["rho"].notna() if "rho" in steps else pd.Series(False, index=steps.index)
        steps["phase"] = phase_labels(steps, diagnosed)
        runs = pd.DataFrame([{"run_id": rid, **cfg, **run_summary(steps), "diagnostics_refused": self.refused}])
        write_manifest(out, {"trl": cfg}, [{"run_id": rid, **cfg}], kind="trl",
                       world_size=int(getattr(args, "world_size", 1)))
        write_parquet(steps, out / "steps.parquet")
        write_parquet(runs, out / "runs.parquet")

    # -- the reward wrapper ---------------------------------------------------------------------
    def wrap(self, reward_func):
        """A reward function for GRPOTrainer that returns ``reward_func``'s rewards unchanged and
        measures them (module docstring)."""
        def wrapped(prompts, completions, completion_ids=None, **kwargs):
            rewards = reward_func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
            try:
                self._measure(prompts, completion_ids, rewards, kwargs)
            except Exception as e:  # a diagnostic must never stop a training run
                self.refused = f"diagnostics failed: {type(e).__name__}: {e}"
            return rewards

        wrapped.__name__ = getattr(reward_func, "__name__", "reward")
        return wrapped

    def _measure(self, prompts, completion_ids, rewards, kwargs) -> None:
        from accelerate.utils import gather_object

        evaluating = self.model is not None and not self.model.training  # TRL's evaluate (its own mode switch)
        if not evaluating:  # (an evaluation reuses the last training step's rho_t)
            self.last_rho = None  # this step's, or none (a failed measurement is not last step's value)
        state = kwargs.get("trainer_state")
        log_metric = kwargs.get("log_metric", lambda name, value: None)
        step = int(state.global_step) if state is not None else len(self.rows)
        local = [math.nan if r is None else float(r) for r in rewards]
        every = np.asarray(gather_object(local), dtype=np.float64)
        self.last_rewards = every  # all processes' rewards in TRL's order (SimGRPOTrainer reads them)
        self.last_prompts = gather_object([str(p) for p in prompts])  # their prompts (adaptive estimators' keys)
        if len(every) % self.G or evaluating:
            return  # an evaluation is not diagnosed: the diagnostics describe training steps
        deferred = None  # the last diagnosed step's empirical M, its update done (on_step_end): theta_t+1 now
        if self._pending_m is not None and self._pending_m.get("updated"):
            deferred, self._pending_m = self._pending_m, None
        groups = every.reshape(-1, self.G)  # TRL's layout: each prompt's G completions consecutive
        sigma = groups.std(-1)
        row = {"step": step, "J": float(np.nanmean(groups)), "sigma_bar": float(np.nanmean(sigma)),
               "sigma_max": float(np.nanmax(sigma)), "zero_std_frac": float((sigma == 0).mean()),
               "sigma_per_prompt": sigma}
        past = [r["sigma_bar"] for r in self.rows] + [row["sigma_bar"]]
        row["predicted_gain"] = float(theory.predicted_gain(torch.tensor(past, dtype=torch.float64)[:, None],
                                                            self.sigma_bound))
        measurable = not self.refused and completion_ids is not None
        diagnose = bool(self.every) and step % self.every == 0 and measurable
        mine = None  # this process's rho_t for an adaptive estimator that reads it at every step
        try:
            if diagnose or (self.rho_every_step and measurable):  # one pass of per-prompt gradients for both
                measured = self._gradient_diagnostics(prompts, completion_ids, local, gain=diagnose, after=deferred)
                mine = measured.pop("rho_live", None)
                if self._pending_m is not None and "row" not in self._pending_m:
                    self._pending_m["row"] = row  # the empirical M, measured after the update, goes to this row
                if diagnose:
                    row.update(measured)
            if deferred is not None and not deferred.get("done"):  # no diagnostics to share the pass with
                self._finish_m(deferred)
        finally:  # a failed merged pass: the last diagnosed step's empirical M is unknown, not missing
            if deferred is not None and not deferred.get("done") and "row" in deferred:
                deferred["row"]["empirical_M"] = math.nan
        if self.rho_every_step:  # the processes' mean; None where none could measure it
            got = [x for x in gather_object([mine]) if x is not None]
            # NaN where no process had two live prompts: the rule keeps its state (phase_aware_alpha)
            self.last_rho = float(np.mean(got)) if got else None
        for name in ("sigma_bar", "sigma_max", "zero_std_frac", "predicted_gain", "rho", "gain"):
            if name in row and row[name] == row[name]:
                log_metric(f"grpo_sim/{name if name != 'sigma_bar' else 'sigma_mean'}", row[name])
        if self.last_empirical_M is not None:  # the last diagnosed step's, measured after its update
            log_metric("grpo_sim/empirical_M", self.last_empirical_M)
            self.last_empirical_M = None
        self.rows.append(row)

    def _gradient_diagnostics(self, prompts, completion_ids, local: list[float], gain: bool = True,
                              after: dict | None = None) -> dict:
        """rho and the measured gain (``gain``) on this process's whole groups (module docstring), and
        rho_live, rho over the pairs of non-zero gradients (NaN without one) as the adaptive rule
        reads it, from the same gradients; all from one forward and one backward pass
        (sim.llm.trainer.prompt_and_gain_gradients), which also runs the empirical M's pass of the
        last diagnosed step (``after``, deferred by on_step_end) at this theta, and finishes it. On a
        ``gain`` step it keeps what this step's empirical M needs after the update."""
        from sim.llm.trainer import diag_parameters, prompt_and_gain_gradients

        n = (len(local) // self.G) * self.G
        if n < 2 * self.G or self.model is None or self.tokenizer is None or not isinstance(prompts[0], str):
            return {}
        model = self.model
        params = [p for _, p in diag_parameters(model, self.diag_params)]
        tok = self.tokenizer
        device = next(model.parameters()).device
        distinct = list(dict.fromkeys(prompts[:n]))  # a group's G completions share their prompt: tokenized once
        prompt_ids = dict(zip(distinct, tok(distinct, add_special_tokens=False)["input_ids"]))
        completions = [list(c) for c in completion_ids[:n]]
        lengths = [len(prompt_ids[p]) + len(c) for p, c in zip(prompts[:n], completions)]
        width = max(lengths)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        eos = tok.eos_token_id if tok.eos_token_id is not None else -1
        rows = np.full((n, width), pad, dtype=np.int64)
        attn = torch.zeros((n, width), dtype=torch.long)
        mask = torch.zeros((n, width - 1), dtype=torch.bool)
        for k, (p, c) in enumerate(zip(prompts[:n], completions)):
            x, pl = prompt_ids[p], len(prompt_ids[p])
            rows[k, :pl], rows[k, pl:lengths[k]] = x, c
            attn[k, :lengths[k]] = 1
            counted = c.index(eos) + 1 if eos in c else len(c)  # up to and including the first eos, as TRL
            mask[k, pl - 1:pl - 1 + counted] = True
        ids = torch.from_numpy(rows)
        ids, attn, mask = ids.to(device), attn.to(device), mask.to(device)
        r = torch.tensor(local[:n], dtype=torch.float64).reshape(-1, self.G)
        also = [self._after_batch(after)] if after is not None else []
        with eval_mode(self.model), torch.enable_grad():
            g, logp, measured, *others = prompt_and_gain_gradients(model, params, ids, attn, mask, r, self.ddof,
                                                                   self.eps, self.temperature, gain=gain, also=also)
        theta = self._finish_m(after, others[0][0]) if others else None  # (this theta: the last step's after)
        if gain:  # the empirical M of this step is measured after the update, on the same samples
            centred = r - r.mean(-1, keepdim=True)
            self._pending_m = {"inputs": (ids, attn, mask, centred, logp), "g_before": g,
                               "sigma": r.std(-1, correction=0),
                               "theta_before": theta if theta is not None else self._trainable_vector()}
        gram = g.double() @ g.double().T
        return {"rho": float(theory.gradient_orthogonality(gram)),
                "rho_live": float(theory.gradient_orthogonality(gram, live_only=True)),
                **(dict(zip(("gain", "gain_undefined"), measured)) if gain else {})}

    def on_step_end(self, args, state, control, **kwargs):
        """The empirical M of the last diagnosed step, after its update theta_t -> theta_t+1:
        max_i ||g_i(theta_t+1) - g_i(theta_t)|| / ||theta_t+1 - theta_t|| / sigma_i over prompts with
        sigma_i > 0, g_i the per-prompt estimate on the diagnostic subset, at theta_t+1 on the same
        samples importance-weighted (the native runner's definition, sim.llm.trainer.empirical_m; NaN
        where the update did not move theta beyond rounding). Where TRL's schedule brings the next
        reward call before the next update (``defer_m``) its pass runs there, with that step's
        diagnostics, else here. It is logged as grpo_sim/empirical_M at the next step's rewards (TRL's
        metrics of a step are gathered before its update), so the last step's reaches only the
        results directory, where it is written with its own row."""
        pending = self._pending_m
        if pending is None or self.model is None:
            return
        if self.defer_m and not pending.get("updated"):
            pending["updated"] = True  # theta_t+1 stays the model's until the next reward call
            return
        self._pending_m = None
        if pending.get("updated"):  # a second update came before any reward call: theta_t+1 is gone
            if "row" in pending:
                pending["row"]["empirical_M"] = math.nan
            return
        self._finish_m(pending)

    def _after_batch(self, pending: dict) -> tuple:
        """The empirical M's batch for sim.llm.trainer.batched_gradients: the diagnosed step's samples,
        the per-prompt rows of their centred rewards, importance-weighted from their log-probs then."""
        from sim.llm.trainer import prompt_rows

        ids, attn, mask, centred, logp = pending["inputs"]
        return ids, attn, mask, prompt_rows(centred), logp

    def _finish_m(self, pending: dict, g_after: torch.Tensor | None = None) -> torch.Tensor | None:
        """The empirical M of ``pending`` at the model's theta (on_step_end's formula), from the
        per-prompt estimates there (``g_after`` [P, n]; computed here when None); it sets
        last_empirical_M and the diagnosed step's row, and returns that theta (on the CPU; None if
        the diagnostics failed)."""
        pending["done"] = True
        theta = None
        try:
            from sim.llm.trainer import batched_gradients, diag_parameters, empirical_m

            if g_after is None:
                params = [p for _, p in diag_parameters(self.model, self.diag_params)]
                with eval_mode(self.model), torch.enable_grad():
                    (g_after, _), = batched_gradients(self.model, params, [self._after_batch(pending)],
                                                      self.temperature)
            theta_before = pending["theta_before"]
            theta = self._trainable_vector()
            dtheta = float((theta - theta_before).norm())
            smooth = (g_after - pending["g_before"]).norm(dim=-1).double().cpu() / max(dtheta, 1e-30)  # [P]
            value = empirical_m(smooth, pending["sigma"], dtheta, float(theta_before.norm()))
        except Exception as e:  # a diagnostic must never stop a training run
            self.refused = f"diagnostics failed: {type(e).__name__}: {e}"
            if "row" in pending:  # unknown, not missing
                pending["row"]["empirical_M"] = math.nan
            return None
        self.last_empirical_M = value if value == value else None
        if "row" in pending:
            pending["row"]["empirical_M"] = value
        return theta

    def _trainable_vector(self) -> torch.Tensor:
        """theta, the trainable parameters flattened in float32, on the CPU (not beside the model)."""
        return torch.cat([p.detach().reshape(-1).float().cpu() for p in self.model.parameters() if p.requires_grad])


#: LLMConfig.loss_agg -> TRL's loss_type (DESIGN.md §4).
TRL_LOSS_TYPES = {"seq-mean-token-mean": "grpo", "token-mean": "dapo", "token-mean-local": "bnpo",
                  "seq-mean-token-sum-norm": "dr_grpo"}


def sim_grpo_trainer():
    """GRPOTrainer with grpo-sim's estimators: the thinnest subclass (TRL has no public hook for the
    advantages). It overrides the private ``_generate_and_score_completions`` (pinned: TESTED_TRL,
    and tests/test_llm_trl.py checks the method exists): TRL generates and scores as usual, then the
    advantages of the whole batch (all processes' rewards, gathered by the diagnostics' reward
    wrapper) are replaced by ``sim.estimators.advantages(estimator, rewards [P, G])`` and this
    process's slice kept, as TRL slices its own. TRL's own advantages stay in ``trl_advantages``
    (so tests can check that a TRL preset reproduces them). Returns the class."""
    from trl import GRPOTrainer

    from sim import estimators

    class SimGRPOTrainer(GRPOTrainer):
        def __init__(self, *args, sim_estimator: str, sim_diagnostics: GrpoSimDiagnostics, sim_ddof: int = 1,
                     sim_eps: float = 1e-4, **kwargs):
            spec = estimators.get(sim_estimator)  # a one-line error for an unknown name, before TRL starts
            self.sim_estimator, self.sim_diag, self.sim_ddof, self.sim_eps = sim_estimator, sim_diagnostics, \
                sim_ddof, sim_eps
            # an adaptive estimator's state across steps, keyed by the prompt (sim.estimators.PromptStates)
            self.sim_adaptive = estimators.PromptStates(sim_estimator, sim_ddof, sim_eps) if spec.adaptive else None
            sim_diagnostics.rho_every_step = bool(spec.adaptive and spec.adaptive.needs_rho)
            self.trl_advantages = None
            super().__init__(*args, **kwargs)

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            rewards = torch.as_tensor(self.sim_diag.last_rewards, dtype=torch.float64).view(-1, self.num_generations)
            if self.sim_adaptive is None:
                adv = estimators.advantages(self.sim_estimator, rewards, ddof=self.sim_ddof, eps=self.sim_eps)
            else:  # TRL's layout: each prompt's G completions consecutive, so every G-th prompt is a row's
                keys = self.sim_diag.last_prompts[::self.num_generations]
                rho = None
                if self.sim_diag.rho_every_step:
                    if self.sim_diag.last_rho is None:
                        raise ValueError(f"estimator {self.sim_estimator} reads rho_t at every step, which the "
                                         f"diagnostics could not measure ({self.sim_diag.refused or 'no gradients'})")
                    rho = torch.tensor(self.sim_diag.last_rho, dtype=torch.float64)
                adv = self.sim_adaptive(rewards, keys, rho)
            adv = adv.reshape(-1)
            adv = torch.nan_to_num(adv, nan=0.0)  # unscorable completions carry no signal (as TRL)
            n = out["advantages"].shape[0]
            local = adv[self.accelerator.process_index * n:(self.accelerator.process_index + 1) * n]
            self.trl_advantages = out["advantages"].detach().clone()
            out["advantages"] = local.to(out["advantages"].device, out["advantages"].dtype)
            self._sim_last_advantages = out["advantages"].detach().clone()
            return out

    return SimGRPOTrainer


def run_trl(cfg, out: Path, log=print):
    """`sim llm train --backend trl`: the native runner's data, rewards, model loading and estimator
    (sim.llm.trainer.LLMConfig), trained by TRL's GRPOTrainer (sim_grpo_trainer) with the
    diagnostics callback, whose results directory is ``out``. One optimizer step per generation
    batch (TRL's defaults: num_iterations 1, no KL: beta 0), so TRL's clipped ratio is 1 and its loss
    is the native policy-gradient loss with the same aggregation (TRL_LOSS_TYPES).
    Returns (runs, steps) as sim.load_results reads them."""
    import dataclasses

    from datasets import Dataset
    from trl import GRPOConfig

    import sim
    from sim.config import resolve_device
    from sim.llm import data as data_mod
    from sim.llm import model as model_mod
    from sim.llm.rewards import reward

    model, tok = model_mod.load(cfg.model, device="cpu")
    examples = data_mod.load_data(cfg.data, difficulty=cfg.difficulty, seed=cfg.seed)
    ds = Dataset.from_dict({"prompt": [e.prompt for e in examples], "answer": [e.answer for e in examples],
                            "kind": [e.kind for e in examples]})

    def task_reward(prompts, completions, answer, kind, **kwargs):
        return [reward(c, a, k) for c, a, k in zip(completions, answer, kind)]

    diag = GrpoSimDiagnostics(num_generations=cfg.group_size, out=out, every=cfg.diag_every,
                              diag_params=cfg.diag_params, ddof=cfg.ddof, eps=cfg.eps,
                              config={**dataclasses.asdict(cfg), "backend": "trl"})
    args = GRPOConfig(output_dir=str(Path(out) / "trl"), per_device_train_batch_size=cfg.prompts_per_step * cfg.group_size,
                      num_generations=cfg.group_size, max_completion_length=cfg.max_new_tokens,
                      temperature=cfg.temperature, learning_rate=cfg.lr, lr_scheduler_type="constant",
                      optim="adamw_torch" if cfg.optimizer == "adamw" else "sgd", weight_decay=0.0,
                      max_steps=cfg.steps, beta=0.0, loss_type=TRL_LOSS_TYPES[cfg.loss_agg], logging_steps=1,
                      report_to=[], save_strategy="no", seed=cfg.seed, use_cpu=resolve_device(cfg.device) == "cpu",
                      top_k=0, top_p=1.0)
    trainer = sim_grpo_trainer()(model=model, args=args, train_dataset=ds, processing_class=tok,
                                 reward_funcs=diag.wrap(task_reward), callbacks=[diag], sim_estimator=cfg.estimator,
                                 sim_diagnostics=diag, sim_ddof=cfg.ddof, sim_eps=cfg.eps)
    trainer.train()
    trainer.save_model(str(Path(out) / "final"))  # every rank calls it (ZeRO-3 / FSDP gather); rank 0 writes
    trainer.accelerator.wait_for_everyone()  # no rank leaves (and tears down its process group) early
    return sim.load_results(out)


def tested_trl_installed() -> bool:
    """True when the installed TRL is in TESTED_TRL (the hooks above exist there)."""
    try:
        import trl
        from packaging.specifiers import SpecifierSet
    except ImportError:
        return False
    return trl.__version__ in SpecifierSet(TESTED_TRL)


__all__ = ["GrpoSimDiagnostics", "TESTED_TRL", "TRL_LOSS_TYPES", "run_trl", "sim_grpo_trainer", "tested_trl_installed"]
