"""Meta-learned multi-coil MRI reconstruction: ``python -m applications.mri.train``.

With no arguments: generates (once, cached) the synthetic task catalogue, trains one unrolled
network per validation task with the bilevel model of Algorithm 1 (Ω over training tasks ×
validation tasks, W = σ(Ω) column-wise, the initial network shared), evaluates on held-out
volumes of the seen tasks and on the held-out tasks, and writes everything to ``--out``.

Data split: the training groups are the seen tasks; each task's volumes are split into
training, validation and test (one volume each for the last two; by slices when a task has
fewer than three volumes). Validation tasks are the anatomies (``--val-tasks anatomy``, the
default: W is then tasks × anatomies) or the seen tasks themselves (``--val-tasks task``).
Tasks listed as held out (synthetic catalogue) or in ``--unseen`` are never trained on.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import difflib
import json
import logging
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import bilevelkit as bk
from applications.mri import masks, phantoms
from applications.mri.data import CenterCrop, DataError, SliceDataset, fingerprints, generate
from applications.mri.evaluate import (CachedSubset, MemoryBudget, Parser, ReconTransform, UsageError,
                                       check_examples, check_mask_settings, evaluate_tasks, family,
                                       group_files, load_checkpoint, pick_device, table)
from applications.mri.losses import ReconLoss
from applications.mri.network import NetworkConfig, UnrolledRecon

log = logging.getLogger("applications.mri.train")


@dataclass
class TrainConfig:
    """Every option of the training CLI (``--config FILE.toml`` uses these names)."""

    data: str = ""                 # folder of fastMRI-layout files; "" = synthetic catalogue
    cache: str = "~/.cache/bilevelkit/synthetic"
    out: str = "runs/mri"
    tasks: list = field(default_factory=list)    # subset of tasks to use (default: all)
    unseen: list = field(default_factory=list)   # extra tasks to hold out from training
    size: list = field(default_factory=lambda: [64, 64])
    coils: int = 8
    slices: int = 6
    volumes: int = 6
    mask_variants: int = 16
    mask: str = ""                 # mask family; "" = each file's mask_family attribute
    acceleration: float = 0.0      # 0 = each file's attribute
    center_fraction: float = 0.0   # 0 = each file's attribute, else 0.08
    crop: list = field(default_factory=list)     # [H, W]: centre-crop the coil images first
    mode: str = "meta"
    val_tasks: str = "anatomy"
    normalizer: str = "softmax"
    hypergrad: str = "unrolled"
    hypergrad_costate: str = "autograd"
    inner_steps: int = 1
    inner_lr: float = 0.01
    costate: str = "autograd"
    checkpoints: int = 3
    phases: int = 4
    width: int = 12
    depth: int = 2
    kernel: int = 3
    initial: str = "kspace_cnn"
    warm_start: str = "cg_sense"
    cg_iters: int = 20
    operator: str = "coil"
    share_initial: bool = True
    epochs: int = 25
    lower_steps: int = 10
    groups_per_step: int = 2
    upper_steps: int = 1
    batch_size: int = 2
    lr: float = 3e-3
    lr_schedule: str = "cosine"
    upper_loss: str = "log"
    meta_lr: float = 0.1
    seed: int = 0
    device: str = "auto"
    threads: int = 1
    memory_gb: float = 4.0

    def network(self, coils: int) -> NetworkConfig:
        """The :class:`NetworkConfig` these options ask for, for data with ``coils`` coils."""
        return NetworkConfig(coils=coils, phases=self.phases, width=self.width, depth=self.depth,
                             kernel=self.kernel, kspace_width=self.width, initial=self.initial,
                             warm_start=self.warm_start, cg_iters=self.cg_iters,
                             operator=self.operator)


INT_PAIRS = ("size", "crop")  # options of two integers, H W
# what a run whose config.toml predates an option trained with: a constant rate, the plain mean
BEFORE_OPTION = {"lr_schedule": "constant", "upper_loss": "mean"}
# what --resume cannot change: the data, its split and masks, the network, the shape of Ω
FIXED_ON_RESUME = frozenset({"tasks", "unseen", "size", "coils", "slices", "volumes",
                             "mask_variants", "mask", "acceleration", "center_fraction", "crop",
                             "val_tasks", "phases", "width", "depth", "kernel", "initial",
                             "warm_start", "cg_iters", "operator", "share_initial", "seed"})

QUICK = dict(size=[64, 64], coils=4, slices=2, volumes=3, mask_variants=2, phases=2, width=6, epochs=3,
             lower_steps=1, groups_per_step=0, tasks=["brain_t1_random4", "knee_pd_equispaced4",
                                   "knee_t2_random6", "knee_pd_random8"])

CHOICES = {"mode": ("meta", "joint"), "val_tasks": ("anatomy", "task"),
           "normalizer": ("softmax", "sparsemax", "entmax15"),
           "hypergrad": ("unrolled", "first-order", "implicit"),
           "hypergrad_costate": ("autograd", "sweep", "checkpointed"),
           "costate": ("autograd", "sweep", "checkpointed"),
           "initial": ("kspace_cnn", "none"), "warm_start": ("cg_sense", "zero_filled"),
           "operator": ("coil", "sense"), "lr_schedule": ("cosine", "constant"),
           "upper_loss": ("mean", "log"),
           "device": ("auto", "cpu", "cuda")}

HELP = {
    "data": "folder of fastMRI-layout .h5 files (real multicoil or generated), or one such file; "
            "tasks come from each file's task/acquisition attribute (default: the built-in "
            "synthetic catalogue)",
    "cache": "where the synthetic catalogue is generated and reused",
    "out": "output folder (checkpoints, metrics.json, figures, logs)",
    "tasks": "use only these tasks (default: all tasks of the data)",
    "unseen": "hold these tasks out of training, evaluate only (default: none besides the "
              "catalogue's held-out tasks)",
    "size": "image size H W of the synthetic data", "coils": "coils of the synthetic data",
    "slices": "slices per synthetic volume", "volumes": "synthetic volumes per task",
    "mask_variants": "undersampling masks per training slice (augmentation; masks differ by seed)",
    "mask": "mask family, for files without a mask_family attribute (real fastMRI files) or to "
            "override it (default: each file's)",
    "acceleration": "acceleration R >= 1 of the mask; 0 takes each file's attribute",
    "center_fraction": "fully sampled centre fraction of the mask, a number in (0, 1); 0 (the "
                       "default) takes each file's attribute, or 0.08 for files without one",
    "crop": "centre-crop the coil images and references to H × W before undersampling, so that "
            "volumes of other sizes batch together (fastMRI: 320 320) (default: no crop)",
    "mode": "meta: learn W = σ(Ω); joint: uniform weights (the baseline)",
    "val_tasks": "validation tasks: one per anatomy, or one per seen task",
    "normalizer": "σ, normalising each column of Ω onto the simplex",
    "hypergrad": "hypergradient strategy of the upper level (implicit: a 10-term Neumann series)",
    "hypergrad_costate": "how unrolled hypergradients are computed: autograd keeps the k-step "
                         "graph, sweep/checkpointed use the inner loop's costate sweep (memory flat in k)",
    "inner_steps": "inner (look-ahead) steps k of the hypergradient", "inner_lr": "inner step size",
    "costate": "costate solver of the lower level: autograd keeps the phases' graph (fastest on "
               "64×64 data), sweep keeps the states only and re-evaluates one phase at a time, "
               "checkpointed keeps --checkpoints states", "checkpoints": "states kept by --costate checkpointed",
    "phases": "unrolled phases T", "width": "feature channels of the phase CNNs",
    "depth": "convolutions per CNN", "kernel": "convolution kernel size (odd)",
    "initial": "initial network F_0: a residual k-space CNN on the warm start, or none (F_0 is "
               "the warm start)",
    "cg_iters": "CG-SENSE iterations of the cg_sense warm start",
    "warm_start": "warm start of F_0: --cg-iters CG-SENSE iterations with ESPIRiT maps estimated from the "
             "sampled centre, or the zero-filled k-space (no maps anywhere)",
    "operator": "data term of the phases: coil (calibration-free, coil by coil) or sense "
                "(ESPIRiT maps estimated from the sampled centre)",
    "share_initial": "share F_0 across the task models",
    "epochs": "epochs (each: lower steps, then upper steps)",
    "lower_steps": "lower-level Adam steps per epoch", "upper_steps": "Ω steps per epoch",
    "groups_per_step": "training groups drawn from W per lower step and task (an unbiased, "
                       "cheaper estimate of the weighted sum); 0: all groups",
    "batch_size": "slices per training group in a minibatch", "lr": "lower-level Adam learning rate",
    "lr_schedule": "schedule of --lr over --epochs: cosine decays it by a half cosine, from "
                   "--lr at the first epoch to near 0 at the last; constant keeps it",
    "upper_loss": "objective of the Ω steps on a validation minibatch: mean, the training loss "
                  "(a mean over its slices and pixels); log, the mean over its slices of the log "
                  "of each slice's loss, so that every slice counts by its relative error as in "
                  "a mean PSNR (meta mode only; --resume may change it)",
    "meta_lr": "Adam learning rate of Ω", "seed": "seed of data, masks, initialisation and minibatches",
    "memory_gb": "GiB of slices (and coil maps) kept in memory between epochs; beyond it they "
                 "are read and computed again each time (the same results, slower)",
    "device": "auto picks CUDA when present", "threads": "torch CPU threads (0: torch's own choice); the tensors are small, and on a "
               "shared 2-core machine 2 threads measured up to 4x slower than 1",
}


# --- configuration ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m applications.mri.train", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    p.add_argument("--config", metavar="FILE.toml", help="options from a TOML file (CLI overrides it)")
    p.add_argument("--quick", action="store_true", help="tiny configuration for smoke tests (under a minute)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoint.pt; "
                   "options given with it replace the run's own, except those of its data, split and network")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        kw: dict[str, Any] = {"help": HELP[f.name] if "default" in HELP[f.name] or shown in ("", [])
                              else f"{HELP[f.name]} (default: {shown})"}
        if f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        elif f.name == "mask":
            kw["choices"] = masks.FAMILIES
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name in INT_PAIRS:
            p.add_argument(flag, nargs=2, type=int, metavar=("H", "W"), **kw)
        elif isinstance(default, list):
            p.add_argument(flag, nargs="+", metavar="TASK", **kw)
        else:
            p.add_argument(flag, type=type(default), **kw)
    return p


def load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"--config {path}: not valid TOML: {err}") from None
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    names = {key: key.replace("-", "_") for key in raw}
    unknown = []
    for key, name in names.items():
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            unknown.append(repr(key) + (f" (did you mean {close[0]!r}?)" if close else ""))
    if unknown:  # all of them at once, not one per attempt
        raise UsageError(f"--config {path}: unknown option{'s' * (len(unknown) > 1)} "
                         f"{', '.join(unknown)}; valid options: {', '.join(sorted(known))}")
    return {names[key]: _typed(value, getattr(TrainConfig(), names[key]),
                               f"--config {path}: option {key!r}", names[key] in INT_PAIRS)
            for key, value in raw.items()}


def _typed(value: Any, default: Any, where: str, ints: bool = False) -> Any:
    """``value`` if it has the type of the option's ``default`` (an int is a valid float; a
    list holds integers when ``ints``, else names)."""
    if isinstance(default, list):
        kind = int if ints else str
        if isinstance(value, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
            return value
        what = "a list of integers" if kind is int else "a list of names, e.g. [\"knee_pd_random4\"]"
    elif isinstance(default, bool):
        if isinstance(value, bool):
            return value
        what = "true or false"
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        what = "an integer"
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        what = "a number"
    else:
        if isinstance(value, str):
            return value
        what = "a string"
    raise UsageError(f"{where} must be {what}, got {value!r}")


def resolve(argv: Sequence[str] | None) -> tuple[TrainConfig, argparse.Namespace]:
    """Defaults < --quick < --config file < command line; then validated. ``args.given``
    names the options set by the command line or the file (what ``--resume`` applies)."""
    args = build_parser().parse_args(argv)
    values = dataclasses.asdict(TrainConfig())
    from_file = load_toml(args.config) if "config" in args else {}
    given = {k: v for k, v in vars(args).items() if k in values}
    if getattr(args, "quick", False):
        values.update(QUICK)
        if ("data" in given or "data" in from_file) and not ("tasks" in given or "tasks" in from_file):
            values["tasks"] = []  # --quick's tasks are catalogue names: keep the data's own
    values.update(from_file)
    values.update(given)
    cfg = TrainConfig(**values)
    # with --resume, task names are checked once merged with the run's own options (its --data)
    try:
        validate(cfg, tasks=not getattr(args, "resume", False))
    except UsageError as err:  # a value the file set (and the command line did not) names the file
        name = str(err).split(" ", 1)[0]
        if name in from_file and name not in given:
            raise UsageError(f"--config {args.config}: option {err}") from None
        raise
    args.given = sorted({*from_file, *given})
    return cfg, args


def validate(cfg: TrainConfig, tasks: bool = True) -> None:
    """Every option's type and range; with ``tasks``, the task names of the synthetic catalogue."""
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise UsageError(f"{name} must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}")
    for name in ("coils", "slices", "volumes", "mask_variants", "phases", "width", "depth", "kernel", "epochs",
                 "batch_size", "inner_steps", "checkpoints", "cg_iters"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be an integer >= 1, got {value!r}")
    for name in ("lower_steps", "upper_steps", "threads", "groups_per_step"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 0:
            raise UsageError(f"{name} must be an integer >= 0, got {getattr(cfg, name)!r}")
    if len(cfg.size) != 2 or min(cfg.size) < 16:
        raise UsageError(f"size must be two integers >= 16 (H W), got {cfg.size}")
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise UsageError(f"seed must be an integer >= 0, got {cfg.seed!r}")
    if cfg.mask and cfg.mask not in masks.FAMILIES:
        raise UsageError(f"mask must be one of {', '.join(masks.FAMILIES)}, got {cfg.mask!r}")
    check_mask_settings(cfg.acceleration or None, cfg.center_fraction or None, cfg.crop or None)
    if not (math.isfinite(cfg.memory_gb) and cfg.memory_gb >= 0):
        raise UsageError(f"memory_gb must be a finite number >= 0, got {cfg.memory_gb}")
    for name in ("lr", "meta_lr", "inner_lr"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0):
            raise UsageError(f"{name} must be a finite number > 0, got {getattr(cfg, name)}")
    if cfg.kernel % 2 == 0:
        raise UsageError(f"kernel must be odd, got {cfg.kernel}")
    if tasks and not cfg.data:
        unknown = [t for t in [*cfg.tasks, *cfg.unseen] if t not in phantoms.TASKS]
        if unknown:
            raise UsageError(f"unknown task(s) {', '.join(unknown)}; the synthetic catalogue has: "
                             + ", ".join(phantoms.TASKS))


def write_toml(path: Path, cfg: TrainConfig) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return json.dumps(v)

    lines = ["# resolved options of this run (python -m applications.mri.train --config this-file)"]
    lines += [f"{k} = {fmt(v)}" for k, v in dataclasses.asdict(cfg).items()]
    path.write_text("\n".join(lines) + "\n")


# --- data ------------------------------------------------------------------------------------

def data_root(cfg: TrainConfig, rank: int) -> Path:
    if cfg.data:
        root = Path(cfg.data).expanduser()
        if not root.exists():
            raise UsageError(f"--data {root}: no such folder or file")
        return root
    H, W = cfg.size
    cache = Path(cfg.cache).expanduser()
    root = cache / f"{H}x{W}-c{cfg.coils}-s{cfg.slices}-v{cfg.volumes}-seed{cfg.seed}"

    def make() -> None:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"--cache {cache}: cannot make the folder {root} for the synthetic "
                             f"data there ({err.strerror or err})") from None
        generate(root, tasks=list(phantoms.TASKS), slices=cfg.slices, size=(H, W), coils=cfg.coils,
                 seed=cfg.seed, volumes=cfg.volumes)

    on_rank_0(make, rank)
    return root


def on_rank_0(work: Callable[[], None], rank: int) -> None:
    """``work()`` in process 0 only (files other processes then read); under torch.distributed
    every process waits for it and raises if it failed, so that none waits forever."""
    error = None
    if rank == 0:
        try:
            work()
        except (UsageError, DataError, OSError) as err:
            error = err
    if dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if \
            dist.get_backend() == "nccl" else torch.device("cpu")
        failed = torch.tensor([error is not None], dtype=torch.int32, device=device)
        dist.all_reduce(failed)
        if failed.item() and error is None:
            raise UsageError("stopped: process 0 reported an error (its message is above)")
    if error is not None:
        raise error


def split(dataset: SliceDataset, cfg: TrainConfig) -> dict[str, Any]:
    """Per task: train/val/test example indices; which tasks are seen."""
    by_task: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, ex in enumerate(dataset.examples):
        by_task[ex.attrs["task"]][ex.fname].append(i)
    tasks = sorted(by_task)
    if cfg.tasks:
        missing = [t for t in cfg.tasks if t not in by_task]
        if missing:
            raise UsageError(f"task(s) {', '.join(missing)} not found in the data; it has: {', '.join(tasks)}")
        tasks = [t for t in tasks if t in cfg.tasks]
    stray = [t for t in cfg.unseen if t not in tasks]
    if stray:
        raise UsageError(f"--unseen: task(s) {', '.join(stray)} not among the tasks used: "
                         + ", ".join(tasks))
    held = set(cfg.unseen) | {t for t in tasks if t in phantoms.TASKS and phantoms.TASKS[t].held_out
                              and not cfg.data}
    seen = [t for t in tasks if t not in held]
    if not seen:
        raise UsageError("no task is left to train on (all are held out)")
    parts: dict[str, dict[str, list[int]]] = {}
    for t in tasks:
        files = [by_task[t][f] for f in sorted(by_task[t])]
        if t in held:
            parts[t] = {"test": [i for f in files for i in f]}
        elif len(files) >= 3:
            parts[t] = {"train": [i for f in files[:-2] for i in f], "val": files[-2], "test": files[-1]}
        else:
            flat = [i for f in files for i in f]
            if len(flat) < 3:
                raise UsageError(f"task {t} has {len(flat)} slice(s); need at least 3 to split "
                                 "into training, validation and test")
            a, b = max(1, len(flat) * 3 // 5), max(2, len(flat) * 4 // 5)
            parts[t] = {"train": flat[:a], "val": flat[a:b], "test": flat[b:]}
    return {"seen": seen, "unseen": [t for t in tasks if t in held], "parts": parts}


def trained_slices(dataset: SliceDataset, plan: dict) -> dict[str, dict]:
    """Fingerprint → {"file", "slices"} of the training and validation slices: what evaluate
    leaves out, in any folder and under any name (:func:`data.fingerprint`)."""
    used = [dataset.examples[i] for t in plan["seen"]
            for i in plan["parts"][t]["train"] + plan["parts"][t]["val"]]
    prints = fingerprints(used)
    out: dict[str, dict] = {}
    for ex in used:
        out.setdefault(prints[ex.path], {"file": Path(ex.fname).name, "slices": []})["slices"].append(ex.slice)
    return {k: {**v, "slices": sorted(v["slices"])} for k, v in sorted(out.items())}


def _same_slices(now: dict, before: dict) -> bool:
    """Whether two :func:`trained_slices` name the same slices of the same volumes (by name for
    a checkpoint from before fingerprints, whose entries are file name → slices)."""
    if any(not isinstance(v, dict) for v in before.values()):
        by_name: dict[str, list[int]] = defaultdict(list)  # the old record merged equal names
        for v in now.values():
            by_name[v["file"]].extend(v["slices"])
        return {k: sorted(v) for k, v in by_name.items()} == {k: sorted(v) for k, v in before.items()}
    return {k: v["slices"] for k, v in now.items()} == {k: v["slices"] for k, v in before.items()}


# --- training --------------------------------------------------------------------------------

def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill never leaves a broken file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def costate_solver(name: str, checkpoints: int) -> Any:
    return {"autograd": bk.AutogradCostate, "sweep": bk.AdjointSweep,
            "checkpointed": lambda: bk.CheckpointedSweep(checkpoints)}[name]()


def hypergradient(cfg: TrainConfig) -> Any:
    if cfg.hypergrad == "unrolled":
        costate = None if cfg.hypergrad_costate == "autograd" else \
            costate_solver(cfg.hypergrad_costate, cfg.checkpoints)
        return bk.hypergrad.Unrolled(steps=cfg.inner_steps, lr=cfg.inner_lr, costate=costate)
    if cfg.hypergrad == "first-order":
        return bk.hypergrad.FirstOrder(steps=cfg.inner_steps - 1, lr=cfg.inner_lr)
    # Neumann, not CG: away from a minimum the network's inner Hessian is indefinite, where CG
    # stops (it measured pᵀHp < 0 in the first epochs of --quick) and the series does not
    return bk.hypergrad.Implicit(steps=cfg.inner_steps, lr=cfg.inner_lr, solver="neumann",
                                 iters=10, damping=1e-3)


def upper_label(cfg: TrainConfig) -> str:
    """How logs name the Ω steps' objective (the log one is negative)."""
    return "upper log loss" if cfg.upper_loss == "log" else "upper loss"


class Recorder:
    """Epoch callback of rank 0: CSV logs, weights.csv, TensorBoard, checkpoints, progress."""

    def __init__(self, out: Path, cfg: TrainConfig, meta: dict, bar: Any, val_loss: Any,
                 start: float):
        """``start``: ``time.perf_counter()`` at the run's start (earlier runs' time subtracted
        when resuming), so ``seconds`` in the logs counts the whole run."""
        self.out, self.cfg, self.meta, self.bar, self.val_loss = out, cfg, meta, bar, val_loss
        self.best = meta.get("best", float("inf"))
        self.start = start
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.tb = None

    def __call__(self, trainer: bk.trainers.BilevelTrainer, logs: dict) -> None:
        epoch = logs["epoch"] + 1
        val = self.val_loss(trainer)
        logs["val_loss_full"] = val
        mean_train = sum(logs["train_loss"]) / max(len(logs["train_loss"]), 1)
        mean_val = sum(val) / len(val)
        new_file = not (self.out / "train_log.csv").exists()
        with open(self.out / "train_log.csv", "a", newline="") as fh:
            w = csv.writer(fh)
            if new_file:
                w.writerow(["epoch", "seconds", "train_loss", "val_loss",
                            *[f"val_{t}" for t in trainer.task_names]])
            w.writerow([epoch, f"{time.perf_counter() - self.start:.2f}", f"{mean_train:.6g}",
                        f"{mean_val:.6g}", *[f"{v:.6g}" for v in val]])
        W = trainer.weights.reshape(len(trainer.group_names), -1).cpu()
        new_file = not (self.out / "weights.csv").exists()
        with open(self.out / "weights.csv", "a", newline="") as fh:
            w = csv.writer(fh)
            if new_file:
                w.writerow(["epoch", "group", *trainer.task_names])
            for g, row in zip(trainer.group_names, W.tolist()):
                w.writerow([epoch, g, *[f"{x:.6f}" for x in row]])
        if self.tb is not None:
            self.tb.add_scalar("loss/train", mean_train, epoch)
            self.tb.add_scalar("loss/val", mean_val, epoch)
        state = {**self.meta, "trainer": trainer.state_dict(), "torch_rng": torch.get_rng_state(),
                 "best": min(self.best, mean_val), "seconds": time.perf_counter() - self.start}
        save_atomic(state, self.out / "checkpoint.pt")
        if mean_val < self.best:
            self.best = mean_val
            save_atomic(state, self.out / "best.pt")
        upper = ""  # the upper steps' objective on their validation minibatches (meta mode)
        if logs.get("val_loss"):
            upper = f"  {upper_label(self.cfg)} {sum(logs['val_loss']) / len(logs['val_loss']):.4f}"
        log.info("epoch %d: train %.5f  val %.5f%s  W range [%.3f, %.3f]", epoch, mean_train,
                 mean_val, upper, float(W.min()), float(W.max()))
        if "hypergrad_residual" in logs:  # an implicit solve that did not converge shows here
            log.info("epoch %d: largest relative residual of the implicit hypergradients %.3g",
                     epoch, logs["hypergrad_residual"])
        self.bar.set_postfix(train=f"{mean_train:.4f}", val=f"{mean_val:.4f}")
        self.bar.update(1)


def _keep_epochs(path: Path, epochs: int) -> None:
    """Drop the rows of a per-epoch CSV log (first column: epoch from 1) after ``epochs``."""
    if path.is_file():  # newline="": the csv writer's \r\n line ends stay as they are
        with open(path, newline="") as fh:
            header, *rows = fh.read().splitlines(keepends=True)
        with open(path, "w", newline="") as fh:
            fh.write(header + "".join(r for r in rows if int(r.split(",", 1)[0]) <= epochs))


def setup_logging(out: Path, rank: int) -> None:
    _close_log()
    log.setLevel(logging.INFO)
    log.propagate = False
    if rank == 0:
        handler = logging.FileHandler(out / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)


def run(cfg: TrainConfig, resume: bool = False, given: Sequence[str] = ()) -> dict | None:
    """Train, evaluate and write the outputs; ``given`` names options set on the command line
    (with ``resume`` only those override the checkpoint's configuration)."""
    from tqdm.auto import tqdm

    from applications.mri import figures

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        nccl = torch.cuda.is_available() and cfg.device != "cpu"
        if nccl:  # one GPU per process: NCCL's collectives run on the current device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if nccl else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    device = pick_device(cfg.device)
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if cfg.batch_size % world:
        raise UsageError(f"batch_size {cfg.batch_size} must be divisible by the {world} processes")
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; expected a folder for the run's outputs")
    state = None
    if resume:
        if not (out / "checkpoint.pt").is_file():
            unfinished = (out / "config.toml").is_file()
            raise UsageError(f"--resume: {out} has no checkpoint.pt to continue from"
                             + ("; the run there stopped before its first epoch ended, start it "
                                "again without --resume" if unfinished else ""))
        state = load_checkpoint(out / "checkpoint.pt", "cpu")
        lacking = [k for k in ("torch_rng", "trained_on") if k not in state]
        try:
            saved = TrainConfig(**{**BEFORE_OPTION, **state["config"]})
        except TypeError as err:  # an option this version does not have
            lacking.append(f"config ({err})")
        if lacking:
            raise UsageError(f"--resume: {out / 'checkpoint.pt'} is not a complete checkpoint of "
                             f"this version of applications.mri.train: {', '.join(lacking)}")
        if "data" in given and bool(cfg.data) != bool(saved.data):
            raise UsageError("--resume: the run trained on " + (
                f"--data {saved.data}; give that folder (or a copy) as --data" if saved.data else
                "the synthetic catalogue; resume it without --data (--cache may name where the "
                "catalogue moved)"))
        changed = [k for k in given if k in FIXED_ON_RESUME and getattr(cfg, k) != getattr(saved, k)]
        if changed:
            free = sorted(f.name for f in dataclasses.fields(TrainConfig) if f.name not in FIXED_ON_RESUME)
            raise UsageError(
                "--resume continues the run with its own data, split and network; it cannot change "
                + ", ".join(f"{k} (the run has {getattr(saved, k)!r}, given {getattr(cfg, k)!r})"
                            for k in changed)
                + f". Options it can change: {', '.join(free)}")
        cfg = dataclasses.replace(saved, **{k: getattr(cfg, k) for k in given if hasattr(cfg, k)})
        validate(cfg)
        done = state["trainer"].get("epoch", 0)
        if cfg.epochs < done:
            raise UsageError(f"--resume: --epochs {cfg.epochs} is below the {done} epochs the run "
                             f"has trained; give --epochs {done} or more")
    elif (out / "checkpoint.pt").exists():  # every process checks: none goes on alone
        raise UsageError(f"--out {out} holds another run; pass --resume to continue it or choose "
                         "another --out")
    if cfg.data:  # config.toml must work from any directory
        cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).expanduser().resolve()))
    changes = [] if state is None else [
        f"{f.name} {getattr(saved, f.name)!r} -> {getattr(cfg, f.name)!r}"
        for f in dataclasses.fields(TrainConfig) if getattr(saved, f.name) != getattr(cfg, f.name)]
    t0 = time.perf_counter()
    resumed_seconds = state.get("seconds", 0.0) if state else 0.0

    # read and check the data before writing anything: a bad --data leaves --out untouched
    root = data_root(cfg, rank)
    dataset = SliceDataset(root, transform=CenterCrop(cfg.crop) if cfg.crop else None)
    plan = split(dataset, cfg)
    used = {t: [dataset.examples[i] for part in plan["parts"][t].values() for i in part]
            for t in plan["parts"]}
    # the mask options given ("", 0 and [] take each file's settings, no crop)
    mask_family, acceleration = cfg.mask or None, cfg.acceleration or None
    center_fraction, crop = cfg.center_fraction or None, cfg.crop or None
    for examples, one_size in (([ex for exs in used.values() for ex in exs], False),
                               ([ex for t in plan["seen"] for ex in used[t]], True)):
        check_examples(examples, mask=mask_family, acceleration=acceleration,
                       center_fraction=center_fraction, crop=crop, one_size=one_size)
    coils = used[plan["seen"][0]][0].shape[0]
    net_cfg = cfg.network(coils)
    budget = MemoryBudget(cfg.memory_gb * 2**30)  # of the slices and maps kept, per process
    masking = dict(family=mask_family, acceleration=acceleration, center_fraction=center_fraction,
                   sense=net_cfg.needs_maps)
    # validation and test slices are transformed once (validation's are kept): no maps cache
    transform = ReconTransform(seed=cfg.seed, **masking)
    maps: dict = {}  # ESPIRiT maps, shared by the mask draws of a kept slice (see ReconTransform)
    variants = [ReconTransform(seed=cfg.seed + 1000 * (v + 1), maps_cache=maps, budget=budget,
                               **masking) for v in range(cfg.mask_variants)]
    groups = [CachedSubset(dataset, plan["parts"][t]["train"], variants, budget) for t in plan["seen"]]
    if cfg.val_tasks == "anatomy":
        val_names = sorted({family(t) for t in plan["seen"]})
        val_index = {v: [i for t in plan["seen"] if family(t) == v for i in plan["parts"][t]["val"]]
                     for v in val_names}
    else:
        val_names = list(plan["seen"])
        val_index = {t: plan["parts"][t]["val"] for t in plan["seen"]}
    val_sets = [CachedSubset(dataset, val_index[v], transform, budget) for v in val_names]

    torch.manual_seed(cfg.seed)
    model = UnrolledRecon(net_cfg).to(device)
    recon = ReconLoss()
    keys = ("kspace", "mask", "sens")
    loss = bk.trainers.TerminalLoss(
        context=lambda b: {k: b[k] for k in keys if k in b}, terminal=recon.terminal,
        initial=recon.initial if cfg.initial == "kspace_cnn" else None)

    def mean_log(model: UnrolledRecon, batch: dict) -> torch.Tensor:  # --upper-loss log
        states = model.rollout(loss.context(batch))
        return recon.mean_log(states[-1], batch, states[0] if loss.initial else None)

    shared = ("initial_net",) if cfg.share_initial and cfg.initial == "kspace_cnn" else ()
    trainer = bk.trainers.BilevelTrainer(
        model, loss, groups, val_sets, group_names=plan["seen"], task_names=val_names,
        mode=cfg.mode, normalizer=cfg.normalizer, hypergrad=hypergradient(cfg),
        inner_lr=cfg.inner_lr, lower_steps=cfg.lower_steps, upper_steps=cfg.upper_steps,
        lr=cfg.lr, meta_lr=cfg.meta_lr, batch_size=cfg.batch_size, val_batch_size=cfg.batch_size,
        groups_per_step=cfg.groups_per_step or None,
        shared=shared, costate=costate_solver(cfg.costate, cfg.checkpoints), seed=cfg.seed,
        lr_schedule=bk.trainers.cosine(cfg.epochs) if cfg.lr_schedule == "cosine" else None,
        upper_loss=mean_log if cfg.upper_loss == "log" else None,
        collate=lambda items: {k: v.to(device) for k, v in default_collate(items).items()})
    trained_on = trained_slices(dataset, plan)
    if state is not None:
        if not _same_slices(trained_on, state["trained_on"]):
            raise UsageError(f"--resume: --data {root} does not hold the volumes the run trained and "
                             "validated on" + (" in the same split" if set(trained_on) == set(
                                 state["trained_on"]) else " (their fingerprints differ)")
                             + "; point --data at the run's data (a copy of it is fine)")
        try:
            trainer.load_state_dict(state["trainer"])
        except (KeyError, ValueError, RuntimeError) as err:
            raise UsageError(f"--resume: {out / 'checkpoint.pt'} does not fit this run's data "
                             f"(training tasks {plan['seen']}, validation tasks {val_names}; the "
                             f"checkpoint's: {state.get('task_names')}): "
                             + str(err).split("\n")[0]) from None
        torch.set_rng_state(state["torch_rng"])
        # the checkpoint's optimizer states carry the old rates (for the lower level, the
        # schedule's rate of the last epoch): the run's rates, given or kept, replace them
        for optimizer, name in ((trainer.optimizer, "lr"), (trainer.meta_optimizer, "meta_lr")):
            for group in optimizer.param_groups:
                group["lr"] = getattr(cfg, name)
    def start_writing() -> None:  # everything checked: from here on the run writes to --out
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"--out {out}: cannot make the folder ({err.strerror or err})") from None
        write_toml(out / "config.toml", cfg)
        if state is not None:  # a kill after an epoch's log rows but before its checkpoint left extra rows
            for name in ("train_log.csv", "weights.csv"):
                _keep_epochs(out / name, trainer.epoch)

    on_rank_0(start_writing, rank)
    setup_logging(out, rank)
    if state is not None:  # config.toml now holds the new options: the log keeps what changed
        log.info("resumed after epoch %d; %s", trainer.epoch,
                 "options changed: " + ", ".join(changes) if changes else "no option changed")

    @torch.no_grad()
    def val_loss(tr: bk.trainers.BilevelTrainer) -> list[float]:
        values = []
        for j, m in enumerate(tr.models):
            batch = tr.sampler.collate([tr.val_tasks[j][i] for i in range(len(tr.val_tasks[j]))])
            values.append(float(loss(m, batch)))
        return values

    meta = {"config": dataclasses.asdict(cfg), "network": dataclasses.asdict(net_cfg),
            "trained_on": trained_on,
            "task_names": val_names, "group_names": plan["seen"], "seen_tasks": plan["seen"],
            "unseen_tasks": plan["unseen"], "best": state.get("best", float("inf")) if state else float("inf")}
    log.info("data %s: seen %s, unseen %s; W is %d groups x %d validation tasks", root,
             plan["seen"], plan["unseen"], len(groups), len(val_sets))
    bar = tqdm(total=cfg.epochs, initial=trainer.epoch, desc=f"{cfg.mode} training", unit="epoch",
               disable=rank != 0)
    steps = tqdm(total=cfg.lower_steps + (cfg.upper_steps if cfg.mode == "meta" else 0),
                 desc="steps", unit="step", leave=False, disable=rank != 0)

    def step_done(tr: bk.trainers.BilevelTrainer, kind: str, losses: list[float]) -> None:
        if steps.n >= steps.total:
            steps.reset()
        what = upper_label(cfg) if kind == "upper" else "lower loss"
        steps.set_postfix({what: f"{sum(losses) / len(losses):.4f}"})
        steps.update(1)

    trainer.step_callbacks.append(step_done)
    if rank == 0:
        trainer.callbacks.append(Recorder(out, cfg, meta, bar, val_loss, t0 - resumed_seconds))
    try:
        trainer.fit(cfg.epochs)
    finally:  # an error message starts on a line of its own
        steps.close()
        bar.close()
    # a resume that trains no further epoch keeps the checkpoint's time: its setup trained nothing
    trained_now = trainer.epoch > (state["trainer"].get("epoch", 0) if state else 0)
    train_seconds = resumed_seconds + (time.perf_counter() - t0 if trained_now else 0.0)
    if rank != 0:
        return None

    models = {name: m.eval() for name, m in zip(val_names, trainer.models)}
    test_index = [i for t in plan["parts"] for i in plan["parts"][t]["test"]]
    files = group_files(dataset, test_index, transform)
    # a seen task's model is its anatomy's (or its own): the nearest validation task
    results, rows = evaluate_tasks(models, files, plan["seen"], device,
                                   progress=lambda it: tqdm(it, desc="evaluating", unit="task"))
    results.update({"mode": cfg.mode, "train_seconds": train_seconds,
                    "total_seconds": time.perf_counter() - t0 + resumed_seconds, "epochs": trainer.epoch,
                    "weights": {"groups": plan["seen"], "tasks": val_names,
                                "W": trainer.weights.reshape(len(groups), -1).cpu().tolist()}})
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    figures.reconstructions(out / "reconstructions.png", rows)
    figures.weight_heatmap(out / "weights.png", trainer.weights.cpu(), plan["seen"], val_names)
    # the curves show what train_log.csv holds: epochs from 1, the full validation loss of each
    # task model (the trainer's own val_loss is the upper steps' minibatch loss, none in joint mode)
    curves = [{"epoch": h["epoch"] + 1, "train_loss": h["train_loss"],
               "val_loss": h.get("val_loss_full", [])} for h in trainer.history]
    figures.training_curves(out / "curves.png", curves, task_names=val_names)
    summary = table(results)
    log.info("\n%s", summary)
    print(summary)
    print(f"\n{cfg.mode} run: trained in {train_seconds:.0f}s, total {results['total_seconds']:.0f}s; "
          f"outputs in {out}/")
    return results


def _close_log() -> None:
    """Detach the run's log file, so that a later run in this process never writes to it."""
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    _close_log()
    try:
        cfg, args = resolve(argv)
        run(cfg, getattr(args, "resume", False), given=args.given)
    except (UsageError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        if log.handlers:  # the run got as far as its log file
            log.error("error: %s", err)
        return 2
    except bk.trainers.NonFiniteError as err:
        checkpoint = Path(cfg.out).expanduser() / "checkpoint.pt"
        hint = ("checkpoint.pt holds the last completed epoch: --resume with a smaller --lr or "
                "--meta-lr continues from it" if checkpoint.is_file() else
                "no epoch was completed: start again with a smaller --lr or --meta-lr")
        print(f"error: training stopped: {err}. {hint}", file=sys.stderr)
        log.error("training stopped: %s", err)
        return 1
    finally:
        _close_log()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
