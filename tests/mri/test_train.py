"""The training and evaluation CLIs end to end (tiny --quick configurations)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from applications.mri import data, evaluate, phantoms, train
from applications.mri.losses import reconstruction
from applications.mri.network import NetworkConfig, UnrolledRecon

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
        (quick(tmp_path / "c", cache, "--meta-lr", "inf"), "meta_lr must be a finite number > 0"),
    ]
    for i, (text, message) in enumerate([
            ("epochs = 2\nlearning_rate = 0.1\n", "unknown option 'learning_rate'"),
            ("epochz = 2\n", "unknown option 'epochz' (did you mean 'epochs'?)"),
            ('epochs = "ten"\n', "option 'epochs' must be an integer, got 'ten'"),
            ('tasks = "brain_t1_random4"\n', "option 'tasks' must be a list of names"),
            ("lr = true\n", "option 'lr' must be a number, got True")]):
        bad_config = tmp_path / f"bad{i}.toml"
        bad_config.write_text(text)
        cases.append((["--config", str(bad_config)], f"--config {bad_config}: {message}"))
    for argv, message in cases:
        assert train.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    # a run refused for its data writes nothing, so the same --out works once the data is right
    assert not (tmp_path / "a").exists()
    # --resume where no epoch ever finished says so instead of "no such file"
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.toml").write_text("epochs = 3\n")
    assert train.main(quick(tmp_path / "unfinished", cache, "--resume")) == 2
    assert "stopped before its first epoch ended" in capsys.readouterr().err


def test_config_toml_names_an_absolute_data_folder(quick_run, cache, tmp_path, monkeypatch):
    monkeypatch.chdir(cache)
    data = next(p.name for p in Path(cache).iterdir() if p.is_dir())  # relative to the cwd
    out = tmp_path / "run"
    assert train.main(quick(out, cache, "--data", data, "--epochs", "1")) == 0
    monkeypatch.chdir(tmp_path)  # the file still names the same folder from anywhere else
    cfg, _ = train.resolve(["--config", str(out / "config.toml")])
    assert Path(cfg.data).is_absolute() and Path(cfg.data) == Path(cache, data).resolve()


def test_evaluate_cli_and_adaptation(quick_run, cache, tmp_path, capsys):
    data = next(Path(cache).iterdir())
    out = tmp_path / "eval"
    args = ["--checkpoint", str(quick_run / "best.pt"), "--data", str(data), "--out", str(out)]
    assert evaluate.main(args + ["--adapt", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "knee_pd_random8" in metrics["unseen"]
    assert metrics["tasks"]["knee_pd_random8"]["adapted_steps"] == 2
    assert metrics["tasks"]["knee_pd_random8"]["model_task"].startswith("knee")
    captured = capsys.readouterr()
    assert "model PSNR" in captured.out and f"outputs in {out}/" in captured.out
    assert "left out" in captured.err and "--include-training" in captured.err


def test_evaluate_scores_held_out_slices_only(quick_run, tmp_path):
    """Pointed at the training data, evaluate leaves out what the checkpoint was trained and
    validated on: with the training run's mask seed it reproduces the run's own test scores."""
    train_metrics = json.loads((quick_run / "metrics.json").read_text())
    data = train.resolve(["--config", str(quick_run / "config.toml")])[0]
    root = Path(data.cache).expanduser() / "64x64-c4-s2-v3-seed0"
    base = ["--checkpoint", str(quick_run / "checkpoint.pt"), "--data", str(root), "--seed", "0"]
    assert evaluate.main(base + ["--out", str(tmp_path / "held")]) == 0
    held = json.loads((tmp_path / "held" / "metrics.json").read_text())
    assert held["held_out_only"] and held["seen"] == train_metrics["seen"]
    for task in train_metrics["seen"] + train_metrics["unseen"]:  # the folder has other tasks too
        assert held["tasks"][task]["volumes"] == train_metrics["tasks"][task]["volumes"]
        assert held["tasks"][task]["model"] == pytest.approx(train_metrics["tasks"][task]["model"])
    assert evaluate.main(base + ["--out", str(tmp_path / "all"), "--include-training"]) == 0
    every = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert not every["held_out_only"]
    assert all(every["tasks"][t]["volumes"] == 3 for t in every["seen"])
    # the figure's titles carry each task's PSNR as the table and metrics.json give it
    state = evaluate.load_checkpoint(quick_run / "checkpoint.pt")
    models = evaluate.models_from_checkpoint(state, torch.device("cpu"))
    dataset = evaluate.SliceDataset(root)
    transform = evaluate.ReconTransform(seed=0, sense=evaluate.network_config(state).needs_maps)
    files = evaluate.group_files(dataset, range(len(dataset)), transform)
    files = {t: files[t] for t in ("knee_pd_random8",)}  # 3 volumes: mean ≠ first volume's
    results, rows = evaluate.evaluate_tasks(models, files, [], torch.device("cpu"))
    assert rows[0]["psnr"]["model"] == results["tasks"]["knee_pd_random8"]["model"]["psnr"]


def test_evaluate_bad_input_exits_2_with_one_message(quick_run, tmp_path, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    evil = tmp_path / "evil.pt"
    torch.save({"config": {}, "trainer": {}, "payload": evaluate.UsageError("x")}, evil)
    ckpt = str(quick_run / "best.pt")
    cases = [
        ([evil, tmp_path, tmp_path / "o"], "evaluate.UsageError), which we never do (weights_only=True)"),
        ([text, tmp_path, tmp_path / "o"], "not a PyTorch checkpoint"),
        ([quick_run, tmp_path, tmp_path / "o"], "is a folder; pass the checkpoint file in it"),
        ([ckpt, tmp_path, quick_run], "holds a training run"),
        ([ckpt, tmp_path / "missing", tmp_path / "o"], "no such folder"),
    ]
    for (checkpoint, data, out), message in cases:
        assert evaluate.main(["--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert (quick_run / "metrics.json").stat().st_size > 0  # the training run's own results stay


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
    # the log's clock counts the whole run: it goes on from the checkpoint instead of restarting
    rows = (killed / "train_log.csv").read_text().splitlines()[1:]
    seconds = [float(r.split(",")[1]) for r in rows]
    assert len(seconds) == 6 and seconds == sorted(seconds), seconds
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 7))


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
    # Ω takes Adam steps of --meta-lr (0.1) from hypergradients computed at these slightly
    # different weights; Adam's normalisation enlarges the relative rounding of a small
    # hypergradient entry (3.5e-4 = 0.35% of a step measured on one machine, 1e-6 on another).
    # A hypergradient missing from the reduction would leave a column a whole step behind.
    torch.testing.assert_close(omega_b, omega_a, rtol=0, atol=2e-2 * 0.1)
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


def test_resume_drops_log_rows_of_an_epoch_without_checkpoint(tmp_path):
    log = tmp_path / "train_log.csv"
    log.write_text("epoch,seconds\n1,1.0\n2,2.0\n3,3.5\n")
    train._keep_epochs(log, 2)
    assert log.read_text() == "epoch,seconds\n1,1.0\n2,2.0\n"
    train._keep_epochs(tmp_path / "absent.csv", 2)  # nothing to do


def test_implicit_hypergradient_trains(tmp_path, cache):
    """--hypergrad implicit on the non-convex network (CG stopped on negative curvature here)."""
    out = tmp_path / "implicit"
    assert train.main(quick(out, cache, "--epochs", "2", "--hypergrad", "implicit",
                            "--inner-steps", "3")) == 0
    _, omega, epoch = final_weights(out)
    assert epoch == 2 and not torch.equal(omega, torch.zeros_like(omega))


def test_non_finite_training_stops_with_one_message_and_resume_takes_a_new_lr(tmp_path, cache, capsys):
    assert train.main(quick(tmp_path / "diverged", cache, "--lr", "1e30")) == 1
    err = capsys.readouterr().err
    assert "error: training stopped: epoch 0" in err and "no epoch was completed" in err, err
    assert "Traceback" not in err
    out = tmp_path / "slower"
    assert train.main(quick(out, cache, "--epochs", "1")) == 0
    assert train.main(quick(out, cache, "--resume", "--epochs", "2", "--lr", "1e-4", "--meta-lr", "0.05")) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert [g["lr"] for g in state["trainer"]["optimizer"]["param_groups"]] == [1e-4]
    assert [g["lr"] for g in state["trainer"]["meta_optimizer"]["param_groups"]] == [0.05]
    assert state["config"]["lr"] == 1e-4 and state["trainer"]["epoch"] == 2

# --- pieces of the CLIs, without training -------------------------------------------------

def test_recon_transform_coil_target_is_normalised_like_the_target(tmp_path):
    d = phantoms.make_task("brain_t1_random4", seed=0, slices=1, size=(32, 32), coils=3)
    data.write_fastmri(tmp_path / "v.h5", d["kspace"], d["reference"], d["attrs"])
    item = evaluate.ReconTransform(seed=0)(data.SliceDataset(tmp_path)[0])
    torch.testing.assert_close(reconstruction(item["coil_target"][None])[0], item["target"],
                               rtol=1e-5, atol=1e-6)


def test_save_atomic_keeps_the_old_checkpoint_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    train.save_atomic({"epoch": 1}, path)

    def interrupted(obj, f):
        Path(f).write_bytes(b"PK partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.save_atomic({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def test_volume_psnr_uses_the_volume_maximum():
    """fastMRI: PSNR of the whole volume with data range = the volume's maximum."""
    from skimage.metrics import peak_signal_noise_ratio

    rng = np.random.default_rng(0)
    gt = rng.uniform(0, 1, (2, 16, 16)) * np.array([1.0, 3.0])[:, None, None]
    pred = np.abs(gt + 0.1 * rng.standard_normal(gt.shape))
    out = evaluate.volume_metrics(torch.from_numpy(gt), {"model": torch.from_numpy(pred)})
    assert out["model"]["psnr"] == pytest.approx(
        peak_signal_noise_ratio(gt, pred, data_range=gt.max()), abs=1e-6)


def test_metrics_layout_and_adaptation_scores_the_other_volumes(tmp_path):
    data.generate(tmp_path, tasks=["knee_pd_random8"], slices=1, size=(32, 32), coils=3,
                  volumes=3, progress=False)
    ds = data.SliceDataset(tmp_path)
    files = evaluate.group_files(ds, range(len(ds)), evaluate.ReconTransform(seed=0))
    torch.manual_seed(0)
    models = {"knee": UnrolledRecon(NetworkConfig(coils=3, phases=1, width=4, kspace_width=4))}
    res, _ = evaluate.evaluate_tasks(models, files, [], torch.device("cpu"), adapt_steps=1)
    assert set(res) == {"tasks", "seen", "unseen", "mean"}
    assert res["tasks"]["knee_pd_random8"]["volumes"] == 2  # the first one adapted the model
    for m in evaluate.METHODS:
        assert res["mean"]["unseen"][m] == pytest.approx(res["tasks"]["knee_pd_random8"][m])
