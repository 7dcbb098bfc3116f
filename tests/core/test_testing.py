"""check_dynamics: passes on correct user dynamics, reports clearly on broken ones."""
import pytest
import torch
from torch import nn

import bilevelkit as bk

from .random_dynamics import RandomDynamics, make_loss


def test_passes_on_float32_complex_dynamics_and_leaves_it_untouched():
    dyn = RandomDynamics(5, 3, True, "both", "tanh", True, 0)
    dyn._apply(lambda t: t.to(torch.complex64) if t.is_complex() else t.float())
    ctx = {"f": torch.randn(2, 3, dtype=torch.complex64)}
    report = bk.testing.check_dynamics(dyn, ctx, make_loss(torch.zeros(2, 3)))
    assert all(err <= 1e-8 for _, _, err in report["rows"])
    assert any(q.startswith("grad W.4") for _, q, _ in report["rows"])
    assert dyn.W[0].dtype == torch.complex64  # the user's module is not converted


class Impure(bk.Dynamics):
    """A step that changes on re-evaluation: exactly what recomputing solvers cannot handle."""

    horizon = 3

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.3))
        self.b = nn.Parameter(torch.tensor(0.7))
        self.calls = 0

    def initial(self, ctx):
        return ctx * self.b

    def step(self, t, x, ctx):
        self.calls += 1
        return torch.tanh(self.a * x) * (1 + 0.1 * self.calls)


def test_reports_each_parameter_of_a_broken_dynamics():
    with pytest.raises(AssertionError) as info:
        bk.testing.check_dynamics(Impure(), torch.ones(3), lambda x: (x ** 2).sum())
    report = str(info.value)
    assert "check_dynamics(Impure)" in report
    assert "AdjointSweep(keep=True)" in report and "grad a" in report and "FAIL" in report
    assert "KKT" in report


def test_to_float64_handles_containers():
    from dataclasses import dataclass
    from typing import NamedTuple

    @dataclass
    class Ctx:
        f: torch.Tensor
        n: int

    class Pair(NamedTuple):
        a: torch.Tensor
        b: list

    out = bk.testing.to_float64({"c": Ctx(torch.ones(2), 3),
                                 "p": Pair(torch.ones(1, dtype=torch.complex64), [torch.ones(1)])})
    assert out["c"].f.dtype == torch.float64 and out["c"].n == 3
    assert out["p"].a.dtype == torch.complex128 and out["p"].b[0].dtype == torch.float64


class _LayerInContext(bk.Dynamics):
    """x_t = tanh(layer(x_{t-1}) + c): the layer travels in ctx, the only parameter is c."""

    horizon = 3

    def __init__(self, with_parameter=True):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(0.1)) if with_parameter else None

    def initial(self, ctx):
        return ctx["f"]

    def step(self, t, x, ctx):
        return torch.tanh(ctx["layer"](x) + (0.0 if self.c is None else self.c))


def test_context_modules_stay_as_given_and_parameter_free_dynamics_pass():
    from collections import defaultdict

    torch.manual_seed(0)
    layer = nn.Linear(3, 3)
    ctx = defaultdict(lambda: None, {"f": torch.randn(2, 3), "layer": layer})
    loss = lambda x: (x ** 2).mean()  # noqa: E731
    bk.testing.check_dynamics(_LayerInContext(), ctx, loss)
    assert layer.weight.dtype == torch.float32  # not converted in place
    _LayerInContext().rollout(ctx)  # still usable in float32
    bk.testing.check_dynamics(_LayerInContext(with_parameter=False), ctx, loss)


def test_lagrangian_refuses_missing_or_misshapen_multipliers():
    dyn = RandomDynamics(3, 2, False, "shared", "tanh", True, 0)
    ctx, loss = {"f": torch.ones(1, 2, dtype=torch.float64)}, make_loss(0.0)
    lag = bk.Lagrangian(dyn, loss)
    ref = bk.AutogradCostate(keep=True).solve(dyn, ctx, loss)
    plain = bk.AdjointSweep().solve(dyn, ctx, loss)
    with pytest.raises(ValueError, match="keep=True"):
        lag.value(ctx, ref.states, plain.multipliers)
    bent = [m.reshape(2, 1, 1) if t == 1 else m for t, m in enumerate(ref.multipliers)]
    with pytest.raises(ValueError, match="multiplier λ_1 has shape \\(2, 1, 1\\)"):
        lag.kkt_residuals(ctx, ref.states, bent)
    assert lag.kkt_residuals(ctx, ref.states, ref.multipliers)["terminal"] < 1e-12
