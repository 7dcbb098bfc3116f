"""Synthetic anatomies, coil maps, noise and the task catalogue (applications.mri.phantoms)."""
import re

import numpy as np
import pytest
import torch

from applications.mri import fft, masks, operators, phantoms

SHAPE = (48, 48)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _laplacian_fraction(img: np.ndarray) -> float:
    """Fraction of object pixels where the 5-point Laplacian is not ~0."""
    lap = 4 * img[1:-1, 1:-1] - img[:-2, 1:-1] - img[2:, 1:-1] - img[1:-1, :-2] - img[1:-1, 2:]
    inside = img[1:-1, 1:-1] > 0.1 * img.max()
    return float((np.abs(lap[inside]) > 1e-3 * img.max()).mean())


def test_anatomies_differ():
    x = {a: phantoms.phantom(a, "PD", 1, SHAPE, seed=0).abs() for a in phantoms.ANATOMIES}
    for a in phantoms.ANATOMIES:
        for b in phantoms.ANATOMIES:
            if a < b:
                assert _relative(x[a], x[b]) > 0.3, (a, b)


def test_contrasts_differ_on_the_same_anatomy():
    x = {c: phantoms.phantom("brain", c, 1, SHAPE, seed=3).abs() for c in phantoms.CONTRASTS}
    support = {c: x[c] > 0.02 for c in x}
    for a, b in (("T1", "T2"), ("T1", "PD"), ("T2", "PD")):
        assert _relative(x[a], x[b]) > 0.15, (a, b)
        assert (support[a] == support[b]).float().mean() > 0.97  # same geometry


def test_images_are_textured_not_piecewise_constant():
    yy, xx = np.mgrid[:48, :48]
    disc = ((yy - 24) ** 2 + (xx - 24) ** 2 < 15**2).astype(float)  # the oracle fails it
    assert _laplacian_fraction(disc) < 0.2
    for a in phantoms.ANATOMIES:
        img = phantoms.phantom(a, "T1", 1, SHAPE, seed=1)[0].abs().numpy()
        assert _laplacian_fraction(img) > 0.9, a


def test_phantom_is_complex_with_smooth_nonconstant_phase():
    x = phantoms.phantom("knee", "T2", 2, SHAPE, seed=0)
    assert x.shape == (2, *SHAPE) and x.dtype == torch.complex64
    inside = x.abs() > 0.1 * x.abs().max()
    assert x.angle()[inside].std() > 0.1
    # phase is smooth: neighbouring object pixels differ by far less than π
    step = (x[:, :, 1:] * x[:, :, :-1].conj()).angle().abs()
    assert step[inside[:, :, 1:] & inside[:, :, :-1]].median() < 0.2


def test_phantom_deterministic_and_varies_per_slice_and_seed():
    a = phantoms.phantom("abdomen", "T1", 3, SHAPE, seed=5)
    assert torch.equal(a, phantoms.phantom("abdomen", "T1", 3, SHAPE, seed=5))
    assert _relative(a, phantoms.phantom("abdomen", "T1", 3, SHAPE, seed=6)) > 0.1
    assert _relative(a[0], a[2]) > 0.1


@pytest.mark.parametrize("shape", [(33, 47), (64, 40)])
def test_phantom_odd_and_rectangular_shapes(shape):
    x = phantoms.phantom("brain", "PD", 1, shape, seed=0)
    assert x.shape == (1, *shape) and torch.isfinite(x).all() and x.abs().max() > 0.1


@pytest.mark.parametrize("kwargs, match", [
    ({"anatomy": "liver"}, "anatomy"), ({"contrast": "FLAIR"}, "contrast"),
    ({"slices": 0}, "slices"), ({"shape": (4, 48)}, "shape"),
])
def test_phantom_rejects_bad_input(kwargs, match):
    args = {"anatomy": "brain", "contrast": "T1", "slices": 1, "shape": SHAPE, **kwargs}
    with pytest.raises(ValueError, match=match):
        phantoms.phantom(**args)


@pytest.mark.parametrize("num_coils", [4, 8, 16])
def test_coil_maps_normalised_and_localised(num_coils):
    S = phantoms.coil_maps(num_coils, SHAPE, seed=2)
    assert S.shape == (num_coils, *SHAPE) and S.dtype == torch.complex64
    torch.testing.assert_close(S.abs().square().sum(0), torch.ones(SHAPE), atol=1e-5, rtol=0)
    mag = S.abs().flatten(1)
    assert (mag.max(1).values / mag.min(1).values > 3).all()  # each coil sees a region
    assert not torch.equal(S, phantoms.coil_maps(num_coils, SHAPE, seed=3))


@pytest.mark.parametrize("snr_db", [10.0, 30.0])
def test_noise_matches_snr(snr_db):
    k = fft.fft2c(phantoms.coil_maps(4, SHAPE) * phantoms.phantom("knee", "PD", 2, SHAPE)[:, None])
    noise = phantoms.add_noise(k, snr_db, seed=0) - k
    measured = 10 * torch.log10(k.abs().square().mean() / noise.abs().square().mean())
    assert abs(float(measured) - snr_db) < 0.2
    assert abs(float(noise.real.var() / noise.imag.var()) - 1) < 0.1  # circular


def test_task_catalogue():
    tasks = phantoms.TASKS
    assert len(tasks) >= 8 and sum(t.held_out for t in tasks.values()) >= 2
    assert {t.anatomy for t in tasks.values()} == set(phantoms.ANATOMIES)
    assert {t.contrast for t in tasks.values()} == set(phantoms.CONTRASTS)
    seen = {(t.mask_family, t.acceleration) for t in tasks.values() if not t.held_out}
    for name, t in tasks.items():
        assert name == t.name
        m = re.fullmatch(r"(brain|knee|abdomen)_(t1|t2|pd)_([a-z_]+?)(\d+(?:\.\d+)?)", name)
        assert m and m.groups() == (t.anatomy, t.contrast.lower(), t.mask_family, f"{t.acceleration:g}")
        assert t.mask_family in masks.FAMILIES
        if t.held_out:
            assert (t.mask_family, t.acceleration) not in seen


def test_make_task_contents_and_determinism():
    d = phantoms.make_task("knee_pd_equispaced4", slices=2, size=(32, 40), coils=4, seed=1)
    assert d["kspace"].shape == (2, 4, 32, 40) and d["kspace"].dtype == torch.complex64
    assert d["reference"].shape == (2, 32, 40) and d["reference"].dtype == torch.float32
    assert d["sens"].shape == (4, 32, 40)
    torch.testing.assert_close(d["reference"], operators.rss(fft.ifft2c(d["kspace"])))
    attrs = d["attrs"]
    assert attrs["task"] == "knee_pd_equispaced4" and attrs["mask_family"] == "equispaced"
    assert attrs["acceleration"] == 4.0 and attrs["center_fraction"] == 0.08
    assert attrs["max"] == pytest.approx(float(d["reference"].max()))
    assert {"acquisition", "norm", "patient_id"} <= attrs.keys()
    again = phantoms.make_task(phantoms.TASKS["knee_pd_equispaced4"], 2, (32, 40), 4, seed=1)
    assert torch.equal(d["kspace"], again["kspace"]) and attrs == again["attrs"]
    other = phantoms.make_task("knee_pd_equispaced4", 2, (32, 40), 4, seed=2)
    assert _relative(other["kspace"], d["kspace"]) > 0.1


def test_make_task_without_noise_is_exact():
    d = phantoms.make_task("brain_t1_random4", slices=1, size=(32, 32), coils=4, seed=0, snr_db=None)
    x = phantoms.phantom("brain", "T1", 1, (32, 32), seed=0)
    torch.testing.assert_close(d["reference"], x.abs(), atol=1e-5, rtol=1e-4)  # Σ|S|² = 1


def test_make_task_unknown_name():
    with pytest.raises(ValueError, match="valid tasks: brain_t1_random4"):
        phantoms.make_task("brain_t9_random4")
