"""MRI measurement operators (docs/mri.md): masked, centred, orthonormal Fourier sampling.

- ``SenseOperator``: A v = (M F (S_c v))_c,  Aᴴ y = Σ_c S_c* F⁻¹ (M y_c).
- ``CoilOperator`` (calibration-free): A u = (M F u_c)_c,  Aᴴ y = (F⁻¹ (M y_c))_c.

Shapes: coil axis -3, image axes -2, -1, any leading batch axes. Images and k-space are
complex (complex64 or complex128). A mask M is a real tensor whose last two axes broadcast to
(H, W) (a Cartesian column mask is (1, W)); leading mask axes broadcast against the data's
leading axes. Masking adds ``+ 0.0`` so that no ``-0.0`` survives where M = 0 (fastMRI).

``normal`` (AᴴA, what CG and the unrolled gradient steps apply) never forms the centred
transforms: F⁻¹ M² F = shift ∘ ifft2 ∘ (shift⁻¹ M²) ∘ fft2 ∘ shift⁻¹ (shift = fftshift), so
the two inner shifts cancel into an uncentred mask (and, for SENSE, uncentred maps) computed
at the operator's first ``normal``: two shifts of the image instead of four of the k-space,
one mask product instead of two, and the same numbers bit for bit
(``benchmarks/operators.py``). An operator whose maps or mask require grad recomputes them
every call, so each call has a graph of its own.
"""
from __future__ import annotations

import torch
from torch import Tensor

from applications.mri.fft import DIMS, fft2c, ifft2c

__all__ = ["SenseOperator", "CoilOperator", "rss", "apply_mask", "center_crop"]


def _check_mask(mask: Tensor) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.is_complex():
        raise ValueError(f"mask must be real (0/1 weights), got dtype {mask.dtype}")
    if mask.dim() < 2:
        raise ValueError(
            f"mask must have at least 2 axes broadcastable to (H, W), e.g. (1, W) or (H, W); "
            f"got shape {tuple(mask.shape)}"
        )
    return mask


def _check_fits(mask: Tensor, x: Tensor) -> None:
    """The mask's last two axes broadcast to the (H, W) of ``x`` (k-space or images)."""
    h, w = x.shape[-2:]
    mh, mw = mask.shape[-2:]
    if mh not in (1, h) or mw not in (1, w):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not broadcast to the k-space image axes "
            f"(H, W) = ({h}, {w}); expected last two axes in {{1, {h}}} x {{1, {w}}}"
        )


def apply_mask(k: Tensor, mask: Tensor) -> Tensor:
    """M k + 0.0: zero the unsampled k-space locations, leaving +0.0 (never -0.0) there."""
    _check_mask(mask)
    _check_fits(mask, k)
    return k * mask.to(device=k.device, dtype=k.real.dtype) + 0.0


def _uncentred_square(mask: Tensor, like: Tensor) -> Tensor:
    """``ifftshift(M²)`` in ``like``'s real dtype and device: the mask of F⁻¹ M² F between the
    uncentred ``fft2``/``ifft2`` (a size-1 mask axis is unaffected by the shift)."""
    m = mask.to(device=like.device, dtype=like.real.dtype)
    return torch.fft.ifftshift(m * m, dim=DIMS)


def _between_shifts(x: Tensor, uncentred_mask: Tensor) -> Tensor:
    """``ifft2(M' · fft2(x))`` over the last two axes: F⁻¹ M² F without its outer shifts, for an
    uncentred image ``x`` and M' = :func:`_uncentred_square`."""
    k = torch.fft.fft2(x, dim=DIMS, norm="ortho")
    return torch.fft.ifft2(k * uncentred_mask, dim=DIMS, norm="ortho")


def _check_complex(x: Tensor, name: str, min_dim: int) -> None:
    if not isinstance(x, Tensor) or not x.is_complex():
        kind = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a complex tensor, got {kind}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} axes, got shape {tuple(x.shape)}")


class SenseOperator:
    """SENSE forward model with known coil sensitivities S (..., C, H, W) and mask M.

    ``forward``: v (..., H, W) -> (M F (S_c v))_c (..., C, H, W);
    ``adjoint``: y -> Σ_c S_c* F⁻¹(M y_c);  ``normal`` = AᴴA.
    """

    def __init__(self, sens: Tensor, mask: Tensor) -> None:
        _check_complex(sens, "sens", 3)
        self.sens = sens
        self.mask = _check_mask(mask)
        self._uncentred: tuple[Tensor, Tensor, Tensor] | None = None

    def _check_image(self, v: Tensor) -> None:
        _check_complex(v, "image", 2)
        if v.shape[-2:] != self.sens.shape[-2:]:
            raise ValueError(
                f"image shape {tuple(v.shape)} does not match the sensitivities' image axes "
                f"{tuple(self.sens.shape[-2:])}"
            )

    def forward(self, v: Tensor) -> Tensor:
        """A v = (M F (S_c v))_c."""
        self._check_image(v)
        return apply_mask(fft2c(self.sens * v.unsqueeze(-3)), self.mask)

    def adjoint(self, y: Tensor) -> Tensor:
        """Aᴴ y = Σ_c S_c* F⁻¹(M y_c)."""
        _check_complex(y, "k-space", 3)
        if y.shape[-3:] != self.sens.shape[-3:]:
            raise ValueError(
                f"k-space shape {tuple(y.shape)} does not match the sensitivities' "
                f"(C, H, W) = {tuple(self.sens.shape[-3:])}"
            )
        return (self.sens.conj() * ifft2c(apply_mask(y, self.mask))).sum(dim=-3)

    def normal(self, v: Tensor) -> Tensor:
        """AᴴA v = Σ_c S_c* F⁻¹ M² F (S_c v), computed with the shifts of F, F⁻¹ cancelled."""
        self._check_image(v)
        _check_fits(self.mask, v)
        uncentred = self._uncentred
        if uncentred is None:
            sens = torch.fft.ifftshift(self.sens, dim=DIMS)
            uncentred = sens, sens.conj(), _uncentred_square(self.mask, sens)
            if not (self.sens.requires_grad or self.mask.requires_grad):
                self._uncentred = uncentred  # kept: the maps and the mask are constants
        sens, sens_conj, mask = uncentred
        coils = sens * torch.fft.ifftshift(v, dim=DIMS).unsqueeze(-3)
        return torch.fft.fftshift((sens_conj * _between_shifts(coils, mask)).sum(dim=-3), dim=DIMS)


class CoilOperator:
    """Calibration-free model on coil images u (..., C, H, W) with mask M.

    ``forward``: u -> (M F u_c)_c;  ``adjoint``: y -> (F⁻¹(M y_c))_c;  ``normal`` = AᴴA.
    """

    def __init__(self, mask: Tensor) -> None:
        self.mask = _check_mask(mask)
        self._uncentred: Tensor | None = None

    def forward(self, u: Tensor) -> Tensor:
        """A u = (M F u_c)_c."""
        _check_complex(u, "coil images", 3)
        return apply_mask(fft2c(u), self.mask)

    def adjoint(self, y: Tensor) -> Tensor:
        """Aᴴ y = (F⁻¹(M y_c))_c."""
        _check_complex(y, "k-space", 3)
        return ifft2c(apply_mask(y, self.mask))

    def normal(self, u: Tensor) -> Tensor:
        """AᴴA u = (F⁻¹ M² F u_c)_c (M² = M for a binary mask), the shifts of F, F⁻¹ cancelled."""
        _check_complex(u, "coil images", 3)
        _check_fits(self.mask, u)
        mask = self._uncentred
        if mask is None or mask.dtype != u.real.dtype or mask.device != u.device:
            mask = _uncentred_square(self.mask, u)
            if not self.mask.requires_grad:
                self._uncentred = mask
        return torch.fft.fftshift(_between_shifts(torch.fft.ifftshift(u, dim=DIMS), mask), dim=DIMS)


def rss(coil_images: Tensor, dim: int = -3) -> Tensor:
    """Root-sum-of-squares RSS(u) = (Σ_c |u_c|²)^{1/2} along ``dim``; real output."""
    return torch.linalg.vector_norm(coil_images, dim=dim)


def center_crop(x: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """The centre ``shape[-2:]`` of the last two axes (fastMRI's crop: the top-left corner at
    ``((H − h) // 2, (W − w) // 2)``); ``x`` itself when the sizes already agree."""
    (H, W), (h, w) = x.shape[-2:], tuple(shape)[-2:]
    if (h, w) == (H, W):
        return x
    if h > H or w > W:
        raise ValueError(f"cannot crop ({H}, {W}) to the larger ({h}, {w})")
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top:top + h, left:left + w]
