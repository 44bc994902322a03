"""Gradient orthogonality across prompts (DESIGN.md §3, 'Orthogonality, measured')."""

from __future__ import annotations

import torch

from theory.shapes import check_shapes


def gradient_orthogonality(gram: torch.Tensor, norm_floor: torch.Tensor | None = None,
                           live_only: bool = False) -> torch.Tensor:
    """rho = 1 - mean_{i != j} |cos(g_i, g_j)| from the Gram matrix of per-prompt gradients.

    gram [..., P, P] with gram_ij = <g_i, g_j>. A zero gradient (a converged prompt) has no
    direction; its cosines count as 0 (orthogonal), and so do a gradient's whose norm is at most
    ``norm_floor`` [..., P] (a sampled gradient that is 0 but for rounding, e.g. a group whose
    responses are all the same: its direction is noise). P = 1 gives rho = 1. ``live_only``: the
    mean over the pairs of non-zero gradients only (solved prompts and constant groups then do
    not pull rho towards 1), NaN where fewer than two are non-zero. Exactly orthogonal gradients (a
    diagonal Gram matrix) give rho = 1 exactly, in every dtype. -> [...].
    """
    P = check_shapes("gradient_orthogonality", gram=(gram, "... P P"), norm_floor=(norm_floor, "... P"))["P"]
    if P < 2:
        return torch.full(gram.shape[:-2], float("nan") if live_only else 1.0, dtype=gram.dtype)
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()  # [..., P]
    if norm_floor is not None:
        norms = torch.where(norms > norm_floor, norms, torch.zeros_like(norms))
    denom = norms[..., :, None] * norms[..., None, :]
    ok = denom > 0
    cos = torch.where(ok, gram / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(gram))
    # the off-diagonal entries summed as they are (not the total minus the diagonal, whose rounding
    # would leave rho a few ulps below 1 for exactly orthogonal gradients)
    off_diagonal = ~torch.eye(P, dtype=torch.bool, device=gram.device)
    off = torch.where(off_diagonal, cos.abs(), torch.zeros_like(cos)).sum((-2, -1))
    if live_only:
        live = (norms > 0).sum(-1).to(gram.dtype)  # [...]
        pairs = live * (live - 1)
        return torch.where(pairs > 0, 1.0 - off / torch.where(pairs > 0, pairs, torch.ones_like(pairs)),
                           torch.full_like(pairs, float("nan")))
    return 1.0 - off / (P * (P - 1))


def block_gram(g_private: torch.Tensor, g_shared: torch.Tensor) -> torch.Tensor:
    """Gram matrix gram_ij = <g_i, g_j> [..., P, P] of per-prompt gradients given in blocks
    (theory.per_prompt_gradients: g_private [..., P, k], g_shared [..., P, s]). Prompts' private
    blocks are disjoint, so they add to the diagonal only."""
    return g_shared @ g_shared.transpose(-1, -2) + torch.diag_embed((g_private * g_private).sum(-1))


def feature_overlap(phi_private: torch.Tensor, phi_shared: torch.Tensor, rank_tol: float = 1e-9) -> torch.Tensor:
    """Largest principal cosine between the gradient subspaces of every pair of prompts.

    grad J_i always lies in S_i = span{phi(x_i, y) - phi(x_i, y')} (it is a Cov with phi). Two
    prompts' subspaces meet only through the shared block, so with orthonormal bases Q_i of S_i
    (local coordinates [k + s]) the cosines of the principal angles are the singular values of
    Q_i,shared^T Q_j,shared. Returns C [..., P, P] with C_ij = the largest one (0 on the
    diagonal): all zeros means the problem decomposes per prompt (the orthogonal case).
    phi_private [..., P, K, k], phi_shared [..., P, K, s].
    """
    k = check_shapes("feature_overlap", phi_private=(phi_private, "... P K k"),
                     phi_shared=(phi_shared, "... P K s"))["k"]
    loc = torch.cat([phi_private, phi_shared], dim=-1)  # [..., P, K, D]
    diffs = loc[..., 1:, :] - loc[..., :1, :]  # [..., P, K-1, D] spans S_i
    _, svals, vh = torch.linalg.svd(diffs, full_matrices=False)  # vh [..., P, r, D]
    keep = svals > rank_tol * svals.amax(-1, keepdim=True).clamp_min(1e-300)  # [..., P, r]
    basis = vh * keep.unsqueeze(-1)  # rows: orthonormal basis of S_i (zeroed beyond its rank)
    shared = basis[..., k:]  # [..., P, r, s]
    cross = torch.einsum("...ias,...jbs->...ijab", shared, shared)  # [..., P, P, r, r]
    cos = torch.linalg.matrix_norm(cross, ord=2)  # [..., P, P]
    P = cos.shape[-1]
    return cos * (1 - torch.eye(P, dtype=cos.dtype))
