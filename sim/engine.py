"""Vectorized training loop: R runs sharing a problem shape train in one torch program.

Dimension legend
    R   runs in the batch       P   prompts          K   responses (y indexes them)
    G   group size (g indexes)  k   private dims     s   shared dims
    L   logged steps

Update (both modes), with the gradient estimate averaged over prompts (DESIGN.md §4):

    theta <- theta + lr * (1/P) sum_i g_i,   g_i = sum_y w_iy phi(x_i, y)

exact mode:    w_iy = s_i pi_iy (rbar_iy - mu_i), s_i = estimators.population_scale (the
               population form: 1 for REINFORCE-type, 1/(sigma_i + eps) for GRPO, sigma_i the
               std of the mean reward);
sampled mode:  w_i = (1/G) sum_g A_ig (e_(y_ig) - pi_i), y_ig ~ pi_i, A = estimators.advantages
               on the observed rewards R_ig = c_i Bernoulli(q(y_ig)).

Random draws come from sim.rng keyed by (run seed, step, stream), so a run's trajectory
does not depend on the batch it is in. Float64 by default.

The loop is init_state -> (advance to the next log step, Recorder.log) ... -> Recorder.result.
Two engines advance it (ENGINES, resolve_engine): ``advance_torch`` calls ``step`` once per step
(the reference, and the GPU path); ``advance_numba`` runs the same loop compiled (sim.kernels).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch

import theory
from sim import estimators, step_gain
from sim.config import RunConfig, TrainConfig, run_bytes
from sim.results import stable_id
from sim.problems import Problem, make_problem, stack_problems
from sim.rng import run_keys, uniforms

#: Train fields every run of a batch must share (lr, seed and lr_rule may differ per run).
BATCH_FIELDS = ("estimator", "mode", "group_size", "steps", "eps", "ddof", "target_fraction", "log_points",
                "gain_draws")

#: Per-step metric columns written to steps.parquet (besides run_id, step, phase, gain_undefined,
#: sigma_per_prompt and mu_per_prompt).
STEP_METRICS = ("J", "sigma_bar", "sigma_min", "sigma_max", "grad_norm", "rho",
                "empirical_M", "analytic_M", "m_bound_ratio", "gain", "gain_se", "dJ_grpo", "dJ_reinforce", "dJ_run",
                "exact_theory_step_gain")

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


def sample_rewards(pi: torch.Tensor, problem: Problem, keys: np.ndarray, step: int, group_size: int,
                   binary_q: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rewards) [R, P, G]: G responses per prompt y_ig ~ pi_i and their observed rewards
    R_ig = c_i Bernoulli(q(y_ig)). pi [R, P, K]; keys [R] uint64 (sim.rng.run_keys).
    The step's draws are u [R, 2, P, G]: response picks, then reward flips. ``binary_q`` (every
    q in {0, 1}: no reward noise) skips the flips: for u in (0, 1), [u < q] = q, so the rewards
    are the same numbers without drawing them."""
    G = group_size
    u = uniforms(keys, step, (2, pi.shape[1], G), pi.dtype, leading=1 if binary_q else None).to(pi.device)
    cdf = pi.cumsum(-1)  # [R, P, K]
    cdf[..., -1] = 2.0  # above every u: y = #{y' < K-1: cdf_y' <= u} <= K-1 even if rounding left cdf_K < u
    y = torch.searchsorted(cdf, u[:, 0].contiguous(), right=True)  # [R, P, G]
    q = problem.q.gather(-1, y)  # [R, P, G]
    hit = q if binary_q else (u[:, 1] < q).to(pi.dtype)
    return y, problem.scale.unsqueeze(-1) * hit


def response_weights(pi: torch.Tensor, y: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """w [R, P, K] = (1/G) sum_g A_ig (e_(y_ig) - pi_i): pi [R, P, K], y and adv [R, P, G]."""
    per_response = torch.zeros_like(pi).scatter_add_(-1, y, adv)  # [R, P, K]: sum_g A_ig e_(y_ig)
    return (per_response - pi * adv.sum(-1, keepdim=True)) / y.shape[-1]


def sampled_response_weights(pi: torch.Tensor, sigma: torch.Tensor, problem: Problem,
                             keys: np.ndarray, step: int, train: TrainConfig,
                             binary_q: bool = False) -> torch.Tensor:
    """w [R, P, K] = (1/G) sum_g A_ig (e_(y_ig) - pi_i) from G sampled responses per prompt
    (``sample_rewards``), A = the estimator's advantages (a stateless one's, or an adaptive one's
    first step). pi [R, P, K]; sigma [R, P] (read by grpo_oracle only)."""
    y, rewards = sample_rewards(pi, problem, keys, step, train.group_size, binary_q)
    adv = estimators.advantages(train.estimator, rewards, ddof=train.ddof, eps=train.eps, sigma=sigma)
    return response_weights(pi, y, adv)


#: A sampled per-prompt gradient at most this times its advantages' mean |A| is rounding noise (batch_rho).
SAMPLED_GRADIENT_FLOOR = 1e-12


def batch_rho(w: torch.Tensor, problem: Problem, index: torch.Tensor,
              adv: torch.Tensor | None = None) -> torch.Tensor:
    """rho_t [R] as the adaptive rule reads it: theory.gradient_orthogonality over the pairs of non-zero
    per-prompt gradients g_i = sum_y w_iy phi(x_i, y) (live_only; NaN without a pair) of the prompts
    ``index`` (at most RHO_MAX_PROMPTS of them: the Gram matrix costs O(P'^2 s)).
    w [R, P, K]: exact (grad J_i) or sampled weights; for sampled ones pass their advantages adv
    [R, P, G]: a gradient of norm <= SAMPLED_GRADIENT_FLOOR mean_g |A_ig| (||phi|| = 1) is 0 but
    for rounding (all G responses the same, say) and has no direction."""
    g_p, g_s = theory.per_prompt_gradients(w[:, index], problem.phi_private[:, index], problem.phi_shared[:, index])
    floor = None if adv is None else SAMPLED_GRADIENT_FLOOR * adv[:, index].abs().mean(-1)
    return theory.gradient_orthogonality(theory.block_gram(g_p, g_s), floor, live_only=True)


@dataclass(frozen=True)
class Batch:
    """What stays fixed while R runs of one shape train together (every tensor on the device).

    problem      stacked Problem [R, ...];  problem_cpu the same on the CPU (summaries)
    unique       ProblemConfig -> its Problem [P, ...] (runs often share one: built once)
    lr_over_p    [R] learning rate / P (the engine convention, DESIGN.md §3)
    keys         [R] uint64 counter-RNG keys (sim.rng.run_keys of the seeds)
    binary_q     no reward noise anywhere (every q in {0, 1}): reward flips need no draws
    rho_index    [P'] the prompts rho_t is measured on (P' = min(P, RHO_MAX_PROMPTS), evenly spaced)
    """

    runs: tuple[RunConfig, ...]
    train: TrainConfig
    spec: estimators.EstimatorSpec
    problem: Problem
    problem_cpu: Problem
    unique: dict
    lr_over_p: torch.Tensor
    keys: np.ndarray
    binary_q: bool
    rho_index: torch.Tensor


@dataclass
class TrainState:
    """The batch at step t: parameters theta_t and the policy statistics at theta_t.

    theta_private [R, P, k], theta_shared [R, s]; pi [R, P, K]; mu, sigma [R, P] (J_i and the std
    of the mean reward); w [R, P, K] = pi (rbar - mu), so grad J_i = sum_y w_iy phi(x_i, y).
    estimator_state: an adaptive estimator's state after step t (EstimatorSpec.adaptive; None
    before the first step and for stateless estimators)."""

    batch: Batch
    t: int
    theta_private: torch.Tensor
    theta_shared: torch.Tensor
    pi: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    w: torch.Tensor
    cache: dict = field(default_factory=dict)  # engine-specific arrays derived from the batch
    estimator_state: object = None


def _with_stats(state: TrainState) -> TrainState:
    """Recompute pi, mu, sigma, w at the state's theta (theory.prompt_stats)."""
    prob = state.batch.problem
    z = theory.logits(prob.bias, prob.phi_private, prob.phi_shared, state.theta_private, state.theta_shared)
    state.pi, state.mu, state.sigma, state.w = theory.prompt_stats(z, prob.rbar)
    return state


def init_state(runs: Sequence[RunConfig], dtype: torch.dtype = torch.float64,
               device: str | torch.device = "cpu") -> TrainState:
    """theta = 0 for ``runs`` (equal ``batch_key``), with the batch's fixed tensors and the policy
    statistics at theta_0."""
    if len({batch_key(r) for r in runs}) != 1:
        raise ValueError("train_batch needs runs of one shape and one training setting")
    train = runs[0].train
    unique = {}
    for r in runs:  # runs often share a problem: build each distinct one once
        if r.problem not in unique:
            unique[r.problem] = make_problem(r.problem, dtype)
    prob_cpu = stack_problems([unique[r.problem] for r in runs])
    prob = prob_cpu.to(device)
    on = {"dtype": dtype, "device": device}
    R, P, K = prob.bias.shape
    batch = Batch(
        runs=tuple(runs), train=train, spec=estimators.get(train.estimator), problem=prob, problem_cpu=prob_cpu,
        unique=unique, lr_over_p=torch.tensor([r.train.lr for r in runs], **on) / P,
        keys=run_keys(torch.tensor([r.train.seed for r in runs], dtype=torch.int64)),
        binary_q=bool(((prob.q == 0) | (prob.q == 1)).all()),
        rho_index=torch.linspace(0, P - 1, min(P, RHO_MAX_PROMPTS)).round().long().to(device))
    state = TrainState(batch, 0, torch.zeros(R, P, prob.phi_private.shape[-1], **on),
                       torch.zeros(R, prob.phi_shared.shape[-1], **on), *(None,) * 4)
    return _with_stats(state)


def step(state: TrainState) -> TrainState:
    """One update theta_t -> theta_t+1 of every run (module docstring), in place; returns the state
    at t + 1 with its policy statistics.

        theta <- theta + (lr / P) sum_i g_i,   g_i = sum_y w_iy phi(x_i, y)

    with w the exact-mode weights s_i pi (rbar - mu) (s_i the estimator's population scale) or
    the sampled ones (1/G) sum_g A_ig (e_(y_ig) - pi_i) (``sampled_response_weights``).
    An adaptive estimator (EstimatorSpec.adaptive) takes its state and, where its rule reads it,
    rho_t measured on this step's per-prompt gradients (``batch_rho``: the exact ones in exact
    mode, the sampled ones in sampled mode, whose directions do not depend on the positive
    per-prompt scale the rule picks, so the centred advantages give them), and returns the new
    state with the step."""
    b, train = state.batch, state.batch.train
    prob, rule = b.problem, b.spec.adaptive
    if train.mode == "exact":
        if rule is None:
            s = b.spec.scale(state.sigma, state.mu, train.eps)
        else:
            rho = batch_rho(state.w, prob, b.rho_index) if rule.needs_rho_exact else None
            s, state.estimator_state = rule.scale_step(state.sigma, state.mu, state.estimator_state, rho, train.eps)
        w = state.w * s.unsqueeze(-1)  # [R, P, K]
    elif rule is None:
        w = sampled_response_weights(state.pi, state.sigma, prob, b.keys, state.t, train, b.binary_q)
    else:
        y, rewards = sample_rewards(state.pi, prob, b.keys, state.t, train.group_size, b.binary_q)
        rho = None
        if rule.needs_rho:
            centred = estimators.dr_grpo(rewards)
            rho = batch_rho(response_weights(state.pi, y, centred), prob, b.rho_index, centred)
        adv, state.estimator_state = rule.step(rewards, state.estimator_state, rho, ddof=train.ddof, eps=train.eps)
        w = response_weights(state.pi, y, adv)
    g_p, g_s = theory.summed_gradient(w, prob.phi_private, prob.phi_shared)  # [R, P, k], [R, s]
    state.theta_private += b.lr_over_p[:, None, None] * g_p
    state.theta_shared += b.lr_over_p[:, None] * g_s
    state.t += 1
    return _with_stats(state)


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
        self.floor = sigma_floor  # [R, 1]
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
            live = prev > self.floor
            ratio = torch.where(live, cur / torch.where(live, prev, torch.ones_like(prev)),
                                torch.full_like(cur, float("inf")))
            self.min_sigma_ratio = torch.minimum(self.min_sigma_ratio, ratio.amin(-1).amin(0))
        self._sigma[0] = self._sigma[n]
        self._start, self._n = s + n, 0


def target_statistics(J_hist: torch.Tensor, sigma_bar_hist: torch.Tensor, target: torch.Tensor):
    """(reached [R], steps_to_target [R], sigma_bar_to_target [R]) from J_t, sigma_bar_t [R, T+1] and
    the target J [R]: the first t with J_t >= target (T when never reached), and the mean of
    sigma_bar_t over t < steps_to_target (all T+1 steps when never reached; sigma_bar_0 when
    reached at 0), the sigma_bar of the predicted gain (DESIGN.md §3)."""
    T = J_hist.shape[-1] - 1
    above = J_hist >= target.unsqueeze(-1)  # [R, T+1]
    reached = above.any(-1)
    steps_to_target = torch.where(reached, above.to(torch.int8).argmax(-1),
                                  torch.full_like(reached, T, dtype=torch.long))
    n_before = torch.where(reached, steps_to_target, torch.full_like(steps_to_target, T + 1))
    cum = sigma_bar_hist.cumsum(-1)  # [R, T+1]
    sum_before = cum.gather(-1, (n_before - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1)
    sigma_bar_to_target = torch.where(n_before > 0, sum_before / n_before.clamp_min(1), sigma_bar_hist[:, 0])
    return reached, steps_to_target, sigma_bar_to_target


def advance_torch(state: TrainState, history: StepHistory, t1: int) -> TrainState:
    """Step the batch from state.t to t1 with ``step`` (the reference, and the GPU path), adding
    each new step's J and sigma to ``history`` (and step 0's when starting there)."""
    if state.t == 0:
        history.add(state.mu, state.sigma)
    while state.t < t1:
        state = step(state)
        history.add(state.mu, state.sigma)
    return state


def lane_layout(state: TrainState) -> tuple[np.ndarray, ...]:
    """The problem in the kernels' lane layout (sim.kernels: responses outer, prompts inner, so that
    their per-prompt loops run along the prompts): (bias, rbar, q) [R, K, P], phi_private as
    [R, k, K, P] and phi_shared as [R, s, K P] (C order); made once per batch, kept in state.cache."""
    if "lanes" not in state.cache:
        prob = state.batch.problem
        lane = lambda x, *axes: np.ascontiguousarray(x.numpy().transpose(*axes))  # noqa: E731
        R, P, K, s = prob.phi_shared.shape
        state.cache["lanes"] = (lane(prob.bias, 0, 2, 1), lane(prob.rbar, 0, 2, 1), lane(prob.q, 0, 2, 1),
                                lane(prob.phi_private, 0, 3, 2, 1),
                                lane(prob.phi_shared, 0, 3, 2, 1).reshape(R, s, K * P))
    return state.cache["lanes"]


def advance_numba(state: TrainState, history: StepHistory, t1: int) -> TrainState:
    """The same as ``advance_torch`` in one compiled call (sim.kernels.advance) that updates theta in
    place and writes the history of steps state.t..t1 (from step 1 on after the first call); the
    policy statistics at t1 are then taken by the same torch code as the reference's."""
    from sim import kernels

    b, train = state.batch, state.batch.train
    prob = b.problem
    code, ddof, eps, whiten, w_ddof, w_floor, w_eps = kernels.estimator_params(b.spec, train.ddof, train.eps)
    arr = lambda x: x.numpy()  # noqa: E731 -- CPU float64 tensors: views, no copies
    bias, rbar, q, phi, phi_s = lane_layout(state)
    kernels.run(state.t, t1, 0 if state.t == 0 else state.t + 1, arr(state.theta_private),
                    arr(state.theta_shared), bias, rbar, q, arr(prob.scale), phi, phi_s, arr(b.lr_over_p), b.keys,
                    train.mode == "exact",
                    code, ddof, eps, whiten, w_ddof, w_floor, w_eps, train.group_size, b.binary_q,
                    np.ascontiguousarray(arr(history.floor[:, 0])), arr(history.J), arr(history.sigma_bar), arr(history.min_sigma_ratio))
    state.t = t1
    state = _with_stats(state)
    # step t1's J and sigma_bar as the logged diagnostics compute them (torch's mean), so a run's
    # history and its logged steps agree exactly
    history.J[:, t1] = state.mu.mean(-1)
    history.sigma_bar[:, t1] = state.sigma.mean(-1)
    return state


#: Engines by name: each advances a TrainState to a later step and records the history.
ENGINES = {"torch": advance_torch, "numba": advance_numba}
ENGINE_CHOICES = ("auto",) + tuple(ENGINES)


def resolve_engine(engine: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64,
                   estimator: str | None = None) -> str:
    """'auto' is numba on the CPU in float64 (when numba imports) and torch otherwise (a GPU, or
    float32, which the kernels do not implement, or an adaptive ``estimator``, whose state the
    kernels do not carry yet). An explicit choice is checked: ValueError when numba is asked for
    on a GPU, in float32 or for an adaptive estimator."""
    on_cpu = torch.device(device).type == "cpu"
    adaptive = estimator is not None and estimators.get(estimator).adaptive is not None
    if engine == "numba" and adaptive:
        raise ValueError(f"engine: numba does not run the adaptive estimator {estimator} yet; use --engine torch "
                         "or auto")
    if engine == "auto":
        if on_cpu and dtype == torch.float64 and not adaptive:
            try:
                import numba  # noqa: F401
            except ImportError:
                return "torch"
            return "numba"
        return "torch"
    if engine not in ENGINES:
        raise ValueError(f"engine: unknown value {engine!r}; choose from {', '.join(ENGINE_CHOICES)}")
    if engine == "numba" and not (on_cpu and dtype == torch.float64):
        raise ValueError("engine: numba runs float64 on the CPU; use --engine torch for a GPU or float32")
    if engine == "numba":
        try:
            import numba  # noqa: F401
        except ImportError:
            raise ValueError("engine: numba is not installed (pip install numba), or use --engine torch") from None
    return engine


#: Rows (runs x log steps) the diagnostics of several log steps are computed on at once (Recorder):
#: enough to amortise their per-call cost on small batches. And at most DIAGNOSTIC_BYTES for the
#: stacked rows beyond one log step's (sim.config.run_bytes per row, plus the sampled gain draws'
#: arrays), so stacking adds a bounded amount to what sweep.check_memory budgets for a batch.
DIAGNOSTIC_ROWS = 512
DIAGNOSTIC_BYTES = 256 * 2**20


@dataclass(frozen=True)
class _Rows:
    """Per-row inputs of Recorder.diagnostics: the batch's, or those of its runs at L log steps stacked
    ([L R, ...]). step: the log step (int) or the rows' steps [L R]; lanes: the problem in the
    kernels' lane layout (numba engine: lane_layout) or None."""

    problem: Problem
    M: torch.Tensor
    phi_red: torch.Tensor
    gain_lrs: dict
    keys: np.ndarray
    step: object
    lanes: tuple | None


class _Logged(NamedTuple):
    """A log step whose diagnostics are pending (Recorder.log): theta_t (copies: the engines update
    theta in place), the policy statistics at it (pi, mu, sigma, w: each step makes new ones) and an
    adaptive estimator's state (a copy, or None)."""

    t: int
    theta_private: torch.Tensor
    theta_shared: torch.Tensor
    stats: tuple
    estimator_state: object


def _stacked_state(states: list):
    """L adaptive-estimator states (dataclasses of [R, ...] tensors, EstimatorSpec.adaptive) as one of
    [L R, ...] (row l R + r: run r's at the l-th); None (before the first step, or no adaptive
    estimator) stays None. One state is copied: the Recorder keeps it while training goes on."""
    if states[0] is None:
        return None
    fields = [f.name for f in dataclasses.fields(states[0])]
    return dataclasses.replace(states[0], **{n: torch.cat([getattr(s, n) for s in states]) for n in fields})


class Recorder:
    """Everything a batch logs: J_t and sigma_bar_t at every step (StepHistory), the diagnostics of
    DESIGN.md §3 at log-spaced steps, and at the end the per-run summary (``result``)."""

    def __init__(self, batch: Batch, compiled: bool = False):
        """``compiled``: the batch trains on the numba engine, whose kernels also draw the sampled
        per-step gain (step_gain.sampled_changes_compiled; the torch code otherwise)."""
        prob, train = batch.problem, batch.train
        R, P, K = prob.bias.shape
        on = {"dtype": prob.bias.dtype, "device": prob.bias.device}
        self.batch = batch
        self.compiled = compiled
        reduced = {cfg: theory.reduced_features(theory.local_features(p.phi_private, p.phi_shared))
                   for cfg, p in batch.unique.items()}  # once per distinct problem
        self.phi_red = torch.stack([reduced[r.problem] for r in batch.runs]).to(on["device"])  # [R, P, K, r]
        M_of = {cfg: p.curvature_bound for cfg, p in batch.unique.items()}  # once per distinct problem
        self.M = torch.stack([M_of[r.problem] for r in batch.runs]).to(on["device"])  # [R]
        # theory step sizes, for the measured per-step gain of GRPO's exact step over REINFORCE's
        self.lr_grpo = theory.theory_step_size(True, self.M, prob.sigma_bound, P)  # [R]
        self.lr_reinforce = theory.theory_step_size(False, self.M, prob.sigma_bound, P)  # [R]
        # the measured gain's estimators, each at the run's multiple of its own theory step (sim.step_gain)
        own_theory = self.lr_grpo if batch.spec.std_normalized else self.lr_reinforce
        multiple = batch.lr_over_p * P / own_theory  # [R]
        self.gain_lrs = {"grpo": multiple * self.lr_grpo, "reinforce": multiple * self.lr_reinforce,
                         train.estimator: batch.lr_over_p * P}
        self.rho_index = batch.rho_index
        sigma_floor = 1e-9 * prob.sigma_bound.unsqueeze(-1)  # [R, 1]: below it a ratio of sigmas is noise
        self.history = StepHistory(R, P, train.steps, on["dtype"], sigma_floor)
        self.log_steps = log_spaced_steps(train.steps, train.log_points)
        self.log_index = {int(t): i for i, t in enumerate(self.log_steps)}
        self.gain_undefined = np.full((len(self.log_steps), R), "", dtype=object)
        self.logged = {m: torch.zeros(len(self.log_steps), R, **on) for m in STEP_METRICS}
        self.logged["sigma_per_prompt"] = torch.zeros(len(self.log_steps), R, P, **on)
        self.logged["mu_per_prompt"] = torch.zeros(len(self.log_steps), R, P, **on)
        # log steps whose diagnostics are not computed yet. They are functions of theta (and of an
        # adaptive estimator's state), so several log steps are computed in one call, as a batch of
        # L R rows (the per-call cost of ~200 small tensor operations dominated small batches)
        self.pending: list[_Logged] = []
        row_bytes = run_bytes(batch.runs[0].problem)  # (one shape per batch)
        if train.mode == "sampled":  # the gain draws' [N, P, K]-sized arrays (sim.step_gain), about 8 of them
            row_bytes += 8 * 8 * train.gain_draws * P * K
        self.logs_per_call = max(1, min(DIAGNOSTIC_ROWS // R, 1 + DIAGNOSTIC_BYTES // (R * row_bytes)))

    def log(self, state: TrainState) -> None:
        """Log the diagnostics of a log step t (computed with the next ones; the last log step's call
        computes every pending one, so a batch's progress ends when its diagnostics are done)."""
        if self.pending and (self.pending[-1].estimator_state is None) != (state.estimator_state is None):
            self._compute_pending(state)  # step 0 has no adaptive state yet: not stacked with later ones
        self.pending.append(_Logged(state.t, state.theta_private.clone(), state.theta_shared.clone(),
                                    (state.pi, state.mu, state.sigma, state.w),
                                    _stacked_state([state.estimator_state])))
        if len(self.pending) >= self.logs_per_call or state.t == int(self.log_steps[-1]):
            self._compute_pending(state)

    def _compute_pending(self, state: TrainState) -> None:
        """The diagnostics of the pending log steps, in one call on their L R stacked rows
        (row l R + r: run r at the l-th pending step)."""
        if not self.pending:
            return
        steps = [logged.t for logged in self.pending]
        L, R = len(steps), state.theta_private.shape[0]
        stack = lambda tensors: tensors[0] if L == 1 else torch.cat(tensors)  # noqa: E731 -- [L R, ...]
        theta_p = stack([logged.theta_private for logged in self.pending])  # [L R, P, k]
        theta_s = stack([logged.theta_shared for logged in self.pending])  # [L R, s]
        stats = [stack([logged.stats[j] for logged in self.pending]) for j in range(4)]  # pi, mu, sigma, w
        estimator_state = _stacked_state([logged.estimator_state for logged in self.pending])  # [L R, ...] or None
        diag = self.diagnostics(self._rows(state, steps), *stats, theta_p, theta_s, estimator_state)
        index = [self.log_index[t] for t in steps]
        self.gain_undefined[index] = diag.pop("gain_undefined").reshape(L, R)
        for name, value in diag.items():
            self.logged[name][index] = value.reshape(L, R, *value.shape[1:])
        self.pending = []

    def _rows(self, state: TrainState, steps: list[int]) -> "_Rows":
        """What the diagnostics read per row, for the runs at each of ``steps`` (L of them) stacked."""
        L, b = len(steps), self.batch
        lanes = lane_layout(state) if self.compiled else None
        if L == 1:
            return _Rows(b.problem, self.M, self.phi_red, self.gain_lrs, b.keys, steps[0], lanes)
        rep = lambda x: x.repeat(L, *(1,) * (x.dim() - 1))  # noqa: E731 -- [R, ...] -> [L R, ...]
        problem = Problem(**{f.name: rep(getattr(b.problem, f.name)) for f in dataclasses.fields(Problem)})
        return _Rows(problem, rep(self.M), rep(self.phi_red), {n: rep(lr) for n, lr in self.gain_lrs.items()},
                     np.tile(b.keys, L), np.repeat(np.asarray(steps, dtype=np.int64), len(b.keys)),
                     None if lanes is None else tuple(np.concatenate([f] * L) for f in lanes))

    def diagnostics(self, rows: "_Rows", pi, mu, sigma, w, theta_private, theta_shared,
                    estimator_state=None) -> dict[str, torch.Tensor]:
        """Diagnostics at theta_t (DESIGN.md §3), each [R] (sigma_per_prompt [R, P]): J, sigma summary,
        mean ||grad J_i||, rho_t, empirical M = max_i ||Hess J_i|| / sigma_i, analytic M =
        max_i sqrt(E||d||^4), the worst ratio of the two per prompt (must be <= 1); the measured
        per-step gain (sim.step_gain): the expected one-step J changes dJ_grpo, dJ_reinforce and
        dJ_run (the run's estimator) of the update each estimator would take from this theta, exact
        or sampled as the run, their ratio gain = dJ_grpo / dJ_reinforce with its standard error and
        gain_undefined (the reason where it is NaN); and exact_theory_step_gain, the same ratio for
        exact steps at the theory step sizes. The Hessian is taken in the reduced features (r x r).
        R here counts the rows of ``rows`` (runs, or runs at several log steps); pi, w [R, P, K] and
        mu, sigma [R, P] are the policy statistics at theta (theory.prompt_stats)."""
        prob = rows.problem
        g_p, g_s = theory.per_prompt_gradients(w, prob.phi_private, prob.phi_shared)  # [R,P,k], [R,P,s]
        sq_norm = (g_p * g_p).sum(-1) + (g_s * g_s).sum(-1)  # [R, P]
        sub_p, sub_s = g_p[:, self.rho_index], g_s[:, self.rho_index]
        gram = theory.block_gram(sub_p, sub_s)  # [R, P', P']
        d, H = theory.prompt_curvature(pi, prob.rbar, mu, rows.phi_red)  # [R, P, K, r], [R, P, r, r]
        # eigenvalues on the CPU: cuSOLVER's batched syevd failed (internal error) for 65k 8 x 8 matrices
        floor = 1e-12 * prob.sigma_bound.unsqueeze(-1).cpu()
        emp = theory.hessian_over_sigma(H.cpu(), sigma.cpu(), floor).to(pi.device)  # [R, P]
        m_an = theory.m_fourth_moment(pi, d)  # [R, P]
        # a prompt whose features barely differ (sqrt(E||d||^4) at rounding level against the
        # problem's bound M) has a Hessian of rounding noise: its curvature is not measured
        flat = m_an <= 1e-12 * rows.M.unsqueeze(-1)
        emp = torch.where(flat, torch.zeros_like(emp), emp)
        P = pi.shape[-2]
        train = self.batch.train
        # an adaptive run's dJ_run at its state after step t - 1: its next step would also fold in
        # that step's own rho_t (grpo_phase), which the gain draws do not measure
        states = {train.estimator: estimator_state}
        if train.mode == "exact":
            dj = step_gain.exact_changes(mu, sigma, w, prob, theta_private, theta_shared, rows.gain_lrs, train.eps,
                                         states)
        elif self.compiled:
            dj = step_gain.sampled_changes_compiled(pi, sigma, mu, g_p, g_s, prob, theta_private, theta_shared,
                                                    rows.keys, rows.step, train.group_size, rows.gain_lrs,
                                                    train.ddof, train.eps, train.gain_draws, rows.lanes)
        else:
            dj = step_gain.sampled_changes(pi, sigma, mu, w, prob, theta_private, theta_shared, rows.keys, rows.step,
                                           train.group_size, rows.gain_lrs, train.ddof, train.eps, train.gain_draws,
                                           states=states)
        gain, gain_se, reason = step_gain.gain_from_changes(dj["grpo"], dj["reinforce"])
        step_change = {
            normalized: theory.one_step_change(
                prob.bias, prob.rbar, prob.phi_private, prob.phi_shared, theta_private, theta_shared,
                theory.step_scale(normalized, rows.M, prob.sigma_bound, P, sigma), stats=(mu, w))
            for normalized in (True, False)}
        return {
            "J": mu.mean(-1), "sigma_bar": sigma.mean(-1), "sigma_min": sigma.amin(-1),
            "sigma_max": sigma.amax(-1), "grad_norm": sq_norm.sqrt().mean(-1),
            "rho": theory.gradient_orthogonality(gram), "empirical_M": emp.amax(-1), "analytic_M": m_an.amax(-1),
            "m_bound_ratio": torch.where(flat, torch.zeros_like(emp), emp / m_an.clamp_min(1e-300)).amax(-1),
            "exact_theory_step_gain": theory.per_step_gain(step_change[True], step_change[False]),
            "gain": gain, "gain_se": gain_se, "gain_undefined": reason, "dJ_grpo": dj["grpo"].mean(-1),
            "dJ_reinforce": dj["reinforce"].mean(-1), "dJ_run": dj[train.estimator].mean(-1),
            "sigma_per_prompt": sigma, "mu_per_prompt": mu,
        }

    def result(self, state: TrainState) -> BatchResult:
        """Per-run summary and long-format step metrics (train_batch's docstring), on the CPU."""
        self._compute_pending(state)
        self.history.flush()
        b = self.batch
        cpu = lambda x: x.cpu()  # noqa: E731 -- no-ops when training ran on the CPU
        J_hist, sigma_bar_hist, min_sigma_ratio = map(cpu, (self.history.J, self.history.sigma_bar,
                                                            self.history.min_sigma_ratio))
        logged = {m: cpu(v) for m, v in self.logged.items()}
        prob, T, P = b.problem_cpu, b.train.steps, state.pi.shape[1]
        j_star = prob.j_star  # [R]
        target = b.train.target_fraction * j_star
        reached, steps_to_target, sigma_bar_to_target = target_statistics(J_hist, sigma_bar_hist, target)

        flat = [r.as_flat_dict() for r in b.runs]
        run_ids = [stable_id(d, 16) for d in flat]  # = RunConfig.run_id, from the dict made once
        # the summary's columns in order, made into one DataFrame at the end (a column set on a frame
        # costs ~1 ms of pandas bookkeeping: it was most of a small batch's time)
        summary: dict[str, object] = {"run_id": run_ids, **{name: [d[name] for d in flat] for name in flat[0]}}
        summary["initial_J"] = J_hist[:, 0].numpy()
        summary["final_J"] = J_hist[:, T].numpy()
        summary["j_star"] = j_star.numpy()
        summary["target_J"] = target.numpy()
        summary["reached_target"] = reached.numpy()
        summary["steps_to_target"] = steps_to_target.numpy()
        summary["auc"] = (J_hist.mean(-1) / j_star).numpy()
        summary["sigma_bar_to_target"] = sigma_bar_to_target.numpy()
        summary["sigma_bound"] = prob.sigma_bound.numpy()
        summary["stuck_prompts"] = self._stuck_prompts(state).numpy()
        rb = prob.rbar
        summary["final_F"] = theory.normalized_objective(state.mu.cpu(), rb.amin(-1), rb.amax(-1)).numpy()
        self._theory_columns(summary, sigma_bar_to_target, logged, min_sigma_ratio, P)
        return BatchResult(pd.DataFrame(summary), self._steps_frame(run_ids, logged), cpu(state.theta_private),
                           cpu(state.theta_shared))

    def _theory_columns(self, summary: dict, sigma_bar_to_target: torch.Tensor,
                        logged: dict[str, torch.Tensor], min_sigma_ratio: torch.Tensor, P: int) -> None:
        """Theory beside measurement (DESIGN.md §3): predicted gain, M's, theory lr, feature overlap and
        the condition flags, added to the ``summary`` columns (measured_gain is added per cell by the
        sweep)."""
        b, prob = self.batch, self.batch.problem_cpu
        lr_over_p, M, lr_grpo, lr_reinforce, rho_index = (x.cpu() for x in (b.lr_over_p, self.M, self.lr_grpo,
                                                                             self.lr_reinforce, self.rho_index))
        lr_theory = lr_grpo if b.spec.std_normalized else lr_reinforce
        overlap_of = {cfg: theory.feature_overlap(p.phi_private[rho_index], p.phi_shared[rho_index]).amax()
                      for cfg, p in b.unique.items()}  # a property of the problem: once per distinct problem
        overlap = torch.stack([overlap_of[r.problem] for r in b.runs])  # [R]
        summary["predicted_gain"] = theory.predicted_gain(sigma_bar_to_target[:, None, None],
                                                          prob.sigma_bound).numpy()
        self._finite_g_predictions(summary, logged, lr_over_p * P, lr_reinforce)
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

    def _stuck_prompts(self, state: TrainState) -> torch.Tensor:
        """[R] prompts whose sampled groups at the last step are all failures with probability >= 0.99,
        (1 - p_i)^G >= 0.99 with p_i = J_i / c_i: both estimators get zero advantage there, so no
        estimator can move them (0 in exact mode, whose gradients never vanish by sampling)."""
        train = self.batch.train
        if train.mode == "exact":
            return torch.zeros(state.mu.shape[0], dtype=torch.int64)
        p = (state.mu / self.batch.problem.scale).clamp(0.0, 1.0).cpu()
        return ((1 - p) ** train.group_size >= 0.99).sum(-1)

    def _finite_g_predictions(self, summary: dict, logged: dict[str, torch.Tensor], lr: torch.Tensor,
                              lr_reinforce: torch.Tensor) -> None:
        """The predictions that account for finite groups (theory.finite_group), from the logged
        per-prompt J_i and sigma_i (DESIGN.md §3, README 'Theory beside measurement'):

        predicted_gain_finite_g  sigma_bound / mean_{t < t*} mean_i sigma_eff,i(t), sigma_eff = 1 / h_i:
                                 G_pred with the expected finite-G scale h_i in place of 1 / sigma_i
        predicted_speedup        REINFORCE's steps to the target at its theory step, predicted by the
                                 orthogonal-case time change (theory.reinforce_steps_by_time_change)
                                 from this run's trajectory, over this run's steps to the target;
                                 NaN when this run or the prediction never reaches the target
        expected_scale_exact     h_i is exact at this G (False: the G -> infinity limit is used)
        The logged steps are the knots (J_i linear between them): log-spaced, so most dense early."""
        b, train = self.batch, self.batch.train
        mu, sigma = logged["mu_per_prompt"], logged["sigma_per_prompt"]  # [L, R, P]
        c = b.problem_cpu.scale.unsqueeze(0).expand_as(mu)
        h, exact = b.spec.expected_scale(sigma, mu, c, exact=train.mode == "exact", group_size=train.group_size,
                                         ddof=train.ddof, eps=train.eps)
        rate = (lr / lr_reinforce)[None, :, None] * h  # REINFORCE steps per step of this run, per prompt
        sigma_eff = theory.effective_sigma(h).mean(-1)  # [L, R]
        steps = self.log_steps.astype(float)
        gain_g, speedup = [], []
        sigma_eff, mu, rate = sigma_eff.numpy(), mu.numpy(), rate.numpy()
        for r, (t_star, reached, bound, target) in enumerate(zip(
                summary["steps_to_target"].tolist(), summary["reached_target"].tolist(),
                summary["sigma_bound"].tolist(), summary["target_J"].tolist())):
            if not reached or t_star < 1:
                gain_g.append(math.nan)
                speedup.append(math.nan)
                continue
            eff = np.interp(np.arange(t_star), steps, sigma_eff[:, r]).mean()
            gain_g.append(bound / eff if eff > 0 else math.nan)
            tau = theory.reinforce_steps_by_time_change(steps, mu[:, r], rate[:, r], target)
            speedup.append(tau / t_star)
        summary["predicted_gain_finite_g"] = np.array(gain_g, dtype=float)
        summary["predicted_speedup"] = np.array(speedup, dtype=float)
        summary["expected_scale_exact"] = exact

    def _steps_frame(self, run_ids: list[str], logged: dict[str, torch.Tensor]) -> pd.DataFrame:
        """Long format: one row per (run, logged step) with STEP_METRICS, sigma_per_prompt, phase."""
        L, R, P = logged["sigma_per_prompt"].shape
        columns = {
            "run_id": np.repeat(np.array(run_ids, dtype=object), L),
            "step": np.tile(self.log_steps, R),
            **{m: logged[m].T.reshape(-1).numpy() for m in STEP_METRICS},  # [L, R] -> [R*L]
            "gain_undefined": self.gain_undefined.T.reshape(-1),
            **{name: list(logged[name].transpose(0, 1).reshape(R * L, P).numpy())
               for name in ("sigma_per_prompt", "mu_per_prompt")},
            "phase": theory.label_phases(*(logged[m].T.numpy() for m in ("sigma_bar", "rho", "gain")),
                                         steps=self.log_steps, gain_se=logged["gain_se"].T.numpy()).reshape(-1),
        }
        return pd.DataFrame(columns)  # made at once, as the summary (result)


def train_batch(runs: Sequence[RunConfig], dtype: torch.dtype = torch.float64,
                on_progress: Callable[[int], None] | None = None, device: str | torch.device = "cpu",
                engine: str = "auto") -> BatchResult:
    """Train ``runs`` (equal ``batch_key``) together: init_state, then the engine advances the batch
    from one log step to the next (``step`` T times in all), the Recorder logging the diagnostics
    at every log step; return their summary and step metrics.

    Summary per run: initial_J, final_J, j_star, target_J, reached_target, steps_to_target
    (first t with J_t >= target; = steps when never reached, flagged by reached_target),
    auc = mean_t J_t / J*, sigma_bar_to_target (mean over t < steps_to_target of the
    prompt-mean sigma, used by the predicted gain), sigma_bound (largest possible sigma).
    ``on_progress(n)`` is called with the number of steps done since its last call.
    ``device``: where the training loop runs (a GPU, e.g. "cuda"); problems are built and the
    summary is assembled on the CPU. ``engine`` (resolve_engine): "numba" (the compiled CPU loop,
    sim.kernels), "torch" (``step``, the reference and the GPU path) or "auto"; the two agree to
    rounding (tested to 1e-12) and each run's row records which ran. Bit-identity across batch
    compositions holds for each engine on the CPU (tested); on a GPU runs agree to rounding.
    """
    name = resolve_engine(engine, device, dtype, runs[0].train.estimator if runs else None)
    advance = ENGINES[name]
    with torch.no_grad():
        state = init_state(runs, dtype, device)
        recorder = Recorder(state.batch, compiled=name == "numba")
        recorder.log(state)
        for t1 in recorder.log_steps[1:]:
            t0 = state.t
            state = advance(state, recorder.history, int(t1))
            recorder.log(state)
            if on_progress is not None:
                on_progress(int(t1) - t0)
        result = recorder.result(state)
    result.runs["engine"] = name
    return result
