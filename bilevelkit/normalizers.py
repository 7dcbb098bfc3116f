"""Normalizers: maps σ from scores ω to weights on the probability simplex.

Every normalizer acts along ``dim`` (default 0), so a matrix Ω (N×M) is normalized column by
column: column j of σ(Ω) lies on the simplex Δ^N = {p ≥ 0, Σ_i p_i = 1}. All three are
invariant to adding a constant along ``dim``; none produces NaN for finite input of any
magnitude (the maximum is subtracted first).

- ``softmax``: dense, σ(w)_i > 0 for all i.
- ``sparsemax`` (Martins & Astudillo, 2016): Euclidean projection onto Δ; exact zeros.
- ``entmax15`` (Peters, Niculae & Martins, 2019): between the two, with exact zeros.

Sparsemax and entmax-1.5 are computed exactly by sorting, O(n log n) time and O(n) memory per
column; their backward passes act on the support only, O(n) time.
"""
from __future__ import annotations

import cmath
from typing import Callable

import torch
from torch import Tensor

Normalizer = Callable[..., Tensor]

__all__ = ["softmax", "sparsemax", "entmax15", "get", "NAMES"]


def all_finite(x: Tensor) -> bool:
    """No NaN or Inf in ``x``. The sum is finite exactly when every entry is, except when
    finite entries overflow it; only then (and for a true NaN/Inf) are the entries checked
    one by one. One reduction instead of a mask the size of ``x``: this runs on every call."""
    total = x.detach().sum().item()
    return cmath.isfinite(total) or bool(torch.isfinite(x).all())


def _check(w: Tensor, dim: int) -> int:
    """Validate a score tensor and return ``dim`` as a nonnegative index."""
    if not isinstance(w, Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise ValueError(f"scores must be a real floating tensor, got dtype {w.dtype}")
    if w.dim() == 0:
        raise ValueError("scores must have at least one dimension, got a 0-d tensor")
    if not -w.dim() <= dim < w.dim():
        raise ValueError(f"dim={dim} is out of range for a tensor of shape {tuple(w.shape)}")
    dim %= w.dim()
    if w.shape[dim] == 0:
        raise ValueError(f"cannot normalize along an empty dimension: shape {tuple(w.shape)}, dim={dim}")
    if not all_finite(w):
        raise ValueError("scores contain NaN or Inf")
    return dim


def _ranks(z: Tensor, dim: int) -> Tensor:
    """1, 2, ..., n laid out along ``dim`` so that it broadcasts against ``z``."""
    shape = [1] * z.dim()
    shape[dim] = z.shape[dim]
    return torch.arange(1, z.shape[dim] + 1, dtype=z.dtype, device=z.device).view(shape)


def softmax(w: Tensor, dim: int = 0, temperature: float = 1.0) -> Tensor:
    r"""Softmax with temperature T along ``dim``.

    σ(w)_i = exp(w_i / T) / Σ_j exp(w_j / T); Jacobian (diag(σ) − σσᵀ) / T.
    """
    dim = _check(w, dim)
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {float(temperature)}")
    if temperature != 1:  # shift first, or w / T overflows for large |w| and small T (the
        # shift is constant for softmax: detached, it adds no autograd nodes)
        w = (w - w.detach().amax(dim=dim, keepdim=True)) / temperature
    return torch.softmax(w, dim=dim)


class _Sparsemax(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(w: Tensor, dim: int) -> Tensor:
        z = w - w.amax(dim=dim, keepdim=True)
        zs = torch.sort(z, dim=dim, descending=True).values
        cs = zs.cumsum(dim)
        # Sorted entry k is in the support iff Σ_{i≤k} (z_(i) − z_(k)) < 1 (true for a prefix).
        size = (cs - _ranks(z, dim) * zs < 1).sum(dim=dim, keepdim=True)
        tau = (cs.gather(dim, size - 1) - 1) / size.to(z.dtype)
        return torch.clamp(z - tau, min=0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dim = inputs[1]
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (p,) = ctx.saved_tensors
        support = (p > 0).to(grad.dtype)
        g = grad * support
        mean = g.sum(ctx.dim, keepdim=True) / support.sum(ctx.dim, keepdim=True)
        return support * (grad - mean), None


def sparsemax(w: Tensor, dim: int = 0) -> Tensor:
    r"""Sparsemax: the Euclidean projection of ``w`` onto the simplex along ``dim``.

    p = argmin_{p ∈ Δ} ‖p − w‖² = [w − τ]₊ with τ such that Σ_i p_i = 1. Sorting
    w_(1) ≥ ... ≥ w_(n), the support is the largest prefix K with 1 + K w_(K) > Σ_{i≤K} w_(i),
    and τ = (Σ_{i≤K} w_(i) − 1) / K. Entries below τ are exactly zero.
    Jacobian on the support S: diag(s) − s sᵀ / |S| with s the indicator of S, so the
    backward pass is g ↦ s ⊙ (g − mean_S(g)).
    """
    return _Sparsemax.apply(w, _check(w, dim))


class _Entmax15(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(w: Tensor, dim: int) -> Tensor:
        x = (w - w.amax(dim=dim, keepdim=True)) / 2
        xs = torch.sort(x, dim=dim, descending=True).values
        # Sorted entry k is in the support iff Σ_{i≤k} (x_(i) − x_(k))² < 1 (true for a prefix).
        # Expanded into cumulative sums this cancels badly for long inputs (many near-ties),
        # so it is evaluated in float64 whatever the input's precision.
        xd = xs.double()
        s1, s2 = xd.cumsum(dim), (xd * xd).cumsum(dim)
        spread = s2 - 2 * xd * s1 + _ranks(xd, dim) * xd * xd
        size = (spread < 1).sum(dim=dim, keepdim=True)
        inside = x >= xs.gather(dim, size - 1)
        k = size.to(x.dtype)
        mean = torch.where(inside, x, 0).sum(dim, keepdim=True) / k
        ss = torch.where(inside, (x - mean) ** 2, 0).sum(dim, keepdim=True)
        tau = mean - torch.sqrt(torch.clamp((1 - ss) / k, min=0))
        return torch.clamp(x - tau, min=0) ** 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dim = inputs[1]
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (p,) = ctx.saved_tensors
        support = p > 0
        # √p with a zero derivative off the support (not ∞), so double backward stays finite.
        s = torch.where(support, torch.where(support, p, 1).sqrt(), 0)
        q = (grad * s).sum(ctx.dim, keepdim=True) / s.sum(ctx.dim, keepdim=True)
        return s * (grad - q), None


def entmax15(w: Tensor, dim: int = 0) -> Tensor:
    r"""Entmax-1.5 along ``dim``: sparse like sparsemax, smooth like softmax.

    p = argmax_{p ∈ Δ} ⟨p, w⟩ + Σ_i (p_i − p_i^{3/2}) / 0.75 (Tsallis entropy, α = 1.5), whose
    solution is p = [w/2 − τ]₊² with τ such that Σ_i p_i = 1. With x = w/2 sorted
    decreasingly, the support is the largest prefix K with Σ_{i≤K} (x_(i) − x_(K))² < 1, and
    τ = mean_K − √((1 − Σ_{i≤K} (x_(i) − mean_K)²) / K).
    Jacobian: diag(√p) − √p √pᵀ / Σ_i √p_i, zero off the support.
    """
    return _Entmax15.apply(w, _check(w, dim))


_BY_NAME: dict[str, Normalizer] = {"softmax": softmax, "sparsemax": sparsemax, "entmax15": entmax15}
NAMES = tuple(_BY_NAME)


def get(name: str | Normalizer) -> Normalizer:
    """The normalizer called ``name`` (one of ``NAMES``); a callable is returned unchanged."""
    if callable(name):
        return name
    if not isinstance(name, str) or name not in _BY_NAME:
        raise ValueError(f"unknown normalizer {name!r}; expected one of {', '.join(NAMES)} or a callable")
    return _BY_NAME[name]
