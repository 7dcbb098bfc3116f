"""Checks a user runs on their own :class:`~bilevelkit.Dynamics` subclass.

``check_dynamics(dynamics, ctx, loss)`` re-runs the problem in float64 with every costate
solver and compares against plain autograd, checks Theorem 1 through the Lagrangian, and the
KKT residuals; it raises ``AssertionError`` with a per-parameter report when anything
disagrees.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .costate import AdjointSweep, AutogradCostate, CheckpointedSweep, CostateResult
from .dynamics import Dynamics, check_horizon
from .lagrangian import Lagrangian

__all__ = ["check_dynamics", "to_float64", "relative_error"]


def to_float64(obj: Any) -> Any:
    """Promote tensors (real → float64, complex → complex128) in nested containers/modules."""
    if isinstance(obj, torch.nn.Module):
        return obj._apply(to_float64)
    if isinstance(obj, Tensor):
        if obj.is_complex():
            return obj.to(torch.complex128)
        return obj.to(torch.float64) if obj.is_floating_point() else obj
    if isinstance(obj, dict):  # a copy keeps the subclass (OrderedDict, defaultdict's factory)
        out = copy.copy(obj)
        for k, v in obj.items():
            out[k] = to_float64(v)
        return out
    if isinstance(obj, (list, tuple)):
        items = [to_float64(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_float64(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def relative_error(a: Tensor, b: Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` (``‖a − b‖`` when ``b = 0``)."""
    diff = float(torch.linalg.vector_norm(a - b))
    ref = float(torch.linalg.vector_norm(b))
    return diff / ref if ref > 0 else diff


def check_dynamics(
    dynamics: Dynamics,
    ctx: Any,
    loss: Callable[[Tensor], Tensor],
    *,
    solvers: Sequence[Any] | None = None,
    rtol: float = 1e-8,
) -> dict[str, Any]:
    """Check every costate solver against autograd (loss, final state, gradients and
    multipliers), Theorem 1 and the KKT conditions.

    Works on a float64 copy of ``dynamics`` and ``ctx`` (tensors and modules in nested dicts,
    lists, tuples and dataclasses are promoted; the caller's objects are untouched). ``solvers``
    defaults to ``AdjointSweep`` and ``CheckpointedSweep`` with 1, ~√T and T+1 checkpoints.
    Passes when every relative error is at most ``rtol``; returns the report as a dict.
    """
    T = check_horizon(dynamics)
    if not (isinstance(rtol, numbers.Real) and not isinstance(rtol, bool) and math.isfinite(rtol)
            and rtol > 0):
        raise ValueError(f"check_dynamics: rtol must be a finite number > 0, got {rtol!r}")
    if solvers is not None:
        solvers = list(solvers)
        bad = [s for s in solvers if isinstance(s, type) or not callable(getattr(s, "solve", None))]
        if not solvers or bad:
            raise ValueError("check_dynamics: solvers must list solver instances such as "
                             "bk.AdjointSweep(keep=True), got " + (repr(bad[0]) if bad else "none"))
    dyn = to_float64(copy.deepcopy(dynamics))
    ctx64 = to_float64(copy.deepcopy(ctx))  # modules in ctx are converted in place
    if solvers is None:
        ks = sorted({1, max(1, math.isqrt(T + 1)), T + 1})
        solvers = [AdjointSweep(keep=True), *(CheckpointedSweep(k, keep=True) for k in ks)]
    try:
        ref = AutogradCostate(keep=True).solve(dyn, ctx64, loss)
    except RuntimeError as err:
        if not any(w in str(err) for w in ("dtype", "scalar type", "Double", "Float")):
            raise
        raise ValueError(
            "check_dynamics works on a float64 copy of the dynamics and ctx; a tensor the "
            "dynamics or the loss captured from outside them (a target or operator in the loss "
            "closure, say) keeps its dtype: pass it in float64 or through ctx. torch said: "
            + str(err).split("\n")[0]) from None
    rows: list[tuple[str, str, float]] = []

    def compare(label: str, result: CostateResult) -> None:
        rows.append((label, "loss ℓ(x_T)", relative_error(result.loss, ref.loss)))
        rows.append((label, "final state x_T", relative_error(result.output, ref.output)))
        for name, g in ref.grads.items():
            rows.append((label, f"grad {name}", relative_error(result.grads[name], g)))
        if result.multipliers is not None:
            err = max(relative_error(a, b) for a, b in zip(result.multipliers, ref.multipliers))
            rows.append((label, "multipliers λ_0..λ_T", err))

    for solver in solvers:
        compare(repr(solver), solver.solve(dyn, ctx64, loss))

    lag = Lagrangian(dyn, loss)
    params = {n: p for n, p in dyn.named_parameters() if p.requires_grad}
    with torch.enable_grad():
        value = lag.value(ctx64, ref.states, ref.multipliers)
        grads = torch.autograd.grad(value, list(params.values()), allow_unused=True) if params else ()
    scale = max(1.0, abs(float(ref.loss)))
    rows.append(("Lagrangian", "L − ℓ on feasible states", abs(float(value.detach()) - float(ref.loss)) / scale))
    for (name, p), g in zip(params.items(), grads):
        rows.append(("Theorem 1", f"∇_θ L vs ∇_θ ℓ: {name}",
                     relative_error(torch.zeros_like(p) if g is None else g, ref.grads[name])))
    lam_scale = max(1.0, max(float(torch.linalg.vector_norm(m)) for m in ref.multipliers))
    x_scale = max(1.0, max(float(torch.linalg.vector_norm(x)) for x in ref.states))
    kkt = lag.kkt_residuals(ctx64, ref.states, ref.multipliers)
    rows.append(("KKT", "state residual", kkt["state"] / x_scale))
    rows.append(("KKT", "costate residual", kkt["costate"] / lam_scale))
    rows.append(("KKT", "terminal residual", kkt["terminal"] / lam_scale))

    bad = [r for r in rows if not r[2] <= rtol]
    if bad:
        width = max(len(r[0]) for r in rows)
        lines = [f"{'check'.ljust(width)}  {'quantity':40s}  rel. error  status"]
        lines += [f"{c.ljust(width)}  {q:40s}  {e:10.3e}  {'ok' if e <= rtol else 'FAIL'}"
                  for c, q, e in rows]
        raise AssertionError(
            f"check_dynamics({type(dynamics).__name__}): {len(bad)} of {len(rows)} checks "
            f"exceed rtol={rtol:g}\n" + "\n".join(lines)
        )
    return {"rows": rows, "kkt": kkt, "loss": float(ref.loss)}
