"""Draw docs/img/tasks.png: one reference slice and its sampling mask per task of TASKS.

    python docs/make_task_figure.py [--out docs/img/tasks.png] [--size 128]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout too
from applications.mri import masks, phantoms  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "img" / "tasks.png")
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    shape = (args.size, args.size)
    rows = {a: [t for t in phantoms.TASKS.values() if t.anatomy == a] for a in phantoms.ANATOMIES}
    cols = max(len(r) for r in rows.values())
    fig, axes = plt.subplots(len(rows), 2 * cols, figsize=(2 * cols * 1.6, len(rows) * 1.9),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for i, tasks in enumerate(rows.values()):
        for j, task in enumerate(tasks):
            ref = phantoms.make_task(task, slices=3, size=shape, coils=8, seed=0)["reference"][1]
            mask = masks.make(task.mask_family, shape, task.acceleration, task.center_fraction, seed=0)
            achieved = masks.acceleration(mask, shape)
            held = " (held out)" if task.held_out else ""
            axes[i, 2 * j].imshow(ref, cmap="gray")
            axes[i, 2 * j].set_title(f"{task.name}{held}", fontsize=7, loc="left")
            axes[i, 2 * j + 1].imshow(mask.expand(shape), cmap="gray", vmin=0, vmax=1)
            axes[i, 2 * j + 1].set_frame_on(True)  # a white centre band must not merge into the page
            axes[i, 2 * j + 1].set_title(f"mask, achieved {achieved:.1f}x", fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
