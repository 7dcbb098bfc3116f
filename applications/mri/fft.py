"""Centred, orthonormal 2-D Fourier transforms over the last two axes.

``fft2c(x) = fftshift(fft2(ifftshift(x), norm="ortho"))``: the k-space origin sits at the
centre pixel ``(H // 2, W // 2)``, and the transform is unitary, so ``ifft2c`` is its adjoint
and its inverse. Every other MRI module goes through these two functions.
"""
from __future__ import annotations

import torch

DIMS = (-2, -1)


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D DFT of a complex image over its last two axes."""
    x = torch.fft.ifftshift(x, dim=DIMS)
    return torch.fft.fftshift(torch.fft.fft2(x, dim=DIMS, norm="ortho"), dim=DIMS)


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal inverse 2-D DFT of complex k-space over its last two axes."""
    k = torch.fft.ifftshift(k, dim=DIMS)
    return torch.fft.fftshift(torch.fft.ifft2(k, dim=DIMS, norm="ortho"), dim=DIMS)
