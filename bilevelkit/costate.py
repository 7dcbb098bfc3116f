"""Costate solvers: strategies that turn a ``Dynamics`` and a terminal loss into gradients.

With the Lagrangian ``L = ℓ(x_T) + Σ_t Re⟨λ_t, F_t(x_{t-1}; θ_t) − x_t⟩`` the first-order
conditions give the backward (costate) recursion

    λ_T = ∇ℓ(x_T),   λ_{t-1} = (∂_x F_t)* λ_t,   ∇_{θ_t} L = (∂_θ F_t)* λ_t,

and Theorem 1 says ``∇_θ L = ∇_θ ℓ``. Every solver returns the same numbers; they differ in
what they keep in memory and what they recompute. Pick one by cost:

==================  ============================  ===========================================
solver              memory                         time (F = one phase forward)
==================  ============================  ===========================================
AutogradCostate     all T phases' activations      T·F forward + backward
AdjointSweep        T+1 states + one phase's       2·T·F forward + backward (each phase is
                    activations                    evaluated again inside its VJP)
CheckpointedSweep   k states + one phase's         ≤ (r+1)·T·F forward + backward, r the least
                    activations                    integer with C(k+r, r) ≥ T
==================  ============================  ===========================================

Every solver has ``solve(dynamics, ctx, loss) -> CostateResult`` and
``backward(dynamics, ctx, loss)``, which accumulates into ``p.grad`` like
``loss.backward()`` so any ``torch.optim`` optimizer works unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import Any, Callable

import torch
from torch import Tensor

from .dynamics import Dynamics, check_horizon, check_loss, check_state

Loss = Callable[[Tensor], Tensor]

__all__ = ["CostateResult", "AutogradCostate", "AdjointSweep", "CheckpointedSweep"]


@dataclass
class CostateResult:
    """What a solver returns.

    ``loss``: ``ℓ(x_T)`` (detached). ``grads``: ``∇_θ ℓ`` keyed by ``named_parameters()``
    names (trainable parameters only). ``output``: the final state ``x_T`` (detached).
    ``states``: ``[x_0..x_T]`` (detached); ``AutogradCostate`` and ``AdjointSweep`` store them
    anyway and return them whatever ``keep`` is, ``CheckpointedSweep`` only with ``keep=True``
    (else ``None``). ``multipliers``: ``[λ_0..λ_T]`` (``λ_t = ∂ℓ/∂x_t``) with ``keep=True``,
    else ``None`` (every solver).
    """

    loss: Tensor
    grads: dict[str, Tensor]
    output: Tensor
    states: list[Tensor] | None = None
    multipliers: list[Tensor] | None = None


class _Solver:
    keep: bool = False

    def solve(self, dynamics: Dynamics, ctx: Any, loss: Loss) -> CostateResult:
        raise NotImplementedError

    def backward(self, dynamics: Dynamics, ctx: Any, loss: Loss) -> Tensor:
        """Accumulate ``∇_θ ℓ`` into ``p.grad`` (like ``loss.backward()``); return ``ℓ(x_T)``."""
        result = self.solve(dynamics, ctx, loss)
        params = dict(dynamics.named_parameters())
        for name, g in result.grads.items():
            p = params[name]
            # a copy, as autograd's accumulation makes when it must: g may be an expanded view
            # (stride 0, which a later in-place add cannot write into) or a kept multiplier; in
            # the parameter's layout (e.g. channels-last), as autograd's gradients are
            p.grad = torch.empty_like(p).copy_(g) if p.grad is None else p.grad.add_(g)
        return result.loss

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _trainable(dynamics: Dynamics) -> dict[str, Tensor]:
    return {n: p for n, p in dynamics.named_parameters() if p.requires_grad}


def _differentiable(value: Tensor, message: str = (
        "loss(x_T) has no autograd graph: it does not depend on x_T (or was computed under "
        "torch.no_grad() or detached), so there is no gradient to compute")) -> Tensor:
    """The terminal loss, if it has an autograd graph to differentiate (else ValueError)."""
    if not value.requires_grad:
        raise ValueError(message)
    return value


def _what(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)}, dtype {x.dtype} and device {x.device}"
    return f"type {type(x).__name__}"


def _like(x: Any, ref: Tensor) -> bool:
    return (isinstance(x, Tensor) and x.shape == ref.shape and x.dtype == ref.dtype
            and x.device == ref.device)


def _check_keep(keep: Any) -> bool:
    if not isinstance(keep, bool):
        raise ValueError(f"keep must be True or False, got {keep!r}")
    return keep


def _unused_error(names: list[str]) -> ValueError:
    listed = ", ".join(repr(n) for n in names)
    return ValueError(
        f"parameter(s) {listed} require grad but no phase gave them a gradient: no phase uses "
        "them, a phase's output is detached from them (torch.no_grad, .detach(), .item()), or a "
        "custom vjp returns no gradient for them; remove them or set requires_grad=False if "
        "they are unused"
    )


class AutogradCostate(_Solver):
    """Reference solver: plain back-propagation through the rollout.

    Memory: every phase's activations (the whole autograd graph of the T phases).
    Time: one forward and one backward pass. With ``keep=True`` the multipliers
    ``λ_t = ∂ℓ/∂x_t`` are read off the same backward pass (through zero probes added to each
    state), which makes this the independent oracle the other solvers are tested against.
    """

    def __init__(self, keep: bool = False):
        self.keep = _check_keep(keep)

    def solve(self, dynamics: Dynamics, ctx: Any, loss: Loss) -> CostateResult:
        T = check_horizon(dynamics)
        params = _trainable(dynamics)
        probes: list[Tensor] = []
        with torch.enable_grad():
            states = []
            for t in range(T + 1):
                x = check_state(dynamics(t, states[-1] if t else None, ctx),
                                states[-1] if t else None, t)
                if self.keep:
                    probes.append(torch.zeros_like(x, requires_grad=True))
                    x = x + probes[-1]
                states.append(x)
            value = _differentiable(check_loss(loss(states[-1])))
            inputs = [*params.values(), *probes]
            grads = torch.autograd.grad(value, inputs, allow_unused=True) if inputs else ()
        unused = [n for n, g in zip(params, grads) if g is None]
        if unused:
            raise _unused_error(unused)
        lams = [
            torch.zeros_like(z) if g is None else g for z, g in zip(probes, grads[len(params):])
        ]
        return CostateResult(
            loss=value.detach(),
            grads=dict(zip(params, grads[: len(params)])),
            output=states[-1].detach(),
            states=[x.detach() for x in states],
            multipliers=lams if self.keep else None,
        )


class _Sweep:
    """One backward sweep: phase evaluations, phase VJPs and the gradient accumulator.

    A phase is evaluated forward without a graph (``advance``); its VJP (``vjp``) evaluates it
    again with the graph of that one phase and back-propagates ``λ_t`` through it with
    ``torch.autograd.grad`` (with respect to ``x_{t-1}`` and every trainable parameter; the
    ones the phase does not read come back as ``None`` at no cost), then frees that graph.
    """

    def __init__(self, dynamics: Dynamics, ctx: Any, loss: Loss, keep: bool):
        self.dynamics, self.ctx, self.loss, self.keep = dynamics, ctx, loss, keep
        self.T = check_horizon(dynamics)
        self.params = _trainable(dynamics)
        self.grads: dict[str, Tensor] = {}
        self.value: Tensor | None = None
        self.output: Tensor | None = None
        self.states: list[Tensor | None] = [None] * (self.T + 1)
        self.multipliers: list[Tensor | None] = [None] * (self.T + 1)

    def advance(self, t: int, x: Tensor | None) -> Tensor:
        """``x_t = F_t(x_{t-1})`` without a graph."""
        with torch.no_grad():
            out = check_state(self.dynamics(t, x, self.ctx), x, t)
        if self.keep:
            self.states[t] = out
        return out

    def terminal(self, x_prev: Tensor) -> tuple[Tensor, Tensor]:
        """Evaluate ``x_T`` and ``λ_T = ∇ℓ(x_T)``."""
        x_T = self.advance(self.T, x_prev)
        with torch.enable_grad():
            x = x_T.detach().requires_grad_()
            value = _differentiable(check_loss(self.loss(x)))
            (lam,) = torch.autograd.grad(value, x, allow_unused=True)
        self.value, self.output = value.detach(), x_T
        return x_T, torch.zeros_like(x_T) if lam is None else lam

    def last(self, x_prev: Tensor) -> Tensor:
        """Phase ``T``, the loss and phase ``T``'s VJP: ``terminal`` then ``vjp``, or one call
        of the dynamics' ``terminal_vjp`` when it fuses them. Returns ``λ_{T-1}``."""
        with torch.no_grad():
            fused = self.dynamics.terminal_vjp(x_prev, self.loss, self.ctx)
        if fused is None:
            _, lam = self.terminal(x_prev)
            return self.vjp(self.T, x_prev, lam)
        where = f"{type(self.dynamics).__name__}.terminal_vjp(...)"
        if not (isinstance(fused, tuple) and len(fused) == 5 and isinstance(fused[4], dict)):
            raise ValueError(f"{where} must return None or (x_T, loss, lambda_T, lambda_prev, dict "
                             f"name -> gradient), got {type(fused).__name__}")
        x_T, value, lam_T, lam_prev, grads = fused
        for name, got in (("x_T", x_T), ("lambda_T", lam_T)):
            if not _like(got, x_prev):
                raise ValueError(f"{where} returned {name} of {_what(got)}; expected the state's "
                                 f"{_what(x_prev)}")
        if not (isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point()):
            raise ValueError(f"{where} returned a loss of {_what(value)}; expected a real scalar")
        self.value, self.output = value.detach().reshape(()), x_T
        if self.keep:
            self.states[self.T], self.multipliers[self.T] = x_T, lam_T
        return self._custom(self.T, x_prev, (lam_prev, grads), where)

    def vjp(self, t: int, x_prev: Tensor | None, lam: Tensor) -> Tensor | None:
        """Add ``(∂_θ F_t)* λ_t`` to the gradients and return ``λ_{t-1} = (∂_x F_t)* λ_t``."""
        if self.keep:
            self.multipliers[t] = lam
        with torch.no_grad():
            custom = self.dynamics.vjp(t, x_prev, lam, self.ctx)
        if custom is not None:
            return self._custom(t, x_prev, custom)
        params = list(self.params.values())
        with torch.enable_grad():
            x = None if t == 0 else x_prev.detach().requires_grad_()
            out = check_state(self.dynamics(t, x, self.ctx), x, t)
            inputs = params if x is None else [x, *params]
            if not out.requires_grad or not inputs:
                grads: tuple = (None,) * len(inputs)
            else:
                grads = torch.autograd.grad(out, inputs, lam, allow_unused=True)
        for n, g in zip(self.params, grads[len(inputs) - len(params):]):
            if g is not None:
                self._add(n, g)
        if x is None:
            return None
        return torch.zeros_like(x_prev) if grads[0] is None else grads[0]

    def _custom(self, t: int, x_prev: Tensor | None, custom: Any, where: str | None = None
                ) -> Tensor | None:
        """Check and accumulate what an overridden ``Dynamics.vjp`` (or ``terminal_vjp``,
        named by ``where``) returned."""
        where = where or f"{type(self.dynamics).__name__}.vjp(t={t}, ...)"
        if not (isinstance(custom, tuple) and len(custom) == 2 and isinstance(custom[1], dict)):
            raise ValueError(f"{where} must return None or a pair (lambda_prev, dict name -> "
                             f"gradient), got {type(custom).__name__}")
        lam_prev, grads = custom
        if x_prev is not None and not _like(lam_prev, x_prev):
            raise ValueError(f"{where} returned a multiplier of {_what(lam_prev)}; expected the "
                             f"state's {_what(x_prev)}")
        for n, g in grads.items():
            p = self.params.get(n)
            if p is None:
                raise ValueError(f"{where} returned a gradient for {n!r}, which is not a trainable "
                                 f"parameter of the dynamics (those are {sorted(self.params)})")
            if not _like(g, p):
                raise ValueError(f"{where} returned a gradient for {n!r} of {_what(g)}; expected "
                                 f"the parameter's {_what(p)}")
            self._add(n, g)
        return None if x_prev is None else lam_prev

    def _add(self, name: str, g: Tensor) -> None:
        self.grads[name] = g if name not in self.grads else self.grads[name] + g

    def result(self) -> CostateResult:
        unused = [n for n in self.params if n not in self.grads]
        if unused:
            raise _unused_error(unused)
        grads = {n: self.grads[n] for n in self.params}
        return CostateResult(
            loss=self.value,
            grads=grads,
            output=self.output,
            states=self.states if self.keep else None,
            multipliers=self.multipliers if self.keep else None,
        )


class AdjointSweep(_Solver):
    """The explicit costate recursion of Algorithm 3.

    Forward: ``x_0..x_T`` without any autograd graph, stored in one preallocated buffer (so
    the states do not fragment the heap between the phases' temporaries). Backward: for
    ``t = T..0``, re-evaluate phase ``t`` with its graph and pull ``λ_t`` back to ``λ_{t-1}``
    and ``G_t = (∂_θ F_t)* λ_t`` (``torch.autograd.grad``), then free that graph.

    Memory: the T+1 states plus one phase's activations (autograd keeps all T phases').
    Time: each phase is evaluated twice (once forward, once inside its VJP), so about one
    extra forward pass over plain back-propagation. ``keep=True`` also returns the
    multipliers ``λ_0..λ_T``.
    """

    def __init__(self, keep: bool = False):
        self.keep = _check_keep(keep)

    def solve(self, dynamics: Dynamics, ctx: Any, loss: Loss) -> CostateResult:
        sweep = _Sweep(dynamics, ctx, loss, self.keep)
        x0 = sweep.advance(0, None)
        states = x0.new_empty((sweep.T, *x0.shape))  # x_0..x_{T-1}
        states[0] = x0
        del x0
        for t in range(1, sweep.T):
            states[t] = sweep.advance(t, states[t - 1])
        lam = sweep.last(states[-1])
        for t in range(sweep.T - 1, 0, -1):
            lam = sweep.vjp(t, states[t - 1], lam)
        sweep.vjp(0, None, lam)
        result = sweep.result()
        result.states = [*states.unbind(0), sweep.output]  # stored anyway
        return result


def _split(n: int, s: int) -> int:
    """Length of the left part when reversing ``n`` phases with ``s`` checkpoints, the one
    holding the starting state included.

    Binomial (revolve) schedule of Griewank and Walther: with ``s`` checkpoints and ``r``
    recomputations of each phase at most ``β(s, r) = C(s + r, s)`` phases can be reversed, and
    ``β(s, r) = β(s − 1, r) + β(s, r − 1)``. With ``r`` the least such count for ``n``, the next
    checkpoint goes as far right as both parts allow: the left part (reversed again with ``s``
    checkpoints) at most ``β(s, r − 1)`` phases, the right part (``s − 1`` checkpoints) at least
    ``β(s − 1, r − 1)``. This choice needs the fewest phase evaluations of all split points (checked
    against an exhaustive search in the tests).
    """
    r = 1
    while comb(s + r, s) < n:
        r += 1
    return max(1, min(comb(s + r - 1, s), n - comb(s + r - 2, s - 1)))


class CheckpointedSweep(_Solver):
    """Costate sweep that keeps at most ``checkpoints = k`` states (binomial checkpointing).

    The states between stored checkpoints are recomputed from the nearest stored one with the
    binomial schedule of Griewank and Walther ("revolve"): phases are reversed right to left
    and the checkpoint positions chosen so that no phase is re-evaluated more than ``r``
    times, ``r`` the least integer with ``C(k + r, r) ≥ T``, and the total number of
    re-evaluations is the least possible (with ``k = 1`` only ``x_0`` is kept and phase ``t`` is
    re-evaluated ``T − t`` times).

    Memory: ``k`` states plus one phase's activations, whatever ``T``. Time: at most
    ``(r + 1)·T`` phase evaluations plus the ``T`` VJPs; ``k = T + 1`` costs what
    ``AdjointSweep`` costs, ``k = 1`` re-evaluates from ``x_0`` every time (``O(T²)``),
    ``k ≈ log T`` balances the two. ``keep=True`` also returns all states and multipliers
    (which defeats the memory saving; for tests and diagnostics).
    """

    def __init__(self, checkpoints: int = 4, keep: bool = False):
        if isinstance(checkpoints, bool) or not isinstance(checkpoints, int) or checkpoints < 1:
            raise ValueError(f"CheckpointedSweep: checkpoints must be an integer >= 1, "
                             f"got {checkpoints!r}")
        self.checkpoints, self.keep = checkpoints, _check_keep(keep)

    def solve(self, dynamics: Dynamics, ctx: Any, loss: Loss) -> CostateResult:
        sweep = _Sweep(dynamics, ctx, loss, self.keep)
        x0 = sweep.advance(0, None)
        # the checkpoints live in one preallocated buffer; nesting depth d uses slot d
        slots = x0.new_empty((min(self.checkpoints, sweep.T), *x0.shape))
        slots[0] = x0
        del x0
        lam0 = self._reverse(sweep, slots, 0, slots[0], sweep.T, None, self.checkpoints - 1)
        del slots
        sweep.vjp(0, None, lam0)
        return sweep.result()

    def _reverse(self, sweep: _Sweep, slots: Tensor, a: int, x_a: Tensor, b: int,
                 lam_b: Tensor | None, free: int) -> Tensor:
        """Pull ``λ_b`` back to ``λ_a`` over phases ``a+1..b`` given the stored ``x_a``.

        ``lam_b is None`` means ``b = T`` and ``λ_T`` is still to be computed from ``x_T``.
        """
        n = b - a
        if n > 1 and free > 0:
            m = a + _split(n, free + 1)  # x_a holds a checkpoint too
            x_m = x_a
            for t in range(a + 1, m + 1):
                x_m = sweep.advance(t, x_m)
            slot = slots[self.checkpoints - free]
            slot.copy_(x_m)
            del x_m
            lam_m = self._reverse(sweep, slots, m, slot, b, lam_b, free - 1)
            return self._reverse(sweep, slots, a, x_a, m, lam_m, free)
        lam = lam_b
        for j in range(b, a, -1):  # no free slot: recompute x_{j-1} from x_a each time
            x_prev = x_a
            for t in range(a + 1, j):
                x_prev = sweep.advance(t, x_prev)
            lam = sweep.last(x_prev) if lam is None else sweep.vjp(j, x_prev, lam)
        return lam
