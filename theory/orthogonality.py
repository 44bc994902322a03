"""Gradient orthogonality across prompts (DESIGN.md §3, 'Orthogonality, measured')."""

from __future__ import annotations

import torch


def gradient_orthogonality(gram: torch.Tensor) -> torch.Tensor:
    """rho = 1 - mean_{i != j} |cos(g_i, g_j)| from the Gram matrix of per-prompt gradients.

    gram [..., P, P] with gram_ij = <g_i, g_j>. A zero gradient (a converged prompt) has no
    direction; its cosines count as 0 (orthogonal). P = 1 gives rho = 1. -> [...].
    """
    P = gram.shape[-1]
    if P < 2:
        return torch.ones(gram.shape[:-2], dtype=gram.dtype)
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()  # [..., P]
    denom = norms[..., :, None] * norms[..., None, :]
    ok = denom > 0
    cos = torch.where(ok, gram / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(gram))
    off = cos.abs().sum((-2, -1)) - torch.diagonal(cos, dim1=-2, dim2=-1).abs().sum(-1)
    return 1.0 - off / (P * (P - 1))
