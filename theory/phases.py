"""Training phases from per-step diagnostics (DESIGN.md §3 'Phases').

Phase I  (early acceleration): high reward variance, high orthogonality, GRPO's per-step gain large;
Phase II (stable transition):  neither I nor III;
Phase III (late regime):       orthogonality lost or normalization no longer pays (gain below 1).

Rule (deterministic). With v_t = sigma_bar_t / max_t sigma_bar_t, each logged step gets a raw label
    I   if v_t >= sigma_hi and rho_t >= rho_hi and gain_t - z se_t >= gain_hi
    III if rho_t < rho_lo or gain_t + z se_t < gain_lo
    II  otherwise
(se_t the gain's standard error, 0 when not given; a NaN gain, undefined at that step, counts
neither for I nor for III). A logged step's label holds until the next logged step. Phases
never go back, and they persist in training steps, not in logged points: at a logged step t
the candidate is the smallest raw label over the steps [t, t + max(persist, persist_frac t))
(fewer at the end of the series), and the phase moves on to it when it is later than the
current one (the first step starts at its candidate). So a short blip does not switch, and
the labels do not depend on how densely the run was logged (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PHASE_NAMES = ("I", "II", "III")


@dataclass(frozen=True)
class PhaseThresholds:
    sigma_hi: float = 0.5   # v_t at or above: high variance
    rho_hi: float = 0.5     # rho_t at or above: high orthogonality
    gain_hi: float = 1.1    # per-step gain at or above: acceleration
    rho_lo: float = 0.25    # rho_t below: orthogonality lost
    gain_lo: float = 1.0    # per-step gain below: normalization no longer pays
    persist: int = 5        # steps a raw label must hold (at least) to move on
    persist_frac: float = 0.25  # ... or this fraction of the step it starts at, if longer
    z: float = 2.0          # standard errors a sampled gain must clear a threshold by


def raw_phases(sigma_bar, rho, gain, th: PhaseThresholds = PhaseThresholds(), gain_se=None) -> np.ndarray:
    """Per-step raw labels from arrays [T] (module docstring): 0 (I) if v >= sigma_hi and rho >= rho_hi
    and gain - z se >= gain_hi, 2 (III) if rho < rho_lo or gain + z se < gain_lo, else 1 (II).
    Series of several runs [R, T] give their labels [R, T] (v_t per run)."""
    s = np.asarray(sigma_bar, dtype=float)
    rho = np.asarray(rho, dtype=float)
    gain = np.asarray(gain, dtype=float)
    se = np.zeros_like(gain) if gain_se is None else np.nan_to_num(np.asarray(gain_se, dtype=float), nan=0.0)
    if not (s.ndim in (1, 2) and s.shape == rho.shape == gain.shape == se.shape):
        raise ValueError(f"raw_phases: sigma_bar, rho, gain (and gain_se) must be series [T] (or [R, T]) of one "
                         f"shape, got shapes {list(s.shape)}, {list(rho.shape)}, {list(gain.shape)}, {list(se.shape)}")
    peak = s.max(-1, keepdims=True) if s.shape[-1] else np.ones(s.shape[:-1] + (1,))
    v = s / np.where(peak > 0, peak, 1.0)
    with np.errstate(invalid="ignore"):
        high = (gain - th.z * se) >= th.gain_hi  # NaN compares False: no evidence either way
        low = (gain + th.z * se) < th.gain_lo
    raw = np.ones(s.shape, dtype=np.int64)
    raw[(v >= th.sigma_hi) & (rho >= th.rho_hi) & high] = 0
    raw[(rho < th.rho_lo) | low] = 2
    return raw


def label_phases(sigma_bar, rho, gain, th: PhaseThresholds = PhaseThresholds(), steps=None,
                 gain_se=None) -> np.ndarray:
    """Monotone phase labels 'I' / 'II' / 'III' for the logged steps [T] (``steps``, increasing;
    None: 0, 1, 2, ...) of the series [T] -> [T] (str); the series of R runs logged at the same
    steps, [R, T], give [R, T] in one call. Persistence counts training steps."""
    raw = raw_phases(sigma_bar, rho, gain, th, gain_se)  # [..., T]
    T = raw.shape[-1]
    t = np.arange(T, dtype=float) if steps is None else np.asarray(steps, dtype=float)
    if t.shape != (T,) or (np.diff(t) <= 0).any():
        raise ValueError("label_phases: steps must be increasing and match the series")
    width = np.maximum(max(th.persist, 1), th.persist_frac * t)
    ends = np.searchsorted(t, t + width, side="left")  # window j .. ends[j]-1: logged steps in [t_j, t_j + width)
    # candidate at j: the smallest raw label of its window; the phase moves on to a later candidate
    # and never back, so it is the running maximum of the candidates
    out = raw  # (no logged steps: nothing to label)
    if T:
        candidate = np.stack([raw[..., j:max(ends[j], j + 1)].min(-1) for j in range(T)], -1)
        out = np.maximum.accumulate(candidate, axis=-1)
    return np.array(PHASE_NAMES, dtype=object)[out]
