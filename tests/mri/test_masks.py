"""Sampling masks: shapes, fastMRI centre, achieved acceleration, seeding, errors."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from applications.mri import masks

CARTESIAN = ("random", "equispaced", "equispaced_fraction")
RANDOM = ("random", "equispaced", "equispaced_fraction", "variable_density", "poisson_disc")
SHAPES = [(64, 64), (96, 128), (80, 97)]


def _mean_acceleration(family, shape, acc, seeds=range(8)):
    """H·W over the mean number of sampled points across seeds."""
    counts = [masks.make(family, shape, acc, seed=s).expand(shape).sum().item() for s in seeds]
    return shape[0] * shape[1] / np.mean(counts)


@pytest.mark.parametrize("family", masks.FAMILIES)
def test_shape_dtype_values(family):
    h, w = 80, 97
    m = masks.make(family, (h, w), 4, seed=3)
    assert m.dtype == torch.float32
    assert m.shape == ((1, w) if family in CARTESIAN else (h, w))
    assert set(m.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("w, cf, start, stop", [(128, 0.08, 59, 69), (97, 0.08, 45, 53), (96, 0.04, 46, 50)])
@pytest.mark.parametrize("family", CARTESIAN)
def test_cartesian_centre_follows_fastmri(family, w, cf, start, stop):
    """n_low = round(W·cf) columns from (W − n_low + 1) // 2."""
    m = masks.make(family, (64, w), 4, center_fraction=cf, seed=0)[0]
    assert m[start:stop].all()


@pytest.mark.parametrize("family", ["variable_density", "poisson_disc"])
def test_2d_centre_box_fully_sampled(family):
    h, w = 96, 128
    m = masks.make(family, (h, w), 6, center_fraction=0.1, seed=0)
    assert m[(h - 10 + 1) // 2 : (h - 10 + 1) // 2 + 10, (w - 13 + 1) // 2 : (w - 13 + 1) // 2 + 13].all()


def test_radial_samples_the_centre_and_nests():
    small, large = masks.radial((64, 80), 10), masks.radial((64, 80), 25)
    assert small[32, 40] == 1
    assert (small <= large).all() and large.sum() > small.sum()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("acc", [2, 4, 8])
@pytest.mark.parametrize("family", [f for f in masks.FAMILIES if f != "equispaced"])
def test_achieved_acceleration_within_15_percent(family, shape, acc):
    assert abs(_mean_acceleration(family, shape, acc) / acc - 1) < 0.15


@pytest.mark.parametrize("acc", [2, 4, 8])
def test_equispaced_acceleration_is_below_nominal(acc):
    """fastMRI's equispaced mask counts the centre twice: measured 1.86 / 3.25 / 5.16 at 128 columns."""
    achieved = _mean_acceleration("equispaced", (128, 128), acc)
    assert 0.6 * acc < achieved < acc


def test_equispaced_outer_columns_are_equispaced():
    m = masks.equispaced_cartesian((32, 128), 4, 0.08, seed=5)[0]
    m[59:69] = 0
    assert set(np.diff(np.flatnonzero(m.numpy()))) == {4, 12}  # step 4, one jump over the centre


@given(st.sampled_from(RANDOM), st.integers(0, 2**31), st.sampled_from([2, 3.5, 4, 8]))
def test_seeded_and_reproducible(family, seed, acc):
    shape = (48, 64)
    a = masks.make(family, shape, acc, seed=seed)
    torch.testing.assert_close(a, masks.make(family, shape, acc, seed=seed))


@pytest.mark.parametrize("family", RANDOM)
def test_different_seeds_give_different_masks(family):
    ms = [masks.make(family, (64, 64), 4, seed=s) for s in range(4)]
    assert len({tuple(m.flatten().tolist()) for m in ms}) > 1


def test_acceleration_counts_after_broadcasting():
    m = torch.zeros(1, 10)
    m[0, :5] = 1
    assert masks.acceleration(m, (7, 10)) == 2.0
    with pytest.raises(ValueError, match="samples no"):
        masks.acceleration(torch.zeros(1, 10), (7, 10))
    # the (1, H, W) mask MaskTransform emits, and (W,)
    assert masks.acceleration(m.expand(7, 10)[None], (7, 10)) == 2.0
    assert masks.acceleration(m[0], (7, 10)) == 2.0
    with pytest.raises(ValueError, match="is not one \\(H, W\\) pattern"):
        masks.acceleration(torch.ones(2, 7, 10), (7, 10))
    with pytest.raises(ValueError, match="does not broadcast"):
        masks.acceleration(torch.ones(1, 9), (7, 10))
    with pytest.raises(ValueError, match="finite number >= 1"):
        masks.make("equispaced", (8, 8), float("inf"))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: masks.make("spiral", (64, 64), 4), ", ".join(masks.FAMILIES)),
        (lambda: masks.make("random", (64, 64), 0.5), "acceleration must be a finite number >= 1"),
        (lambda: masks.make("random", (64, 64, 2), 4), "shape must be"),
        (lambda: masks.make("random", (64,), 4), "shape must be"),
        (lambda: masks.make("equispaced", (64, 64), 4, center_fraction=0.0), "center_fraction"),
        (lambda: masks.make("variable_density", (64, 64), 4, center_fraction=1.0), "center_fraction"),
        (lambda: masks.make("random", (64, 64), 16, center_fraction=0.08), "lower center_fraction"),
        (lambda: masks.make("poisson_disc", (64, 64), 30, center_fraction=0.2), "lower center_fraction"),
        (lambda: masks.poisson_disc((64, 64), 4, 0, calib=80), "calib"),
        (lambda: masks.radial((64, 64), 0), "spokes"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()

def test_equispaced_offset_takes_every_value():
    """fastMRI draws the offset of the equispaced lines from {0, …, acceleration − 1}."""
    offsets = set()
    for s in range(64):
        m = masks.equispaced_cartesian((32, 128), 4, 0.08, seed=s)[0]
        offsets.add(int(np.flatnonzero(m.numpy())[0]))  # the first column, left of the centre
    assert offsets == {0, 1, 2, 3}
