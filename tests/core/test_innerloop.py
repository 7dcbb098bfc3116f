"""The inner loop as a Dynamics: costate sweeps give the unrolled hypergradient exactly."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevelkit as bk
from bilevelkit.hypergrad import InnerLoop, InnerOptimizer, Unrolled
from bilevelkit.testing import check_dynamics, relative_error

DT = torch.float64


def mlp_problem(groups, width, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(groups, 8, 3, generator=g, dtype=DT)
    Y = torch.randn(groups, 8, generator=g, dtype=DT)
    Xv, Yv = torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, generator=g, dtype=DT)

    def net(p, x):
        return torch.tanh(x @ p["W1"] + p["b1"]) @ p["w2"]

    def inner_loss(p, w):
        return (w * ((net(p, X) - Y) ** 2).mean(1)).sum()

    def outer_loss(p):
        return ((net(p, Xv) - Yv) ** 2).mean()

    params = {"W1": torch.randn(3, width, generator=g, dtype=DT) / 2,
              "b1": torch.zeros(width, dtype=DT), "w2": torch.randn(width, generator=g, dtype=DT) / 2}
    return inner_loss, outer_loss, params, torch.randn(groups, generator=g, dtype=DT)


@settings(max_examples=60)
@given(st.integers(1, 12), st.integers(1, 6), st.integers(2, 5),
       st.sampled_from(["sgd", "momentum", "adam"]), st.booleans(), st.data())
def test_costate_hypergradient_equals_plain_unrolled(k, width, groups, optimizer, learn_lr, data):
    problem = mlp_problem(groups, width, seed=k * 100 + width)
    ref = Unrolled(steps=k, lr=0.05, optimizer=optimizer, learn_lr=learn_lr)(*problem)
    c = data.draw(st.integers(1, k + 1), label="checkpoints")
    for costate in (bk.AdjointSweep(), bk.CheckpointedSweep(c)):
        res = Unrolled(steps=k, lr=0.05, optimizer=optimizer, costate=costate, learn_lr=learn_lr)(*problem)
        assert relative_error(res.hypergrad, ref.hypergrad) <= 1e-10
        assert res.outer_loss == pytest.approx(ref.outer_loss, rel=1e-12)
        for n in ref.params:
            assert relative_error(res.params[n], ref.params[n]) <= 1e-12
        if learn_lr:
            assert res.lr_grad == pytest.approx(ref.lr_grad, rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_learning_rate_gradient_matches_finite_differences(optimizer):
    inner_loss, outer_loss, params, omega = mlp_problem(3, 4, seed=0)

    def outer_at(lr):
        return Unrolled(steps=5, lr=lr, optimizer=optimizer)(inner_loss, outer_loss, params, omega).outer_loss

    h = 1e-6
    fd = (outer_at(0.05 + h) - outer_at(0.05 - h)) / (2 * h)
    res = Unrolled(steps=5, lr=0.05, optimizer=optimizer, costate=bk.AdjointSweep(),
                   learn_lr=True)(inner_loss, outer_loss, params, omega)
    assert res.lr_grad == pytest.approx(fd, rel=1e-6)


def test_inner_loop_passes_check_dynamics():
    inner_loss, outer_loss, params, omega = mlp_problem(3, 4, seed=1)
    loop = InnerLoop(inner_loss, params, omega, 4, 0.05, InnerOptimizer("adam"), "softmax")
    check_dynamics(loop, None, lambda x: outer_loss(loop.unflatten(x)))


def test_costate_route_still_refuses_omega_that_does_not_reach_inner_loss():
    inner_loss, outer_loss, params, omega = mlp_problem(3, 4, seed=2)
    fixed = torch.full((3,), 1 / 3, dtype=DT)
    with pytest.raises(ValueError, match="omega does not influence inner_loss"):
        Unrolled(steps=2, lr=0.1, costate=bk.AdjointSweep())(
            lambda p, w: inner_loss(p, fixed), outer_loss, params, omega)


def test_trainer_accepts_costate_hypergradients():
    from .test_trainers import cleaning_problem, linear, mse

    train, val = cleaning_problem()
    out = []
    for costate in (None, bk.CheckpointedSweep(2)):
        trainer = bk.trainers.BilevelTrainer(linear(), mse, train, val, batch_size=8,
                                             hypergrad=Unrolled(steps=4, lr=0.1, costate=costate))
        trainer.fit(3)
        out.append(trainer.omega.clone())
    torch.testing.assert_close(out[0], out[1], rtol=1e-10, atol=1e-12)


def test_costate_route_names_a_non_finite_outer_loss():
    inner_loss, outer_loss, params, omega = mlp_problem(3, 4, seed=3)
    with pytest.raises(FloatingPointError, match="outer_loss is nan after 2 inner steps"):
        Unrolled(steps=2, lr=0.1, costate=bk.AdjointSweep())(
            inner_loss, lambda p: outer_loss(p) * float("nan"), params, omega)
