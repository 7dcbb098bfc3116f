"""Time of the MRI training steps, route by route, on the default configuration.

The default command spends its time in two places: lower-level gradients (one per training
group drawn, per task model and lower step) and the upper step's hypergradient (one per task
model: a one-step look-ahead over every training group). This measures both on the default
network and data (64×64, 8 coils, minibatches of 2 slices, float32, one thread):

- lower: ``∇_θ`` of one minibatch's loss (terminal + initial-state term) by each costate
  solver, with the network's channels-last weights (the default) and with contiguous ones;
- upper: ``Unrolled(steps=1)`` over the nine seen groups with the inner loss as a
  ``bk.hypergrad.WeightedSum`` (each group's gradient by a plain backward pass, the trainer's
  route) and as a plain function (a backward pass through the inner gradient's graph), and
  the relative difference of the two hypergradients.

Rounds interleave the routes; medians are reported::

    python benchmarks/mri_step.py             # ~1.5 minutes; writes benchmarks/results/mri_step.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.func import functional_call
from torch.utils.data import default_collate

import bilevelkit as bk
from bilevelkit.trainers import TerminalLoss, _backward, _Bound
from applications.mri.data import SliceDataset
from applications.mri.evaluate import ReconTransform
from applications.mri.losses import ReconLoss
from applications.mri.network import UnrolledRecon
from applications.mri.train import TrainConfig, data_root, split

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "mri_step.json"


def problem(cfg: TrainConfig, batch: int):
    """The default network, the training's loss and one minibatch of ``batch`` slices per seen
    group."""
    dataset = SliceDataset(data_root(cfg, 0))
    plan = split(dataset, cfg)
    net_cfg = cfg.network(dataset[0]["kspace"].shape[0])
    transform = ReconTransform(seed=cfg.seed, sense=net_cfg.needs_maps)
    batches = [default_collate([transform(dataset[i]) for i in plan["parts"][t]["train"][:batch]])
               for t in plan["seen"]]
    val = default_collate([transform(dataset[i]) for i in plan["parts"][plan["seen"][0]]["val"][:batch]])
    torch.manual_seed(cfg.seed)
    model = UnrolledRecon(net_cfg)
    for p in model.parameters():  # away from the zero-initialised last layers, as after training
        p.data.add_(0.01 * torch.randn_like(p))
    recon = ReconLoss()  # the training CLI's loss: terminal and initial-state terms
    loss = TerminalLoss(context=lambda b: {k: b[k] for k in ("kspace", "mask", "sens") if k in b},
                        terminal=recon.terminal, initial=recon.initial)
    return model, loss, batches, val


def lower(model, loss, batch, costate) -> None:
    """One minibatch gradient as the trainer's lower step takes it."""
    model.zero_grad(set_to_none=True)
    _backward(model, loss, batch, 1.0, costate)


def upper(model, loss, batches, val, weighted: bool, lr: float) -> torch.Tensor:
    """One task's hypergradient as the trainer computes it (σ = softmax, Ω = 0), on the
    training loss as upper objective (``--upper-loss mean``; the default log takes the same
    rollout and reduces it per slice, a cost the timing cannot tell apart)."""
    bound = _Bound(model, loss)

    def value(params, batch):
        return functional_call(bound, params, (batch,))

    terms = bk.hypergrad.WeightedSum({i: (lambda q, b=b: value(q, b)) for i, b in enumerate(batches)})
    inner = terms if weighted else (lambda q, w: terms(q, w))
    params = {n: p.detach() for n, p in bound.named_parameters()}
    omega = torch.zeros(len(batches))
    return bk.hypergrad.Unrolled(steps=1, lr=lr)(inner, lambda q: value(q, val), params, omega).hypergrad


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=9, help="timing rounds >= 1 (median reported)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="where the JSON goes (default: benchmarks/results/mri_step.json)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    torch.set_num_threads(1)
    cfg = TrainConfig()
    model, loss, batches, val = problem(cfg, cfg.batch_size)
    plain = UnrolledRecon(model.cfg)
    for q in plain.parameters():
        q.data = q.data.contiguous()
    plain.load_state_dict(model.state_dict())
    lower_routes = {f"{name}, {layout}": (net, solver)
                    for name, solver in (("autograd", bk.AutogradCostate()), ("sweep", bk.AdjointSweep()))
                    for layout, net in (("channels-last", model), ("contiguous", plain))}
    times: dict[str, list[float]] = {k: [] for k in lower_routes}
    times.update({"upper, WeightedSum": [], "upper, plain function": []})
    hyper = {}
    for r in range(args.rounds + 1):  # round 0 warms up (memos, allocator) and is not counted
        for name, (net, solver) in lower_routes.items():
            t = time.perf_counter()
            for b in batches[:3]:
                lower(net, loss, b, solver)
            if r:
                times[name].append((time.perf_counter() - t) / 3)
        for name, weighted in (("upper, WeightedSum", True), ("upper, plain function", False)):
            t = time.perf_counter()
            hyper[name] = upper(model, loss, batches, val, weighted, cfg.inner_lr)
            if r:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = float((hyper["upper, WeightedSum"] - hyper["upper, plain function"]).norm()
                 / hyper["upper, plain function"].norm())
    base_lower = med["sweep, contiguous"]
    print(f"MRI training steps, default configuration ({cfg.batch_size} slices a minibatch, "
          f"{len(batches)} groups, float32, 1 thread), median of {args.rounds} rounds")
    print(f"{'route':32s} {'seconds':>9s} {'x ref':>7s}")
    for k, v in med.items():
        ref = base_lower if not k.startswith("upper") else med["upper, plain function"]
        print(f"{k:32s} {v:9.3f} {v / ref:7.2f}")
    print(f"hypergradients: WeightedSum vs plain function, relative difference {diff:.1e} (float32)")
    report = {"config": {"batch_size": cfg.batch_size, "groups": len(batches), "rounds": args.rounds,
                         "torch": torch.__version__},
              "seconds": med, "all_seconds": times, "hypergrad_rel_diff": diff}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
