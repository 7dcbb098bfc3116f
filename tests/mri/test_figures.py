"""Figures: each function writes a readable PNG of the expected size; bad input is a ValueError."""
import gc
import weakref

import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from applications.mri import figures

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, width, height):
    """``path`` is a non-empty PNG that matplotlib reads back as width × height pixels (±2)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert abs(pixels.shape[1] - width) <= 2 and abs(pixels.shape[0] - height) <= 2
    assert pixels.std() > 0  # something was drawn


def disc(size=16, scale=1.0):
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    return scale * (xx**2 + yy**2 < 0.6) * (1 + 0.3 * xx)


def row(task="knee", size=16, methods=("model", "zero_filled", "cg_sense"), torch_in=False):
    rng = np.random.default_rng(0)
    ref = disc(size)
    images = {m: ref + 0.05 * (k + 1) * rng.standard_normal(ref.shape)
              for k, m in enumerate(methods)}
    if torch_in:
        ref = torch.from_numpy(ref).float()
        images = {m: torch.from_numpy(v).float().requires_grad_() for m, v in images.items()}
    return {"task": task, "reference": ref, "images": images,
            "psnr": {m: 30.0 - k for k, m in enumerate(methods)}}


def texts(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]


# ------------------------------------------------------------------ reconstructions

def test_reconstructions_png_numpy_and_torch(tmp_path):
    rows = [row("knee"), row("brain (unseen)", torch_in=True)]
    path = figures.reconstructions(tmp_path / "sub" / "recon.png", rows)
    assert path == tmp_path / "sub" / "recon.png"
    cols = 1 + 2 * 3  # reference, 3 images, 3 error maps
    assert_png(path, 100 * (2 * cols + 0.6), 100 * (2 * 2 + 0.2))


def test_reconstructions_layout_titles_and_scales():
    r = row("knee", methods=("model", "zero_filled"))
    r["psnr"] = {"model": 31.234}  # partial: zero_filled has no PSNR
    fig = figures._reconstruction_figure([r, row("brain", methods=("zero_filled", "model"))])
    assert len(fig.axes) == 2 * 5 + 2  # 2 rows of 5 panels and a colorbar per row
    words = texts(fig)
    assert "model 31.2 dB" in words and "zero_filled" in words and "knee" in words
    assert "|model − reference|" in words
    ref_ax, model_ax, err_ax = fig.axes[0], fig.axes[1], fig.axes[3]
    top = r["reference"].max()
    assert ref_ax.images[0].get_clim() == pytest.approx((0, top))
    assert model_ax.images[0].get_clim() == pytest.approx((0, top))
    err = max(np.abs(v - r["reference"]).max() for v in r["images"].values())
    assert err_ax.images[0].get_clim() == pytest.approx((0, err))
    assert err_ax.images[0].get_cmap().name == figures.ERROR_CMAP.name
    assert not ref_ax.get_xticks().size and not ref_ax.get_yticks().size


def test_reconstructions_max_rows_and_no_psnr(tmp_path):
    rows = [row(f"task{i}") for i in range(3)]
    for r in rows:
        del r["psnr"]
    path = figures.reconstructions(tmp_path / "recon.png", rows, max_rows=1)
    assert_png(path, 100 * (2 * 7 + 0.6), 100 * (2 * 1 + 0.2))


@pytest.mark.parametrize("rows, max_rows, match", [
    ([], None, "non-empty"),
    ([{"task": "a", "images": {"m": disc()}}], None, "missing"),
    ([{"task": "a", "reference": disc(), "images": {}}], None, "non-empty dict"),
    ([{"task": "a", "reference": disc(), "images": {"m": disc(12)}}], None, "shape"),
    ([{"task": "a", "reference": disc()[None], "images": {"m": disc()}}], None, "2-D"),
    ([{"task": "a", "reference": disc(), "images": {"m": disc() + 0j}}], None, "complex"),
    ([row("a"), row("b", methods=("model",))], None, "differ"),
    ([{**row("a"), "psnr": [30.0]}], None, "psnr"),
    (["not a dict"], None, "dict"),
    ([row("a")], 0, "max_rows"),
])
def test_reconstructions_errors(tmp_path, rows, max_rows, match):
    with pytest.raises(ValueError, match=match):
        figures.reconstructions(tmp_path / "r.png", rows, max_rows=max_rows)
    assert not (tmp_path / "r.png").exists()


def test_not_png_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.png"):
        figures.reconstructions(tmp_path / "r.pdf", [row()])


# ------------------------------------------------------------------ weights

def test_weight_heatmap_matrix_numpy(tmp_path):
    W = np.random.default_rng(0).dirichlet(np.ones(4), size=3).T  # 4 groups × 3 tasks
    groups = ["knee_pd", "knee_pdfs", "brain_t1", "brain_t2"]
    path = figures.weight_heatmap(tmp_path / "w.png", W, groups, ["knee", "brain", "prostate_long"])
    assert path.exists()
    pixels = matplotlib.image.imread(path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE and 200 < pixels.shape[0] < 1000


def test_weight_heatmap_vector_torch(tmp_path):
    W = torch.softmax(torch.randn(5), 0)
    fig = figures._weight_figure(W, list("abcde"), ["all"], title="my title")
    words = texts(fig)
    assert "my title" in words and f"{W[0].item():.2f}" in words and "all" in words
    path = figures.weight_heatmap(tmp_path / "w.png", W, list("abcde"), ["all"])
    pixels = matplotlib.image.imread(path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE and 200 < pixels.shape[1] < 800


def test_weight_heatmap_annotates_only_small_matrices():
    small = figures._weight_figure(np.full((10, 20), 0.1), [f"g{i}" for i in range(10)],
                                   [f"t{j}" for j in range(20)])
    large = figures._weight_figure(np.full((11, 20), 0.1), [f"g{i}" for i in range(11)],
                                   [f"t{j}" for j in range(20)])
    assert texts(small).count("0.10") == 200
    assert texts(large).count("0.10") == 0


@pytest.mark.parametrize("W, groups, tasks, match", [
    (np.ones((3, 2)), list("abc"), ["x"], "shape"),
    (np.ones(3), list("ab"), ["x"], "shape"),
    (np.ones(3), list("abc"), ["x", "y"], "shape"),
    (np.ones((2, 2, 2)), list("ab"), list("xy"), "vector"),
    (np.ones((0, 1)), [], ["x"], "non-empty"),
    (np.array([[np.nan], [1.0]]), list("ab"), ["x"], "non-finite"),
])
def test_weight_heatmap_errors(tmp_path, W, groups, tasks, match):
    with pytest.raises(ValueError, match=match):
        figures.weight_heatmap(tmp_path / "w.png", W, groups, tasks)


# ------------------------------------------------------------------ training curves

def history(epochs=4, tasks=2, val=True):
    return [{"epoch": e, "train_loss": [1.0 / (e + 1 + j) for j in range(tasks)],
             "val_loss": [2.0 / (e + 1 + j) for j in range(tasks)] if val else [],
             "weights": [[0.5] * tasks] * 2} for e in range(epochs)]


def test_training_curves_meta(tmp_path):
    path = figures.training_curves(tmp_path / "c.png", history(), task_names=["knee", "brain"])
    assert_png(path, 100 * 11.5, 100 * 3.8)
    fig = figures._curves_figure(history(), task_names=["knee", "brain"])
    train_ax, val_ax = fig.axes
    assert train_ax.get_yscale() == "log" and val_ax.get_yscale() == "log"
    assert len(train_ax.lines) == 2 and len(val_ax.lines) == 2
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["knee", "brain"]


def test_training_curves_baseline_empty_val_loss(tmp_path):
    h = history(tasks=1, val=False)
    path = figures.training_curves(tmp_path / "c.png", h)
    assert_png(path, 100 * 10, 100 * 3.8)
    train_ax, val_ax = figures._curves_figure(h).axes
    assert len(train_ax.lines) == 1 and not val_ax.lines


def test_training_curves_linear_scale_when_not_positive():
    h = history()
    h[0]["train_loss"] = [0.0, -1.0]
    train_ax, val_ax = figures._curves_figure(h).axes
    assert train_ax.get_yscale() == "linear" and val_ax.get_yscale() == "log"


@pytest.mark.parametrize("hist, names, match", [
    ([], None, "non-empty"),
    ([{"train_loss": [1.0]}], None, "epoch"),
    (history(tasks=2), ["only one"], "task names"),
    (history(tasks=2)[:1] + history(tasks=3)[1:], None, "tasks"),
    ([{**h, "val_loss": [1.0, 2.0, 3.0]} for h in history(tasks=2)], None, "task counts"),
    (history(tasks=0, val=False), None, "no training"),
])
def test_training_curves_errors(tmp_path, hist, names, match):
    with pytest.raises(ValueError, match=match):
        figures.training_curves(tmp_path / "c.png", hist, task_names=names)


# ------------------------------------------------------------------ task catalogue

def test_task_catalogue_list_of_mixed_shapes(tmp_path):
    images = [disc(16), torch.from_numpy(disc(24)).float(), disc(16)[:10]]
    path = figures.task_catalogue(tmp_path / "cat.png", images, ["knee", "brain", "cut"])
    assert_png(path, 100 * 2 * 3, 100 * (2 + 0.2))


def test_task_catalogue_stack_wraps_rows():
    fig = figures._catalogue_figure(torch.rand(7, 8, 8), [f"t{i}" for i in range(7)], ncols=3)
    assert len(fig.axes) == 9  # 3 × 3 grid, two empty panels
    assert "t6" in texts(fig)


@pytest.mark.parametrize("images, names, match", [
    ([], [], "non-empty"),
    ([disc()], ["a", "b"], "names"),
    (np.zeros((2, 2, 4, 4)), ["a", "b"], "stack"),
    ([np.zeros(4)], ["a"], "2-D"),
    ([np.array([["x"]])], ["a"], "numbers"),
])
def test_task_catalogue_errors(tmp_path, images, names, match):
    with pytest.raises(ValueError, match=match):
        figures.task_catalogue(tmp_path / "cat.png", images, names)


# ------------------------------------------------------------------ resources

def test_no_figures_left_behind(tmp_path, monkeypatch):
    """After a call no Figure stays alive, and pyplot's global figure registry is never used."""
    saved, save = [], figures._save

    def spy(fig, path):
        saved.append(weakref.ref(fig))
        return save(fig, path)

    monkeypatch.setattr(figures, "_save", spy)
    figures.weight_heatmap(tmp_path / "w.png", np.full((2, 1), 0.5), ["a", "b"], ["x"])
    figures.task_catalogue(tmp_path / "c.png", [disc()], ["a"])
    gc.collect()
    assert len(saved) == 2 and all(ref() is None for ref in saved)
    assert "matplotlib.pyplot" not in vars(figures) and "plt" not in vars(figures)


def test_nan_pixels_and_losses_are_shown_not_hidden():
    r = row("knee")
    r["images"]["model"][3, 3] = np.nan
    fig = figures._reconstruction_figure([r])
    model_ax = fig.axes[1]
    assert model_ax.images[0].get_cmap().get_bad() == pytest.approx((1.0, 0.0, 0.0, 1.0))  # red
    h = history()
    h[3]["val_loss"] = [float("nan"), 0.5]
    assert "non-finite loss at epoch 3" in texts(figures._curves_figure(h, task_names=["a", "b"]))


def test_method_keys_need_not_be_strings_and_bad_psnr_is_named():
    r = row("knee", methods=("model",))
    r["images"] = {1: r["images"]["model"]}
    r["psnr"] = {1: 30.0}
    assert "1 30.0 dB" in texts(figures._reconstruction_figure([r]))
    r["psnr"] = {1: [1, 2]}
    with pytest.raises(ValueError, match="psnr\\[1\\] must be a number"):
        figures._reconstruction_figure([r])


def test_an_interrupted_save_keeps_the_previous_figure(tmp_path, monkeypatch):
    path = figures.reconstructions(tmp_path / "r.png", [row()])
    good = path.read_bytes()

    def broken(self, fname, **kwargs):
        open(fname, "wb").write(good[:100])  # a truncated PNG, then the interruption
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(KeyboardInterrupt):
        figures.reconstructions(path, [row("brain")])
    assert path.read_bytes() == good and not list(tmp_path.glob("*.tmp"))
