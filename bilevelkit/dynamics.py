"""The control system: an unrolled network as discrete-time dynamics.

    x_0 = F_0(f; θ_0),    x_t = F_t(x_{t-1}; θ_t)  for t = 1..T

A subclass says what ``F_0`` (:meth:`Dynamics.initial`) and ``F_t`` (:meth:`Dynamics.step`)
are; the costate solvers in :mod:`bilevelkit.costate` turn it into gradients.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn


class Dynamics(nn.Module):
    """Base class for a control system ``x_t = F_t(x_{t-1}; θ_t)`` of horizon ``T``.

    Subclasses set ``self.horizon`` (``T ≥ 1``) and implement :meth:`initial` and
    :meth:`step`. The controls ``θ`` are ordinary module parameters: one set per phase (an
    ``nn.ModuleList`` indexed by ``t``), shared by every phase, or both. States are tensors,
    real or complex, and keep one shape and dtype along the trajectory. ``ctx`` carries
    whatever the phases read but do not optimise (measurements ``f``, operators, ...).

    ``forward(t, x, ctx)`` is the phase map ``F_t`` itself (``F_0`` ignores ``x``); the
    solvers call it, so subclasses leave it alone.
    """

    horizon: int

    def initial(self, ctx: Any) -> Tensor:
        """``x_0 = F_0(f; θ_0)``: the initial state from the context."""
        raise NotImplementedError(f"{type(self).__name__} must implement initial(ctx)")

    def step(self, t: int, x: Tensor, ctx: Any) -> Tensor:
        """``x_t = F_t(x_{t-1}; θ_t)`` for ``t = 1..T``."""
        raise NotImplementedError(f"{type(self).__name__} must implement step(t, x, ctx)")

    def vjp(self, t: int, x: Tensor | None, lam: Tensor, ctx: Any
            ) -> tuple[Tensor | None, dict[str, Tensor]] | None:
        """Optional: the adjoint of phase ``t`` computed by the subclass.

        Return ``(λ_{t-1}, grads)`` with ``λ_{t-1} = (∂_x F_t)* λ_t`` (``None`` for ``t = 0``)
        and ``grads`` = ``{name: (∂_θ F_t)* λ_t}`` for the trainable parameters the phase uses
        (names as in ``named_parameters()``); ``x`` is the stored ``x_{t-1}``. The sweeps call
        it under ``torch.no_grad()`` (enable gradients inside to use autograd). Return ``None``
        (the default) to let the sweeps differentiate :meth:`step` with autograd. Override it
        for a hand-derived or compiled adjoint; :func:`bilevelkit.testing.check_dynamics`
        compares the sweeps, which use it, against autograd through :meth:`step`.
        """
        return None

    def terminal_vjp(self, x: Tensor, loss: Callable[[Tensor], Tensor], ctx: Any
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Tensor]] | None:
        """Optional: the last phase, the loss and that phase's adjoint in one call.

        Given the stored ``x = x_{T-1}`` and the solver's ``loss``, return ``(x_T, ℓ(x_T), λ_T,
        λ_{T-1}, grads)`` with ``λ_T = ∇ℓ(x_T)`` and ``λ_{T-1}``, ``grads`` as :meth:`vjp`
        returns them for ``t = T``; or ``None`` (the default) for :meth:`step`, the loss's
        gradient and :meth:`vjp` one after the other. The sweeps call it under
        ``torch.no_grad()``. Override it when fusing them saves work (one evaluation of phase
        ``T`` instead of two), as ``bk.hypergrad.InnerLoop(compile=True)`` does.
        """
        return None

    def forward(self, t: int, x: Tensor | None, ctx: Any) -> Tensor:
        return self.initial(ctx) if t == 0 else self.step(t, x, ctx)

    def rollout(self, ctx: Any) -> list[Tensor]:
        """The feasible trajectory ``[x_0, ..., x_T]`` (differentiable, with checks)."""
        T = check_horizon(self)
        states = [check_state(self.initial(ctx), None, 0)]
        for t in range(1, T + 1):
            states.append(check_state(self.step(t, states[-1], ctx), states[-1], t))
        return states


def check_horizon(dynamics: Dynamics) -> int:
    """Return ``dynamics.horizon`` after checking it is an integer ``T ≥ 1``."""
    T = getattr(dynamics, "horizon", None)
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(
            f"{type(dynamics).__name__}.horizon must be an integer >= 1 (the number of "
            f"phases T), got {T!r}"
        )
    return T


def check_state(x: Any, previous: Tensor | None, t: int) -> Tensor:
    """Check that phase ``t`` returned a tensor of the previous state's shape and dtype."""
    where = "initial(ctx)" if t == 0 else f"step(t={t}, ...)"
    if not isinstance(x, Tensor):
        raise ValueError(f"phase {t}: {where} must return a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point() or x.is_complex()):
        raise ValueError(f"phase {t}: {where} returned dtype {x.dtype}; states must be real "
                         "floating point or complex")
    if previous is not None and (x.shape != previous.shape or x.dtype != previous.dtype):
        raise ValueError(
            f"phase {t}: {where} changed the state from {tuple(previous.shape)} {previous.dtype} "
            f"to {tuple(x.shape)} {x.dtype}; every phase must keep the state's shape and dtype"
        )
    return x


def check_loss(value: Any, what: str = "loss(x_T)") -> Tensor:
    """Check that a loss (by default the terminal loss ``ℓ(x_T)``) is a real scalar tensor."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{what} must return a scalar torch.Tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(f"{what} must return a scalar, got shape {tuple(value.shape)}; "
                         "reduce it (e.g. .mean()) before returning")
    if value.is_complex() or not value.is_floating_point():
        raise ValueError(f"{what} must be a real floating-point scalar, got dtype {value.dtype}")
    return value.reshape(())
