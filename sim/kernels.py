"""Compiled CPU engine (numba): the training loop of sim.engine for all runs of a batch, from one
logged step to the next, without Python in the inner loop (``advance``); and, at the logged steps
of a sampled batch, the measured per-step gain's draws (``gain_changes``, sim.step_gain).

Dimension legend
    R   runs (parallel over them: blocks of runs on threads, ``in_blocks``)   P   prompts   K   responses (y)   G   group size (g)
    k   private dims (a)                    s   shared dims (b)

Per run and step t it computes exactly what sim.engine.step does (DESIGN.md §3, §4):

    z_iy = b_iy + phi_private[i, y] . theta_i + phi_shared[i, y] . theta_sh,   pi_i = softmax(z_i)
    mu_i = E_pi rbar,  w_iy = pi_iy (rbar_iy - mu_i),  sigma_i = sqrt(sum_y w_iy (rbar_iy - mu_i))
    exact:    w_i <- s_i w_i                       (s_i: the estimator's population scale)
    sampled:  w_i <- (1/G) sum_g A_ig (e_(y_ig) - pi_i),  y_ig by inverse CDF from the same
              SplitMix64 counter draws as sim.rng (bit for bit), A from the estimator's formula
    theta_i += (lr/P) sum_y w_iy phi_private[i, y];  theta_sh += (lr/P) sum_i sum_y w_iy phi_shared[i, y]

and records J_t = mean_i mu_i, sigma_bar_t = mean_i sigma_i and the relaxed-condition ratio
min_i sigma_i(t) / sigma_i(t-1) (prompts with sigma_i(t-1) above the floor), as StepHistory does.
Every registry estimator and preset maps to kernel parameters (``estimator_params``): a base
code, its ddof and eps, and optional batch whitening. Sums run in another order than torch's,
so the two engines agree to rounding (tests: 1e-12), not bit for bit; runs are independent, so
results do not depend on the number of threads or on the batch.

Layout (the lane layout, sim.engine.lane_layout): per run, arrays over responses are held [K, P]
and arrays over a group [G, P], prompts innermost, and theta_private is transposed to [k, P] while
a run trains; so every per-prompt loop (the softmax's max and sums, mu, sigma, the advantages'
means and stds, the gradient) runs along the prompts as independent lanes and vectorizes, with no
horizontal reduction per prompt. Measured per prompt-step against rows per prompt ([P, K],
a8b8ff7): 1.25-1.35x faster at P = 16, 1.4-1.6x at P = 64, equal at P = 8, and 1.6-2.3x slower at
P <= 4, where the vector lanes are mostly empty (README, issue 12).

``run`` splits the runs over threads (the kernel releases the GIL). Kernels are compiled once per machine and cached (``cache=True``) under the user's cache
directory (NUMBA_CACHE_DIR, else $XDG_CACHE_HOME/grpo-sim/numba or ~/.cache/grpo-sim/numba).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from sim._fork_server import kernel_cache_dir as cache_dir  # (light: sim.entry reads it before numba)
from sim._fork_server import kernels_indexed

import numba

if not numba.config.CACHE_DIR:  # read when the kernels below are decorated
    numba.config.CACHE_DIR = str(cache_dir())

from llvmlite import ir  # noqa: E402
from numba import njit, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

# estimator codes of the kernels (estimator_params maps registry entries onto them)
REINFORCE, DR_GRPO, RLOO, GRPO, GRPO_BATCH, GRPO_ORACLE = range(6)
BASE_CODES = {"reinforce": REINFORCE, "dr_grpo": DR_GRPO, "rloo": RLOO, "grpo": GRPO, "grpo_batch": GRPO_BATCH,
              "grpo_oracle": GRPO_ORACLE}

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_LOW32 = np.uint64(0xFFFFFFFF)
_FLOAT_MAX = np.finfo(np.float64).max
#: Reassociation and fused multiply-add only: sums may be vectorized in another order (results
#: change in the last bits), while inf, NaN and signed zeros keep their IEEE meaning.
FASTMATH = {"reassoc", "contract", "nsz"}


def estimator_params(spec, ddof: int, eps: float) -> tuple[int, int, float, bool, int, float, float]:
    """(code, ddof, eps, whiten, whiten_ddof, whiten_var_floor, whiten_eps) of a registry entry:
    a preset's own ddof / eps override the run's (as EstimatorSpec.advantages does)."""
    w = spec.whitening
    return (BASE_CODES[spec.base], spec.ddof if spec.ddof is not None else ddof,
            float(spec.eps if spec.eps is not None else eps), w is not None,
            w.ddof if w else 0, float(w.var_floor) if w else 0.0, float(w.eps) if w else 0.0)


@njit(cache=True, inline="always")
def _mix64(x):
    """SplitMix64 output for state x (sim.rng.mix64)."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


@njit(cache=True, inline="always")
def _half_to_uniform(half):
    """A 32-bit half read as signed int32 x -> (x + 2^31 + 1/2) 2^-32 (sim.rng.uniforms_np)."""
    x = np.int64(half)
    if x >= 2147483648:
        x -= 4294967296
    return (np.float64(x) + 2147483648.5) * 2.3283064365386963e-10


@njit(cache=True, inline="always")
def _fill_uniforms(key, step, m, n, u):
    """u[:n] = the first n draws of ``step`` for stream ``key`` with m hashes per step (sim.rng)."""
    base = np.uint64(step) * np.uint64(m)
    for j in range((n + 1) // 2):
        h = _mix64(key + (base + np.uint64(j)) * _GOLDEN)
        u[2 * j] = _half_to_uniform(h & _LOW32)
        if 2 * j + 1 < n:
            u[2 * j + 1] = _half_to_uniform(h >> np.uint64(32))


@njit(cache=True, inline="always")
def _safe_reciprocal(x):
    """1/x for x > 0 (capped at the largest float), else 0 (theory.softmax.safe_reciprocal)."""
    if x > 0.0:
        return min(1.0 / x, _FLOAT_MAX)
    return 0.0


@intrinsic
def _bits_as_float64(typingctx, bits):
    """The float64 whose IEEE bits are the int64 ``bits`` (an LLVM bitcast, which vectorizes)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


_LN2_HI = 6.93147180369123816490e-01  # ln 2 in two parts (fdlibm): n * _LN2_HI is exact for |n| < 2^20
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e+00
_EXP_UNDERFLOW = -746.0  # exp(x) < 2^-1075 below: rounds to 0


@njit(cache=True, fastmath={"contract"})  # no reassociation: it would merge the two parts of ln 2
def _exp_nonpositive(x):
    """exp(x) for x <= 0 (softmax's exp(z - max z)) in plain arithmetic, so that a loop of them
    vectorizes (libm's exp is a scalar call: 4.5 ns against 0.7 ns here): Cody-Waite reduction
    x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor polynomial of degree 12 (truncation
    |r|^13 / 13! < 2e-16), times 2^n built from its bits in two factors (n down to -1076 stays
    exact through the subnormals). Within 2 ulp of libm (tested; 1.5 seen); exp(0) = 1, exp(-inf) = 0,
    NaN stays NaN."""
    xc = max(x, _EXP_UNDERFLOW)
    n = math.floor(xc * _INV_LN2 + 0.5)
    r = (xc - n * _LN2_HI) - n * _LN2_LO
    e = 1.0 + r * (1.0 + r * (1.0 / 2 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120 + r * (
        1.0 / 720 + r * (1.0 / 5040 + r * (1.0 / 40320 + r * (1.0 / 362880 + r * (
            1.0 / 3628800 + r * (1.0 / 39916800 + r * (1.0 / 479001600))))))))))))
    half = np.int64(n) // 2
    e = e * _bits_as_float64((half + 1023) << 52) * _bits_as_float64((np.int64(n) - half + 1023) << 52)
    return e if x == x else x


@njit(cache=True, inline="always")
def _transpose(src, dst):
    """dst [n, m] = src [m, n] transposed (one run's theta_private or pi into the lane layout and back)."""
    for i in range(src.shape[0]):
        for j in range(src.shape[1]):
            dst[j, i] = src[i, j]


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _logits(bias, phi, phiS, thT, th_s, z):
    """z [K, P] = b_iy + phi_private[i, y] . theta_i + phi_shared[i, y] . theta_sh for one run, in
    the kernels' lane layout (responses outer, prompts inner: every loop runs along the prompts):
    bias [K, P], phi [k, K, P] (phi_private), phiS [s, K P] (phi_shared), thT [k, P] (theta_private
    transposed), th_s [s]."""
    K, P = z.shape
    k = thT.shape[0]
    zf, bf = z.reshape(K * P), bias.reshape(K * P)
    for j in range(K * P):
        zf[j] = bf[j]
    for a in range(k):
        for y in range(K):
            for p in range(P):
                z[y, p] += phi[a, y, p] * thT[a, p]
    for b in range(th_s.shape[0]):
        th = th_s[b]
        for j in range(K * P):
            zf[j] += phiS[b, j] * th


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _grad_blocks(w, phi, phiS, gpT, gs):
    """The update directions of one run from the response weights w [K, P] (lane layout, as
    ``_logits``): gpT [k, P] = sum_y w_iy phi_private[i, y] (transposed) and gs [s] = sum_i sum_y
    w_iy phi_shared[i, y], the shared block as s dot products of length K P."""
    K, P = w.shape
    for a in range(gpT.shape[0]):
        for p in range(P):
            gpT[a, p] = 0.0
        for y in range(K):
            for p in range(P):
                gpT[a, p] += w[y, p] * phi[a, y, p]
    wf = w.reshape(K * P)
    for b in range(gs.shape[0]):
        g = 0.0
        for j in range(K * P):
            g += wf[j] * phiS[b, j]
        gs[b] = g


@njit(cache=True, fastmath=FASTMATH)
def _batch_mean_var(x, ddof):
    """(mean, variance with ``ddof``) of all entries of the 2-d x, two-pass; variance 0 when
    x.size - ddof <= 0 (torch's std / var over the flattened batch)."""
    n = x.size
    xf = x.reshape(n)
    total = 0.0
    for j in range(n):
        total += xf[j]
    mean = total / n
    if n - ddof <= 0:
        return mean, 0.0
    ss = 0.0
    for j in range(n):
        ss += (xf[j] - mean) ** 2
    return mean, ss / (n - ddof)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _advantages(rewards, adv, sigma, code, ddof, eps, whiten, w_ddof, w_floor, w_eps, mean, den):
    """adv [G, P] from rewards [G, P] (lane layout: groups outer, prompts inner; sim.estimators
    formulas; sigma [P] for grpo_oracle; scratch mean, den [P])."""
    G, P = rewards.shape
    if code == REINFORCE:
        for g in range(G):
            for p in range(P):
                adv[g, p] = rewards[g, p]
    else:
        for p in range(P):  # R - mean R as d - mean d, d = R - R_1: exactly 0 for a constant group
            mean[p] = 0.0
        for g in range(G):
            for p in range(P):
                adv[g, p] = rewards[g, p] - rewards[0, p]
                mean[p] += adv[g, p]
        for p in range(P):
            mean[p] /= G
        for g in range(G):
            for p in range(P):
                adv[g, p] -= mean[p]
        if code == RLOO:
            f = G / (G - 1)
            for g in range(G):
                for p in range(P):
                    adv[g, p] *= f
        elif code == GRPO or code == GRPO_ORACLE:
            if code == GRPO:
                for p in range(P):
                    den[p] = 0.0
                if G - ddof > 0:
                    for g in range(G):
                        for p in range(P):
                            den[p] += adv[g, p] * adv[g, p]
                    for p in range(P):
                        den[p] = math.sqrt(den[p] / (G - ddof))
                for p in range(P):
                    den[p] += eps
            else:
                for p in range(P):
                    den[p] = sigma[p] + eps
            if eps > 0:
                for g in range(G):
                    for p in range(P):
                        adv[g, p] /= den[p]
            else:
                for p in range(P):
                    den[p] = _safe_reciprocal(den[p])
                for g in range(G):
                    for p in range(P):
                        adv[g, p] *= den[p]
        elif code == GRPO_BATCH:
            d = math.sqrt(_batch_mean_var(rewards, ddof)[1]) + eps
            inv = 1.0 / d if eps > 0 else _safe_reciprocal(d)
            for g in range(G):
                for p in range(P):
                    adv[g, p] = adv[g, p] / d if eps > 0 else adv[g, p] * inv
    if whiten:
        m, var = _batch_mean_var(adv, w_ddof)
        f = 1.0 / math.sqrt(max(var, w_floor) + w_eps)
        for g in range(G):
            for p in range(P):
                adv[g, p] = (adv[g, p] - m) * f


@njit(cache=True, fastmath=FASTMATH, inline="always")  # a call per step costs ~15% (measured)
def _sample_rewards(key, step, binary_q, pi, q, scale_c, u, cdf, ys, rewards):
    """One step's draws (sim.engine.sample_rewards): the [2, P, G] counter draws of stream ``key``
    into u (only the first half for binary q), y_ig by inverse CDF from pi_i into ys, and
    R_ig = c_i q_i(y_ig) (binary q) or c_i 1[u'_ig < q_i(y_ig)] into rewards. pi, q [K, P] and
    ys, rewards [G, P] (lane layout; draw i = p G + g as in sim.rng); scale_c [P]; scratch cdf [K]
    (its first K - 1 entries used)."""
    G, P = ys.shape
    K = pi.shape[0]
    m = P * G  # hashes per step of the full [2, P, G] draw (sim.rng: ceil(2PG / 2))
    _fill_uniforms(key, step, m, m if binary_q else 2 * m, u)
    for p in range(P):
        c = 0.0
        for y in range(K - 1):
            c += pi[y, p]
            cdf[y] = c
        for g in range(G):
            i = p * G + g
            ui = u[i]
            # y = #{y' < K-1: cdf_y' <= u} (cdf nondecreasing; torch's searchsorted with cdf_K set to 2,
            # above every draw, so y <= K-1 even where rounding leaves the sum below 1): a count,
            # without a mispredicted branch per draw
            y = 0
            for j in range(K - 1):
                y += np.int64(cdf[j] <= ui)
            ys[g, p] = y
            hit = q[y, p] if binary_q else (1.0 if u[m + i] < q[y, p] else 0.0)
            rewards[g, p] = scale_c[p] * hit


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _response_weights(adv, ys, pi, w, total):
    """w [K, P] = (1/G) sum_g A_ig (e_(y_ig) - pi_i) from advantages adv and responses ys [G, P],
    pi [K, P] (lane layout; the sampled update's response weights, sim.engine.sampled_response_weights);
    scratch total [P]."""
    G, P = adv.shape
    K = pi.shape[0]
    for y in range(K):
        for p in range(P):
            w[y, p] = 0.0
    for p in range(P):
        total[p] = 0.0
    for g in range(G):
        for p in range(P):
            w[ys[g, p], p] += adv[g, p]
            total[p] += adv[g, p]
    for y in range(K):
        for p in range(P):
            w[y, p] = (w[y, p] - pi[y, p] * total[p]) / G


@njit(cache=True, fastmath=FASTMATH)
def _exact_scale(mu, sigma, scale, code, eps, whiten, w_floor, w_eps):
    """scale [P] = the estimator's population scale s_i (sim.estimators limits)."""
    P = mu.shape[0]
    if code == GRPO or code == GRPO_ORACLE:
        for p in range(P):
            scale[p] = _safe_reciprocal(sigma[p] + eps)
    elif code == GRPO_BATCH:
        m2, mm = 0.0, 0.0
        for p in range(P):
            m2 += sigma[p] * sigma[p]
            mm += mu[p]
        m2 /= P
        mm /= P
        var_mu = 0.0
        for p in range(P):
            var_mu += (mu[p] - mm) ** 2
        s = _safe_reciprocal(math.sqrt(m2 + var_mu / P) + eps)
        for p in range(P):
            scale[p] = s
    else:
        for p in range(P):
            scale[p] = 1.0
    if whiten:
        v = 0.0
        for p in range(P):
            v += (scale[p] * sigma[p]) ** 2
        f = 1.0 / math.sqrt(max(v / P, w_floor) + w_eps)
        for p in range(P):
            scale[p] *= f


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _softmax_mean(z, rbar, pi, mu, scratch):
    """pi = softmax(z) per prompt and mu_i = E_pi rbar from the logits z [K, P] of one run (lane
    layout: rbar, pi [K, P]; mu, scratch [P]), vectorized over the prompts."""
    K, P = z.shape
    for p in range(P):
        mu[p] = -np.inf  # max_y z_iy first
    for y in range(K):
        for p in range(P):
            mu[p] = max(mu[p], z[y, p])
    for p in range(P):
        scratch[p] = 0.0
    for y in range(K):
        for p in range(P):
            e = _exp_nonpositive(z[y, p] - mu[p])
            pi[y, p] = e
            scratch[p] += e
    for p in range(P):
        mu[p] = 0.0
        scratch[p] = 1.0 / scratch[p]
    for y in range(K):
        for p in range(P):
            pi[y, p] *= scratch[p]
            mu[p] += pi[y, p] * rbar[y, p]


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _policy_stats(z, rbar, pi, w, mu, sigma):
    """From the logits z [K, P] of one run: pi = softmax(z), mu_i = E_pi rbar, w_iy = pi_iy
    (rbar_iy - mu_i), sigma_i = sqrt(sum_y w_iy (rbar_iy - mu_i)); rbar, pi, w [K, P] (lane
    layout), mu, sigma [P]."""
    K, P = z.shape
    _softmax_mean(z, rbar, pi, mu, sigma)
    for p in range(P):
        sigma[p] = 0.0
    for y in range(K):
        for p in range(P):
            dev = rbar[y, p] - mu[p]
            w[y, p] = pi[y, p] * dev
            sigma[p] += w[y, p] * dev
    for p in range(P):
        sigma[p] = math.sqrt(max(sigma[p], 0.0))


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def advance(r0, r1, t0, t1, record_from, theta_p, theta_s, bias, rbar, q, scale_c, phi, phiS, lr_over_p, keys,
            exact, code, ddof, eps, whiten, w_ddof, w_floor, w_eps, G, binary_q, sigma_floor,
            J_hist, sigma_bar_hist, min_ratio):
    """Advance every run from step t0 to t1 (theta updated in place), recording the history of the
    steps t in [record_from, t1] (module docstring).

    theta_p [R, P, k], theta_s [R, s]; scale_c [R, P]; the problem in the lane layout
    (sim.engine.lane_layout: responses outer, prompts inner, so that every per-prompt loop runs
    along the prompts): bias, rbar, q [R, K, P], phi [R, k, K, P] (phi_private), phiS [R, s, K P]
    (phi_shared); lr_over_p [R]; keys [R] uint64; sigma_floor [R]; J_hist, sigma_bar_hist [R, T+1]
    and min_ratio [R] (updated). Runs r0 <= r < r1 only."""
    R, K, P = bias.shape
    k = phi.shape[1]
    s = theta_s.shape[1]
    for r in range(r0, r1):
        z = np.empty((K, P))
        pi = np.empty((K, P))
        w = np.empty((K, P))
        mu = np.empty(P)
        sigma = np.empty(P)
        prev = np.empty(P)
        scale = np.empty(P)
        gs = np.empty(s)
        gpT = np.empty((k, P))
        thT = np.empty((k, P))  # theta_private of this run, transposed while it trains
        scratch = np.empty(P)
        rewards = np.empty((G, P))
        adv = np.empty((G, P))
        ys = np.empty((G, P), dtype=np.int64)
        cdf = np.empty(K)
        u = np.empty(2 * P * G)
        lr = lr_over_p[r]
        th_s = theta_s[r]
        _transpose(theta_p[r], thT)
        for t in range(t0, t1 + 1):
            _logits(bias[r], phi[r], phiS[r], thT, th_s, z)  # policy statistics at theta_t
            _policy_stats(z, rbar[r], pi, w, mu, sigma)
            if t >= record_from:
                J_hist[r, t] = mu.sum() / P
                sigma_bar_hist[r, t] = sigma.sum() / P
                if t > t0:
                    for p in range(P):
                        if prev[p] > sigma_floor[r]:
                            min_ratio[r] = min(min_ratio[r], sigma[p] / prev[p])
            for p in range(P):
                prev[p] = sigma[p]
            if t == t1:
                break
            if exact:
                _exact_scale(mu, sigma, scale, code, eps, whiten, w_floor, w_eps)
                for y in range(K):
                    for p in range(P):
                        w[y, p] *= scale[p]
            else:
                _sample_rewards(keys[r], t, binary_q, pi, q[r], scale_c[r], u, cdf, ys, rewards)
                # scale (an exact-mode array) and scratch as the advantages' per-prompt scratch
                _advantages(rewards, adv, sigma, code, ddof, eps, whiten, w_ddof, w_floor, w_eps, scale, scratch)
                _response_weights(adv, ys, pi, w, scale)
            _grad_blocks(w, phi[r], phiS[r], gpT, gs)  # the update
            for a in range(k):
                for p in range(P):
                    thT[a, p] += lr * gpT[a, p]
            for b in range(s):
                th_s[b] += lr * gs[b]
        _transpose(thT, theta_p[r])


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def gain_changes(r0, r1, step, G, binary_q, draw_keys, pi, sigma, bias, rbar, q, scale_c, phi, phiS,
                 theta_p, theta_s, J0, g_p, g_s, params, flags, lr_over_p, h, out):
    """dJ per draw of sim.step_gain.sampled_changes for E stateless estimators (runs r0 <= r < r1).

    For draw n of run r (its own counter stream draw_keys[r, n], the step's [2, P, G] draws, only
    the first half for binary q): y_ig by inverse CDF from pi_i, R_ig = c_i q_i(y_ig) (binary q) or
    c_i 1[u' < q_i(y_ig)], then per estimator e
    A = its advantages, w_iy = (1/G) sum_g A_ig (e_(y_ig) - pi_i), the step
    Delta = lr_e/P (sum_y w_iy phi_private[i, y] ; sum_i sum_y w_iy phi_shared[i, y]) and

        out[e, r, n] = J(theta + Delta) - J0[r]  (- grad J . (Delta - E Delta) where flags[e, 1]),

    E Delta the same blocks with w_iy replaced by h[e, r, i] pi_iy (rbar_iy - mu_i), i.e.
    h_i grad J_i (grad J_i = (g_p, g_s) [R, P, k], [R, P, s]; grad J = (1/P) sum_i grad J_i).
    pi [R, P, K], sigma [R, P]; params [E, 6] = (code, ddof, eps, w_ddof, w_floor, w_eps), flags
    [E, 2] = (whiten, control variate); lr_over_p [E, R]; h [E, R, P]; draw_keys [R, N] uint64;
    out [E, R, N]; the problem (bias, rbar, q, phi, phiS) in the lane layout, as ``advance`` takes it."""
    R, K, P = bias.shape
    k = phi.shape[1]
    s = theta_s.shape[1]
    E = params.shape[0]
    N = draw_keys.shape[1]
    for r in range(r0, r1):
        u = np.empty(2 * P * G)
        cdf = np.empty(K)
        ys = np.empty((G, P), dtype=np.int64)
        rewards = np.empty((G, P))
        adv = np.empty((G, P))
        w = np.empty((K, P))
        piT = np.empty((K, P))  # pi of this run in the lane layout
        d_pT = np.empty((k, P))
        d_s = np.empty(s)
        th0T = np.empty((k, P))
        th_pT = np.empty((k, P))
        th_s = np.empty(s)
        z = np.empty((K, P))
        pi_new = np.empty((K, P))
        mu = np.empty(P)
        scratch = np.empty(P)
        _transpose(pi[r], piT)
        _transpose(theta_p[r], th0T)
        for n in range(N):
            _sample_rewards(draw_keys[r, n], step, binary_q, piT, q[r], scale_c[r], u, cdf, ys, rewards)
            for e in range(E):
                code, ddof, eps = int(params[e, 0]), int(params[e, 1]), params[e, 2]
                _advantages(rewards, adv, sigma[r], code, ddof, eps, flags[e, 0], int(params[e, 3]),
                            params[e, 4], params[e, 5], mu, scratch)  # mu, scratch: set below
                _response_weights(adv, ys, piT, w, mu)
                a = lr_over_p[e, r]
                _grad_blocks(w, phi[r], phiS[r], d_pT, d_s)
                for j in range(k):
                    for p in range(P):
                        d_pT[j, p] *= a
                        th_pT[j, p] = th0T[j, p] + d_pT[j, p]
                for b in range(s):
                    d_s[b] *= a
                    th_s[b] = theta_s[r, b] + d_s[b]
                _logits(bias[r], phi[r], phiS[r], th_pT, th_s, z)  # J at theta + Delta
                _softmax_mean(z, rbar[r], pi_new, mu, scratch)
                dJ = mu.sum() / P - J0[r]
                if flags[e, 1]:  # control variate grad J . (Delta - E Delta)
                    lin = 0.0
                    for b in range(s):
                        expected, gsum = 0.0, 0.0
                        for p in range(P):
                            expected += h[e, r, p] * g_s[r, p, b]
                            gsum += g_s[r, p, b]
                        lin += gsum * (d_s[b] - a * expected)
                    for p in range(P):
                        for j in range(k):
                            lin += g_p[r, p, j] * (d_pT[j, p] - a * h[e, r, p] * g_p[r, p, j])
                    dJ -= lin / P
                out[e, r, n] = dJ


_THREADS = [1]
_POOL: list = [None]


def set_threads(n: int) -> None:
    """Threads ``run`` splits a batch's runs over (each thread a contiguous block of runs; runs are
    independent, so the numbers do not depend on it)."""
    _THREADS[0] = max(1, int(n))


def get_threads() -> int:
    return _THREADS[0]


def run(*args) -> None:
    """``advance`` over all R runs (args as advance's, without r0, r1), on ``get_threads()`` threads."""
    in_blocks(advance, args[3].shape[0], *args)  # theta_p [R, P, k]


def in_blocks(kernel, R: int, *args) -> None:
    """kernel(r0, r1, *args) over runs 0 <= r < R, split into ``get_threads()`` contiguous blocks on
    as many threads (the kernels release the GIL, so blocks run in parallel)."""
    n = min(_THREADS[0], R)
    if n <= 1:
        kernel(0, R, *args)
        return
    from concurrent.futures import ThreadPoolExecutor

    if _POOL[0] is None or _POOL[0]._max_workers < n:
        if _POOL[0] is not None:
            _POOL[0].shutdown(wait=True)
        _POOL[0] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="grpo-sim-kernel")
    bounds = [R * i // n for i in range(n + 1)]
    futures = [_POOL[0].submit(kernel, bounds[i], bounds[i + 1], *args) for i in range(n)]
    for f in futures:
        f.result()


def warm_up() -> None:
    """Compile (or load from the cache) the kernels (advance in both modes, gain_changes) on a tiny
    batch; Ctrl-C meanwhile takes effect when the kernel being compiled is done (sim._interrupts:
    inside LLVM's callbacks it would be lost), and the rest is then left uncompiled."""
    from sim import _interrupts

    with _interrupts.held() as hold:
        _warm_up(lambda: bool(hold.got))


def _warm_up(interrupted=lambda: False) -> None:
    """advance in both modes, then gain_changes; on a first run gain_changes compiles meanwhile in a
    helper process into the same cache (``_compile_elsewhere``), which then loads in about 0.3 s:
    with 2 cores the first compile takes about the time of the larger kernel instead of both."""
    import time

    helper = _compile_elsewhere("_warm_gain") if not is_cached() else None
    try:
        _warm_advance()
        deadline = time.monotonic() + 120  # a helper that takes longer has failed: compile here
        while helper is not None and helper.poll() is None and not interrupted() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not interrupted():
            _warm_gain()
    finally:
        if helper is not None and helper.poll() is None:
            helper.kill()
            helper.wait()


def _compile_elsewhere(function: str):
    """A helper process running ``function`` of this module (a warm-up) against the same cache
    directory, or None where one cannot be started (the caller then compiles in-process). It is
    its own session (Ctrl-C is the caller's to act on: ``_warm_up`` stops it) and dies with its
    parent (sim._parent_death)."""
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parent.parent)  # where this ``sim`` package is imported from
    env = dict(os.environ, NUMBA_CACHE_DIR=str(numba.config.CACHE_DIR),
               PYTHONPATH=os.pathsep.join([root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    try:
        code = f"from sim._parent_death import die_with_parent; die_with_parent(); from sim import kernels; kernels.{function}()"
        return subprocess.Popen([sys.executable, "-c", code],
                                cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    except (OSError, ValueError, TypeError):  # no executable, or no process can be started here
        return None


#: The warm-up batch R, P, K, k, s, G (its types are what the kernels are compiled for).
_TINY = (1, 2, 2, 1, 1, 2)


def _warm_advance() -> None:
    R, P, K, k, s, G = _TINY
    f = np.zeros
    for exact in (True, False):
        advance(0, R, 0, 1, 0, f((R, P, k)), f((R, s)), f((R, K, P)), f((R, K, P)), f((R, K, P)), f((R, P)),
                f((R, k, K, P)), f((R, s, K * P)), f(R), np.zeros(R, dtype=np.uint64), exact, GRPO, 1, 1e-4, False,
                0, 0.0, 0.0, G, True, f(R), f((R, 2)), f((R, 2)), np.full(R, np.inf))


def _warm_gain() -> None:
    R, P, K, k, s, G = _TINY
    f = np.zeros
    N, E = 2, 1  # the sampled per-step gain's draws (sim.step_gain.sampled_changes_compiled)
    gain_changes(0, R, 0, G, True, np.zeros((R, N), dtype=np.uint64), f((R, P, K)), f((R, P)), f((R, K, P)), f((R, K, P)),
                 f((R, K, P)), f((R, P)), f((R, k, K, P)), f((R, s, K * P)),
                 f((R, P, k)), f((R, s)), f(R), f((R, P, k)), f((R, P, s)), f((E, 6)), np.zeros((E, 2), dtype=np.bool_),
                 f((E, R)), f((E, R, P)), f((E, R, N)))


def is_cached() -> bool:
    """True when compiled kernels for this module's source lie in the cache (no compile on first
    use): numba's own index of each kernel, which is empty when its stamp is not the source file's
    (after an edit or an upgrade); where that cannot be read (another numba), the index files'
    existence."""
    try:
        return all(bool(kernel._cache._cache_file._load_index()) for kernel in (advance, gain_changes))
    except Exception:  # noqa: BLE001 -- numba's private cache API changed: the files tell
        return kernels_indexed(Path(numba.config.CACHE_DIR))
