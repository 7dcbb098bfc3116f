"""MRI normal operators: AᴴA with and without the centring shifts, alone and inside CG-SENSE.

``normal`` (what CG-SENSE and every unrolled gradient step apply) cancels the inner shifts of
the centred FFTs: F⁻¹ M² F = shift ∘ ifft2 ∘ (uncentred M²) ∘ fft2 ∘ shift⁻¹. The reference
is the composition ``adjoint(forward(x))`` with the centred transforms (four shifts, two mask
products). For each operator and size it times one application and ``--cg-iters`` CG-SENSE
iterations with each, and checks that both give the same result (relative difference).

Time: ``--repeats`` interleaved rounds (both variants in every round), a measurement repeats
calls shorter than 50 ms; the table gives the median per call and the median over rounds of
the ratio reference / shift-free. Run (from the repository root)::

    python benchmarks/operators.py             # batch 2, 8 coils, 64×64 and 128×128 (under a minute)

Writes ``benchmarks/results/operators.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from applications.mri import baselines, masks
from applications.mri.operators import CoilOperator, SenseOperator, apply_mask


def per_call(fn: Callable[[], object]) -> float:
    """Seconds per call of ``fn``, repeating calls shorter than 50 ms."""
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= 0.05:
            return elapsed / n


def problem(batch: int, coils: int, size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, coils, size, size)
    kspace = torch.randn(shape, generator=g, dtype=torch.complex64)
    sens = torch.randn(shape, generator=g, dtype=torch.complex64)
    sens = sens / sens.abs().pow(2).sum(1, keepdim=True).sqrt()
    mask = masks.make("equispaced", (size, size), 4, 0.08, seed).expand(1, size, size).unsqueeze(0).float()
    return {"kspace": apply_mask(kspace, mask), "sens": sens, "mask": mask,
            "image": torch.randn(shape[:1] + shape[2:], generator=g, dtype=torch.complex64),
            "coils": torch.randn(shape, generator=g, dtype=torch.complex64)}


def cases(p: dict, cg_iters: int) -> dict[str, tuple[Callable, Callable]]:
    """name → (reference, shift-free) callables returning a tensor."""
    sense, coil = SenseOperator(p["sens"], p["mask"]), CoilOperator(p["mask"])
    rhs = sense.adjoint(p["kspace"])

    def cg(apply: Callable) -> Callable:
        return lambda: baselines.conjugate_gradient(lambda x: apply(x) + 1e-2 * x, rhs, cg_iters)[0]

    def sense_fresh(x):  # a new operator per call, as inside cg_sense, so its setup is counted
        return SenseOperator(p["sens"], p["mask"]).normal(x)

    return {
        "coil AᴴA": (lambda: coil.adjoint(coil.forward(p["coils"])), lambda: coil.normal(p["coils"])),
        "SENSE AᴴA": (lambda: sense.adjoint(sense.forward(p["image"])), lambda: sense_fresh(p["image"])),
        f"CG-SENSE {cg_iters} it": (cg(lambda x: sense.adjoint(sense.forward(x))), cg(sense.normal)),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128],
                    help="image sizes N (N × N) to time (default: 64 128)")
    ap.add_argument("--batch", type=int, default=2, help="slices per call (default: 2)")
    ap.add_argument("--coils", type=int, default=8, help="coils (default: 8)")
    ap.add_argument("--cg-iters", type=int, default=20,
                    help="CG-SENSE iterations of the timed solve (default: 20)")
    ap.add_argument("--repeats", type=int, default=7,
                    help="timing rounds per operation, median reported (default: 7)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "operators.json"),
                    help="where the JSON goes (default: benchmarks/results/operators.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    header = f"{'size':>5}  {'case':18s} {'reference ms':>13} {'shift-free ms':>14} {'ratio':>6}  {'rel diff':>9}"
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        p = problem(args.batch, args.coils, size)
        for name, (ref, new) in cases(p, args.cg_iters).items():
            a, b = ref(), new()
            diff = float((a - b).abs().max() / a.abs().max())
            times: dict[str, list[float]] = {"reference": [], "shift_free": []}
            for _ in range(args.repeats):
                times["reference"].append(per_call(ref))
                times["shift_free"].append(per_call(new))
            ratio = statistics.median(r / s for r, s in zip(times["reference"], times["shift_free"]))
            row = {"size": size, "case": name, "reference_ms": 1e3 * statistics.median(times["reference"]),
                   "shift_free_ms": 1e3 * statistics.median(times["shift_free"]), "ratio": ratio,
                   "relative_difference": diff}
            rows.append(row)
            print(f"{size:>5}  {name:18s} {row['reference_ms']:13.3f} {row['shift_free_ms']:14.3f} "
                  f"{ratio:6.2f}  {diff:9.1e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "torch": torch.__version__,
                               "machine": platform.machine(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
