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
from applications.mri.data import SliceDataset
from applications.mri.evaluate import ReconTransform
from applications.mri.losses import ReconLoss
from applications.mri.network import NetworkConfig, UnrolledRecon
from applications.mri.train import TrainConfig, data_root, split

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "mri_step.json"
KEYS = ("kspace", "mask", "sens")


def problem(cfg: TrainConfig, batch: int):
    """The default network, its loss and one minibatch of ``batch`` slices per seen group."""
    dataset = SliceDataset(data_root(cfg, 0))
    plan = split(dataset, cfg)
    net_cfg = NetworkConfig(coils=cfg.coils, phases=cfg.phases, width=cfg.width, depth=cfg.depth,
                            kernel=cfg.kernel, kspace_width=cfg.width, initial=cfg.initial,
                            warm_start=cfg.warm_start, cg_iters=cfg.cg_iters, operator=cfg.operator)
    transform = ReconTransform(seed=cfg.seed, sense=net_cfg.needs_maps)
    batches = [default_collate([transform(dataset[i]) for i in plan["parts"][t]["train"][:batch]])
               for t in plan["seen"]]
    val = default_collate([transform(dataset[i]) for i in plan["parts"][plan["seen"][0]]["val"][:batch]])
    torch.manual_seed(cfg.seed)
    model = UnrolledRecon(net_cfg)
    for p in model.parameters():  # away from the zero-initialised last layers, as after training
        p.data.add_(0.01 * torch.randn_like(p))
    return model, ReconLoss(), batches, val


def lower(model, recon, batch, costate) -> None:
    ctx = {k: batch[k] for k in KEYS if k in batch}
    model.zero_grad(set_to_none=True)
    costate.backward(model, ctx, lambda x: recon.terminal(x, batch))
    (recon.initial(model.initial(ctx), batch)).backward()


class Bound(torch.nn.Module):
    """``forward(batch)`` = the training loss of ``model`` (for ``functional_call``)."""

    def __init__(self, model: UnrolledRecon, recon: ReconLoss):
        super().__init__()
        self.model, self.recon = model, recon

    def forward(self, batch: dict) -> torch.Tensor:
        x = self.model.rollout({k: batch[k] for k in KEYS if k in batch})
        return self.recon.terminal(x[-1], batch) + self.recon.initial(x[0], batch)


def upper(model, recon, batches, val, weighted: bool, lr: float) -> torch.Tensor:
    """One task's hypergradient as the trainer computes it (σ = softmax, Ω = 0)."""
    bound = Bound(model, recon)

    def loss(params, batch):
        return functional_call(bound, params, (batch,))

    terms = bk.hypergrad.WeightedSum({i: (lambda q, b=b: loss(q, b)) for i, b in enumerate(batches)})
    inner = terms if weighted else (lambda q, w: terms(q, w))
    params = {n: p.detach() for n, p in bound.named_parameters()}
    omega = torch.zeros(len(batches))
    return bk.hypergrad.Unrolled(steps=1, lr=lr)(inner, lambda q: loss(q, val), params, omega).hypergrad


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=9, help="timing rounds (median reported)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = TrainConfig()
    model, recon, batches, val = problem(cfg, cfg.batch_size)
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
                lower(net, recon, b, solver)
            if r:
                times[name].append((time.perf_counter() - t) / 3)
        for name, weighted in (("upper, WeightedSum", True), ("upper, plain function", False)):
            t = time.perf_counter()
            hyper[name] = upper(model, recon, batches, val, weighted, cfg.inner_lr)
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
