"""Exact curvature of the per-prompt objective and the M-bound (DESIGN.md §3).

Prompt i's objective J_i(theta) = E_pi[rbar] depends on theta only through the coordinates
its features touch, theta_i (private block, k dims) and theta_sh (shared block, s dims), so
every per-prompt quantity here lives in those D = k + s local coordinates:

    phi_loc(x_i, y) = [phi_private[i, y] ; phi_shared[i, y]]              [..., P, K, D]
    d_y = phi_loc(x_i, y) - phibar_i,  phibar_i = E_pi phi_loc            (centered features)

Shapes: pi, rbar [..., P, K]; mu, sigma [..., P]; d [..., P, K, D].

For a log-linear policy pi_t ∝ pi exp(t u.phi) the derivatives of t -> E_pi_t[rbar] are the
joint cumulants of (rbar, s, s, ...), s = u.phi: first Cov(rbar, s), second E[r~ s~ s~]
(the tilde marks centering), third E[r~ s~^3] - 3 E[r~ s~] E[s~^2]. Hence

    grad J_i = E_pi[(rbar - mu) d]                 Hess J_i = E_pi[(rbar - mu) d d^T]

and, by Cauchy-Schwarz on u^T Hess u = Cov(rbar, (u.d)^2):

    ||Hess J_i|| <= sigma_i M_i,  M_i = sup_|u|=1 SD_pi[(u.d)^2] <= sqrt(E_pi ||d||^4)
                                        <= max_y ||d_y||^2 <= diam_i^2 <= (2B)^2 = 4 B^2,
    ||grad J_i|| <= sigma_i sqrt(E_pi ||d||^2),

with diam_i = max_{y, y'} ||phi_loc(x_i, y) - phi_loc(x_i, y')|| (phibar is a convex combination
of the features, so ||d_y|| <= diam_i) and B = max ||phi||.

The constant the engine uses (``curvature_constant``) is tighter, proved for every theta:

    ||Hess J_i|| <= sigma_i diam_i^2 / 2  for any rewards,
    ||Hess J_i|| <= sigma_i diam_i^2 / 4  when rbar(x_i, .) takes at most two values (this family),

tight: K = 2, rbar in {0, 1}, pi_0 = q with q (1 - q) = 1/8 attains diam^2 / 4 (tabular: 1/2).
Proof. Fix a unit u, let v_y = u.phi_loc(y) (an interval of length R <= diam_i holds every v_y)
and x = v - E_pi v, so u^T Hess u = E_pi[(rbar - mu) x^2].
(a) Any rewards: |Cov(rbar, x^2)| <= sigma_i SD(x^2) and x^2 lies in [0, R^2], so SD(x^2) <= R^2/2
    (Popoviciu).
(b) rbar in {r_lo, r_hi}, A = {y: rbar = r_hi}, p = pi(A), Delta = r_hi - r_lo, sigma_i =
    Delta sqrt(p(1-p)). Then E[(rbar - mu) x^2] = Delta p (1-p) (E_A x^2 - E_B x^2) (B the rest,
    E_A the mean under pi given A), and with m_A, m_B the conditional means of v (the mean of v is
    p m_A + (1-p) m_B): E_A x^2 = Var_A v + (1-p)^2 (m_A - m_B)^2, E_B x^2 = Var_B v + p^2 (m_A - m_B)^2,
    so u^T Hess u / sigma_i = sqrt(p(1-p)) [Var_A v - Var_B v + (1 - 2p)(m_A - m_B)^2].
    Scale v into [0, 1] (a factor R^2), write a = m_A, b = m_B in [0, 1]. By Bhatia-Davis,
    Var_A v <= a(1 - a); drop -Var_B v <= 0; and (a - b)^2 <= max(a, 1 - a)^2. By the symmetry
    v -> 1 - v take a >= 1/2 (b = 0): the bracket is at most a(1-a) + (1-2p) a^2 = a - 2p a^2, whose
    maximum over a in [1/2, 1] is 1 - 2p (p <= 1/4), 1/(8p) (1/4 < p <= 1/2) or (1 - p)/2
    (p > 1/2). Times sqrt(p(1-p)): (1-2p) sqrt(p(1-p)) <= 1/4 (its maximum, at p(1-p) = 1/8);
    sqrt((1-p)/p)/8 <= sqrt(3)/8 < 1/4; sqrt(p(1-p)) (1-p)/2 < 1/4. The lower side (E_B x^2 larger)
    is the same with A and B exchanged (p -> 1 - p). So |u^T Hess u| <= sigma_i R^2 / 4. QED
(For rewards with more values diam^2 / 4 also held in 600,000 random draws, K <= 16, but is not
proved here, so such prompts get diam^2 / 2.)
"""

from __future__ import annotations

import torch

from theory.shapes import check_shapes


def local_features(phi_private: torch.Tensor, phi_shared: torch.Tensor) -> torch.Tensor:
    """phi_loc = [phi_private ; phi_shared] per response: [..., P, K, k + s]."""
    check_shapes("local_features", phi_private=(phi_private, "... P K k"), phi_shared=(phi_shared, "... P K s"))
    return torch.cat([phi_private, phi_shared], dim=-1)


def reduced_features(phi_loc: torch.Tensor) -> torch.Tensor:
    """Features in r = min(K, D) coordinates with the same Gram matrix: R_i^T from the reduced QR
    phi_loc_i^T = Q_i R_i (Q_i [D, r], orthonormal columns), so phi_loc_i = R_i^T Q_i^T. Every
    per-prompt quantity here depends on the features only through phi_loc_i phi_loc_i^T = R_i^T R_i
    (||d_y||, the M's, and the non-zero eigenvalues of Hess J_i = Q_i Hess' Q_i^T, Hess' computed
    from these features), so they agree in both coordinates; the reduced ones make the Hessian an
    r x r matrix. theta-independent: computed once per problem. [..., P, K, D] -> [..., P, K, r]."""
    return torch.linalg.qr(phi_loc.transpose(-1, -2), mode="reduced").R.transpose(-1, -2)


def centered_features(pi: torch.Tensor, phi_loc: torch.Tensor) -> torch.Tensor:
    """d_y = phi_loc(y) - E_pi phi_loc: [..., P, K, D]."""
    check_shapes("centered_features", pi=(pi, "... P K"), phi_loc=(phi_loc, "... P K D"))
    phibar = (pi.unsqueeze(-1) * phi_loc).sum(-2, keepdim=True)  # [..., P, 1, D]
    return phi_loc - phibar


def prompt_gradient(pi: torch.Tensor, rbar: torch.Tensor, mu: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """grad J_i = E_pi[(rbar - mu) d] in local coordinates: [..., P, D]."""
    check_shapes("prompt_gradient", pi=(pi, "... P K"), rbar=(rbar, "... P K"), mu=(mu, "... P"), d=(d, "... P K D"))
    w = pi * (rbar - mu.unsqueeze(-1))  # [..., P, K]
    return (w.unsqueeze(-1) * d).sum(-2)


def prompt_hessian(pi: torch.Tensor, rbar: torch.Tensor, mu: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Hess J_i = E_pi[(rbar - mu) d d^T] in local coordinates: [..., P, D, D]."""
    check_shapes("prompt_hessian", pi=(pi, "... P K"), rbar=(rbar, "... P K"), mu=(mu, "... P"), d=(d, "... P K D"))
    w = pi * (rbar - mu.unsqueeze(-1))  # [..., P, K]
    return d.transpose(-1, -2) @ (w.unsqueeze(-1) * d)  # sum_y w_y d_y d_y^T


def prompt_curvature(pi: torch.Tensor, rbar: torch.Tensor, mu: torch.Tensor,
                     phi_loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, Hess J_i): the centered features d_y = phi_loc(y) - E_pi phi_loc [..., P, K, D] and
    Hess J_i = E_pi[(rbar - mu) d d^T] [..., P, D, D] at one theta, the chain every per-prompt
    curvature diagnostic starts from (phi_loc: local or reduced features)."""
    d = centered_features(pi, phi_loc)
    return d, prompt_hessian(pi, rbar, mu, d)


def spectral_norm(H: torch.Tensor) -> torch.Tensor:
    """||H||_2 = max |eigenvalue| of symmetric H [..., D, D] -> [...]."""
    return torch.linalg.eigvalsh(H).abs().amax(-1)


def hessian_over_sigma(H: torch.Tensor, sigma: torch.Tensor, floor: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Empirical ||Hess J_i|| / sigma_i (the ratio the M-bound caps), 0 where sigma_i <= floor
    (there the ratio is undefined: Hess J_i -> 0 with sigma_i). H [..., P, D, D], sigma [..., P]."""
    check_shapes("hessian_over_sigma", H=(H, "... P D D"), sigma=(sigma, "... P"))
    live = sigma > floor
    return torch.where(live, spectral_norm(H) / torch.where(live, sigma, torch.ones_like(sigma)),
                       torch.zeros_like(sigma))


def m_fourth_moment(pi: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Analytic M_i(theta) = sqrt(E_pi ||d||^4) >= sup_|u|=1 SD[(u.d)^2] (module docstring): [..., P]."""
    check_shapes("m_fourth_moment", pi=(pi, "... P K"), d=(d, "... P K D"))
    sq = (d * d).sum(-1)  # [..., P, K]
    return (pi * sq * sq).sum(-1).sqrt()


def _directional_sd(pp: torch.Tensor, dt: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """SD_pi[(u.d)^2] for S unit directions u [..., P, S, D], with pp = pi [..., P, 1, K] and
    dt = d^T [..., P, D, K] -> [..., P, S]. The products are one matmul: no [..., P, S, K, D] array."""
    a = (u @ dt) ** 2  # [..., P, S, K]
    m = (pp * a).sum(-1, keepdim=True)
    return (pp * (a - m) ** 2).sum(-1).clamp_min(0).sqrt()


def m_directional(pi: torch.Tensor, d: torch.Tensor, H: torch.Tensor | None = None,
                  iters: int = 50) -> torch.Tensor:
    """Analytic M_i(theta) = sup_|u|=1 SD_pi[(u.d)^2], estimated by projected gradient ascent.

    Starts: every eigenvector of E_pi[d d^T] and, when ``H`` is given, every eigenvector of H.
    The result is a lower estimate of the sup, but it is always >= ||H|| / sigma_i, because the
    top eigenvector u* of H is a start and |u*^T H u*| = |Cov(rbar, (u*.d)^2)| <= sigma_i
    SD[(u*.d)^2]; it is <= m_fourth_moment since SD[(u.d)^2] <= sqrt(E (u.d)^4). [..., P].
    """
    check_shapes("m_directional", pi=(pi, "... P K"), d=(d, "... P K D"), H=(H, "... P D D"))
    cov = d.transpose(-1, -2) @ (pi.unsqueeze(-1) * d)  # [..., P, D, D]
    starts = [torch.linalg.eigh(cov).eigenvectors]
    if H is not None:
        starts.append(torch.linalg.eigh(H).eigenvectors)
    U = torch.cat(starts, dim=-1).transpose(-1, -2)  # [..., P, S, D]: S unit start directions
    pp = pi.unsqueeze(-2)  # [..., P, 1, K]
    dt = d.transpose(-1, -2)  # [..., P, D, K]; products by matmul: no [..., P, S, K, D] array (P K^3)
    best = _directional_sd(pp, dt, U).amax(-1)  # [..., P]
    u = U
    for _ in range(iters):
        s = u @ dt  # [..., P, S, K]  u.d
        a = s * s
        m = (pp * a).sum(-1, keepdim=True)
        # grad_u Var[(u.d)^2] = E[2 (a - m) * 2 s d]   (the mean term's gradient cancels)
        grad = (pp * 4 * (a - m) * s) @ d  # [..., P, S, D]
        u = u + 0.5 * grad / (grad.norm(dim=-1, keepdim=True).clamp_min(1e-300) + 1.0)
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        best = torch.maximum(best, _directional_sd(pp, dt, u).amax(-1))
    return best


def m_diameter(phi_loc: torch.Tensor) -> torch.Tensor:
    """Global (all-theta) bound M_i <= diam_i^2 = max_{y,y'} ||phi_loc(y) - phi_loc(y')||^2: [..., P]."""
    # ||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b from the Gram matrix [..., P, K, K]: no
    # [..., P, K, K, D] array (P K^3 numbers for tabular features) and BLAS speed; the rounding of
    # the expansion is ~1e-16 of ||phi||^2 (exact for one-hot features)
    gram = phi_loc @ phi_loc.transpose(-1, -2)
    sq = torch.diagonal(gram, dim1=-2, dim2=-1)  # [..., P, K]
    dist2 = (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * gram).clamp_min(0)
    return dist2.amax((-2, -1))


def two_valued(rbar: torch.Tensor, tol: float = 1e-12) -> torch.Tensor:
    """True where prompt i's mean reward takes at most two values over its responses (up to
    ``tol`` times its range): rbar [..., P, K] -> [..., P] bool."""
    check_shapes("two_valued", rbar=(rbar, "... P K"))
    lo, hi = rbar.amin(-1, keepdim=True), rbar.amax(-1, keepdim=True)
    slack = tol * (hi - lo).clamp_min(1e-300)
    return (((rbar - lo).abs() <= slack) | ((hi - rbar).abs() <= slack)).all(-1)


def curvature_constant(phi_loc: torch.Tensor, rbar: torch.Tensor) -> torch.Tensor:
    """M_i with ||Hess J_i|| <= M_i sigma_i at every theta (module docstring, proved there):
    diam_i^2 / 4 where rbar(x_i, .) takes two values, diam_i^2 / 2 otherwise.
    Tabular (orthonormal) features: diam^2 = 2, M = 1/2. [..., P, K, D], [..., P, K] -> [..., P]."""
    diam2 = m_diameter(phi_loc)
    return torch.where(two_valued(rbar), diam2 / 4, diam2 / 2)


def gradient_bound(pi: torch.Tensor, d: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """||grad J_i|| <= sigma_i sqrt(E_pi ||d||^2) (Cauchy-Schwarz): the bound, [..., P]."""
    check_shapes("gradient_bound", pi=(pi, "... P K"), d=(d, "... P K D"), sigma=(sigma, "... P"))
    return sigma * (pi * (d * d).sum(-1)).sum(-1).sqrt()
