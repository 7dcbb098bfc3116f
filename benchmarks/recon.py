"""Reconstruction quality: meta-learned weights vs uniform weights on the same budget.

Runs ``python -m applications.mri.train`` in ``--mode meta`` and ``--mode joint`` (and, with
``--sense``, the SENSE network started from CG-SENSE; ``--only meta-zf`` is the network started
from the zero-filled k-space, no coil maps anywhere; ``--only meta-mean`` meta-learning on the
plain mean validation loss, ``--upper-loss mean``) on the synthetic catalogue with the same
options, then prints a table of mean PSNR/SSIM over the seen and the unseen tasks for the model,
zero-filled and CG-SENSE, per-task PSNR, and the training time; writes the table as JSON and as
Markdown (for docs/benchmarks.md). ``--seeds`` repeats every run for several data seeds (the CLI's
``--seed``: phantoms, noise, splits, masks, initialisation) and adds a table of the means per
seed, so that a difference between the modes can be told from the spread between seeds::

    python benchmarks/recon.py --epochs 50 --out benchmarks/results/recon
    python benchmarks/recon.py --epochs 40 --seeds 0 1 2

Each run lives in ``OUT/seed<S>/<variant>``; a finished run there is reused, an interrupted one
resumed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from applications.mri import train

VARIANTS = {  # a variant's options are checked against a run it finds in its folder
    "meta": ["--mode", "meta", "--upper-loss", "log"],
    "joint": ["--mode", "joint"],
    "meta-mean": ["--mode", "meta", "--upper-loss", "mean"],  # the default before the log objective
    "meta-sense": ["--mode", "meta", "--operator", "sense", "--initial", "none"],
    "joint-sense": ["--mode", "joint", "--operator", "sense", "--initial", "none"],
    "meta-zf": ["--mode", "meta", "--warm-start", "zero_filled"],
}


def mismatches(folder: Path, options: list[str]) -> list[str]:
    """The options of ``options`` (``--flag value`` pairs) that the run in ``folder`` (its
    ``config.toml``) was not trained with; runs from before ``--lr-schedule`` and
    ``--upper-loss`` trained at a constant rate on the plain mean."""
    path = folder / "config.toml"
    if not path.exists():
        return []
    saved = {**train.BEFORE_OPTION, **train.tomllib.loads(path.read_text())}
    wrong = []
    for flag, value in zip(options[::2], options[1::2]):
        key = flag.removeprefix("--").replace("-", "_")
        if str(saved.get(key)) != value:
            wrong.append(f"{flag} {saved.get(key)} (the variant's: {value})")
    return wrong


def run(name: str, extra: list[str], out: Path, cache: str, epochs: int, seed: int) -> dict:
    folder = out / f"seed{seed}" / name
    wrong = mismatches(folder, VARIANTS[name])
    if wrong:
        raise SystemExit(f"{folder} holds a run of other options than the variant {name!r}: "
                         f"{', '.join(wrong)}; remove it or pass --out elsewhere")
    if (folder / "metrics.json").exists():  # reuse a finished run, if it is the one asked for
        metrics = json.loads((folder / "metrics.json").read_text())
        if metrics.get("epochs") != epochs:
            raise SystemExit(f"{folder} holds a finished run of {metrics.get('epochs')} epochs, not "
                             f"{epochs}; remove it or pass --out elsewhere")
        return metrics
    argv = [*VARIANTS[name], "--epochs", str(epochs), "--seed", str(seed), "--out", str(folder),
            "--cache", cache, *extra]
    if (folder / "checkpoint.pt").exists():  # an interrupted run: continue it
        argv.append("--resume")
    if train.main(argv) != 0:
        raise SystemExit(f"training {name} failed")
    return json.loads((folder / "metrics.json").read_text())


def markdown(results: dict[str, dict], epochs: int, seed: int) -> str:
    lines = [f"Synthetic catalogue, data seed {seed}, {epochs} epochs each; mean over tasks "
             "(fastMRI PSNR in dB / SSIM).",
             "",
             "| run | seen: model | seen: zero-filled | seen: CG-SENSE | unseen: model | unseen: zero-filled | unseen: CG-SENSE | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        cells = []
        for group in ("seen", "unseen"):
            for m in ("model", "zero_filled", "cg_sense"):
                v = r["mean"][group][m]
                cells.append(f"{v['psnr']:.2f} / {v['ssim']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['train_seconds']:.0f} |")
    tasks = sorted({t for r in results.values() for t in r["tasks"]})
    lines += ["", "Per task, model PSNR (dB):", "",
              "| task | " + " | ".join(results) + " | CG-SENSE |",
              "|---|" + "---|" * (len(results) + 1)]
    for t in tasks:
        first = next(iter(results.values()))["tasks"][t]
        row = [f"{r['tasks'][t]['model']['psnr']:.2f}" for r in results.values()]
        kind = "" if first["seen"] else " (unseen)"
        lines.append(f"| {t}{kind} | " + " | ".join(row) + f" | {first['cg_sense']['psnr']:.2f} |")
    return "\n".join(lines)


def seeds_markdown(by_seed: dict[int, dict[str, dict]]) -> str:
    """Mean model PSNR over the seen and the unseen tasks, per seed and variant."""
    names = list(next(iter(by_seed.values())))
    lines = ["Mean model PSNR (dB) per data seed:", "",
             "| seed | " + " | ".join(f"{n} seen | {n} unseen" for n in names) + " |",
             "|---|" + "---|---|" * len(names)]
    for seed, results in by_seed.items():
        cells = [f"{results[n]['mean'][g]['model']['psnr']:.2f}" for n in names for g in ("seen", "unseen")]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=50, help="epochs of every run (default: twice the CLI's)")
    p.add_argument("--out", default="benchmarks/results/recon", help="folder of the runs and the tables")
    p.add_argument("--cache", default="~/.cache/bilevelkit/synthetic", help="synthetic data cache")
    p.add_argument("--sense", action="store_true", help="also run the SENSE network (CG-SENSE warm start)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="run just these variants")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="S",
                   help="data seeds (the CLI's --seed); every variant runs once per seed (default: 0)")
    args = p.parse_args(argv)
    if args.only and args.sense:
        p.error("--sense adds meta-sense and joint-sense to the default runs; with --only, name "
                "them in --only instead")
    out = Path(args.out).expanduser()
    names = args.only or ["meta", "joint"] + (["meta-sense", "joint-sense"] if args.sense else [])
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds: each seed once, got {args.seeds}")
    by_seed = {s: {n: run(n, ["--threads", str(args.threads)], out, args.cache, args.epochs, s)
                   for n in names} for s in args.seeds}
    tables = [markdown(results, args.epochs, s) for s, results in by_seed.items()]
    if len(by_seed) > 1:
        tables.append(seeds_markdown(by_seed))
    table = "\n\n".join(tables)
    print(table)
    (out / "recon.md").write_text(table + "\n")
    summary = {str(s): {n: {"epochs": r["epochs"], "mean": r["mean"], "train_seconds": r["train_seconds"],
                            "tasks": {t: v["model"] for t, v in r["tasks"].items()}}
                        for n, r in results.items()} for s, results in by_seed.items()}
    (out / "recon.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
