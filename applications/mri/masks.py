"""Undersampling masks: float32 0/1 tensors broadcastable to the k-space grid (H, W).

The k-space origin is the centre pixel (H // 2, W // 2) (see :mod:`applications.mri.fft`).
Cartesian masks follow fastMRI: phase-encode *columns* (last axis) are sampled, the
``n_low = round(W · center_fraction)`` centre columns start at ``(W − n_low + 1) // 2``, and
the mask has shape (1, W). Two-dimensional masks have shape (H, W). Every random mask is a
function of its ``seed`` only (a ``numpy.random.Generator``: fastMRI's formulas, not its
``RandomState`` streams). Masks are CPU tensors; the operators move them to the data's device.
``acceleration`` is H·W / (number of sampled points); ``make`` dispatches on a name in
``FAMILIES``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FAMILIES",
    "random_cartesian",
    "equispaced_cartesian",
    "equispaced_fraction",
    "variable_density",
    "poisson_disc",
    "radial",
    "acceleration",
    "make",
]

FAMILIES = ("random", "equispaced", "equispaced_fraction", "variable_density", "poisson_disc", "radial")

_GOLDEN_ANGLE = math.pi * (math.sqrt(5.0) - 1.0) / 2.0  # π/φ ≈ 111.25°, for full-diameter spokes
_POISSON_SLOPE = 1.0  # Poisson-disc radius grows as 1 + ρ from centre (ρ = 0) to corner (ρ = 1)


def _check_shape(shape: Sequence[int]) -> tuple[int, int]:
    dims = tuple(shape)
    if len(dims) != 2 or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in dims):
        raise ValueError(f"shape must be (H, W) with two positive integers, got {shape!r}")
    return int(dims[0]), int(dims[1])


def _check_acceleration(acceleration: float) -> None:
    if not (acceleration >= 1 and math.isfinite(acceleration)):
        raise ValueError(f"acceleration must be a finite number >= 1, got {acceleration}")


def _n_low(n: int, center_fraction: float) -> int:
    if not 0 < center_fraction < 1:
        raise ValueError(f"center_fraction must lie in (0, 1), got {center_fraction}")
    return round(n * center_fraction)


def _centre(n: int, n_low: int) -> slice:
    start = (n - n_low + 1) // 2
    return slice(start, start + n_low)


def _check_budget(sampled: int, total: int, acceleration: float, what: str) -> None:
    if sampled * acceleration >= total:
        raise ValueError(
            f"the fully sampled {what} ({sampled} of {total} points) already reaches 1/{acceleration} "
            f"of k-space; lower center_fraction (or calib) or the acceleration"
        )


def _tensor(mask: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))


def random_cartesian(
    shape: Sequence[int], acceleration: float, center_fraction: float, seed: int
) -> Tensor:
    """fastMRI RandomMaskFunc: centre columns plus each other column with probability
    p = (W/acc − n_low) / (W − n_low), so that E[#columns] = W/acc. Shape (1, W)."""
    _, w = _check_shape(shape)
    _check_acceleration(acceleration)
    n_low = _n_low(w, center_fraction)
    _check_budget(n_low, w, acceleration, "centre")
    rng = np.random.default_rng(seed)
    mask = rng.uniform(size=w) < (w / acceleration - n_low) / (w - n_low)
    mask[_centre(w, n_low)] = True
    return _tensor(mask[None])


def equispaced_cartesian(
    shape: Sequence[int], acceleration: float, center_fraction: float, seed: int
) -> Tensor:
    """fastMRI EquiSpacedMaskFunc: centre columns plus columns offset + k·acc, offset uniform in
    {0, …, round(acc) − 1}. The achieved acceleration is below the nominal one (the centre
    columns come on top of the W/acc equispaced ones). Non-integer ``acc`` rounds offset + k·acc.
    Shape (1, W)."""
    _, w = _check_shape(shape)
    _check_acceleration(acceleration)
    n_low = _n_low(w, center_fraction)
    rng = np.random.default_rng(seed)
    offset = rng.integers(0, round(acceleration))
    mask = np.zeros(w, dtype=bool)
    columns = np.round(np.arange(offset, w, acceleration)).astype(int)
    mask[columns[columns < w]] = True
    mask[_centre(w, n_low)] = True
    return _tensor(mask[None])


def equispaced_fraction(
    shape: Sequence[int], acceleration: float, center_fraction: float, seed: int
) -> Tensor:
    """fastMRI EquispacedMaskFractionFunc: centre columns plus columns spaced by
    a' = acc (n_low − W) / (n_low · acc − W), so that the total fraction is ≈ 1/acc. Shape (1, W)."""
    _, w = _check_shape(shape)
    _check_acceleration(acceleration)
    n_low = _n_low(w, center_fraction)
    _check_budget(n_low, w, acceleration, "centre")
    spacing = acceleration * (n_low - w) / (n_low * acceleration - w)
    rng = np.random.default_rng(seed)
    offset = rng.integers(0, round(spacing))
    mask = np.zeros(w, dtype=bool)
    mask[np.around(np.arange(offset, w - 1, spacing)).astype(int)] = True
    mask[_centre(w, n_low)] = True
    return _tensor(mask[None])


def _radius(h: int, w: int) -> np.ndarray:
    """Normalised k-space radius ρ ∈ [0, 1]: 0 at the centre pixel, ≈ 1 at the corners."""
    ky = (np.arange(h) - h // 2) / (h / 2)
    kx = (np.arange(w) - w // 2) / (w / 2)
    return np.sqrt((ky[:, None] ** 2 + kx[None, :] ** 2) / 2)


def variable_density(
    shape: Sequence[int], acceleration: float, seed: int, center_fraction: float = 0.08, sigma: float = 0.3
) -> Tensor:
    """2-D variable density: a fully sampled centre box (round(H·cf) × round(W·cf)) plus points
    drawn without replacement with weight exp(−ρ²/(2σ²)) (ρ the normalised radius) until exactly
    round(H·W/acc) points are sampled. Shape (H, W)."""
    h, w = _check_shape(shape)
    _check_acceleration(acceleration)
    mask = np.zeros((h, w), dtype=bool)
    mask[_centre(h, _n_low(h, center_fraction)), _centre(w, _n_low(w, center_fraction))] = True
    _check_budget(int(mask.sum()), h * w, acceleration, "centre")
    free = np.flatnonzero(~mask)
    weight = np.exp(-_radius(h, w).ravel()[free] ** 2 / (2 * sigma**2))
    # Efraimidis–Spirakis: the k smallest Exp(1)/weight keys are a weighted draw without replacement.
    keys = np.random.default_rng(seed).exponential(size=free.size) / weight
    extra = round(h * w / acceleration) - int(mask.sum())
    mask.ravel()[free[np.argsort(keys)[:extra]]] = True
    return _tensor(mask)


def _dart_throw(order: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Visit grid points in ``order``; keep a point unless it lies within the radius of a
    kept one, then block the disc of its own radius around it."""
    h, w = radius.shape
    kept = np.zeros((h, w), dtype=bool)
    blocked = np.zeros((h, w), dtype=bool)
    stencils: dict[int, np.ndarray] = {}
    quantised = np.ceil(radius * 4).astype(int)  # radii in quarter pixels
    for idx in order.tolist():
        y, x = divmod(idx, w)
        if blocked[y, x]:
            continue
        kept[y, x] = True
        q = int(quantised[y, x])
        if q not in stencils:
            d = np.arange(-(q // 4) - 1, q // 4 + 2)
            stencils[q] = d[:, None] ** 2 + d[None, :] ** 2 < (q / 4) ** 2
        disc = stencils[q]
        n = disc.shape[0] // 2
        y0, x0 = max(y - n, 0), max(x - n, 0)
        y1, x1 = min(y + n + 1, h), min(x + n + 1, w)
        blocked[y0:y1, x0:x1] |= disc[y0 - y + n : y1 - y + n, x0 - x + n : x1 - x + n]
    return kept


def poisson_disc(
    shape: Sequence[int], acceleration: float, seed: int, calib: int | tuple[int, int] = 12
) -> Tensor:
    """2-D variable-density Poisson disc: grid points in random order are kept unless they lie
    within r(k) = R·(1 + ρ) of a kept point (ρ the normalised radius), united with a fully
    sampled centre box of ``calib`` (int or (h, w)) pixels; R is tuned so that H·W/#points is
    within ~2% of ``acceleration``. Shape (H, W)."""
    h, w = _check_shape(shape)
    _check_acceleration(acceleration)
    ch, cw = (calib, calib) if isinstance(calib, (int, np.integer)) else tuple(calib)
    if not (1 <= ch <= h and 1 <= cw <= w):
        raise ValueError(f"calib must be a box inside (H, W) = ({h}, {w}), got {calib!r}")
    base = np.zeros((h, w), dtype=bool)
    base[_centre(h, ch), _centre(w, cw)] = True
    target = h * w / acceleration
    _check_budget(int(base.sum()), h * w, acceleration, "calibration box")
    order = np.random.default_rng(seed).permutation(h * w)
    profile = 1 + _POISSON_SLOPE * _radius(h, w)
    # Random sequential packing of discs of radius r reaches ≈ 0.7 / r² points per unit area.
    scale = math.sqrt(0.7 * float((1 / profile**2).sum()) / target)
    best, best_error = base, math.inf
    for _ in range(12):
        mask = base | _dart_throw(order, scale * profile)
        error = mask.sum() / target - 1
        if abs(error) < abs(best_error):
            best, best_error = mask, error
        if abs(error) < 0.02:
            break
        scale *= math.sqrt(1 + error)
    return _tensor(best)


def _radial(h: int, w: int, spokes: int) -> np.ndarray:
    angles = np.arange(spokes) * _GOLDEN_ANGLE
    t = np.arange(-math.ceil(math.hypot(h, w)), math.ceil(math.hypot(h, w)) + 1) * 0.5
    y = np.rint(h // 2 + np.sin(angles)[:, None] * t).astype(int).ravel()
    x = np.rint(w // 2 + np.cos(angles)[:, None] * t).astype(int).ravel()
    inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
    mask = np.zeros((h, w), dtype=bool)
    mask[y[inside], x[inside]] = True
    return mask


def radial(shape: Sequence[int], spokes: int) -> Tensor:
    """Golden-angle radial: spoke j is the full-diameter line through the k-space centre at angle
    j·π/φ (φ the golden ratio), rasterised at half-pixel steps to the nearest grid point. The
    first n spokes of any larger set are the same, so sampling grows with ``spokes``. Shape (H, W)."""
    h, w = _check_shape(shape)
    if not (isinstance(spokes, (int, np.integer)) and spokes >= 1):
        raise ValueError(f"spokes must be a positive integer, got {spokes!r}")
    return _tensor(_radial(h, w, int(spokes)))


def _radial_for(h: int, w: int, acceleration: float) -> Tensor:
    """Golden-angle radial mask whose number of spokes brings H·W/#points closest to ``acceleration``."""
    target = h * w / acceleration
    limit = 4 * (h + w)
    hi = 1
    while _radial(h, w, hi).sum() < target:
        if hi >= limit:
            raise ValueError(f"radial sampling cannot reach acceleration {acceleration} on shape ({h}, {w})")
        hi = min(2 * hi, limit)
    lo = hi // 2  # count(lo) < target <= count(hi) (or lo = 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _radial(h, w, mid).sum() < target else (lo, mid)
    candidates = [n for n in (lo, hi) if n >= 1]
    spokes = min(candidates, key=lambda n: abs(math.log(h * w / _radial(h, w, n).sum() / acceleration)))
    return _tensor(_radial(h, w, spokes))


def acceleration(mask: Tensor, shape: Sequence[int]) -> float:
    """Achieved acceleration H·W / #{sampled points of the mask broadcast to (H, W)}."""
    h, w = _check_shape(shape)
    if any(n != 1 for n in mask.shape[:-2]):
        raise ValueError(f"a mask of shape {tuple(mask.shape)} is not one (H, W) pattern; expected "
                         f"(W,), (1, W), (H, W) or those with leading axes of size 1")
    try:
        sampled = int(torch.broadcast_to(mask.reshape(mask.shape[-2:]), (h, w)).count_nonzero())
    except RuntimeError as e:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to (H, W) = "
                         f"({h}, {w})") from e
    if sampled == 0:
        raise ValueError("mask samples no k-space point")
    return h * w / sampled


def make(
    family: str, shape: Sequence[int], acceleration: float, center_fraction: float = 0.08, seed: int = 0
) -> Tensor:
    """Mask of ``family`` (one of ``FAMILIES``) at the target ``acceleration``.

    ``center_fraction`` sets the fully sampled centre (columns for Cartesian families, a
    round(H·cf) × round(W·cf) box for variable_density and poisson_disc); radial ignores it and
    ``seed`` and picks the number of golden-angle spokes closest to the target."""
    h, w = _check_shape(shape)
    _check_acceleration(acceleration)
    if family == "random":
        return random_cartesian(shape, acceleration, center_fraction, seed)
    if family == "equispaced":
        return equispaced_cartesian(shape, acceleration, center_fraction, seed)
    if family == "equispaced_fraction":
        return equispaced_fraction(shape, acceleration, center_fraction, seed)
    if family == "variable_density":
        return variable_density(shape, acceleration, seed, center_fraction=center_fraction)
    if family == "poisson_disc":
        calib = (max(1, _n_low(h, center_fraction)), max(1, _n_low(w, center_fraction)))
        return poisson_disc(shape, acceleration, seed, calib=calib)
    if family == "radial":
        return _radial_for(h, w, acceleration)
    raise ValueError(f"unknown mask family {family!r}; expected one of {', '.join(FAMILIES)}")
