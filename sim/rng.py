"""Counter-based random numbers: u = hash(seed, step, stream, index), vectorized in torch.

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
    z = (z ^ _shr(z, 30)) * MUL1
    z = (z ^ _shr(z, 27)) * MUL2
    return z ^ _shr(z, 31)


def uniforms(seeds: torch.Tensor, step: int, stream: int, shape: tuple[int, ...],
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """U[0, 1) draws of shape [R, *shape] for runs with int64 ``seeds`` [R] at (step, stream).

    u[r, idx] = (mix(mix(mix(seed_r) ^ (4 step + stream)) + idx * GOLDEN) >> 11) * 2^-53,
    idx the flat index into ``shape``; stream in {0, 1, 2, 3}.
    """
    key = mix64(mix64(seeds) ^ (4 * step + stream))  # [R]
    n = 1
    for d in shape:
        n *= d
    idx = torch.arange(n, dtype=torch.int64) * GOLDEN  # [n]
    h = mix64(key[:, None] + idx[None, :])  # [R, n]
    return (_shr(h, 11).to(dtype) * 2.0**-53).reshape(len(seeds), *shape)
