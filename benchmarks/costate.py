"""Costate solvers: wall time and peak memory of one gradient of an unrolled CNN.

The dynamics is a residual CNN unrolled over ``T`` phases, state ``x_t`` of shape
``(B, 2, H, W)`` (real), per-phase weights:

    x_0 = f + K_0(f),    x_t = x_{t-1} + CNN_t(x_{t-1}),   CNN_t = conv → ReLU → … → conv

(``--layers`` 3×3 convolutions of width ``--width``), loss ``ℓ(x_T) = mean |x_T − x*|²``.
For each ``T`` it measures one gradient ``∇_θ ℓ`` with

    autograd          bk.AutogradCostate()            back-propagation through the rollout
    adjoint           bk.AdjointSweep()               stores the T+1 states, recomputes phases
    checkpointed-k    bk.CheckpointedSweep(k)         binomial checkpointing, k stored states
    torch-checkpoint  torch.utils.checkpoint per phase (use_reentrant=False): the peer

* time: one fresh process per ``T`` runs every method once (warm-up, and the gradient check
  against autograd), then ``--repeats`` rounds of all methods (the order rotated from round to
  round); the table shows the median time and the median over rounds of the time ratio to
  autograd measured in the same round;
* peak memory: each (``T``, method) in its own fresh process: a warm-up call on a tiny input,
  then the growth of the resident high-water mark during one full-size gradient
  (``benchmarks/_memory.py``; on CUDA ``max_memory_allocated``), median of ``--mem-repeats``
  processes;
* ``evals``: phase evaluations ``F_t`` (t ≥ 1) per gradient, counted, including those inside
  VJPs.

Run (from the repository root)::

    python benchmarks/costate.py --threads 1   # full: T = 4, 8, 16, 32 (9 minutes here)
    python benchmarks/costate.py --quick       # smoke test (about a minute: process start-ups)

Timing needs an otherwise idle machine: with other jobs on the cores, two OpenMP threads per
process made single rounds up to 20× slower; one thread per process keeps rounds comparable.

Writes ``benchmarks/results/costate.json`` (``--out``) and prints a table and the targets'
verdicts (docs/benchmarks.md, "Costate solvers").
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import bilevelkit as bk
from bilevelkit.testing import relative_error

try:  # python -m benchmarks.costate
    from ._memory import PeakMemory, load_average, run_isolated
except ImportError:  # python benchmarks/costate.py
    from _memory import PeakMemory, load_average, run_isolated

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "costate.json"


# --------------------------------------------------------------------------- the dynamics
class UnrolledCNN(bk.Dynamics):
    """``x_0 = f + K_0(f)``, ``x_t = x_{t-1} + CNN_t(x_{t-1})``; per-phase weights.

    ``evaluations`` counts the phase evaluations ``F_t`` (t ≥ 1); it is bookkeeping only, the
    phases stay pure functions of ``(t, x, ctx, θ)``.
    """

    def __init__(self, horizon: int, width: int = 32, layers: int = 3, channels: int = 2):
        super().__init__()
        self.horizon = horizon
        self.evaluations = 0
        self.first = nn.Conv2d(channels, channels, 3, padding=1)
        sizes = [channels] + [width] * (layers - 1) + [channels]
        self.phases = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(sizes[:-1], sizes[1:]))
            for _ in range(horizon)
        )
        with torch.no_grad():  # small residual branches keep 32 phases stable
            for convs in self.phases:
                convs[-1].weight.mul_(0.1)
                convs[-1].bias.zero_()

    def initial(self, ctx: dict) -> Tensor:
        return ctx["f"] + self.first(ctx["f"])

    def step(self, t: int, x: Tensor, ctx: dict) -> Tensor:
        self.evaluations += 1
        convs = self.phases[t - 1]
        z = x
        for conv in convs[:-1]:
            z = F.relu(conv(z))
        return x + convs[-1](z)


def make_problem(T: int, cfg: dict, device: str, seed: int = 0):
    """The dynamics, its context and the loss, deterministic given ``seed``."""
    torch.manual_seed(seed)
    dyn = UnrolledCNN(T, cfg["width"], cfg["layers"]).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    shape = (cfg["batch"], 2, cfg["size"], cfg["size"])
    f = torch.randn(shape, generator=g).to(device)
    target = torch.randn(shape, generator=g).to(device)

    def loss(x: Tensor) -> Tensor:
        return ((x - target) ** 2).mean()

    return dyn, {"f": f}, loss


# --------------------------------------------------------------------------- the methods
def checkpoint_sizes(T: int, spec: str) -> list[int]:
    """``k`` values from ``"2,4,log"`` (``log`` = ⌈log₂ T⌉ + 1), at most ``T``, deduplicated."""
    ks = set()
    for item in spec.split(","):
        item = item.strip()
        k = math.ceil(math.log2(T)) + 1 if item == "log" else int(item)
        if 1 <= k <= T:  # k = T + 1 is AdjointSweep's schedule
            ks.add(k)
    return sorted(ks)


def methods_for(T: int, spec: str) -> list[str]:
    return ["autograd", "adjoint", *(f"checkpointed-{k}" for k in checkpoint_sizes(T, spec)),
            "torch-checkpoint"]


def torch_checkpoint_gradient(dyn: bk.Dynamics, ctx: Any, loss) -> tuple[Tensor, dict]:
    """The peer: autograd with ``torch.utils.checkpoint`` around every phase."""
    params = {n: p for n, p in dyn.named_parameters() if p.requires_grad}
    x = dyn.initial(ctx)
    for t in range(1, dyn.horizon + 1):
        x = checkpoint(dyn.step, t, x, ctx, use_reentrant=False)
    value = loss(x)
    grads = torch.autograd.grad(value, list(params.values()))
    return value.detach(), dict(zip(params, grads))


def gradient(method: str, dyn: bk.Dynamics, ctx: Any, loss) -> tuple[Tensor, dict]:
    """``(ℓ(x_T), ∇_θ ℓ)`` by ``method``."""
    if method == "torch-checkpoint":
        return torch_checkpoint_gradient(dyn, ctx, loss)
    if method == "autograd":
        solver = bk.AutogradCostate()
    elif method == "adjoint":
        solver = bk.AdjointSweep()
    elif method.startswith("checkpointed-"):
        solver = bk.CheckpointedSweep(int(method.split("-")[1]))
    else:
        raise ValueError(f"unknown method {method!r}")
    result = solver.solve(dyn, ctx, loss)
    return result.loss, result.grads


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- workers
def time_worker(T: int, cfg: dict) -> dict:
    """Fresh process: gradient check and ``repeats`` timing rounds of every method."""
    torch.set_num_threads(cfg["threads"])
    device = cfg["device"]
    dyn, ctx, loss = make_problem(T, cfg, device)
    methods = methods_for(T, cfg["checkpoints"])
    out: dict[str, Any] = {"times": {m: [] for m in methods}, "ratios": {m: [] for m in methods},
                           "error": {}, "evals": {}, "loss": None}
    ref = None
    for m in methods:  # warm-up call = gradient check, and phase evaluations counted
        dyn.evaluations = 0
        value, grads = gradient(m, dyn, ctx, loss)
        out["evals"][m] = dyn.evaluations
        if ref is None:
            ref, out["loss"] = grads, float(value)
        out["error"][m] = max(relative_error(grads[n], g) for n, g in ref.items())
        del grads
    for r in range(cfg["repeats"]):
        round_times = {}
        for m in methods[r % len(methods):] + methods[:r % len(methods)]:  # rotate the order
            _sync(device)
            t0 = time.perf_counter()
            gradient(m, dyn, ctx, loss)
            _sync(device)
            round_times[m] = time.perf_counter() - t0
        for m in methods:
            out["times"][m].append(round_times[m])
            out["ratios"][m].append(round_times[m] / round_times["autograd"])
    return out


def memory_worker(T: int, method: str, cfg: dict) -> dict:
    """Fresh process: warm-up on a tiny input, then the peak-memory growth of one gradient."""
    torch.set_num_threads(cfg["threads"])
    device = cfg["device"]
    tiny = dict(cfg, batch=1, size=8)
    for _ in range(2):  # imports (torch.func), first conv backward, allocator set-up
        gradient(method, *make_problem(2, tiny, device))
    dyn, ctx, loss = make_problem(T, cfg, device)
    with PeakMemory(device) as peak:
        value, grads = gradient(method, dyn, ctx, loss)
        _sync(device)
    return {"mib": peak.mib, **peak.info}


# --------------------------------------------------------------------------- report
def _json_safe(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None (null): strict JSON has no NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _ratio(a: float, b: float) -> float:
    """``a / b``, NaN when ``b`` is 0 (a tiny --quick problem may not raise the peak at all)."""
    return a / b if b else float("nan")


def state_mib(cfg: dict) -> float:
    return cfg["batch"] * 2 * cfg["size"] ** 2 * 4 / 2**20


def verdicts(rows: list[dict], sizes: list[int]) -> list[dict]:
    """The issue's targets, each with the figures it was decided on."""
    by = {(r["T"], r["method"]): r for r in rows}
    out = []
    if (16, "adjoint") in by:
        r = by[16, "adjoint"]
        met = r["peak_ratio"] <= 0.35 and r["time_ratio"] <= 1.4
        out.append({"target": "AdjointSweep at T=16: peak ≤ 0.35× autograd, time ≤ 1.4×",
                    "met": met,
                    "figures": f"peak {r['peak_ratio']:.3f}×, time {r['time_ratio']:.3f}× "
                               f"(rounds {min(r['time_ratios']):.2f}–{max(r['time_ratios']):.2f}, "
                               f"best/best {r['time_ratio_best']:.2f})"})
    lo, hi = min(sizes), max(sizes)
    ks = sorted({int(m.split("-")[1]) for (T, m) in by if m.startswith("checkpointed-")
                 and (lo, m) in by and (hi, m) in by})
    if hi >= 4 * lo and ks:
        growth = {k: _ratio(by[hi, f"checkpointed-{k}"]["peak_mib"], by[lo, f"checkpointed-{k}"]["peak_mib"])
                  for k in ks}
        ag = _ratio(by[hi, "autograd"]["peak_mib"], by[lo, "autograd"]["peak_mib"])
        # "far slower than T": from T=lo to T=hi the peak grows by at most a quarter of T's factor
        met = all(g <= (hi / lo) / 4 for g in growth.values())
        figs = ", ".join(f"k={k}: {g:.2f}×" for k, g in growth.items())
        out.append({"target": f"CheckpointedSweep peak grows far slower than T "
                              f"(T {lo}→{hi} = {hi / lo:g}×; criterion ≤ {hi / lo / 4:g}×)",
                    "met": met, "figures": f"{figs}; autograd {ag:.2f}×"})
    for m in sorted({m for (_, m) in by if m == "adjoint" or m.startswith("checkpointed-")}):
        pairs = [(by[T, m], by[T, "torch-checkpoint"]) for T in sizes
                 if (T, m) in by and (T, "torch-checkpoint") in by]
        if not pairs:
            continue
        mem = [_ratio(a["peak_mib"], b["peak_mib"]) for a, b in pairs]
        tim = [statistics.median(_ratio(x, y) for x, y in zip(a["times_s"], b["times_s"]))
               for a, b in pairs]  # per-round ratios, same process
        if m == "adjoint":  # same work (one recomputation per phase): time and memory
            met = max(mem) <= 1.0 and max(tim) <= 1.0
            what = "peak and time"
        else:  # trades time for memory: memory only
            met = max(mem) <= 1.0
            what = "peak"
        noise = [f"T={a['T']}: +{a['peak_mib'] - b['peak_mib']:.1f} MiB vs run-to-run spread "
                 f"{max(a['peak_spread_mib'], b['peak_spread_mib']):.1f} MiB"
                 for a, b in pairs if a["peak_mib"] > b["peak_mib"]]
        out.append({"target": f"{m} no worse than torch.utils.checkpoint ({what})", "met": met,
                    "figures": "peak " + ", ".join(f"{x:.2f}" for x in mem)
                               + "; time " + ", ".join(f"{x:.2f}" for x in tim)
                               + f" (× peer, T = {', '.join(str(a['T']) for a, _ in pairs)})"
                               + (f"; peak above peer: {'; '.join(noise)}" if noise else "")})
    return out


def print_table(rows: list[dict]) -> None:
    head = (f"{'T':>3}  {'method':17s} {'evals':>5}  {'time s':>7}  {'×autograd':>9}  "
            f"{'peak MiB':>8}  {'×autograd':>9}  {'grad rel err':>12}")
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        if last is not None and r["T"] != last:
            print()
        last = r["T"]
        print(f"{r['T']:>3}  {r['method']:17s} {r['evals']:>5}  {r['time_s']:7.3f}  "
              f"{r['time_ratio']:9.2f}  {r['peak_mib']:8.1f}  {r['peak_ratio']:9.3f}  "
              f"{r['grad_rel_err']:12.1e}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="4,8,16,32", help="horizons T, comma-separated")
    p.add_argument("--checkpoints", default="2,4,log",
                   help="k for CheckpointedSweep; 'log' = ceil(log2 T)+1 (default 2,4,log)")
    p.add_argument("--repeats", type=int, default=3, help="timing rounds (median reported)")
    p.add_argument("--mem-repeats", type=int, default=3,
                   help="fresh processes per memory measurement (median reported)")
    p.add_argument("--batch", type=int, default=4, help="batch size of the dynamics' input (default: 4)")
    p.add_argument("--size", type=int, default=64, help="H = W")
    p.add_argument("--width", type=int, default=32, help="channels of the hidden convolutions")
    p.add_argument("--layers", type=int, default=3, help="3×3 convolutions per phase")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each worker")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to run (default: cuda when present, else cpu)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="where the JSON goes (default: benchmarks/results/costate.json)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: T = 2, 4, 16×16 images, width 8, k = 2, one round, 1 thread")
    args = p.parse_args(argv)
    if args.quick:  # new defaults: options given on the command line still win
        p.set_defaults(sizes="2,4", repeats=1, mem_repeats=1, checkpoints="2", threads=1, batch=1,
                       size=16, width=8)
        args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    cfg = {k: getattr(args, k) for k in ("batch", "size", "width", "layers", "threads",
                                         "device", "checkpoints", "repeats")}
    start, load_start = time.time(), load_average()
    rows = []
    for T in sizes:
        timing = run_isolated(time_worker, T, cfg)
        methods = methods_for(T, args.checkpoints)
        memory = {m: [run_isolated(memory_worker, T, m, cfg) for _ in range(args.mem_repeats)]
                  for m in methods}
        peak = {m: statistics.median(x["mib"] for x in memory[m]) for m in methods}
        spread = {m: max(x["mib"] for x in memory[m]) - min(x["mib"] for x in memory[m])
                  for m in methods}
        for m in methods:
            rows.append({
                "T": T, "method": m, "evals": timing["evals"][m],
                "time_s": statistics.median(timing["times"][m]),
                "time_ratio": statistics.median(timing["ratios"][m]),
                "time_ratio_best": min(timing["times"][m]) / min(timing["times"]["autograd"]),
                "peak_mib": peak[m], "peak_ratio": _ratio(peak[m], peak["autograd"]),
                "peak_spread_mib": spread[m],
                "grad_rel_err": timing["error"][m],
                "times_s": timing["times"][m], "time_ratios": timing["ratios"][m],
                "memory": memory[m],
            })
        print(f"T={T} done ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    print(f"\ncostate solvers: one gradient, state {args.batch}×2×{args.size}×{args.size} "
          f"float32 ({state_mib(cfg):.3f} MiB), {args.layers} convs of width {args.width} per "
          f"phase, {args.device}, {args.threads} threads, torch {torch.__version__}\n")
    print_table(rows)
    checks = verdicts(rows, sizes)
    print("\ntargets:")
    for v in checks:
        print(f"  [{'met' if v['met'] else 'MISSED'}] {v['target']}: {v['figures']}")
    report = {
        "benchmark": "costate",
        "command": " ".join(["python", "benchmarks/costate.py", *(argv if argv is not None
                                                                   else sys.argv[1:])]),
        "config": {**cfg, "sizes": sizes, "mem_repeats": args.mem_repeats,
                   "state_mib": state_mib(cfg)},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpu_count": __import__("os").cpu_count(),
                    "load_average_start": load_start, "load_average_end": load_average()},
        "seconds": time.time() - start,
        "rows": rows,
        "targets": checks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_json_safe(report), indent=1))
    print(f"\nwrote {args.out} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
