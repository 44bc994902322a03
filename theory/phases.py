"""Training phases from per-step diagnostics (DESIGN.md §3 'Phases').

Phase I  (early acceleration): high reward variance, high orthogonality, GRPO's per-step gain large;
Phase II (stable transition):  neither I nor III;
Phase III (late regime):       orthogonality lost or normalization no longer pays (gain below 1).

Rule (deterministic). With v_t = sigma_bar_t / max_t sigma_bar_t, each step gets a raw label
    I   if v_t >= sigma_hi and rho_t >= rho_hi and gain_t >= gain_hi
    III if rho_t < rho_lo or gain_t < gain_lo
    II  otherwise.
Phases never go back: at each step t the smallest raw label among steps t .. t+persist-1
(fewer at the end of the series) is the candidate, and the phase moves on to it when it is
later than the current one (step 0 starts at its candidate); single-step blips do not switch.
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
    persist: int = 3        # consecutive raw labels needed to move on


def raw_phases(sigma_bar, rho, gain, th: PhaseThresholds = PhaseThresholds()) -> np.ndarray:
    """Per-step raw labels 0 (I), 1 (II), 2 (III) from arrays [T]: I if v >= sigma_hi and rho >= rho_hi
    and gain >= gain_hi, III if rho < rho_lo or gain < gain_lo, else II (module docstring)."""
    s = np.asarray(sigma_bar, dtype=float)
    rho = np.asarray(rho, dtype=float)
    gain = np.asarray(gain, dtype=float)
    if not (s.ndim == 1 and s.shape == rho.shape == gain.shape):
        raise ValueError(f"raw_phases: sigma_bar, rho and gain must be series [T] of one length, got shapes "
                         f"{list(s.shape)}, {list(rho.shape)}, {list(gain.shape)}")
    peak = s.max() if s.size and s.max() > 0 else 1.0
    v = s / peak
    raw = np.ones(s.shape, dtype=np.int64)
    raw[(v >= th.sigma_hi) & (rho >= th.rho_hi) & (gain >= th.gain_hi)] = 0
    raw[(rho < th.rho_lo) | (gain < th.gain_lo)] = 2
    return raw


def label_phases(sigma_bar, rho, gain, th: PhaseThresholds = PhaseThresholds()) -> np.ndarray:
    """Monotone phase labels 'I' / 'II' / 'III' for each step of the series [T] -> [T] (str)."""
    raw = raw_phases(sigma_bar, rho, gain, th)
    T = len(raw)
    out = np.empty(T, dtype=np.int64)
    current = -1
    for t in range(T):
        window = raw[t:t + max(th.persist, 1)]
        target = int(window.min())
        if target > current:
            current = target
        out[t] = current
    return np.array(PHASE_NAMES, dtype=object)[out]
