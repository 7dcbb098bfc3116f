"""Synthetic multicoil MRI data: textured anatomies, coil maps, noise and a task catalogue.

An image is painted from soft-edged tissue regions, x = B · Σ_r m_r ρ_r (1 + a_r·T) · e^{iφ},
with m_r the region memberships (1-pixel partial-volume edges), ρ_r the tissue intensity for
the chosen contrast, T texture fields (fine, fibre-like, coarse) weighted per tissue, B a smooth
bias field and φ a smooth random phase. Each volume ("patient") draws its own anatomy; each
slice adds rotation, scale, shift and boundary jitter, and its position z changes the cross
sections. Images are therefore *not* piecewise constant (TV is not flattered).

Coil images are S_c x, k-space is F(S_c x) + noise (complex Gaussian at a set SNR), and the
reference is the root-sum-of-squares of the fully sampled coil images, as fastMRI's
``reconstruction_rss``. A ``Task`` fixes anatomy, contrast and sampling; ``TASKS`` is the
default catalogue, some of it held out from training (unseen masks or accelerations).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from applications.mri import fft, operators

__all__ = [
    "ANATOMIES", "CONTRASTS", "TISSUES", "phantom", "coil_maps", "add_noise", "Task", "TASKS",
    "make_task",
]

ANATOMIES = ("brain", "knee", "abdomen")
CONTRASTS = ("T1", "T2", "PD")

# tissue: (T1, T2, PD intensities; fine, fibre, coarse texture amplitudes)
TISSUES: dict[str, tuple[float, float, float, float, float, float]] = {
    "fat":            (1.00, 0.75, 0.90, 0.06, 0.00, 0.08),
    "bone":           (0.04, 0.03, 0.05, 0.20, 0.00, 0.00),
    "marrow":         (0.85, 0.60, 0.80, 0.25, 0.00, 0.10),
    "csf":            (0.12, 1.00, 0.85, 0.02, 0.00, 0.03),
    "gm":             (0.55, 0.60, 0.80, 0.08, 0.00, 0.08),
    "wm":             (0.78, 0.40, 0.68, 0.06, 0.00, 0.06),
    "lesion":         (0.35, 0.90, 0.90, 0.10, 0.00, 0.05),
    "muscle":         (0.45, 0.22, 0.50, 0.04, 0.14, 0.06),
    "cartilage":      (0.40, 0.45, 0.70, 0.08, 0.00, 0.05),
    "fluid":          (0.15, 0.95, 0.80, 0.02, 0.00, 0.02),
    "meniscus":       (0.06, 0.05, 0.10, 0.20, 0.00, 0.00),
    "ligament":       (0.08, 0.06, 0.12, 0.05, 0.25, 0.00),
    "liver":          (0.65, 0.25, 0.60, 0.06, 0.00, 0.08),
    "spleen":         (0.48, 0.55, 0.70, 0.05, 0.00, 0.05),
    "bowel":          (0.40, 0.65, 0.60, 0.20, 0.00, 0.10),
    "kidney_cortex":  (0.55, 0.60, 0.72, 0.06, 0.00, 0.05),
    "kidney_medulla": (0.38, 0.80, 0.78, 0.08, 0.00, 0.05),
    "vessel":         (0.85, 0.08, 0.35, 0.02, 0.00, 0.02),
}
_TISSUE_INDEX = {name: i for i, name in enumerate(TISSUES)}
_TABLE = np.array(list(TISSUES.values()))
_FIBRE_ANGLE = {"brain": 0.0, "knee": np.pi / 2, "abdomen": 0.0}  # fibre direction, radians


def _key(name: str) -> int:
    return zlib.crc32(name.encode())


class _Canvas:
    """Collects soft tissue regions on canonical coordinates (X, Y), object radius ≈ 1."""

    def __init__(self, X: np.ndarray, Y: np.ndarray, edge: float, seed: int,
                 rng: np.random.Generator):
        self.X, self.Y, self.edge, self.seed, self.rng = X, Y, edge, seed, rng
        # (X, Y) is affine in the pixel index (col, row): keep its inverse to find windows.
        jac = np.array([[X[0, 1] - X[0, 0], X[1, 0] - X[0, 0]],
                        [Y[0, 1] - Y[0, 0], Y[1, 0] - Y[0, 0]]], dtype=np.float64)
        self._inverse, self._origin = np.linalg.inv(jac), np.array([X[0, 0], Y[0, 0]], np.float64)
        self.layers: list[tuple[int, tuple[slice, slice], np.ndarray]] = []

    def patient(self, name: str) -> np.random.Generator:
        """Generator for structure ``name``, identical on every slice of the volume."""
        return np.random.default_rng([self.seed, 0, _key(name)])

    def wobble(self, name: str, kmin: int, kmax: int, amp: float) -> np.ndarray:
        """Boundary r(θ) = 1 + Re Σ_k c_k e^{ikθ}, kmin ≤ k ≤ kmax: patient draw + slice jitter.

        Returns the coefficients c_0..c_kmax (zero below kmin)."""
        p, n = self.patient(name), kmax - kmin + 1
        a = amp * p.uniform(0.3, 1.0, n) / np.sqrt(n) * (1 + 0.2 * self.rng.standard_normal(n))
        phase = p.uniform(0, 2 * np.pi, n) + 0.3 * self.rng.standard_normal(n)
        return np.r_[np.zeros(kmin), a * np.exp(1j * phase)].astype(np.complex64)

    def blob(self, tissue: str, cx: float, cy: float, a: float, b: float, angle: float = 0.0,
             wobble: np.ndarray | None = None) -> None:
        """Add a rotated, possibly wobbly ellipse of ``tissue`` (painted over earlier ones)."""
        self.rings([(tissue, 0.0)], cx, cy, a, b, angle, wobble)

    def rings(self, layers: list[tuple[str, float]], cx: float, cy: float, a: float, b: float,
              angle: float = 0.0, wobble: np.ndarray | None = None) -> None:
        """Add nested copies of one shape, each (tissue, inset) shrunk by ``inset``.

        Membership m = ½(1 + tanh((d − inset) / edge)), d ≈ (1 − ρ/r(θ))·min(a, b) the signed
        distance to the boundary; computed only in the window where the outer m > 1e-3."""
        cx, cy, a, b = float(cx), float(cy), float(a), float(b)  # keep float32 maps float32
        if a <= 0 or b <= 0:
            return
        grow = 1 + (0.0 if wobble is None else float(np.abs(wobble).sum()))
        reach = max(a, b) * grow + 4 * self.edge * grow * max(a, b) / min(a, b)
        corners = np.array([[cx - reach, cx + reach, cx - reach, cx + reach],
                            [cy - reach, cy - reach, cy + reach, cy + reach]])
        col, row = self._inverse @ (corners - self._origin[:, None])
        H, W = self.X.shape
        r0, r1 = max(int(np.floor(row.min())), 0), min(int(np.ceil(row.max())) + 1, H)
        c0, c1 = max(int(np.floor(col.min())), 0), min(int(np.ceil(col.max())) + 1, W)
        if r0 >= r1 or c0 >= c1:
            return
        window = np.s_[r0:r1, c0:c1]
        c, s = float(np.cos(angle)), float(np.sin(angle))
        dx, dy = self.X[window] - cx, self.Y[window] - cy
        u, v = (c * dx + s * dy) / a, (-s * dx + c * dy) / b
        rho = np.hypot(u, v)
        if wobble is not None:
            z, r = (u + 1j * v) / np.maximum(rho, 1e-12), wobble[-1]
            for ck in wobble[-2::-1]:  # Horner: Σ_k c_k z^k, z = e^{iθ}
                r = r * z + ck
            rho = rho / (1 + r.real)
        d = (1 - rho) * min(a, b)
        for tissue, inset in layers:
            m = 0.5 + 0.5 * np.tanh((d - inset) / self.edge)
            self.layers.append((_TISSUE_INDEX[tissue], window, m))


def _brain(cv: _Canvas, z: float) -> None:
    p = cv.patient("head")
    g = np.sqrt(1 - 0.3 * z * z)
    A, B = g * (0.78 + 0.04 * p.standard_normal()), g * (0.92 + 0.04 * p.standard_normal())
    cv.rings([("fat", 0.0), ("bone", 0.05), ("marrow", 0.065), ("bone", 0.08), ("csf", 0.10)],
             0, 0, A, B, wobble=cv.wobble("head", 2, 4, 0.02))  # scalp, skull with diploë, CSF
    cv.blob("gm", 0, 0, A - 0.13, B - 0.13, wobble=cv.wobble("cortex", 8, 20, 0.1))
    cv.blob("wm", 0, 0, A - 0.25, B - 0.25, wobble=cv.wobble("white", 6, 16, 0.18))
    cv.blob("csf", 0, -0.45 * B, 0.015, 0.3 * B)  # interhemispheric fissure
    v = max(0.0, 1 - (z / 0.7) ** 2) ** 0.5  # ventricles shrink away from mid-volume
    size = 1 + 0.25 * p.standard_normal()
    for sx in (-1, 1):
        cv.blob("gm", sx * 0.2 * g, 0.06, 0.07 * g, 0.12 * g, angle=sx * 0.3)  # deep grey
        cv.blob("csf", sx * 0.1, -0.08, 0.07 * v * size, 0.22 * v, angle=-sx * 0.25,
                wobble=cv.wobble(f"ventricle{sx}", 2, 4, 0.1))
    lesions = cv.patient("lesions")
    n = lesions.integers(0, 5)
    xy, r, zl = lesions.uniform(-0.35, 0.35, (4, 2)), lesions.uniform(0.02, 0.07, 4), \
        lesions.uniform(-0.8, 0.8, 4)
    for i in range(n):
        rz = np.sqrt(max(0.0, r[i] ** 2 - (0.3 * (z - zl[i])) ** 2))
        cv.blob("lesion", xy[i, 0], xy[i, 1], rz, rz * 1.3, wobble=cv.wobble(f"lesion{i}", 2, 3, 0.15))


def _knee(cv: _Canvas, z: float) -> None:
    g = np.sqrt(1 - 0.5 * z * z)
    cv.rings([("fat", 0.0), ("muscle", 0.07)], 0, 0, 0.68, 1.15, wobble=cv.wobble("leg", 2, 6, 0.03))
    for i, (x, y) in enumerate(((-0.42, -0.65), (0.4, -0.7), (-0.4, 0.75), (0.38, 0.7))):
        cv.blob("fat", x, y, 0.03, 0.25, angle=0.2 * np.sign(x), wobble=cv.wobble(f"sep{i}", 2, 4, 0.2))
    cv.blob("fluid", 0, 0.06, 0.48 * g, 0.14, wobble=cv.wobble("capsule", 2, 5, 0.08))
    condyles = [(sx * 0.19 * g, -0.12, 0.19 * g, 0.15) for sx in (-1, 1)]
    plateau, femur, tibia = (0, 0.30, 0.40 * g, 0.14), (0, -0.72, 0.22 * g, 0.62), (0, 0.82, 0.24 * g, 0.52)
    cv.blob("cartilage", 0, 0.29, 0.41 * g, 0.17)
    for x, y, a, b in condyles:
        cv.blob("cartilage", x, y, a + 0.035, b + 0.035)
    bones = [femur, tibia, plateau, *condyles]
    wobbles = [cv.wobble(f"bone{i}", 2, 5, 0.02) for i in range(len(bones))]
    for tissue, d in (("bone", 0.0), ("marrow", 0.02)):  # cortex, then trabecular marrow
        for (x, y, a, b), w in zip(bones, wobbles):
            cv.blob(tissue, x, y, a - d, b - d, wobble=w)
    for sx in (-1, 1):
        cv.blob("meniscus", sx * 0.37 * g, 0.1, 0.08, 0.035, angle=-sx * 0.1)
        cv.blob("ligament", sx * 0.49 * g, 0.06, 0.015, 0.22)  # collateral ligaments
    acl = max(0.0, 1 - (z / 0.6) ** 2)
    cv.blob("ligament", 0.0, -0.02, 0.022 * acl, 0.13 * acl, angle=0.4)
    fib = max(0.0, 1 - ((z - 0.5) / 0.5) ** 2) ** 0.5  # fibular head, posterior slices
    cv.rings([("bone", 0.0), ("marrow", 0.015)], 0.45 * g, 0.78, 0.09 * fib, 0.12 * fib)


def _abdomen(cv: _Canvas, z: float) -> None:
    p = cv.patient("body")
    g = np.sqrt(1 - 0.2 * z * z)
    A, B = g * (0.94 + 0.04 * p.standard_normal()), g * (0.68 + 0.04 * p.standard_normal())
    cv.rings([("fat", 0.0), ("muscle", 0.07), ("fat", 0.11)], 0, 0, A, B,
             wobble=cv.wobble("body", 2, 5, 0.03))  # subcutaneous fat, wall, visceral fat
    cv.blob("liver", -0.38, -0.08, 0.42 * g, 0.36 * g, angle=0.2, wobble=cv.wobble("liver", 2, 6, 0.08))
    s = max(0.0, 1 - ((z + 0.3) / 0.8) ** 2) ** 0.5
    cv.blob("spleen", 0.58, 0.02, 0.14 * s, 0.24 * s, angle=-0.4, wobble=cv.wobble("spleen", 2, 5, 0.08))
    cv.blob("bowel", 0.18, -0.3, 0.26, 0.13, angle=-0.1, wobble=cv.wobble("stomach", 3, 8, 0.12))
    loops = cv.patient("loops")
    xy, r = loops.uniform((-0.05, -0.45), (0.45, 0.05), (5, 2)), loops.uniform(0.04, 0.08, 5)
    for i in range(5):
        cv.blob("bowel", xy[i, 0], xy[i, 1], r[i], r[i] * 0.8, wobble=cv.wobble(f"loop{i}", 2, 4, 0.15))
    k = max(0.0, 1 - (z / 0.8) ** 2) ** 0.5
    for sx in (-1, 1):
        cv.rings([("kidney_cortex", 0.0), ("kidney_medulla", 0.04)], sx * 0.36, 0.26, 0.11 * k,
                 0.16 * k, angle=sx * 0.35, wobble=cv.wobble(f"kidney{sx}", 3, 6, 0.08))
        cv.blob("muscle", sx * 0.17, 0.47, 0.13, 0.09, wobble=cv.wobble(f"psoas{sx}", 2, 4, 0.05))
    cv.rings([("bone", 0.0), ("marrow", 0.02)], 0, 0.38, 0.13, 0.11)  # vertebral body
    cv.blob("bone", 0, 0.60, 0.025, 0.07)
    cv.blob("csf", 0, 0.53, 0.045, 0.045)
    cv.blob("vessel", 0.06, 0.22, 0.045, 0.045)
    cv.blob("vessel", -0.13, 0.20, 0.06, 0.04)
    hep = cv.patient("hepatic")
    xy, r = hep.uniform((-0.6, -0.25), (-0.2, 0.1), (4, 2)), hep.uniform(0.012, 0.025, 4)
    for i in range(4):
        cv.blob("vessel", xy[i, 0], xy[i, 1], r[i], r[i])


_ANATOMY = {"brain": _brain, "knee": _knee, "abdomen": _abdomen}


def _fields(rng: np.random.Generator, shape: tuple[int, int], fibre: float) -> np.ndarray:
    """Four unit-variance random fields (4, H, W): fine texture, fibres along angle ``fibre``
    (narrow band across, long correlation along), coarse texture, bias; filtered white noise."""
    H, W = shape
    fy, fx = np.fft.fftfreq(H)[:, None], np.fft.rfftfreq(W)[None, :]
    f, n = np.hypot(fy, fx), np.hypot(fy * H, fx * W)  # cycles per pixel, cycles per FOV
    along, across = fx * np.cos(fibre) + fy * np.sin(fibre), fy * np.cos(fibre) - fx * np.sin(fibre)
    filters = np.stack([
        (1 - np.exp(-(f / 0.08) ** 2)) * np.exp(-(f / 0.3) ** 2),
        np.exp(-(along / 0.02) ** 2 - ((np.abs(across) - 0.15) / 0.08) ** 2),
        np.exp(-(n / 6) ** 2),
        np.exp(-(n / 2) ** 2),
    ])
    fields = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((4, H, W))) * filters, s=shape)
    return (fields / np.maximum(fields.std((1, 2), keepdims=True), 1e-12)).astype(np.float32)


def _check_shape(shape) -> tuple[int, int]:
    if len(shape) != 2 or any(int(n) != n or n < 8 for n in shape):
        raise ValueError(f"shape must be two integers >= 8 (H, W), got {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, float]:
    """Pixel centres in units of half the smaller side, origin at (H // 2, W // 2): (Y, X, half)."""
    H, W = shape
    half = min(H, W) / 2
    y, x = (np.arange(H) - H // 2) / half, (np.arange(W) - W // 2) / half
    Y, X = np.meshgrid(y, x, indexing="ij")
    return Y.astype(np.float32), X.astype(np.float32), half


def phantom(anatomy: str, contrast: str, slices: int = 1, shape: tuple[int, int] = (128, 128),
            seed: int = 0) -> Tensor:
    """A volume of complex anatomical images x_s (slices, H, W), complex64.

    x = B · Σ_r m_r ρ_r(contrast) (1 + a_r·T) · e^{iφ}. The same ``seed`` gives the same
    patient (anatomy, lesions, texture); contrasts differ only in the tissue intensities ρ.
    """
    if anatomy not in _ANATOMY:
        raise ValueError(f"anatomy must be one of {ANATOMIES}, got {anatomy!r}")
    if contrast.upper() not in CONTRASTS:
        raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
    if slices < 1:
        raise ValueError(f"slices must be >= 1, got {slices}")
    shape = _check_shape(shape)
    gain = 1 + 0.05 * np.random.default_rng([seed, 1]).standard_normal(len(TISSUES))
    rho = _TABLE[:, CONTRASTS.index(contrast.upper())] * gain
    values = np.concatenate([rho[:, None], rho[:, None] * _TABLE[:, 3:]], 1).astype(np.float32)
    Y, X, half = _grid(shape)
    poly = np.stack([np.ones_like(X), X, Y, X * Y, X * X, Y * Y])
    out = np.empty((slices, *shape), np.complex64)
    for s, z in enumerate(np.linspace(-0.8, 0.8, slices) if slices > 1 else [0.0]):
        rng = np.random.default_rng([seed, 2, s])
        rot = 0.12 * rng.standard_normal()
        sx, sy = (rng.uniform(0.9, 1.05) * rng.uniform(0.96, 1.04, 2)).tolist()
        dx, dy = rng.uniform(-0.05, 0.05, 2)
        c, si, dx, dy = float(np.cos(rot)), float(np.sin(rot)), float(dx), float(dy)
        Xc, Yc = (c * (X - dx) + si * (Y - dy)) / sx, (-si * (X - dx) + c * (Y - dy)) / sy
        cv = _Canvas(Xc, Yc, 0.6 / (half * float(min(sx, sy))), seed, rng)
        _ANATOMY[anatomy](cv, float(z))
        maps = np.zeros((4, *shape), np.float32)  # composited intensity, texture amplitudes
        for t, window, m in cv.layers:
            sub = maps[(slice(None), *window)]
            sub += m * (values[t][:, None, None] - sub)
        fine, fibre, coarse, bias = _fields(rng, shape, _FIBRE_ANGLE[anatomy] + rot)
        mag = np.clip(maps[0] + maps[1] * fine + maps[2] * fibre + maps[3] * coarse, 0, None)
        coefficients = rng.normal(0, [np.pi, 0.8, 0.8, 0.5, 0.5, 0.5]).astype(np.float32)
        phase = np.tensordot(coefficients, poly, 1)  # quadratic polynomial in (x, y)
        out[s] = mag * np.exp(0.15 * bias + 1j * phase)
    return torch.from_numpy(out)


def coil_maps(num_coils: int, shape: tuple[int, int] = (128, 128), seed: int = 0) -> Tensor:
    """Coil sensitivities S (num_coils, H, W), complex64, with Σ_c |S_c|² = 1 at every pixel.

    Loops of radius a on a ring around the object, Biot–Savart-like on-axis falloff
    |S_c| ∝ a² / (a² + d_c² + h_c²)^{3/2} (d_c in-plane distance, h_c loop offset from the
    slice), phase = in-plane field direction + a per-coil offset + a smooth linear term.
    """
    if num_coils < 1:
        raise ValueError(f"num_coils must be >= 1, got {num_coils}")
    rng = np.random.default_rng([seed, 3])
    Y, X, _ = _grid(_check_shape(shape))
    angle = 2 * np.pi * (np.arange(num_coils) + rng.uniform(-0.15, 0.15, num_coils)) / num_coils
    angle += rng.uniform(0, 2 * np.pi)
    radius = rng.uniform(1.15, 1.35, num_coils) * np.where(np.arange(num_coils) % 2, 1.05, 1.0)
    a = rng.uniform(0.4, 0.6, num_coils)[:, None, None]
    h = rng.uniform(-0.2, 0.2, num_coils)[:, None, None]
    dx = X - (radius * np.cos(angle))[:, None, None]
    dy = Y - (radius * np.sin(angle))[:, None, None]
    mag = a ** 2 / (a ** 2 + dx ** 2 + dy ** 2 + h ** 2) ** 1.5
    lin = rng.normal(0, 0.3, (num_coils, 2))
    phase = (np.arctan2(dy, dx) + rng.uniform(0, 2 * np.pi, num_coils)[:, None, None]
             + lin[:, 0, None, None] * X + lin[:, 1, None, None] * Y)
    S = mag * np.exp(1j * phase)
    S /= np.sqrt((np.abs(S) ** 2).sum(0, keepdims=True))
    return torch.from_numpy(S.astype(np.complex64))


def add_noise(kspace: Tensor, snr_db: float, seed: int = 0) -> Tensor:
    """k + n with n complex Gaussian, E|n|² = σ², SNR = 10 log10(mean |k|² / σ²) dB.

    mean |k|² is over the whole (fully sampled) k-space, equal by Parseval to the mean power
    of the coil images.
    """
    sigma = float(kspace.abs().square().mean().sqrt()) * 10 ** (-snr_db / 20)
    real = np.float64 if kspace.dtype == torch.complex128 else np.float32
    n = np.random.default_rng([seed, 4]).standard_normal((2, *kspace.shape), dtype=real)
    n = torch.complex(*torch.from_numpy(n * real(sigma / np.sqrt(2))))
    return kspace + n.to(kspace.device)


@dataclass(frozen=True)
class Task:
    """One reconstruction task: what is imaged and how it is sampled.

    ``held_out`` tasks are kept out of training (unseen mask family or acceleration) and used
    to test adaptation. Names read ``{anatomy}_{contrast}_{mask_family}{acceleration}``.
    """

    name: str
    anatomy: str
    contrast: str
    mask_family: str
    acceleration: float
    center_fraction: float = 0.08
    held_out: bool = False


def _task(anatomy: str, contrast: str, family: str, acceleration: float,
          held_out: bool = False) -> Task:
    name = f"{anatomy}_{contrast.lower()}_{family}{acceleration:g}"
    return Task(name, anatomy, contrast, family, acceleration, 0.08, held_out)


TASKS: dict[str, Task] = {t.name: t for t in (
    _task("brain", "T1", "random", 4),
    _task("brain", "T2", "equispaced", 4),
    _task("brain", "PD", "variable_density", 6),
    _task("knee", "PD", "equispaced", 4),
    _task("knee", "T2", "random", 6),
    _task("knee", "T1", "equispaced_fraction", 4),
    _task("abdomen", "T1", "random", 4),
    _task("abdomen", "T2", "variable_density", 6),
    _task("abdomen", "PD", "equispaced", 6),
    _task("brain", "T2", "poisson_disc", 6, held_out=True),
    _task("knee", "PD", "random", 8, held_out=True),
    _task("abdomen", "T1", "radial", 8, held_out=True),
)}


def make_task(task: Task | str, slices: int = 4, size: tuple[int, int] = (128, 128),
              coils: int = 8, seed: int = 0, snr_db: float | None = 30.0) -> dict:
    """One synthetic volume of ``task``: fully sampled multicoil k-space and its RSS reference.

    kspace_s,c = F(S_c x_s) + n (``add_noise``; ``snr_db=None`` for none), reference_s =
    RSS_c(F⁻¹ kspace_s,c). Returns ``kspace`` (S, C, H, W) complex64, ``reference`` (S, H, W)
    float32, ``sens`` (C, H, W) complex64 and ``attrs`` (fastMRI file attributes + task and
    mask settings). The mask is not applied: the data transform does that.
    """
    if isinstance(task, str):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
        task = TASKS[task]
    x = phantom(task.anatomy, task.contrast, slices, size, seed)
    sens = coil_maps(coils, size, seed)
    kspace = fft.fft2c(sens * x[:, None])
    if snr_db is not None:
        kspace = add_noise(kspace, snr_db, seed)
    reference = operators.rss(fft.ifft2c(kspace), dim=-3).float()
    plane = "COR" if task.anatomy == "knee" else "AX"
    attrs = {
        "acquisition": f"{plane}{task.contrast}_{task.anatomy.upper()}",
        "task": task.name,
        "max": float(reference.max()),
        "norm": float(reference.norm()),
        "patient_id": f"{task.anatomy}-{seed}",
        "mask_family": task.mask_family,
        "acceleration": float(task.acceleration),
        "center_fraction": float(task.center_fraction),
    }
    return {"kspace": kspace, "reference": reference, "sens": sens, "attrs": attrs}
