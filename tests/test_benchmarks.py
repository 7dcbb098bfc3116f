"""Pieces of the benchmark scripts that decide what they measure."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recon_refuses_to_reuse_a_run_of_other_options(tmp_path):
    """A run found in a variant's folder counts only if it has the variant's options: a meta
    run from before --upper-loss (no such key: the plain mean) is not today's meta."""
    recon = load("recon")
    folder = tmp_path / "seed0" / "meta"
    folder.mkdir(parents=True)
    assert recon.mismatches(folder, recon.VARIANTS["meta"]) == []  # nothing there yet
    (folder / "config.toml").write_text('mode = "meta"\nepochs = 25\n')
    assert recon.mismatches(folder, recon.VARIANTS["meta"]) == ["--upper-loss mean (the variant's: log)"]
    assert recon.mismatches(folder, recon.VARIANTS["meta-mean"]) == []
    with pytest.raises(SystemExit, match="holds a run of other options than the variant 'meta'"):
        recon.run("meta", [], tmp_path, str(tmp_path / "cache"), 25, 0)
    (folder / "config.toml").write_text('mode = "joint"\nupper_loss = "log"\n')
    assert recon.mismatches(folder, recon.VARIANTS["meta"]) == ["--mode joint (the variant's: meta)"]
