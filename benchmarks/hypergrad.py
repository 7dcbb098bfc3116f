"""Hypergradients: time, peak memory and accuracy of one meta-step on a reweighting problem.

The problem (docs/benchmarks.md, "Hypergradients"): a 20→64→1 tanh MLP ``f_θ`` (P = 1409 parameters) fits a regression
``y = tanh(aᵀx) + ½ sin(2 x₁) + 0.1 ε`` given as ``N = 10`` groups of ``n`` samples; groups
1, 4 and 7 are corrupted (their labels are negated). With weights ``σ = softmax(ω)``

    inner(θ, σ) = Σ_i σ_i mean_j (f_θ(x_ij) − y_ij)² + (δ/2)‖θ‖²   (δ = 0.05)
    outer(θ)    = mean over 200 clean validation samples of (f_θ(x) − y)²

and one meta-step is the hypergradient ``d outer(θ^k(ω)) / dω`` after ``k`` full-batch SGD
steps of size ``a = 0.2`` from a warm start ``θ⁰`` (the exact lower-level optimum for uniform
weights, as when θ carries over between meta-steps) at fixed, non-uniform scores
``ω ~ 0.5 N(0, I)``. Strategies:

    unrolled       bk.hypergrad.Unrolled(k, a)                   autograd through the k steps
    unrolled-c     Unrolled(k, a, compile=True)                  autograd through k compiled steps
    adjoint        Unrolled(k, a, costate=bk.AdjointSweep())      costate sweep, k stored iterates
    ckpt8          Unrolled(k, a, costate=bk.CheckpointedSweep(8))
    ckpt-sqrt      Unrolled(k, a, costate=bk.CheckpointedSweep(⌈√k⌉ + 1))
    firstorder     bk.hypergrad.FirstOrder(k, a)                 k detached steps + one look-ahead
    implicit       bk.hypergrad.Implicit(k, a, "cg", iters=50)   k detached steps + CG (IFT)
    implicit-neu   Implicit(k, a, "neumann", iters=50)           the same with a Neumann series
    higher         higher.innerloop_ctx(model, torch.optim.SGD, copy_initial_weights=False,
                   track_higher_grads=True), differentiable SGD through the k steps
    torchopt       functional torchopt.sgd: grad(create_graph) → update → apply_updates
    torchopt-meta  torchopt.MetaSGD on the module

The peers compute the same unrolled hypergradient; the script checks (float64) that they and
the costate sweeps agree with ``unrolled`` to 1e-6 relative, so equal work is timed.
``implicit`` raises where CG meets negative curvature (the inner Hessian at θ^k is indefinite
for small k on this non-convex problem): such rows are reported as failed, and
``implicit-neu`` shows the same strategy with a solver that does not stop there.

* Reference ("converged implicit answer"), float64, its own process. θ⁰: 1000 SGD steps at
  uniform weights from the seeded initialisation, L-BFGS to ‖∇‖ ≤ 1e-9, then saddle-free
  Newton (dense Hessian, d = −|H|⁻¹∇) to ‖∇θ inner‖ ≤ 1e-10 with a positive definite Hessian.
  θ*: 2000 SGD steps at σ(ω) from θ⁰, then the same polish. h_ref =
  ``Implicit(steps=0, solver="cg", tol=1e-12)`` at θ*, cross-checked with a dense solve, and
  ``Unrolled(k=1000)`` from θ⁰ is reported against it (it must approach it as k grows).
  ``rel err (ref)`` = ‖h − h_ref‖ / ‖h_ref‖ is the bias of a strategy at this k, not rounding.
* Time: one fresh process per k runs every strategy once (warm-up, float64 accuracy check),
  then ``--repeats`` interleaved rounds of all strategies, in ``--dtype``; a measurement
  repeats calls shorter than 50 ms. The table shows the median time per meta-step and the
  median over rounds of the ratio to ``unrolled`` measured in the same round.
* Peak memory: each (k, strategy) in its own fresh process (forked from a server that has only
  imported torch, bilevelkit and the peers): a warm-up call on a tiny problem, then the growth
  of the resident high-water mark during one meta-step (``_memory.PeakMemory``: ``ru_maxrss``
  after resetting it to the current RSS), median of ``--mem-repeats`` processes; ``×k=1`` is
  the growth relative to the same strategy at k = 1.
* ``--profile``: where a costate sweep's time goes at the largest k (per-phase costs of the
  library's sweep and of a hand-written one, phase-evaluation counts of each checkpoint
  budget), and
  the costate sweeps' RSS growth against the C heap in use (glibc ``mallinfo2``), which counts
  the live tensors without the allocator's fragmentation.

``torch.set_num_threads(1)`` in every process. Run (from the repository root)::

    python benchmarks/hypergrad.py --profile   # full: k = 1, 5, 20, 50, 200, about 7 minutes
    python benchmarks/hypergrad.py --quick     # smoke test, about a minute on 2 cores

Writes ``benchmarks/results/hypergrad.json`` (``--out``) and prints a table and the targets'
verdicts (docs/benchmarks.md, "Hypergradients").
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bilevelkit as bk
from bilevelkit.hypergrad import FirstOrder, Implicit, InnerLoop, InnerOptimizer, Unrolled, inner_step
from bilevelkit.testing import relative_error

try:  # python -m benchmarks.hypergrad
    from ._memory import PeakMemory, load_average
except ImportError:  # python benchmarks/hypergrad.py
    from _memory import PeakMemory, load_average

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "hypergrad.json"
PEERS = {"higher": "higher", "torchopt": "torchopt", "torchopt-meta": "torchopt"}
NAMES = ("0.weight", "0.bias", "2.weight", "2.bias")  # nn.Sequential(Linear, Tanh, Linear)
CORRUPTED = (1, 4, 7)


# --------------------------------------------------------------------------- the problem
def make_problem(cfg: dict, dtype: torch.dtype, theta0: dict | None = None,
                 n: int | None = None) -> dict:
    """Data, losses and starting point, deterministic given ``cfg["seed"]``.

    ``theta0``: the warm start (else the seeded ``nn.Linear`` initialisation); ``n``: samples
    per group (default ``cfg["n"]``; the memory warm-up uses a tiny one).
    """
    n = cfg["n"] if n is None else n
    D, N = cfg["dim"], cfg["groups"]
    g = torch.Generator().manual_seed(cfg["seed"])
    a = torch.randn(D, generator=g, dtype=torch.float64) / math.sqrt(D)

    def target(x: Tensor) -> Tensor:
        return torch.tanh(x @ a) + 0.5 * torch.sin(2 * x[..., 0])

    X = torch.randn(N, n, D, generator=g, dtype=torch.float64)
    Y = target(X) + 0.1 * torch.randn(N, n, generator=g, dtype=torch.float64)
    Y[list(CORRUPTED)] *= -1
    Xv = torch.randn(cfg["val"], D, generator=g, dtype=torch.float64)
    Yv = target(Xv)
    omega = 0.5 * torch.randn(N, generator=g, dtype=torch.float64)
    if theta0 is None:
        torch.manual_seed(cfg["seed"])
        theta0 = dict(zip(NAMES, (p.detach() for p in new_module(cfg, torch.float64).parameters())))
    X, Y, Xv, Yv, omega = (t.to(dtype) for t in (X, Y, Xv, Yv, omega))
    theta0 = {k: torch.as_tensor(v, dtype=torch.float64).to(dtype).clone() for k, v in theta0.items()}
    wd = cfg["wd"]

    def inner(params: dict, weights: Tensor) -> Tensor:
        per_group = ((mlp(params, X) - Y) ** 2).mean(1)
        return (weights * per_group).sum() + 0.5 * wd * sum((p * p).sum() for p in params.values())

    def outer(params: dict) -> Tensor:
        return ((mlp(params, Xv) - Yv) ** 2).mean()

    def inner_module(model: nn.Module, weights: Tensor) -> Tensor:  # the peers' way
        per_group = ((model(X).squeeze(-1) - Y) ** 2).mean(1)
        return (weights * per_group).sum() + 0.5 * wd * sum((p * p).sum() for p in model.parameters())

    def outer_module(model: nn.Module) -> Tensor:
        return ((model(Xv).squeeze(-1) - Yv) ** 2).mean()

    return {"inner": inner, "outer": outer, "inner_module": inner_module,
            "outer_module": outer_module, "theta0": theta0, "omega": omega, "cfg": cfg,
            "dtype": dtype}


def mlp(params: dict, x: Tensor) -> Tensor:
    h = torch.tanh(F.linear(x, params["0.weight"], params["0.bias"]))
    return F.linear(h, params["2.weight"], params["2.bias"]).squeeze(-1)


def new_module(cfg: dict, dtype: torch.dtype) -> nn.Module:
    return nn.Sequential(nn.Linear(cfg["dim"], cfg["hidden"]), nn.Tanh(),
                         nn.Linear(cfg["hidden"], 1)).to(dtype)


def n_params(cfg: dict) -> int:
    return cfg["hidden"] * (cfg["dim"] + 2) + 1


# --------------------------------------------------------------------------- the strategies
def checkpoints_sqrt(k: int) -> int:
    return math.ceil(math.sqrt(k)) + 1


def strategies(available: set[str]) -> list[str]:
    names = ["unrolled", "adjoint", "ckpt8", "ckpt-sqrt", *COMPILED, "firstorder", "implicit",
             "implicit-neu"]
    return names + [p for p in PEERS if PEERS[p] in available]


COMPILED = ["unrolled-c", "adjoint-c", "ckpt8-c", "ckpt-sqrt-c"]  # the same with compile=True


def checkpoints_of(name: str, k: int) -> int | None:
    name = name.removesuffix("-c")
    return 8 if name == "ckpt8" else checkpoints_sqrt(k) if name == "ckpt-sqrt" else None


def hypergradient(name: str, prob: dict, k: int) -> Tensor:
    """One meta-step: ``d outer(θ^k(ω)) / dω`` by strategy ``name``."""
    cfg, lr = prob["cfg"], prob["cfg"]["lr"]
    args = (prob["inner"], prob["outer"], prob["theta0"], prob["omega"])
    if name == "unrolled":
        return Unrolled(k, lr)(*args).hypergrad
    compiled, base = name in COMPILED, name.removesuffix("-c")
    if name == "unrolled-c":  # autograd through compiled steps
        return Unrolled(k, lr, compile=True)(*args).hypergrad
    if base == "adjoint":
        return Unrolled(k, lr, costate=bk.AdjointSweep(), compile=compiled)(*args).hypergrad
    if base in ("ckpt8", "ckpt-sqrt"):
        costate = bk.CheckpointedSweep(checkpoints_of(name, k))
        return Unrolled(k, lr, costate=costate, compile=compiled)(*args).hypergrad
    if name == "firstorder":
        return FirstOrder(k, lr)(*args).hypergrad
    if name == "implicit":
        return Implicit(k, lr, solver="cg", iters=cfg["cg_iters"], tol=1e-10)(*args).hypergrad
    if name == "implicit-neu":
        return Implicit(k, lr, solver="neumann", iters=cfg["cg_iters"])(*args).hypergrad
    if name == "higher":
        return _higher(prob, k)
    if name == "torchopt":
        return _torchopt(prob, k)
    if name == "torchopt-meta":
        return _torchopt_meta(prob, k)
    raise ValueError(f"unknown strategy {name!r}")


def _module_at_theta0(prob: dict) -> nn.Module:
    model = new_module(prob["cfg"], prob["dtype"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(prob["theta0"][name])
    return model


def _higher(prob: dict, k: int) -> Tensor:
    import higher

    omega = prob["omega"].detach().requires_grad_()
    weights = torch.softmax(omega, 0)
    model = _module_at_theta0(prob)
    opt = torch.optim.SGD(model.parameters(), lr=prob["cfg"]["lr"])
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False,
                              track_higher_grads=True) as (fmodel, diffopt):
        for _ in range(k):
            diffopt.step(prob["inner_module"](fmodel, weights))
        outer = prob["outer_module"](fmodel)
        (g,) = torch.autograd.grad(outer, omega)
    return g


def _torchopt(prob: dict, k: int) -> Tensor:
    import torchopt

    omega = prob["omega"].detach().requires_grad_()
    weights = torch.softmax(omega, 0)
    params = tuple(prob["theta0"][n].detach().requires_grad_() for n in NAMES)
    opt = torchopt.sgd(prob["cfg"]["lr"])
    state = opt.init(params)
    for _ in range(k):
        loss = prob["inner"](dict(zip(NAMES, params)), weights)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        updates, state = opt.update(grads, state, inplace=False)
        params = torchopt.apply_updates(params, updates, inplace=False)
    (g,) = torch.autograd.grad(prob["outer"](dict(zip(NAMES, params))), omega)
    return g


def _torchopt_meta(prob: dict, k: int) -> Tensor:
    import torchopt

    omega = prob["omega"].detach().requires_grad_()
    weights = torch.softmax(omega, 0)
    model = _module_at_theta0(prob)
    opt = torchopt.MetaSGD(model, lr=prob["cfg"]["lr"])
    for _ in range(k):
        opt.step(prob["inner_module"](model, weights))
    (g,) = torch.autograd.grad(prob["outer_module"](model), omega)
    return g


# --------------------------------------------------------------------------- the reference
def _flat(params: dict) -> Tensor:
    return torch.cat([params[n].reshape(-1) for n in NAMES])


def _unflat(theta: Tensor, like: dict) -> dict:
    sizes = [like[n].numel() for n in NAMES]
    return {n: v.view(like[n].shape) for n, v in zip(NAMES, torch.split(theta, sizes))}


def _minimize(prob: dict, theta: Tensor, weights: Tensor, gd_steps: int, newton_iters: int,
              tol: float = 1e-10) -> tuple[Tensor, dict, Tensor]:
    """A strict local minimum of ``inner(·, weights)`` near where SGD from ``theta`` goes.

    ``gd_steps`` SGD steps of size ``lr``, then L-BFGS (strong Wolfe) to ‖∇‖ ≤ 1e-9, then
    saddle-free Newton (d = −|H|⁻¹∇ from a dense eigendecomposition, backtracking until the loss
    or ‖∇‖ decreases; at a saddle a step along the eigenvector of λ_min) until ‖∇‖ ≤ ``tol``
    with H positive definite.
    Returns θ, a report and the last Hessian.
    """
    loss = lambda t: prob["inner"](_unflat(t, prob["theta0"]), weights)  # noqa: E731
    grad, hess = torch.func.grad(loss), torch.func.jacrev(torch.func.jacrev(loss))
    for _ in range(gd_steps):
        theta = theta - prob["cfg"]["lr"] * grad(theta)
    x = theta.clone().requires_grad_()
    lbfgs = torch.optim.LBFGS([x], lr=1, max_iter=5000, tolerance_grad=1e-9, tolerance_change=0,
                              history_size=100, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        lbfgs.zero_grad()
        value = loss(x)
        value.backward()
        return value

    lbfgs.step(closure)
    theta, escapes = x.detach(), 0
    for it in range(newton_iters + 1):
        g, H = grad(theta), hess(theta)
        evals, evecs = torch.linalg.eigh(H)
        small = float(g.norm()) <= tol
        if (small and evals[0] > 0) or it == newton_iters:
            break
        if small:  # a saddle point: leave it along the direction of negative curvature
            d, escapes = evecs[:, 0], escapes + 1
        else:
            d = -(evecs @ ((evecs.T @ g) / evals.abs().clamp_min(1e-10)))
        value, norm, step = float(loss(theta)), float(g.norm()), 1.0
        while step > 1e-12:  # near the minimum the loss stalls in rounding: ‖∇‖ decides too
            trial = theta + step * d
            if float(loss(trial)) < value or (not small and float(grad(trial).norm()) < norm):
                break
            step /= 2
        theta = trial
    return theta, {"gd_steps": gd_steps, "lbfgs_iters": lbfgs.state[x]["n_iter"],
                   "newton_iters": it, "saddle_escapes": escapes, "grad_norm": float(g.norm()),
                   "hess_min_eig": float(evals[0]), "hess_max_eig": float(evals[-1]),
                   "strict_min": bool(float(g.norm()) <= tol and evals[0] > 0)}, H


def reference_worker(cfg: dict) -> dict:
    """Fresh process, float64: warm start θ⁰ and the converged implicit hypergradient."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    prob = make_problem(cfg, torch.float64)
    N = cfg["groups"]
    uniform = torch.full((N,), 1 / N, dtype=torch.float64)
    theta0, warm, _ = _minimize(prob, _flat(prob["theta0"]), uniform, cfg["pre_steps"],
                                cfg["newton_iters"])
    prob = make_problem(cfg, torch.float64, _unflat(theta0, prob["theta0"]))
    weights = torch.softmax(prob["omega"], 0)
    theta_star, star, hess = _minimize(prob, theta0, weights, cfg["ref_steps"], cfg["newton_iters"])
    converged = warm["strict_min"] and star["strict_min"]
    if cfg["strict"] and not converged:
        raise RuntimeError(f"no strict local minimum found: warm start {warm}, θ* {star}")
    params_star = _unflat(theta_star, prob["theta0"])
    # dense solve H v = ∇outer, h = −∂_ω ⟨∇θ inner, v⟩: the cross-check of CG
    loss = lambda t, w: prob["inner"](_unflat(t, prob["theta0"]), w)  # noqa: E731
    outer_grad = torch.func.grad(lambda t: prob["outer"](_unflat(t, prob["theta0"])))(theta_star)
    v = torch.linalg.solve(hess, outer_grad)
    mixed = lambda om: torch.func.grad(loss)(theta_star, torch.softmax(om, 0)) @ v  # noqa: E731
    dense = -torch.func.grad(mixed)(prob["omega"])
    try:
        res = Implicit(0, cfg["lr"], solver="cg", iters=20 * theta0.numel(), tol=1e-12)(
            prob["inner"], prob["outer"], params_star, prob["omega"])
        hypergrad, residual = res.hypergrad, res.residual
    except ValueError:  # non-positive curvature: only when not converged (--quick)
        hypergrad, residual = dense, None
    check = {}
    for steps in cfg["check_steps"]:  # the unrolled answer approaches it as k grows
        h = Unrolled(steps, cfg["lr"], costate=bk.AdjointSweep())(
            prob["inner"], prob["outer"], prob["theta0"], prob["omega"]).hypergrad
        check[str(steps)] = relative_error(h, hypergrad)
    return {
        # plain lists: tensors returned through a Pool travel by shared memory, which can hang
        "theta0": {k: v.tolist() for k, v in prob["theta0"].items()},
        "hypergrad": hypergrad.tolist(),
        "info": {
            "converged": converged,
            "warm_start": warm,
            "theta_star": {**star, "condition_number": star["hess_max_eig"] / star["hess_min_eig"],
                           "distance_from_theta0": float((theta_star - theta0).norm())},
            "cg": {"iters_max": 20 * theta0.numel(), "tol": 1e-12, "residual": residual,
                   "rel_diff_dense_solve": relative_error(hypergrad, dense)},
            "unrolled_adjoint_rel_err": check,
            "outer_loss_theta0": float(prob["outer"](prob["theta0"])),
            "outer_loss_theta_star": float(prob["outer"](params_star)),
            "weights": torch.softmax(prob["omega"], 0).tolist(),
            "hypergrad": hypergrad.tolist(),
            "seconds": time.perf_counter() - t0,
        },
    }


# --------------------------------------------------------------------------- workers
def _failure(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).split(':')[0]}"


def time_worker(k: int, cfg: dict, ref: dict, names: list[str]) -> dict:
    """Fresh process: float64 accuracy check, then ``repeats`` timing rounds of all strategies.

    A strategy that raises (Implicit's CG on an indefinite Hessian) is recorded in ``failed``
    and left out of the rounds.
    """
    torch.set_num_threads(1)
    prob64 = make_problem(cfg, torch.float64, ref["theta0"])
    h_ref = torch.tensor(ref["hypergrad"], dtype=torch.float64)
    out: dict[str, Any] = {"times": {m: [] for m in names}, "ratios": {m: [] for m in names},
                           "rel_err": {}, "vs_unrolled": {}, "failed": {}, "first_call_s": {}}
    grads = {}
    for m in names:  # warm-up (in float64) and accuracy; names[0] is "unrolled"
        t0 = time.perf_counter()
        try:
            grads[m] = hypergradient(m, prob64, k)
        except (ValueError, FloatingPointError) as e:
            out["failed"][m] = _failure(e)
            continue
        out["first_call_s"][m] = time.perf_counter() - t0  # with compile=True: compilation
        out["rel_err"][m] = relative_error(grads[m], h_ref)
        out["vs_unrolled"][m] = relative_error(grads[m], grads["unrolled"])
    run = [m for m in names if m not in out["failed"]]
    dtype = getattr(torch, cfg["dtype"])
    prob = prob64 if dtype == torch.float64 else make_problem(cfg, dtype, ref["theta0"])
    calls = {}
    for m in run:  # a measurement repeats fast calls to last ≥ min_time (timer and noise)
        t0 = time.perf_counter()
        hypergradient(m, prob, k)
        calls[m] = max(1, math.ceil(cfg["min_time"] / (time.perf_counter() - t0)))
    out["calls_per_measurement"] = calls
    for _ in range(cfg["repeats"]):
        round_times = {}
        for m in run:
            t0 = time.perf_counter()
            for _ in range(calls[m]):
                hypergradient(m, prob, k)
            round_times[m] = (time.perf_counter() - t0) / calls[m]
        for m in run:
            out["times"][m].append(round_times[m])
            out["ratios"][m].append(round_times[m] / round_times["unrolled"])
    return out


def memory_worker(k: int, name: str, cfg: dict, theta0: dict) -> dict:
    """Fresh process: warm-up on a tiny problem, then the peak-memory growth of one meta-step.

    The compiled strategies warm up on the problem itself with the same k instead (which
    compiles every function the measured meta-step calls: for the sweeps the forward step, its
    VJP and the last step fused with the outer loss; for ``unrolled-c`` the first step, one
    step and a run of steps, or at k = 1 the fused step): they are specialised to the
    problem's shapes and to the run length, and compiling is a one-off cost, not the meta-step's.
    """
    torch.set_num_threads(1)
    dtype = getattr(torch, cfg["dtype"])
    compiled = name in COMPILED
    tiny = make_problem(cfg, dtype, theta0, n=None if compiled else 2)
    for _ in range(2):  # imports (torch.func, the peers), allocator set-up
        try:
            hypergradient(name, tiny, k if compiled else 2)
        except (ValueError, FloatingPointError):
            pass  # Implicit's CG may meet negative curvature; the warm-up is done all the same
    del tiny
    prob = make_problem(cfg, dtype, theta0)
    _trim()  # hand freed heap back, so that a warm-up on the problem itself hides no growth
    try:
        with PeakMemory("cpu") as peak:
            hypergradient(name, prob, k)
    except (ValueError, FloatingPointError) as e:
        return {"mib": None, "failed": _failure(e)}
    return {"mib": peak.mib, **peak.info}


def _trim() -> None:
    """glibc ``malloc_trim(0)``: return the free heap to the OS (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _context(preload: list[str]) -> multiprocessing.context.BaseContext:
    """Fresh processes forked from a server that has imported ``preload`` (and nothing run).

    ``forkserver`` saves each worker the 2–3 s of importing torch again; the workers still
    warm up (torch.func, the peers' first call) before they measure.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(preload)
        return ctx
    return multiprocessing.get_context("spawn")


def _isolated(ctx: multiprocessing.context.BaseContext, fn: Callable, *args: Any) -> Any:
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(fn, args)


def _isolated_many(ctx: multiprocessing.context.BaseContext, fn: Callable, jobs: list[tuple],
                   processes: int) -> list[Any]:
    """Each job in its own fresh process, ``processes`` at a time (peak RSS is per process)."""
    with ctx.Pool(processes, maxtasksperchild=1) as pool:
        return pool.starmap(fn, jobs, chunksize=1)


# --------------------------------------------------------------------------- --profile
class CountingLoop(InnerLoop):
    """``InnerLoop`` that counts phase evaluations (including those inside VJPs) and samples
    the C heap in use (glibc ``mallinfo2``) after each one."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.evaluations, self.heap_peak = 0, 0.0

    def step(self, t: int, x: Tensor, ctx: None) -> Tensor:
        self.evaluations += 1
        out = super().step(t, x, ctx)
        heap = heap_in_use_mib()
        self.heap_peak = max(self.heap_peak, heap or 0.0)
        return out


def heap_in_use_mib() -> float | None:
    """Bytes malloc has handed out and not got back (``uordblks + hblkhd``), glibc ≥ 2.33 only."""
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in names.split()]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


def _loop(prob: dict, k: int, cls: type = InnerLoop, compile: bool = False) -> InnerLoop:
    theta = {n: v.detach() for n, v in prob["theta0"].items()}
    return cls(prob["inner"], theta, prob["omega"], k, prob["cfg"]["lr"], InnerOptimizer(),
               bk.normalizers.softmax, compile=compile)


def plain_adjoint(prob: dict, k: int) -> Tensor:
    """A hand-written costate sweep with no library code: the floor for the sweeps (SGD only).

    Forward: k gradient steps without a graph, iterates stored. Backward: per step, one
    gradient with ``create_graph`` at the stored iterate and one ``autograd.grad`` of
    θ⁺ = θ − a∇θ inner(θ, σ(ω)) pulling λ back and adding ∂_ω.
    """
    lr = prob["cfg"]["lr"]
    loop = _loop(prob, k)
    omega = prob["omega"].detach().requires_grad_()
    weights = torch.softmax(omega, 0).detach()
    xs = [loop.theta0]
    for _ in range(k):
        x = xs[-1].detach().requires_grad_()
        (g,) = torch.autograd.grad(prob["inner"](loop.unflatten(x), weights), x)
        xs.append((x - lr * g).detach())
    x = xs[-1].requires_grad_()
    (lam,) = torch.autograd.grad(prob["outer"](loop.unflatten(x)), x)
    h = torch.zeros_like(omega)
    for s in range(k, 0, -1):
        x = xs[s - 1].detach().requires_grad_()
        loss = prob["inner"](loop.unflatten(x), torch.softmax(omega, 0))
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        lam, dh = torch.autograd.grad(x - lr * g, [x, omega], lam)
        h = h + dh
    return h


def _per_call_ms(fn: Callable[[], Any], calls: int, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return 1e3 * statistics.median(times)


def profile_worker(cfg: dict, theta0: dict, k: int) -> dict:
    """Fresh process, float64: where the time of a costate sweep goes (per-phase costs,
    phase-evaluation counts, a hand-written sweep for comparison)."""
    torch.set_num_threads(1)
    prob = make_problem(cfg, torch.float64, theta0)
    lr, opt = cfg["lr"], InnerOptimizer()
    loop = _loop(prob, k)
    x0 = loop.initial(None)
    theta = {n: v.detach().requires_grad_() for n, v in prob["theta0"].items()}
    omega = prob["omega"].detach().requires_grad_()
    weights = torch.softmax(omega, 0)
    lam = torch.randn_like(x0)

    sweep = bk.costate._Sweep(loop, None, lambda x: prob["outer"](loop.unflatten(x)), False)
    compiled = _loop(prob, k, compile=True)
    sweep_c = bk.costate._Sweep(compiled, None, lambda x: prob["outer"](compiled.unflatten(x)), False)

    def phase_forward(sweep=sweep) -> None:  # what the sweep's forward does for one phase
        sweep.advance(1, x0)

    def phase_vjp(sweep=sweep) -> None:  # what the sweep's backward does for one phase
        sweep.vjp(1, x0, lam)

    def plain_vjp() -> None:
        x = x0[0].detach().requires_grad_()
        loss = prob["inner"](loop.unflatten(x), torch.softmax(omega, 0))
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        torch.autograd.grad(x - lr * g, [x, omega], lam[0])

    def step(create_graph: bool) -> Callable[[], Any]:
        w = weights if create_graph else weights.detach()
        return lambda: inner_step(prob["inner"], theta, opt.init(theta), w, lr, opt,
                                  create_graph=create_graph)

    phase = {key: _per_call_ms(fn, 100) for key, fn in [
        ("step", step(False)), ("step_graph", step(True)), ("sweep_forward", phase_forward),
        ("sweep_vjp", phase_vjp), ("plain_vjp", plain_vjp),
        ("sweep_forward_c", lambda: phase_forward(sweep_c)), ("sweep_vjp_c", lambda: phase_vjp(sweep_c))]}
    args = (prob["inner"], prob["outer"], prob["theta0"], prob["omega"])
    ref = Unrolled(k, lr)(*args).hypergrad
    calls = {"Unrolled (autograd)": lambda: Unrolled(k, lr)(*args),
             "Unrolled(costate=AdjointSweep())":
                 lambda: Unrolled(k, lr, costate=bk.AdjointSweep())(*args),
             "Unrolled(costate=CheckpointedSweep(8))":
                 lambda: Unrolled(k, lr, costate=bk.CheckpointedSweep(8))(*args),
             "Unrolled(costate=AdjointSweep(), compile=True)":
                 lambda: Unrolled(k, lr, costate=bk.AdjointSweep(), compile=True)(*args),
             "Unrolled(costate=CheckpointedSweep(8), compile=True)":
                 lambda: Unrolled(k, lr, costate=bk.CheckpointedSweep(8), compile=True)(*args),
             "hand-written adjoint sweep (plain_adjoint)": lambda: plain_adjoint(prob, k)}
    rounds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(cfg["repeats"]):  # interleaved, like the main table
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            rounds[name].append(1e3 * (time.perf_counter() - t0))
    base = rounds["Unrolled (autograd)"]
    whole = {name: {"ms": statistics.median(ts),
                    "ratio": statistics.median(t / b for t, b in zip(ts, base))}
             for name, ts in rounds.items()}
    counts = {}
    solvers = [("AdjointSweep", bk.AdjointSweep())]
    solvers += [(f"CheckpointedSweep({c})", bk.CheckpointedSweep(c)) for c in (8, 16, 32, 64)]
    for name, solver in solvers:
        counting = _loop(prob, k, CountingLoop)
        solver.solve(counting, None, lambda x: prob["outer"](counting.unflatten(x)))
        counts[name] = {"phase_evaluations": counting.evaluations, "vjps": k,
                        "forward_evaluations": counting.evaluations - k}
    return {"k": k, "phase_ms": phase, "whole_ms": whole, "counts": counts,
            "plain_adjoint_rel_err": relative_error(plain_adjoint(prob, k), ref)}


def costate_solver(name: str, k: int) -> Any:
    return bk.AdjointSweep() if name == "adjoint" else bk.CheckpointedSweep(checkpoints_of(name, k))


def heap_worker(cfg: dict, theta0: dict, k: int, name: str) -> dict:
    """Fresh process: RSS growth and sampled heap in use of one costate sweep at horizon k.

    The heap in use (what malloc handed out and did not get back) is sampled after every
    phase evaluation: the tensors alive, without the allocator's fragmentation that the RSS
    high-water mark also counts.
    """
    torch.set_num_threads(1)
    dtype = getattr(torch, cfg["dtype"])
    prob = make_problem(cfg, dtype, theta0)
    for _ in range(2):
        tiny = _loop(make_problem(cfg, dtype, theta0, n=2), 2)
        costate_solver(name, 2).solve(tiny, None, lambda x: prob["outer"](tiny.unflatten(x)))
    loop = _loop(prob, k, CountingLoop)
    gc.collect()
    before = heap_in_use_mib()
    with PeakMemory("cpu") as peak:
        costate_solver(name, k).solve(loop, None, lambda x: prob["outer"](loop.unflatten(x)))
    return {"k": k, "strategy": name, "checkpoints": checkpoints_of(name, k),
            "rss_growth_mib": peak.mib,
            "heap_growth_mib": None if before is None else loop.heap_peak - before}


PHASE_LABELS = {
    "step": "grad step, autograd.grad (no graph)",
    "step_graph": "grad step, autograd.grad (create_graph), as in Unrolled",
    "sweep_forward": "InnerLoop phase under no_grad, as the sweep's forward evaluates it",
    "sweep_vjp": "InnerLoop phase VJP, as the sweep's backward evaluates it",
    "plain_vjp": "hand-written phase VJP (create_graph grad + autograd.grad, no library code)",
    "sweep_forward_c": "InnerLoop(compile=True) phase under no_grad (the sweep's forward)",
    "sweep_vjp_c": "InnerLoop(compile=True) phase VJP (the sweep's backward)",
}


def print_profile(prof: dict, heap: list[dict], cfg: dict) -> None:
    k, ph = prof["k"], prof["phase_ms"]
    print(f"\nprofile (float64, one phase = one inner SGD step, median ms per call; k = {k}):")
    for key, ms in ph.items():
        print(f"  {'—' if ms is None else f'{ms:7.3f}'}  {PHASE_LABELS[key]}")
    print(f"  whole meta-step at k = {k} (median of interleaved rounds; × Unrolled in the same round):")
    for name, w in prof["whole_ms"].items():
        print(f"  {w['ms']:9.1f}  {w['ratio']:5.2f}×  {name}")
    print(f"  hand-written sweep vs Unrolled: rel diff {prof['plain_adjoint_rel_err']:.1e}")
    print("  phase evaluations per meta-step (forward + inside VJPs) and the time they predict:")
    unrolled = prof["whole_ms"]["Unrolled (autograd)"]["ms"]
    for name, c in prof["counts"].items():
        fwd, vjps = c["forward_evaluations"], c["vjps"]
        lib = fwd * ph["sweep_forward"] + vjps * ph["sweep_vjp"]
        plain = fwd * ph["step"] + vjps * ph["plain_vjp"]
        comp = fwd * ph["sweep_forward_c"] + vjps * ph["sweep_vjp_c"]
        print(f"  {name:22s} {fwd:5d} forward + {vjps:4d} VJP: "
              f"library phase costs → {lib:7.1f} ms ({lib / unrolled:.2f}× Unrolled); "
              f"hand-written costs → {plain:7.1f} ms ({plain / unrolled:.2f}×); "
              f"compiled → {comp:7.1f} ms ({comp / unrolled:.2f}×)")
    item = torch.tensor([], dtype=getattr(torch, cfg["dtype"])).element_size()
    print(f"  RSS growth vs heap in use (sampled after each phase), and the states a solver keeps "
          f"({item}·P bytes each):")
    for h in heap:
        kept = h["k"] + 1 if h["strategy"] == "adjoint" else min(h["checkpoints"], h["k"] + 1)
        heap_text = "—" if h["heap_growth_mib"] is None else f"{h['heap_growth_mib']:5.2f}"
        print(f"  {h['strategy']:10s} k={h['k']:4d}: RSS +{h['rss_growth_mib']:5.2f} MiB, heap in use "
              f"+{heap_text} MiB, ≤ {kept} stored states = {item * n_params(cfg) * kept / 2**20:.2f} MiB")


# --------------------------------------------------------------------------- report
def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b > 0 else "— (zero at the smaller k)"


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def verdicts(rows: list[dict], ks: list[int], cfg: dict) -> list[dict]:
    """The issues' targets, each with the figures it was decided on (``met`` None: no data)."""
    by = {(r["k"], r["strategy"]): r for r in rows}
    lo, hi = min(ks), max(ks)
    out = []

    def ratios(name: str, invert: bool = False, key: str = "time_ratio") -> list[tuple[int, float]]:
        """Per k, the median over rounds of time(name)/time(unrolled) (or its inverse)."""
        pairs = [(k, by[k, name][key]) for k in ks if (k, name) in by and by[k, name][key] is not None]
        return [(k, 1 / x if invert else x) for k, x in pairs]

    def fmt(pairs: list[tuple[int, float]]) -> str:
        return ", ".join(f"k={k}: {x:.2f}" for k, x in pairs)

    def fastest(pairs: list[tuple[int, float]]) -> str:
        return " (ratio of the fastest rounds: " + ", ".join(f"{x:.2f}" for _, x in pairs) + ")"

    def fmt_min(name: str, invert: bool = False) -> str:
        return fastest(ratios(name, invert, "time_ratio_min"))

    def add(issue: int | None, target: str, pairs_or_met: Any, figures: str) -> None:
        out.append({"issue": issue, "target": target, "met": pairs_or_met, "figures": figures})

    def versus(peer: str, name: str, key: str = "time_ratio") -> list[tuple[int, float]]:
        """Per k, time(peer)/time(name) from the per-round ratios to unrolled."""
        return [(k, by[k, peer][key] / by[k, name][key]) for k in ks
                if (k, peer) in by and (k, name) in by and by[k, peer][key] and by[k, name][key]]

    for name, label in (("unrolled", "Unrolled"), ("unrolled-c", "Unrolled(compile)"),
                        ("adjoint-c", "Unrolled(AdjointSweep, compile)")):
        speed = versus("higher", name)
        add(3, f"{label} ≥ 1.5× faster per meta-step than higher",
            all(x >= 1.5 for _, x in speed) if speed else None,
            f"time(higher)/time({name}) " + fmt(speed)
            + fastest(versus("higher", name, "time_ratio_min")) if speed
            else "higher not importable: skipped")
        for peer in ("torchopt", "torchopt-meta"):
            r = [(k, 1 / x) for k, x in versus(peer, name)]
            add(3, f"{label} no slower than {peer}", all(x <= 1.0 for _, x in r) if r else None,
                f"time({name})/time({peer}) " + fmt(r)
                + fastest([(k, 1 / x) for k, x in versus(peer, name, "time_ratio_min")]) if r
                else "torchopt not importable: skipped")
    for name in ("implicit", "implicit-neu"):
        mem = [(k, by[k, name]["peak_mib"]) for k in ks if (k, name) in by]
        ok = [(k, m) for k, m in mem if m is not None]
        failed = [k for k, m in mem if m is None]
        text = "growth MiB " + ", ".join(f"k={k}: {m:.2f}" for k, m in ok)
        if failed:
            text += f"; CG failed at k = {', '.join(map(str, failed))} (no figure)"
        met = max(m for _, m in ok) <= 1.25 * ok[0][1] + 1.0 if len(ok) > 1 else None
        base = f"k={ok[0][0]}" if ok else "the smallest k"
        add(3, f"{name}: peak memory flat in k (criterion: every k ≤ 1.25 × {base} + 1 MiB)",
            met, text)
    for name in ("ckpt8", "ckpt-sqrt", "ckpt8-c", "ckpt-sqrt-c"):
        if hi > lo and (hi, name) in by:
            a, b = by[hi, name]["peak_mib"], by[lo, name]["peak_mib"]
            autograd = _ratio(by[hi, "unrolled"]["peak_mib"], by[lo, "unrolled"]["peak_mib"])
            add(6, f"{name}: peak at k={hi} ≤ 2× peak at k={lo}", a <= 2.0 * b,
                f"{a:.2f} / {b:.2f} MiB = {_ratio(a, b)} "
                f"(c = {by[hi, name]['checkpoints']} at k={hi}; autograd unrolled {autograd})")
            t = ratios(name)
            at_hi = dict(t).get(hi)
            add(6, f"{name}: time ≤ 1.5× autograd unrolled at k={hi}",
                None if at_hi is None else at_hi <= 1.5,
                f"time(ckpt)/time(unrolled) at k={hi}: " + ("—" if at_hi is None else f"{at_hi:.2f}"))
            add(6, f"{name}: time ≤ 1.5× autograd unrolled at every k", all(x <= 1.5 for _, x in t),
                "time(ckpt)/time(unrolled) " + fmt(t) + fmt_min(name))
    for name in ("adjoint", "adjoint-c"):
        if not (hi > lo and (hi, name) in by):
            continue
        item = torch.tensor([], dtype=getattr(torch, cfg["dtype"])).element_size()
        expected = item * n_params(cfg) * (hi - lo) / 2**20
        extra = by[hi, name]["peak_mib"] - by[lo, name]["peak_mib"]
        autograd = by[hi, "unrolled"]["peak_mib"] - by[lo, "unrolled"]["peak_mib"]
        add(6, f"{name}: AdjointSweep memory grows only by the stored iterates "
               f"(criterion: growth k={lo}→{hi} ≤ 1.5 × {item}·P·Δk + 1 MiB)",
            extra <= 1.5 * expected + 1.0,
            f"measured {extra:.2f} MiB vs expected {item}·{n_params(cfg)}·{hi - lo} B = {expected:.2f} MiB "
            f"(autograd unrolled: +{autograd:.1f} MiB)")
    same = [r for r in rows if r["strategy"] in ("adjoint", "ckpt8", "ckpt-sqrt", *COMPILED, *PEERS)
            and r["vs_unrolled"] is not None]
    worst = max(same, key=lambda r: r["vs_unrolled"], default=None)
    add(None, "costate sweeps and peers agree with unrolled to 1e-6 relative (float64)",
        all(r["vs_unrolled"] <= 1e-6 for r in same) if same else None,
        f"largest {worst['vs_unrolled']:.1e} ({worst['strategy']}, k={worst['k']})" if worst else "")
    return out


def describe_reference(info: dict) -> str:
    """What "converged" means for this run's reference, in one paragraph."""
    w, s, cg = info["warm_start"], info["theta_star"], info["cg"]

    def how(r: dict) -> str:
        return (f"{r['gd_steps']} SGD steps + {r['lbfgs_iters']} L-BFGS iterations + "
                f"{r['newton_iters']} saddle-free Newton steps → ‖∇θ inner‖ = {r['grad_norm']:.1e}, "
                f"Hessian eigenvalues in [{r['hess_min_eig']:.2e}, {r['hess_max_eig']:.2f}]")

    checks = ", ".join(f"Unrolled(k={k}) is {e:.1e} from it" for k, e in
                       info["unrolled_adjoint_rel_err"].items())
    cg_text = ("CG failed (non-positive curvature): the dense solve is the reference"
               if cg["residual"] is None else f"relative residual {cg['residual']:.1e}")
    return (f"reference (float64{'' if info['converged'] else ', NOT converged'}): "
            f"warm start θ⁰ = strict local minimum at uniform weights ({how(w)}); "
            f"θ* = the strict local minimum at σ(ω) reached from θ⁰ ({how(s)}; κ = "
            f"{s['condition_number']:.0f}, ‖θ* − θ⁰‖ = {s['distance_from_theta0']:.3f}); "
            f"h_ref = Implicit(steps=0, cg, tol 1e-12) at θ*: {cg_text}, "
            f"{cg['rel_diff_dense_solve']:.1e} from a dense solve"
            + (f"; {checks}" if checks else "") + ".")


def print_table(rows: list[dict], dtype: str) -> None:
    def num(x: float | None, spec: str, width: int) -> str:
        return f"{'—':>{width}}" if x is None else f"{x:{width}{spec}}"

    head = (f"{'k':>4}  {'strategy':14s} {'c':>3}  {'time ms':>9}  {'×unrolled':>9}  {'(min)':>5}  "
            f"{'peak MiB':>9}  {'×k=1':>6}  {'rel err (ref)':>13}  {'vs unrolled':>11}")
    print(f"time: median of rounds, in {dtype}; ×unrolled: median of per-round ratios, (min): "
          f"ratio of the fastest rounds; peak: RSS growth, median of processes; rel err and vs "
          f"unrolled: float64")
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        if last is not None and r["k"] != last:
            print()
        last = r["k"]
        c = "" if r["checkpoints"] is None else str(r["checkpoints"])
        line = (f"{r['k']:>4}  {r['strategy']:14s} {c:>3}  "
                f"{num(None if r['time_s'] is None else 1e3 * r['time_s'], '.2f', 9)}  "
                f"{num(r['time_ratio'], '.2f', 9)}  {num(r['time_ratio_min'], '.2f', 5)}  "
                f"{num(r['peak_mib'], '.2f', 9)}  "
                f"{num(r['peak_vs_k1'], '.2f', 6)}  {num(r['rel_err'], '.2e', 13)}  "
                f"{num(r['vs_unrolled'], '.1e', 11)}")
        print(line + (f"  {r['failed']}" if r["failed"] else ""))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", default=None,
                   help="inner steps k, comma-separated (default 1,5,20,50,200; --quick: 1,5)")
    p.add_argument("--repeats", type=int, default=7, help="timing rounds (median reported)")
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"),
                   help="dtype of the timing and memory runs (accuracy is always float64)")
    p.add_argument("--n", type=int, default=50, help="samples per group")
    p.add_argument("--mem-repeats", type=int, default=5,
                   help="fresh processes per memory measurement (median reported)")
    p.add_argument("--mem-procs", type=int, default=2,
                   help="memory processes run side by side (peak RSS is per process)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="where the JSON goes (default: benchmarks/results/hypergrad.json)")
    p.add_argument("--profile", action="store_true",
                   help="also break the costate sweep's time down (per phase, counts) at the "
                        "largest k and compare RSS with the heap in use")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (about a minute): k = 1, 5, 10 samples per group, one round, one memory "
                        "process each, short reference")
    args = p.parse_args(argv)
    if args.quick:  # new defaults: options given on the command line still win
        p.set_defaults(n=10, repeats=1, mem_repeats=1)
        args = p.parse_args(argv)
    cfg = {"seed": 0, "dim": 20, "hidden": 64, "groups": 10, "n": args.n, "val": 200,
           "wd": 0.05, "lr": 0.2, "cg_iters": 50, "pre_steps": 1000, "ref_steps": 2000,
           "check_steps": [1000], "newton_iters": 60, "strict": True, "dtype": args.dtype,
           "repeats": args.repeats, "min_time": 0.05}
    if args.quick:
        cfg["min_time"] = 0.0
        cfg.update(pre_steps=300, ref_steps=300, check_steps=[], newton_iters=3, strict=False)
    ks = [int(k) for k in (args.ks or ("1,5" if args.quick else "1,5,20,50,200")).split(",")]
    problems = {m: _import_problem(m) for m in sorted(set(PEERS.values()))}
    available = {m for m, problem in problems.items() if problem is None}
    names = strategies(available)
    for peer, problem in problems.items():
        if problem is not None:
            print(f"note: skipping {peer}: {problem}", file=sys.stderr)
    start, load_start = time.time(), load_average()

    ctx = _context(["torch", "bilevelkit", *sorted(available)])
    ref = _isolated(ctx, reference_worker, cfg)
    print(f"reference done ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    timing = {}
    for k in ks:
        timing[k] = _isolated(ctx, time_worker, k, cfg, ref, names)
        print(f"timing k={k} done ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    jobs = [(k, m, cfg, ref["theta0"]) for _ in range(args.mem_repeats) for k in ks for m in names]
    memory: dict[tuple[int, str], dict] = {}
    for (k, m, *_), res in zip(jobs, _isolated_many(ctx, memory_worker, jobs, args.mem_procs)):
        memory.setdefault((k, m), {"runs": []})["runs"].append(res)
    for entry in memory.values():
        mibs = [r["mib"] for r in entry["runs"] if r["mib"] is not None]
        entry["mib"] = statistics.median(mibs) if mibs else None
        entry["failed"] = next((r["failed"] for r in entry["runs"] if "failed" in r), None)
    print(f"memory done ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    prof = heap = None
    if args.profile:
        prof = _isolated(ctx, profile_worker, cfg, ref["theta0"], max(ks))
        heap = [_isolated(ctx, heap_worker, cfg, ref["theta0"], k, m)
                for m in ("adjoint", "ckpt8", "ckpt-sqrt") for k in (min(ks), max(ks))]
        print(f"profile done ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)

    rows = []
    for k in ks:
        t = timing[k]
        for m in names:
            peak, base = memory[k, m]["mib"], memory[min(ks), m]["mib"]
            rows.append({
                "k": k, "strategy": m, "checkpoints": checkpoints_of(m, k),
                "time_s": _median(t["times"][m]), "time_ratio": _median(t["ratios"][m]),
                "time_ratio_min": (min(t["times"][m]) / min(t["times"]["unrolled"])
                                   if t["times"][m] else None),
                "peak_mib": peak,
                "peak_vs_k1": None if peak is None or not base else peak / base,
                "rel_err": t["rel_err"].get(m), "vs_unrolled": t["vs_unrolled"].get(m),
                "failed": t["failed"].get(m) or memory[k, m].get("failed"),
                "times_s": t["times"][m], "time_ratios": t["ratios"][m],
                "memory": memory[k, m], "first_call_s": t["first_call_s"].get(m),
            })
    info = ref["info"]
    P = n_params(cfg)
    print(f"\nhypergradients: 20→{cfg['hidden']}→1 tanh MLP (P = {P}), {cfg['groups']} groups × "
          f"{cfg['n']} samples (groups {', '.join(map(str, CORRUPTED))} corrupted), "
          f"{cfg['val']} validation samples, SGD lr {cfg['lr']}, weight decay {cfg['wd']}; "
          f"torch {torch.__version__}, 1 thread, {os.cpu_count()} CPUs\n")
    print(describe_reference(info) + "\n")
    print_table(rows, args.dtype)
    first = [f"{r['strategy']} k={r['k']}: {r['first_call_s']:.1f} s" for r in rows
             if r["strategy"] in COMPILED and r["first_call_s"] is not None]
    if first:
        print("first call of the compiled sweeps in each timing process, float64 (compilation "
              "included; cached afterwards): " + ", ".join(first))
    checks = verdicts(rows, ks, cfg)
    print("\ntargets:")
    for v in checks:
        mark = "skipped" if v["met"] is None else "met" if v["met"] else "MISSED"
        print(f"  [{mark}] {v['target']}: {v['figures']}")
    if prof is not None:
        print_profile(prof, heap, cfg)
    report = {
        "benchmark": "hypergrad",
        "command": " ".join(["python", "benchmarks/hypergrad.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "config": {**cfg, "ks": ks, "P": P, "corrupted": list(CORRUPTED), "strategies": names,
                   "mem_repeats": args.mem_repeats, "mem_procs": args.mem_procs},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": 1, "cpu_count": os.cpu_count(),
                    "peers": {m: _version(m) if p is None else f"skipped: {p}"
                              for m, p in problems.items()},
                    "load_average_start": load_start, "load_average_end": load_average()},
        "reference": info,
        "seconds": time.time() - start,
        "rows": rows,
        "targets": checks,
        "profile": None if prof is None else {**prof, "adjoint_heap": heap},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out} ({report['seconds']:.0f} s)")
    return report


def _import_problem(module: str) -> str | None:
    """None if ``module`` imports, else why not (absent, or broken against this torch)."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure means: skip this peer
        return f"{type(e).__name__}: {e}"
    return None


def _version(module: str) -> str:
    from importlib.metadata import version

    try:
        return version(module)
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    main()
