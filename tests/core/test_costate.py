"""Theorem 1 as a property: every costate solver equals back-propagation."""
import copy
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevelkit as bk
from bilevelkit.costate import _split
from bilevelkit.testing import relative_error

from .random_dynamics import RandomDynamics, make_loss, problems

RTOL = 1e-10


def assert_close(a, b, what):
    err = relative_error(a, b)
    assert err <= RTOL, f"{what}: relative error {err:.3e}"


@settings(max_examples=200)
@given(problems(), st.data())
def test_every_solver_equals_autograd(problem, data):
    dyn, ctx, loss = problem
    ref = bk.AutogradCostate(keep=True).solve(dyn, ctx, loss)
    k = data.draw(st.integers(1, dyn.horizon + 1), label="checkpoints")
    for solver in (bk.AdjointSweep(keep=True), bk.CheckpointedSweep(k, keep=True)):
        res = solver.solve(dyn, ctx, loss)
        assert float(res.loss) == pytest.approx(float(ref.loss), rel=RTOL)
        assert list(res.grads) == list(ref.grads)
        for name, g in ref.grads.items():
            assert_close(res.grads[name], g, f"{solver} grad {name}")
        for t, (lam, lam_ref) in enumerate(zip(res.multipliers, ref.multipliers)):
            assert_close(lam, lam_ref, f"{solver} λ_{t}")
        for t, (x, x_ref) in enumerate(zip(res.states, ref.states)):
            assert_close(x, x_ref, f"{solver} x_{t}")


@settings(max_examples=200)
@given(problems())
def test_lagrangian_theorem_1_and_kkt(problem):
    dyn, ctx, loss = problem
    res = bk.AdjointSweep(keep=True).solve(dyn, ctx, loss)
    lag = bk.Lagrangian(dyn, loss)
    # On feasible states the constraint terms vanish whatever the multipliers: L = ℓ.
    random_lams = [torch.randn_like(x) for x in res.multipliers]
    for lams in (res.multipliers, random_lams):
        assert float(lag.value(ctx, res.states, lams).detach()) == pytest.approx(float(res.loss), rel=1e-12)
    # Theorem 1: ∇_θ L at (x(θ), λ(θ)), differentiated by autograd, is the sweep's gradient.
    params = {n: p for n, p in dyn.named_parameters()}
    dL = torch.autograd.grad(lag.value(ctx, res.states, res.multipliers), list(params.values()))
    for (name, _), g in zip(params.items(), dL):
        assert_close(g, res.grads[name], f"∇_θ L {name}")
    kkt = lag.kkt_residuals(ctx, res.states, res.multipliers)
    scale = max(1.0, max(float(m.norm()) for m in res.multipliers))
    assert set(kkt) == {"state", "costate", "terminal"}
    assert max(kkt.values()) <= 1e-12 * scale
    # The residuals see a wrong multiplier: they are not vacuous.
    wrong = list(res.multipliers)
    wrong[-1] = wrong[-1] + 1.0
    assert lag.kkt_residuals(ctx, res.states, wrong)["terminal"] > 0.5
    wrong = list(res.multipliers)
    wrong[0] = wrong[0] + 1.0  # λ_0 ≠ (∂_x F_1)* λ_1
    assert lag.kkt_residuals(ctx, res.states, wrong)["costate"] > 0.5


@settings(max_examples=30)
@given(problems())
def test_checkpointed_every_k_gives_the_same_gradients(problem):
    dyn, ctx, loss = problem
    ref = bk.AdjointSweep().solve(dyn, ctx, loss)
    for k in range(1, dyn.horizon + 2):
        res = bk.CheckpointedSweep(checkpoints=k).solve(dyn, ctx, loss)
        for name, g in ref.grads.items():
            assert_close(res.grads[name], g, f"k={k} grad {name}")


class Counting(RandomDynamics):
    def __init__(self, *args):
        super().__init__(*args)
        self.evaluations = 0

    def step(self, t, x, ctx):
        self.evaluations += 1
        return super().step(t, x, ctx)


@pytest.mark.parametrize("T", [1, 5, 16])
def test_checkpoint_schedule_cost(T):
    """k = T+1 costs what AdjointSweep costs; fewer checkpoints stay within the binomial bound."""
    from math import comb

    dyn = Counting(T, 3, False, "per-phase", "tanh", True, 0)
    ctx, loss = {"f": torch.randn(2, 3, dtype=torch.float64)}, make_loss(0.0)
    bk.AdjointSweep().solve(dyn, ctx, loss)
    adjoint_cost, dyn.evaluations = dyn.evaluations, 0
    assert adjoint_cost == 2 * T
    bk.CheckpointedSweep(T + 1).solve(dyn, ctx, loss)
    assert dyn.evaluations == adjoint_cost
    for k in range(1, T + 1):
        dyn.evaluations = 0
        bk.CheckpointedSweep(k).solve(dyn, ctx, loss)
        r = next(r for r in range(1, T + 2) if comb(k + r, r) >= T)
        assert dyn.evaluations <= (r + 1) * T
        # the fewest of all schedules of this form: T VJPs, x_T once, and the least re-evaluations
        assert dyn.evaluations == T + 1 + fewest_advances(T, k - 1), k


@functools.lru_cache(maxsize=None)
def fewest_advances(n, free):
    """Exhaustive search: the fewest forward phase evaluations that reverse ``n`` phases from a
    stored start with ``free`` more slots, over every choice of the next checkpoint (a slot
    used on the right is free again for the left part; no free slot: recompute each time)."""
    best = n * (n - 1) // 2
    if n > 1 and free > 0:
        for left in range(1, n):
            best = min(best, left + fewest_advances(n - left, free - 1) + fewest_advances(left, free))
    return best


@pytest.mark.parametrize("T", [50, 200])
def test_checkpoint_schedule_is_the_cheapest_for_long_horizons(T):
    """Where the old split rule lost (T = 200, k = 8: 878 evaluations instead of 781)."""
    for k in (2, 3, 5, 8, 16, 32):
        dyn = Counting(T, 2, False, "shared", "tanh", True, 0)
        bk.CheckpointedSweep(k).solve(dyn, {"f": torch.randn(1, 2, dtype=torch.float64)}, make_loss(0.0))
        assert dyn.evaluations == T + 1 + fewest_advances(T, k - 1), k


def test_split_is_binomial():
    # β(s, r) = C(s + r, s) phases are reversible with s checkpoints (the start's included)
    # and r repetitions; the left part takes min(β(s, r − 1), n − β(s − 1, r − 1)).
    assert _split(10, 2) == 6  # r = 3 (β(2, 3) = 10): left β(2, 2) = 6, right β(1, 3) = 4
    assert _split(10, 10) == 1  # enough slots: store every state
    assert _split(10, 3) == 4  # r = 2 (β(3, 2) = 10): left β(3, 1) = 4, right β(2, 2) = 6
    assert _split(5, 3) == 2  # r = 2 (β(3, 1) = 4 < 5): left min(β(3, 1), 5 − β(2, 1)) = 2



@pytest.mark.parametrize("solver", [bk.AutogradCostate(), bk.AdjointSweep(),
                                    bk.CheckpointedSweep(2)], ids=repr)
def test_backward_with_adam_matches_loss_backward(solver):
    torch.manual_seed(0)
    dyn = RandomDynamics(6, 4, True, "both", "tanh", True, 3)
    twin = copy.deepcopy(dyn)
    ctx = {"f": torch.randn(3, 4, dtype=torch.complex128)}
    loss = make_loss(torch.randn(3, 4, dtype=torch.complex128))
    opt, opt_twin = torch.optim.Adam(dyn.parameters(), 1e-2), torch.optim.Adam(twin.parameters(), 1e-2)
    for _ in range(5):
        opt.zero_grad()
        value = solver.backward(dyn, ctx, loss)
        opt.step()
        opt_twin.zero_grad()
        ref = loss(twin.rollout(ctx)[-1])
        ref.backward()
        opt_twin.step()
        assert float(value) == pytest.approx(float(ref.detach()), rel=1e-12)
    for (name, p), q in zip(dyn.named_parameters(), twin.parameters()):
        assert_close(p.detach(), q.detach(), name)


def test_backward_accumulates_like_autograd():
    dyn = RandomDynamics(3, 2, False, "shared", "tanh", True, 1)
    ctx, loss = {"f": torch.ones(1, 2, dtype=torch.float64)}, make_loss(0.0)
    bk.AdjointSweep().backward(dyn, ctx, loss)
    once = {n: p.grad.clone() for n, p in dyn.named_parameters()}
    bk.CheckpointedSweep(1).backward(dyn, ctx, loss)
    for n, p in dyn.named_parameters():
        assert_close(p.grad, 2 * once[n], n)


class _ScaledBySum(bk.Dynamics):
    """x_1 = x_0 · Σ g: the gradient autograd returns for g is an expanded (stride 0) tensor."""

    def __init__(self):
        super().__init__()
        self.horizon = 1
        self.g = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))

    def initial(self, ctx):
        return ctx["f"]

    def step(self, t, x, ctx):
        return x * self.g.sum()


@pytest.mark.parametrize("solver", [bk.AutogradCostate(), bk.AdjointSweep(), bk.CheckpointedSweep(2)])
def test_backward_twice_with_an_expanded_gradient(solver):
    dyn, ctx = _ScaledBySum(), {"f": torch.randn(4, 3, dtype=torch.float64)}
    loss = lambda x: (x ** 2).sum()  # noqa: E731
    solver.backward(dyn, ctx, loss)
    solver.backward(dyn, ctx, loss)
    expected = torch.autograd.grad(2 * loss(dyn.rollout(ctx)[-1]), dyn.g)[0]
    assert_close(dyn.g.grad, expected, "g")


@pytest.mark.parametrize("solver", [bk.AutogradCostate(), bk.AdjointSweep(), bk.CheckpointedSweep(2)])
def test_loss_without_a_graph_is_a_clear_error(solver):
    dyn, ctx = _ScaledBySum(), {"f": torch.randn(4, 3, dtype=torch.float64)}
    with pytest.raises(ValueError, match="loss\\(x_T\\) has no autograd graph"):
        solver.solve(dyn, ctx, lambda x: torch.tensor(1.0, dtype=torch.float64))
