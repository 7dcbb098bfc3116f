"""The training and evaluation CLIs end to end (tiny --quick configurations)."""
import dataclasses
import json
import os
import shutil
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


# a tiny network and budget, for runs on generated data
TINY = ["--epochs", "1", "--lower-steps", "1", "--upper-steps", "1", "--phases", "1", "--width", "2",
        "--mask-variants", "1", "--cg-iters", "2", "--batch-size", "1", "--threads", "1"]


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
    # a file the checks let through by mistake would stop at once here, instead of training
    safe = ["--out", str(tmp_path / "o"), "--data", str(tmp_path / "missing"), "--threads", "1"]
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
            ("lr = true\n", "option 'lr' must be a number, got True"),
            ('share_initial = "false"\n', "option 'share_initial' must be true or false, got 'false'"),
            ("epochs = true\n", "option 'epochs' must be an integer, got True"),
            ("size = [64, true]\n", "option 'size' must be a list of integers"),
            ("epochs = = 3\n", "not valid TOML"),
            ("quick = true\nepochz = 3\n",  # every unknown key at once
             "unknown options 'quick', 'epochz' (did you mean 'epochs'?)"),
            ('upper_loss = "median"\n', "option upper_loss must be one of mean, log, got 'median'"),
            ("epochs = 0\n", "option epochs must be an integer >= 1, got 0")]):
        bad_config = tmp_path / f"bad{i}.toml"
        bad_config.write_text(text)
        cases.append(([*safe, "--config", str(bad_config)], f"--config {bad_config}: {message}"))
    cases.append(([*safe, "--config", str(tmp_path / "absent.toml")], "absent.toml: no such file"))
    for argv, message in cases:
        assert train.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    # a value the command line sets is its own, and an argparse error is one line, not the usage
    bad_config = tmp_path / "lr.toml"
    bad_config.write_text("lr = -2\n")
    assert train.main([*safe, "--config", str(bad_config), "--lr", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: lr must be a finite number > 0, got -1.0"
    with pytest.raises(SystemExit) as exit_:
        train.main(["--upper-loss", "median"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "python -m applications.mri.train: error: argument --upper-loss: invalid choice: 'median' "
        "(choose from 'mean', 'log') (--help lists every option)"]
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
    assert evaluate.main(args[:-1] + [str(tmp_path / "avg"), "--unseen-model", "average"]) == 0
    averaged = json.loads((tmp_path / "avg" / "metrics.json").read_text())
    assert averaged["tasks"]["knee_pd_random8"]["model_task"] == "average"
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
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "broken.h5").write_text("not HDF5")
    cases = [
        ([evil, tmp_path, tmp_path / "o"], "evaluate.UsageError), which we never do (weights_only=True)"),
        ([text, tmp_path, tmp_path / "o"], "not a PyTorch checkpoint"),
        ([quick_run, tmp_path, tmp_path / "o"], "is a folder; pass the checkpoint file in it"),
        ([ckpt, tmp_path, quick_run], "holds a training run"),
        ([ckpt, tmp_path / "missing", tmp_path / "o"], "no such file or folder"),
        ([ckpt, tmp_path / "d", tmp_path / "o"], "broken.h5: not a readable HDF5 file"),
        ([ckpt, tmp_path, tmp_path / "o", "--adapt", "-1"], "--adapt must be >= 0, got -1"),
    ]
    for (checkpoint, data, out, *extra), message in cases:
        assert evaluate.main(["--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out),
                              *extra]) == 2
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
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["total_seconds"] >= metrics["train_seconds"] >= seconds[-1]
    for name in ("train_log.csv", "weights.csv"):  # the logs keep the csv writer's line ends
        lines = len((full / name).read_bytes().splitlines())
        assert (killed / name).read_bytes().count(b"\r\n") == lines, name
    assert train.main(quick(killed, cache, "--resume", "--epochs", "5")) == 2  # below the 6 trained
    # a resume with nothing left to train keeps the run's training time, its setup not added
    state = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert train.main(quick(killed, cache, "--resume")) == 0
    again = json.loads((killed / "metrics.json").read_text())
    assert again["train_seconds"] == state["seconds"] and again["epochs"] == 6


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
    # the new rate, under the default cosine schedule over 2 epochs: (1 + cos(π/2)) / 2 in epoch 1
    assert [g["lr"] for g in state["trainer"]["optimizer"]["param_groups"]] == [1e-4 * 0.5]
    assert [g["lr"] for g in state["trainer"]["meta_optimizer"]["param_groups"]] == [0.05]
    assert state["config"]["lr"] == 1e-4 and state["trainer"]["epoch"] == 2
    log = (out / "train.log").read_text()  # config.toml holds the new options, the log the change
    assert "resumed after epoch 1; options changed: epochs 1 -> 2, lr 0.003 -> 0.0001, meta_lr 0.1 -> 0.05\n" in log
    assert train.main(quick(out, cache, "--resume", "--epochs", "3", "--lr-schedule", "constant")) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert [g["lr"] for g in state["trainer"]["optimizer"]["param_groups"]] == [1e-4]
    assert "resumed after epoch 2; options changed: epochs 2 -> 3, lr_schedule 'cosine' -> 'constant'\n" \
        in (out / "train.log").read_text()

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


def test_average_model_is_the_mean_of_the_weights():
    torch.manual_seed(0)
    cfg = NetworkConfig(coils=3, phases=2, width=4, kspace_width=4)
    models = [UnrolledRecon(cfg) for _ in range(3)]
    avg = evaluate.average_model(models)
    assert avg is not models[0]
    for name, value in avg.state_dict().items():
        values = [m.state_dict()[name] for m in models]
        expected = sum(values) / 3 if value.is_floating_point() else values[0]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    before = [p.clone() for p in models[0].parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, models[0].parameters()))  # untouched


def test_unseen_tasks_take_the_average_model_seen_tasks_their_own(tmp_path):
    """``unseen_model="average"``: an unseen task is scored (and adapted) with the average of
    the task models, exactly as that averaged model alone would score it; a seen task keeps its
    anatomy's model."""
    data.generate(tmp_path, tasks=["knee_pd_random8", "brain_t1_random4"], slices=1, size=(32, 32),
                  coils=3, volumes=2, progress=False)
    ds = data.SliceDataset(tmp_path)
    files = evaluate.group_files(ds, range(len(ds)), evaluate.ReconTransform(seed=0))
    torch.manual_seed(0)
    cfg = NetworkConfig(coils=3, phases=1, width=4, kspace_width=4)
    models = {"knee": UnrolledRecon(cfg), "brain": UnrolledRecon(cfg)}
    cpu = torch.device("cpu")
    for steps in (0, 1):
        res, _ = evaluate.evaluate_tasks(models, files, ["brain_t1_random4"], cpu, adapt_steps=steps,
                                         unseen_model="average")
        assert res["tasks"]["knee_pd_random8"]["model_task"] == "average"
        assert res["tasks"]["brain_t1_random4"]["model_task"] == "brain"
        alone = {"avg": evaluate.average_model(list(models.values()))}
        ref, _ = evaluate.evaluate_tasks(alone, {"knee_pd_random8": files["knee_pd_random8"]}, [],
                                         cpu, adapt_steps=steps)
        assert res["tasks"]["knee_pd_random8"]["model"] == pytest.approx(
            ref["tasks"]["knee_pd_random8"]["model"], rel=1e-6)
        nearest, _ = evaluate.evaluate_tasks(models, files, ["brain_t1_random4"], cpu,
                                             adapt_steps=steps)
        assert nearest["tasks"]["knee_pd_random8"]["model_task"] == "knee"
        assert nearest["tasks"]["brain_t1_random4"] == res["tasks"]["brain_t1_random4"]
    with pytest.raises(ValueError, match="unseen_model must be one of"):
        evaluate.evaluate_tasks(models, files, [], cpu, unseen_model="mean")


def test_precedence_defaults_quick_config_cli(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("epochs = 5\nwidth = 7\n")
    cfg, _ = train.resolve(["--quick", "--config", str(cfg_file), "--epochs", "9"])
    assert cfg.epochs == 9          # command line beats --config
    assert cfg.width == 7           # --config beats --quick (QUICK has width 6)
    assert cfg.coils == 4           # --quick beats the defaults
    assert cfg.depth == 2           # defaults where nothing else says


# --- resume ----------------------------------------------------------------------------------

class Stop(Exception):
    pass


def test_resume_uses_the_checkpoint_config_with_given_options_on_top(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    saved = train.TrainConfig(epochs=6, share_initial=False, lr=0.01, width=5, out=str(out),
                              data=str(tmp_path), lr_schedule="cosine")
    torch.save({"config": dataclasses.asdict(saved), "trainer": {}, "torch_rng": torch.get_rng_state(),
                "trained_on": {}}, out / "checkpoint.pt")
    seen = {}

    def stop(cfg, rank):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(train, "data_root", stop)  # stop before any data or training
    with pytest.raises(Stop):
        train.main(["--out", str(out), "--resume", "--lr", "0.5", "--threads", "1"])
    cfg = seen["cfg"]
    assert cfg.lr == 0.5                                   # given: overrides the checkpoint
    assert (cfg.epochs, cfg.share_initial, cfg.width) == (6, False, 5)  # not given: the checkpoint's
    more = tmp_path / "more.toml"  # options of a --config file are given options too
    more.write_text("epochs = 9\nwidth = 5\n")
    with pytest.raises(Stop):
        train.main(["--out", str(out), "--resume", "--config", str(more)])
    assert (seen["cfg"].epochs, seen["cfg"].lr) == (9, 0.01)
    assert seen["cfg"].lr_schedule == "cosine"  # the checkpoint's
    # a checkpoint from before --lr-schedule trained at a constant rate and goes on at one; from
    # before --upper-loss, on the plain mean
    old = dataclasses.asdict(saved)
    del old["lr_schedule"], old["upper_loss"]
    torch.save({"config": old, "trainer": {}, "torch_rng": torch.get_rng_state(), "trained_on": {}},
               out / "checkpoint.pt")
    with pytest.raises(Stop):
        train.main(["--out", str(out), "--resume"])
    assert (seen["cfg"].lr_schedule, seen["cfg"].upper_loss) == ("constant", "mean")
    with pytest.raises(Stop):
        train.main(["--out", str(out), "--resume", "--lr-schedule", "cosine"])
    assert seen["cfg"].lr_schedule == "cosine"


def test_resume_refuses_to_change_the_network_or_data(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    saved = train.TrainConfig(width=5, out=str(out))
    torch.save({"config": dataclasses.asdict(saved), "trainer": {}, "torch_rng": torch.get_rng_state(),
                "trained_on": {}}, out / "checkpoint.pt")
    (out / "config.toml").write_text("width = 5\n")
    assert train.main(["--out", str(out), "--resume", "--width", "8", "--phases", "4"]) == 2
    err = capsys.readouterr().err
    assert "cannot change width (the run has 5, given 8)" in err and "phases" not in err.split(".")[0]
    assert "Options it can change: " in err and "Traceback" not in err
    assert (out / "config.toml").read_text() == "width = 5\n"
    # a synthetic run resumed on a folder would split it otherwise (no held-out catalogue tasks)
    assert train.main(["--out", str(out), "--resume", "--data", str(tmp_path)]) == 2
    assert "the run trained on the synthetic catalogue; resume it without --data" in capsys.readouterr().err
    # task names are checked against the run's own data, not the catalogue, on --resume
    cfg, _ = train.resolve(["--out", str(out), "--resume", "--tasks", "CORPD_FBK"])
    assert cfg.tasks == ["CORPD_FBK"]


def test_resume_compares_old_records_by_file_name():
    now = {"f1": {"file": "x.h5", "slices": [0]}, "f2": {"file": "x.h5", "slices": [1]},
           "f3": {"file": "y.h5", "slices": [0, 2]}}
    assert train._same_slices(now, {"x.h5": [0, 1], "y.h5": [0, 2]})  # names merged, as then
    assert not train._same_slices(now, {"x.h5": [0], "y.h5": [0, 2]})
    assert train._same_slices(now, dict(now)) and not train._same_slices(now, {"f1": now["f1"]})


def test_a_failure_of_process_0_stops_every_process(tmp_path):
    """Under torchrun, an error that only process 0 meets (it alone makes the folders) stops
    the other process too, with one message, instead of leaving it waiting forever."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    for extra, message in ((["--cache", str(afile), "--out", str(tmp_path / "o")], "cannot make the folder"),
                           (["--cache", str(tmp_path / "c"), "--out", str(afile / "sub")],
                            "cannot make the folder")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "applications.mri.train", "--quick", "--threads", "1", *extra]
        if "--out" in extra and extra[-1].endswith("sub"):  # reach the folder after the data
            cmd += ["--epochs", "1"]
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode != 0
        assert message in done.stderr and "process 0 reported an error" in done.stderr, done.stderr[-2000:]


# --- split -----------------------------------------------------------------------------------

class FakeDataset:
    def __init__(self, volumes):  # {task: (volumes, slices)}
        self.examples = [data.Example(Path(f"{t}_{v}.h5"), f"{t}_{v}.h5", s, {"task": t})
                         for t, (n, slices) in sorted(volumes.items()) for v in range(n)
                         for s in range(slices)]

    def files(self, indices):
        return sorted({self.examples[i].fname for i in indices})


def test_split_plan_synthetic():
    ds = FakeDataset({"brain_t1_random4": (4, 2), "knee_pd_equispaced4": (3, 1),
                      "knee_t2_random6": (3, 1), "knee_pd_random8": (3, 1)})
    plan = train.split(ds, train.TrainConfig(unseen=["knee_t2_random6"]))
    # held out: the catalogue's held-out task and --unseen; never trained on
    assert plan["seen"] == ["brain_t1_random4", "knee_pd_equispaced4"]
    assert plan["unseen"] == ["knee_pd_random8", "knee_t2_random6"]
    for t in plan["unseen"]:
        assert set(plan["parts"][t]) == {"test"} and len(ds.files(plan["parts"][t]["test"])) == 3
    b = plan["parts"]["brain_t1_random4"]
    assert ds.files(b["train"]) == ["brain_t1_random4_0.h5", "brain_t1_random4_1.h5"]
    assert ds.files(b["val"]) == ["brain_t1_random4_2.h5"]
    assert ds.files(b["test"]) == ["brain_t1_random4_3.h5"]
    assert len(b["val"]) == len(b["test"]) == 2


def test_split_by_slices_when_a_task_has_two_volumes():
    ds = FakeDataset({"brain_t1_random4": (2, 2)})  # 4 slices: 3/5 train, then val, test
    plan = train.split(ds, train.TrainConfig(data="folder"))
    assert plan["parts"]["brain_t1_random4"] == {"train": [0, 1], "val": [2], "test": [3]}


def test_split_refuses_tasks_missing_from_the_data():
    ds = FakeDataset({"brain_t1_random4": (3, 1), "CORPD_FBK": (3, 1)})
    with pytest.raises(train.UsageError, match="task.s. knee_x not found in the data"):
        train.split(ds, train.TrainConfig(data="folder", tasks=["CORPD_FBK", "knee_x"]))
    with pytest.raises(train.UsageError, match=r"--unseen: task\(s\) CORPD_FBX not among the tasks "
                                               "used: CORPD_FBK, brain_t1_random4"):
        train.split(ds, train.TrainConfig(data="folder", unseen=["CORPD_FBX"]))
    with pytest.raises(train.UsageError, match="not among the tasks used: CORPD_FBK$"):
        train.split(ds, train.TrainConfig(data="folder", tasks=["CORPD_FBK"], unseen=["brain_t1_random4"]))


# --- Recorder: CSV rows, checkpoint, best.pt -----------------------------------------------

class FakeTrainer:
    group_names = ["g1", "g2", "g3"]
    task_names = ["brain", "knee"]
    weights = torch.arange(6.0)  # reshaped to (groups, tasks): row g1 = (0, 1)

    def __init__(self):
        self.tag = 0

    def state_dict(self):
        return {"tag": self.tag}


class Bar:
    def set_postfix(self, **kw):
        pass

    def update(self, n):
        pass


def test_recorder_rows_and_best_checkpoint(tmp_path):
    losses = iter([[2.0, 2.0], [1.0, 1.0], [3.0, 3.0]])
    rec = train.Recorder(tmp_path, train.TrainConfig(), {"config": {}}, Bar(),
                         lambda tr: next(losses), 0.0)
    trainer = FakeTrainer()
    for epoch in range(3):
        trainer.tag = epoch + 1
        rec(trainer, {"epoch": epoch, "train_loss": [1.0]})
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["trainer"]["tag"] == 2 and best["best"] == 1.0  # epoch 2: lowest val loss
    last = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert last["trainer"]["tag"] == 3 and last["best"] == 1.0
    rows = (tmp_path / "weights.csv").read_text().splitlines()
    assert rows[0] == "epoch,group,brain,knee"
    assert rows[1:4] == ["1,g1,0.000000,1.000000", "1,g2,2.000000,3.000000", "1,g3,4.000000,5.000000"]
    log = (tmp_path / "train_log.csv").read_text().splitlines()
    assert log[0] == "epoch,seconds,train_loss,val_loss,val_brain,val_knee"
    assert [r.split(",")[0] for r in log[1:]] == ["1", "2", "3"]


def test_recorder_after_resume_keeps_a_better_best(tmp_path):
    rec = train.Recorder(tmp_path, train.TrainConfig(), {"best": 0.5}, Bar(), lambda tr: [1.0], 0.0)
    rec(FakeTrainer(), {"epoch": 3, "train_loss": [1.0]})
    assert (tmp_path / "checkpoint.pt").is_file() and not (tmp_path / "best.pt").exists()


# --- a tiny real training run: val tasks, metrics.json ----------------------------------------

def test_tiny_run_val_tasks_and_metrics(tmp_path):
    root = tmp_path / "data"
    data.generate(root, tasks=["brain_t1_random4", "brain_t2_equispaced4", "knee_pd_equispaced4",
                               "knee_t2_random6"], slices=1, size=(32, 32), coils=2, volumes=3,
                  progress=False)
    out = tmp_path / "run"
    assert train.main(["--data", str(root), "--out", str(out), "--unseen", "knee_t2_random6",
                       "--epochs", "1", "--lower-steps", "1", "--upper-steps", "1", "--phases", "1",
                       "--width", "2", "--mask-variants", "1", "--cg-iters", "2", "--batch-size", "1",
                       "--threads", "1"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    seen = ["brain_t1_random4", "brain_t2_equispaced4", "knee_pd_equispaced4"]
    assert m["seen"] == seen and m["unseen"] == ["knee_t2_random6"] and m["epochs"] == 1
    assert m["weights"]["groups"] == seen and m["weights"]["tasks"] == ["brain", "knee"]
    W = m["weights"]["W"]
    assert len(W) == 3 and all(len(r) == 2 for r in W)
    assert m["tasks"]["knee_t2_random6"]["model_task"] == "knee"
    assert [m["tasks"][t]["model_task"] for t in seen] == ["brain", "brain", "knee"]
    assert all(m["tasks"][t]["volumes"] == 1 for t in seen)
    assert m["tasks"]["knee_t2_random6"]["volumes"] == 3
    rows = (out / "weights.csv").read_text().splitlines()
    assert rows[0] == "epoch,group,brain,knee" and [r.split(",")[1] for r in rows[1:]] == seen
    assert [float(x) for x in rows[1].split(",")[2:]] == pytest.approx(W[0], abs=1e-6)


def test_a_memory_budget_changes_no_number(tmp_path, monkeypatch):
    """Slices and maps that do not fit --memory-gb are read and computed again: the same
    weights, bit for bit, as a run that keeps everything (mask draws of the kept slices share
    their ESPIRiT maps, so the run that keeps all estimates fewer)."""
    root = tmp_path / "data"
    data.generate(root, tasks=["brain_t1_random4", "knee_pd_equispaced4"], slices=2, size=(48, 48),
                  coils=4, volumes=3, progress=False)
    estimate = evaluate.sensitivities.estimate
    calls = []
    monkeypatch.setattr(evaluate.sensitivities, "estimate",
                        lambda *a, **k: calls.append(1) or estimate(*a, **k))
    runs, estimates = {}, {}
    for gb in ("4", "0", "0.0005"):  # everything kept, nothing, some
        out = tmp_path / f"run{gb}"
        calls.clear()
        assert train.main(["--data", str(root), "--out", str(out), *TINY, "--epochs", "2",
                           "--mask-variants", "3", "--cg-iters", "3", "--memory-gb", gb]) == 0
        runs[gb], estimates[gb] = final_weights(out), len(calls)
    assert estimates["4"] < estimates["0.0005"] < estimates["0"], estimates
    for gb in ("0", "0.0005"):
        assert torch.equal(runs[gb][1], runs["4"][1])
        for k in runs["4"][0]:
            assert torch.equal(runs[gb][0][k], runs["4"][0][k]), (gb, k)


def test_cached_subset_keeps_what_the_budget_allows(tmp_path):
    data.generate(tmp_path, tasks=["brain_t1_random4"], slices=3, size=(16, 16), coils=2, volumes=1,
                  progress=False)
    ds = data.SliceDataset(tmp_path)
    one = sum(evaluate._storages(ds[0]).values())
    budget = evaluate.MemoryBudget(2.5 * one)
    subset = evaluate.CachedSubset(ds, [0, 1, 2], [lambda s: s, lambda s: s], budget)
    assert len(subset) == 6 and all(torch.equal(subset[i]["kspace"], ds[i % 3]["kspace"]) for i in range(6))
    assert sorted(subset.cache) == [0, 1] and budget.left == pytest.approx(0.5 * one)
    lazy = evaluate.group_files(ds, [2, 0], lambda s: s["slice"])["brain_t1_random4"]
    (volume,) = lazy.values()
    assert list(volume) == [0, 2] and list(volume[1:]) == [2] and len(volume) == 2


# --- evaluate CLI ------------------------------------------------------------------------------

def fake_checkpoint(path, trained_on=None):
    net = NetworkConfig(coils=2, phases=1, width=2, kspace_width=2)
    torch.manual_seed(0)
    model = UnrolledRecon(net)
    torch.save({"config": {}, "network": dataclasses.asdict(net), "task_names": ["brain"],
                "trainer": {"models": {f"0.{k}": v for k, v in model.state_dict().items()}},
                "seen_tasks": ["brain_t1_random4"], "trained_on": trained_on or {}}, path)
    return path


def test_evaluate_refuses_an_unfinished_training_out(tmp_path, capsys):
    out = tmp_path / "unfinished"
    out.mkdir()
    (out / "config.toml").write_text("epochs = 3\n")  # a run that stopped before its first epoch
    ckpt = fake_checkpoint(tmp_path / "c.pt")
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(tmp_path), "--out", str(out)]) == 2
    assert "holds a training run" in capsys.readouterr().err


def test_evaluate_leaves_out_trained_slices_of_their_own_file_only(tmp_path):
    root = tmp_path / "d"
    data.generate(root, tasks=["brain_t1_random4"], slices=2, size=(32, 32), coils=2, volumes=2,
                  progress=False)
    ckpt = fake_checkpoint(tmp_path / "c.pt", {"brain_t1_random4_000.h5": [0, 1]})
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(root),
                          "--out", str(tmp_path / "o")]) == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["tasks"]["brain_t1_random4"]["volumes"] == 1 and m["held_out_only"]


def test_nearest_prefers_the_same_anatomy():
    assert evaluate.nearest("brain_pd_random8", ["knee_pd_random8", "brain_t1_equispaced4"]) \
        == "brain_t1_equispaced4"
    assert evaluate.nearest("knee_pd_random8", ["knee_t2_equispaced4", "knee_pd_random4"]) \
        == "knee_pd_random4"


def test_evaluate_knows_a_volume_by_its_content_not_its_name(tmp_path):
    for seed in (0, 1):  # the same file names, other volumes
        data.generate(tmp_path / f"seed{seed}", tasks=["brain_t1_random4"], slices=2, size=(32, 32),
                      coils=2, volumes=2, seed=seed, progress=False)
    first = tmp_path / "seed0" / "brain_t1_random4_000.h5"
    ckpt = fake_checkpoint(tmp_path / "c.pt", {data.fingerprint(first): {
        "file": first.name, "slices": [0, 1]}})
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "scan.h5").write_bytes(first.read_bytes())
    (renamed / "other.h5").write_bytes((tmp_path / "seed1" / first.name).read_bytes())
    for folder, volumes, held_out in (("seed0", 1, True), ("seed1", 2, False), ("renamed", 1, True)):
        out = tmp_path / f"o_{folder}"
        assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(tmp_path / folder),
                              "--out", str(out)]) == 0
        m = json.loads((out / "metrics.json").read_text())
        assert m["tasks"]["brain_t1_random4"]["volumes"] == volumes, folder
        left_out = sum(m["tasks"][t]["volumes"] for t in m["tasks"]) < 2
        assert left_out == held_out, folder


# --- files without our attributes: real fastMRI ----------------------------------------------

def fastmri_like(folder, name, acquisition, shape, ref=(24, 24), seed=0):
    """A volume as fastMRI stores it: no mask attributes, a reference smaller than k-space."""
    slices, coils, H, W = shape
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(slices, coils, H, W, dtype=torch.complex64, generator=g)
    kspace = torch.fft.fftshift(torch.fft.fft2(images, norm="ortho"), dim=(-2, -1))
    rss = images.abs().pow(2).sum(1).sqrt()
    top, left = (H - ref[0]) // 2, (W - ref[1]) // 2
    data.write_fastmri(folder / name, kspace, rss[:, top:top + ref[0], left:left + ref[1]],
                       {"acquisition": acquisition})


def test_fastmri_files_train_with_mask_and_crop_options_and_evaluate(tmp_path, capsys):
    root = tmp_path / "fastmri"
    root.mkdir()
    for v in range(3):
        fastmri_like(root, f"knee_{v}.h5", "CORPD_FBK", (2, 2, 32, 32), seed=v)
        fastmri_like(root, f"brain_{v}.h5", "AXT1", (2, 2, 28, 32), seed=10 + v)
    out = tmp_path / "run"
    base = ["--data", str(root), "--out", str(out), *TINY]
    mask = ["--mask", "random", "--acceleration", "4"]
    for extra, message in (
            ([], "brain_0.h5, brain_1.h5, brain_2.h5 and 3 more: no 'mask_family' attribute "
                 "(real fastMRI files have none); pass --mask"),
            (["--mask", "random"], "pass --acceleration R"),
            (mask, "pass --crop H W (at most 24 24)"),
            ([*mask, "--crop", "30", "30"], "--crop 30 30 is larger than brain_0.h5's images (28, 32)"),
            (["--mask", "random", "--acceleration", "inf"], "acceleration must be a finite number >= 1"),
            ([*mask, "--center-fraction", "0.5", "--crop", "24", "24"],
             "no random mask of acceleration 4.0 and centre fraction 0.5 on 24×24")):
        assert train.main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not out.exists()  # refused before anything was written
    options = [*mask, "--crop", "24", "24"]
    assert train.main(base + options) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["seen"] == ["AXT1", "CORPD_FBK"] and m["weights"]["tasks"] == ["brain", "knee"]
    assert all(np.isfinite(m["tasks"][t]["model"]["psnr"]) for t in m["seen"])
    # evaluate takes the run's mask and crop, or the full grid with --no-crop
    ckpt = ["--checkpoint", str(out / "checkpoint.pt")]
    assert evaluate.main([*ckpt, "--data", str(root), "--out", str(tmp_path / "e"), "--seed", "0"]) == 0
    e = json.loads((tmp_path / "e" / "metrics.json").read_text())
    for t in m["seen"]:
        assert e["tasks"][t]["model"] == pytest.approx(m["tasks"][t]["model"])
    assert evaluate.main([*ckpt, "--data", str(root), "--out", str(tmp_path / "e1"), "--no-crop"]) == 0
    small = tmp_path / "small"
    small.mkdir()
    fastmri_like(small, "knee_s.h5", "CORPD_FBK", (1, 2, 20, 20), ref=(16, 16))
    assert evaluate.main([*ckpt, "--data", str(small), "--out", str(tmp_path / "e2")]) == 2
    assert "the training run's --crop (--no-crop to leave it out) 24 24 is larger than knee_s.h5" \
        in capsys.readouterr().err
    # files of another coil count than the network's are left out, with a word; none left: refused
    fastmri_like(small, "knee_3.h5", "CORPD_FBK", (1, 3, 32, 32))
    fastmri_like(small, "knee_s.h5", "CORPD_FBK", (1, 2, 32, 32), seed=99)
    assert evaluate.main([*ckpt, "--data", str(small), "--out", str(tmp_path / "e3")]) == 0
    assert "left out 1 file(s) of another coil count than the network's 2: knee_3.h5" \
        in capsys.readouterr().err
    (small / "knee_s.h5").unlink()
    assert evaluate.main([*ckpt, "--data", str(small), "--out", str(tmp_path / "e4")]) == 2
    assert "no file has the 2 coils the network takes (knee_3.h5 have [3])" in capsys.readouterr().err
    # --resume reads the run's data from any folder, but not other data under the same names
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    assert train.main([*base, *options, "--data", str(copy), "--resume", "--epochs", "2"]) == 0
    for v in range(3):
        fastmri_like(copy, f"knee_{v}.h5", "CORPD_FBK", (2, 2, 32, 32), seed=20 + v)
    config = (out / "config.toml").read_text()
    assert train.main([*base, *options, "--data", str(copy), "--resume", "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "does not hold the volumes the run trained and validated on" in err, err
    assert (out / "config.toml").read_text() == config
    # training files of two coil counts
    fastmri_like(root, "ankle_0.h5", "ANKLE", (3, 3, 32, 32))
    assert train.main([*base[:2], "--out", str(tmp_path / "r2"), *TINY[2:], *options]) == 2
    assert "the network takes one coil count, but the files have 2 coils" in capsys.readouterr().err


def test_fastmri_acquisitions_have_their_anatomy():
    assert [evaluate.family(t) for t in ("CORPD_FBK", "CORPDFS_FBK", "AXT2", "AXFLAIR", "AXT1POST",
                                         "knee_pd_random4", "PELVIS_T2")] == \
        ["knee", "knee", "brain", "brain", "brain", "knee", "PELVIS"]
    assert evaluate.nearest("AXFLAIR", ["knee", "brain"]) == "brain"


def test_more_bad_input_exits_2_with_one_message(tmp_path, cache, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    seed_config = tmp_path / "seed.toml"
    seed_config.write_text("seed = -1\n")
    cases = [
        (quick(tmp_path / "a", cache, "--seed", "-1"), "seed must be an integer >= 0, got -1"),
        (quick(tmp_path / "a", cache, "--config", str(seed_config)), "seed must be an integer >= 0"),
        (quick(afile, cache), f"--out {afile} is a file"),
        (["--quick", "--out", str(tmp_path / "a"), "--cache", str(afile)], f"--cache {afile}: cannot make"),
        (quick(tmp_path / "a", cache, "--acceleration", "0.5"), "acceleration must be a finite number >= 1"),
        (quick(tmp_path / "a", cache, "--crop", "4", "64"), "crop must be two sizes >= 8"),
        (quick(tmp_path / "a", cache, "--memory-gb", "-1"), "memory_gb must be a finite number >= 0"),
    ]
    for argv, message in cases:
        assert train.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    ckpt = fake_checkpoint(tmp_path / "c.pt")
    partial = tmp_path / "partial.pt"
    torch.save({"config": {}, "trainer": {}}, partial)
    state = torch.load(ckpt, weights_only=True)
    state["trainer"]["models"].pop(next(iter(state["trainer"]["models"])))
    torch.save(state, tmp_path / "lacking.pt")
    for argv, message in (
            (["--checkpoint", str(ckpt), "--seed", "-5", "--out", str(tmp_path / "e")], "--seed must be >= 0"),
            (["--checkpoint", str(ckpt), "--out", str(afile)], f"--out {afile} is a file"),
            (["--checkpoint", str(ckpt), "--out", str(afile / "sub")], f"{afile} is a file, so the folder"),
            (["--checkpoint", str(partial), "--out", str(tmp_path / "e")], "not a complete checkpoint"),
            (["--checkpoint", str(tmp_path / "lacking.pt"), "--out", str(tmp_path / "e")],
             "the checkpoint's weights of task model 'brain' do not fit its network settings")):
        assert evaluate.main([*argv, "--data", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    # checkpoints --resume cannot continue: of another version, or missing the RNG state
    for i, state in enumerate(({"config": {"epochz": 3}, "trainer": {}, "torch_rng": 0, "trained_on": {}},
                               {"config": {}, "trainer": {}, "trained_on": {}})):
        (tmp_path / f"r{i}").mkdir()
        torch.save(state, tmp_path / f"r{i}" / "checkpoint.pt")
        assert train.main(["--out", str(tmp_path / f"r{i}"), "--resume"]) == 2
        err = capsys.readouterr().err
        assert "is not a complete checkpoint of this version" in err and "Traceback" not in err, err
        assert ("epochz" if i == 0 else "torch_rng") in err
    for argv, message in ((["--snr", "nan"], "--snr must be a finite number"),
                          (["--out", str(afile)], f"--out {afile} is a file"),
                          (["--out", str(afile / "sub")], "cannot make the folder (Not a directory)")):
        argv = ["generate", "--out", str(tmp_path / "g"), "--tasks", "brain_t1_random4", *argv]
        with pytest.raises(SystemExit) as exit_:
            data.main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_quick_keeps_the_tasks_of_a_data_folder(tmp_path):
    cfg, _ = train.resolve(["--quick", "--data", str(tmp_path)])
    assert cfg.tasks == [] and cfg.epochs == train.QUICK["epochs"]
    cfg, _ = train.resolve(["--quick", "--data", str(tmp_path), "--tasks", "AXT1_BRAIN"])
    assert cfg.tasks == ["AXT1_BRAIN"]
    assert train.resolve(["--quick"])[0].tasks == train.QUICK["tasks"]


def test_upper_loss_log_is_the_mean_log_of_each_slices_loss(tmp_path, cache, monkeypatch):
    """--upper-loss log hands the trainer mean_b log ℓ(slice b), checked against the training
    loss of each validation slice alone; the default keeps the training loss itself."""
    made = []

    class Recording(train.bk.trainers.BilevelTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(train.bk.trainers, "BilevelTrainer", Recording)
    omegas = {}
    for choice in ("mean", "log"):
        out = tmp_path / choice
        assert train.main(quick(out, cache, "--epochs", "1", "--upper-loss", choice)) == 0
        omegas[choice] = final_weights(out)[1]
    plain, log = made
    assert plain.upper_loss is plain.loss
    model, val = log.models[0], log.val_tasks[0]
    batch = log.sampler.collate([val[0], val[1]])
    alone = [log.loss(model, log.sampler.collate([val[b]])) for b in (0, 1)]
    with torch.no_grad():
        expected = (torch.log(alone[0]) + torch.log(alone[1])) / 2
        torch.testing.assert_close(log.upper_loss(model, batch), expected, rtol=1e-5, atol=0)
        assert abs(float(log.upper_loss(model, batch)) - float(torch.log(log.loss(model, batch)))) > 1e-4
    assert not torch.equal(omegas["mean"], omegas["log"])
    for choice, what in (("mean", "upper loss"), ("log", "upper log loss")):  # train.log shows it
        history = torch.load(tmp_path / choice / "checkpoint.pt", weights_only=True)["trainer"]["history"]
        upper = sum(history[-1]["val_loss"]) / len(history[-1]["val_loss"])
        assert f"  {what} {upper:.4f}  W range" in (tmp_path / choice / "train.log").read_text()
