"""Vectorized training loop: R runs sharing a problem shape train in one torch program.

Dimension legend
    R   runs in the batch       P   prompts          K   responses
    G   group size              k   private dims     s   shared dims
    L   logged steps

Update (both modes), with the gradient estimate averaged over prompts (DESIGN.md §4):

    theta <- theta + lr * (1/P) sum_i g_i,   g_i = sum_y w_iy phi(x_i, y)

exact mode:    w_iy = s_i pi_iy (rbar_iy - mu_i), s_i = estimators.population_scale (the
               population form: 1 for REINFORCE-type, 1/(sigma_i + eps) for GRPO, sigma_i the
               std of the mean reward);
sampled mode:  w_i = (1/G) sum_k A_ik (e_(y_ik) - pi_i), y_ik ~ pi_i, A = estimators.advantages
               on the observed rewards R_ik = c_i Bernoulli(q(y_ik)).

Random draws come from sim.rng keyed by (run seed, step, stream), so a run's trajectory
does not depend on the batch it is in. Float64 by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

import theory
from sim import estimators
from sim.config import RunConfig, TrainConfig
from sim.problems import Problem, make_problem, stack_problems
from sim.rng import run_keys, uniforms

#: Train fields every run of a batch must share (lr, seed and lr_rule may differ per run).
BATCH_FIELDS = ("estimator", "mode", "group_size", "steps", "eps", "ddof", "target_fraction", "log_points")

#: Per-step metric columns written to steps.parquet (besides run_id, step, sigma_per_prompt).
STEP_METRICS = ("J", "sigma_bar", "sigma_min", "sigma_max", "grad_norm", "rho",
                "empirical_M", "analytic_M", "m_bound_ratio", "step_gain")

#: Relaxed condition factor: sigma_i may not drop by more than this within one step.
RELAXED_FACTOR = 2.0


def batch_key(run: RunConfig) -> tuple:
    """Runs with equal keys can share one vectorized batch."""
    p = run.problem
    return (p.num_prompts, p.num_responses, p.k, p.s) + tuple(getattr(run.train, f) for f in BATCH_FIELDS)


def log_spaced_steps(steps: int, points: int) -> np.ndarray:
    """Sorted unique steps in [0, steps]: 0, steps and ~points log-spaced in between."""
    inner = np.unique(np.round(np.logspace(0, np.log10(max(steps, 1)), points)).astype(np.int64))
    return np.unique(np.concatenate([[0, steps], inner[inner <= steps]]))


@dataclass
class BatchResult:
    runs: pd.DataFrame   # one row per run: config fields + summary metrics
    steps: pd.DataFrame  # long format: run_id, step, STEP_METRICS, sigma_per_prompt
    theta_private: torch.Tensor  # [R, P, k] final parameters
    theta_shared: torch.Tensor   # [R, s]


#: rho_t is computed over at most this many evenly spaced prompts (exact for P <= 64): the
#: pairwise cosines cost O(P^2 s), which would otherwise dominate at large P.
RHO_MAX_PROMPTS = 64


def sampled_response_weights(pi: torch.Tensor, sigma: torch.Tensor, problem: Problem,
                             keys: np.ndarray, step: int, train: TrainConfig,
                             binary_q: bool = False) -> torch.Tensor:
    """w [R, P, K] = (1/G) sum_k A_ik (e_(y_ik) - pi_i) from G sampled responses per prompt.

    pi [R, P, K]; sigma [R, P] (read by grpo_oracle only); keys [R] uint64 (sim.rng.run_keys).
    The step's draws are u [R, 2, P, G]: response picks, then reward flips. ``binary_q`` (every
    q in {0, 1}: no reward noise) skips the flips: for u in (0, 1), [u < q] = q, so the rewards
    are the same numbers without drawing them.
    """
    R, P, K = pi.shape
    G = train.group_size
    u = uniforms(keys, step, (2, P, G), pi.dtype, leading=1 if binary_q else None).to(pi.device)  # [R, 1|2, P, G]
    cdf = pi.cumsum(-1)  # [R, P, K]
    cdf[..., -1] = 2.0  # above every u: y = #{k < K-1: cdf_k <= u} <= K-1 even if rounding left cdf_K < u
    y = torch.searchsorted(cdf, u[:, 0].contiguous(), right=True)  # [R, P, G]
    q = problem.q.gather(-1, y)  # [R, P, G]
    hit = q if binary_q else (u[:, 1] < q).to(pi.dtype)
    rewards = problem.scale.unsqueeze(-1) * hit  # [R, P, G]: c_i Bernoulli(q(y_ik))
    adv = estimators.advantages(train.estimator, rewards, ddof=train.ddof, eps=train.eps, sigma=sigma)
    per_response = torch.zeros_like(pi).scatter_add_(-1, y, adv)  # [R, P, K]: sum_k A_ik e_(y_ik)
    return (per_response - pi * adv.sum(-1, keepdim=True)) / G


def _log_metrics(logged: dict, i: int, J, pi, mu, sigma, w_true, prob: Problem, phi_red, rho_index,
                 theta_p, theta_s, scale_grpo, scale_reinforce) -> None:
    """Diagnostics at a logged step (DESIGN.md §3), each [R]: J, sigma summary, mean ||grad J_i||,
    rho_t, empirical M = max_i ||Hess J_i|| / sigma_i, analytic M = max_i sqrt(E||d||^4), the
    worst ratio of the two per prompt (must be <= 1), and the measured per-step gain of GRPO's
    exact step over REINFORCE's, both at their theory step sizes, from the same theta.
    phi_red [R, P, K, r]: theory.reduced_features of the local features (an r x r Hessian)."""
    g_p, g_s = theory.per_prompt_gradients(w_true, prob.phi_private, prob.phi_shared)  # [R,P,k], [R,P,s]
    sq_norm = (g_p * g_p).sum(-1) + (g_s * g_s).sum(-1)  # [R, P]
    sub_p, sub_s = g_p[:, rho_index], g_s[:, rho_index]
    gram = sub_s @ sub_s.transpose(-1, -2) + torch.diag_embed((sub_p * sub_p).sum(-1))  # [R, P', P']
    d = theory.centered_features(pi, phi_red)  # [R, P, K, r]
    H = theory.prompt_hessian(pi, prob.rbar, mu, d)  # [R, P, r, r]
    # eigenvalues on the CPU: cuSOLVER's batched syevd failed (internal error) for 65k 8 x 8 matrices
    emp = theory.hessian_over_sigma(H.cpu(), sigma.cpu(), 1e-12 * prob.sigma_max.unsqueeze(-1).cpu()).to(pi.device)
    m_an = theory.m_fourth_moment(pi, d)  # [R, P]
    dj_g = theory.one_step_change(prob.bias, prob.rbar, prob.phi_private, prob.phi_shared, theta_p, theta_s,
                                  scale_grpo(sigma), stats=(mu, w_true))
    dj_r = theory.one_step_change(prob.bias, prob.rbar, prob.phi_private, prob.phi_shared, theta_p, theta_s,
                                  scale_reinforce.expand_as(sigma), stats=(mu, w_true))
    logged["J"][i] = J
    logged["sigma_bar"][i] = sigma.mean(-1)
    logged["sigma_min"][i] = sigma.amin(-1)
    logged["sigma_max"][i] = sigma.amax(-1)
    logged["grad_norm"][i] = sq_norm.sqrt().mean(-1)
    logged["rho"][i] = theory.gradient_orthogonality(gram)
    logged["empirical_M"][i] = emp.amax(-1)
    logged["analytic_M"][i] = m_an.amax(-1)
    logged["m_bound_ratio"][i] = (emp / m_an.clamp_min(1e-300)).amax(-1)
    logged["step_gain"][i] = theory.per_step_gain(dj_g, dj_r)
    logged["sigma_per_prompt"][i] = sigma


class StepHistory:
    """J_t and sigma_bar_t for every step ([R, T+1] each) and the relaxed condition's
    min_t min_i sigma_i(t) / sigma_i(t-1) (over prompts with sigma_i(t-1) above ``sigma_floor``;
    inf if none) [R]. mu and sigma are buffered for ``chunk`` steps and reduced a chunk at a time:
    the same numbers as step by step, with a few operations per chunk instead of a dozen per step.
    Histories are [R, T+1] so every reduction runs along a run's own row: its result cannot
    depend on which other runs share the batch."""

    def __init__(self, R: int, P: int, T: int, dtype: torch.dtype, sigma_floor: torch.Tensor, chunk: int = 32):
        chunk = max(1, min(chunk, (1 << 22) // (R * P)))  # buffers of at most 4M numbers each
        on = {"dtype": dtype, "device": sigma_floor.device}
        self.J = torch.zeros(R, T + 1, **on)
        self.sigma_bar = torch.zeros(R, T + 1, **on)
        self.min_sigma_ratio = torch.full((R,), float("inf"), **on)
        self._mu = torch.empty(chunk, R, P, **on)
        self._sigma = torch.empty(chunk + 1, R, P, **on)  # slot 0: the step before the chunk
        self._floor = sigma_floor  # [R, 1]
        self._chunk, self._n, self._start = chunk, 0, 0

    def add(self, mu: torch.Tensor, sigma: torch.Tensor) -> None:
        """Record step ``start + n``'s mu, sigma [R, P]."""
        self._mu[self._n] = mu
        self._sigma[self._n + 1] = sigma
        self._n += 1
        if self._n == self._chunk:
            self.flush()

    def flush(self) -> None:
        n, s = self._n, self._start
        if n == 0:
            return
        self.J[:, s:s + n] = self._mu[:n].mean(-1).T
        self.sigma_bar[:, s:s + n] = self._sigma[1:n + 1].mean(-1).T
        first = 1 if s == 0 else 0  # step 0 has no predecessor
        prev, cur = self._sigma[first:n], self._sigma[first + 1:n + 1]  # [n', R, P]
        if len(cur):
            live = prev > self._floor
            ratio = torch.where(live, cur / torch.where(live, prev, torch.ones_like(prev)),
                                torch.full_like(cur, float("inf")))
            self.min_sigma_ratio = torch.minimum(self.min_sigma_ratio, ratio.amin(-1).amin(0))
        self._sigma[0] = self._sigma[n]
        self._start, self._n = s + n, 0


def train_batch(runs: Sequence[RunConfig], dtype: torch.dtype = torch.float64,
                on_progress: Callable[[int], None] | None = None, device: str | torch.device = "cpu") -> BatchResult:
    """Train ``runs`` (equal ``batch_key``) together; return their summary and step metrics.

    Summary per run: initial_J, final_J, j_star, target_J, reached_target, steps_to_target
    (first t with J_t >= target; = steps when never reached, flagged by reached_target),
    auc = mean_t J_t / J*, sigma_bar_to_target (mean over t < steps_to_target of the
    prompt-mean sigma, used by the predicted gain), sigma_max_bound (max possible sigma).
    ``on_progress(n)`` is called with the number of steps done since its last call.
    ``device``: where the training loop runs (a GPU, e.g. "cuda"); problems are built and the
    summary is assembled on the CPU. Bit-identity across batch compositions is established (and
    tested) on the CPU; on a GPU runs agree to rounding.
    """
    keys = {batch_key(r) for r in runs}
    if len(keys) != 1:
        raise ValueError("train_batch needs runs of one shape and one training setting")
    train = runs[0].train
    unique = {r.problem: make_problem(r.problem, dtype) for r in runs}  # runs often share a problem
    prob_cpu = stack_problems([unique[r.problem] for r in runs])
    prob = prob_cpu.to(device)
    reduced = {cfg: theory.reduced_features(theory.local_features(p.phi_private, p.phi_shared))
               for cfg, p in unique.items()}  # once per distinct problem
    phi_red = torch.stack([reduced[r.problem] for r in runs]).to(device)  # [R, P, K, min(K, k + s)]
    on = {"dtype": dtype, "device": device}
    R, P, K = prob.bias.shape
    k, s = prob.phi_private.shape[-1], prob.phi_shared.shape[-1]
    T = train.steps
    lr_over_p = torch.tensor([r.train.lr for r in runs], **on) / P  # [R]
    keys = run_keys(torch.tensor([r.train.seed for r in runs], dtype=torch.int64))  # [R]
    binary_q = bool(((prob.q == 0) | (prob.q == 1)).all())  # no reward noise: flips need no draws
    theta_p = torch.zeros(R, P, k, **on)
    theta_s = torch.zeros(R, s, **on)
    # theory step sizes (per-prompt scales of grad J_i) for the measured per-step gain
    M = prob.curvature_bound  # [R]
    sigma_floor = 1e-9 * prob.sigma_max.unsqueeze(-1)  # [R, 1]: below it a ratio of sigmas is noise
    lr_grpo = theory.theory_step_size(True, M, prob.sigma_max, P)  # [R]
    lr_reinforce = theory.theory_step_size(False, M, prob.sigma_max, P)  # [R]
    scale_reinforce = (lr_reinforce / P).unsqueeze(-1)  # [R, 1]: per-prompt scale of grad J_i

    def scale_grpo(sigma):  # [R, P]: (lr_grpo / P) / sigma_i, 0 where sigma_i = 0 (then grad J_i = 0)
        return estimators.population_scale("grpo", sigma, sigma, 0.0) * (lr_grpo / P).unsqueeze(-1)

    history = StepHistory(R, P, T, dtype, sigma_floor)
    rho_index = torch.linspace(0, P - 1, min(P, RHO_MAX_PROMPTS)).round().long().to(device)

    log_steps = log_spaced_steps(T, train.log_points)
    log_index = {int(t): i for i, t in enumerate(log_steps)}
    logged = {m: torch.zeros(len(log_steps), R, **on) for m in STEP_METRICS}
    logged["sigma_per_prompt"] = torch.zeros(len(log_steps), R, P, **on)
    report_every = max(1, T // 100)

    with torch.no_grad():
        for step in range(T + 1):
            z = theory.logits(prob.bias, prob.phi_private, prob.phi_shared, theta_p, theta_s)
            pi, mu, sigma, w_true = theory.prompt_stats(z, prob.rbar)  # [R,P,K], [R,P], [R,P], [R,P,K]
            history.add(mu, sigma)
            if step in log_index:
                _log_metrics(logged, log_index[step], mu.mean(-1), pi, mu, sigma, w_true, prob, phi_red, rho_index,
                             theta_p, theta_s, scale_grpo, scale_reinforce)
            if step == T:
                break
            if train.mode == "exact":
                w = w_true * estimators.population_scale(train.estimator, sigma, mu, train.eps).unsqueeze(-1)
            else:
                w = sampled_response_weights(pi, sigma, prob, keys, step, train, binary_q)
            g_p, g_s = theory.summed_gradient(w, prob.phi_private, prob.phi_shared)  # [R,P,k], [R,s]
            theta_p += lr_over_p[:, None, None] * g_p
            theta_s += lr_over_p[:, None] * g_s
            if on_progress is not None and (step + 1) % report_every == 0:
                on_progress(report_every)
    if on_progress is not None:
        on_progress(T - (T // report_every) * report_every)
    history.flush()
    # the summary is assembled on the CPU (no-ops when training ran there)
    J_hist, sigma_bar_hist, min_sigma_ratio = (t.cpu() for t in (history.J, history.sigma_bar,
                                                                 history.min_sigma_ratio))
    logged = {m: v.cpu() for m, v in logged.items()}
    theta_p, theta_s, lr_over_p, M, lr_grpo, lr_reinforce, rho_index = (
        t.cpu() for t in (theta_p, theta_s, lr_over_p, M, lr_grpo, lr_reinforce, rho_index))
    prob = prob_cpu

    j_star = prob.j_star  # [R]
    target = train.target_fraction * j_star
    above = J_hist >= target.unsqueeze(-1)  # [R, T+1]
    reached = above.any(-1)
    steps_to_target = torch.where(reached, above.to(torch.int8).argmax(-1),
                                  torch.full_like(reached, T, dtype=torch.long))
    # mean sigma_bar over t < steps_to_target (all T+1 steps when never reached; sigma_bar_0 when reached at 0)
    n_before = torch.where(reached, steps_to_target, torch.full_like(steps_to_target, T + 1))
    cum = sigma_bar_hist.cumsum(-1)  # [R, T+1]
    sum_before = cum.gather(-1, (n_before - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1)
    sigma_bar_to_target = torch.where(n_before > 0, sum_before / n_before.clamp_min(1), sigma_bar_hist[:, 0])

    run_ids = [r.run_id for r in runs]
    summary = pd.DataFrame([{"run_id": rid, **r.as_flat_dict()} for rid, r in zip(run_ids, runs)])
    summary["initial_J"] = J_hist[:, 0].numpy()
    summary["final_J"] = J_hist[:, T].numpy()
    summary["j_star"] = j_star.numpy()
    summary["target_J"] = target.numpy()
    summary["reached_target"] = reached.numpy()
    summary["steps_to_target"] = steps_to_target.numpy()
    summary["auc"] = (J_hist.mean(-1) / j_star).numpy()
    summary["sigma_bar_to_target"] = sigma_bar_to_target.numpy()
    summary["sigma_max_bound"] = prob.sigma_max.numpy()
    # theory beside measurement (DESIGN.md §3; measured_gain is added per cell by the sweep)
    lr_theory = lr_grpo if estimators.is_std_normalized(train.estimator) else lr_reinforce
    overlap_of = {cfg: theory.feature_overlap(p.phi_private[rho_index], p.phi_shared[rho_index]).amax()
                  for cfg, p in unique.items()}  # a property of the problem: once per distinct problem
    overlap = torch.stack([overlap_of[r.problem] for r in runs])  # [R]
    summary["predicted_gain"] = theory.predicted_gain(sigma_bar_to_target[:, None, None], prob.sigma_max).numpy()
    summary["empirical_M"] = logged["empirical_M"].amax(0).numpy()
    summary["analytic_M"] = logged["analytic_M"].amax(0).numpy()
    summary["M_bound"] = M.numpy()
    summary["lr_theory"] = lr_theory.numpy()
    summary["feature_overlap"] = overlap.numpy()
    min_ratio = torch.where(torch.isinf(min_sigma_ratio), torch.ones_like(min_sigma_ratio), min_sigma_ratio)
    summary["min_sigma_ratio"] = min_ratio.numpy()
    conditions = {
        "orthogonality_ok": overlap <= 1e-9,
        "m_bound_ok": logged["m_bound_ratio"].amax(0) <= 1 + 1e-9,
        "step_size_ok": lr_over_p * P <= lr_theory * (1 + 1e-12),
        "relaxed_ok": min_ratio >= 1 / RELAXED_FACTOR,
    }
    for name, ok in conditions.items():
        summary[name] = ok.numpy()
    summary["conditions_ok"] = torch.stack(list(conditions.values())).all(0).numpy()

    L = len(log_steps)
    steps_df = pd.DataFrame({
        "run_id": np.repeat(np.array(run_ids, dtype=object), L),
        "step": np.tile(log_steps, R),
        **{m: logged[m].T.reshape(-1).numpy() for m in STEP_METRICS},  # [L, R] -> [R*L]
    })
    steps_df["sigma_per_prompt"] = list(logged["sigma_per_prompt"].transpose(0, 1).reshape(R * L, P).numpy())
    steps_df["phase"] = np.concatenate([
        theory.label_phases(logged["sigma_bar"][:, r].numpy(), logged["rho"][:, r].numpy(),
                            logged["step_gain"][:, r].numpy()) for r in range(R)])
    return BatchResult(summary, steps_df, theta_p, theta_s)
