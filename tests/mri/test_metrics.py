"""PSNR / SSIM / NMSE against scikit-image and fastMRI's definitions (volume data range)."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from applications.mri.metrics import nmse, psnr, ssim


@st.composite
def volumes(draw):
    """A target volume whose slices have different maxima, and a noisy prediction (float64)."""
    slices, h, w = draw(st.integers(1, 3)), draw(st.integers(7, 20)), draw(st.integers(7, 20))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    gt = rng.uniform(0, 1, (slices, h, w)) * rng.uniform(0.2, 3.0, (slices, 1, 1))
    pred = np.abs(gt + draw(st.floats(0.01, 0.5)) * rng.standard_normal(gt.shape))
    return gt, pred


@given(volumes())
def test_against_scikit_image(volume):
    gt, pred = volume
    rng = gt.max()
    expected_ssim = np.mean([structural_similarity(g, p, data_range=rng) for g, p in zip(gt, pred)])
    expected_psnr = peak_signal_noise_ratio(gt, pred, data_range=rng)
    expected_nmse = np.linalg.norm(gt - pred) ** 2 / np.linalg.norm(gt) ** 2
    t_gt, t_pred = torch.from_numpy(gt), torch.from_numpy(pred)
    assert abs(ssim(t_gt, t_pred).item() - expected_ssim) < 1e-5
    assert abs(psnr(t_gt, t_pred).item() - expected_psnr) < 1e-5
    assert abs(nmse(t_gt, t_pred).item() - expected_nmse) < 1e-5


def test_single_slice_and_data_range():
    g = torch.Generator().manual_seed(0)
    gt, pred = (torch.rand(2, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))
    g0, p0 = gt[0].numpy(), pred[0].numpy()
    whole = gt.max().item()
    assert ssim(gt[0], pred[0], data_range=whole).item() == pytest.approx(
        structural_similarity(g0, p0, data_range=whole), abs=1e-10
    )
    assert psnr(gt[0], pred[0]).item() == pytest.approx(
        peak_signal_noise_ratio(g0, p0, data_range=g0.max()), abs=1e-10
    )


def test_identical_images():
    x = torch.rand(2, 12, 12, dtype=torch.float64)
    assert ssim(x, x).item() == pytest.approx(1.0)
    assert nmse(x, x).item() == 0.0
    assert psnr(x, x).item() == float("inf")


def test_float32_and_gradient():
    gt = torch.rand(1, 10, 10)
    pred = torch.rand(1, 10, 10, requires_grad=True)
    value = ssim(gt, pred)
    assert value.dtype == torch.float32
    value.backward()
    assert torch.isfinite(pred.grad).all()


@pytest.mark.parametrize("metric", [psnr, ssim, nmse])
def test_bad_inputs(metric):
    with pytest.raises(ValueError, match="same shape"):
        metric(torch.rand(2, 8, 8), torch.rand(1, 8, 8))
    with pytest.raises(ValueError, match="real floating"):
        metric(torch.rand(8, 8, dtype=torch.complex64), torch.rand(8, 8, dtype=torch.complex64))
    with pytest.raises(ValueError, match="expected images"):
        metric(torch.rand(8), torch.rand(8))


def test_ssim_needs_the_window():
    with pytest.raises(ValueError, match="at least 7x7"):
        ssim(torch.rand(6, 9), torch.rand(6, 9))
