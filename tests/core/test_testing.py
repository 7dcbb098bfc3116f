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


class _Scaled:
    """A solver whose gradients (or λ_0) are off by a relative ``eps``: a subtle bug."""

    def __init__(self, eps, what):
        self.eps, self.what = eps, what

    def __repr__(self):
        return f"Scaled({self.what})"

    def solve(self, dynamics, ctx, loss):
        res = bk.AdjointSweep(keep=True).solve(dynamics, ctx, loss)
        if self.what == "grads":
            res.grads = {n: g * (1 + self.eps) for n, g in res.grads.items()}
        else:
            res.multipliers = [res.multipliers[0] * (1 + self.eps), *res.multipliers[1:]]
        return res


@pytest.mark.parametrize("what,label", [("grads", "grad W.0"), ("multipliers", "multipliers")])
def test_a_small_error_fails_at_the_default_tolerance(what, label):
    dyn = RandomDynamics(4, 3, True, "both", "tanh", True, 1)
    ctx, loss = {"f": torch.randn(2, 3, dtype=torch.complex128)}, make_loss(0.0)
    bk.testing.check_dynamics(dyn, ctx, loss, solvers=[_Scaled(0.0, what)])
    with pytest.raises(AssertionError) as info:
        bk.testing.check_dynamics(dyn, ctx, loss, solvers=[_Scaled(1e-6, what)])
    failing = [line for line in str(info.value).splitlines() if line.endswith("FAIL")]
    assert failing and all(line.startswith(f"Scaled({what})") for line in failing), failing
    assert any(label in line for line in failing)


def test_report_covers_every_default_solver_and_each_kkt_condition():
    dyn = RandomDynamics(4, 3, False, "both", "tanh", True, 2)
    report = bk.testing.check_dynamics(dyn, {"f": torch.randn(2, 3, dtype=torch.float64)},
                                       make_loss(0.0))
    checks = {c for c, _, _ in report["rows"]}
    assert {"AdjointSweep(keep=True)", *(f"CheckpointedSweep(checkpoints={k}, keep=True)"
                                         for k in (1, 2, 5))} <= checks
    assert {q for c, q, _ in report["rows"] if c == "KKT"} == {
        "state residual", "costate residual", "terminal residual"}
    # a step that changes on its third evaluation: only the solver that recomputes most sees it
    with pytest.raises(AssertionError, match=r"CheckpointedSweep\(checkpoints=1, keep=True\)"):
        bk.testing.check_dynamics(_ThirdCallDiffers(), torch.ones(3), lambda x: (x ** 2).sum())


class _ThirdCallDiffers(bk.Dynamics):
    """Phase 1 returns another value from its third evaluation on: autograd evaluates it once,
    AdjointSweep twice, CheckpointedSweep(k < T + 1) more often."""

    horizon = 3

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.3))
        self.calls = 0

    def initial(self, ctx):
        self.calls = 0
        return ctx

    def step(self, t, x, ctx):
        if t == 1:
            self.calls += 1
        return torch.tanh(self.a * x) * (1.5 if t == 1 and self.calls > 2 else 1.0)


def test_lagrangian_refuses_a_real_multiplier_for_a_complex_state():
    dyn = RandomDynamics(3, 2, True, "shared", "tanh", True, 0)
    ctx, loss = {"f": torch.ones(1, 2, dtype=torch.complex128)}, make_loss(0.0)
    ref = bk.AutogradCostate(keep=True).solve(dyn, ctx, loss)
    real = [m.real if t == 1 else m for t, m in enumerate(ref.multipliers)]
    with pytest.raises(ValueError, match="multiplier λ_1"):
        bk.Lagrangian(dyn, loss).value(ctx, ref.states, real)


def test_bad_arguments_and_a_float32_tensor_in_the_loss_are_named():
    dyn = RandomDynamics(3, 3, False, "both", "tanh", True, 0)
    ctx = {"f": torch.randn(2, 3, dtype=torch.float64)}
    loss = make_loss(torch.zeros(2, 3))
    for kwargs, message in [({"rtol": -1.0}, "rtol must be a finite number > 0"),
                            ({"rtol": float("nan")}, "rtol must be a finite number > 0"),
                            ({"solvers": []}, "solvers must list solver instances.*got none"),
                            ({"solvers": ["adjoint"]}, "solvers must list .*got 'adjoint'"),
                            ({"solvers": [bk.AdjointSweep]}, "solvers must list .*AdjointSweep")]:
        with pytest.raises(ValueError, match=message):
            bk.testing.check_dynamics(dyn, ctx, loss, **kwargs)
    A = torch.randn(3, 3)  # float32, captured by the closure: not promoted
    with pytest.raises(ValueError, match=r"float64 copy of the dynamics and ctx.*pass it in float64 "
                                         r"or through ctx\. torch said: "):
        bk.testing.check_dynamics(dyn, ctx, lambda x: ((x @ A.T) ** 2).mean())
    bk.testing.check_dynamics(dyn, ctx, lambda x: ((x @ A.double().T) ** 2).mean())  # as advised
