"""Unrolled ISTA for 1-D sparse deconvolution, trained as an optimal-control problem.

The inverse problem: recover a sparse spike train ``x*`` from ``f = k ⊛ x* + noise`` (``k`` a
Gaussian blur, circular convolution). ISTA iterates ``x ← S_α(x − ρ Aᵀ(Ax − f))``; unrolling
``T`` iterations and learning, per phase, the step ``ρ_t``, the threshold ``α_t`` and a small
preconditioning filter ``P_t`` gives the dynamics

    x_0 = c · Aᵀf,    x_t = S_{α_t}(x_{t-1} − ρ_t P_t Aᵀ(A x_{t-1} − f)),   t = 1..T

trained with the costate sweep and Adam (Algorithm 3). Run it::

    python -m bilevelkit.examples.deconvolution --phases 10 --steps 300

It prints the training loss and compares the trained network with classical ISTA (the same
number of iterations, step 1/‖A‖², the best threshold from a small grid).
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bilevelkit as bk

SOLVERS = {"autograd": bk.AutogradCostate, "sweep": bk.AdjointSweep,
           "checkpointed": lambda: bk.CheckpointedSweep(checkpoints=3)}


def circular_conv(x: Tensor, kernel: Tensor) -> Tensor:
    """``k ⊛ x`` along the last axis with circular boundary (odd-length ``kernel``)."""
    p = kernel.numel() // 2
    y = F.conv1d(F.pad(x.unsqueeze(-2), (p, p), mode="circular"), kernel.view(1, 1, -1))
    return y.squeeze(-2)


def gaussian_kernel(width: float, size: int = 15, dtype=torch.float32) -> Tensor:
    """A normalised Gaussian blur of standard deviation ``width`` samples."""
    r = torch.arange(size, dtype=dtype) - size // 2
    k = torch.exp(-0.5 * (r / width) ** 2)
    return k / k.sum()


def make_batch(batch: int, n: int, kernel: Tensor, spikes: int = 4, noise: float = 0.01,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Sparse signals ``x*`` (``spikes`` non-zeros each) and their blurred noisy measurements."""
    # drawn on the CPU (the generator's device), then moved to the kernel's
    x = torch.zeros(batch, n, dtype=kernel.dtype)
    idx = torch.rand(batch, n, generator=generator).argsort(dim=1)[:, :spikes]
    amp = torch.randn(batch, spikes, generator=generator, dtype=kernel.dtype)
    x.scatter_(1, idx, amp.sign() * (0.5 + amp.abs()))
    noise_draw = torch.randn(x.shape, generator=generator, dtype=kernel.dtype)
    x, noise_draw = x.to(kernel.device), noise_draw.to(kernel.device)
    return x, circular_conv(x, kernel) + noise * noise_draw


def soft_threshold(z: Tensor, alpha: Tensor) -> Tensor:
    """``S_α(z) = sign(z) max(|z| − α, 0)``."""
    return z.sign() * (z.abs() - alpha).clamp_min(0)


class UnrolledISTA(bk.Dynamics):
    """``T`` ISTA phases with learned ``ρ_t``, ``α_t = softplus(a_t)`` and filter ``P_t``."""

    def __init__(self, phases: int, filter_size: int = 7, step: float = 1.0, alpha: float = 0.05):
        super().__init__()
        self.horizon = phases
        self.gain = nn.Parameter(torch.tensor(1.0))
        self.rho = nn.Parameter(torch.full((phases,), step))
        self.a = nn.Parameter(torch.full((phases,), math.log(math.expm1(alpha))))
        identity = torch.zeros(phases, filter_size)
        identity[:, filter_size // 2] = 1.0
        self.filters = nn.Parameter(identity)

    def initial(self, ctx: dict) -> Tensor:
        return self.gain * circular_conv(ctx["f"], ctx["kernel"].flip(0))

    def step(self, t: int, x: Tensor, ctx: dict) -> Tensor:
        k = ctx["kernel"]
        grad = circular_conv(circular_conv(x, k) - ctx["f"], k.flip(0))
        z = x - self.rho[t - 1] * circular_conv(grad, self.filters[t - 1])
        return soft_threshold(z, F.softplus(self.a[t - 1]))


def ista(f: Tensor, kernel: Tensor, iterations: int, alpha: float) -> Tensor:
    """Classical ISTA from ``x = 0`` with step ``1/‖A‖²`` (``‖A‖ = max |k̂|``)."""
    step = 1.0 / torch.fft.fft(kernel, n=f.shape[-1]).abs().max().item() ** 2
    x = torch.zeros_like(f)
    for _ in range(iterations):
        grad = circular_conv(circular_conv(x, kernel) - f, kernel.flip(0))
        x = soft_threshold(x - step * grad, torch.tensor(step * alpha))
    return x


def nmse(x: Tensor, ref: Tensor) -> float:
    return float(((x - ref) ** 2).sum() / (ref ** 2).sum())


def train(phases: int = 10, steps: int = 300, batch: int = 32, n: int = 64, lr: float = 1e-2,
          solver: str = "sweep", seed: int = 0, log_every: int = 50, verbose: bool = True
          ) -> dict:
    """Algorithm 3 on the deconvolution problem; returns the losses and test NMSEs."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    kernel = gaussian_kernel(2.0)
    model = UnrolledISTA(phases)
    costate = SOLVERS[solver]()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x_test, f_test = make_batch(256, n, kernel, generator=torch.Generator().manual_seed(seed + 1))
    test_ctx = {"f": f_test, "kernel": kernel}
    with torch.no_grad():
        before = nmse(model.rollout(test_ctx)[-1], x_test)
    losses = []
    start = time.perf_counter()
    for it in range(1, steps + 1):
        x_true, f = make_batch(batch, n, kernel, generator=gen)
        opt.zero_grad()
        loss = costate.backward(model, {"f": f, "kernel": kernel},
                                lambda x: F.mse_loss(x, x_true))
        opt.step()
        losses.append(float(loss))
        if verbose and (it % log_every == 0 or it == 1):
            print(f"step {it:5d}  loss {losses[-1]:.5f}  ({time.perf_counter() - start:.1f}s)")
    with torch.no_grad():
        after = nmse(model.rollout(test_ctx)[-1], x_test)
        classical = min(nmse(ista(f_test, kernel, phases, a), x_test)
                        for a in (0.003, 0.01, 0.03, 0.1))
    return {"losses": losses, "nmse_untrained": before, "nmse_trained": after,
            "nmse_ista": classical, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bilevelkit.examples.deconvolution",
        description="Train an unrolled ISTA for 1-D sparse deconvolution with a costate solver.")
    parser.add_argument("--phases", type=int, default=10, help="number of unrolled phases T")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps")
    parser.add_argument("--batch", type=int, default=32, help="signals per step")
    parser.add_argument("--length", type=int, default=64, help="signal length n")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--solver", choices=sorted(SOLVERS), default="sweep",
                        help="costate solver (default: the adjoint sweep)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.phases < 1 or args.steps < 1 or args.batch < 1 or args.length < 15:
        parser.error("--phases, --steps and --batch must be >= 1 and --length >= 15")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a finite number > 0, got {args.lr}")
    out = train(args.phases, args.steps, args.batch, args.length, args.lr, args.solver, args.seed)
    print(f"\ntest NMSE after {args.phases} iterations:")
    print(f"  classical ISTA (best threshold)  {out['nmse_ista']:.4f}")
    print(f"  unrolled, untrained              {out['nmse_untrained']:.4f}")
    print(f"  unrolled, trained ({args.solver:>12s}) {out['nmse_trained']:.4f}")
    print(f"trained in {out['seconds']:.1f}s")


if __name__ == "__main__":
    main()
