"""Classical reconstructions to compare against: zero-filled, CG-SENSE and TV-SENSE.

k-space is (..., C, H, W), masks as in :mod:`applications.mri.operators`, sensitivities
(..., C, H, W). SENSE reconstructions return the complex image v (..., H, W); ``magnitude``
turns it into RSS(S v), which is what an RSS reference is comparable with.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from applications.mri.operators import CoilOperator, SenseOperator, apply_mask, rss

__all__ = ["zero_filled", "conjugate_gradient", "cg_sense", "tv_sense", "magnitude"]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Re⟨a, b⟩ over the image axes (-2, -1), one value per batch entry, shape (..., 1, 1)."""
    return (a.conj() * b).real.sum(dim=(-2, -1), keepdim=True)


def zero_filled(kspace: Tensor, mask: Tensor) -> Tensor:
    """RSS(F⁻¹(M y)): root-sum-of-squares of the coil-wise inverse FFT of the masked k-space."""
    return rss(CoilOperator(mask).adjoint(kspace))


def magnitude(image: Tensor, sens: Tensor) -> Tensor:
    """RSS(S v) = |v| (Σ_c |S_c|²)^{1/2}: equals |v| where the maps are normalised, 0 off the maps."""
    return rss(sens * image.unsqueeze(-3))


def conjugate_gradient(
    apply: Callable[[Tensor], Tensor], rhs: Tensor, iters: int
) -> tuple[Tensor, Tensor]:
    """Solve apply(x) = rhs for a Hermitian positive definite ``apply`` by CG from x = 0,
    independently for every batch entry (inner products over the last two axes).

    Returns x and the residual norms ‖rhs − apply(x_i)‖, shape (iters + 1, ...)."""
    tiny = torch.finfo(rhs.real.dtype).tiny
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = _dot(r, r)
    norms = [rr.sqrt()]
    for _ in range(iters):
        ap = apply(p)
        alpha = rr / _dot(p, ap).clamp_min(tiny)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = _dot(r, r)
        p = r + (rr_new / rr.clamp_min(tiny)) * p
        rr = rr_new
        norms.append(rr.sqrt())
    return x, torch.stack(norms)[..., 0, 0]


def cg_sense(kspace: Tensor, mask: Tensor, sens: Tensor, mu: float = 1e-2, iters: int = 30) -> Tensor:
    """CG-SENSE: v solving (AᴴA + μI) v = Aᴴ y after ``iters`` CG steps, A = M F S."""
    if not mu >= 0:
        raise ValueError(f"mu must be >= 0, got {mu}")
    op = SenseOperator(sens, mask)
    v, _ = conjugate_gradient(lambda x: op.normal(x) + mu * x, op.adjoint(kspace), iters)
    return v


def _grad(v: Tensor) -> Tensor:
    """Forward differences (Neumann boundary) along H and W, stacked on axis -3: (..., 2, H, W)."""
    dy = torch.zeros_like(v)
    dx = torch.zeros_like(v)
    dy[..., :-1, :] = v[..., 1:, :] - v[..., :-1, :]
    dx[..., :, :-1] = v[..., :, 1:] - v[..., :, :-1]
    return torch.stack((dy, dx), dim=-3)


def _grad_adjoint(q: Tensor) -> Tensor:
    """∇ᴴ q = −div q, the adjoint of :func:`_grad`."""
    qy, qx = q.unbind(dim=-3)
    out = torch.zeros_like(qy)
    out[..., :-1, :] -= qy[..., :-1, :]
    out[..., 1:, :] += qy[..., :-1, :]
    out[..., :, :-1] -= qx[..., :, :-1]
    out[..., :, 1:] += qx[..., :, :-1]
    return out


def tv_sense(
    kspace: Tensor, mask: Tensor, sens: Tensor, lam: float = 0.005, iters: int = 200
) -> Tensor:
    """TV-SENSE: min_v ½‖A v − y‖² + λ TV(v), TV(v) = Σ_x (|∂_y v|² + |∂_x v|²)^{1/2}
    (isotropic, complex), by Chambolle–Pock with K = (A, ∇); λ = lam · max|Aᴴ y| per batch
    entry, so ``lam`` does not depend on the intensity scale."""
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    op = SenseOperator(sens, mask)
    y = apply_mask(kspace, mask)
    adj = op.adjoint(y)
    scale = adj.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(adj.real.dtype).tiny)
    lam_abs = lam * scale.unsqueeze(-3)
    # ‖K‖² ≤ ‖AᴴA‖ + ‖∇‖², ‖∇‖² ≤ 8; ‖AᴴA‖ by power iteration.
    x = torch.ones_like(adj)
    for _ in range(20):
        x = op.normal(x)
        x = x / torch.linalg.vector_norm(x)
    norm_k = math.sqrt(1.01 * torch.linalg.vector_norm(op.normal(x)).item() + 8.0)
    # τσ‖K‖² = 0.98 < 1; τ/σ = 100 balances the image against the dual variables (measured:
    # after 100 iterations the energy gap is ~10× smaller than with τ = σ).
    tau, sigma = 0.99 / (0.1 * norm_k), 0.99 * 0.1 / norm_k
    v = adj.clone()
    v_bar = v.clone()
    p = torch.zeros_like(y)
    q = torch.zeros_like(_grad(v))
    for _ in range(iters):
        p = (p + sigma * (op.forward(v_bar) - y)) / (1 + sigma)
        q = q + sigma * _grad(v_bar)
        q = q / torch.clamp(torch.linalg.vector_norm(q, dim=-3, keepdim=True) / lam_abs, min=1.0)
        v_new = v - tau * (op.adjoint(p) + _grad_adjoint(q))
        v_bar = 2 * v_new - v
        v = v_new
    return v
