"""Advantage estimators: pure torch functions on a group-structured reward tensor.

These are the only advantage functions in the project: the simulator (sim.engine)
and the LLM runner (sim.llm) both call them.

Dimension legend
    ...  any leading batch dimensions (e.g. R runs)
    P    prompts in the batch
    G    group size: responses sampled per prompt

Every function takes rewards of shape [..., P, G] and returns advantages of the
same shape. Semantics follow the LLM-RL libraries (see ../shared/DESIGN.md §4):

    reinforce    A_ik = R_ik                                        (no baseline)
    dr_grpo      A_ik = R_ik - mean_k R_ik                          (Liu et al. 2025, "Dr. GRPO")
    rloo         A_ik = R_ik - (sum_j R_ij - R_ik) / (G - 1)        (Ahmadian et al. 2024)
    grpo         A_ik = (R_ik - mean_k R_ik) / (std_k R_ik + eps)   (Shao et al. 2024)
    grpo_batch   A_ik = (R_ik - mean_k R_ik) / (std_batch R + eps)  (TRL scale_rewards="batch")
    grpo_oracle  A_ik = (R_ik - mean_k R_ik) / (sigma_i + eps)      (true sigma_i; simulator only)

A constant group (all G rewards equal) gets advantage exactly 0 under every
baselined estimator (everything but ``reinforce``, which has no baseline). The mean is
taken relative to the group's first reward, R_ik - mean_k R_ik = d_ik - mean_k d_ik with
d_ik = R_ik - R_i1: d is exactly 0 for a constant group (x - y == 0 iff x == y in IEEE
arithmetic), so the centred rewards and the std are exactly 0 there, whereas ``mean`` of
equal floats can differ from them in the last bit and a tiny numerator over a zero std
would give an O(1) advantage.

``population_scale`` gives the G -> infinity limit used by exact-gradient mode.
``PRESETS`` name the exact settings of TRL 1.16, verl 0.9 and OpenRLHF 0.11.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

EstimatorName = Literal["reinforce", "dr_grpo", "rloo", "grpo", "grpo_batch", "grpo_oracle"]

#: Estimators that divide by a reward std ("GRPO-type"): their theory step size is 1/M,
#: the others' is 1/(M sigma_max) (DESIGN.md §3).
STD_NORMALIZED = frozenset({"grpo", "grpo_batch", "grpo_oracle"})


def _safe_ratio(num: torch.Tensor, den: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """num / den with 0 where den == 0 (no NaN from 0/0), for den = (a non-negative std) + eps.

    eps > 0 keeps den >= eps > 0, so this is a plain division. Otherwise it is num * (1/den): den
    broadcasts against num and is the small tensor (one value per prompt), so the reciprocal and
    the mask are taken on it; 1/den is capped at the largest finite float so that a den below
    1/max (subnormal) cannot turn a zero numerator into 0 * inf = NaN."""
    if eps > 0:
        return num / den
    inv = torch.where(den > 0, den.reciprocal().clamp_max(torch.finfo(den.dtype).max), torch.zeros_like(den))
    return num * inv


def group_std(rewards: torch.Tensor, ddof: int, centered: torch.Tensor | None = None) -> torch.Tensor:
    """Within-prompt std sqrt(sum_k (R_ik - mean)^2 / (G - ddof)), [..., P, G] -> [..., P, 1];
    0 where G - ddof <= 0. ``centered`` may pass R - mean if already computed."""
    g = rewards.shape[-1]
    if g - ddof <= 0:
        return torch.zeros_like(rewards[..., :1])
    if centered is None:
        centered = rewards - rewards.mean(-1, keepdim=True)
    return ((centered * centered).sum(-1, keepdim=True) / (g - ddof)).sqrt()


def _mean_centered(rewards: torch.Tensor) -> torch.Tensor:
    """R_ik - mean_k R_ik computed as d_ik - mean_k d_ik, d_ik = R_ik - R_i1: exactly 0 for
    constant groups (module docstring). [..., P, G]."""
    d = rewards - rewards[..., :1]
    return d - d.mean(-1, keepdim=True)


def reinforce(rewards: torch.Tensor, *, ddof: int = 1, eps: float = 0.0, sigma=None) -> torch.Tensor:
    """A_ik = R_ik (Williams 1992): no baseline. [..., P, G] -> [..., P, G]."""
    return rewards.clone()


def dr_grpo(rewards: torch.Tensor, *, ddof: int = 1, eps: float = 0.0, sigma=None) -> torch.Tensor:
    """A_ik = R_ik - mean_k R_ik (Dr. GRPO; TRL scale_rewards="none"). [..., P, G]."""
    return _mean_centered(rewards)


def rloo(rewards: torch.Tensor, *, ddof: int = 1, eps: float = 0.0, sigma=None) -> torch.Tensor:
    """A_ik = R_ik - (sum_j R_ij - R_ik) / (G - 1): leave-one-out baseline, unbiased.

    Algebraically A_ik = G/(G-1) (R_ik - mean_k R_ik). [..., P, G], needs G >= 2.
    """
    g = rewards.shape[-1]
    if g < 2:
        raise ValueError("rloo needs group size G >= 2")
    return _mean_centered(rewards) * (g / (g - 1))


def grpo(rewards: torch.Tensor, *, ddof: int = 1, eps: float = 1e-4, sigma=None) -> torch.Tensor:
    """A_ik = (R_ik - mean_k R_ik) / (std_k(R_ik; ddof) + eps) (Shao et al. 2024, eq. 3).

    [..., P, G]. Constant groups give 0; with eps = 0 a zero std gives 0, not NaN.
    """
    centered = _mean_centered(rewards)
    return _safe_ratio(centered, group_std(rewards, ddof, centered) + eps, eps)


def grpo_batch(rewards: torch.Tensor, *, ddof: int = 1, eps: float = 1e-4, sigma=None) -> torch.Tensor:
    """A_ik = (R_ik - mean_k R_ik) / (std over all P*G raw rewards (ddof) + eps).

    TRL's scale_rewards="batch": the std includes between-prompt spread. [..., P, G].
    """
    flat = rewards.flatten(-2)  # [..., P*G]
    if flat.shape[-1] - ddof <= 0:
        std = torch.zeros_like(flat[..., :1])
    else:
        std = flat.std(-1, correction=ddof, keepdim=True)  # [..., 1]
    return _safe_ratio(_mean_centered(rewards), std.unsqueeze(-1) + eps, eps)


def grpo_oracle(rewards: torch.Tensor, *, ddof: int = 1, eps: float = 1e-4, sigma=None) -> torch.Tensor:
    """A_ik = (R_ik - mean_k R_ik) / (sigma_i + eps), sigma_i the true std of the mean
    reward under the current policy (DESIGN.md §3), shape [..., P]. Simulator only."""
    if sigma is None:
        raise ValueError("grpo_oracle needs the true per-prompt sigma")
    return _safe_ratio(_mean_centered(rewards), sigma.unsqueeze(-1) + eps, eps)


ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "reinforce": reinforce,
    "dr_grpo": dr_grpo,
    "rloo": rloo,
    "grpo": grpo,
    "grpo_batch": grpo_batch,
    "grpo_oracle": grpo_oracle,
}


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
    var = flat.var(-1, correction=ddof, keepdim=True).unsqueeze(-1) if n - ddof > 0 \
        else torch.zeros_like(mean)
    out = (adv - mean) if shift_mean else adv
    return out * torch.rsqrt(torch.clamp(var, min=var_floor) + eps)


@dataclass(frozen=True)
class Preset:
    """A named library setting: base estimator, its ddof/eps, and optional batch whitening."""

    estimator: str
    ddof: int
    eps: float
    source: str
    whiten_ddof: int | None = None
    whiten_var_floor: float = 0.0
    whiten_eps: float = 0.0


#: Exact library settings (DESIGN.md §4 table). Whitening runs after the base estimator.
PRESETS: dict[str, Preset] = {
    "trl_group": Preset("grpo", 1, 1e-4, "TRL 1.16 GRPOTrainer scale_rewards='group' (default)"),
    "trl_batch": Preset("grpo_batch", 1, 1e-4, "TRL 1.16 GRPOTrainer scale_rewards='batch'"),
    "trl_none": Preset("dr_grpo", 1, 0.0, "TRL 1.16 GRPOTrainer scale_rewards='none'"),
    "verl_grpo": Preset("grpo", 1, 1e-6, "verl 0.9 adv_estimator=grpo, norm_adv_by_std_in_grpo=True"),
    "verl_rloo": Preset("rloo", 1, 0.0, "verl 0.9 adv_estimator=rloo"),
    "verl_rfpp_baseline": Preset("dr_grpo", 1, 0.0,
                                 "verl 0.9 adv_estimator=reinforce_plus_plus_baseline",
                                 whiten_ddof=1, whiten_eps=1e-8),
    "openrlhf_group_norm": Preset("grpo", 1, 1e-9, "OpenRLHF 0.11 advantage_estimator=group_norm"),
    "openrlhf_rloo": Preset("rloo", 1, 0.0, "OpenRLHF 0.11 advantage_estimator=rloo"),
    "openrlhf_reinforce_baseline": Preset("dr_grpo", 1, 0.0,
                                          "OpenRLHF 0.11 advantage_estimator=reinforce_baseline",
                                          whiten_ddof=0, whiten_var_floor=1e-8),
}

ALL_NAMES: tuple[str, ...] = tuple(ESTIMATORS) + tuple(PRESETS)


def advantages(name: str, rewards: torch.Tensor, *, ddof: int = 1, eps: float = 1e-4,
               sigma: torch.Tensor | None = None) -> torch.Tensor:
    """Advantages of estimator or preset ``name`` for rewards [..., P, G].

    For a preset, its own ddof/eps override the arguments (they are what the preset
    reproduces); ``sigma`` [..., P] is only read by ``grpo_oracle``.
    """
    if name in PRESETS:
        p = PRESETS[name]
        adv = ESTIMATORS[p.estimator](rewards, ddof=p.ddof, eps=p.eps)
        if p.whiten_ddof is not None:
            adv = whiten(adv, ddof=p.whiten_ddof, var_floor=p.whiten_var_floor, eps=p.whiten_eps)
        return adv
    try:
        fn = ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; choose from {', '.join(ALL_NAMES)}") from None
    return fn(rewards, ddof=ddof, eps=eps, sigma=sigma)


def base_estimator(name: str) -> str:
    """The base estimator of a name (a preset maps to the estimator it configures)."""
    return PRESETS[name].estimator if name in PRESETS else name


def is_std_normalized(name: str) -> bool:
    """True for GRPO-type estimators (divide by a reward std), including their presets."""
    return base_estimator(name) in STD_NORMALIZED


def needs_group(name: str) -> bool:
    """True when the estimator needs G >= 2 (any baseline or std)."""
    return base_estimator(name) != "reinforce"


def population_scale(name: str, sigma: torch.Tensor, mu: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-prompt weight of grad J_i in exact mode: the G -> infinity limit of the estimator with
    the population sigma_i of DESIGN.md §3.

    E[(1/G) sum_k A_ik grad log pi(y_ik)] -> w_i grad J_i with grad J_i = Cov_pi(rbar, phi):
      reinforce, dr_grpo, rloo: w_i = 1   (unbiased or (G-1)/G -> 1)
      grpo, grpo_oracle:        w_i = 1 / (sigma_i + eps)
      grpo_batch:               w_i = 1 / (sigma_B + eps),  sigma_B^2 = mean_i sigma_i^2 + var_i mu_i
    (the population variance of the reward mixture over the batch). sigma is the std of the
    mean reward rbar (DESIGN.md §3): with reward noise the sampled GRPO's group std converges to
    the std of the observed reward instead, so exact-mode grpo is the limit of grpo_oracle, not
    of grpo. Zero sigma gives w_i = 1/eps (0 when eps = 0), harmless since grad J_i = 0 there.
    sigma, mu: [..., P] -> [..., P].
    Presets are rejected: their batch whitening has no per-prompt limit of this form.
    """
    if name in PRESETS:
        raise ValueError(f"preset {name!r} has no exact-mode limit; use --mode sampled")
    if name in ("reinforce", "dr_grpo", "rloo"):
        return torch.ones_like(sigma)
    if name in ("grpo", "grpo_oracle"):
        return _safe_ratio(torch.ones_like(sigma), sigma + eps)
    if name == "grpo_batch":
        var_b = (sigma**2).mean(-1, keepdim=True) + mu.var(-1, correction=0, keepdim=True)  # [..., 1]
        return _safe_ratio(torch.ones_like(sigma), var_b.sqrt() + eps).expand_as(sigma)
    raise ValueError(f"unknown estimator {name!r}; choose from {', '.join(ALL_NAMES)}")
