"""Advantage estimators: pure torch functions on a group-structured reward tensor, and the
registry that ties each to its theory.

These are the only advantage functions in the project: the simulator (sim.engine), the LLM
runner (sim.llm) and the figures all read them through ``REGISTRY``.

Dimension legend
    ...  any leading batch dimensions (e.g. runs)
    P    prompts in the batch
    G    group size: responses sampled per prompt; g, h index them

Every advantage function takes rewards of shape [..., P, G] and returns advantages of the
same shape. Semantics follow the LLM-RL libraries (see ../shared/DESIGN.md §4):

    reinforce    A_ig = R_ig                                        (no baseline)
    dr_grpo      A_ig = R_ig - mean_g R_ig                          (Liu et al. 2025, "Dr. GRPO")
    rloo         A_ig = R_ig - (sum_h R_ih - R_ig) / (G - 1)        (Ahmadian et al. 2024)
    grpo         A_ig = (R_ig - mean_g R_ig) / (std_g R_ig + eps)   (Shao et al. 2024)
    grpo_batch   A_ig = (R_ig - mean_g R_ig) / (std_batch R + eps)  (TRL scale_rewards="batch")
    grpo_oracle  A_ig = (R_ig - mean_g R_ig) / (sigma_i + eps)      (true sigma_i; simulator only)

Adaptive estimators (issue 16) carry a state from step to step, passed in and returned
(EstimatorSpec.adaptive; the engines and both LLM backends thread it):

    grpo_phase   A_ig = (R_ig - mean_g R_ig) / (std_i^a std_B^(1-a) + eps)   (``grpo_interpolated``;
                 a_t from the measured gradient orthogonality rho_t, ``phase_aware_alpha``)
    grpo_finite  A_ig = (R_ig - mean_(h != g) R_ih) / (c_i sqrt(pt (1 - pt)) + eps)   (``grpo_finite``:
                 leave-one-out std with a running prior, the finite-G correction)
    grpo_shrunk  A_ig = (R_ig - lambda mean_(h != g) R_ih) / (c_i sqrt(pt (1 - pt)) + eps)   (``grpo_shrunk``:
                 grpo_finite with its baseline shrunk, lambda_t = rho_peak^2 from the measured rho_t)
    grpo_selfnorm A_ig = kappa_i (R_ig - lambda mean_(h != g) R_ih) / (std_g R_ig + eps)   (``grpo_selfnorm``:
                 GRPO's own std, grpo_shrunk's lambda, kappa_i >= 1 lifting GRPO's finite-G cap on hard prompts)

A constant group (all G rewards equal) gets advantage exactly 0 under every
baselined estimator (everything but ``reinforce``, which has no baseline, and ``grpo_shrunk`` and
``grpo_selfnorm`` while their baseline is shrunk). The mean is
taken relative to the group's first reward, R_ig - mean_g R_ig = d_ig - mean_g d_ig with
d_ig = R_ig - R_i1: d is exactly 0 for a constant group (x - y == 0 iff x == y in IEEE
arithmetic), so the centred rewards and the std are exactly 0 there, whereas ``mean`` of
equal floats can differ from them in the last bit and a tiny numerator over a zero std
would give an O(1) advantage.

Each ``EstimatorSpec`` carries its exact-mode limit (``population_scale``): with
w_iy = pi_iy (rbar_iy - mu_i), so that grad J_i = sum_y w_iy phi(x_i, y) (DESIGN.md §3), the
expected sampled update E[(1/G) sum_g A_ig (e_(y_ig) - pi_i)] is s_i w_i with
s_i = ``exact_factor(G) * population_scale`` exactly when ``exact_factor`` is given, and
s_i -> ``population_scale`` as G -> infinity otherwise (for noise-free rewards: the group std
then tends to sigma_i, the std of the mean reward). tests/test_estimator_registry.py checks
every entry. Library presets (TRL 1.16, verl 0.9, OpenRLHF 0.11) are entries too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from theory.finite_group import grpo_expected_scale
from theory.shapes import check_shapes
from theory.softmax import safe_reciprocal

Advantage = Callable[..., torch.Tensor]  # (rewards [..., P, G], *, ddof, eps, sigma [..., P]) -> [..., P, G]
Limit = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (sigma, mu [..., P], eps) -> [..., P]


def _safe_ratio(num: torch.Tensor, den: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """num / den with 0 where den == 0 (no NaN from 0/0), for den = (a non-negative std) + eps.

    eps > 0 keeps den >= eps > 0, so this is a plain division. Otherwise it is
    num * theory.softmax.safe_reciprocal(den): den broadcasts against num and is the small
    tensor (one value per prompt), so the reciprocal and the mask are taken on it."""
    if eps > 0:
        return num / den
    return num * safe_reciprocal(den)


def group_std(rewards: torch.Tensor, ddof: int, centered: torch.Tensor | None = None) -> torch.Tensor:
    """Within-prompt std sqrt(sum_g (R_ig - mean)^2 / (G - ddof)), [..., P, G] -> [..., P, 1];
    0 where G - ddof <= 0. ``centered`` may pass R - mean if already computed."""
    g = rewards.shape[-1]
    if g - ddof <= 0:
        return torch.zeros_like(rewards[..., :1])
    if centered is None:
        centered = rewards - rewards.mean(-1, keepdim=True)
    return ((centered * centered).sum(-1, keepdim=True) / (g - ddof)).sqrt()


def _mean_centered(rewards: torch.Tensor) -> torch.Tensor:
    """R_ig - mean_g R_ig computed as d_ig - mean_g d_ig, d_ig = R_ig - R_i1: exactly 0 for
    constant groups (module docstring). [..., P, G]."""
    d = rewards - rewards[..., :1]
    return d - d.mean(-1, keepdim=True)


def reinforce(rewards: torch.Tensor, *, ddof: int = 1, eps: float = 0.0, sigma=None) -> torch.Tensor:
    """A_ig = R_ig (Williams 1992): no baseline. [..., P, G] -> [..., P, G]."""
    return rewards.clone()


def dr_grpo(rewards: torch.Tensor, *, ddof: int = 1, eps: float = 0.0, sigma=None) -> torch.Tensor:
    """A_ig = R_ig - mean_g R_ig (Dr. GRPO; TRL scale_rewards="none"). [..., P, G]."""
    return _mean_centered(rewards)


def rloo(rewards: torch.Tensor, *, ddof: int = 1, eps: float = 0.0, sigma=None) -> torch.Tensor:
    """A_ig = R_ig - (sum_h R_ih - R_ig) / (G - 1): leave-one-out baseline, unbiased.

    Algebraically A_ig = G/(G-1) (R_ig - mean_g R_ig). [..., P, G], needs G >= 2.
    """
    g = rewards.shape[-1]
    if g < 2:
        raise ValueError("rloo needs group size G >= 2")
    return _mean_centered(rewards) * (g / (g - 1))


def grpo(rewards: torch.Tensor, *, ddof: int = 1, eps: float = 1e-4, sigma=None) -> torch.Tensor:
    """A_ig = (R_ig - mean_g R_ig) / (std_g(R_ig; ddof) + eps) (Shao et al. 2024, eq. 3).

    [..., P, G]. Constant groups give 0; with eps = 0 a zero std gives 0, not NaN.
    """
    centered = _mean_centered(rewards)
    return _safe_ratio(centered, group_std(rewards, ddof, centered) + eps, eps)


def grpo_batch(rewards: torch.Tensor, *, ddof: int = 1, eps: float = 1e-4, sigma=None) -> torch.Tensor:
    """A_ig = (R_ig - mean_g R_ig) / (std over all P*G raw rewards (ddof) + eps).

    TRL's scale_rewards="batch": the std includes between-prompt spread. [..., P, G].
    """
    return _safe_ratio(_mean_centered(rewards), batch_std(rewards, ddof) + eps, eps)


def batch_std(rewards: torch.Tensor, ddof: int) -> torch.Tensor:
    """The std (ddof) of all P*G rewards of the batch, [..., P, G] -> [..., 1, 1]; 0 where P*G - ddof <= 0."""
    flat = rewards.flatten(-2)  # [..., P*G]
    if flat.shape[-1] - ddof <= 0:
        std = torch.zeros_like(flat[..., :1])
    else:
        dev = flat - flat.mean(-1, keepdim=True)  # written out: torch's std rounds differently with the batch size
        std = ((dev * dev).sum(-1, keepdim=True) / (flat.shape[-1] - ddof)).sqrt()  # [..., 1]
    return std.unsqueeze(-1)


def grpo_oracle(rewards: torch.Tensor, *, ddof: int = 1, eps: float = 1e-4, sigma=None) -> torch.Tensor:
    """A_ig = (R_ig - mean_g R_ig) / (sigma_i + eps), sigma_i the true std of the mean
    reward under the current policy (DESIGN.md §3), shape [..., P]. Simulator only."""
    if sigma is None:
        raise ValueError("grpo_oracle needs the true per-prompt sigma")
    return _safe_ratio(_mean_centered(rewards), sigma.unsqueeze(-1) + eps, eps)


def whiten(adv: torch.Tensor, *, ddof: int, var_floor: float = 0.0, eps: float = 0.0,
           shift_mean: bool = True) -> torch.Tensor:
    """Batch whitening over the last two dims: (A - mean A) / sqrt(max(var(A; ddof), var_floor) + eps).

    With one token per response this equals the token-level whitening of verl
    (``masked_whiten``: unbiased var, rsqrt(var + 1e-8)) and OpenRLHF
    (ddof = 0, var clamped at 1e-8). [..., P, G] -> [..., P, G].
    """
    flat = adv.flatten(-2)  # [..., P*G]
    mean = flat.mean(-1, keepdim=True).unsqueeze(-1)  # [..., 1, 1]
    n = flat.shape[-1]
    dev = flat - mean.squeeze(-1)  # written out: torch's var rounds differently with the batch size
    var = ((dev * dev).sum(-1, keepdim=True) / (n - ddof)).unsqueeze(-1) if n - ddof > 0 \
        else torch.zeros_like(mean)
    out = (adv - mean) if shift_mean else adv
    return out * torch.rsqrt(torch.clamp(var, min=var_floor) + eps)


# -- adaptive normalization (issue 16): pure functions, any state passed in and returned ---------------
# The registry entries grpo_phase, grpo_finite and grpo_shrunk use them through their rules (PhaseAware,
# FiniteGCorrected, ShrunkBaseline); the torch engine, sim.reference and the LLM runners (PromptStates) thread the
# state; the numba kernels do not run them.

def grpo_interpolated(rewards: torch.Tensor, *, alpha: float | torch.Tensor, ddof: int = 1, eps: float = 1e-4,
                      sigma=None) -> torch.Tensor:
    """A_ig = (R_ig - mean_g R_ig) / (std_i^alpha * std_B^(1 - alpha) + eps), alpha in [0, 1].

    std_i: the group std (ddof) as in ``grpo``; std_B: the std of all P*G rewards (ddof) as in
    ``grpo_batch``. alpha = 1 is ``grpo`` and alpha = 0 is ``grpo_batch``, bit for bit (the two
    ends are taken as they are, not through pow). In between, the ratio of two prompts' weights is
    (std_j / std_i)^alpha: the per-prompt equalisation is applied to the power alpha, and the advantage
    keeps the units 1 / reward, so the step size keeps its meaning along the path. A constant group
    gives 0, and eps = 0 with a zero denominator gives 0, not NaN. rewards [..., P, G];
    alpha a float or [...] (one per leading batch element, e.g. per run) -> [..., P, G].
    """
    centered = _mean_centered(rewards)
    std_i = group_std(rewards, ddof, centered)  # [..., P, 1]
    std_b = batch_std(rewards, ddof)  # [..., 1, 1]
    a = torch.as_tensor(alpha, dtype=rewards.dtype, device=rewards.device)
    if bool(((a < 0) | (a > 1) | torch.isnan(a)).any()):
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    a = a.reshape(a.shape + (1, 1))  # [..., 1, 1]
    return _safe_ratio(centered, _geometric_mix(std_i, std_b.expand_as(std_i), a) + eps, eps)


def _geometric_mix(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x^a y^(1 - a), elementwise; exactly x where a = 1 and y where a = 0 (not through pow)."""
    return torch.where(a == 1, x, torch.where(a == 0, y, x.pow(a) * y.pow(1 - a)))


@dataclass(frozen=True)
class PhaseState:
    """State of ``phase_aware_alpha`` between steps [...]: rho_ema, the running mean of rho_t, and
    rho_peak, the largest rho_ema so far (the orthogonality the run has had)."""

    rho_ema: torch.Tensor
    rho_peak: torch.Tensor

    @property
    def alpha(self) -> torch.Tensor:
        """alpha = rho_ema / rho_peak in [0, 1] (1 where rho_peak = 0 or nothing is measured yet, NaN:
        nothing has been lost)."""
        ok = self.rho_peak > 0  # False for NaN
        return torch.where(ok, self.rho_ema.clamp_min(0) / torch.where(ok, self.rho_peak, torch.ones_like(self.rho_peak)),
                           torch.ones_like(self.rho_peak)).clamp(0.0, 1.0)


def phase_aware_alpha(rho: torch.Tensor, state: PhaseState | None = None, *,
                      decay: float = 0.9) -> tuple[torch.Tensor, PhaseState]:
    """(alpha_t, state_t) for ``grpo_interpolated``, from rho_t measured on the current batch.

    Rule: rho_ema_t = decay * rho_ema_(t-1) + (1 - decay) * rho_t (rho_ema_1 = rho_1),
    rho_peak_t = max_(s <= t) rho_ema_s, and alpha_t = rho_ema_t / rho_peak_t (1 where rho_peak_t = 0):
    the fraction of the run's own gradient orthogonality that is left. rho_t = 1 - mean_(i != j)
    |cos(g_i, g_j)| of the per-prompt gradients (theory.gradient_orthogonality; 1 = orthogonal).

    Why (DESIGN.md §3, our reconstruction): normalization's gain sigma_bound / sigma_bar comes from
    treating each prompt as its own problem, dividing prompt i by sigma_i so that each moves at its
    own rate under its own curvature; that decomposition is exact when the per-prompt gradients are
    orthogonal, and the gain is lost (phase III) when they come to share one direction during
    training: the weights 1 / sigma_i then only re-weight that direction, tilting it towards the
    near-solved prompts, while one scale for the batch (batch std, alpha = 0) follows it as REINFORCE
    does, with GRPO's scale invariance. What matters is the orthogonality *lost*: prompts that share
    parameters from the start (a static rho below 1) are where GRPO gains the most over REINFORCE
    (README 'What the simulator shows'), so the rule keeps GRPO there (alpha = 1 while rho_ema stays
    at its peak) and moves to batch std only as rho falls below what the run has had. Measured: the
    first version of this rule, alpha = rho_ema itself, was more than 10% slower than the best fixed
    choice in 8 of fig. 8's 12 cells with a static rho near 0.68 (o = 0.3, no failure mode).
    The running mean damps sampling noise in rho_t; it is rho_t exactly while rho_t is constant.
    Orthogonal case: rho_t = 1 at every step (exactly: the per-prompt updates lie in orthogonal
    subspaces, so their Gram matrix is diagonal), hence alpha_t = 1 and the rule is GRPO, step for
    step, with GRPO's rate (tests/test_adaptive.py); so is any run whose rho_t never falls.
    rho_t is taken over the pairs of prompts whose gradients are not zero (gradient_orthogonality's
    live_only): a solved prompt or a constant group has no direction, and counting it as orthogonal
    would pull rho_t back up exactly in the late phase. A NaN rho_t (fewer than two such prompts)
    is no measurement: the state stays as it was (alpha = 1 until a first measurement).
    Cost per step: the rewards' stds, O(P G), plus rho_t, O(P^2 d) for P per-prompt gradients or
    gradient sketches of dimension d (the caller measures it: the engines do, sim.engine).
    rho [...] -> alpha [...].
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must lie in [0, 1), got {decay}")
    rho = torch.as_tensor(rho, dtype=torch.float64) if not torch.is_tensor(rho) else rho
    if state is None:
        state = PhaseState(torch.full_like(rho, float("nan")), torch.full_like(rho, float("nan")))
    prev = state.rho_ema
    # as prev + (1 - decay) (rho - prev): equal to rho_t exactly where rho_t does not change
    ema = torch.where(torch.isnan(rho), prev, torch.where(torch.isnan(prev), rho, prev + (1 - decay) * (rho - prev)))
    new = PhaseState(ema, torch.fmax(state.rho_peak, ema))
    return new.alpha, new


def interpolated_limit(sigma: torch.Tensor, mu: torch.Tensor, eps: float, alpha) -> torch.Tensor:
    """Exact-mode limit of ``grpo_interpolated``: s_i = 1 / (sigma_i^alpha sigma_B^(1 - alpha) + eps)
    (sigma_B as in ``_batch_std_limit``); alpha = 1 and 0 are the grpo and grpo_batch limits bit for
    bit. sigma, mu [..., P], alpha a float or [...] -> [..., P]."""
    a = torch.as_tensor(alpha, dtype=sigma.dtype, device=sigma.device)
    a = a.reshape(a.shape + (1,))  # [..., 1]
    mixed = _geometric_mix(sigma, _batch_sigma(sigma, mu).expand_as(sigma), a)
    return _safe_ratio(torch.ones_like(sigma), mixed + eps)


class PhaseAware:
    """``grpo_phase``: ``grpo_interpolated`` at alpha_t = ``phase_aware_alpha``(rho_t), the state a
    PhaseState (None before the first step, read as alpha = 1).

    Each step the engine measures rho_t on the step's batch (sampled mode: the per-prompt sampled
    gradients; exact mode: the exact ones) and calls ``step``; ``at`` gives the advantages at a
    state without moving it (the diagnostics' dJ_run)."""

    needs_rho = needs_rho_exact = True  # (sampled mode, exact mode)
    per_prompt = False  # one state per run (rho_ema), not per prompt

    def __init__(self, decay: float = 0.9):
        self.decay = decay

    @staticmethod
    def alpha(state: PhaseState | None):
        return 1.0 if state is None else state.alpha

    def at(self, rewards, state, *, ddof, eps):
        return grpo_interpolated(rewards, alpha=self.alpha(state), ddof=ddof, eps=eps)

    def step(self, rewards, state, rho, *, ddof, eps):
        alpha, state = phase_aware_alpha(rho, state, decay=self.decay)
        return grpo_interpolated(rewards, alpha=alpha, ddof=ddof, eps=eps), state

    def scale_at(self, sigma, mu, state, eps):
        return interpolated_limit(sigma, mu, eps, self.alpha(state))

    def scale_step(self, sigma, mu, state, rho, eps):
        alpha, state = phase_aware_alpha(rho, state, decay=self.decay)
        return interpolated_limit(sigma, mu, eps, alpha), state


@dataclass(frozen=True)
class FiniteGState:
    """State of ``FiniteGCorrected`` [..., P]: p_bar, the running success rate of each prompt
    (rewards in units of c), c, the largest reward seen, and seen, whether the prompt has been
    (False: no prior yet, as on the first step; the LLM runners draw prompts from a data set)."""

    p_bar: torch.Tensor
    c: torch.Tensor
    seen: torch.Tensor


def grpo_finite(rewards: torch.Tensor, *, ddof: int = 1, eps: float = 1e-4, sigma=None,
                state: FiniteGState | None = None, prior: float = 8.0) -> torch.Tensor:
    """Finite-G-corrected GRPO: a leave-one-out baseline and a leave-one-out, prior-smoothed std,

        A_ig = (R_ig - mean_(h != g) R_ih) / (c_i sqrt(pt_ig (1 - pt_ig)) + eps),
        pt_ig = (k_i,-g + n0 p_bar_i + 1/2) / (G + n0),

    k_i,-g = sum_(h != g) R_ih / c_i the successes among the other G - 1 samples, n0 = ``prior``
    pseudo-samples at the running success rate p_bar_i of earlier steps (``state``; none on a
    prompt's first step: n0 = 0), + 1/2 a Jeffreys pseudo-count, c_i = the largest reward seen (the
    state's, or this group's). For rewards in {0, c_i} (verifiable rewards: the simulator's family and the
    LLM runner's); other rewards in [0, c_i] count as fractional successes, negative ones are refused
    (ValueError). ``ddof`` is not used.

    Why: GRPO's expected step is h_G(p) grad J_i (theory.finite_group), not the population
    grad J_i / sigma_i, because sample g's std reads its own reward: that biases it and caps the
    scale at (G - 1) / (sqrt(G) c) on near-solved and near-hopeless prompts (README 'Where it
    shrinks: group size'). Here sample g's baseline and scale read only the other samples and
    earlier steps, which are independent of R_ig, so the expected step is exactly
    h~_G(p) grad J_i with h~_G(p) = E_(j ~ Binom(G-1, p))[1 / (c sqrt(pt_j (1 - pt_j)) + eps)]
    (theory.finite_group.loo_expected_scale), and as G -> infinity pt -> p and the step tends to
    the population GRPO step grad J_i / (sigma_i + eps) (noise-free rewards). No function of the
    group alone can be unbiased for it at finite G: its expected scale is a polynomial of degree
    <= G - 1 in p, and 1 / sqrt(p (1 - p)) is none. The prior carries the information of earlier
    steps, so a near-solved prompt's rare failure is weighted by about 1 / sigma_i rather than
    GRPO's cap, while pt stays in (0, 1): the scale is finite. A constant group gives 0. Cost:
    O(P G) per step, two numbers per prompt of state.
    Rate (orthogonal case): each prompt then moves on its own, at the expected rate h grad J_i
    (the time change, theory.reinforce_steps_by_time_change), and at the state's fixed point
    p_bar_i = p_i the scale is at least GRPO's, h~_G(p) >= h_G(p), for every p, G, prior and eps
    (checked, not proved: tests/test_adaptive.py, the smallest ratio 1.0014 at G = 1024): not
    slower than GRPO's rate at the same lr; a stale p_bar can be below it for a while.
    rewards [..., P, G] -> [..., P, G]; state fields [..., P] (broadcast against rewards[..., 0]).
    """
    _check_finite_rewards("grpo_finite", rewards)
    return _safe_ratio(_loo_centred(rewards), _finite_scale_den(rewards, state, prior, eps), eps)


def _check_finite_rewards(name: str, rewards: torch.Tensor) -> None:
    if rewards.shape[-1] < 2:
        raise ValueError(f"{name} needs group size G >= 2")
    if bool((rewards < 0).any()):  # c = the largest reward would not bound them: pt could leave (0, 1)
        raise ValueError(f"{name} needs rewards >= 0 (verifiable rewards in {{0, c}}), got {float(rewards.min()):g}")


def _loo_centred(rewards: torch.Tensor) -> torch.Tensor:
    """R_ig - mean_(h != g) R_ih [..., P, G], relative to the first reward: exactly 0 for a constant group."""
    d = rewards - rewards[..., :1]
    return d - (d.sum(-1, keepdim=True) - d) / (rewards.shape[-1] - 1)


def _finite_scale_den(rewards: torch.Tensor, state, prior: float, eps: float) -> torch.Tensor:
    """grpo_finite's denominator c_i sqrt(pt_ig (1 - pt_ig)) + eps [..., P, G] (its docstring); ``state``
    any state with p_bar, c, seen [..., P] (FiniteGState, ShrunkState) or None."""
    c, pt = _finite_success_rate(rewards, state, prior)
    return c * (pt * (1 - pt)).sqrt() + eps


def _finite_success_rate(rewards: torch.Tensor, state, prior: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_i [..., P, 1], pt_ig [..., P, G]) of ``grpo_finite``'s scale (its docstring): the largest reward
    seen and the prior-smoothed leave-one-out success rate."""
    g = rewards.shape[-1]
    c = _largest_reward(rewards, state).unsqueeze(-1)  # [..., P, 1]
    total = rewards.sum(-1, keepdim=True)
    others = _safe_ratio(total - rewards, c)  # [..., P, G]: k_-g in units of c
    if state is None:
        n0, pb = 0.0, 0.0
    else:
        n0 = torch.where(state.seen, prior, 0.0).to(rewards.dtype).unsqueeze(-1)  # [..., P, 1]
        pb = state.p_bar.unsqueeze(-1)
    return c, (others + n0 * pb + 0.5) / (g + n0)


def _largest_reward(rewards: torch.Tensor, state: FiniteGState | None) -> torch.Tensor:
    """c_i [..., P]: the largest reward seen, the state's and this group's."""
    top = rewards.amax(-1)
    return top if state is None else torch.maximum(state.c, top)


class FiniteGCorrected:
    """``grpo_finite`` (its docstring) with its state: p_bar_i <- decay p_bar_i + (1 - decay) k_i / G
    after each step (the first step sets it), c_i the largest reward seen.

    Exact mode is the G -> infinity limit, exact grpo's s_i = 1 / (sigma_i + eps), and needs no state."""

    needs_rho = needs_rho_exact = False  # (sampled mode, exact mode)
    per_prompt = True  # a state per prompt: the LLM runners key it by the prompt (PromptStates)

    def __init__(self, decay: float = 0.9, prior: float = 8.0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        self.decay, self.prior = decay, prior

    def at(self, rewards, state, *, ddof, eps):
        return grpo_finite(rewards, ddof=ddof, eps=eps, state=state, prior=self.prior)

    def step(self, rewards, state, rho, *, ddof, eps):
        return self.at(rewards, state, ddof=ddof, eps=eps), self.next_prompt_state(rewards, state)

    def next_prompt_state(self, rewards, state) -> FiniteGState:
        """The per-prompt state after a step with ``rewards`` [..., P, G] (``state``: any with p_bar,
        c, seen [..., P], or None)."""
        c = _largest_reward(rewards, state)
        rate = _safe_ratio(rewards.mean(-1), c)  # [..., P]: this group's success rate (0 while c = 0)
        if state is None:
            return FiniteGState(rate, c, torch.ones_like(rate, dtype=torch.bool))
        p_bar = torch.where(state.seen, state.p_bar + (1 - self.decay) * (rate - state.p_bar), rate)
        return FiniteGState(p_bar, c, torch.ones_like(state.seen))

    @staticmethod
    def with_run_state(prompt_state: FiniteGState, run_state) -> FiniteGState:
        """The rule's state from its per-prompt part and its per-run part (none here): PromptStates."""
        return prompt_state

    @staticmethod
    def run_state(state):
        """The per-run part of ``state`` (none here): PromptStates keeps it beside its per-prompt table."""
        return None

    def scale_at(self, sigma, mu, state, eps):
        return _group_std_limit(sigma, mu, eps)

    def scale_step(self, sigma, mu, state, rho, eps):
        return _group_std_limit(sigma, mu, eps), None


@dataclass(frozen=True)
class ShrunkState:
    """State of ``ShrunkBaseline``: grpo_finite's per-prompt fields p_bar, c, seen [..., P]
    (FiniteGState) and phase_aware_alpha's per-run fields rho_ema, rho_peak [...] (PhaseState)."""

    p_bar: torch.Tensor
    c: torch.Tensor
    seen: torch.Tensor
    rho_ema: torch.Tensor
    rho_peak: torch.Tensor


#: ``grpo_shrunk``'s exponent q in lambda = rho_peak^q (its docstring: a calibration, not derived).
SHRINK_EXPONENT = 2.0


def baseline_fraction(rho_peak, exponent: float = SHRINK_EXPONENT) -> torch.Tensor:
    """lambda = rho_peak^q in [0, 1] (``grpo_shrunk``): 1 where nothing has been measured (NaN, None).
    Orthogonal prompts give rho_t = 1 exactly in every dtype (theory.gradient_orthogonality sums only
    the off-diagonal cosines), so their lambda is 1 exactly."""
    if rho_peak is None:
        return torch.ones(())
    peak = torch.as_tensor(rho_peak)
    return torch.where(torch.isnan(peak), torch.ones_like(peak), peak.clamp(0.0, 1.0) ** exponent)


def grpo_shrunk(rewards: torch.Tensor, *, ddof: int = 1, eps: float = 1e-4, sigma=None,
                state: ShrunkState | FiniteGState | None = None, prior: float = 8.0,
                fraction: float | torch.Tensor = 1.0) -> torch.Tensor:
    """grpo_finite with its leave-one-out baseline shrunk by a factor lambda = ``fraction`` in [0, 1]:

        A_ig = (R_ig - lambda mean_(h != g) R_ih) / (c_i sqrt(pt_ig (1 - pt_ig)) + eps),

    pt_ig, c_i as in ``grpo_finite`` (``state``'s p_bar, c, seen). lambda = 1 is grpo_finite bit for
    bit, lambda = 0 its scale without a baseline (REINFORCE's advantages, finite-G scaled). The
    baseline and the scale read only the other samples and earlier steps, so for every lambda the
    expected step is grpo_finite's h~_G(p) grad J_i: lambda moves only the variance. A constant group
    gives (1 - lambda) R / scale: 0 where lambda = 1 or R = 0 (as REINFORCE, not as a baselined
    estimator). rewards [..., P, G]; fraction a float or [...] (one per leading batch element).
    """
    _check_finite_rewards("grpo_shrunk", rewards)
    lam = _baseline_fraction_tensor(fraction, rewards)
    adv = _shrunk_centred(rewards, lam.reshape(lam.shape + (1, 1)))
    return _safe_ratio(adv, _finite_scale_den(rewards, state, prior, eps), eps)


def _baseline_fraction_tensor(fraction, rewards: torch.Tensor) -> torch.Tensor:
    """lambda as a tensor of the rewards' dtype and device (a float or [...]); ValueError outside [0, 1]."""
    lam = torch.as_tensor(fraction, dtype=rewards.dtype, device=rewards.device)
    if bool(((lam < 0) | (lam > 1) | torch.isnan(lam)).any()):
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    return lam


def _shrunk_centred(rewards: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """R_ig - lam mean_(h != g) R_ih [..., P, G] (``grpo_shrunk``'s numerator), lam [..., 1, 1] in [0, 1]:
    the leave-one-out centring itself where lam = 1."""
    loo = _loo_centred(rewards)
    return torch.where(lam == 1, loo, lam * loo + (1 - lam) * rewards)


class ShrunkBaseline(FiniteGCorrected):
    """``grpo_shrunk``: grpo_finite's finite-G scale, with its leave-one-out baseline shrunk by
    lambda_t = rho_peak_t^q, q = ``SHRINK_EXPONENT`` = 2, rho_peak_t the largest running mean of the
    measured gradient orthogonality rho_t so far (``phase_aware_alpha``'s state: the orthogonality the
    run has had; 1 for orthogonal prompts).

    Why (README 'Adaptive normalization': our reconstruction and our measurements). A baseline that
    reads only the other samples leaves the expected step alone and changes its second moment. To
    second order, at its tuned lr an update g gains (grad J . E g)^2 / (2 E[-g^T H g]) per step
    (H = Hess J), so what a baseline b_i costs or saves is the curvature-weighted second moment
    E[(R - b_i)^2 (-s^T H s)] of prompt i's scores s. With orthogonal prompts a score lies in its
    prompt's own block and meets only that prompt's curvature; with shared parameters its shared part
    meets every prompt's. Measured exactly at theta = 0 on fig. 8's problems: the curvature-weighted
    second moment of a score is 10x larger at o = 0.3 than at o = 1, and the b_i minimising it is 0.2
    to 0.4 of the mean reward (median over prompts; 0 on near-solved prompts), so REINFORCE's b = 0
    is nearer to it than the mean (experiments/baseline_curvature.py): the one-step gain ratio RLOO /
    REINFORCE it predicts, 0.65 at o = 0.3, difficulty 0.3, reward spread 1, G = 4, is the measured
    1 / 1.49 there, and has the measured sign, not size, in three more cells. At o = 1 the baseline
    costs about nothing and the full leave-one-out baseline is the usual choice (it wins fig. 8's
    failure-mode cells). The rule reads the sharing from rho (1 - the mean |cos| between prompts'
    gradients): the full baseline at rho_peak = 1, less of it as prompts share more. The exponent is a calibration on fig.
    8's grid (q = 1: 28 of 32 sampled cells within 10%, q = 2: 31, 4 seeds), not a derivation; the peak,
    not rho_t, because the orthogonality lost late in training (phase III) is grpo_phase's business,
    and the baseline's cost is set by the sharing from the start.
    lambda_t reads this step's own rho_t (as grpo_phase's alpha does), so the expected step is
    grpo_finite's given the state only where this batch cannot raise the peak, which is every step
    once rho_peak has settled (in the first steps: fig. 8's lambda is constant from step 50 on, and
    mostly from step 1).
    Exact mode is grpo_finite's (the expected step does not depend on lambda): needs no state.
    Rate (orthogonal case): rho_t = 1 at every step, lambda = 1, so the rule is grpo_finite step for
    step, with its rate (not slower than GRPO's; tests/test_adaptive.py).
    Cost per step: grpo_finite's O(P G) plus, in sampled mode, rho_t (as grpo_phase: O(P^2 d) from P
    per-prompt gradients or sketches of dimension d); two numbers per prompt and two per run of state."""

    needs_rho = True
    needs_rho_exact = False  # exact mode is grpo_finite's limit, which reads no rho
    per_prompt = True  # p_bar, c per prompt (PromptStates keys them by prompt), rho_ema and rho_peak per run

    def __init__(self, decay: float = 0.9, prior: float = 8.0, exponent: float = SHRINK_EXPONENT):
        super().__init__(decay, prior)
        if not exponent > 0:
            raise ValueError(f"exponent must be > 0, got {exponent}")
        self.exponent = exponent

    def fraction_of_peak(self, rho_peak) -> torch.Tensor:
        """lambda from rho_peak ([...], or None: nothing measured)."""
        return baseline_fraction(rho_peak, self.exponent)

    def fraction(self, state) -> torch.Tensor:
        return self.fraction_of_peak(None if state is None else state.rho_peak)

    def advantages(self, rewards, state, *, ddof, eps, fraction) -> torch.Tensor:
        """The advantages at baseline fraction ``fraction`` (``grpo_shrunk``)."""
        return grpo_shrunk(rewards, ddof=ddof, eps=eps, state=state, prior=self.prior, fraction=fraction)

    def at(self, rewards, state, *, ddof, eps):
        return self.advantages(rewards, state, ddof=ddof, eps=eps, fraction=self.fraction(state))

    def step(self, rewards, state, rho, *, ddof, eps):
        run = self.run_state(state)
        if rho is None:  # not measured (a rule that does not read it): NaN, no measurement
            rho = torch.full(rewards.shape[:-2], float("nan"), dtype=rewards.dtype)
        _, run = phase_aware_alpha(rho, run, decay=self.decay)  # rho_ema, rho_peak after this step's rho_t
        adv = self.advantages(rewards, state, ddof=ddof, eps=eps, fraction=self.fraction_of_peak(run.rho_peak))
        return adv, self.with_run_state(self.next_prompt_state(rewards, state), run)

    @staticmethod
    def with_run_state(prompt_state, run_state) -> ShrunkState:
        if run_state is None:  # nothing measured yet: NaN, read as lambda = 1
            nan = torch.full((), float("nan"), dtype=prompt_state.p_bar.dtype)
            run_state = PhaseState(nan, nan)
        return ShrunkState(prompt_state.p_bar, prompt_state.c, prompt_state.seen, run_state.rho_ema, run_state.rho_peak)

    @staticmethod
    def run_state(state: ShrunkState | None) -> PhaseState | None:
        return None if state is None else PhaseState(state.rho_ema, state.rho_peak)


def grpo_selfnorm(rewards: torch.Tensor, *, ddof: int = 1, eps: float = 1e-4, sigma=None,
                  state: ShrunkState | FiniteGState | None = None, prior: float = 8.0,
                  fraction: float | torch.Tensor = 1.0) -> torch.Tensor:
    """GRPO's own group std, grpo_shrunk's baseline fraction lambda, and GRPO's finite-G cap lifted on
    hard prompts:

        A_ig = kappa_i (R_ig - lambda mean_(h != g) R_ih) / (std_g(R_i; ddof) + eps),
        kappa_i = max(1, 1 / ((c_i sqrt(ps_i (1 - ps_i)) + eps) h_G(ps_i)))   where ps_i < 1/2, else 1,
        ps_i = ((G + n0) p_bar_i + 1/2) / (G + n0 + 1),

    h_G GRPO's expected finite-G scale (theory.finite_group.grpo_expected_scale), p_bar_i, c_i the
    state's running success rate and largest reward (``grpo_finite``), n0 = ``prior``; kappa_i = 1 for
    a prompt not seen before (``state`` None or not seen). A constant group (std 0) takes grpo_shrunk's
    denominator instead: (1 - lambda) R / scale, 0 where lambda = 1.

    Why (README 'Adaptive normalization', measured, not derived): where orthogonality is lost (o = 1
    with the failure mode) GRPO's raw std beats grpo_finite's smoothed scale at the tuned lr although
    its expected step is the worse one (exact runs at each estimator's expected scale: 147 against
    129 steps): how the std moves with the sample lets GRPO take a larger step before the steps-against-lr
    cliff. Where GRPO's cap binds on hard prompts (a rare success, h_G -> (G - 1) / (sqrt(G) c) as
    p -> 0 against 1 / sigma_i) grpo_finite wins (fig. 8: 68.5 steps against 217). This keeps the
    raw std and multiplies by kappa_i, which depends on the state only, so at lambda = 1 (once c_i is
    known; the leave-one-out centring is G / (G - 1) times the group-mean one) the expected step is
    exactly kappa_i G / (G - 1) h_G(p_i) grad J_i: the finite-G target 1 / (c sqrt(ps (1 - ps)) + eps)
    for a hard prompt (times G / (G - 1)), GRPO's for a near-solved one (lifting both sides was
    slower on the hold-out grid: experiments/adaptive_probes.py selfnorm, README).
    Rate (orthogonal case): rho_t = 1, lambda = 1 and kappa_i >= 1, so each prompt's expected step is
    at least GRPO's, kappa_i G / (G - 1) h_G(p_i) >= h_G(p_i): not slower than GRPO's rate at the same
    lr (the time change, theory.reinforce_steps_by_time_change; tests/test_adaptive.py).
    Cost per step: grpo_shrunk's plus h_G at P rates, O(P G). rewards [..., P, G] -> [..., P, G].
    """
    _check_finite_rewards("grpo_selfnorm", rewards)
    lam = _baseline_fraction_tensor(fraction, rewards)
    adv = _selfnorm_unlifted(rewards, state, prior, ddof, eps, lam)
    if state is None:
        return adv
    return adv * _finite_g_lift(rewards, state, prior, ddof, eps).unsqueeze(-1)


def _selfnorm_unlifted(rewards: torch.Tensor, state, prior: float, ddof: int, eps: float,
                       lam: torch.Tensor) -> torch.Tensor:
    """``grpo_selfnorm`` before its lift [..., P, G]: the shrunk leave-one-out centring over GRPO's std
    (grpo_shrunk's denominator for a constant group); lam a scalar or [...] tensor."""
    centred = _shrunk_centred(rewards, lam.reshape(lam.shape + (1, 1)))
    std = group_std(rewards, ddof)  # [..., P, 1]
    den = torch.where(std > 0, std + eps, _finite_scale_den(rewards, state, prior, eps))
    return _safe_ratio(centred, den, eps)


def _finite_g_lift(rewards: torch.Tensor, state, prior: float, ddof: int, eps: float,
                   hard_only: bool = True) -> torch.Tensor:
    """kappa_i [..., P] of ``grpo_selfnorm`` (its docstring) at ``state`` (p_bar, c, seen [..., P]);
    ``hard_only`` False: the finite-G target over h_G on both sides, unclamped (the probe
    experiments/adaptive_probes.py selfnorm's sn_both)."""
    g = rewards.shape[-1]
    c = _largest_reward(rewards, state)  # [..., P]
    n = g + prior
    ps = (n * state.p_bar + 0.5) / (n + 1)
    h = grpo_expected_scale(ps, g, ddof, eps, c)
    target = 1 / (c * (ps * (1 - ps)).sqrt() + eps)  # the finite-G target scale at ps
    kappa = torch.where(h > 0, target / torch.where(h > 0, h, torch.ones_like(h)), torch.ones_like(h))
    if hard_only:
        kappa = torch.where(ps < 0.5, kappa.clamp(min=1.0), torch.ones_like(kappa))
    return torch.where(state.seen & (c > 0), kappa, torch.ones_like(kappa))


class SelfNormalized(ShrunkBaseline):
    """``grpo_selfnorm`` with its state: grpo_shrunk's (p_bar, c per prompt; rho_ema, rho_peak per run;
    lambda_t = rho_peak^2), only the advantages differ. Exact mode is exact GRPO (G -> infinity:
    std -> sigma_i and h_G -> the target, kappa -> 1), which needs no state."""

    def advantages(self, rewards, state, *, ddof, eps, fraction) -> torch.Tensor:
        return grpo_selfnorm(rewards, ddof=ddof, eps=eps, state=state, prior=self.prior, fraction=fraction)


class PromptStates:
    """An adaptive estimator's advantages across the steps of an LLM run (sim.llm: the native runner
    and the TRL backend, the same object): a per-prompt state (grpo_finite) is kept per prompt key
    (the prompt text: prompts are drawn from a data set, so a batch's rows change from step to step)
    and gathered into the batch's rows before the step, scattered back after it; a per-run state
    (grpo_phase; grpo_shrunk's rho_ema and rho_peak, beside its per-prompt table) is kept as is.
    Every process computes it from the gathered rewards and keys, so all hold the same state."""

    def __init__(self, name: str, ddof: int, eps: float):
        self.spec = get(name)
        if self.spec.adaptive is None:
            raise ValueError(f"{name} is not an adaptive estimator")
        self.ddof, self.eps = ddof, eps
        self.table: dict = {}  # prompt key -> (p_bar, c) (per-prompt rules)
        self.state = None  # per-run rules, and a per-prompt rule's per-run part

    def __call__(self, rewards: torch.Tensor, keys: list, rho: torch.Tensor | None = None) -> torch.Tensor:
        """Advantages [P, G] of rewards [P, G] for the prompts ``keys`` [P]; rho: the step's measured
        rho_t (rules with needs_rho). A group with a NaN reward (TRL: a completion no reward function
        scored) gets advantage 0 and leaves its prompt's state as it was."""
        rule = self.spec.adaptive
        if rule.needs_rho and rho is None:
            raise ValueError(f"{self.spec.name} needs the step's rho_t")
        if len(keys) != rewards.shape[0]:
            raise ValueError(f"{len(keys)} prompt keys for {rewards.shape[0]} groups of rewards")
        bad = torch.isnan(rewards).any(-1)  # [P]
        clean = torch.where(bad.unsqueeze(-1), torch.zeros_like(rewards), rewards)
        if not rule.per_prompt:
            adv, self.state = rule.step(clean, self.state, rho, ddof=self.ddof, eps=self.eps)
            return torch.where(bad.unsqueeze(-1), torch.zeros_like(adv), adv)
        rows = [self.table.get(k) for k in keys]
        seen = torch.tensor([r is not None for r in rows])
        known = [r if r is not None else (0.0, 0.0) for r in rows]
        state = FiniteGState(torch.tensor([r[0] for r in known], dtype=rewards.dtype),
                             torch.tensor([r[1] for r in known], dtype=rewards.dtype), seen)
        adv, new = rule.step(clean, rule.with_run_state(state, self.state), rho, ddof=self.ddof, eps=self.eps)
        self.state = rule.run_state(new)  # a per-run part beside the table (grpo_shrunk's rho_peak), or None
        for k, p_bar, c, skip in zip(keys, new.p_bar.tolist(), new.c.tolist(), bad.tolist()):
            if not skip:
                self.table[k] = (p_bar, c)  # a prompt drawn twice in one batch: its last row's
        return torch.where(bad.unsqueeze(-1), torch.zeros_like(adv), adv)


# -- exact-mode limits: per-prompt weight s_i of grad J_i, sigma and mu [..., P] -> [..., P] ----------

def _unit_limit(sigma: torch.Tensor, mu: torch.Tensor, eps: float) -> torch.Tensor:
    """s_i = 1: E[A_ig | y_ig] - baseline terms average to the true gradient (REINFORCE, RLOO, Dr. GRPO)."""
    return torch.ones_like(sigma)


def _group_std_limit(sigma: torch.Tensor, mu: torch.Tensor, eps: float) -> torch.Tensor:
    """s_i = 1 / (sigma_i + eps), 0 where sigma_i + eps = 0 (then grad J_i = 0 too)."""
    return _safe_ratio(torch.ones_like(sigma), sigma + eps)


def _batch_sigma(sigma: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """sigma_B [..., 1], sigma_B^2 = mean_i sigma_i^2 + var_i mu_i: the population variance of the
    reward mixture over the batch (the std of all P*G raw rewards as G -> infinity)."""
    dev = mu - mu.mean(-1, keepdim=True)  # var_i mu_i written out: torch's var rounds differently with the batch size
    return ((sigma**2).mean(-1, keepdim=True) + (dev * dev).mean(-1, keepdim=True)).sqrt()


def _batch_std_limit(sigma: torch.Tensor, mu: torch.Tensor, eps: float) -> torch.Tensor:
    """s_i = 1 / (sigma_B + eps) (``_batch_sigma``)."""
    return _safe_ratio(torch.ones_like(sigma), _batch_sigma(sigma, mu) + eps).expand_as(sigma)


@dataclass(frozen=True)
class Whitening:
    """Batch whitening after the base estimator (verl / OpenRLHF baselines): see ``whiten``."""

    ddof: int
    var_floor: float = 0.0
    eps: float = 0.0


@dataclass(frozen=True)
class EstimatorSpec:
    """One estimator (or library preset) and its theory.

    name             registry key (--estimators, TrainConfig.estimator, LLMConfig.estimator)
    label            display name (tables, figure legends)
    advantage        (rewards [..., P, G], *, ddof, eps, sigma [..., P]) -> advantages [..., P, G]
    population_scale exact-mode limit: (sigma, mu [..., P], eps) -> s_i [..., P], the weight of
                     grad J_i that the expected sampled update tends to (module docstring)
    exact_factor     G -> c(G) with E[sampled update] = c(G) * s_i * grad J_i exactly at every G;
                     None when s_i is only the G -> infinity limit
    std_normalized   divides by a reward std (GRPO-type): theory step size P/M, else P/(M sigma_bound)
    min_group        smallest group size it is defined for (1: no baseline)
    llm              the LLM runner may use it (False: it needs the true sigma_i)
    library          the name peers use for it (TRL / verl / OpenRLHF)
    base             the estimator a preset configures (itself for base estimators)
    ddof, eps        fixed by a preset (None: the caller's value)
    whitening        batch whitening a preset applies after its base estimator (None: none)
    finite_scale     (p, c, G, ddof, eps) -> h_G with E[sampled update_i] = h_G grad J_i exactly,
                     for rewards in {0, c} with success probability p (theory.finite_group), where
                     the scale is not exact_factor(G) * s_i; None: not known in closed form
    adaptive         the rule of a stateful estimator (PhaseAware, FiniteGCorrected, ...: state passed in and
                     returned; the engine threads it, sim.engine.step); None for the stateless
                     ones. ``advantage`` and ``population_scale`` are then its first step's (no state)
    """

    name: str
    label: str
    advantage: Advantage
    population_scale: Limit
    exact_factor: Callable[[int], float] | None
    std_normalized: bool
    min_group: int
    llm: bool
    library: str
    base: str = ""
    ddof: int | None = None
    eps: float | None = None
    whitening: Whitening | None = None
    finite_scale: Callable | None = None
    adaptive: PhaseAware | FiniteGCorrected | ShrunkBaseline | SelfNormalized | None = None

    def __post_init__(self):
        if not callable(self.advantage) or not callable(self.population_scale):
            raise TypeError(f"estimator {self.name!r} needs an advantage function and its exact-mode limit")
        if self.exact_factor is not None and not callable(self.exact_factor):
            raise TypeError(f"estimator {self.name!r}: exact_factor must be a function of G or None")
        if not self.base:
            object.__setattr__(self, "base", self.name)

    def advantages(self, rewards: torch.Tensor, *, ddof: int = 1, eps: float = 1e-4,
                   sigma: torch.Tensor | None = None, state=None) -> torch.Tensor:
        """A [..., P, G] for rewards [..., P, G]; a preset's own ddof/eps override the arguments.
        An adaptive estimator's advantages at ``state`` (its leading dims broadcast against the
        rewards'), without moving it (``adaptive.step`` moves it); None: its first step's."""
        check_shapes(self.name, rewards=(rewards, "... P G"), sigma=(sigma, "... P"))
        ddof = self.ddof if self.ddof is not None else ddof
        eps = self.eps if self.eps is not None else eps
        if self.adaptive is not None and state is not None:
            return self.adaptive.at(rewards, state, ddof=ddof, eps=eps)
        return self.advantage(rewards, ddof=ddof, eps=eps, sigma=sigma)

    def scale(self, sigma: torch.Tensor, mu: torch.Tensor, eps: float, state=None) -> torch.Tensor:
        """s_i [..., P] of the exact-mode update s_i grad J_i (a preset's own eps overrides ``eps``);
        an adaptive estimator's at its exact-mode ``state`` (None: its first step's)."""
        check_shapes(self.name, sigma=(sigma, "... P"), mu=(mu, "... P"))
        eps = self.eps if self.eps is not None else eps
        if self.adaptive is not None and state is not None:
            return self.adaptive.scale_at(sigma, mu, state, eps)
        return self.population_scale(sigma, mu, eps)

    def expected_scale(self, sigma: torch.Tensor, mu: torch.Tensor, reward_scale: torch.Tensor, *, exact: bool,
                       group_size: int, ddof: int, eps: float) -> tuple[torch.Tensor, bool]:
        """(h_i [..., P], exact_at_G) with E[update of prompt i] = h_i grad J_i: the population
        scale s_i in exact mode; in sampled mode exact_factor(G) s_i or finite_scale at
        p_i = mu_i / c_i (rewards in {0, c_i}), exactly, else the G -> infinity limit s_i
        (exact_at_G False). reward_scale c [..., P]. An adaptive estimator's scale depends on its
        state, which this does not see: its first step's s_i, flagged not exact (False)."""
        eps_used = self.eps if self.eps is not None else eps
        s = self.scale(sigma, mu, eps)
        if self.adaptive is not None:
            return s, False
        if exact or self.exact_factor is not None:
            return (s if exact else self.exact_factor(group_size) * s), True
        if self.finite_scale is not None:
            p = (mu / reward_scale).clamp(0.0, 1.0)
            return self.finite_scale(p, reward_scale, group_size, self.ddof if self.ddof is not None else ddof,
                                     eps_used), True
        return s, False


def _mean_baseline_factor(G: int) -> float:
    """E[(R_g - mean_h R_h) s_g] = (G-1)/G Cov(R, s): the mean includes the sample's own reward."""
    return (G - 1) / G


_BASE = (
    EstimatorSpec("reinforce", "REINFORCE", reinforce, _unit_limit, lambda G: 1.0, False, 1, True,
                  "no baseline (REINFORCE)"),
    EstimatorSpec("dr_grpo", "Dr. GRPO", dr_grpo, _unit_limit, _mean_baseline_factor, False, 2, True,
                  "TRL scale_rewards='none'; verl/OpenRLHF mean baseline"),
    EstimatorSpec("rloo", "RLOO", rloo, _unit_limit, lambda G: 1.0, False, 2, True,
                  "TRL RLOOTrainer; verl/OpenRLHF 'rloo'"),
    EstimatorSpec("grpo", "GRPO", grpo, _group_std_limit, None, True, 2, True,
                  "TRL scale_rewards='group'; verl/OpenRLHF 'grpo' / 'group_norm'",
                  finite_scale=lambda p, c, G, ddof, eps: grpo_expected_scale(p, G, ddof, eps, c)),
    EstimatorSpec("grpo_batch", "GRPO (batch std)", grpo_batch, _batch_std_limit, None, True, 2, True,
                  "TRL scale_rewards='batch'"),
    EstimatorSpec("grpo_oracle", "GRPO (true sigma)", grpo_oracle, _group_std_limit, _mean_baseline_factor,
                  True, 2, False, "none (the simulator knows sigma_i)"),
    # adaptive (issue 16): their stateless fields are their first step's (no state)
    EstimatorSpec("grpo_phase", "GRPO (phase-aware)", grpo, _group_std_limit, None, True, 2, True,
                  "none (std_i^alpha std_B^(1-alpha), alpha from the measured rho_t)", adaptive=PhaseAware()),
    EstimatorSpec("grpo_finite", "GRPO (finite-G corrected)", grpo_finite, _group_std_limit, None, True, 2, True,
                  "none (leave-one-out std with a running prior)", adaptive=FiniteGCorrected()),
    EstimatorSpec("grpo_shrunk", "GRPO (shrunk baseline)", grpo_finite, _group_std_limit, None, True, 2, True,
                  "none (grpo_finite, its baseline times rho_peak^2 from the measured rho_t)",
                  adaptive=ShrunkBaseline()),
    EstimatorSpec("grpo_selfnorm", "GRPO (raw std, hard-side cap lifted)", grpo_selfnorm, _group_std_limit, None, True,
                  2, True, "none (GRPO's std times kappa >= 1 on hard prompts, grpo_shrunk's baseline)",
                  adaptive=SelfNormalized()),
)
_BY_BASE = {s.name: s for s in _BASE}


def _preset(name: str, base: str, ddof: int, eps: float, library: str,
            whitening: Whitening | None = None) -> EstimatorSpec:
    """A library setting of a base estimator, optionally followed by batch whitening.

    Whitening divides by the batch std of the base advantages; for a centred base (every group's
    advantages sum to 0, as for dr_grpo) they tend to s_i (R_ig - mu_i), so the batch variance
    tends to V = mean_i (s_i sigma_i)^2 and the limit is s_i / sqrt(max(V, var_floor) + eps_w)."""
    b = _BY_BASE[base]
    if whitening is None:
        return EstimatorSpec(name, f"{b.label} [{name}]", b.advantage, b.population_scale, b.exact_factor,
                             b.std_normalized, b.min_group, b.llm, library, base=base, ddof=ddof, eps=eps,
                             finite_scale=b.finite_scale)
    w = whitening

    def advantage(rewards, *, ddof, eps, sigma=None):
        return whiten(b.advantage(rewards, ddof=ddof, eps=eps, sigma=sigma), ddof=w.ddof,
                      var_floor=w.var_floor, eps=w.eps)

    def population_scale(sigma, mu, eps):
        s = b.population_scale(sigma, mu, eps)
        var = ((s * sigma) ** 2).mean(-1, keepdim=True)  # [..., 1]
        return s * torch.rsqrt(torch.clamp(var, min=w.var_floor) + w.eps)

    return EstimatorSpec(name, f"{b.label} + whitening [{name}]", advantage, population_scale, None,
                         b.std_normalized, b.min_group, b.llm, library, base=base, ddof=ddof, eps=eps,
                         whitening=whitening)


_PRESETS = (
    _preset("trl_group", "grpo", 1, 1e-4, "TRL 1.16 GRPOTrainer scale_rewards='group' (default)"),
    _preset("trl_batch", "grpo_batch", 1, 1e-4, "TRL 1.16 GRPOTrainer scale_rewards='batch'"),
    _preset("trl_none", "dr_grpo", 1, 0.0, "TRL 1.16 GRPOTrainer scale_rewards='none'"),
    _preset("verl_grpo", "grpo", 1, 1e-6, "verl 0.9 adv_estimator=grpo, norm_adv_by_std_in_grpo=True"),
    _preset("verl_rloo", "rloo", 1, 0.0, "verl 0.9 adv_estimator=rloo"),
    _preset("verl_rfpp_baseline", "dr_grpo", 1, 0.0, "verl 0.9 adv_estimator=reinforce_plus_plus_baseline",
            Whitening(ddof=1, eps=1e-8)),
    _preset("openrlhf_group_norm", "grpo", 1, 1e-9, "OpenRLHF 0.11 advantage_estimator=group_norm"),
    _preset("openrlhf_rloo", "rloo", 1, 0.0, "OpenRLHF 0.11 advantage_estimator=rloo"),
    _preset("openrlhf_reinforce_baseline", "dr_grpo", 1, 0.0, "OpenRLHF 0.11 advantage_estimator=reinforce_baseline",
            Whitening(ddof=0, var_floor=1e-8)),
)

#: Every estimator and preset, by name (DESIGN.md §4 table); the order is the display order.
REGISTRY: dict[str, EstimatorSpec] = {s.name: s for s in _BASE + _PRESETS}
ALL_NAMES: tuple[str, ...] = tuple(REGISTRY)
BASE_NAMES: tuple[str, ...] = tuple(s.name for s in _BASE)
PRESET_NAMES: tuple[str, ...] = tuple(s.name for s in _PRESETS)
LLM_NAMES: tuple[str, ...] = tuple(n for n, s in REGISTRY.items() if s.llm)
ADAPTIVE_NAMES: tuple[str, ...] = tuple(n for n, s in REGISTRY.items() if s.adaptive is not None)


def get(name: str) -> EstimatorSpec:
    """The registry entry of ``name``; ValueError naming the choices for an unknown one."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; choose from {', '.join(ALL_NAMES)}") from None


def advantages(name: str, rewards: torch.Tensor, *, ddof: int = 1, eps: float = 1e-4,
               sigma: torch.Tensor | None = None) -> torch.Tensor:
    """Advantages of estimator or preset ``name`` for rewards [..., P, G] (EstimatorSpec.advantages).

    For a preset, its own ddof/eps override the arguments (they are what the preset
    reproduces); ``sigma`` [..., P] is only read by ``grpo_oracle``.
    """
    return get(name).advantages(rewards, ddof=ddof, eps=eps, sigma=sigma)


def population_scale(name: str, sigma: torch.Tensor, mu: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-prompt weight s_i of grad J_i in exact mode (EstimatorSpec.population_scale):
      reinforce, dr_grpo, rloo: s_i = 1   (unbiased or (G-1)/G -> 1)
      grpo, grpo_oracle:        s_i = 1 / (sigma_i + eps)
      grpo_batch:               s_i = 1 / (sigma_B + eps),  sigma_B^2 = mean_i sigma_i^2 + var_i mu_i
      whitened presets:         s_i = 1 / sqrt(max(mean_i sigma_i^2, floor) + eps_w)
    sigma is the std of the mean reward rbar (DESIGN.md §3): with reward noise the sampled GRPO's
    group std converges to the std of the observed reward instead, so exact-mode grpo is the limit
    of grpo_oracle, not of grpo. Zero sigma gives s_i = 1/eps (0 when eps = 0), harmless since
    grad J_i = 0 there. sigma, mu: [..., P] -> [..., P].
    """
    return get(name).scale(sigma, mu, eps)


def is_std_normalized(name: str) -> bool:
    """True for GRPO-type estimators (divide by a reward std), including their presets."""
    return get(name).std_normalized


if len(REGISTRY) != len(_BASE) + len(_PRESETS):  # import-time guard: names are unique
    raise RuntimeError("duplicate estimator name in the registry")
