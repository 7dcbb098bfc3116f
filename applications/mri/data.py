"""fastMRI multicoil HDF5 files: writing, reading slice by slice, masking, and a generator CLI.

File layout (as fastMRI's multicoil train/val files): dataset ``kspace`` (slices, coils, H, W)
complex64, fully sampled; dataset ``reconstruction_rss`` (slices, h, w) float32, the RSS of
the fully sampled coil images (h, w may be a centre crop of H, W); dataset ``ismrmrd_header``,
ISMRMRD XML with the encoded and reconstructed matrix sizes and the phase-encode limits; file
attributes ``acquisition``, ``max``, ``norm``, ``patient_id``, and, in files written here,
``task``, ``mask_family``, ``acceleration``, ``center_fraction``.

``SliceDataset`` yields one sample per slice; ``MaskTransform`` turns it into network input:
masked k-space and target, both divided by ``scale`` = max of the zero-filled RSS image.

    python -m applications.mri.data generate --out DIR [--tasks ...] [--slices N]
        [--size H W] [--coils C] [--seed S] [--volumes V] [--snr DB]
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import warnings
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import h5py
import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from applications.mri import fft, masks, operators, phantoms

__all__ = ["DataError", "write_fastmri", "Example", "SliceDataset", "CenterCrop", "MaskTransform",
           "fingerprint", "fingerprints", "generate", "main"]

ISMRMRD_NS = "http://www.ismrm.org/ISMRMRD"


class DataError(ValueError):
    """A data file (or folder) is missing, unreadable or not in the expected layout."""


def _header(kspace_shape: Sequence[int], recon_shape: Sequence[int]) -> bytes:
    """ISMRMRD XML: encodedSpace = k-space (x = H readout, y = W phase encode), reconSpace =
    reference size, kspace_encoding_step_1 limits 0..W-1 with the centre at W // 2."""
    (H, W), (h, w) = kspace_shape[-2:], recon_shape[-2:]

    def size(x: int, y: int) -> str:
        return f"<matrixSize><x>{x}</x><y>{y}</y><z>1</z></matrixSize>"

    return (
        f'<?xml version="1.0" encoding="utf-8"?>\n<ismrmrdHeader xmlns="{ISMRMRD_NS}"><encoding>'
        f"<encodedSpace>{size(H, W)}</encodedSpace><reconSpace>{size(h, w)}</reconSpace>"
        f"<encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>{W - 1}</maximum>"
        f"<center>{W // 2}</center></kspace_encoding_step_1></encodingLimits>"
        f"</encoding></ismrmrdHeader>"
    ).encode()


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def write_fastmri(path: str | os.PathLike, kspace: Tensor | np.ndarray,
                  reference: Tensor | np.ndarray, attrs: dict) -> Path:
    """Write one volume in the fastMRI multicoil layout (see the module docstring).

    ``kspace`` (slices, coils, H, W) complex, ``reference`` (slices, h, w) real; ``attrs``
    become file attributes, ``max`` = max(reference) and ``norm`` = ‖reference‖₂ unless given.
    The file is written to a temporary name of this process and renamed, so a crash never
    leaves a partial file, and processes writing the same file at once (two runs filling one
    cache) do not collide.
    """
    path = Path(path)
    k, ref = _numpy(kspace), _numpy(reference)
    if not np.iscomplexobj(k) or k.ndim != 4:
        raise DataError(f"{path}: kspace must be complex (slices, coils, H, W), "
                        f"got {k.dtype} with shape {k.shape}")
    if np.iscomplexobj(ref) or ref.ndim != 3 or ref.shape[0] != k.shape[0]:
        raise DataError(f"{path}: reference must be real (slices, h, w) with {k.shape[0]} slices, "
                        f"got {ref.dtype} with shape {ref.shape}")
    for name, x in (("kspace", k), ("reference", ref)):
        if not np.isfinite(x).all():
            raise DataError(f"{path}: {name} contains NaN or Inf")
    attrs = {"max": float(ref.max()), "norm": float(np.linalg.norm(ref)), **attrs}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("kspace", data=k.astype(np.complex64))
            f.create_dataset("reconstruction_rss", data=ref.astype(np.float32))
            f.create_dataset("ismrmrd_header", data=_header(k.shape, ref.shape))
            for key, value in attrs.items():
                try:
                    f.attrs[key] = value
                except TypeError as e:
                    raise DataError(f"{path}: attribute {key!r} = {value!r} cannot be stored "
                                    f"in HDF5 (expected str, int, float or bool)") from e
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _plain(value):
    """An HDF5 attribute as a plain Python value (str, int, float, bool or list)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if isinstance(value, np.generic) else value


def _parse_header(raw, path: Path) -> dict:
    """Matrix sizes and phase-encode padding from an ISMRMRD header (fastMRI's convention)."""
    try:
        root = ET.fromstring(raw.decode() if isinstance(raw, bytes) else str(raw))

        def get(p: str) -> int:
            return int(root.find(f"m:encoding/{p}", {"m": ISMRMRD_NS}).text)

        enc, rec = ([get(f"m:{space}/m:matrixSize/m:{a}") for a in "xyz"]
                    for space in ("encodedSpace", "reconSpace"))
        center = get("m:encodingLimits/m:kspace_encoding_step_1/m:center")
        maximum = get("m:encodingLimits/m:kspace_encoding_step_1/m:maximum")
    except (ET.ParseError, AttributeError, ValueError, TypeError) as e:
        raise DataError(f"{path}: ismrmrd_header is not an ISMRMRD header with encodedSpace, "
                        f"reconSpace and encodingLimits/kspace_encoding_step_1 ({e})") from e
    left = enc[1] // 2 - center
    return {"encoding_size": enc, "recon_size": rec, "padding_left": left,
            "padding_right": left + maximum + 1}


def _inspect(path: Path) -> tuple[tuple[int, ...], tuple[int, ...] | None, dict]:
    """(k-space shape, reference shape or None, attributes) of a fastMRI file, from metadata
    only; DataError if bad."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file (truncated or not HDF5): {e}") from e
    with f:
        if not isinstance(f.get("kspace"), h5py.Dataset):
            raise DataError(f"{path}: no 'kspace' dataset (found {sorted(f)})")
        ks = f["kspace"]
        if ks.dtype.kind != "c":
            raise DataError(f"{path}: 'kspace' has dtype {ks.dtype}; expected complex "
                            f"(complex64) k-space")
        if ks.ndim != 4:
            raise DataError(f"{path}: 'kspace' has shape {ks.shape}; expected 4-D multicoil "
                            f"k-space (slices, coils, H, W)")
        for name in ("reconstruction_rss", "ismrmrd_header"):
            if name in f and not isinstance(f[name], h5py.Dataset):
                raise DataError(f"{path}: '{name}' is an HDF5 group; expected a dataset")
        if "reconstruction_rss" in f:
            rec = f["reconstruction_rss"]
            if rec.dtype.kind != "f" or rec.ndim != 3 or rec.shape[0] != ks.shape[0]:
                raise DataError(f"{path}: 'reconstruction_rss' has dtype {rec.dtype} and shape "
                                f"{rec.shape}; expected real (slices={ks.shape[0]}, h, w)")
        attrs = {key: _plain(value) for key, value in f.attrs.items()}
        if "ismrmrd_header" in f:
            attrs.update(_parse_header(f["ismrmrd_header"][()], path))
            left, right, width = attrs["padding_left"], attrs["padding_right"], ks.shape[-1]
            if not 0 <= left < right <= width:
                raise DataError(
                    f"{path}: ismrmrd_header's encodingLimits/kspace_encoding_step_1 (centre and "
                    f"maximum) and encodedSpace y put the measured phase encodes at columns "
                    f"[{left}, {right}); expected 0 <= first < end <= {width}, the k-space width")
        attrs["task"] = str(attrs.get("task") or attrs.get("acquisition") or "unknown")
        ref = tuple(f["reconstruction_rss"].shape[1:]) if "reconstruction_rss" in f else None
        return tuple(ks.shape), ref, attrs


class Example(NamedTuple):
    """One slice: file path, its name relative to the root, slice index, file attributes, the
    k-space shape of a slice (coils, H, W) and the stored reference's (h, w) (None: no
    reference)."""

    path: Path
    fname: str
    slice: int
    attrs: dict
    shape: tuple = ()
    ref_shape: tuple | None = None


class SliceDataset(torch.utils.data.Dataset):
    """One sample per slice of every ``.h5`` file under ``root`` (recursive, sorted).

    Files are validated at construction from metadata only (datasets, dtypes, shapes,
    attributes); data are read in ``__getitem__``, which opens the file for that access only,
    so the dataset is safe to fork into DataLoader workers. A sample is a dict: ``kspace``
    (coils, H, W) complex as stored, ``reference`` (h, w) float or None if the file has no
    ``reconstruction_rss``, ``attrs`` (file attributes + ``task``, which falls back to
    ``acquisition``, + header sizes), ``fname`` (path relative to ``root``), ``slice``.

    on_error: "fail" raises DataError on the first bad file; "skip" warns, listing the bad
    files, and uses the rest. ``tasks`` keeps only files whose ``task`` is listed.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable[[dict], dict] | None = None,
                 on_error: str = "fail", tasks: Iterable[str] | None = None) -> None:
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
        self.root, self.transform = Path(root), transform
        if not self.root.exists():
            raise DataError(f"{self.root}: data root does not exist")
        files = [self.root] if self.root.is_file() else sorted(self.root.rglob("*.h5"))
        if not files:
            raise DataError(f"{self.root}: no .h5 files found (searched recursively)")
        wanted = None if tasks is None else set(tasks)
        self.examples: list[Example] = []
        bad = []
        for path in files:
            try:
                shape, ref_shape, attrs = _inspect(path)
            except DataError as e:
                if on_error == "fail":
                    raise
                bad.append(str(e))
                continue
            if wanted is None or attrs["task"] in wanted:
                name = path.name if path == self.root else path.relative_to(self.root).as_posix()
                self.examples += [Example(path, name, s, attrs, shape[1:], ref_shape)
                                  for s in range(shape[0])]
        if bad:
            warnings.warn(f"SliceDataset skipped {len(bad)} bad file(s):\n  " + "\n  ".join(bad),
                          stacklevel=2)
        if not self.examples:
            what = "valid files" if wanted is None else f"files with task in {sorted(wanted)}"
            raise DataError(f"{self.root}: no slices from {what}")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        path, fname, s, attrs = self.examples[index][:4]
        try:
            with h5py.File(path, "r") as f:
                kspace = f["kspace"][s]
                reference = f["reconstruction_rss"][s] if "reconstruction_rss" in f else None
        except (OSError, KeyError) as e:
            raise DataError(f"{path}: cannot read slice {s}: {e}") from e
        for name, x in (("kspace", kspace), ("reconstruction_rss", reference)):
            if x is not None and not np.isfinite(x).all():
                raise DataError(f"{path}: slice {s} of '{name}' contains NaN or Inf")
        sample = {
            "kspace": torch.from_numpy(kspace),
            "reference": None if reference is None else torch.from_numpy(reference),
            "attrs": dict(attrs),
            "fname": fname,
            "slice": s,
        }
        return sample if self.transform is None else self.transform(sample)


def fingerprint(path: str | os.PathLike) -> str:
    """A short hash of a volume's shape and of the central 8 k-space rows of its first slice and
    coil (a few kB, read without the rest of the file): the same volume under any name or folder
    gets the same fingerprint, another volume (e.g. generated with another seed, so other
    noise) another one."""
    try:
        with h5py.File(path, "r") as f:
            ks = f["kspace"]
            top = max(0, ks.shape[2] // 2 - 4)
            rows = np.ascontiguousarray(ks[0, 0, top:top + 8])
            shape = ks.shape
    except (OSError, KeyError) as e:
        raise DataError(f"{path}: cannot read its k-space: {e}") from e
    return hashlib.sha1(repr(shape).encode() + rows.tobytes()).hexdigest()[:16]


def fingerprints(examples: Iterable[Example]) -> dict[Path, str]:
    """:func:`fingerprint` of each file the examples come from, read once per file."""
    out: dict[Path, str] = {}
    for ex in examples:
        if ex.path not in out:
            out[ex.path] = fingerprint(ex.path)
    return out


def _derived_seed(*parts: int | str) -> int:
    """A 32-bit seed determined by ``parts`` (strings hashed with CRC-32, stable across runs)."""
    keys = [zlib.crc32(p.encode()) if isinstance(p, str) else p for p in parts]
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


def _center_crop(x: Tensor, size: Sequence[int], fname: str, what: str) -> Tensor:
    try:
        return operators.center_crop(x, size)
    except ValueError:
        raise DataError(f"{fname}: crop {tuple(size)} is larger than the {what} "
                        f"{tuple(x.shape[-2:])}") from None


class CenterCrop:
    """SliceDataset sample → the same sample with its coil images and reference centre-cropped
    to ``size`` = (h, w) (k-space: the FFT of the cropped coil images, fastMRI's way to train
    on one size). A crop to w of W columns resamples k-space: column j of the result lies at
    column (j − w//2)·W/w + W//2 of the file's (the centre column of either is fft2c's origin),
    so the header's limits of the measured columns (``padding_left``, ``padding_right``) are
    mapped back the same way; the mask rounds them inward."""

    def __init__(self, size: Sequence[int]) -> None:
        self.size = tuple(size)

    def __call__(self, sample: dict) -> dict:
        fname, kspace, reference = sample["fname"], sample["kspace"], sample["reference"]
        width = kspace.shape[-1]
        out = {**sample, "kspace": fft.fft2c(_center_crop(fft.ifft2c(kspace), self.size, fname,
                                                          "coil images"))}
        if reference is not None:
            out["reference"] = _center_crop(reference, self.size, fname, "reference")
        attrs, w = sample["attrs"], self.size[1]
        if "padding_left" in attrs:  # about the centre columns W // 2 and w // 2 (fft2c's origin)
            out["attrs"] = {**attrs, **{k: (attrs[k] - width // 2) * w / width + w // 2
                                        for k in ("padding_left", "padding_right")}}
        return out


class MaskTransform:
    """SliceDataset sample → network input: undersampled, normalised k-space and target.

    y = (M ⊙ k + 0.0) / scale, target = reference / scale with scale = max_pixels RSS(F⁻¹(M ⊙ k)),
    the maximum of the zero-filled RSS image (computable from the measurements alone). Mask
    settings come from the arguments, else from the file attributes ``mask_family``,
    ``acceleration``, ``center_fraction`` (default 0.08). ``seed`` int: the mask seed is a
    fixed function of (seed, fname, slice), for validation and test; ``seed=None``: a new mask
    each call (torch's RNG, distinct per DataLoader worker), for training. Phase encodes outside
    the header's encoding limits are never sampled (fastMRI). ``crop=(h, w)``: the sample goes
    through :class:`CenterCrop` first (coil images and target cropped). Without a stored
    reference the target is the RSS of the fully sampled coil images.

    Output: ``kspace`` (C, H, W), ``mask`` (1, H, W), ``target`` (h, w), ``scale`` (0-d),
    ``task``, ``fname``, ``slice``.
    """

    def __init__(self, family: str | None = None, acceleration: float | None = None,
                 center_fraction: float | None = None, seed: int | None = 0,
                 crop: Sequence[int] | None = None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}")
        self.family, self.acceleration = family, acceleration
        self.center_fraction, self.seed = center_fraction, seed
        self.crop = None if crop is None else tuple(crop)

    def __call__(self, sample: dict) -> dict:
        fname, s, attrs = sample["fname"], sample["slice"], sample["attrs"]
        settings = {}
        for key, given, attr, cli in (("family", self.family, "mask_family", "mask"),
                                      ("acceleration", self.acceleration, "acceleration",
                                       "acceleration")):
            settings[key] = given if given is not None else attrs.get(attr)
            if settings[key] is None:
                raise DataError(f"{fname}: no '{attr}' attribute in the file (real fastMRI files "
                                f"have none) to take the mask's {key} from; give it: --{cli} on "
                                f"the command line, {key}= of MaskTransform in Python")
        cf = self.center_fraction
        cf = attrs.get("center_fraction", 0.08) if cf is None else cf
        if self.crop is not None:
            sample = CenterCrop(self.crop)(sample)
        kspace, reference = sample["kspace"], sample["reference"]
        if reference is None:
            reference = operators.rss(fft.ifft2c(kspace), dim=-3)
        if self.seed is None:
            seed = int(torch.randint(2**31 - 1, ()))
        else:
            seed = _derived_seed(self.seed, fname, s)
        H, W = kspace.shape[-2:]
        try:
            mask = masks.make(settings["family"], (H, W), settings["acceleration"], cf, seed)
        except ValueError as e:
            raise DataError(f"{fname}: cannot make the mask: {e}") from e
        try:
            mask = mask.to(kspace.device, kspace.real.dtype).expand(1, H, W).clone()
        except RuntimeError as e:
            raise DataError(f"{fname}: mask of shape {tuple(mask.shape)} does not fit k-space "
                            f"(H, W) = ({H}, {W})") from e
        attrs = sample["attrs"]
        if "padding_left" in attrs:  # never sample what was not measured (zero padding)
            first, end = math.ceil(attrs["padding_left"]), math.floor(attrs["padding_right"])
            mask[..., :first] = 0
            mask[..., end:] = 0
        if not bool(mask.any()):
            raise DataError(f"{fname}: slice {s}: the {settings['family']} mask samples no measured "
                            f"k-space point")
        masked = kspace * mask + 0.0
        scale = operators.rss(fft.ifft2c(masked), dim=-3).max()
        scale = scale.clamp_min(torch.finfo(scale.dtype).tiny)  # all-zero data stay zero
        return {"kspace": masked / scale, "mask": mask, "target": reference / scale, "scale": scale,
                "task": attrs["task"], "fname": fname, "slice": s}


def _cached(path: Path, attrs: dict, shape: tuple) -> bool:
    """Whether ``path`` already holds this volume (same task, seed, SNR and shape)."""
    try:
        with h5py.File(path, "r") as f:
            return f["kspace"].shape == shape and all(
                _plain(f.attrs.get(key)) == attrs.get(key) for key in ("task", "seed", "snr_db"))
    except (OSError, KeyError):
        return False


def generate(out: str | os.PathLike, tasks: Iterable[str] | None = None, slices: int = 4,
             size: tuple[int, int] = (128, 128), coils: int = 8, seed: int = 0, volumes: int = 3,
             snr_db: float | None = 30.0, progress: bool = True) -> list[Path]:
    """Write ``volumes`` synthetic volumes per task as ``{task}_{volume:03d}.h5`` under ``out``.

    Volume v of task t uses phantoms.make_task(t, seed = f(seed, t, v)); files already holding
    the same volume are kept (a cache). Deterministic: the same arguments give the same data.
    """
    tasks = list(phantoms.TASKS) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in phantoms.TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; "
                         f"valid tasks: {', '.join(phantoms.TASKS)}")
    out = Path(out)
    jobs = [(t, v) for t in tasks for v in range(volumes)]
    paths = []
    for task, v in tqdm(jobs, desc="generate", unit="volume", disable=not progress):
        path, vseed = out / f"{task}_{v:03d}.h5", _derived_seed(seed, task, v)
        settings = {"task": task, "seed": vseed, **({} if snr_db is None else {"snr_db": snr_db})}
        if not _cached(path, settings, (slices, coils, *size)):
            d = phantoms.make_task(task, slices, size, coils, vseed, snr_db)
            write_fastmri(path, d["kspace"], d["reference"], {**d["attrs"], **settings})
        paths.append(path)
    return paths


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return int(text)

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: ``generate`` writes the synthetic task catalogue as fastMRI files."""
    parser = argparse.ArgumentParser(prog="python -m applications.mri.data",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write synthetic fastMRI-layout volumes, one file per volume")
    gen.add_argument("--out", required=True, type=Path, help="output folder")
    gen.add_argument("--tasks", nargs="+", metavar="TASK",
                     help="task names (default: all of phantoms.TASKS)")
    gen.add_argument("--slices", type=_at_least(1), default=4, help="slices per volume (default 4)")
    gen.add_argument("--size", type=_at_least(8), nargs=2, default=(128, 128), metavar=("H", "W"),
                     help="image size (default 128 128)")
    gen.add_argument("--coils", type=_at_least(1), default=8, help="number of coils (default 8)")
    gen.add_argument("--seed", type=_at_least(0), default=0, help="random seed (default 0)")
    gen.add_argument("--volumes", type=_at_least(1), default=3, help="volumes per task (default 3)")
    gen.add_argument("--snr", type=float, default=30.0, metavar="DB",
                     help="k-space SNR in dB (default 30)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # many small tensors: threads only add contention
    unknown = [t for t in args.tasks or [] if t not in phantoms.TASKS]
    if unknown:
        gen.error(f"unknown task(s) {', '.join(unknown)}; valid tasks: {', '.join(phantoms.TASKS)}")
    if not math.isfinite(args.snr):
        gen.error(f"--snr must be a finite number of dB, got {args.snr}")
    if args.out.exists() and not args.out.is_dir():
        gen.error(f"--out {args.out} is a file; expected a folder")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        gen.error(f"--out {args.out}: cannot make the folder ({err.strerror or err})")
    paths = generate(args.out, args.tasks, args.slices, tuple(args.size), args.coils, args.seed,
                     args.volumes, args.snr)
    print(f"{len(paths)} files in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
