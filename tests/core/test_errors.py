"""Every misuse named in the contract gives a ValueError naming the phase or parameter."""
import pytest
import torch
from torch import nn

import bilevelkit as bk

SOLVERS = [bk.AutogradCostate(), bk.AdjointSweep(), bk.CheckpointedSweep(1), bk.CheckpointedSweep(3)]


class Toy(bk.Dynamics):
    def __init__(self, horizon=3, bad_phase=None, bad="shape"):
        super().__init__()
        self.horizon, self.bad_phase, self.bad = horizon, bad_phase, bad
        self.w = nn.ParameterList([nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
                                   for _ in range(max(horizon, 1))])

    def initial(self, ctx):
        return ctx.clone()

    def step(self, t, x, ctx):
        y = torch.tanh(self.w[t - 1] * x)
        if t == self.bad_phase:
            return {"shape": y[:-1], "dtype": y.float(), "type": y.tolist()}[self.bad]
        return y


def ctx():
    return torch.linspace(-1, 1, 4, dtype=torch.float64)


def sq(x):
    return (x ** 2).sum()


@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
@pytest.mark.parametrize("bad, message", [("shape", r"phase 2: step\(t=2.*changed the state "
                                                    r"from \(4,\) torch.float64 to \(3,\)"),
                                          ("dtype", r"phase 2: .*to \(4,\) torch.float32"),
                                          ("type", r"phase 2: .*must return a torch.Tensor")])
def test_step_that_changes_the_state(solver, bad, message):
    with pytest.raises(ValueError, match=message):
        solver.solve(Toy(bad_phase=2, bad=bad), ctx(), sq)


@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
@pytest.mark.parametrize("loss, message", [(lambda x: x ** 2, r"must return a scalar, got shape \(4,\)"),
                                           (lambda x: (x ** 2).sum() * 1j, r"real floating-point scalar.*complex"),
                                           (lambda x: 1.0, r"must return a scalar torch.Tensor, got float")])
def test_bad_loss(solver, loss, message):
    with pytest.raises(ValueError, match=message):
        solver.solve(Toy(), ctx(), loss)


@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
@pytest.mark.parametrize("horizon", [0, -1, 2.0, None])
def test_bad_horizon(solver, horizon):
    dyn = Toy()
    dyn.horizon = horizon
    with pytest.raises(ValueError, match=r"Toy.horizon must be an integer >= 1"):
        solver.solve(dyn, ctx(), sq)


@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
def test_unused_parameter_is_named(solver):
    dyn = Toy()
    dyn.extra = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"'extra' require grad but no phase gave them a "
                                         r"gradient: no phase uses"):
        solver.solve(dyn, ctx(), sq)
    dyn.extra.requires_grad_(False)  # frozen parameters are fine
    assert set(solver.solve(dyn, ctx(), sq).grads) == {"w.0", "w.1", "w.2"}


@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
def test_parameter_free_phases(solver):
    """A parameter-free initial and a parameter-free step are legal (PITFALLS)."""
    class Free(Toy):
        def step(self, t, x, ctx):
            return x.sin() if t == 2 else super().step(t, x, ctx)

    dyn = Free()
    dyn.w[1].requires_grad_(False)
    ref = bk.AutogradCostate().solve(dyn, ctx(), sq)
    res = solver.solve(dyn, ctx(), sq)
    assert set(res.grads) == {"w.0", "w.2"}
    for n in res.grads:
        torch.testing.assert_close(res.grads[n], ref.grads[n], rtol=1e-12, atol=0)


def test_missing_methods_and_bad_checkpoints():
    class Empty(bk.Dynamics):
        horizon = 1
    with pytest.raises(NotImplementedError, match="Empty must implement initial"):
        Empty().rollout(None)
    for k in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="checkpoints must be an integer >= 1"):
            bk.CheckpointedSweep(k)


def test_lagrangian_checks_lengths():
    lag = bk.Lagrangian(Toy(), sq)
    with pytest.raises(ValueError, match=r"expected 4 multipliers \(t = 0..3\), got 2"):
        lag.value(ctx(), [ctx()] * 4, [ctx()] * 2)


class InnerGradient(bk.Dynamics):
    """x_t = x_{t-1} − w_t ∇_x D(x_{t-1}) with D(x) = Σ log cosh(A x − y), its gradient taken
    inside the phase by ``torch.func.grad`` or by ``torch.autograd.grad`` under enable_grad."""

    def __init__(self, how, horizon=3):
        super().__init__()
        self.how, self.horizon = how, horizon
        self.w = nn.Parameter(torch.tensor([0.3, 0.2, 0.4], dtype=torch.float64))

    def initial(self, ctx):
        return ctx["x0"].clone()

    def step(self, t, x, ctx):
        def data(z):
            return torch.log(torch.cosh(ctx["A"] @ z - ctx["y"])).sum()
        if self.how == "func":
            g = torch.func.grad(data)(x)
        else:
            with torch.enable_grad():
                z = x if x.requires_grad else x.detach().requires_grad_()
                (g,) = torch.autograd.grad(data(z), z, create_graph=True)
        return x - self.w[t - 1] * g


@pytest.mark.parametrize("how", ["func", "autograd"])
def test_a_phase_that_differentiates_inside_nests_as_documented(how):
    """guide.md, rule 5: such phases pass check_dynamics (every solver against autograd)."""
    g = torch.Generator().manual_seed(0)
    c = {"A": torch.randn(5, 4, generator=g, dtype=torch.float64),
         "y": torch.randn(5, generator=g, dtype=torch.float64),
         "x0": torch.randn(4, generator=g, dtype=torch.float64)}
    report = bk.testing.check_dynamics(InnerGradient(how), c, lambda x: (x ** 2).sum())
    assert any(q == "grad w" for _, q, _ in report["rows"])  # it raises if any check fails
