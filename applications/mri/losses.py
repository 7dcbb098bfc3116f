"""Training loss of the unrolled network (docs/mri.md, "The network"), and the upper objective.

    ℓ = ‖RSS(u_T) − RSS(u*)‖₁  +  ‖u_T − u*‖²  +  0.01 ‖u_0 − u*‖₁      (means over pixels)

with ``u*`` the fully sampled coil images and ``RSS(u*)`` the reference, both divided by the
sample's normalisation ``scale``; a reference smaller than the image (fastMRI's 320 × 320
``reconstruction_rss`` of 640 × 368 k-space) is compared with the image's centre crop.
**Decision:** the image term uses ``RSS(u_T)``, not the learned combination ``|J(u_T)|``, so that the loss depends on the final state only and carries
no parameters — the contract every costate solver relies on (a parameter inside the loss would
get no gradient from the sweep). The ``u_0`` term is a loss on the initial state, added by
:class:`bilevelkit.trainers.TerminalLoss`'s ``initial`` hook. Optional: ``ssim_weight`` adds
``w·(1 − SSIM)`` of the magnitude images.

The upper level (the Ω steps) sees the same loss slice by slice, through :meth:`ReconLoss.mean_log`:
the mean over validation slices of ``log ℓ(slice)`` (``--upper-loss log``, the default), in
which every slice counts by its relative error, as in a mean of PSNRs; with the plain mean
(``--upper-loss mean``) the slices with the largest errors weigh most in its steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from applications.mri import metrics, operators

__all__ = ["ReconLoss", "reconstruction"]


def reconstruction(u: Tensor) -> Tensor:
    """The magnitude image ``RSS(u)`` (B, H, W) of a state (coil images, or (B, 1, H, W))."""
    return operators.rss(u, dim=1)


def _coil_target(batch: dict, state: Tensor) -> Tensor:
    target = batch["coil_target"]
    if state.shape[1] == 1 and target.shape[1] != 1:  # SENSE state: coil-combined target
        target = (batch["sens"].conj() * target).sum(1, keepdim=True)
    return target


@dataclass(frozen=True)
class ReconLoss:
    """``terminal(u_T, batch)`` and ``initial(u_0, batch)`` parts of the loss."""

    image_weight: float = 1.0
    coil_weight: float = 1.0
    initial_weight: float = 0.01
    ssim_weight: float = 0.0

    def terminal(self, u_T: Tensor, batch: dict, per_slice: bool = False) -> Tensor:
        """``‖RSS(u_T) − ref‖₁ + ‖u_T − u*‖² (+ w(1 − SSIM))``; with ``per_slice`` one value
        per slice of the batch, ``(B,)`` (SSIM then takes each slice's own maximum as range)."""
        ref = batch["target"]
        # a reference smaller than the k-space's image (fastMRI: 320 × 320 of 640 × 368) is
        # compared with the image's centre, as fastMRI's metrics do
        image = operators.center_crop(reconstruction(u_T), ref.shape)
        ref = ref.to(image.dtype)
        mean = _per_slice if per_slice else Tensor.mean
        loss = self.image_weight * mean((image - ref).abs())
        loss = loss + self.coil_weight * mean((u_T - _coil_target(batch, u_T)).abs().pow(2))
        if self.ssim_weight:
            def ssim(r: Tensor, x: Tensor) -> Tensor:  # an all-zero reference: SSIM 1 if x = 0, not 0/0
                return metrics.ssim(r, x, data_range=r.max().clamp_min(torch.finfo(r.dtype).eps))
            loss = loss + self.ssim_weight * (1 - (torch.stack([ssim(r, x) for r, x in zip(ref, image)])
                                                   if per_slice else ssim(ref, image)))
        return loss

    def initial(self, u_0: Tensor, batch: dict, per_slice: bool = False) -> Tensor:
        """``0.01 ‖u_0 − u*‖₁`` (with ``per_slice``: per slice, ``(B,)``)."""
        mean = _per_slice if per_slice else Tensor.mean
        return self.initial_weight * mean((u_0 - _coil_target(batch, u_0)).abs())

    def mean_log(self, u_T: Tensor, batch: dict, u_0: Tensor | None = None) -> Tensor:
        """The mean over slices of ``log(terminal + initial)`` of each slice (``initial`` only
        with ``u_0``): each slice counts by its relative change, as in a mean of PSNRs, so a
        slice reconstructed well weighs as much as a hard one (``--upper-loss log``). A slice
        of loss exactly 0 (an all-zero slice, which the network returns as zeros) counts as 0
        with no gradient, instead of making the objective −∞."""
        loss = self.terminal(u_T, batch, per_slice=True)
        if u_0 is not None:
            loss = loss + self.initial(u_0, batch, per_slice=True)
        return torch.where(loss > 0, loss, torch.ones_like(loss)).log().mean()


def _per_slice(x: Tensor) -> Tensor:
    """The mean over every axis but the first (the batch)."""
    return x.flatten(1).mean(1)
