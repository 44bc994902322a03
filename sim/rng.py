"""Counter-based random numbers: u = hash(seed, step, index), vectorized in torch.

Each run's draws depend only on its own seed and the counter, never on which other runs
share its batch, so a run gives the same numbers alone, in any batch, on any worker.
The hash is SplitMix64's finalizer (Steele, Lea, Flood 2014), composed over the counter
fields; int64 arithmetic in torch wraps modulo 2^64, and logical right shifts are done
as arithmetic shifts followed by a mask.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


GOLDEN = _signed(0x9E3779B97F4A7C15)
MUL1 = _signed(0xBF58476D1CE4E5B9)
MUL2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 step: a bijection of 64-bit patterns with full avalanche. int64 -> int64."""
    z = x + GOLDEN
    z ^= _shr(z, 30)
    z *= MUL1
    z ^= _shr(z, 27)
    z *= MUL2
    z ^= _shr(z, 31)
    return z


def run_keys(seeds: torch.Tensor) -> torch.Tensor:
    """Per-run stream origin key_r = mix(seed_r): int64 [R] -> int64 [R]."""
    return mix64(seeds)


def uniforms(keys: torch.Tensor, step: int, shape: tuple[int, ...],
             dtype: torch.dtype = torch.float64, leading: int | None = None) -> torch.Tensor:
    """U(0, 1) draws of shape [R, *shape] at ``step`` for runs with stream keys [R] (``run_keys``).

    SplitMix64 streams: h[r, c] = mix(key_r + c * GOLDEN) with counter c = step * m + j,
    m = ceil(n / 2) hashes per step, n = prod(shape). Each 64-bit hash gives two draws, its two
    32-bit halves read as signed int32 x (a zero-copy view; low half first, as on every
    little-endian machine): u = (x + 2^31 + 1/2) * 2^-32, strictly inside (0, 1) on a grid of
    2^-32 (the bias this puts on a categorical draw is below 2^-32 per response). Every
    (run, step, index) has its own counter; runs with different seeds start at unrelated points
    of the 2^64 cycle.

    ``leading = j`` returns only the first j entries along ``shape[0]`` ([R, j, *shape[1:]]),
    bit-identical to slicing the full draw, at the cost of only the hashes they need.
    """
    n = 1
    for d in shape:
        n *= d
    m = (n + 1) // 2
    rows = shape[0] if leading is None else leading  # shape is non-empty
    n_out = n // shape[0] * rows
    offset = _signed(step * m * (GOLDEN & _MASK64))  # step * m * GOLDEN mod 2^64
    counters = torch.arange((n_out + 1) // 2, dtype=torch.int64) * GOLDEN + offset  # [m'] (m' <= m)
    halves = mix64(keys.unsqueeze(-1) + counters).view(torch.int32)[:, :n_out]  # [R, m'] -> [R, 2m'] -> [R, n']
    return ((halves.to(dtype) + (2.0**31 + 0.5)) * 2.0**-32).reshape(len(keys), rows, *shape[1:])
