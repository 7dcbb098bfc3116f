"""The Lagrangian of the control problem and its first-order (KKT) residuals.

    L(x, θ, λ) = ℓ(x_T) + Re⟨λ_0, F_0(f; θ_0) − x_0⟩ + Σ_{t=1..T} Re⟨λ_t, F_t(x_{t-1}; θ_t) − x_t⟩

with ``Re⟨a, b⟩ = Re(aᴴb)``, the real inner product, so complex states are handled with the
same gradient convention as torch's autograd.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .dynamics import Dynamics, check_horizon, check_loss


def inner(a: Tensor, b: Tensor) -> Tensor:
    """The real inner product ``Re⟨a, b⟩ = Re Σ conj(a)·b`` (plain dot product if real)."""
    return (a.conj() * b).real.sum() if a.is_complex() else (a * b).sum()


class Lagrangian:
    """``L(x, θ, λ)`` for a dynamics and a terminal loss ``ℓ(x_T)`` (paper eq. 4).

    ``value`` is differentiable in ``θ`` (and in states and multipliers), so
    ``∇_θ L`` can be taken by autograd at fixed ``(x, λ)``; on feasible states with the
    costates of the sweep it equals ``∇_θ ℓ`` (Theorem 1).
    """

    def __init__(self, dynamics: Dynamics, loss: Callable[[Tensor], Tensor]):
        self.dynamics, self.loss = dynamics, loss

    def _check(self, states: Sequence[Tensor], multipliers: Sequence[Tensor]) -> int:
        T = check_horizon(self.dynamics)
        for name, seq in (("states", states), ("multipliers", multipliers)):
            if seq is None:
                raise ValueError(f"Lagrangian: {name} is None; a solver returns states and "
                                 "multipliers only with keep=True (e.g. AdjointSweep(keep=True))")
            if len(seq) != T + 1:
                raise ValueError(f"Lagrangian: expected {T + 1} {name} (t = 0..{T}), "
                                 f"got {len(seq)}")
        for t, (x, lam) in enumerate(zip(states, multipliers)):
            if not (isinstance(x, Tensor) and isinstance(lam, Tensor)):
                raise ValueError(f"Lagrangian: state and multiplier {t} must be tensors, got "
                                 f"{type(x).__name__} and {type(lam).__name__}")
            if lam.shape != x.shape or lam.is_complex() != x.is_complex():
                raise ValueError(f"Lagrangian: multiplier λ_{t} has shape {tuple(lam.shape)} and "
                                 f"dtype {lam.dtype}, its state x_{t} {tuple(x.shape)} and {x.dtype}; "
                                 "they must match (a broadcast would give a wrong Lagrangian)")
        return T

    def value(self, ctx: Any, states: Sequence[Tensor], multipliers: Sequence[Tensor]) -> Tensor:
        """``L(x, θ, λ)``; equals ``ℓ(x_T)`` whenever the states are feasible."""
        T = self._check(states, multipliers)
        total = check_loss(self.loss(states[T]))
        for t in range(T + 1):
            x_prev = states[t - 1] if t else None
            total = total + inner(multipliers[t], self.dynamics(t, x_prev, ctx) - states[t])
        return total

    def kkt_residuals(self, ctx: Any, states: Sequence[Tensor],
                      multipliers: Sequence[Tensor]) -> dict[str, float]:
        """Norms of the first-order conditions, each ``‖∂L/∂·‖`` over all phases.

        ``state``: ``‖∂L/∂λ‖ = (Σ_t ‖F_t(x_{t-1}) − x_t‖²)^½`` (feasibility);
        ``costate``: ``(Σ_{t<T} ‖∂L/∂x_t‖²)^½ = (Σ_{t<T} ‖(∂_x F_{t+1})* λ_{t+1} − λ_t‖²)^½``;
        ``terminal``: ``‖∂L/∂x_T‖ = ‖∇ℓ(x_T) − λ_T‖``.
        """
        T = self._check(states, multipliers)
        xs = [x.detach().requires_grad_() for x in states]
        lams = [lam.detach() for lam in multipliers]
        with torch.enable_grad():
            value = self.value(ctx, xs, lams)
            d_x = torch.autograd.grad(value, xs, allow_unused=True)
        with torch.no_grad():
            feas = [self.dynamics(t, states[t - 1] if t else None, ctx) - states[t]
                    for t in range(T + 1)]

        def norm(ts):
            return float(torch.sqrt(sum(torch.linalg.vector_norm(v) ** 2 for v in ts)))

        d_x = [torch.zeros_like(x) if g is None else g for x, g in zip(xs, d_x)]
        return {"state": norm(feas), "costate": norm(d_x[:T]), "terminal": norm(d_x[T:])}
