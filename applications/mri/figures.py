"""Figures of a run: reconstructions, the weight matrix W = σ(Ω), training curves, task images.

Each public function draws one PNG at 100 dpi and returns its path. Figures are built on
``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so no global figure
state is created and nothing is left open between calls. Images may be numpy arrays or torch
tensors (detached and moved to the CPU here); they must be real magnitudes.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["reconstructions", "weight_heatmap", "training_curves", "task_catalogue"]

DPI = 100
PANEL = 2.0  # inches per image panel
IMAGE_CMAP = colormaps["gray"].with_extremes(bad="red")  # a NaN pixel shows, never as white
ERROR_CMAP = colormaps["inferno"].with_extremes(bad="cyan")
WEIGHT_CMAP = "viridis"
MAX_ANNOTATED = 200  # annotate W's entries when N·M is at most this


def _array(x: Any, name: str) -> np.ndarray:
    """``x`` (numpy array, torch tensor or nested list) as a real float numpy array."""
    if hasattr(x, "detach"):  # a torch tensor; torch itself is not imported here
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()  # float16 / bfloat16 have no numpy equivalent
        x = x.numpy()
    try:
        a = np.asarray(x)
    except Exception as err:
        raise ValueError(f"{name}: cannot be read as an array ({err})") from err
    if np.iscomplexobj(a):
        raise ValueError(f"{name}: expected a real magnitude image, got complex values "
                         f"(take .abs() first)")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)
            or a.dtype == bool):
        raise ValueError(f"{name}: expected numbers, got dtype {a.dtype}")
    return a.astype(np.float64)


def _image(x: Any, name: str) -> np.ndarray:
    """``x`` as a 2-D (H, W) float image."""
    a = _array(x, name)
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"{name}: expected a non-empty 2-D (H, W) image, got shape {a.shape}")
    return a


def _top(*arrays: np.ndarray) -> float:
    """Largest finite value of ``arrays`` for a colour scale [0, top]; 1 when there is none > 0."""
    finite = [a[np.isfinite(a)] for a in arrays]
    top = max((float(f.max()) for f in finite if f.size), default=0.0)
    return top if top > 0 else 1.0


def _png_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(path)!r}")
    return path


def _bare(ax) -> None:
    """No ticks, no frame; a y label set later still shows."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parents created; a temporary file renamed, so an
    interrupted save never replaces a good figure with a truncated one) and release its artists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        fig.clear()
    return path


# ------------------------------------------------------------------ reconstructions

def _reconstruction_figure(rows: Sequence[Mapping], max_rows: int | None = None) -> Figure:
    """The figure of :func:`reconstructions` (validated), not yet saved."""
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int)
                                 or max_rows < 1):
        raise ValueError(f"max_rows must be a positive integer or None, got {max_rows!r}")
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)) or len(rows) == 0:
        raise ValueError("rows must be a non-empty list of dicts (one per task)")
    rows = list(rows)[:max_rows]
    methods: list[str] | None = None
    parsed = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"rows[{i}] must be a dict, got {type(row).__name__}")
        missing = [k for k in ("task", "reference", "images") if k not in row]
        if missing:
            raise ValueError(f"rows[{i}] is missing key(s) {missing}")
        task = str(row["task"])
        images = row["images"]
        if not isinstance(images, Mapping) or len(images) == 0:
            raise ValueError(f"row {task!r}: 'images' must be a non-empty dict method → image")
        names = list(images)  # the keys as given; str() only for titles
        if methods is None:
            methods = names
        elif set(names) != set(methods):
            raise ValueError(f"row {task!r}: methods {names} differ from the first row's {methods}")
        reference = _image(row["reference"], f"row {task!r}: reference")
        recons = {}
        for m in methods:
            recons[m] = _image(images[m], f"row {task!r}: image {m!r}")
            if recons[m].shape != reference.shape:
                raise ValueError(f"row {task!r}: image {m!r} has shape {recons[m].shape}, "
                                 f"the reference {reference.shape}")
        psnr = row.get("psnr")
        psnr = {} if psnr is None else psnr
        if not isinstance(psnr, Mapping):
            raise ValueError(f"row {task!r}: 'psnr' must be a dict method → dB, got "
                             f"{type(psnr).__name__}")
        parsed.append((task, reference, recons, psnr))

    k = len(methods)
    cols = 1 + 2 * k
    fig = Figure(figsize=(PANEL * cols + 0.6, PANEL * len(parsed) + 0.2), layout="constrained")
    axes = fig.subplots(len(parsed), cols, squeeze=False)
    for r, (task, reference, recons, psnr) in enumerate(parsed):
        errors = {m: np.abs(img - reference) for m, img in recons.items()}
        vmax, emax = _top(reference), _top(*errors.values())
        row_axes = axes[r]
        row_axes[0].imshow(reference, cmap=IMAGE_CMAP, vmin=0, vmax=vmax)
        row_axes[0].set_title("reference", fontsize=8)
        row_axes[0].set_ylabel(task, fontsize=9)
        for j, m in enumerate(methods):
            title = str(m)
            if m in psnr and psnr[m] is not None:
                try:
                    title = f"{m} {float(psnr[m]):.1f} dB"
                except (TypeError, ValueError) as err:
                    raise ValueError(f"row {task!r}: psnr[{m!r}] must be a number, got "
                                     f"{psnr[m]!r}") from err
            row_axes[1 + j].imshow(recons[m], cmap=IMAGE_CMAP, vmin=0, vmax=vmax)
            row_axes[1 + j].set_title(title, fontsize=8)
            err = row_axes[1 + k + j].imshow(errors[m], cmap=ERROR_CMAP, vmin=0, vmax=emax)
            row_axes[1 + k + j].set_title(f"|{m} − reference|", fontsize=8)
        for ax in row_axes:
            _bare(ax)
        cbar = fig.colorbar(err, ax=list(row_axes[1 + k:]), shrink=0.8, pad=0.01, aspect=15)
        cbar.ax.tick_params(labelsize=7)
    return fig


def reconstructions(path: str | Path, rows: Sequence[Mapping], max_rows: int | None = None) -> Path:
    """One row per task: reference, each method's image, then each |image − reference|."""
    path = _png_path(path)
    return _save(_reconstruction_figure(rows, max_rows), path)


# ------------------------------------------------------------------ weights

def _weight_figure(W: Any, group_names: Sequence[str], task_names: Sequence[str],
                   title: str = "W = σ(Ω)") -> Figure:
    """The figure of :func:`weight_heatmap` (validated), not yet saved."""
    w = _array(W, "W")
    if w.ndim == 1:
        w = w[:, None]
    if w.ndim != 2:
        raise ValueError(f"W must be a vector (N,) or a matrix (N, M), got shape {w.shape}")
    group_names, task_names = [str(g) for g in group_names], [str(t) for t in task_names]
    if not group_names or not task_names:
        raise ValueError("group_names and task_names must be non-empty")
    if w.shape != (len(group_names), len(task_names)):
        raise ValueError(f"W has shape {w.shape} but there are {len(group_names)} group names "
                         f"and {len(task_names)} task names")
    if not np.isfinite(w).all():
        raise ValueError("W has non-finite entries")
    n, m = w.shape
    long_names = m > 6 or max(len(t) for t in task_names) > 8
    fig = Figure(figsize=(min(16.0, 2.5 + 0.6 * m + 0.06 * max(len(g) for g in group_names)),
                          min(16.0, 1.8 + 0.4 * n + (0.06 * max(len(t) for t in task_names)
                                                     if long_names else 0))),
                 layout="constrained")
    ax = fig.subplots()
    vmin, vmax = min(0.0, float(w.min())), max(float(w.max()), 1e-12)
    im = ax.imshow(w, cmap=WEIGHT_CMAP, vmin=vmin, vmax=vmax, aspect="auto",
                   interpolation="nearest")
    ax.set_yticks(range(n), group_names, fontsize=8)
    ax.set_xticks(range(m), task_names, fontsize=8,
                  rotation=45 if long_names else 0, ha="right" if long_names else "center",
                  rotation_mode="anchor")
    ax.set_ylabel("training group")
    ax.set_xlabel("validation task")
    ax.set_title(title)
    if n * m <= MAX_ANNOTATED:
        middle = (vmin + vmax) / 2
        for i in range(n):
            for j in range(m):
                ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if w[i, j] < middle else "black")
    fig.colorbar(im, ax=ax)
    return fig


def weight_heatmap(path: str | Path, W: Any, group_names: Sequence[str],
                   task_names: Sequence[str], title: str = "W = σ(Ω)") -> Path:
    """Heatmap of the N×M weights (rows training groups, columns validation tasks)."""
    path = _png_path(path)
    return _save(_weight_figure(W, group_names, task_names, title), path)


# ------------------------------------------------------------------ training curves

def _losses(history: Sequence[Mapping], key: str) -> tuple[list[int], np.ndarray]:
    """Epochs with a non-empty ``key`` and their per-task losses (epochs, tasks)."""
    epochs, values, width = [], [], None
    for i, logs in enumerate(history):
        v = logs.get(key)
        v = np.atleast_1d(_array([] if v is None else v, f"history[{i}][{key!r}]"))
        if v.ndim != 1:
            raise ValueError(f"history[{i}][{key!r}] must be a flat list (one loss per task), "
                             f"got shape {v.shape}")
        if v.size == 0:
            continue
        if width is not None and v.size != width:
            raise ValueError(f"history[{i}][{key!r}] has {v.size} tasks, earlier epochs {width}")
        width = v.size
        epochs.append(int(logs["epoch"]))
        values.append(v)
    return epochs, np.array(values).reshape(len(values), width or 0)


def _curves_figure(history: Sequence[Mapping], task_names: Sequence[str] | None = None) -> Figure:
    """The figure of :func:`training_curves` (validated), not yet saved."""
    if not isinstance(history, Sequence) or isinstance(history, (str, bytes)) or not history:
        raise ValueError("history must be a non-empty list of per-epoch dicts")
    for i, logs in enumerate(history):
        if not isinstance(logs, Mapping) or "epoch" not in logs or "train_loss" not in logs:
            raise ValueError(f"history[{i}] must be a dict with 'epoch' and 'train_loss'")
    panels = [("training loss", *_losses(history, "train_loss")),
              ("validation loss", *_losses(history, "val_loss"))]
    widths = {v.shape[1] for _, _, v in panels if v.size}
    if not widths:
        raise ValueError("history has no training or validation losses")
    if len(widths) > 1:
        raise ValueError(f"training and validation losses have different task counts {widths}")
    tasks = widths.pop()
    if task_names is None:
        task_names = [f"task {j}" for j in range(tasks)]
    task_names = [str(t) for t in task_names]
    if len(task_names) != tasks:
        raise ValueError(f"{len(task_names)} task names for {tasks} per-task losses")

    fig = Figure(figsize=(10.0 + (1.5 if tasks > 1 else 0), 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (label, epochs, values) in zip(axes, panels):
        ax.set_title(label)
        ax.set_xlabel("epoch")
        if not values.size:
            ax.text(0.5, 0.5, f"no {label}\n(none logged, e.g. joint baseline)",
                    ha="center", va="center", transform=ax.transAxes, color="0.4")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        marker = "o" if len(epochs) <= 30 else None
        for j in range(tasks):
            ax.plot(epochs, values[:, j], marker=marker, markersize=3, label=task_names[j])
        bad = [e for e, row in zip(epochs, values) if not np.isfinite(row).all()]
        if bad:  # a line simply stops at NaN/Inf: say so, or a divergence looks like convergence
            listed = ", ".join(map(str, bad[:8])) + (", …" if len(bad) > 8 else "")
            ax.text(0.5, 0.97, f"non-finite loss at epoch {listed}", ha="center", va="top",
                    transform=ax.transAxes, color="red", fontsize=8)
        finite = values[np.isfinite(values)]
        if finite.size and (finite > 0).all():
            ax.set_yscale("log")
        ax.set_ylabel("loss")
        ax.grid(True, which="major", alpha=0.3)
    if tasks > 1 or task_names != ["task 0"]:
        handles, labels = next((ax.get_legend_handles_labels() for ax in axes
                                if ax.get_legend_handles_labels()[0]), ([], []))
        fig.legend(handles, labels, loc="outside right upper", fontsize=8,
                   ncols=1 + len(labels) // 20)
    return fig


def training_curves(path: str | Path, history: Sequence[Mapping],
                    task_names: Sequence[str] | None = None) -> Path:
    """Training and validation loss per task against epoch (log scale when all > 0)."""
    path = _png_path(path)
    return _save(_curves_figure(history, task_names), path)


# ------------------------------------------------------------------ task catalogue

def _catalogue_figure(images: Any, names: Sequence[str], ncols: int | None = None) -> Figure:
    """The figure of :func:`task_catalogue` (validated), not yet saved."""
    if hasattr(images, "detach") or isinstance(images, np.ndarray):
        stack = _array(images, "images")
        if stack.ndim != 3:
            raise ValueError(f"an image stack must be (tasks, H, W), got shape {stack.shape}")
        images = list(stack)
    images = list(images)
    names = [str(n) for n in names]
    if not images:
        raise ValueError("images must be non-empty")
    if len(images) != len(names):
        raise ValueError(f"{len(images)} images but {len(names)} names")
    if ncols is not None and (isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1):
        raise ValueError(f"ncols must be a positive integer or None, got {ncols!r}")
    arrays = [_image(x, f"image {n!r}") for x, n in zip(images, names)]
    ncols = min(len(arrays), ncols or 6)
    nrows = math.ceil(len(arrays) / ncols)
    fig = Figure(figsize=(PANEL * ncols, PANEL * nrows + 0.2), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        _bare(ax)
    for ax, a, n in zip(axes.flat, arrays, names):
        ax.imshow(a, cmap=IMAGE_CMAP, vmin=0, vmax=_top(a))
        ax.set_title(n, fontsize=8)
    return fig


def task_catalogue(path: str | Path, images: Any, names: Sequence[str],
                   ncols: int | None = None) -> Path:
    """A grid of magnitude images (one per task, each on its own [0, max] scale) with titles."""
    path = _png_path(path)
    return _save(_catalogue_figure(images, names, ncols), path)
