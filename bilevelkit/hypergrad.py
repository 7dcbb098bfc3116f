"""Hypergradient strategies for the upper level of the bilevel model (docs/bilevel.md).

Functional interface: ``params`` is a dict name → tensor (θ), ``omega`` the scores ω,
``weights = normalizer(omega)`` = σ(ω) on the simplex (column-wise for a matrix),
``inner_loss(params, weights)`` the weighted training loss Σ_i σ_i ℓ(θ; D^tr_i) and
``outer_loss(params)`` the validation loss. A strategy is called as

    res = method(inner_loss, outer_loss, params, omega, normalizer=normalizers.softmax)

and returns a :class:`HypergradResult`. Everything that needs a gradient (θ, ω) is passed in;
an ``inner_loss`` whose graph does not reach its ``weights`` argument (e.g. weights captured
from an enclosing scope) is an error, not a silent zero.

The lower-level update is a pure function, reusable outside the strategies:
``InnerOptimizer.update(params, state, grads, lr) -> (params, state)`` and
``inner_step(inner_loss, params, state, weights, lr, optimizer)`` which adds the gradient.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence

import torch
from torch import Tensor

from . import normalizers
from .costate import CostateResult, _differentiable
from .dynamics import Dynamics

Params = dict[str, Tensor]
InnerLoss = Callable[[Params, Tensor], Tensor]
OuterLoss = Callable[[Params], Tensor]

__all__ = [
    "HypergradResult",
    "OptState",
    "InnerOptimizer",
    "inner_step",
    "WeightedSum",
    "Unrolled",
    "FirstOrder",
    "Implicit",
    "InnerLoop",
    "NegativeCurvatureError",
]


class NegativeCurvatureError(ValueError):
    """CG met pᵀHp ≤ 0: the inner Hessian is not positive definite where ``Implicit`` solves."""


@dataclass(frozen=True)
class HypergradResult:
    """What a strategy returns.

    params:     lower-level parameters at which ``outer_loss`` was evaluated (detached).
    hypergrad:  d outer_loss / d ω under the strategy's approximation, shape of ω.
    weights:    σ(ω) (detached).
    outer_loss: outer_loss(params).
    lr_grad:    ``Unrolled(learn_lr=True)`` only: d outer_loss / d lr.
    residual:   ``Implicit`` only: relative residual ‖∇ℓ^val − (H + δI) v‖ / ‖∇ℓ^val‖ of the
                linear solve; None for the other strategies.
    """

    params: Params
    hypergrad: Tensor
    weights: Tensor
    outer_loss: float
    residual: float | None = None
    lr_grad: float | None = None


@dataclass(frozen=True)
class OptState:
    """State of the lower-level optimizer after ``step`` updates.

    first:  momentum buffer (``"momentum"``) or first moment (``"adam"``); empty for ``"sgd"``.
    second: second moment (``"adam"``); empty otherwise.
    """

    step: int
    first: Params
    second: Params


@dataclass(frozen=True)
class InnerOptimizer:
    """Differentiable lower-level update, equal step by step to ``torch.optim``.

    - ``"sgd"``:      θ ← θ − a g.
    - ``"momentum"``: b ← μ b + g, θ ← θ − a b  (``torch.optim.SGD(momentum=μ)``, no dampening,
      no Nesterov; b starts at 0, so the first buffer is g as in torch).
    - ``"adam"``:     m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g²,
      θ ← θ − (a / (1−β₁ᵗ)) m / (√v / √(1−β₂ᵗ) + ε)  (``torch.optim.Adam`` defaults: bias
      correction, ε outside the square root). √v is given a zero derivative where v = 0 instead
      of ∞ (for β₂ > 0, v = 0 means every gradient so far was 0, so m = 0 and the derivative of
      the step is still exact), which keeps hypergradients finite for unused parameters.

    Written out-of-place with ordinary tensor operations, so autograd can differentiate the
    new parameters with respect to the old ones, the gradient and the learning rate.
    """

    name: Literal["sgd", "momentum", "adam"] = "sgd"
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "momentum", "adam"):
            raise ValueError(f"optimizer must be 'sgd', 'momentum' or 'adam', got {self.name!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps}")

    def init(self, params: Mapping[str, Tensor]) -> OptState:
        """The state before the first update: zero buffers shaped like ``params``."""
        if self.name == "sgd":
            return OptState(step=0, first={}, second={})
        zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        return OptState(step=0, first=zeros, second=dict(zeros) if self.name == "adam" else {})

    def update(
        self, params: Mapping[str, Tensor], state: OptState, grads: Mapping[str, Tensor], lr: float | Tensor
    ) -> tuple[Params, OptState]:
        """One update (params, state, grads, lr) → (params, state); pure, out-of-place."""
        step = state.step + 1
        if self.name == "sgd":
            if isinstance(lr, Tensor):
                return {k: p - lr * grads[k] for k, p in params.items()}, OptState(step, {}, {})
            return {k: p.add(grads[k], alpha=-lr) for k, p in params.items()}, OptState(step, {}, {})
        if self.name == "momentum":
            buf = {k: self.momentum * state.first[k] + grads[k] for k in params}
            return {k: p - lr * buf[k] for k, p in params.items()}, OptState(step, buf, {})
        b1, b2 = self.betas
        m = {k: b1 * state.first[k] + (1 - b1) * grads[k] for k in params}
        v = {k: b2 * state.second[k] + (1 - b2) * grads[k] * grads[k] for k in params}
        step_size = lr / (1 - b1**step)
        root_c2 = (1 - b2**step) ** 0.5  # step may be a tensor (InnerLoop's compiled phase)
        new = {k: p - step_size * m[k] / (_sqrt(v[k]) / root_c2 + self.eps) for k, p in params.items()}
        return new, OptState(step, m, v)


def inner_step(
    inner_loss: InnerLoss,
    params: Mapping[str, Tensor],
    state: OptState,
    weights: Tensor,
    lr: float | Tensor,
    optimizer: InnerOptimizer = InnerOptimizer(),
    create_graph: bool = False,
    check_weights: bool = False,
) -> tuple[Params, OptState]:
    """θ⁺ = update(θ, s, ∇_θ inner_loss(θ, w), a): one lower-level step.

    ``params`` must require grad. With ``create_graph=True`` the step stays differentiable
    with respect to θ, w and a (for reverse mode through the inner loop). ``check_weights``
    raises ValueError if the graph of ``inner_loss`` does not reach ``weights``; it
    back-propagates along every path to ``weights``, so do it once, at the first step.
    """
    where = f"at inner step {state.step}"
    grads = _gradient(inner_loss, params, weights, create_graph, where, check_weights)
    return optimizer.update(params, state, grads, lr)


class WeightedSum:
    """The inner loss given term by term: ``inner_loss(params, weights) = Σ_i weights[i] ·
    losses[i](params)``, with ``losses`` a dict group index → loss of the parameters (groups
    left out have no term, e.g. those outside a sparsemax support).

    Every strategy takes it as its ``inner_loss``. A one-step look-ahead (:class:`FirstOrder`,
    and :class:`Unrolled` with ``steps=1``, SGD or momentum, no ``learn_lr`` and no
    ``compile``) then uses the terms: the hypergradient −a J_σᵀ [⟨g_i(θ), ∇ℓ^val(θ')⟩]_i is
    formed from each group's gradient g_i, taken by a plain backward pass, instead of by a
    backward pass through the graph of the inner gradient. The same numbers to rounding, in
    about 60% of the time on the MRI application (docs/bilevel.md).
    """

    def __init__(self, losses: Mapping[int, Callable[[Params], Tensor]]):
        if not isinstance(losses, Mapping) or not losses:
            raise ValueError("WeightedSum needs a non-empty dict group index -> loss(params), "
                             f"got {_describe(losses)}")
        for i, loss in losses.items():
            if not (isinstance(i, int) and not isinstance(i, bool) and i >= 0 and callable(loss)):
                raise ValueError(f"WeightedSum: each entry must be a group index >= 0 -> a callable "
                                 f"loss(params), got {i!r} -> {_describe(loss)}")
        self.losses = dict(losses)

    def __call__(self, params: Mapping[str, Tensor], weights: Tensor) -> Tensor:
        self.check(weights)
        return torch.stack([weights[i] * loss(params) for i, loss in self.losses.items()]).sum()

    def check(self, weights: Tensor) -> None:
        """The group indices exist in ``weights`` (a vector), else ValueError."""
        if weights.dim() != 1 or max(self.losses) >= len(weights):
            raise ValueError(f"WeightedSum has terms for groups {sorted(self.losses)}, but the "
                             f"weights have shape {tuple(weights.shape)}; expected a vector of "
                             f"more than {max(self.losses)} entries")

    def look_ahead(self, outer_loss: OuterLoss, params: Params, omega: Tensor, weights: Tensor,
                   lr: float, where: str) -> HypergradResult:
        """θ' = θ − a Σ_i w_i g_i(θ) and d ℓ^val(θ')/dω = −a J_σᵀ [⟨g_i(θ), ∇ℓ^val(θ')⟩]_i,
        from the groups' gradients g_i (θ: leaves that require grad; w = σ(ω))."""
        self.check(weights)
        xs = list(params.values())
        grads = {}
        for i, loss in self.losses.items():
            value = _scalar(loss(params), f"inner_loss (the term of group {i})", where)
            grads[i] = _or_zeros(_grad([value], xs), xs)
        w = weights.detach()
        new = {}
        for n, (k, x) in enumerate(params.items()):
            step = sum(w[i].to(x.dtype) * g[n] for i, g in grads.items())
            new[k] = (x.detach() - lr * step).requires_grad_()
        outer = _check_outer(_scalar(outer_loss(new), "outer_loss", "after the look-ahead step"))
        v = _or_zeros(_grad([outer], list(new.values())), list(new.values()))
        mixed = torch.zeros_like(w)
        for i, g in grads.items():
            mixed[i] = -lr * sum((a * b).sum() for a, b in zip(g, v))
        (hypergrad,) = _or_zeros(_grad([weights], [omega], [mixed]), [omega])
        return _result(new, hypergrad, weights, outer)


@dataclass(frozen=True)
class Unrolled:
    """Reverse mode through k differentiable inner steps (truncated back-propagation).

    θ⁰ = params (a constant), θ^{s+1} = update(θ^s, ∇_θ inner_loss(θ^s, σ(ω)), a), and the
    hypergradient is d ℓ^val(θ^k) / dω by autograd through all k steps (the adjoint recursion
    p_s = p_{s+1} − a H(θ^s) p_{s+1}, h += −a J_σᵀ [⟨g_i(θ^s), p_{s+1}⟩]_i from p_k = ∇ℓ^val(θ^k);
    with momentum/Adam the optimizer state is part of the state).

    Cost: time ≈ k gradient evaluations with ``create_graph`` plus one backward through them
    (k Hessian-vector products, no Hessian is formed), a few times k plain steps; memory O(k):
    the graphs of all k steps (gradients included) are kept until the end. Exact for the
    k-step map, whatever k; prefer it for small k or when the lower level is far from
    converged. Maclaurin et al. 2015; Franceschi et al. 2017; Shaban et al. 2019.

    ``costate=bk.AdjointSweep()`` or ``bk.CheckpointedSweep(c)`` computes the same
    hypergradient (to rounding) without keeping the k-step graph: the inner loop is an
    :class:`InnerLoop` dynamics (states θ^s and the optimizer state, ω a control shared by every
    phase) and its costate sweep re-evaluates one step at a time, with the Hessian-vector
    product inside the phase's VJP. Memory: the stored iterates (one state per step with
    ``AdjointSweep``, ``c`` with ``CheckpointedSweep``) plus one step's graph; time: about one
    extra gradient evaluation per step (more with few checkpoints). ``learn_lr=True`` also
    returns ``d outer / d lr`` in ``HypergradResult.lr_grad``.

    ``compile=True`` compiles the inner step with ``torch.compile`` (the inner gradient by
    ``torch.func.grad``). Without a ``costate``, reverse mode runs through the k compiled
    steps: after the first step, runs of four steps are one compiled call (the rest one step
    per call); each call keeps only its input state, and its backward, torch.compile's own
    graph, recomputes the rest (the same hypergradient, memory at most one state per step as
    with ``AdjointSweep``, no per-operation dispatch, a quarter of the calls). The last four
    steps (the last step when k ≤ 4), ``outer_loss``'s gradient and their VJP are one compiled
    call outside autograd, as in a sweep's last phase; its cotangents go back through the
    earlier calls by autograd. With a ``costate``, the sweep's forward step, the step's VJP and
    the last step fused with ``outer_loss``'s gradient are compiled (see :class:`InnerLoop`).
    Speed on the benchmark problem: docs/benchmarks.md, "Hypergradients". The first call
    compiles (seconds); the parameters must share one dtype, and ``inner_loss`` must be
    traceable by ``torch.func`` and ``torch.compile``, else a ``RuntimeError`` says so (past
    torch.compile's recompilation limit new variants run eagerly instead, with a warning).
    An ``outer_loss`` that torch.compile cannot trace only loses its fusion with the last
    steps (it then runs eagerly).
    """

    steps: int
    lr: float
    optimizer: Literal["sgd", "momentum", "adam"] = "sgd"
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    costate: object | None = None
    learn_lr: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        _check_steps_lr(self.steps, self.lr, min_steps=1)
        self.inner_optimizer  # validates the optimizer settings
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")

    @property
    def inner_optimizer(self) -> InnerOptimizer:
        return InnerOptimizer(self.optimizer, self.momentum, self.betas, self.eps)

    @torch.enable_grad()
    def __call__(
        self,
        inner_loss: InnerLoss,
        outer_loss: OuterLoss,
        params: Mapping[str, Tensor],
        omega: Tensor,
        normalizer: str | normalizers.Normalizer = normalizers.softmax,
    ) -> HypergradResult:
        theta, omega, weights = _prepare(params, omega, normalizer)
        opt = self.inner_optimizer
        if (isinstance(inner_loss, WeightedSum) and self.steps == 1 and opt.name != "adam"
                and not (self.learn_lr or self.compile)):  # the first momentum step is SGD's
            return inner_loss.look_ahead(outer_loss, theta, omega, weights, self.lr, "at inner step 0")
        if self.costate is not None or self.compile:
            return self._inner_loop(inner_loss, outer_loss, theta, omega, weights, normalizer)
        lr = (torch.tensor(float(self.lr), dtype=omega.dtype, device=omega.device, requires_grad=True)
              if self.learn_lr else self.lr)
        state = opt.init(theta)
        for s in range(self.steps):
            theta, state = inner_step(inner_loss, theta, state, weights, lr, opt,
                                      create_graph=True, check_weights=s == 0)
        outer = _check_outer(_scalar(outer_loss(theta), "outer_loss", f"after {self.steps} inner steps"))
        inputs = [omega, lr] if self.learn_lr else [omega]
        grads = _to_omega([outer], inputs)
        return _result(theta, grads[0], weights, outer,
                       lr_grad=float(grads[1]) if self.learn_lr else None)

    def _inner_loop(self, inner_loss, outer_loss, theta, omega, weights, normalizer):
        """The routes through an :class:`InnerLoop`: a costate sweep, or (``compile=True``
        without a costate) autograd through its compiled steps."""
        if not self.compile:
            _check_reaches_weights(inner_loss, theta, weights)
        loop = InnerLoop(inner_loss, theta, omega, self.steps, self.lr, self.inner_optimizer,
                         normalizer, self.learn_lr, self.compile, outer_loss, _CHUNK)
        res = (loop.unrolled() if self.costate is None  # compiled steps, autograd through them
               else self.costate.solve(loop, None, loop.loss))
        if self.compile and not res.grads["omega"].any():
            # the compiled VJP gives zeros where autograd finds no path: is that the reason?
            _check_reaches_weights(inner_loss, theta, weights)
            loop.check_outer_reaches(res.output)
        return _result(loop.unflatten(res.output), res.grads["omega"], weights, res.loss,
                       lr_grad=float(res.grads["lr"]) if self.learn_lr else None)


class InnerLoop(Dynamics):
    """The inner optimizer loop as a control system (for hypergradients by a costate sweep).

    State ``x_s`` (a ``slots × P`` tensor): the flattened parameters ``θ^s`` and, for momentum
    and Adam, the optimizer's buffers. ``x_0 = (θ^0, 0, 0)`` is a constant, and phase ``s`` is
    one optimizer step ``x_s = update(x_{s-1}, ∇_θ inner_loss(θ^{s-1}, σ(ω)), a)``. The
    controls ``ω`` (and ``a`` with ``learn_lr``) are shared by every phase, so the costate
    sweep's gradient with respect to them is the reverse-mode hypergradient (the adjoint
    recursion of :class:`Unrolled`). A
    phase evaluated with gradients enabled (inside the sweep's VJP) takes the inner gradient
    with ``create_graph=True``, so that the VJP is a Hessian-vector product; evaluated under
    ``no_grad`` (the sweep's forward) it is a plain gradient step.

    ``compile=True``: the sweep's forward phase (under ``no_grad``) and the phase's VJP
    (:meth:`vjp`) are pure ``torch.func`` functions (the inner gradient by
    ``torch.func.grad``, the VJP by ``torch.func.vjp`` of the whole step) compiled by
    ``torch.compile`` and reused for every step, every call and every ``InnerLoop`` with the
    same shapes, dtypes, optimizer and ``inner_loss`` code; :meth:`step` with gradients
    enabled stays eager autograd (what ``check_dynamics`` compares the sweeps against).
    :meth:`unrolled` is reverse mode by autograd through the compiled steps, without a sweep
    (what ``Unrolled(compile=True)`` without a costate runs).

    ``chunk``: :meth:`unrolled` runs that many steps per compiled call after the first step
    (1: one step per call), and fuses the last ``chunk`` steps with ``outer_loss``.

    ``outer_loss`` (optional): :meth:`loss` is then ``outer_loss`` of a state's parameters, the
    terminal loss to pass to a sweep; with ``compile=True`` the sweep's last step, that loss's
    gradient and the step's VJP are one compiled function (:meth:`terminal_vjp`), when
    ``torch.compile`` can trace ``outer_loss`` (else they run one after the other).
    """

    def __init__(self, inner_loss: InnerLoss, params: Params, omega: Tensor, steps: int,
                 lr: float, optimizer: InnerOptimizer, normalizer, learn_lr: bool = False,
                 compile: bool = False, outer_loss: OuterLoss | None = None, chunk: int = 1):
        super().__init__()
        dtypes = {v.dtype for v in params.values()}
        if len(dtypes) != 1:
            raise ValueError(f"InnerLoop needs parameters of one dtype, got {sorted(map(str, dtypes))}")
        self.horizon, self.inner_loss, self.optimizer = steps, inner_loss, optimizer
        self.outer_loss = outer_loss
        self._cache: tuple | None = None  # (ω, its version key, σ(ω)) for the compiled route
        self.normalizer = normalizers.get(normalizer)
        self.layout = _Layout(tuple(params), tuple(v.shape for v in params.values()),
                              tuple(v.numel() for v in params.values()))
        self.compile, self.chunk = compile, chunk
        self.slots = {"sgd": 1, "momentum": 2, "adam": 3}[optimizer.name]
        self.omega = torch.nn.Parameter(omega.detach().clone())
        if learn_lr:
            self.lr = torch.nn.Parameter(torch.tensor(float(lr), dtype=omega.dtype, device=omega.device))
        else:
            self.lr = lr
        self.register_buffer("theta0", torch.cat([v.detach().reshape(-1) for v in params.values()]),
                             persistent=False)

    def unflatten(self, x: Tensor) -> Params:
        """The parameter dict ``θ`` of a state (views, differentiable)."""
        return self.layout.unflatten(x[0] if x.dim() == 2 else x)

    def loss(self, x: Tensor) -> Tensor:
        """``outer_loss`` at the parameters of state ``x`` (a finite scalar, else an error)."""
        if self.outer_loss is None:
            raise ValueError("InnerLoop.loss needs the outer_loss argument")
        value = self.outer_loss(self.unflatten(x))
        return _scalar(value, "outer_loss", f"after {self.horizon} inner steps")

    def initial(self, ctx: None) -> Tensor:
        self._cache = None  # every solve starts here: σ(ω) is made afresh once per solve
        zeros = torch.zeros(self.slots - 1, self.theta0.numel(), dtype=self.theta0.dtype,
                            device=self.theta0.device)
        return torch.cat([self.theta0.unsqueeze(0), zeros])

    def step(self, t: int, x: Tensor, ctx: None) -> Tensor:
        graph = torch.is_grad_enabled()  # inside a VJP: keep the step differentiable
        where = f"at inner step {t - 1}"
        if self.compile and not graph:  # the sweep's forward; its VJP is InnerLoop.vjp
            out, loss = self._call(_phase, x, t)
            _scalar(loss, "inner_loss", where)
            return out
        with torch.set_grad_enabled(graph):
            weights = self.normalizer(self.omega)
        with torch.enable_grad():
            theta = x[0] if graph and x.requires_grad else x[0].detach().requires_grad_()
            loss = _scalar(self.inner_loss(self.unflatten(theta), weights), "inner_loss", where)
            (g,) = _or_zeros(_grad([loss], [theta], create_graph=graph), [theta])
            with torch.set_grad_enabled(graph):
                return _next_state(self.optimizer, x, theta, g, self.lr, t - 1)

    def unrolled(self) -> CostateResult:
        """Reverse mode through all the steps, compiled (``compile=True``): the steps' graphs
        are torch.compile's own forward and backward graphs, so the result is autograd's through
        the k steps. Each compiled call under autograd (one step, or a run of ``chunk`` steps)
        keeps only its input state, and its compiled backward recomputes the rest: memory grows
        by at most one state per step, as for ``AdjointSweep``. The last call (the last run of
        ``chunk`` steps, or the last step when k ≤ ``chunk``) is fused with ``outer_loss``: its
        steps, the loss's gradient and the VJP through those steps are one compiled function
        outside autograd (nothing recomputed, no eager loss), whose cotangents then go back
        through the earlier calls by autograd (with one step, the only call, whose VJP leaves
        out the constant ``x_0``). An ``outer_loss`` torch.compile cannot trace
        with the steps runs eagerly after the last call instead."""
        last = self.chunk if self.horizon > self.chunk > 1 else 1  # steps of the fused call
        x = self._graph_rollout(self.horizon - last)
        controls = dict(self.named_parameters())
        fused = self._fused_last(x, last)
        if fused is None:  # outer_loss cannot be compiled with the steps: autograd to the end
            x = self._graph_rollout(self.horizon, x, self.horizon - last + 1)
            value = self.loss(x)
            outputs, cotangents = [value], None
        else:
            x_last, value, lam, g_weights, g_lr = fused
            outputs, cotangents = [self._weights()], [g_weights]
            if lam is not None:  # after step 1: the state's cotangent goes back through its calls
                outputs.append(x), cotangents.append(lam)
            if isinstance(self.lr, Tensor):  # learned: the call's lr input is the Parameter
                outputs.append(self.lr), cotangents.append(g_lr.to(self.lr.dtype))
            x = x_last
        grads = _or_zeros(_grad(outputs, list(controls.values()), cotangents), list(controls.values()))
        return CostateResult(loss=value.detach(), grads=dict(zip(controls, grads)), output=x.detach())

    def _graph_rollout(self, until: int | None = None, x: Tensor | None = None, t: int = 1) -> Tensor:
        """The state after step ``until`` (default: the last), from state ``x`` before step
        ``t`` (default: ``x_0``), with autograd's graph through the compiled steps. Step 1 (from
        the constant ``x_0``) is a call of its own; after it, runs of ``chunk`` steps are one
        compiled call each (the rest one step per call). Each call keeps only its input state
        for its backward, which recomputes the rest (:func:`_run_compiled`)."""
        until = self.horizon if until is None else until
        x = self.initial(None) if x is None else x
        while t <= until:
            n = self.chunk if t > 1 and until - t + 1 >= self.chunk > 1 else 1
            if n == 1:
                x, loss = self._call(_graph_phase if t > 1 else _graph_first_phase, x, t, graph=True)
                _check_inner_losses(loss.reshape(1), t)
            else:
                x, losses = self._call(_graph_steps, x, t, n, graph=True)
                _check_inner_losses(losses, t)
            t += n
        return x

    def _fused_last(self, x: Tensor, n: int) -> tuple | None:
        """The last ``n`` steps from ``x`` fused with ``outer_loss`` (one compiled call outside
        autograd): ``(x_T, ℓ, λ, ∂ℓ/∂weights, ∂ℓ/∂lr)`` with ``λ = ∂ℓ/∂x`` (``None`` when ``x``
        is a constant, as ``x_0`` is when there is one step); ``None`` when
        torch.compile cannot trace ``outer_loss`` with the steps."""
        if self._losses() in _UNFUSED:
            return None
        T = self.horizon
        with torch.no_grad():  # the function transforms inside still differentiate
            constant = not x.requires_grad  # x_0: no cotangent of the state to compute
            x = x.detach()  # as a sweep's states: one variant, whatever x's requires_grad
            if constant and n == 1:
                out = self._call(_only_step_vjp, x, T, self.outer_loss)
            elif n == 1:
                out = self._call(_terminal_vjp, x, T, self.outer_loss)
            else:
                out = self._call(_terminal_run_vjp, x, T - n + 1, self.outer_loss, n)
        if out is None:
            return None
        x_T, value, _, lam, g_weights, g_lr, losses = out
        _check_inner_losses(losses, T - n + 1)
        return x_T, _scalar(value, "outer_loss", f"after {T} inner steps"), lam, g_weights, g_lr

    def vjp(self, t: int, x: Tensor | None, lam: Tensor, ctx: None):
        """With ``compile=True``: the phase's VJP as one compiled function (else autograd)."""
        if not self.compile or t == 0:
            return None
        with torch.no_grad():  # the function transforms inside still differentiate
            lam_prev, g_weights, g_lr, loss = self._call(_phase_vjp, x, t, lam)
        _scalar(loss, "inner_loss", f"at inner step {t - 1}")
        return lam_prev, self._controls(g_weights, g_lr)

    def terminal_vjp(self, x: Tensor, loss: Callable, ctx: None):
        """With ``compile=True`` and ``loss`` = :meth:`loss`: the last step, the outer loss and the
        step's VJP as one compiled function (else ``None``: one after the other)."""
        if not (self.compile and loss == self.loss) or self._losses() in _UNFUSED:
            return None
        T = self.horizon
        with torch.no_grad():
            out = self._call(_terminal_vjp, x, T, self.outer_loss)
        if out is None:  # outer_loss cannot be compiled with the step: not fused
            return None
        x_T, value, lam_T, lam_prev, g_weights, g_lr, inner_value = out
        _check_inner_losses(inner_value, T)
        value = _scalar(value, "outer_loss", f"after {T} inner steps")
        return x_T, value, lam_T, lam_prev, self._controls(g_weights, g_lr)

    def _losses(self) -> tuple:
        """What identifies the losses for torch.compile: their code (new closures of the same
        code reuse the compiled functions); never the objects themselves, which may be
        unhashable or hold large tensors."""
        return _code(self.inner_loss), _code(self.outer_loss)

    def check_outer_reaches(self, x_T: Tensor) -> None:
        """Raise, as the eager sweeps do, if ``outer_loss`` does not depend on the parameters
        (the compiled route's hypergradient would silently be zero)."""
        with torch.enable_grad():
            _check_outer(self.loss(x_T.detach().requires_grad_()))

    def _weights(self) -> Tensor:
        """``σ(ω)`` with its graph, for the compiled route: made once while ω is unchanged (the
        steps read it, their VJPs pull the weights' gradients back through it)."""
        omega = self.omega
        key = (omega._version, omega.data_ptr(), omega.dtype, omega.device, omega.requires_grad)
        if self._cache is None or self._cache[0] is not omega or self._cache[1] != key:
            with torch.enable_grad():
                weights = self.normalizer(omega)
            if torch.is_inference_mode_enabled():
                return weights  # an inference tensor has no graph to keep
            self._cache = (omega, key, weights)
        return self._cache[2]

    def __getstate__(self) -> dict:  # copies (check_dynamics deep-copies) make their own σ(ω)
        return {**super().__getstate__(), "_cache": None}

    def _check_inner_loss(self, x: Tensor, weights: Tensor, t: int) -> None:
        """``inner_loss`` at ``x`` run eagerly: a ValueError if it is not a finite real
        one-element tensor (exceptions of the user's code are left to the caller's report)."""
        with torch.no_grad():
            try:
                value = self.inner_loss(self.unflatten(x), weights)
            except Exception:  # noqa: BLE001 - the caller reports it with the compile failure
                return
        _scalar(value, "inner_loss", f"at inner step {t - 1}")

    def _controls(self, g_weights: Tensor, g_lr: Tensor) -> dict[str, Tensor]:
        """The gradients of the controls from those of the step's (weights, lr) inputs."""
        (g_omega,) = _or_zeros(_grad([self._weights()], [self.omega], [g_weights],
                                     retain_graph=True), [self.omega])
        grads = {"omega": g_omega}
        if isinstance(self.lr, Tensor):
            grads["lr"] = g_lr.to(self.lr.dtype)
        return grads

    def _call(self, fn: Callable, x: Tensor, t: int, *rest: object, graph: bool = False) -> tuple:
        """``torch.compile(fn)`` on step ``t``; ``fn`` itself (eager ``torch.func``) once
        torch.compile's recompilation limit is reached. ``graph``: with autograd's graph to ω
        (and a learned lr) through σ(ω), for reverse mode through the call."""
        # step and lr as tensors (no recompilation per step or rate), in float64 where the
        # device has it: Adam's bias corrections 1 − βᵗ then round as the eager route's Python
        # floats do, whatever the parameters' dtype (float32 on MPS, which has no float64)
        dtype = torch.float32 if self.theta0.device.type == "mps" else torch.float64
        if isinstance(self.lr, Tensor):  # learned: a Parameter
            lr = self.lr if graph else self.lr.detach()
        else:
            lr = torch.tensor(self.lr, dtype=dtype, device=self.theta0.device)
        step = torch.tensor(float(t - 1), dtype=dtype, device=self.theta0.device)
        weights = self._weights() if graph else self._weights().detach()
        args = (self.inner_loss, self.layout, self.optimizer, x, weights, lr, step, *rest)
        try:
            return _run_compiled(fn, args, recompute=graph)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            if fn in _FUSED_LAST:  # unfused, the steps may still be compiled
                return None
            _warn_recompile_limit(fn)
            try:
                return fn(*args)
            except Exception:
                self._check_inner_loss(x, weights, t)  # a malformed loss is named as such
                raise
        except torch._dynamo.exc.TorchDynamoException as err:
            self._check_inner_loss(x, weights, t)  # a malformed loss is named as such
            if fn in _FUSED_LAST:  # outer_loss cannot be traced with the steps: run them unfused
                _UNFUSED.add(self._losses())
                return None
            cause: Exception = err
            try:  # the same step without the compiler names the user's own error, if any
                fn(*args)
            except Exception as eager:  # noqa: BLE001 - reported below, with its type
                cause = eager
            first = (str(cause).strip().splitlines() or [""])[0]
            raise RuntimeError(
                f"Unrolled(compile=True): torch.compile could not compile the inner step "
                f"({type(cause).__name__}: {first}). inner_loss must be traceable by "
                "torch.func.grad and torch.compile (no .item(), no data-dependent Python control "
                "flow), and torch.compile needs a C/C++ compiler on CPU; or use compile=False"
            ) from cause


@dataclass(frozen=True)
class _Layout:
    """How a flat parameter vector splits into the named tensors of θ."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    sizes: tuple[int, ...]

    def unflatten(self, theta: Tensor) -> Params:
        return {n: v.view(shape) for n, v, shape in
                zip(self.names, torch.split(theta, self.sizes), self.shapes)}


def _next_state(optimizer: InnerOptimizer, x: Tensor, theta: Tensor, g: Tensor, lr, step) -> Tensor:
    """The inner loop's state after one optimizer step from ``x`` (θ = x[0]) with gradient g."""
    slots = x.shape[0]
    state = OptState(step, {"θ": x[1]} if slots > 1 else {}, {"θ": x[2]} if slots > 2 else {})
    new, state = optimizer.update({"θ": theta}, state, {"θ": g}, lr)
    return torch.stack([new["θ"], *state.first.values(), *state.second.values()])


def _phase(inner_loss: InnerLoss, layout: _Layout, optimizer: InnerOptimizer, x: Tensor,
           weights: Tensor, lr: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
    """One inner step as a pure function (``torch.func``), for ``torch.compile``: the new state
    and the inner loss at ``x``. Differentiating it (the sweep's VJP) is a Hessian-vector product."""
    theta = x[0]
    g, loss = torch.func.grad_and_value(
        lambda th: inner_loss(layout.unflatten(th), weights).reshape(()))(theta)
    return _next_state(optimizer, x, theta, g, lr, step), loss


def _graph_phase(*args: object) -> tuple[Tensor, Tensor]:
    """:func:`_phase` under autograd (reverse mode through compiled steps); a function of its
    own, so torch.compile counts its variants apart from the sweep's forward phase."""
    return _phase(*args)


def _steps(inner_loss: InnerLoss, layout: _Layout, optimizer: InnerOptimizer, x: Tensor,
           weights: Tensor, lr: Tensor, step: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``n`` consecutive :func:`_phase` steps from ``x``: the state after them and their ``n``
    inner losses."""
    losses = []
    for i in range(n):
        x, loss = _phase(inner_loss, layout, optimizer, x, weights, lr, step + i)
        losses.append(loss)
    return x, torch.stack(losses)


def _graph_steps(*args: object) -> tuple[Tensor, Tensor]:
    """:func:`_steps` under autograd (reverse mode through compiled steps, fewer and larger
    compiled calls)."""
    return _steps(*args)


def _graph_first_phase(*args: object) -> tuple[Tensor, Tensor]:
    """:func:`_graph_phase` for step 1, whose state is a constant (no gradient to it): its own
    function, so that each problem is one variant of each (torch.compile's limit is per
    function)."""
    return _phase(*args)


def _phase_vjp(inner_loss: InnerLoss, layout: _Layout, optimizer: InnerOptimizer, x: Tensor,
               weights: Tensor, lr: Tensor, step: Tensor, lam: Tensor) -> tuple[Tensor, ...]:
    """The VJP of :func:`_phase` with respect to (x, weights, lr) at cotangent ``lam``, and the
    inner loss at ``x``: the costate sweep's backward step in one function, for ``torch.compile``."""
    def phase(x, weights, lr):
        return _phase(inner_loss, layout, optimizer, x, weights, lr, step)

    _, pull, loss = torch.func.vjp(phase, x, weights, lr, has_aux=True)
    return (*pull(lam), loss)


def _last_steps_vjp(inner_loss: InnerLoss, layout: _Layout, optimizer: InnerOptimizer, x: Tensor,
                    weights: Tensor, lr: Tensor, step: Tensor, outer_loss: OuterLoss, n: int = 1,
                    wrt_x: bool = True) -> tuple[Tensor, ...]:
    """The last ``n`` steps fused with the outer loss, for ``torch.compile``: the state ``x_T``
    after ``n`` steps from ``x``, ``ℓ = outer_loss(θ_T)``, ``λ_T = ∂ℓ/∂x_T``, the VJP of the
    ``n`` steps at ``λ_T`` (with respect to x, weights and lr; ``wrt_x=False``: a constant x,
    its cotangent not computed and returned as ``None``) and their inner losses; every step is
    evaluated once (its activations kept for the VJP inside the graph)."""
    def run(x, weights, lr):
        return _steps(inner_loss, layout, optimizer, x, weights, lr, step, n)

    if wrt_x:
        new, pull, losses = torch.func.vjp(run, x, weights, lr, has_aux=True)
    else:
        new, pull, losses = torch.func.vjp(lambda w, a: run(x, w, a), weights, lr, has_aux=True)
    g, value = torch.func.grad_and_value(
        lambda theta: outer_loss(layout.unflatten(theta)).reshape(()))(new[0])
    lam = torch.cat([g.unsqueeze(0), torch.zeros_like(new[1:])])
    return (new, value, lam, *(() if wrt_x else (None,)), *pull(lam), losses)


def _terminal_vjp(*args: object) -> tuple[Tensor, ...]:
    """:func:`_last_steps_vjp` for one step: a costate sweep's last phase in one function."""
    return _last_steps_vjp(*args)


def _terminal_run_vjp(*args: object) -> tuple[Tensor, ...]:
    """:func:`_last_steps_vjp` for a run of steps (``Unrolled(compile=True)``'s last call): its
    own function, so that torch.compile counts its variants apart from the sweeps' last phase."""
    return _last_steps_vjp(*args)


def _only_step_vjp(*args: object) -> tuple[Tensor, ...]:
    """:func:`_last_steps_vjp` for ``Unrolled(compile=True)`` with one step, from the constant
    ``x_0``: no cotangent of the state (on the benchmark problem 13 matrix products per call
    instead of 18). Its own function: torch.compile counts variants per function."""
    return _last_steps_vjp(*args, 1, False)


_FUSED_LAST = (_terminal_vjp, _terminal_run_vjp, _only_step_vjp)  # steps fused with outer_loss


def _check_inner_losses(losses: Tensor, t: int) -> None:
    """The inner losses of steps ``t, t + 1, ...``: the first non-finite one names its step."""
    for i, value in enumerate(losses.tolist()):
        if not math.isfinite(value):
            raise FloatingPointError(f"inner_loss is {value} at inner step {t - 1 + i}")


def _code(fn: object) -> object:
    """The code object torch.compile traces for a loss: a function's own, a partial's
    function's, a module's ``forward``, a callable object's ``__call__`` (else its type)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    code = getattr(fn, "__code__", None)
    if code is None:
        method = getattr(type(fn), "forward" if isinstance(fn, torch.nn.Module) else "__call__", None)
        code = getattr(method, "__code__", type(fn))
    return code


_COMPILED: dict = {}
# steps per compiled call of Unrolled(compile=True) without a costate, after step 1: on the
# benchmark problem 4 is as fast as 8 for k = 20 and 200 (15-25% faster than 1 per call), with
# a graph half as long to compile, and covers k = 5 in two calls
_CHUNK = 4
_WARNED: set = set()
_UNFUSED: set = set()  # (inner_loss, outer_loss) codes torch.compile could not trace together


def _compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, made on first use (importing the compiler takes a while)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _COMPILED[fn]


def _run_compiled(fn: Callable, args: tuple, recompute: bool) -> tuple:
    """``torch.compile(fn)(*args)``; ``recompute``: a step called under autograd keeps only its
    inputs for its backward, which recomputes the rest inside its compiled graph (AOTAutograd's
    activation memory budget 0, read when a variant is compiled). On the benchmark problem this
    is as fast as keeping the activations, and memory is then the stored states, as for
    ``AdjointSweep`` (35× less than keeping the activations at k = 200)."""
    import torch._functorch.config as config  # loaded with the compiler anyway

    budget = getattr(config, "activation_memory_budget", None)  # not in every torch version
    if not recompute or budget is None:
        return _compiled(fn)(*args)
    config.activation_memory_budget = 0.0  # set and restored per call: a patch() costs 5× more
    try:
        return _compiled(fn)(*args)
    finally:
        config.activation_memory_budget = budget


def _warn_recompile_limit(fn: Callable) -> None:
    if fn not in _WARNED:
        _WARNED.add(fn)
        warnings.warn(
            f"Unrolled(compile=True): torch.compile has compiled {fn.__name__} for as many "
            "variants as it keeps (torch._dynamo.config.recompile_limit: new shapes, dtypes, "
            "optimizers, inner_loss code, captured Python numbers or sparsemax supports); new "
            "variants run eagerly from now on, exactly but without the speed-up. Pass changing "
            "numbers to inner_loss as tensors, or raise the limit.", stacklevel=2)


@dataclass(frozen=True)
class FirstOrder:
    """One-step look-ahead without second-order terms (learning to reweight).

    k detached SGD steps give θ; then θ' = θ − a ∇_θ inner_loss(θ, σ(ω)) with θ a constant,
    and the hypergradient is d ℓ^val(θ') / dω = −a J_σᵀ [⟨g_i(θ), ∇ℓ^val(θ')⟩]_i: the Hessian
    term of the adjoint recursion is dropped. The returned ``params`` are θ' (k + 1 SGD steps
    in all) and ``outer_loss`` is ℓ^val(θ').

    Cost: time k + 1 gradient evaluations plus one backward through the last one (≈ one
    Hessian-vector product); memory: the graph of a single step, independent of k. Cheapest
    strategy; biased when the lower-level curvature matters. Ren et al. 2018.
    """

    steps: int
    lr: float

    def __post_init__(self) -> None:
        _check_steps_lr(self.steps, self.lr, min_steps=0)

    @torch.enable_grad()
    def __call__(
        self,
        inner_loss: InnerLoss,
        outer_loss: OuterLoss,
        params: Mapping[str, Tensor],
        omega: Tensor,
        normalizer: str | normalizers.Normalizer = normalizers.softmax,
    ) -> HypergradResult:
        theta, omega, weights = _prepare(params, omega, normalizer)
        theta, state = _descend(inner_loss, theta, weights.detach(), self.steps, self.lr)
        if isinstance(inner_loss, WeightedSum):
            return inner_loss.look_ahead(outer_loss, _leaves(theta), omega, weights, self.lr,
                                         f"at inner step {self.steps}")
        theta, _ = inner_step(inner_loss, _leaves(theta), state, weights, self.lr,
                              create_graph=True, check_weights=True)
        outer = _check_outer(_scalar(outer_loss(theta), "outer_loss", "after the look-ahead step"))
        (hypergrad,) = _to_omega([outer], [omega])
        return _result(theta, hypergrad, weights, outer)


@dataclass(frozen=True)
class Implicit:
    """Implicit function theorem at the lower-level optimum.

    k detached SGD steps give θ* (or pass a trained θ* with ``steps=0``). With
    H = ∇²_θ inner_loss(θ*, σ(ω)) + δI (δ = ``damping``), v solves H v = ∇ℓ^val(θ*), and the
    hypergradient is −∂_ω ⟨∇_θ inner_loss(θ*, σ(ω)), v⟩ = −J_σᵀ [⟨g_i(θ*), v⟩]_i.
    ``solver="cg"``: conjugate gradients, at most ``iters`` Hessian-vector products, stopping
    at relative residual ``tol`` (needs H positive definite along the iterates).
    ``solver="neumann"``: v = a Σ_{j<m} (I − aH)^j ∇ℓ^val with m = ``iters`` and a = ``lr``
    (converges when 0 < a < 2/λ_max(H) and H is positive definite).

    Cost: time k gradient evaluations + ``iters`` Hessian-vector products (double backward)
    + one mixed backward; memory: the graph of one gradient evaluation, independent of k and
    ``iters``. Exact when θ* is a stationary point and the solve has converged (see
    ``HypergradResult.residual``). Pedregosa 2016; Rajeswaran et al. 2019; Lorraine et al. 2020.
    """

    steps: int
    lr: float
    solver: Literal["cg", "neumann"] = "cg"
    iters: int = 20
    damping: float = 0.0
    tol: float = 1e-10

    def __post_init__(self) -> None:
        _check_steps_lr(self.steps, self.lr, min_steps=0)
        if self.solver not in ("cg", "neumann"):
            raise ValueError(f"solver must be 'cg' or 'neumann', got {self.solver!r}")
        if not (isinstance(self.iters, int) and not isinstance(self.iters, bool) and self.iters >= 1):
            raise ValueError(f"iters must be an integer >= 1, got {self.iters!r}")
        if not (math.isfinite(self.damping) and self.damping >= 0):
            raise ValueError(f"damping must be a finite number >= 0, got {self.damping}")
        if not (math.isfinite(self.tol) and self.tol >= 0):
            raise ValueError(f"tol must be a finite number >= 0, got {self.tol}")

    @torch.enable_grad()
    def __call__(
        self,
        inner_loss: InnerLoss,
        outer_loss: OuterLoss,
        params: Mapping[str, Tensor],
        omega: Tensor,
        normalizer: str | normalizers.Normalizer = normalizers.softmax,
    ) -> HypergradResult:
        theta, omega, weights = _prepare(params, omega, normalizer)
        theta, _ = _descend(inner_loss, theta, weights.detach(), self.steps, self.lr)
        theta = _leaves(theta)
        xs = list(theta.values())
        where = f"at θ* (after {self.steps} inner steps)"
        grads = list(_gradient(inner_loss, theta, weights, True, where, check=True).values())
        outer = _check_outer(_scalar(outer_loss(theta), "outer_loss", where))
        b = _or_zeros(_grad([outer], xs), xs)

        def hvp(u: list[Tensor]) -> list[Tensor]:
            hu = _or_zeros(_grad(grads, xs, u, retain_graph=True), xs)
            return [h + self.damping * ui for h, ui in zip(hu, u)]

        if self.solver == "cg":
            v, residual = _cg(hvp, b, self.iters, self.tol)
        else:
            v, residual = _neumann(hvp, b, self.iters, self.lr)
        (mixed,) = _to_omega(grads, [omega], v)
        return _result(theta, -mixed, weights, outer, residual)


# --- helpers -------------------------------------------------------------------------------


def _check_steps_lr(steps: int, lr: float, min_steps: int) -> None:
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= min_steps):
        raise ValueError(f"steps must be an integer >= {min_steps}, got {steps!r}")
    check_rate("lr", lr)


def check_rate(name: str, value: object) -> None:
    """A step size or learning rate: a finite number > 0 (ValueError naming ``name``)."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _prepare(
    params: Mapping[str, Tensor], omega: Tensor, normalizer: str | normalizers.Normalizer
) -> tuple[Params, Tensor, Tensor]:
    """Validate the inputs; return θ and ω as fresh leaves, and w = σ(ω)."""
    if not isinstance(params, Mapping) or not params:
        raise ValueError(f"params must be a non-empty dict name -> tensor, got {type(params).__name__}")
    for k, v in params.items():
        if not (isinstance(k, str) and isinstance(v, Tensor) and v.is_floating_point()):
            raise ValueError(
                f"params[{k!r}] must be a real floating tensor under a str name, got {_describe(v)}"
            )
    if not (isinstance(omega, Tensor) and omega.is_floating_point()):
        raise ValueError(f"omega must be a real floating tensor, got {_describe(omega)}")
    if any(v.device != omega.device for v in params.values()):
        where = ", ".join(f"{k}: {v.device}" for k, v in params.items())
        raise ValueError(f"params and omega must be on one device, got omega: {omega.device}, {where}")
    omega = omega.detach().requires_grad_()
    weights = normalizers.get(normalizer)(omega)
    if not (isinstance(weights, Tensor) and weights.requires_grad):
        raise ValueError("the normalizer's output does not depend differentiably on omega")
    return _leaves(params), omega, weights


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of dtype {x.dtype} and shape {tuple(x.shape)}"
    return type(x).__name__


def _leaves(params: Mapping[str, Tensor]) -> Params:
    return {k: v.detach().requires_grad_() for k, v in params.items()}


def _scalar(value: object, name: str, where: str) -> Tensor:
    """Check that a loss is a finite real one-element tensor."""
    if not (isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point()):
        raise ValueError(f"{name} must return a real one-element tensor, got {_describe(value)}")
    number = value.item()  # one sync, like bool(isfinite(...)), without two extra kernels
    if not math.isfinite(number):
        raise FloatingPointError(f"{name} is {number} {where}")
    return value.reshape(())


def _grad(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    cotangents: Sequence[Tensor] | None = None,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> list[Tensor | None]:
    """Σ_j cotangent_jᵀ ∂output_j/∂input for each input; None where no graph path exists."""
    cotangents = [None] * len(outputs) if cotangents is None else cotangents
    keep = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    if not keep:
        return [None] * len(inputs)
    return list(torch.autograd.grad(
        [o for o, _ in keep], list(inputs), [c for _, c in keep],
        create_graph=create_graph, retain_graph=retain_graph, allow_unused=True,
    ))


def _or_zeros(grads: list[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like)]


def _gradient(
    inner_loss: InnerLoss, params: Params, weights: Tensor, create_graph: bool, where: str, check: bool
) -> Params:
    """∇_θ inner_loss(θ, w); with ``check``, also that the graph of the loss reaches w."""
    loss = _scalar(inner_loss(params, weights), "inner_loss", where)
    xs = list(params.values())
    grads = _grad([loss], xs + [weights] if check else xs, create_graph=create_graph)
    if check and grads[-1] is None:
        raise _unreached()
    return dict(zip(params, _or_zeros(grads[: len(xs)], xs)))


def _check_reaches_weights(inner_loss: InnerLoss, params: Params, weights: Tensor) -> None:
    """``_gradient``'s check alone: θ held constant, so the backward pass runs only along the
    paths from the weights (a forward pass and a few operations, not a gradient evaluation)."""
    consts = {k: v.detach() for k, v in params.items()}
    loss = _scalar(inner_loss(consts, weights), "inner_loss", "at inner step 0")
    if _grad([loss], [weights])[0] is None:
        raise _unreached()


# the value of outer_loss, if it has an autograd graph (else ValueError)
_check_outer = functools.partial(_differentiable, message=(
    "outer_loss does not depend on the inner parameters (its autograd graph does not reach them, "
    "or it was computed under torch.no_grad() or detached), so the hypergradient would silently "
    "be zero"))


def _to_omega(outputs: Sequence[Tensor], inputs: Sequence[Tensor],
              cotangents: Sequence[Tensor] | None = None) -> list[Tensor]:
    """:func:`_grad` for ``inputs = [omega, *others]`` (zeros for an unreached other); a
    ValueError if no autograd path reaches ω, where the hypergradient would silently be 0."""
    grads = _grad(outputs, inputs, cotangents)
    if grads[0] is None:
        raise ValueError(
            "the hypergradient has no autograd path to omega: the inner gradient ∇_θ inner_loss "
            "does not depend differentiably on the weights (they enter only terms without params, "
            "or an operation in inner_loss can be differentiated only once, e.g. one marked "
            "@once_differentiable, or params are detached inside it). A WeightedSum inner loss with "
            "FirstOrder, or Unrolled(steps=1) with SGD or momentum, needs first derivatives only; "
            "the hypergradient would silently be zero.")
    return _or_zeros(grads, inputs)


def _unreached() -> ValueError:
    return ValueError(
        "omega does not influence inner_loss: the autograd graph of inner_loss(params, weights) does not "
        "reach its `weights` argument. Use the weights passed in (weights captured from an enclosing "
        "scope or detached get no gradient); the hypergradient would silently be zero."
    )


def _descend(
    inner_loss: InnerLoss, params: Params, weights: Tensor, steps: int, lr: float
) -> tuple[Params, OptState]:
    """``steps`` SGD steps with no graph kept between them (``weights`` detached)."""
    sgd = InnerOptimizer()
    state = sgd.init(params)
    for _ in range(steps):
        params, state = inner_step(inner_loss, _leaves(params), state, weights, lr, sgd)
    return {k: v.detach() for k, v in params.items()}, state


def _sqrt(v: Tensor) -> Tensor:
    """√v with derivative 0 (instead of ∞) where v = 0."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, 1).sqrt(), 0)


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _cg(
    hvp: Callable[[list[Tensor]], list[Tensor]], b: list[Tensor], iters: int, tol: float
) -> tuple[list[Tensor], float]:
    """Conjugate gradients for H v = b from v = 0; returns v and ‖b − Hv‖/‖b‖ (recursive)."""
    v = [torch.zeros_like(x) for x in b]
    r, p = list(b), list(b)
    rr = _dot(r, r)
    norm_b = float(rr) ** 0.5
    for _ in range(iters):
        if float(rr) ** 0.5 <= tol * norm_b:
            break
        hp = hvp(p)
        curvature = _dot(p, hp)
        if not float(curvature) > 0:
            raise NegativeCurvatureError(
                f"CG met non-positive curvature pᵀHp = {float(curvature):.3g}: the inner Hessian is not "
                "positive definite at θ*; add damping, run more inner steps, or use solver='neumann'"
            )
        alpha = rr / curvature
        v = [x + alpha * y for x, y in zip(v, p)]
        r = [x - alpha * y for x, y in zip(r, hp)]
        rr, rr_old = _dot(r, r), rr
        p = [x + (rr / rr_old) * y for x, y in zip(r, p)]
    return v, (float(rr) ** 0.5 / norm_b if norm_b > 0 else 0.0)


def _neumann(
    hvp: Callable[[list[Tensor]], list[Tensor]], b: list[Tensor], iters: int, lr: float
) -> tuple[list[Tensor], float]:
    """v = a Σ_{j<m} (I − aH)^j b; the last term (I − aH)^m b is the residual b − Hv."""
    v = [torch.zeros_like(x) for x in b]
    p = list(b)
    norm_b = float(_dot(b, b)) ** 0.5
    for _ in range(iters):
        v = [x + lr * y for x, y in zip(v, p)]
        p = [x - lr * y for x, y in zip(p, hvp(p))]
    return v, (float(_dot(p, p)) ** 0.5 / norm_b if norm_b > 0 else 0.0)


def _result(
    params: Params, hypergrad: Tensor, weights: Tensor, outer: Tensor, residual: float | None = None,
    lr_grad: float | None = None,
) -> HypergradResult:
    if not normalizers.all_finite(hypergrad):
        raise FloatingPointError("the hypergradient is not finite")
    return HypergradResult(
        params={k: v.detach() for k, v in params.items()},
        hypergrad=hypergrad.detach(),
        weights=weights.detach(),
        outer_loss=float(outer.detach()),
        residual=residual,
        lr_grad=lr_grad,
    )
