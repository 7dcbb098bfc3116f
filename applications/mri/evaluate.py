"""Evaluate a trained reconstruction network: ``python -m applications.mri.evaluate``.

Reconstructs every slice of every file under ``--data`` (real fastMRI multicoil files or the
synthetic ones) except the slices the checkpoint was trained or validated on (unless
``--include-training``), with the undersampling and crop of ``--mask``/``--acceleration``/
``--center-fraction``/``--crop``, else the training run's, else the file's attributes, and
compares the model with zero-filled RSS and CG-SENSE (coil maps estimated from the fully
sampled centre). Metrics follow fastMRI: per volume, data range = the
volume's maximum, then averaged over the volumes of a task. Writes ``metrics.json`` (layout
below) and ``reconstructions.png`` (per task: reference, model, zero-filled, CG-SENSE and
their error maps) to ``--out``, and prints a table::

    {"tasks": {TASK: {"model": {"psnr", "ssim", "nmse"}, "zero_filled": {...},
                      "cg_sense": {...}, "seen": bool, "model_task": str, ...}},
     "seen": [...], "unseen": [...], "mean": {"seen": {...}, "unseen": {...}}}

A task the model never saw uses the model of the nearest validation task (same anatomy, else
most name parts in common), or with ``--unseen-model average`` the average of all the task
models' weights (its ``model_task`` is then ``"average"``); ``--adapt STEPS`` first fine-tunes
that model for STEPS Adam steps on the task's first volume and evaluates on the others.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import pickle
import re
import sys
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

import torch
from torch import Tensor

from applications.mri import baselines, fft, masks, metrics, operators, sensitivities
from applications.mri.data import CenterCrop, DataError, MaskTransform, SliceDataset, fingerprints
from applications.mri.losses import ReconLoss, reconstruction

METHODS = ("model", "zero_filled", "cg_sense")


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, exit code 2: the usage of every option before
    the message would bury it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists every option)\n")


# --- samples ---------------------------------------------------------------------------------

class ReconTransform:
    """SliceDataset sample → tensors the network and the loss need (all normalised by ``scale``).

    ``kspace`` (C, H, W) undersampled, ``mask`` (1, H, W), ``target`` RSS reference,
    ``coil_target`` fully sampled coil images, ``scale``; ``sens`` (:func:`coil_maps` of the
    undersampled k-space) when ``sense``. ``family``, ``acceleration``, ``center_fraction`` and
    ``seed`` as in :class:`MaskTransform`.

    ESPIRiT maps depend on the k-space only through its calibration region
    (:func:`sensitivities.calibration_box`), and they are scale-free, so they are computed
    before the normalisation. Transforms that share a ``maps_cache`` dict (e.g. the mask draws
    of one training set) therefore compute them once per slice and calibration region: the
    draws of a mask family share the fully sampled centre. The cache keeps the maps
    (C × H × W each) for as long as it lives.
    """

    def __init__(self, family: str | None = None, acceleration: float | None = None,
                 seed: int = 0, sense: bool = False, calib: int = 24,
                 maps_cache: dict | None = None, center_fraction: float | None = None,
                 budget: MemoryBudget | None = None):
        self.masking = MaskTransform(family, acceleration, center_fraction, seed=seed)
        self.sense, self.calib, self.maps_cache = sense, calib, maps_cache
        self.budget = budget or MemoryBudget()

    def __call__(self, sample: dict) -> dict:
        out = self.masking(sample)
        full = sample["kspace"] / out["scale"]
        item = {"kspace": out["kspace"], "mask": out["mask"], "target": out["target"],
                "coil_target": fft.ifft2c(full), "scale": out["scale"]}
        if self.sense:
            item["sens"] = self.maps(sample["kspace"], out["mask"])
        return item

    def maps(self, kspace: Tensor, mask: Tensor) -> Tensor:
        """:func:`coil_maps` of ``mask ⊙ kspace``, through ``maps_cache`` when there is one."""
        masked = kspace * mask + 0.0
        if self.maps_cache is None:
            return coil_maps(masked, self.calib)
        try:
            rows, cols = sensitivities.calibration_box(masked, self.calib)
        except ValueError:  # the centre is not sampled: the profiles below
            rows = cols = slice(0)
        key = (id(kspace), rows.start, rows.stop, cols.start, cols.stop)
        hit = self.maps_cache.get(key)
        if hit is not None and hit[0] is kspace:  # the entry holds kspace: its id is not reused
            return hit[1]
        try:
            sens = sensitivities.estimate(masked, self.calib)
        except ValueError:  # the profiles read the whole sampled centre disc: not cached
            return sensitivities.profiles(masked)
        if self.budget.take(kspace, sens):
            self.maps_cache[key] = (kspace, sens)
        return sens


def _storages(obj: Any) -> dict[int, int]:
    """Storage address → bytes of the tensors in ``obj`` (a tensor, or dicts/tuples of them)."""
    if isinstance(obj, Tensor):
        storage = obj.untyped_storage()
        return {storage.data_ptr(): storage.nbytes()}
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return {k: v for o in obj for k, v in _storages(o).items()}
    return {}


class MemoryBudget:
    """The bytes that caches sharing this object (in one process) may still keep (``None``: no
    limit); a tensor kept by two caches counts once. What no longer fits is read or computed
    again each time it is needed: the same numbers, more time."""

    def __init__(self, nbytes: float | None = None):
        self.left = math.inf if nbytes is None else nbytes
        self.counted: set[int] = set()

    def take(self, *objs: Any) -> bool:
        """Whether ``objs`` (tensors, dicts of them) fit; if so their new bytes are taken."""
        new = {k: v for k, v in _storages(objs).items() if k not in self.counted}
        if sum(new.values()) > self.left:
            return False
        self.left -= sum(new.values())
        self.counted.update(new)
        return True


class CachedSubset(torch.utils.data.Dataset):
    """The slices ``indices`` of a dataset, transformed, read from disk once while ``budget``
    (a :class:`MemoryBudget`, shared by several subsets; default: no limit) lasts.

    With one transform the transformed samples are kept; with several (e.g. the same
    undersampling with different mask seeds, for augmentation) the dataset has
    ``len(indices) × len(transforms)`` deterministic items, the raw slices are kept and item
    ``v·n + i`` is slice ``i`` under transform ``v``.
    """

    def __init__(self, dataset: SliceDataset, indices: Sequence[int],
                 transforms: Callable | Sequence[Callable], budget: MemoryBudget | None = None):
        self.dataset, self.indices = dataset, list(indices)
        self.transforms = list(transforms) if isinstance(transforms, Sequence) else [transforms]
        self.cache: dict[int, dict] = {}
        self.budget = budget or MemoryBudget()

    def __len__(self) -> int:
        return len(self.indices) * len(self.transforms)

    def _kept(self, key: int, make: Callable[[], dict]) -> dict:
        hit = self.cache.get(key)
        if hit is None:
            hit = make()
            if self.budget.take(hit):
                self.cache[key] = hit
        return hit

    def __getitem__(self, i: int) -> dict:
        n = len(self.indices)
        if len(self.transforms) == 1:
            return self._kept(i, lambda: self.transforms[0](self.dataset[self.indices[i]]))
        raw = self._kept(i % n, lambda: self.dataset[self.indices[i % n]])
        return self.transforms[i // n](raw)


class Slices(Sequence):
    """Slices ``indices`` of a dataset under ``transform``, read and transformed each time
    they are indexed (nothing kept: a folder of any size evaluates in the memory of one
    volume); slicing gives a :class:`Slices` again."""

    def __init__(self, dataset: SliceDataset, indices: Sequence[int], transform: Callable):
        self.dataset, self.indices, self.transform = dataset, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Slices(self.dataset, self.indices[i], self.transform)
        return self.transform(self.dataset[self.indices[i]])


# fastMRI's acquisitions (the task of a real file) and their anatomies
FASTMRI_ANATOMY = {"CORPD_FBK": "knee", "CORPDFS_FBK": "knee", "AXT1": "brain", "AXT1PRE": "brain",
                   "AXT1POST": "brain", "AXT2": "brain", "AXFLAIR": "brain"}


def family(task: str) -> str:
    """The anatomy of a task: a fastMRI acquisition's (``CORPD_FBK`` → ``knee``, ``AXT2`` →
    ``brain``, :data:`FASTMRI_ANATOMY`), else the first name part (``knee_pd_random4`` →
    ``knee``)."""
    return FASTMRI_ANATOMY.get(task, task.split("_")[0])


def nearest(task: str, candidates: Sequence[str]) -> str:
    """The candidate of the same anatomy with most name parts in common with ``task``."""
    parts = set(task.split("_"))
    return max(candidates, key=lambda c: (family(c) == family(task), len(parts & set(c.split("_")))))


# --- evaluation ------------------------------------------------------------------------------

def check_mask_settings(acceleration: float | None, center_fraction: float | None,
                        crop: Sequence[int] | None) -> None:
    """The undersampling and crop options, when given: R >= 1, a centre fraction in (0, 1),
    a crop of two sizes >= 8."""
    if acceleration is not None and not 1 <= acceleration < math.inf:
        raise UsageError(f"acceleration must be a finite number >= 1, got {acceleration}")
    if center_fraction is not None and not 0 < center_fraction < 1:
        raise UsageError(f"center fraction must be in (0, 1), got {center_fraction}")
    if crop is not None and (len(crop) != 2 or min(crop) < 8):
        raise UsageError(f"crop must be two sizes >= 8 (H W), got {list(crop)}")


def _files(examples: Sequence[Any], limit: int = 3) -> str:
    names = sorted({ex.fname for ex in examples})
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_examples(examples: Sequence[Any], *, mask: str | None = None,
                   acceleration: float | None = None, center_fraction: float | None = None,
                   crop: Sequence[int] | None = None, one_size: bool = False,
                   crop_option: str = "--crop") -> None:
    """Check from the files' metadata, before any slice is read, that the slices can be masked,
    cropped and batched: mask settings given or in every file and a mask of each setting and
    size can be made, ``crop`` within every image and reference, a reference no larger than its
    image, one coil count, and with ``one_size`` one image and
    reference size (what a minibatch stacks). :class:`UsageError` naming the files and the
    option that fixes it otherwise (``crop_option`` names where the crop came from)."""
    for given, attr, option in ((mask, "mask_family", "--mask FAMILY"),
                                (acceleration, "acceleration", "--acceleration R")):
        lacking = [ex for ex in examples if given is None and ex.attrs.get(attr) is None]
        if lacking:
            raise UsageError(f"{_files(lacking)}: no '{attr}' attribute (real fastMRI "
                             f"files have none); pass {option} to say how to undersample")
    by_coils: dict[int, list] = defaultdict(list)
    sizes: dict[tuple, list] = defaultdict(list)
    settings: dict[tuple, Any] = {}
    for ex in examples:
        c, H, W = ex.shape
        by_coils[c].append(ex)
        ref = ex.ref_shape
        cf = center_fraction if center_fraction is not None else ex.attrs.get("center_fraction", 0.08)
        grid = tuple(crop) if crop is not None else (H, W)
        settings.setdefault((mask or ex.attrs["mask_family"], acceleration or ex.attrs["acceleration"],
                             cf, grid), ex)
        if crop is not None:
            h, w = crop
            if h > H or w > W or (ref is not None and (h > ref[0] or w > ref[1])):
                raise UsageError(f"{crop_option} {h} {w} is larger than {ex.fname}'s images ({H}, {W})"
                                 + (f" or its reference ({ref[0]}, {ref[1]})" if ref else ""))
            sizes[(h, w, h, w)].append(ex)
            continue
        if ref is not None and (ref[0] > H or ref[1] > W):
            raise UsageError(f"{ex.fname}: the reference ({ref[0]}, {ref[1]}) is larger than the "
                             f"k-space's image ({H}, {W})")
        sizes[(H, W, *(ref or (H, W)))].append(ex)
    if len(by_coils) > 1:
        raise UsageError("the network takes one coil count, but the files have "
                         + "; ".join(f"{c} coils ({_files(exs)})" for c, exs in sorted(by_coils.items()))
                         + "; choose files of one count (--tasks, or another --data folder)")
    for (fam, R, cf, grid), ex in settings.items():
        try:
            masks.make(fam, grid, float(R), float(cf), seed=0)
        except ValueError as err:
            raise UsageError(f"{ex.fname}: no {fam} mask of acceleration {R} and centre fraction "
                             f"{cf} on {grid[0]}×{grid[1]}: {err}") from None
    if one_size and len(sizes) > 1:
        smallest = [min(min(s[k], s[k + 2]) for s in sizes) for k in (0, 1)]
        raise UsageError("a minibatch needs one size, but the files have images (and references) "
                         "of " + "; ".join(f"{H}×{W} ({h}×{w}) in {_files(exs)}"
                                           for (H, W, h, w), exs in sorted(sizes.items()))
                         + f"; pass --crop H W (at most {smallest[0]} {smallest[1]}) to crop them alike")


def coil_maps(kspace: Tensor, calib: int = 24) -> Tensor:
    """ESPIRiT maps from the fully sampled centre; where the mask leaves too small a
    calibration box (radial, some 2-D masks), the low-resolution profiles of
    :func:`sensitivities.profiles` (the sampled centre within a 16% disc)."""
    try:
        return sensitivities.estimate(kspace, calib)
    except ValueError:
        return sensitivities.profiles(kspace)


@torch.no_grad()
def reconstruct(model: torch.nn.Module, item: dict, device: torch.device, cg_iters: int = 30
                ) -> dict[str, Tensor]:
    """Magnitude images (H, W) of one sample: reference, model, zero-filled and CG-SENSE."""
    batch = {k: v.unsqueeze(0).to(device) for k, v in item.items()}
    ctx = {k: batch[k] for k in ("kspace", "mask", "sens") if k in batch}
    u_T = model.rollout(ctx)[-1]
    sens = batch.get("sens")
    if sens is None:
        sens = coil_maps(batch["kspace"])
    cg = baselines.cg_sense(batch["kspace"], batch["mask"], sens, iters=cg_iters)
    scale = batch["scale"]
    ref = batch["target"][0] * scale
    images = {"model": reconstruction(u_T)[0], "zero_filled": baselines.zero_filled(batch["kspace"], batch["mask"])[0],
              "cg_sense": baselines.magnitude(cg, sens)[0]}
    return {"reference": ref, **{k: operators.center_crop(v, ref.shape) * scale for k, v in images.items()}}


def volume_metrics(ref: Tensor, images: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """fastMRI PSNR/SSIM/NMSE of each method on one volume (slices, H, W)."""
    ref = ref.double()
    return {m: {"psnr": float(metrics.psnr(ref, img.double())),
                "ssim": float(metrics.ssim(ref, img.double())),
                "nmse": float(metrics.nmse(ref, img.double()))} for m, img in images.items()}


def adapt(model: torch.nn.Module, data: Sequence[dict], steps: int, lr: float = 1e-4,
          device: torch.device | None = None) -> torch.nn.Module:
    """A copy of ``model`` fine-tuned by ``steps`` Adam steps on ``data`` (one sample a step)."""
    tuned = copy.deepcopy(model)
    opt = torch.optim.Adam(tuned.parameters(), lr=lr)
    loss = ReconLoss()
    for s in range(steps):
        item = {k: v.unsqueeze(0).to(device) for k, v in data[s % len(data)].items()}
        ctx = {k: item[k] for k in ("kspace", "mask", "sens") if k in item}
        states = tuned.rollout(ctx)
        value = loss.terminal(states[-1], item) + loss.initial(states[0], item)
        opt.zero_grad()
        value.backward()
        opt.step()
    return tuned


def average_model(models: Sequence[torch.nn.Module]) -> torch.nn.Module:
    """A copy of the first model with the mean of the models' floating-point weights and
    buffers (the models share one architecture, as a checkpoint's task models do)."""
    avg = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    avg.load_state_dict({k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point()
                         else v for k, v in states[0].items()})
    return avg


UNSEEN_MODELS = ("nearest", "average")


def evaluate_tasks(models: dict[str, torch.nn.Module], files: dict[str, dict[str, list[dict]]],
                   seen: Sequence[str], device: torch.device, adapt_steps: int = 0,
                   progress: Callable[[Any], Any] = lambda it: it,
                   unseen_model: str = "nearest") -> tuple[dict, list[dict]]:
    """Metrics of every task and one figure row per task.

    ``models``: validation-task name → model; ``files``: task → {fname: [transformed samples in
    slice order]}; ``seen``: tasks whose own validation-task model exists (directly or by
    anatomy); ``unseen_model``: any other task uses the ``"nearest"`` task's model or the
    ``"average"`` of all of them (:func:`average_model`). Returns the
    ``metrics.json`` content and rows for ``figures.reconstructions``.
    """
    if unseen_model not in UNSEEN_MODELS:
        raise ValueError(f"unseen_model must be one of {UNSEEN_MODELS}, got {unseen_model!r}")
    out: dict = {"tasks": {}, "seen": [], "unseen": []}
    rows = []
    averaged = None
    for task in progress(sorted(files)):
        is_seen = task in seen
        if is_seen or task in models or unseen_model == "nearest":
            model_task = task if task in models else nearest(task, list(models))
            model = models[model_task]
        else:
            if averaged is None:  # made once, for the first unseen task
                averaged = average_model(list(models.values()))
            model_task, model = "average", averaged
        volumes = files[task]
        names = sorted(volumes)
        if not is_seen and adapt_steps > 0:
            if len(names) > 1:
                adapt_data, names = volumes[names[0]], names[1:]
            else:  # one volume: adapt on its first half of slices
                half = max(1, len(volumes[names[0]]) // 2)
                adapt_data = volumes[names[0]][:half]
                volumes = {names[0]: volumes[names[0]][half:] or adapt_data}
            model = adapt(model, list(adapt_data), adapt_steps, device=device)  # read once
        per_volume = []
        for i, name in enumerate(names):
            recons = [reconstruct(model, item, device) for item in volumes[name]]
            stack = {k: torch.stack([r[k] for r in recons]).cpu() for k in recons[0]}
            per_volume.append(volume_metrics(stack["reference"], {m: stack[m] for m in METHODS}))
            if i == 0:
                first = {k: v[0] for k, v in stack.items()}
                rows.append({"task": f"{task}{'' if is_seen else ' (unseen)'}",
                             "reference": first["reference"],
                             "images": {m: first[m] for m in METHODS}})
        out["tasks"][task] = {
            **{m: {q: sum(v[m][q] for v in per_volume) / len(per_volume) for q in ("psnr", "ssim", "nmse")}
               for m in METHODS},
            "seen": is_seen, "model_task": model_task, "volumes": len(per_volume),
            "adapted_steps": adapt_steps if not is_seen else 0,
        }
        # the figure shows one slice; its titles give the task's PSNR, the number of the table
        rows[-1]["psnr"] = {m: out["tasks"][task][m]["psnr"] for m in METHODS}
        out["seen" if is_seen else "unseen"].append(task)
    out["mean"] = {group: {m: {q: sum(out["tasks"][t][m][q] for t in out[group]) / len(out[group])
                               for q in ("psnr", "ssim", "nmse")} for m in METHODS}
                   for group in ("seen", "unseen") if out[group]}
    return out, rows


def table(results: dict) -> str:
    """The PSNR/SSIM table printed at the end of training and evaluation."""
    head = f"{'task':34s} {'':6s}" + "".join(f" {m + ' PSNR':>17s} {'SSIM':>6s}" for m in METHODS)
    lines = [head, "-" * len(head)]
    for group in ("seen", "unseen"):
        for task in results[group]:
            r = results["tasks"][task]
            lines.append(f"{task:34s} {group:6s}" + "".join(
                f" {r[m]['psnr']:17.2f} {r[m]['ssim']:6.3f}" for m in METHODS))
        if group in results.get("mean", {}):
            r = results["mean"][group]
            lines.append(f"{'mean':34s} {group:6s}" + "".join(
                f" {r[m]['psnr']:17.2f} {r[m]['ssim']:6.3f}" for m in METHODS))
    return "\n".join(lines)


def group_files(dataset: SliceDataset, indices: Sequence[int], transform: Callable
                ) -> dict[str, dict[str, Slices]]:
    """task → fname → the transformed samples (slice order, :class:`Slices`: made when used)."""
    files: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i in sorted(indices, key=lambda i: (dataset.examples[i].fname, dataset.examples[i].slice)):
        ex = dataset.examples[i]
        files[ex.attrs["task"]][ex.fname].append(i)
    return {t: {f: Slices(dataset, idx, transform) for f, idx in v.items()} for t, v in files.items()}


# --- CLI -------------------------------------------------------------------------------------

def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict:
    """Load a training checkpoint safely (``weights_only=True``); clear errors otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder; pass the checkpoint file in it (checkpoint.pt or best.pt)")
    if not path.is_file():
        raise UsageError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise UsageError(f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive; this "
                         "file is not one, or is truncated)")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        raise UsageError(f"{path}: refused to load: it holds objects that only arbitrary unpickling "
                         "could rebuild" + (f" ({found.group(1)})" if found else "")
                         + ", which we never do (weights_only=True); it is not a checkpoint of "
                         "applications.mri.train") from err
    except Exception as err:  # noqa: BLE001 - a damaged archive, whatever torch raises for it
        raise UsageError(f"{path}: cannot read the checkpoint ({type(err).__name__}: {err})"
                         .split("\n")[0]) from err
    if not isinstance(state, dict) or "config" not in state or "trainer" not in state:
        raise UsageError(f"{path}: not a bilevelkit MRI training checkpoint (no config/trainer)")
    return state


def network_config(state: dict):
    """The checkpoint's :class:`NetworkConfig`; a clear error if this version cannot build it."""
    from applications.mri.network import NetworkConfig

    try:
        return NetworkConfig(**state["network"])
    except (TypeError, ValueError) as err:
        raise UsageError(f"the checkpoint's network settings {state.get('network')} do not build "
                         f"a network of this version: {err}") from err


def models_from_checkpoint(state: dict, device: torch.device) -> dict[str, torch.nn.Module]:
    """Validation-task name → network with the checkpoint's weights."""
    from applications.mri.network import UnrolledRecon

    net_cfg = network_config(state)
    models_state = state["trainer"]["models"]
    out = {}
    for j, name in enumerate(state["task_names"]):
        model = UnrolledRecon(net_cfg).to(device)
        prefix = f"{j}."
        try:
            model.load_state_dict({k[len(prefix):]: v for k, v in models_state.items()
                                   if k.startswith(prefix)})
        except RuntimeError as err:
            raise UsageError(f"the checkpoint's weights of task model {name!r} do not fit its "
                             f"network settings: {str(err).splitlines()[0]}") from None
        model.eval()
        out[name] = model
    return out


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m applications.mri.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt or best.pt of a training run")
    p.add_argument("--data", required=True, help="folder of fastMRI-layout .h5 files (real or synthetic) "
                   "or one such file, "
                   "e.g. the training run's data folder (the first line of its train.log names it)")
    p.add_argument("--out", required=True, help="folder for metrics.json and reconstructions.png "
                   "(not a training run's folder)")
    p.add_argument("--mask", default=None, choices=masks.FAMILIES,
                   help="mask family (default: the training run's --mask, else each file's "
                   "mask_family attribute)")
    p.add_argument("--acceleration", type=float, default=None,
                   help="acceleration R >= 1 (default: the training run's, else each file's attribute)")
    p.add_argument("--center-fraction", type=float, default=None,
                   help="fully sampled centre fraction (default: the training run's, else each "
                   "file's attribute, else 0.08)")
    crop = p.add_mutually_exclusive_group()
    crop.add_argument("--crop", type=int, nargs=2, default=None, metavar=("H", "W"),
                      help="centre-crop the coil images (and the reference) to H × W first "
                      "(default: the training run's --crop, else none)")
    crop.add_argument("--no-crop", action="store_true",
                      help="reconstruct the files' full grid even if the run was trained with --crop")
    p.add_argument("--unseen-model", default="nearest", choices=UNSEEN_MODELS,
                   help="the model of a task that has none of its own: the nearest task's (same "
                   "anatomy first) or the average of all the task models' weights (default: nearest)")
    p.add_argument("--adapt", type=int, default=0, metavar="STEPS",
                   help="fine-tune that model (--unseen-model) on the first volume of each task that "
                   "has no model of its own, then score the others (default: 0, no fine-tuning)")
    p.add_argument("--include-training", action="store_true",
                   help="also score the slices the checkpoint was trained or validated on (left out "
                   "by default, so that scores are held-out ones)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto picks CUDA when present (default: auto)")
    p.add_argument("--seed", type=int, default=1234, help="mask seed (per file and slice; default: 1234)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads, 0 for torch's default (default: 1, as in training)")
    return p


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return torch.device(name)


def _held_out(dataset: SliceDataset, trained: dict) -> list[int]:
    """Indices of the slices the checkpoint was neither trained nor validated on. ``trained``:
    fingerprint → {"file", "slices"} (:func:`data.fingerprint`: the volume whatever its name);
    checkpoints before fingerprints map the file's name → slices."""
    by_print = all(isinstance(v, dict) for v in trained.values())
    prints = fingerprints(dataset.examples) if by_print else {}
    keep = []
    for i, ex in enumerate(dataset.examples):
        if by_print:
            slices = trained.get(prints[ex.path], {}).get("slices", ())
        else:
            slices = trained.get(Path(ex.fname).name, ())
        if ex.slice not in slices:
            keep.append(i)
    return keep


def run(args: argparse.Namespace) -> dict:
    from applications.mri import figures

    for name in ("adapt", "threads", "seed"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(args, name)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; expected a folder (new or empty of a training run)")
    if any((out / f).exists() for f in ("checkpoint.pt", "config.toml")):
        raise UsageError(f"--out {out} holds a training run, whose metrics.json and figures this "
                         "would overwrite; choose another --out")
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, so the folder cannot be made there")
    if not Path(args.data).exists():
        raise UsageError(f"--data {args.data}: no such file or folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    state = load_checkpoint(args.checkpoint, device)
    if "network" not in state or "task_names" not in state or "models" not in state["trainer"]:
        raise UsageError(f"{args.checkpoint}: not a complete checkpoint of applications.mri.train "
                         "(it lacks the network settings, task names or weights)")
    net_cfg = network_config(state)
    models = models_from_checkpoint(state, device)
    trained_with = state.get("config", {})
    settings = {name: getattr(args, name) if getattr(args, name) is not None
                else trained_with.get(name) or None
                for name in ("mask", "acceleration", "center_fraction", "crop")}
    if args.no_crop:
        settings["crop"] = None
    check_mask_settings(settings["acceleration"], settings["center_fraction"], settings["crop"])
    crop = settings["crop"]
    crop_option = "--crop" if args.crop else "the training run's --crop (--no-crop to leave it out)"
    dataset = SliceDataset(args.data, transform=CenterCrop(crop) if crop else None)
    indices = list(range(len(dataset)))
    trained = state.get("trained_on", {})
    if trained and not args.include_training:
        indices = _held_out(dataset, trained)
        left = len(dataset) - len(indices)
        if not indices:
            raise UsageError(f"--data {args.data}: the checkpoint was trained or validated on every "
                             "slice there; point --data at held-out files or pass --include-training")
        if left:
            print(f"left out {left} of {len(dataset)} slices that the checkpoint was trained or "
                  "validated on (--include-training scores them too)", file=sys.stderr)
    other = [dataset.examples[i] for i in indices if dataset.examples[i].shape[0] != net_cfg.coils]
    if other:  # e.g. fastMRI's brain data, of 4 to 20 coils
        if len(other) == len(indices):
            raise UsageError(f"--data {args.data}: no file has the {net_cfg.coils} coils the "
                             f"network takes ({_files(other)} have "
                             f"{sorted({ex.shape[0] for ex in other})})")
        print(f"left out {len({ex.fname for ex in other})} file(s) of another coil count than the "
              f"network's {net_cfg.coils}: {_files(other, 5)}", file=sys.stderr)
        indices = [i for i in indices if dataset.examples[i].shape[0] == net_cfg.coils]
    check_examples([dataset.examples[i] for i in indices], mask=settings["mask"],
                   acceleration=settings["acceleration"], center_fraction=settings["center_fraction"],
                   crop=crop, crop_option=crop_option)
    transform = ReconTransform(settings["mask"], settings["acceleration"], seed=args.seed,
                               sense=net_cfg.needs_maps, center_fraction=settings["center_fraction"])
    files = group_files(dataset, indices, transform)
    seen = [t for t in files if t in state.get("seen_tasks", [])]
    results, rows = evaluate_tasks(models, files, seen, device, args.adapt,
                                   unseen_model=args.unseen_model)
    out.mkdir(parents=True, exist_ok=True)
    results["checkpoint"] = str(args.checkpoint)
    results["held_out_only"] = bool(trained) and not args.include_training
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    figures.reconstructions(out / "reconstructions.png", rows)
    print(table(results))
    print(f"\noutputs in {out}/ (metrics.json, reconstructions.png)")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        run(args)
    except (UsageError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
