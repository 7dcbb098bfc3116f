"""fastMRI HDF5 files, SliceDataset, MaskTransform and the generator (applications.mri.data)."""
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from applications.mri import data, fft, masks, operators, phantoms

REPO = Path(__file__).resolve().parents[2]
SMALL = {"slices": 2, "size": (32, 32), "coils": 3}


def _volume(task="brain_t1_random4", seed=0):
    return phantoms.make_task(task, seed=seed, **SMALL)


def _write(path, task="brain_t1_random4", seed=0):
    d = _volume(task, seed)
    return data.write_fastmri(path, d["kspace"], d["reference"], d["attrs"]), d


FASTMRI_HEADER = (
    '<?xml version="1.0" encoding="utf-8"?>\n<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD" '
    'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><studyInformation><studyTime>00:00:00'
    "</studyTime></studyInformation><encoding><trajectory>cartesian</trajectory><encodedSpace>"
    "<matrixSize><x>40</x><y>36</y><z>1</z></matrixSize><fieldOfView_mm><x>280</x><y>140</y>"
    "<z>4.5</z></fieldOfView_mm></encodedSpace><reconSpace><matrixSize><x>32</x><y>32</y><z>1</z>"
    "</matrixSize></reconSpace><encodingLimits><kspace_encoding_step_1><minimum>0</minimum>"
    "<maximum>31</maximum><center>17</center></kspace_encoding_step_1></encodingLimits>"
    "</encoding></ismrmrdHeader>"
)


def _raw_fastmri(path, kspace=None, rss=True):
    """A file in fastMRI's multicoil layout written with raw h5py (no task or mask attrs)."""
    rng = np.random.default_rng(0)
    if kspace is None:
        kspace = (rng.standard_normal((2, 3, 40, 36)) + 1j * rng.standard_normal((2, 3, 40, 36)))
        kspace = kspace.astype(np.complex64)
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=kspace)
        if rss:
            f.create_dataset("reconstruction_rss", data=rng.random((2, 32, 32), dtype=np.float32))
        f.create_dataset("ismrmrd_header", data=FASTMRI_HEADER.encode())
        f.attrs.update({"acquisition": "CORPD_FBK", "max": 1.0, "norm": 12.0,
                        "patient_id": "abc123"})
    return path


# --- writing and reading ------------------------------------------------------------------

def test_round_trip(tmp_path):
    path, d = _write(tmp_path / "sub" / "vol.h5")
    assert not list(tmp_path.rglob("*.tmp"))
    with h5py.File(path, "r") as f:
        assert f["kspace"].dtype == np.complex64 and f["reconstruction_rss"].dtype == np.float32
    ds = data.SliceDataset(tmp_path)
    assert len(ds) == 2
    for s in range(2):
        sample = ds[s]
        assert sample["fname"] == "sub/vol.h5" and sample["slice"] == s
        assert torch.equal(sample["kspace"], d["kspace"][s])
        assert torch.equal(sample["reference"], d["reference"][s])
        assert sample["attrs"].items() >= d["attrs"].items()
        assert sample["attrs"]["encoding_size"] == [32, 32, 1]
        assert (sample["attrs"]["padding_left"], sample["attrs"]["padding_right"]) == (0, 32)
        assert all(type(v) in (str, int, float, bool, list) for v in sample["attrs"].values())


def test_reads_real_fastmri_layout(tmp_path):
    _raw_fastmri(tmp_path / "file1000001.h5")
    ds = data.SliceDataset(tmp_path)
    sample = ds[1]
    assert sample["kspace"].shape == (3, 40, 36) and sample["reference"].shape == (32, 32)
    attrs = sample["attrs"]
    assert attrs["task"] == "CORPD_FBK" and attrs["patient_id"] == "abc123"
    assert attrs["recon_size"] == [32, 32, 1]
    assert (attrs["padding_left"], attrs["padding_right"]) == (1, 33)
    out = data.MaskTransform("random", 4)(sample)
    assert out["target"].shape == (32, 32) and out["kspace"].shape == (3, 40, 36)
    assert not out["mask"][..., :1].any() and not out["mask"][..., 33:].any()
    cropped = data.MaskTransform("random", 4, crop=(32, 32))(sample)
    assert cropped["kspace"].shape == (3, 32, 32) and cropped["mask"].shape == (1, 32, 32)
    # the padding band [0, 1) ∪ [33, 36) of 36 columns, rescaled to 32 and rounded inward
    for seed in range(20):
        m = data.MaskTransform("random", 2, seed=seed, crop=(32, 32))(sample)["mask"]
        assert not m[..., :1].any() and not m[..., 30:].any(), seed  # ceil(32/36), floor(33·32/36)
    with pytest.raises(data.DataError, match="file1000001.h5.*mask_family"):
        data.MaskTransform()(sample)


def test_fingerprint_follows_the_content_not_the_name(tmp_path):
    kspace = torch.randn(2, 3, 16, 12, dtype=torch.complex64)
    reference = torch.rand(2, 16, 12)
    a = data.write_fastmri(tmp_path / "a.h5", kspace, reference, {"task": "t"})
    b = data.write_fastmri(tmp_path / "sub" / "b.h5", kspace, reference, {"task": "other"})
    assert data.fingerprint(a) == data.fingerprint(b)
    changed = kspace.clone()
    changed[0, 0, 8, 5] += 1e-3  # one value of the central rows of the first slice and coil
    c = data.write_fastmri(tmp_path / "c.h5", changed, reference, {"task": "t"})
    assert data.fingerprint(c) != data.fingerprint(a)
    with pytest.raises(data.DataError, match="cannot read its k-space"):
        data.fingerprint(tmp_path / "missing.h5")


@pytest.mark.parametrize("W,w", [(41, 40), (41, 32), (40, 33), (37, 36), (368, 320)])
def test_crop_never_samples_the_padding_band(W, w):
    """Column j of a crop to w columns lies at (j − w//2)·W/w + W//2 of the W columns (the
    centre column of each is the FFT's origin): no sampled column may lie outside the measured
    band [left, right)."""
    left, right = W // 10, W - W // 10
    sample = {"kspace": torch.randn(2, 16, W, dtype=torch.complex64), "reference": None,
              "attrs": {"task": "x", "padding_left": left, "padding_right": right},
              "fname": "x.h5", "slice": 0}
    for seed in range(10):
        mask = data.MaskTransform("random", 1.5, seed=seed, crop=(16, w))(sample)["mask"][0, 0]
        columns = mask.nonzero().flatten().double()
        at = (columns - w // 2) * W / w + W // 2
        assert columns.numel() and at.min() >= left and at.max() < right, (seed, at.min(), at.max())


@pytest.mark.parametrize("W,w", [(41, 40), (41, 32), (40, 33), (37, 36)])
def test_crop_moves_a_k_space_column_where_the_band_mapping_says(W, w):
    """An independent check of the mapping the band uses: a plane wave that fft2c puts at
    column j0 of W, cropped to w columns in the image, peaks at (j0 − W//2)·w/W + w//2."""
    x = torch.arange(W, dtype=torch.float64)
    for j0 in (2, W // 4, W // 2, W - 3):
        wave = torch.exp(2j * torch.pi * (j0 - W // 2) * x / W).expand(1, 8, W)
        assert int(fft.fft2c(wave).abs().sum(-2).argmax()) == j0
        cropped = fft.fft2c(data._center_crop(wave, (8, w), "x", "image")).abs().sum(-2)
        assert abs(int(cropped.argmax()) - ((j0 - W // 2) * w / W + w // 2)) <= 0.5 + 1e-9, j0


def test_reference_missing_is_none_and_target_is_rss(tmp_path):
    _raw_fastmri(tmp_path / "test.h5", rss=False)
    sample = data.SliceDataset(tmp_path)[0]
    assert sample["reference"] is None
    out = data.MaskTransform("equispaced", 4)(sample)
    torch.testing.assert_close(out["target"] * out["scale"], operators.rss(fft.ifft2c(sample["kspace"])))


def test_write_fastmri_rejects_bad_input(tmp_path):
    d = _volume()
    with pytest.raises(data.DataError, match="bad.h5: kspace must be complex"):
        data.write_fastmri(tmp_path / "bad.h5", d["kspace"].real, d["reference"], {})
    with pytest.raises(data.DataError, match="bad.h5: reference"):
        data.write_fastmri(tmp_path / "bad.h5", d["kspace"], d["reference"][:1], {})
    k = d["kspace"].clone()
    k[0, 0, 0, 0] = float("nan")
    with pytest.raises(data.DataError, match="bad.h5: kspace contains NaN"):
        data.write_fastmri(tmp_path / "bad.h5", k, d["reference"], {})
    with pytest.raises(data.DataError, match="bad.h5: attribute 'x'"):
        data.write_fastmri(tmp_path / "bad.h5", d["kspace"], d["reference"], {"x": {"a": 1}})
    assert not list(tmp_path.iterdir())


# --- bad files ----------------------------------------------------------------------------

def _no_kspace(path):
    with h5py.File(path, "w") as f:
        f.create_dataset("reconstruction_rss", data=np.zeros((2, 8, 8), np.float32))


def _real_kspace(path):
    _raw_fastmri(path, kspace=np.zeros((2, 3, 40, 36), np.float32))


def _three_d_kspace(path):
    _raw_fastmri(path, kspace=np.zeros((2, 40, 36), np.complex64))


def _truncated(path):
    _write(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _not_hdf5(path):
    path.write_text("this is not an HDF5 file\n")


def _group_as_reference(path):
    _raw_fastmri(path, rss=False)
    with h5py.File(path, "a") as f:
        f.create_group("reconstruction_rss")


def _group_as_header(path):
    _raw_fastmri(path)
    with h5py.File(path, "a") as f:
        del f["ismrmrd_header"]
        f.create_group("ismrmrd_header")


def _limits_outside_kspace(path):
    _raw_fastmri(path)
    with h5py.File(path, "a") as f:  # centre 2 columns right of the middle, 31 encodes: [-2, 29)
        del f["ismrmrd_header"]
        f.create_dataset("ismrmrd_header", data=FASTMRI_HEADER.replace(
            "<maximum>31</maximum><center>17</center>", "<maximum>30</maximum><center>20</center>"
        ).encode())


BAD = [(_no_kspace, "no 'kspace' dataset"), (_real_kspace, "expected complex"),
       (_three_d_kspace, "expected 4-D"), (_truncated, "not a readable HDF5 file"),
       (_not_hdf5, "not a readable HDF5 file"),
       (_group_as_reference, "'reconstruction_rss' is an HDF5 group; expected a dataset"),
       (_group_as_header, "'ismrmrd_header' is an HDF5 group; expected a dataset"),
       (_limits_outside_kspace, r"kspace_encoding_step_1.*columns \[-2, 29\); expected 0 <= first")]


@pytest.mark.parametrize("make_bad, problem", BAD, ids=[f.__name__ for f, _ in BAD])
def test_bad_file_fails_naming_file_and_problem(tmp_path, make_bad, problem):
    _write(tmp_path / "a_good.h5")
    make_bad(tmp_path / "b_bad.h5")
    with pytest.raises(data.DataError, match=f"b_bad.h5: .*{problem}"):
        data.SliceDataset(tmp_path)
    with pytest.warns(UserWarning, match=f"(?s)skipped 1 bad file.*b_bad.h5: .*{problem}"):
        ds = data.SliceDataset(tmp_path, on_error="skip")
    assert len(ds) == 2 and {ds[i]["fname"] for i in range(2)} == {"a_good.h5"}


@pytest.mark.parametrize("dataset, slice_", [("kspace", 1), ("reconstruction_rss", 0)])
def test_non_finite_values_named_when_read(tmp_path, dataset, slice_):
    path = _raw_fastmri(tmp_path / "nan.h5")
    with h5py.File(path, "r+") as f:
        f[dataset][slice_, 0, 0] = np.inf if dataset == "kspace" else np.nan
    ds = data.SliceDataset(tmp_path)  # metadata only: construction succeeds
    ds[1 - slice_]
    with pytest.raises(data.DataError, match=f"nan.h5: slice {slice_} of '{dataset}' contains NaN or Inf"):
        ds[slice_]


def test_root_errors(tmp_path):
    with pytest.raises(data.DataError, match="missing: data root does not exist"):
        data.SliceDataset(tmp_path / "missing")
    with pytest.raises(data.DataError, match="no .h5 files"):
        data.SliceDataset(tmp_path)  # empty folder
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(data.DataError, match="no .h5 files"):
        data.SliceDataset(tmp_path)
    _not_hdf5(tmp_path / "only_bad.h5")
    with pytest.warns(UserWarning), pytest.raises(data.DataError, match="no slices"):
        data.SliceDataset(tmp_path, on_error="skip")
    with pytest.raises(ValueError, match="on_error"):
        data.SliceDataset(tmp_path, on_error="ignore")


def test_task_filter_and_single_file_root(tmp_path):
    _write(tmp_path / "b.h5", "brain_t1_random4")
    path, _ = _write(tmp_path / "k.h5", "knee_pd_equispaced4")
    ds = data.SliceDataset(tmp_path, tasks=["knee_pd_equispaced4"])
    assert [e.fname for e in ds.examples] == ["k.h5", "k.h5"]
    assert data.SliceDataset(path)[0]["fname"] == "k.h5"
    with pytest.raises(data.DataError, match="no slices from files with task in"):
        data.SliceDataset(tmp_path, tasks=["abdomen_t1_random4"])


def test_dataloader_with_two_workers(tmp_path):
    for i, task in enumerate(["brain_t1_random4", "knee_t2_random6", "abdomen_pd_equispaced6"]):
        _write(tmp_path / f"{i}.h5", task, seed=i)
    ds = data.SliceDataset(tmp_path, transform=data.MaskTransform(seed=0))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert sum(len(b["slice"]) for b in batches) == len(ds) == 6
    for i, b in enumerate(batches):
        for j in range(2):
            expected = ds[2 * i + j]
            assert b["fname"][j] == expected["fname"] and b["task"][j] == expected["task"]
            assert torch.equal(b["kspace"][j], expected["kspace"])
            assert torch.equal(b["mask"][j], expected["mask"])


# --- MaskTransform ------------------------------------------------------------------------

def test_mask_transform_output(tmp_path):
    _write(tmp_path / "v.h5", "knee_t2_random6")
    sample = data.SliceDataset(tmp_path)[0]
    out = data.MaskTransform()(sample)
    assert set(out) == {"kspace", "mask", "target", "scale", "task", "fname", "slice"}
    assert out["task"] == "knee_t2_random6" and out["mask"].shape == (1, 32, 32)
    assert set(out["mask"].unique().tolist()) == {0.0, 1.0}
    mask = out["mask"][0]
    assert (mask == mask[:1]).all() and mask[0, 15:18].all()  # columns, centre sampled
    assert masks.acceleration(mask, (32, 32)) > 2
    unsampled = (out["mask"] == 0).expand_as(out["kspace"])
    assert not torch.signbit(out["kspace"].real[unsampled]).any()  # +0.0, no -0.0 leak
    assert not torch.signbit(out["kspace"].imag[unsampled]).any()
    zero_filled = operators.rss(fft.ifft2c(out["kspace"]))
    assert float(zero_filled.max()) == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(out["target"] * out["scale"], sample["reference"])
    torch.testing.assert_close(out["kspace"] * out["scale"], sample["kspace"] * out["mask"])


def test_mask_seed_fixed_per_slice_or_random_per_call(tmp_path):
    _write(tmp_path / "v.h5", "knee_t2_random6")
    ds = data.SliceDataset(tmp_path)
    fixed = data.MaskTransform(seed=0)
    assert torch.equal(fixed(ds[0])["mask"], fixed(ds[0])["mask"])
    assert not torch.equal(fixed(ds[0])["mask"], fixed(ds[1])["mask"])
    fresh = data.MaskTransform(seed=None)
    assert len({tuple(fresh(ds[0])["mask"].flatten().tolist()) for _ in range(5)}) > 1


def test_mask_transform_overrides_and_errors(tmp_path, monkeypatch):
    _write(tmp_path / "v.h5", "knee_t2_random6")
    sample = data.SliceDataset(tmp_path)[0]
    out = data.MaskTransform(family="variable_density", acceleration=3, center_fraction=0.1)(sample)
    assert out["mask"][0].sum(0).min() < 32 and out["mask"][0].sum(1).min() < 32  # 2-D mask
    with pytest.raises(data.DataError, match="v.h5: crop"):
        data.MaskTransform(crop=(64, 64))(sample)
    with pytest.raises(data.DataError, match="v.h5: cannot make the mask"):
        data.MaskTransform(family="spiral")(sample)
    monkeypatch.setattr(masks, "make", lambda *args, **kwargs: torch.ones(1, 33))
    with pytest.raises(data.DataError, match=r"v.h5: mask of shape \(1, 33\) does not fit"):
        data.MaskTransform()(sample)


# --- generator ----------------------------------------------------------------------------

def _arrays(path):
    with h5py.File(path, "r") as f:
        return f["kspace"][()], f["reconstruction_rss"][()], dict(f.attrs)


def test_generate_deterministic_and_cached(tmp_path):
    kwargs = {"tasks": ["brain_t1_random4", "knee_pd_random8"], "slices": 1, "size": (32, 32),
              "coils": 3, "volumes": 2, "progress": False}
    first = data.generate(tmp_path / "a", seed=7, **kwargs)
    second = data.generate(tmp_path / "b", seed=7, **kwargs)
    other = data.generate(tmp_path / "c", seed=8, **kwargs)
    assert [p.name for p in first] == ["brain_t1_random4_000.h5", "brain_t1_random4_001.h5",
                                       "knee_pd_random8_000.h5", "knee_pd_random8_001.h5"]
    for p, q, r in zip(first, second, other):
        (k1, r1, a1), (k2, r2, a2), (k3, _, _) = _arrays(p), _arrays(q), _arrays(r)
        assert np.array_equal(k1, k2) and np.array_equal(r1, r2) and a1.keys() == a2.keys()
        assert not np.array_equal(k1, k3)
    assert not np.array_equal(_arrays(first[0])[0], _arrays(first[1])[0])  # volumes differ
    stamp = first[0].stat().st_mtime_ns
    data.generate(tmp_path / "a", seed=7, **kwargs)
    assert first[0].stat().st_mtime_ns == stamp  # cached
    data.generate(tmp_path / "a", seed=7, snr_db=20.0, **kwargs)
    assert first[0].stat().st_mtime_ns != stamp  # settings changed: rewritten
    with pytest.raises(ValueError, match="unknown task"):
        data.generate(tmp_path / "d", tasks=["nope"])


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "applications.mri.data", *args], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_generate(tmp_path):
    result = _cli("generate", "--out", str(tmp_path), "--tasks", "abdomen_t1_radial8",
                  "--slices", "1", "--size", "32", "32", "--coils", "2", "--volumes", "1")
    assert result.returncode == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["abdomen_t1_radial8_000.h5"]


def test_cli_unknown_task_exits_2(tmp_path):
    result = _cli("generate", "--out", str(tmp_path), "--tasks", "brain_t1_random4", "liver_t1_x4")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "error: unknown task(s) liver_t1_x4; valid tasks: " + ", ".join(phantoms.TASKS) in last


@pytest.mark.parametrize("task, hits", [("knee_pd_equispaced4", True), ("brain_t1_random4", True),
                                        ("abdomen_t1_radial8", False)])
def test_shared_maps_cache_gives_the_uncached_maps(tmp_path, task, hits):
    """ReconTransform's maps through a shared cache are bit-identical to the uncached ones for
    every mask draw; 1-D masks share the calibration box, so their draws hit the cache, and a
    radial mask (no calibration box: low-resolution profiles) is never cached."""
    from applications.mri.evaluate import ReconTransform

    d = phantoms.make_task(task, seed=0, slices=2, size=(48, 48), coils=4)
    data.write_fastmri(tmp_path / "v.h5", d["kspace"], d["reference"], d["attrs"])
    ds = data.SliceDataset(tmp_path)
    cache = {}
    for s in range(2):
        sample = ds[s]
        for seed in range(4):
            cached = ReconTransform(seed=seed, sense=True, maps_cache=cache)(sample)["sens"]
            plain = ReconTransform(seed=seed, sense=True)(sample)["sens"]
            assert torch.equal(cached, plain), (s, seed)
    assert (0 < len(cache) < 8) if hits else not cache


def test_concurrent_generation_of_one_catalogue(tmp_path):
    """Two processes filling the same empty cache at once (e.g. a meta and a joint run started
    together) both succeed, and every file is complete: each writes its own temporary file."""
    code = ("import sys, time; from applications.mri.data import generate; "
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); "  # start together
            "generate(sys.argv[1], tasks=['brain_t1_random4', 'knee_pd_equispaced4'], slices=2, "
            "size=(32, 32), coils=3, volumes=6, progress=False)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = str(time.time() + 5)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), start], cwd=REPO,
                              env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    ds = data.SliceDataset(tmp_path)
    assert len(ds) == 2 * 6 * 2 and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{t}_{v:03d}.h5" for t in ("brain_t1_random4", "knee_pd_equispaced4") for v in range(6))
    assert all(torch.isfinite(ds[i]["kspace"].abs()).all() for i in range(len(ds)))


def test_mask_with_no_measured_point_and_bad_seed_are_errors(tmp_path):
    sample = data.SliceDataset(_raw_fastmri(tmp_path / "f.h5"))[0]
    sample["attrs"].update(padding_left=2, padding_right=3)  # one measured column, off centre
    with pytest.raises(data.DataError, match="f.h5: slice 0: the equispaced mask samples no measured"):
        for seed in range(50):  # most of the 8 offsets miss column 2
            data.MaskTransform("equispaced", 8, 0.03, seed=seed)(sample)
    with pytest.raises(ValueError, match="seed must be None or an integer >= 0"):
        data.MaskTransform(seed=-1)

def test_fixed_masks_differ_between_files(tmp_path):
    """A fixed seed gives each (file, slice) its own mask, not one mask per slice index."""
    for name in ("a.h5", "b.h5"):
        d = phantoms.make_task("knee_t2_random6", seed=0, slices=3, size=(32, 32), coils=3)
        data.write_fastmri(tmp_path / name, d["kspace"], d["reference"], d["attrs"])
    ds = data.SliceDataset(tmp_path)
    t = data.MaskTransform(seed=0)
    a = [t(ds[i])["mask"] for i in range(3)]
    b = [t(ds[3 + i])["mask"] for i in range(3)]
    assert not all(torch.equal(x, y) for x, y in zip(a, b))


def test_generate_cache_is_not_reused_for_another_seed_or_shape(tmp_path):
    kw = dict(tasks=["brain_t1_random4"], size=(32, 32), coils=2, volumes=1, progress=False)
    fresh = data.generate(tmp_path / "fresh", seed=1, slices=1, **kw)[0]
    path = data.generate(tmp_path / "c", seed=0, slices=1, **kw)[0]
    data.generate(tmp_path / "c", seed=1, slices=1, **kw)
    assert (_arrays(path)[0] == _arrays(fresh)[0]).all()  # seed changed: rewritten
    data.generate(tmp_path / "c", seed=1, slices=2, **kw)
    assert _arrays(path)[0].shape[0] == 2          # shape changed: rewritten
