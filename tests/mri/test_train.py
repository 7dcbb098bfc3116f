"""The training and evaluation CLIs end to end (tiny --quick configurations)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from applications.mri import evaluate, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def quick(out, cache, *extra):
    return ["--quick", "--out", str(out), "--cache", cache, "--threads", "1", *extra]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("run")
    assert train.main(quick(out, cache)) == 0
    return out


def test_quick_run_writes_every_output(quick_run):
    for name in ("checkpoint.pt", "best.pt", "config.toml", "metrics.json", "weights.csv",
                 "train_log.csv", "train.log", "reconstructions.png", "weights.png", "curves.png"):
        assert (quick_run / name).stat().st_size > 0, name
    metrics = json.loads((quick_run / "metrics.json").read_text())
    assert metrics["seen"] and metrics["unseen"] == ["knee_pd_random8"]
    for task in metrics["seen"] + metrics["unseen"]:
        for method in ("model", "zero_filled", "cg_sense"):
            assert set(metrics["tasks"][task][method]) == {"psnr", "ssim", "nmse"}
    rows = (quick_run / "weights.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,group,")
    assert not list(quick_run.glob("*.tmp"))
    # the resolved configuration round-trips through --config
    cfg, _ = train.resolve(["--config", str(quick_run / "config.toml")])
    assert cfg.epochs == 3 and cfg.size == [64, 64]


def test_bad_input_exits_2_with_one_message(tmp_path, cache, quick_run, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--data", str(empty), "--out", str(tmp_path / "a")], "no .h5 files"),
        (quick(tmp_path / "b", cache, "--tasks", "brain_t9_magic"), "unknown task(s) brain_t9_magic"),
        (quick(quick_run, cache), "holds another run; pass --resume"),
    ]
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("epochs = 2\nlearning_rate = 0.1\n")
    cases.append((["--config", str(bad_config)], "unknown option 'learning_rate'"))
    for argv, message in cases:
        assert train.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_evaluate_cli_and_adaptation(quick_run, cache, tmp_path, capsys):
    data = next(Path(cache).iterdir())
    out = tmp_path / "eval"
    args = ["--checkpoint", str(quick_run / "best.pt"), "--data", str(data), "--out", str(out)]
    assert evaluate.main(args + ["--adapt", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "knee_pd_random8" in metrics["unseen"]
    assert metrics["tasks"]["knee_pd_random8"]["adapted_steps"] == 2
    assert metrics["tasks"]["knee_pd_random8"]["model_task"].startswith("knee")
    assert "model PSNR" in capsys.readouterr().out


def test_unsafe_checkpoint_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"config": {}, "trainer": {}, "payload": evaluate.UsageError("x")}, path)
    args = ["--checkpoint", str(path), "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    assert evaluate.main(args) == 2
    assert "weights_only=True" in capsys.readouterr().err


def final_weights(out):
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    return state["trainer"]["models"], state["trainer"]["omega"], state["trainer"]["epoch"]


def test_sigkill_and_resume_gives_the_uninterrupted_result(tmp_path, cache):
    argv = ["--epochs", "6", "--no-share-initial"]
    full = tmp_path / "full"
    assert train.main(quick(full, cache, *argv)) == 0
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "applications.mri.train", *quick(killed, cache, *argv)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, _, epoch = final_weights(killed)
    assert 1 <= epoch < 6, f"the kill came too late (epoch {epoch})"
    assert train.main(quick(killed, cache, "--resume")) == 0
    models_a, omega_a, epoch_a = final_weights(full)
    models_b, omega_b, epoch_b = final_weights(killed)
    assert epoch_a == epoch_b == 6
    assert torch.equal(omega_a, omega_b)
    for k in models_a:
        assert torch.equal(models_a[k], models_b[k]), k


@pytest.mark.parametrize("start", ["zero_filled", "cg_sense"])
def test_two_processes_match_one(tmp_path, cache, start):
    argv = ["--epochs", "2", "--batch-size", "2", "--val-tasks", "task", "--warm-start", start]
    one = tmp_path / "one"
    assert train.main(quick(one, cache, *argv)) == 0
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "applications.mri.train", *quick(two, cache, *argv)]
    subprocess.run(cmd, env=ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=600)
    models_a, omega_a, _ = final_weights(one)
    models_b, omega_b, _ = final_weights(two)
    # float32 all-reduce sums in another order; Adam's normalised steps (lr 3e-3) can turn that
    # rounding into small differences on near-zero gradients, far below one step. The CG-SENSE
    # start (CG iterations on a batch of 1 per process instead of 2) carries more rounding
    # into every gradient; there a few weights move by up to a tenth of a step. The
    # reconstructions agree to 0.01 dB in both cases.
    torch.testing.assert_close(omega_b, omega_a, rtol=1e-4, atol=1e-6)
    for k in models_a:
        torch.testing.assert_close(models_b[k], models_a[k], rtol=1e-3,
                                   atol=3e-4 if start == "cg_sense" else 1e-5)
    psnr = [{t: v["model"]["psnr"] for t, v in json.loads((out / "metrics.json").read_text())["tasks"].items()}
            for out in (one, two)]
    assert psnr[0].keys() == psnr[1].keys()
    for t in psnr[0]:
        assert abs(psnr[0][t] - psnr[1][t]) < 0.01, (t, psnr[0][t], psnr[1][t])


def test_hypergradient_costate_option_gives_the_same_weights(tmp_path, cache):
    """--hypergrad-costate sweep computes the unrolled hypergradient through the inner loop's
    costate sweep: the learned Ω matches the autograd route."""
    outs = {}
    for route in ("autograd", "sweep"):
        outs[route] = tmp_path / route
        assert train.main(quick(outs[route], cache, "--epochs", "1", "--hypergrad-costate", route,
                                "--inner-steps", "2")) == 0
    _, omega_a, _ = final_weights(outs["autograd"])
    _, omega_b, _ = final_weights(outs["sweep"])
    assert not torch.equal(omega_a, torch.zeros_like(omega_a))
    torch.testing.assert_close(omega_b, omega_a, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("options", [("--operator", "sense", "--initial", "none"),
                                     ("--warm-start", "zero_filled")])
def test_other_operator_and_warm_start(tmp_path, cache, options):
    """The SENSE network from CG-SENSE without F_0's CNN, and the map-free zero-filled start."""
    out = tmp_path / "run"
    assert train.main(quick(out, cache, "--epochs", "1", *options)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"]["brain_t1_random4"]["model"]["psnr"] > 15
    with pytest.raises(SystemExit) as exit_:  # argparse: one usage line, exit code 2
        train.main(quick(tmp_path / "bad", cache, "--warm-start", "espirit"))
    assert exit_.value.code == 2
