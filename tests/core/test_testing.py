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
