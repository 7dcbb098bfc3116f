"""The unrolled reconstruction network as a control system (docs/mri.md, "The network").

State: coil images ``u`` (B, C, H, W) complex (calibration-free, the default) or one image
``v`` stored as (B, 1, H, W) when coil sensitivities are given (SENSE). Phases:

    x_0 = F_0(f; θ_0):  û = F⁻¹(k̂ + K_{θ_0}(k̂))            residual k-space CNN on a warm start k̂:
                        k̂ = f (zero-filled) or F(S v_cg)     v_cg = cg_iters CG-SENSE iterations, S = ctx["sens"]
    b_t = u_{t-1} − ρ_t Aᴴ(A u_{t-1} − f)                     gradient step, learned ρ_t
    u_t = b_t − γ_t (I − P Pᴴ) b_t + J̃ G̃_t S_{α_t} G_t J_t (b_t)   residual learned proximal map

J_t combines the coils into one complex image (a CNN on the coil images and their
profile-weighted sum Pᴴb = Σ_c P̄_c b_c, as real/imag channels), G_t extracts features, S_α
soft-thresholds them with learned α_t (one per feature channel), G̃_t maps them back to one
complex correction image and J̃(x) = (P_c x)_c spreads it over the coils, with P the
low-resolution coil profiles of the measured data (:func:`sensitivities.profiles`; nothing is
fitted). γ_t (a scalar, starting at 0) removes a learned fraction of the part of b_t that is
not a multiple of the profiles, where coil-inconsistent aliasing lives. **Decisions** (both
measured in docs/mri.md): J̃ is this fixed modulation rather than a CNN from one image to C
coils, because a correction of coil c must be ≈ S_c·Δx, a product such a CNN cannot form
(22.7 → 27.8 dB at equal training); γ_t is a soft projection onto the profile span, soft
because P only approximates the coil maps (27.8 → 28.4 dB). With SENSE the state is one image,
J̃ is the identity and there is no γ_t. No weights are shared across phases. The
reconstruction is ``RSS(u_T)`` (see :mod:`applications.mri.losses` for why not ``|J(u_T)|``).

The warm start (``warm_start``) is a decision too: ``"cg_sense"`` runs ``cg_iters`` CG-SENSE iterations with
coil maps S estimated from the sampled centre (ESPIRiT, so nothing outside the measured data),
and K_{θ_0} then corrects the k-space of S·v_cg. The phases stay calibration-free; only the
start uses the maps. It is what lets the network beat CG-SENSE on the masks whose aliasing
only sharp coil maps unfold (equispaced, 2-D variable density): 28.4 → 30.5 dB on the seen
tasks at equal training (docs/mri.md).

``ctx`` is a dict of tensors: ``kspace`` f (B, C, H, W) complex (undersampled, normalised),
``mask`` broadcastable to (B, 1, H, W), and ``sens`` (B, C, H, W) when the operator is SENSE or
the start CG-SENSE (:attr:`NetworkConfig.needs_maps`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bilevelkit as bk
from applications.mri import baselines, operators, sensitivities
from applications.mri.fft import fft2c, ifft2c


@dataclass(frozen=True)
class NetworkConfig:
    """Every size of :class:`UnrolledRecon`."""

    coils: int = 8
    phases: int = 4
    width: int = 16
    depth: int = 2
    kernel: int = 3
    kspace_width: int = 16
    initial: str = "kspace_cnn"   # or "none": F_0 is the warm start itself, no parameters
    warm_start: str = "zero_filled"  # of F_0, or "cg_sense" (ctx must carry "sens")
    cg_iters: int = 20            # CG-SENSE iterations of the "cg_sense" warm start
    operator: str = "coil"        # or "sense" (ctx must carry "sens")
    rho: float = 0.5
    alpha: float = 0.01

    def __post_init__(self) -> None:
        for name in ("coils", "phases", "width", "depth", "kernel", "kspace_width", "cg_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"network {name} must be an integer >= 1, got {value!r}")
        if self.kernel % 2 == 0:
            raise ValueError(f"network kernel must be odd (same-size convolutions), got {self.kernel}")
        if self.initial not in ("kspace_cnn", "none"):
            raise ValueError(f"initial must be 'kspace_cnn' or 'none', got {self.initial!r}")
        if self.warm_start not in ("zero_filled", "cg_sense"):
            raise ValueError(f"warm_start must be 'zero_filled' or 'cg_sense', got {self.warm_start!r}")
        if self.operator not in ("coil", "sense"):
            raise ValueError(f"operator must be 'coil' or 'sense', got {self.operator!r}")

    @property
    def needs_maps(self) -> bool:
        """Whether ``ctx`` must carry coil sensitivities ``sens``."""
        return self.operator == "sense" or self.warm_start == "cg_sense"


def to_channels(z: Tensor) -> Tensor:
    """(B, C, H, W) complex → (B, 2C, H, W) real: real parts, then imaginary parts."""
    return torch.cat([z.real, z.imag], dim=1)


def to_complex(x: Tensor) -> Tensor:
    """Inverse of :func:`to_channels`."""
    re, im = x.chunk(2, dim=1)
    return torch.complex(re, im)


def cnn(channels_in: int, width: int, channels_out: int, depth: int, kernel: int,
        bias: bool = True) -> nn.Sequential:
    """``depth`` convolutions ``in → width → … → out`` with ReLU between them."""
    sizes = [channels_in] + [width] * (depth - 1) + [channels_out]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Conv2d(a, b, kernel, padding=kernel // 2, bias=bias))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def soft_threshold(z: Tensor, alpha: Tensor) -> Tensor:
    """``S_α(z) = sign(z) max(|z| − α, 0)``, α broadcast over channels."""
    return z.sign() * F.relu(z.abs() - alpha.view(1, -1, 1, 1))


class Phase(nn.Module):
    """One phase ``b ↦ b + J̃ G̃ S_α G J (b)`` of the learned proximal map, plus ``ρ``."""

    def __init__(self, cfg: NetworkConfig, coils: int):
        super().__init__()
        w, d, k = cfg.width, cfg.depth, cfg.kernel
        self.rho = nn.Parameter(torch.tensor(cfg.rho))
        self.combine = cnn(2 * coils + 2, w, 2, d, k)     # J_t
        self.features = cnn(2, w, w, d, k)                 # G_t
        self.alpha = nn.Parameter(torch.full((w,), cfg.alpha))
        self.features_back = cnn(w, w, 2, d, k)            # G̃_t
        nn.init.zeros_(self.features_back[-1].weight)  # G̃ ends at 0 and γ starts at 0: the
        nn.init.zeros_(self.features_back[-1].bias)    # phase starts as a plain gradient step
        self.gamma = nn.Parameter(torch.tensor(0.0)) if coils > 1 else None

    def prox(self, b: Tensor, profiles: Tensor) -> Tensor:
        """``b − γ (I − P Pᴴ) b + P ⊙ G̃(S_α(G(J(b, Pᴴ b))))`` for coil images ``b`` and profiles
        ``P`` (Pᴴ b = Σ_c P̄_c b_c per pixel)."""
        combined = (profiles.conj() * b).sum(1, keepdim=True)
        x = self.combine(torch.cat([to_channels(b), to_channels(combined)], dim=1))
        z = soft_threshold(self.features(x), self.alpha.abs())
        out = b + profiles * to_complex(self.features_back(z))
        if self.gamma is not None:
            out = out - self.gamma * (b - profiles * combined)
        return out


def _data_term(op, f: Tensor) -> tuple:
    return op, op.adjoint(f)


class UnrolledRecon(bk.Dynamics):
    """Unrolled proximal-gradient network for multi-coil MRI, a :class:`bilevelkit.Dynamics`.

    Parameters: ``initial_net`` (θ_0, the k-space CNN; absent for ``initial="none"``)
    and ``phases[t-1]`` (θ_t). Share ``initial_net`` across task models with
    ``BilevelTrainer(shared=("initial_net",))``.
    """

    def __init__(self, cfg: NetworkConfig = NetworkConfig()):
        super().__init__()
        self.cfg, self.horizon = cfg, cfg.phases
        coils = 1 if cfg.operator == "sense" else cfg.coils
        if cfg.initial == "kspace_cnn":
            # Bias-free: a constant added to every k-space sample is a bright dot at the image
            # centre (F⁻¹ of a constant), which the data term cannot remove where f is unsampled.
            self.initial_net = cnn(2 * cfg.coils, cfg.kspace_width, 2 * cfg.coils, 3, cfg.kernel,
                                   bias=False)
            nn.init.zeros_(self.initial_net[-1].weight)
        self.phases = nn.ModuleList(Phase(cfg, coils) for _ in range(cfg.phases))
        # channels-last weights: oneDNN's CPU convolutions then skip a layout conversion per
        # call (15-16% less time per minibatch gradient of the default network on a 2-core CPU;
        # benchmarks/mri_step.py)
        self.to(memory_format=torch.channels_last)

    def _check(self, ctx: dict) -> None:
        f = ctx["kspace"]
        if not (f.is_complex() and f.dim() == 4 and f.shape[1] == self.cfg.coils):
            raise ValueError(f"UnrolledRecon expects kspace (B, {self.cfg.coils}, H, W) complex, "
                             f"got {tuple(f.shape)} {f.dtype}")
        if self.cfg.needs_maps and "sens" not in ctx:
            why = "operator='sense'" if self.cfg.operator == "sense" else "warm_start='cg_sense'"
            raise ValueError(f"{why} needs coil sensitivities ctx['sens'] (B, C, H, W)")

    def gradient(self, u: Tensor, ctx: dict) -> Tensor:
        """``Aᴴ(A u − f) = AᴴA u − Aᴴf`` in the state's space; the operator and ``Aᴴf`` are
        kept per batch, so a phase costs one ``normal`` (two FFTs, two shifts)."""
        f, mask = ctx["kspace"], ctx["mask"]
        if self.cfg.operator == "sense":
            op, adj = self._memo("data_term", (f, mask, ctx["sens"]), lambda: _data_term(
                operators.SenseOperator(ctx["sens"], mask), f))
            return (op.normal(u[:, 0]) - adj).unsqueeze(1)
        op, adj = self._memo("data_term", (f, mask), lambda: _data_term(operators.CoilOperator(mask), f))
        return op.normal(u) - adj

    def initial(self, ctx: dict) -> Tensor:
        self._check(ctx)
        k, sense = ctx["kspace"], self.cfg.operator == "sense"
        if self.cfg.warm_start == "cg_sense":
            v = self._memo("cg_sense", (k, ctx["mask"], ctx["sens"]), lambda: baselines.cg_sense(
                k, ctx["mask"], ctx["sens"], iters=self.cfg.cg_iters).unsqueeze(1))
            if self.cfg.initial == "none":
                return v if sense else ctx["sens"] * v
            k = fft2c(ctx["sens"] * v)
        if self.cfg.initial == "kspace_cnn":
            k = k + to_complex(self.initial_net(to_channels(k)))
        u = ifft2c(k)
        if sense:
            return (ctx["sens"].conj() * u).sum(1, keepdim=True)
        return u

    def profiles(self, ctx: dict) -> Tensor:
        """J̃'s coil profiles: those of the measured k-space, or 1 for the SENSE state."""
        f = ctx["kspace"]
        if self.cfg.operator == "sense":
            return torch.ones_like(f[:, :1])
        return self._memo("profiles", (f,), lambda: sensitivities.profiles(f))

    def _memo(self, name: str, inputs: tuple[Tensor, ...], compute) -> Tensor:
        """``compute()``, a function of the measurement ``inputs`` only, kept while they are the
        same, unmodified tensors (same objects and version counters; never when one requires
        grad): every phase, and every VJP of a costate sweep, asks again for the same batch."""
        memo = self.__dict__.setdefault("_memos", {})
        versions = tuple(t._version for t in inputs)
        hit = memo.get(name)
        if hit is not None and hit[1] == versions and all(a is b for a, b in zip(hit[0], inputs)):
            return hit[2]
        value = compute()
        if any(t.requires_grad for t in inputs):
            memo.pop(name, None)
        else:
            memo[name] = (inputs, versions, value)
        return value

    def step(self, t: int, u: Tensor, ctx: dict) -> Tensor:
        phase = self.phases[t - 1]
        return phase.prox(u - phase.rho * self.gradient(u, ctx), self.profiles(ctx))
