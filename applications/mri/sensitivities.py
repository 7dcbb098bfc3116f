"""Coil sensitivities from the k-space centre: ESPIRiT in torch, and low-resolution profiles.

Uecker et al., "ESPIRiT — an eigenvalue approach to autocalibrating parallel MRI", MRM 2014.
The k×k patches of the calibration region (all coils) span a low-dimensional signal subspace
with orthogonal projector P = V∥ V∥ᴴ. Every k-space patch is invariant under P; averaged over
the patches containing a sample and moved to image space this reads m(x) = G(x) m(x), with

    G(x)_{cc'} = (1/k²) Σ_{p,p'} P[(c,p),(c',p')] e^{2πi x·(p − p')/N},

a C×C Hermitian matrix per pixel. The coil sensitivities are its eigenvectors of eigenvalue
≈ 1: S(x) is the dominant eigenvector (torch.linalg.eigh, batched), zeroed where the eigenvalue
is below ``crop``, with the phase of a reference coil removed. Pure torch, any device.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from applications.mri import operators
from applications.mri.fft import ifft2c

__all__ = ["calibration_box", "estimate", "profiles"]

_MIN_CALIB = 5  # kernel width must stay below half the calibration width, and be at least 2


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair (h, w) of positive ints, got {value!r}")
    return pair


def _centred(n: int, size: int) -> tuple[int, int]:
    """Bounds of ``size`` centred lines out of ``n``, starting at (n − size + 1) // 2 (fastMRI)."""
    start = (n - size + 1) // 2
    return start, start + size


def _calibration_box(sampled: Tensor, size: tuple[int, int]) -> tuple[slice, slice]:
    """Fully sampled rectangle inside the centred box of ``size``, grown from the centre pixel:
    first as a square (all four sides at once), then one side at a time in turn."""
    h, w = sampled.shape
    if not sampled[h // 2, w // 2]:
        raise ValueError(
            "the k-space centre is not sampled; ESPIRiT needs a fully sampled calibration region"
        )
    (ylo, yhi), (xlo, xhi) = (_centred(n, min(s, n)) for n, s in zip((h, w), size))
    y0, y1, x0, x1 = h // 2, h // 2 + 1, w // 2, w // 2 + 1
    while (
        y0 > ylo and y1 < yhi and x0 > xlo and x1 < xhi
        and sampled[y0 - 1 : y1 + 1, x0 - 1 : x1 + 1].all()
    ):
        y0, y1, x0, x1 = y0 - 1, y1 + 1, x0 - 1, x1 + 1
    grown = True
    while grown:
        grown = False
        if y0 > ylo and sampled[y0 - 1, x0:x1].all():
            y0, grown = y0 - 1, True
        if y1 < yhi and sampled[y1, x0:x1].all():
            y1, grown = y1 + 1, True
        if x0 > xlo and sampled[y0:y1, x0 - 1].all():
            x0, grown = x0 - 1, True
        if x1 < xhi and sampled[y0:y1, x1].all():
            x1, grown = x1 + 1, True
    return slice(y0, y1), slice(x0, x1)


def _shift_matrix(k: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """T[d, p, p'] = 1 if p − p' = d − (k − 1), for d = 0 .. 2k − 2."""
    p = torch.arange(k, device=device)
    d = p[:, None] - p[None, :] + k - 1
    return (torch.arange(2 * k - 1, device=device)[:, None, None] == d).to(dtype)


def calibration_box(kspace: Tensor, calib_size: int | tuple[int, int]) -> tuple[slice, slice]:
    """The calibration region :func:`estimate` uses: the largest fully sampled rectangle grown
    from the centre inside the centred ``calib_size`` box (sampled: non-zero in any coil of
    any batch entry). The maps depend on the k-space only through this region."""
    *_, c, h, w = kspace.shape
    sampled = (kspace.reshape(-1, c, h, w) != 0).any(dim=(0, 1)).cpu()
    return _calibration_box(sampled, _pair(calib_size, "calib_size"))


def estimate(
    kspace: Tensor,
    calib_size: int | tuple[int, int],
    kernel_size: int | tuple[int, int] = 5,
    threshold: float = 0.02,
    crop: float = 0.95,
) -> Tensor:
    """ESPIRiT coil sensitivities S (..., C, H, W) from k-space (..., C, H, W), Σ_c |S_c|² = 1
    where kept, 0 elsewhere.

    ``calib_size`` (int or (h, w)) is the centred calibration box, clipped to the largest fully
    sampled rectangle around the centre (a point is sampled if any coil of any batch entry is
    non-zero there), so a 1-D Cartesian mask gives a tall, narrow box; each side needs ≥ 5
    lines. Each kernel side is clipped below half the calibration side. Singular vectors with
    σ > threshold·σ_max span the signal subspace; pixels whose top eigenvalue of G(x) is
    ≤ ``crop`` are zeroed. The phase is relative to coil 0. Batch entries share the
    calibration box, not the kernels.
    """
    if not isinstance(kspace, Tensor) or not kspace.is_complex() or kspace.dim() < 3:
        raise ValueError(
            f"kspace must be a complex tensor (..., C, H, W), got "
            f"{kspace.dtype if isinstance(kspace, Tensor) else type(kspace).__name__}"
            f"{' of shape ' + str(tuple(kspace.shape)) if isinstance(kspace, Tensor) else ''}"
        )
    kernel = _pair(kernel_size, "kernel_size")
    *batch, c, h, w = kspace.shape
    flat = kspace.reshape(-1, c, h, w)
    rows, cols = calibration_box(kspace, calib_size)
    calib = flat[:, :, rows, cols]
    ch, cw = calib.shape[-2:]
    if min(ch, cw) < _MIN_CALIB:
        raise ValueError(
            f"the fully sampled calibration region around the k-space centre is {ch}x{cw}; ESPIRiT "
            f"needs at least {_MIN_CALIB} lines along each axis (a kernel of width 2)"
        )
    kh, kw = (min(kn, (n - 1) // 2) for kn, n in zip(kernel, (ch, cw)))

    # Calibration matrix: one row per kh×kw patch position, columns (coil, ky, kx).
    patches = calib.unfold(-2, kh, 1).unfold(-2, kw, 1)  # (B, C, nh, nw, kh, kw)
    b, _, nh, nw = patches.shape[:4]
    matrix = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, nh * nw, c * kh * kw)
    _, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = (s > threshold * s[:, :1]).to(vh.dtype)
    # Projector onto the row space: P[(c,p),(c',p')] = Σ_j keep_j Vh[j,(c,p)] conj(Vh[j,(c',p')]).
    proj = torch.einsum("bj,bji,bjk->bik", keep, vh, vh.conj()).reshape(b, c, kh, kw, c, kh, kw)

    # Fourier coefficients of G: Ĝ_{cc'}(d) = Σ_{p − p' = d} P[(c,p),(c',p')], |d_i| ≤ k_i − 1.
    ty = _shift_matrix(kh, flat.device, proj.dtype)
    tx = _shift_matrix(kw, flat.device, proj.dtype)
    g_hat = torch.einsum("ncyxdab,Yya,Xxb->ncdYX", proj, ty, tx)
    padded = g_hat.new_zeros(b, c, c, h, w)
    padded[..., h // 2 - kh + 1 : h // 2 + kh, w // 2 - kw + 1 : w // 2 + kw] = g_hat
    gram = ifft2c(padded) * (math.sqrt(h * w) / (kh * kw))  # G(x), (B, C, C, H, W)
    values, vectors = torch.linalg.eigh(gram.permute(0, 3, 4, 1, 2))  # ascending eigenvalues
    maps = vectors[..., -1] * (values[..., -1] > crop).unsqueeze(-1)  # (B, H, W, C)
    ref = maps[..., :1]
    phase = torch.where(ref.abs() > 0, ref.conj() / ref.abs().clamp_min(torch.finfo(values.dtype).tiny), 1)
    return (maps * phase).permute(0, 3, 1, 2).reshape(*batch, c, h, w)


def profiles(kspace: Tensor, radius: float = 0.08) -> Tensor:
    """Low-resolution coil profiles ``P_c = ũ_c / RSS(ũ)`` (..., C, H, W), Σ_c |P_c|² = 1.

    ``ũ = F⁻¹(f · D)`` are the coil images of the measured k-space ``f`` inside the centred
    disc ``D = {(k_y/H)² + (k_x/W)² ≤ radius²}``, so any mask that samples its centre works
    (radial and 2-D masks included) and nothing is fitted: no calibration box, no kernel, no
    parameters. The object's low-resolution image divides out, so P is smooth, and coarser than
    ESPIRiT's maps at the object's edges; where ``RSS(ũ)`` vanishes P does too.
    """
    if not isinstance(kspace, Tensor) or not kspace.is_complex() or kspace.dim() < 3:
        raise ValueError(f"kspace must be a complex tensor (..., C, H, W), got "
                         f"{kspace.dtype if isinstance(kspace, Tensor) else type(kspace).__name__}")
    if not 0 < radius <= 0.5:
        raise ValueError(f"radius must be in (0, 0.5] (a fraction of the sampling rate), got {radius}")
    H, W = kspace.shape[-2:]
    y = (torch.arange(H, device=kspace.device) - H // 2).view(-1, 1) / H
    x = (torch.arange(W, device=kspace.device) - W // 2).view(1, -1) / W
    low = ifft2c(kspace * (y**2 + x**2 <= radius**2))
    norm = operators.rss(low, dim=-3).unsqueeze(-3)
    floor = torch.finfo(norm.dtype).tiny + 1e-6 * norm.amax(dim=(-3, -2, -1), keepdim=True)
    return low / norm.clamp_min(floor)
