"""Data hyper-cleaning: learn to down-weight corrupted training groups (Algorithm 1).

N groups of a linear-regression problem, some with corrupted targets (flipped, amplified and
noisy), and M validation tasks. Each task gets its own model, trained on the training groups
weighted by its column of ``W = σ(Ω)``; the upper level moves Ω to lower each task's
validation loss. Run it::

    python -m bilevelkit.examples.hyper_cleaning --normalizer sparsemax

It prints the learned weight matrix: corrupted groups end with (almost) no weight, and with
``--domains`` each validation task learns to weight the groups of its own domain.
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.data import TensorDataset

import bilevelkit as bk
from bilevelkit.trainers import BilevelTrainer


def regression_group(beta: torch.Tensor, n: int, g: torch.Generator, corrupt: bool = False,
                     noise: float = 0.1) -> TensorDataset:
    """``n`` samples ``y = Xβ + ε``; corrupted groups get ``y ← −2y + N(0, 1)``."""
    # drawn on the CPU (the generator's device), then moved to beta's
    X = torch.randn(n, beta.numel(), generator=g, dtype=beta.dtype).to(beta.device)
    y = X @ beta + noise * torch.randn(n, generator=g, dtype=beta.dtype).to(beta.device)
    if corrupt:
        y = -2 * y + torch.randn(n, generator=g, dtype=beta.dtype).to(beta.device)
    return TensorDataset(X, y)


def mse(model: torch.nn.Module, batch) -> torch.Tensor:
    X, y = batch
    return ((model(X).squeeze(-1) - y) ** 2).mean()


def build(groups: int, corrupted: int, domains: bool, dim: int, seed: int):
    """Training groups, validation tasks and their names."""
    g = torch.Generator().manual_seed(seed)
    if domains:  # first half of the groups from domain A, second half from B
        betas = [torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(2)]
        train = [regression_group(betas[2 * i // groups], 32, g) for i in range(groups)]
        val = [regression_group(b, 64, g) for b in betas]
        names = [f"{'AB'[2 * i // groups]}{i}" for i in range(groups)]
        return train, val, names, ["A", "B"]
    beta = torch.randn(dim, generator=g, dtype=torch.float64)
    bad = set(torch.randperm(groups, generator=g)[:corrupted].tolist())
    train = [regression_group(beta, 32, g, i in bad) for i in range(groups)]
    names = [f"g{i}{'*' if i in bad else ''}" for i in range(groups)]
    return train, [regression_group(beta, 64, g)], names, ["val"]


def main(argv: list[str] | None = None) -> BilevelTrainer:
    p = argparse.ArgumentParser(prog="python -m bilevelkit.examples.hyper_cleaning",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, default=8, help="training groups N")
    p.add_argument("--corrupted", type=int, default=3, help="corrupted groups (marked *)")
    p.add_argument("--domains", action="store_true",
                   help="two domains and two validation tasks instead of corruption")
    p.add_argument("--normalizer", choices=["softmax", "sparsemax", "entmax15"], default="softmax")
    p.add_argument("--hypergrad", choices=["unrolled", "first-order", "implicit"], default="unrolled")
    p.add_argument("--inner-steps", type=int, default=3)
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.groups < 2 or a.inner_steps < 1 or a.epochs < 1:
        p.error("need --groups >= 2, --inner-steps >= 1 and --epochs >= 1")
    if not a.domains and not 0 <= a.corrupted < a.groups:  # --domains corrupts nothing
        p.error(f"need 0 <= --corrupted < --groups, got --corrupted {a.corrupted} --groups {a.groups}")
    train, val, gnames, tnames = build(a.groups, a.corrupted, a.domains, 5, a.seed)
    method = {"unrolled": bk.hypergrad.Unrolled(steps=a.inner_steps, lr=0.1),
              "first-order": bk.hypergrad.FirstOrder(steps=a.inner_steps - 1, lr=0.1),
              "implicit": bk.hypergrad.Implicit(steps=a.inner_steps, lr=0.1, iters=20)}[a.hypergrad]
    torch.manual_seed(a.seed)
    model = torch.nn.Linear(5, 1).double()
    trainer = BilevelTrainer(model, mse, train, val, group_names=gnames, task_names=tnames,
                             normalizer=a.normalizer, hypergrad=method, lr=0.05, meta_lr=0.3,
                             batch_size=16, seed=a.seed)
    trainer.fit(a.epochs)
    W = trainer.weights.reshape(len(train), -1)
    print(f"learned W = {a.normalizer}(Ω) after {a.epochs} epochs (uniform = {1 / len(train):.3f})")
    print("group  " + "  ".join(f"{t:>6s}" for t in tnames))
    for name, row in zip(gnames, W.tolist()):
        print(f"{name:5s}  " + "  ".join(f"{w:6.3f}" for w in row))
    print("validation loss per task: " + ", ".join(f"{v:.4f}" for v in trainer.history[-1]["val_loss"]))
    return trainer


if __name__ == "__main__":
    main()
