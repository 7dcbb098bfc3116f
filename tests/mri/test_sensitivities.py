"""ESPIRiT sensitivities on simulated multi-coil data, at the smallest calibration we ship."""

import pytest
import torch

from applications.mri import masks
from applications.mri.baselines import cg_sense
from applications.mri.metrics import psnr
from applications.mri.operators import apply_mask
from applications.mri.sensitivities import estimate, profiles

from .simulated import N, simulate


def coherence(a, b):
    """|⟨a, b⟩| / (‖a‖ ‖b‖) per pixel over the coil axis."""
    norms = torch.linalg.vector_norm(a, dim=-3) * torch.linalg.vector_norm(b, dim=-3)
    return (a.conj() * b).sum(-3).abs() / norms.clamp_min(1e-30)


@pytest.fixture(scope="module")
def data():
    return simulate()


@pytest.mark.parametrize(
    "family, acc, dtype",
    [
        ("random", 8, torch.complex128),  # round(96 · 0.08) = 8 centre lines: kernel width 3
        ("equispaced", 4, torch.complex64),
        ("poisson_disc", 4, torch.complex128),  # 8×8 calibration box in a 2-D mask
    ],
)
def test_maps_match_the_truth_on_the_object(data, family, acc, dtype):
    obj, sens, kspace, inside = data
    mask = masks.make(family, (N, N), acc, seed=0)
    est = estimate(apply_mask(kspace, mask).to(dtype), calib_size=24)
    assert est.dtype == dtype and est.shape == sens.shape
    assert coherence(est.to(sens.dtype), sens)[inside].min() >= 0.98  # measured 0.996–0.998
    norm = torch.linalg.vector_norm(est, dim=-3)[inside]
    torch.testing.assert_close(norm, torch.ones_like(norm), atol=1e-5, rtol=0)


def test_smallest_calibration_five_lines():
    """round(64 · 0.08) = 5 centre lines, the fewest ``estimate`` accepts: kernel width 2."""
    _, sens, kspace, inside = simulate(n=64)
    est = estimate(apply_mask(kspace, masks.random_cartesian((64, 64), 8, 0.08, seed=0)), calib_size=32)
    assert coherence(est, sens)[inside].min() >= 0.98  # measured 0.991


def test_four_lines_are_too_few(data):
    _, _, kspace, _ = data
    with pytest.raises(ValueError, match="at least 5 lines"):
        estimate(apply_mask(kspace, masks.random_cartesian((N, N), 8, 0.04, seed=0)), calib_size=32)


def test_phase_is_relative_to_coil_0(data):
    _, _, kspace, inside = data
    est = estimate(apply_mask(kspace, masks.make("random", (N, N), 4)), calib_size=24)
    assert est[0].imag[inside].abs().max() < 1e-12 and (est[0].real[inside] > 0).all()


def test_calibration_box_is_clipped_to_what_is_sampled(data):
    _, _, kspace, _ = data
    k = apply_mask(kspace, masks.random_cartesian((N, N), 8, 0.08, seed=0))  # 8 centre columns
    torch.testing.assert_close(estimate(k, 24), estimate(k, (24, 8)), rtol=0, atol=0)


def test_cg_sense_with_estimated_maps_is_as_good_as_with_true_maps(data):
    obj, sens, kspace, _ = data
    mask = masks.random_cartesian((N, N), 4, 0.08, seed=0)
    est = estimate(apply_mask(kspace, mask), calib_size=24)
    true_psnr = psnr(obj.abs(), cg_sense(kspace, mask, sens).abs())
    est_psnr = psnr(obj.abs(), cg_sense(kspace, mask, est).abs())
    assert est_psnr >= true_psnr - 0.5  # measured 27.5 vs 26.3 dB: the maps' support crops background noise


def test_batch_entries_are_estimated_independently(data):
    _, _, kspace, _ = data
    mask = masks.random_cartesian((N, N), 4, 0.08, seed=0)
    other = simulate(seed=1)[2]
    k = apply_mask(torch.stack([kspace, other]), mask)
    batched = estimate(k, 24)
    torch.testing.assert_close(batched[1], estimate(k[1], 24))


def test_errors(data):
    _, _, kspace, _ = data
    with pytest.raises(ValueError, match="complex"):
        estimate(kspace.real, 24)
    hole = kspace.clone()
    hole[..., N // 2, N // 2] = 0
    with pytest.raises(ValueError, match="centre is not sampled"):
        estimate(hole, 24)
    with pytest.raises(ValueError, match="calib_size"):
        estimate(kspace, (24, 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(data):
    _, _, kspace, _ = data
    k = apply_mask(kspace, masks.random_cartesian((N, N), 4, 0.08, seed=0))
    cpu, gpu = estimate(k, 24), estimate(k.cuda(), 24).cpu()
    assert coherence(gpu, cpu)[torch.linalg.vector_norm(cpu, dim=-3) > 0].min() > 1 - 1e-6


@pytest.mark.parametrize("family, acc", [("random", 4), ("equispaced", 4), ("radial", 8),
                                         ("poisson_disc", 6), ("variable_density", 6)])
def test_profiles_follow_the_true_maps_for_every_mask(data, family, acc):
    """The low-resolution profiles need no calibration box (radial included): unit norm over
    the coils and, up to the object's phase, close to the true maps (measured coherence
    ≥ 0.95 everywhere on the object, ≥ 0.997 on average)."""
    obj, sens, kspace, inside = data
    p = profiles(apply_mask(kspace, masks.make(family, (N, N), acc, seed=0)))
    assert p.shape == sens.shape and p.dtype == sens.dtype
    norm = torch.linalg.vector_norm(p, dim=-3)[inside]
    torch.testing.assert_close(norm, torch.ones_like(norm), atol=1e-12, rtol=0)
    c = coherence(p, sens)[inside]
    assert c.min() >= 0.94 and c.mean() >= 0.995


def test_profiles_are_zero_without_signal_and_refuse_bad_input():
    assert profiles(torch.zeros(2, 3, 8, 8, dtype=torch.complex64)).abs().max() == 0
    with pytest.raises(ValueError, match="complex tensor"):
        profiles(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match=r"radius must be in \(0, 0.5\]"):
        profiles(torch.zeros(3, 8, 8, dtype=torch.complex64), radius=0.0)

def test_maps_do_not_depend_on_the_phase_eigh_returns(monkeypatch):
    """Eigenvectors are defined up to a phase, which differs between LAPACK builds and CUDA;
    the maps' phase is fixed relative to coil 0 whatever eigh returns."""
    _, _, k, _ = simulate()
    y = apply_mask(k, masks.make("random", (N, N), 4, seed=0))
    ref = estimate(y, 24)
    eigh = torch.linalg.eigh

    def rotated(a):
        w, v = eigh(a)
        g = torch.Generator().manual_seed(0)
        phase = torch.exp(2j * torch.pi * torch.rand(v.shape[:-2] + (1, v.shape[-1]), generator=g,
                                                   dtype=torch.float64))
        return w, v * phase.to(v.dtype)

    monkeypatch.setattr(torch.linalg, "eigh", rotated)
    torch.testing.assert_close(estimate(y, 24), ref)


def test_maps_vanish_far_outside_the_object():
    """The eigenvalue crop zeroes the maps where no signal is (the phantom fills an ellipse
    of half-axes 0.75 × 0.9)."""
    _, _, k, _ = simulate()
    est = estimate(apply_mask(k, masks.make("random", (N, N), 4, seed=0)), 24)
    t = torch.linspace(-1, 1, N, dtype=torch.float64)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    far = (xx / 0.75) ** 2 + (yy / 0.9) ** 2 > 1.5
    assert float(est[:, far].abs().max()) == 0
