"""The worked non-MRI example: unrolled ISTA for deconvolution, trained by Algorithm 3."""
import pytest
import torch

from bilevelkit.examples import deconvolution as deconv
from bilevelkit.testing import check_dynamics


def test_training_beats_classical_ista():
    out = deconv.train(phases=6, steps=120, batch=32, solver="sweep", verbose=False)
    assert out["nmse_trained"] < 0.8 * out["nmse_untrained"]
    assert out["nmse_trained"] < 0.8 * out["nmse_ista"]


def test_solvers_give_the_same_trajectory():
    runs = {s: deconv.train(phases=4, steps=8, solver=s, verbose=False)["losses"]
            for s in ("autograd", "sweep", "checkpointed")}
    assert runs["sweep"] == pytest.approx(runs["autograd"], rel=1e-5)
    assert runs["checkpointed"] == pytest.approx(runs["autograd"], rel=1e-5)


def test_dynamics_passes_check_dynamics():
    kernel = deconv.gaussian_kernel(2.0)
    x, f = deconv.make_batch(4, 32, kernel, generator=torch.Generator().manual_seed(0))
    check_dynamics(deconv.UnrolledISTA(5), {"f": f, "kernel": kernel},
                   lambda z: ((z - x.double()) ** 2).mean())


def test_cli(capsys):
    deconv.main(["--phases", "3", "--steps", "2", "--batch", "4"])
    assert "unrolled, trained" in capsys.readouterr().out
    for bad in (["--phases", "0"], ["--lr", "-1"], ["--lr", "nan"]):
        with pytest.raises(SystemExit) as info:
            deconv.main(bad)
        assert info.value.code == 2
    assert "--lr must be a finite number > 0" in capsys.readouterr().err


def test_hyper_cleaning_cli(capsys):
    from bilevelkit.examples import hyper_cleaning

    trainer = hyper_cleaning.main(["--normalizer", "sparsemax", "--epochs", "80"])
    out = capsys.readouterr().out
    assert "learned W = sparsemax(Ω)" in out
    W = trainer.weights
    corrupted = [i for i, name in enumerate(trainer.group_names) if name.endswith("*")]
    assert len(corrupted) == 3 and all(float(W[i]) == 0.0 for i in corrupted)
    with pytest.raises(SystemExit) as info:
        hyper_cleaning.main(["--corrupted", "9"])
    assert info.value.code == 2
    # --domains corrupts nothing, so the default --corrupted 3 does not block 3 groups
    trainer = hyper_cleaning.main(["--domains", "--groups", "3", "--epochs", "2"])
    assert trainer.weights.shape == (3, 2)
