"""Counter-based random numbers: u = hash(seed, step, index), vectorized over runs.

Each run's draws depend only on its own seed and the counter, never on which other runs
share its batch, so a run gives the same numbers alone, in any batch, on any worker.
The hash is SplitMix64's finalizer (Steele, Lea, Flood 2014, "Fast splittable pseudorandom
number generators"), composed over the counter fields. It runs on numpy uint64, whose
arithmetic wraps modulo 2^64 and whose right shift is logical, at about a microsecond per
operation on the small arrays of one step (torch has no unsigned 64-bit shifts, and each of
its operations costs several microseconds here); the draws are handed to torch without a copy.
"""

from __future__ import annotations

import numpy as np
import torch

GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio, SplitMix64's increment
MUL1 = np.uint64(0xBF58476D1CE4E5B9)
MUL2 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 output for state x: z = x + GOLDEN, then z ^= z >> 30; z *= MUL1;
    z ^= z >> 27; z *= MUL2; z ^= z >> 31. A bijection of 64-bit patterns with full
    avalanche. uint64 array -> new uint64 array."""
    with np.errstate(over="ignore"):
        z = x + GOLDEN
        z ^= z >> np.uint64(30)
        z *= MUL1
        z ^= z >> np.uint64(27)
        z *= MUL2
        z ^= z >> np.uint64(31)
    return z


def run_keys(seeds) -> np.ndarray:
    """Per-run stream origin key_r = mix(seed_r): seeds (ints >= 0, a sequence, array or
    torch tensor) [R] -> uint64 [R]."""
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.numpy()
    return mix64(np.asarray(seeds).astype(np.uint64))


def uniforms_np(keys: np.ndarray, step: int, shape: tuple[int, ...], leading: int | None = None) -> np.ndarray:
    """U(0, 1) draws of shape [R, *shape] at ``step`` for runs with stream keys [R] (``run_keys``),
    float64 numpy.

    SplitMix64 streams: h[r, c] = mix(key_r + c * GOLDEN) with counter c = step * m + j,
    m = ceil(n / 2) hashes per step, n = prod(shape). Each 64-bit hash gives two draws, its two
    32-bit halves read as signed int32 x (a zero-copy view; low half first, as on every
    little-endian machine): u = (x + 2^31 + 1/2) * 2^-32, exact in float64, strictly inside
    (0, 1) on a grid of 2^-32 (the bias this puts on a categorical draw is below 2^-32 per
    response). Every (run, step, index) has its own counter; runs with different seeds start at
    unrelated points of the 2^64 cycle.

    ``leading = j`` returns only the first j entries along ``shape[0]`` ([R, j, *shape[1:]]),
    bit-identical to slicing the full draw, at the cost of only the hashes they need.
    """
    n = 1
    for d in shape:
        n *= d
    m = (n + 1) // 2
    rows = shape[0] if leading is None else leading  # shape is non-empty
    n_out = n // shape[0] * rows
    with np.errstate(over="ignore"):
        counters = (np.arange((n_out + 1) // 2, dtype=np.uint64) + np.uint64(step) * np.uint64(m)) * GOLDEN
        hashes = mix64(np.asarray(keys, dtype=np.uint64)[:, None] + counters)  # [R, m'] (m' <= m)
    halves = hashes.view(np.int32)[:, :n_out]  # [R, m'] -> [R, 2m'] int32 -> [R, n']
    u = halves.astype(np.float64)
    u += 2.0**31 + 0.5
    u *= 2.0**-32
    return u.reshape(len(hashes), rows, *shape[1:])


def at_step(keys: np.ndarray, steps, shape: tuple[int, ...]) -> np.ndarray:
    """Stream keys whose step-0 draws of ``shape`` are the step-``steps`` draws of ``keys``:
    key + steps m GOLDEN (mod 2^64, m = ceil(n / 2) hashes per step), since the counter of
    draw j is (step m + j) GOLDEN (``uniforms_np``). Lets one call draw rows at different steps.
    keys [R] uint64, steps int or [R] ints -> uint64 [R]."""
    m = np.uint64((int(np.prod(shape)) + 1) // 2)
    with np.errstate(over="ignore"):
        return np.asarray(keys, dtype=np.uint64) + np.asarray(steps, dtype=np.uint64) * m * GOLDEN


def uniforms(keys: np.ndarray, step: int, shape: tuple[int, ...],
             dtype: torch.dtype = torch.float64, leading: int | None = None) -> torch.Tensor:
    """``uniforms_np`` as a torch tensor of ``dtype`` (no copy for float64): [R, *shape]. Other
    dtypes round the float64 draws (in float32 a draw may round to 1.0)."""
    return torch.from_numpy(uniforms_np(keys, step, shape, leading)).to(dtype)
