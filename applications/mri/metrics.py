"""Image quality metrics with fastMRI's conventions, in torch (any device, differentiable).

Inputs are real magnitude volumes (slices, H, W) (any leading axes are slices; (H, W) is one
slice). The data range is the maximum of the whole target volume, not of each slice.

- ``nmse`` = ‖gt − pred‖² / ‖gt‖² over the volume.
- ``psnr`` = 10 log10(range² / MSE) over the volume.
- ``ssim``: per slice, 7×7 uniform window, K1 = 0.01, K2 = 0.03, sample covariances (N/(N−1)),
  averaged over the valid window positions (a 3-pixel border cropped, as scikit-image's
  ``structural_similarity``), then over slices.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["psnr", "ssim", "nmse"]

_WIN = 7
_K1, _K2 = 0.01, 0.03


def _check(gt: Tensor, pred: Tensor) -> tuple[Tensor, Tensor]:
    for name, x in (("gt", gt), ("pred", pred)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            kind = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a real floating tensor (a magnitude image), got {kind}")
    if gt.shape != pred.shape:
        raise ValueError(
            f"gt and pred must have the same shape, got {tuple(gt.shape)} and {tuple(pred.shape)}"
        )
    if gt.dim() < 2:
        raise ValueError(f"expected images (slices, H, W) or (H, W), got shape {tuple(gt.shape)}")
    return gt.reshape(-1, *gt.shape[-2:]), pred.reshape(-1, *pred.shape[-2:])


def _range(gt: Tensor, data_range: float | None) -> Tensor | float:
    return gt.max() if data_range is None else data_range


def _window_mean(x: Tensor) -> Tensor:
    """Mean over every 7×7 window lying inside the image (valid positions only)."""
    return F.avg_pool2d(x, _WIN, stride=1)


def nmse(gt: Tensor, pred: Tensor) -> Tensor:
    """Normalised MSE ‖gt − pred‖² / ‖gt‖² over the volume."""
    gt, pred = _check(gt, pred)
    return (gt - pred).square().sum() / gt.square().sum()


def psnr(gt: Tensor, pred: Tensor, data_range: float | None = None) -> Tensor:
    """PSNR = 10 log10(R² / MSE) in dB, R = data_range or the target volume's maximum."""
    gt, pred = _check(gt, pred)
    return 10 * torch.log10(_range(gt, data_range) ** 2 / (gt - pred).square().mean())


def ssim(gt: Tensor, pred: Tensor, data_range: float | None = None) -> Tensor:
    """Mean SSIM = mean over slices and valid 7×7 windows of
    (2μ_xμ_y + C1)(2σ_xy + C2) / ((μ_x² + μ_y² + C1)(σ_x² + σ_y² + C2)), C_i = (K_i R)²."""
    gt, pred = _check(gt, pred)
    if min(gt.shape[-2:]) < _WIN:
        raise ValueError(f"ssim needs images of at least {_WIN}x{_WIN} pixels, got {tuple(gt.shape[-2:])}")
    r = _range(gt, data_range)
    c1, c2 = (_K1 * r) ** 2, (_K2 * r) ** 2
    x, y = gt.unsqueeze(1), pred.unsqueeze(1)
    mx, my = _window_mean(x), _window_mean(y)
    cov = _WIN**2 / (_WIN**2 - 1)
    vx = cov * (_window_mean(x * x) - mx * mx)
    vy = cov * (_window_mean(y * y) - my * my)
    vxy = cov * (_window_mean(x * y) - mx * my)
    s = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).mean()
