"""``Unrolled(compile=True)`` and the ``Dynamics.vjp`` override it is built on."""
import os
import shutil
import warnings

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevelkit as bk
from bilevelkit.hypergrad import InnerLoop, InnerOptimizer, Unrolled
from bilevelkit.testing import check_dynamics, relative_error

from .test_innerloop import mlp_problem

DT = torch.float64
GROUPS, WIDTH = 3, 4  # one shape for every compiled test: each new shape compiles again
compiler = pytest.mark.skipif(
    not (os.environ.get("CXX") or any(map(shutil.which, ("g++", "c++", "clang++")))),
    reason="torch.compile on CPU needs a C++ compiler")
# the two compiled routes: autograd through compiled steps, and a compiled costate sweep
routes = pytest.mark.parametrize("costate", [None, bk.AdjointSweep()], ids=["autograd", "sweep"])


@compiler
@settings(max_examples=12)
@given(st.integers(1, 8), st.sampled_from(["sgd", "momentum", "adam"]), st.booleans(),
       st.integers(0, 10**6), st.data())
def test_compiled_hypergradient_equals_plain_unrolled(k, optimizer, learn_lr, seed, data):
    """Compiled steps under autograd (no costate) and the compiled sweeps equal autograd
    through the eager steps."""
    problem = mlp_problem(GROUPS, WIDTH, seed=seed)
    ref = Unrolled(steps=k, lr=0.05, optimizer=optimizer, learn_lr=learn_lr)(*problem)
    c = data.draw(st.integers(1, k + 1), label="checkpoints")
    for costate in (None, bk.AdjointSweep(), bk.CheckpointedSweep(c)):  # None: autograd route
        res = Unrolled(steps=k, lr=0.05, optimizer=optimizer, costate=costate, learn_lr=learn_lr,
                       compile=True)(*problem)
        # Adam at k = 1: a hypergradient of ~1e-9 set by eps (Adam's first step is ≈ −lr·sign(g)),
        # which both routes compute from cancelling terms: 1e-15 absolute on top of 1e-10 relative
        torch.testing.assert_close(res.hypergrad, ref.hypergrad, rtol=1e-10, atol=1e-15,
                                   msg=lambda m: f"{costate}: {m}")
        assert res.outer_loss == pytest.approx(ref.outer_loss, rel=1e-12)
        for n in ref.params:
            assert relative_error(res.params[n], ref.params[n]) <= 1e-12
        if learn_lr:
            assert res.lr_grad == pytest.approx(ref.lr_grad, rel=1e-10, abs=1e-14)


@compiler
def test_compiled_inner_loop_passes_check_dynamics():
    """check_dynamics runs the sweeps (which use the compiled VJP) against autograd through
    the eager step."""
    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=1)
    loop = InnerLoop(inner_loss, params, omega, 4, 0.05, InnerOptimizer("adam"), "softmax",
                     learn_lr=True, compile=True)
    eager = InnerLoop(inner_loss, params, omega, 4, 0.05, InnerOptimizer("adam"), "softmax",
                      learn_lr=True)
    x = loop.initial(None)
    lam = torch.randn_like(x)
    x = eager.step(1, x, None).detach()
    lam_prev, grads = loop.vjp(2, x, lam, None)
    assert eager.vjp(2, x, lam, None) is None  # the eager loop leaves the VJP to autograd
    with torch.enable_grad():
        xs = x.clone().requires_grad_()
        ref = torch.autograd.grad(eager.step(2, xs, None), [xs, eager.omega, eager.lr], lam)
    assert relative_error(lam_prev, ref[0]) <= 1e-12
    assert relative_error(grads["omega"], ref[1]) <= 1e-12
    assert relative_error(grads["lr"], ref[2]) <= 1e-12
    check_dynamics(loop, None, lambda x: outer_loss(loop.unflatten(x)))


@compiler
def test_compiled_inner_loop_follows_changes_of_omega():
    """The compiled route keeps σ(ω) between steps; an in-place change of ω (an optimizer
    step) or a new dtype is seen at the next step."""
    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=11)
    loop = InnerLoop(inner_loss, params, omega, 2, 0.05, InnerOptimizer("sgd"), "softmax",
                     compile=True)
    eager = InnerLoop(inner_loss, params, omega, 2, 0.05, InnerOptimizer("sgd"), "softmax")
    x = loop.initial(None)
    for shift in (0.0, 0.5):
        with torch.no_grad():
            loop.omega[0] += shift
            eager.omega[0] += shift
            assert relative_error(loop.step(1, x, None), eager.step(1, x, None)) <= 1e-14
    lam = torch.randn_like(x)
    with torch.enable_grad():
        xs = x.clone().requires_grad_()
        ref = torch.autograd.grad(eager.step(1, xs, None), [eager.omega], lam)
    assert relative_error(loop.vjp(1, x, lam, None)[1]["omega"], ref[0]) <= 1e-12


@compiler
def test_compiled_inner_loop_makes_sigma_afresh_for_every_solve():
    """A change of ω that bypasses its version counter (``.data``) between two solves is seen:
    each solve starts at ``initial``, which drops the kept σ(ω)."""
    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=15)
    make = lambda c: InnerLoop(inner_loss, params, omega, 3, 0.05, InnerOptimizer("sgd"),  # noqa: E731
                               "softmax", compile=c, outer_loss=outer_loss)
    loop, eager = make(True), make(False)
    for shift in (0.0, 0.3):
        loop.omega.data[0] += shift
        eager.omega.data[0] += shift
        got = bk.AdjointSweep().solve(loop, None, loop.loss)
        ref = bk.AdjointSweep().solve(eager, None, eager.loss)
        assert relative_error(got.grads["omega"], ref.grads["omega"]) <= 1e-10
        assert float(got.loss) == pytest.approx(float(ref.loss), rel=1e-12)


@compiler
@pytest.mark.parametrize("solver", [bk.AdjointSweep(keep=True), bk.CheckpointedSweep(2, keep=True)],
                         ids=repr)
def test_fused_inner_loop_keeps_the_autograd_states_and_multipliers(solver):
    """keep=True through the compiled, fused InnerLoop: every x_t and λ_t (λ_T from the fused
    step) and the loss equal autograd through the eager loop."""
    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=16)
    make = lambda c: InnerLoop(inner_loss, params, omega, 3, 0.05, InnerOptimizer("adam"),  # noqa: E731
                               "softmax", learn_lr=True, compile=c, outer_loss=outer_loss)
    loop, eager = make(True), make(False)
    ref = bk.AutogradCostate(keep=True).solve(eager, None, eager.loss)
    res = solver.solve(loop, None, loop.loss)
    assert float(res.loss) == pytest.approx(float(ref.loss), rel=1e-12)
    for a, b in zip(res.states, ref.states, strict=True):
        assert relative_error(a, b) <= 1e-12
    for a, b in zip(res.multipliers, ref.multipliers, strict=True):
        assert relative_error(a, b) <= 1e-10
    for n in ref.grads:
        assert relative_error(res.grads[n], ref.grads[n]) <= 1e-10


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@compiler
def test_compiled_route_compiles_once_for_new_closures_and_horizons():
    torch._dynamo.reset()  # this test counts compilations from an empty cache
    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=2)

    def fresh():  # a new closure object of the same code every call, as a trainer makes
        return lambda p, w: inner_loss(p, w)

    method = Unrolled(steps=3, lr=0.05, optimizer="momentum", costate=bk.AdjointSweep(), compile=True)
    before = _graphs()
    method(fresh(), outer_loss, params, omega)
    graphs = _graphs()
    assert graphs == before + 3  # the forward step, its VJP, the fused last step
    for k in (2, 5):
        Unrolled(steps=k, lr=0.07, optimizer="momentum", costate=bk.AdjointSweep(),
                 compile=True)(fresh(), outer_loss, params, omega * k)
    assert _graphs() == graphs


@compiler
def test_compiled_autograd_route_runs_compiled_steps_only(monkeypatch):
    """No costate: every step is a compiled function (six graphs: the first step from a
    constant, one step, a run of ``_CHUNK`` steps, and the only step, the last step or the
    last run of ``_CHUNK`` steps fused with the outer loss and its VJP), reused for new
    closures and horizons; no eager step runs."""
    torch._dynamo.reset()
    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=15)
    steps = []
    monkeypatch.setattr(InnerLoop, "step", _spy(InnerLoop.step, lambda self, t, *a: steps.append(t)))
    before = _graphs()
    for k in (3, 1, 10, 6):
        res = Unrolled(steps=k, lr=0.05, optimizer="momentum", compile=True)(
            lambda p, w: inner_loss(p, w), outer_loss, params, omega)
        ref = Unrolled(steps=k, lr=0.05, optimizer="momentum")(inner_loss, outer_loss, params, omega)
        assert relative_error(res.hypergrad, ref.hypergrad) <= 1e-10
    assert _graphs() == before + 6
    assert steps == []


def _saved_bytes(x: torch.Tensor) -> int:
    """Bytes of the distinct storages the autograd graph of ``x`` keeps for its backward."""
    seen, stack, storages = set(), [x.grad_fn], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for t in getattr(node, "saved_tensors", None) or ():
            if isinstance(t, torch.Tensor):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(f for f, _ in node.next_functions)
    return sum(storages.values())


@compiler
def test_compiled_autograd_route_keeps_one_state_per_step():
    """Each compiled step keeps only its input state (and its step number) for its backward,
    which recomputes the activations: the graph grows by one state per step. (Keeping the
    activations, as torch.compile does by default, kept 6× as much on this problem.)"""
    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=18)
    state = sum(v.numel() for v in params.values()) * 8
    kept = {}
    for k in (2, 6):
        loop = InnerLoop(inner_loss, params, omega, k, 0.05, InnerOptimizer("sgd"), "softmax",
                         compile=True, outer_loss=outer_loss)
        kept[k] = _saved_bytes(loop._graph_rollout())
    assert (kept[6] - kept[2]) / 4 <= state + 16
    # a run of steps in one compiled call keeps only the run's input state
    chunked = InnerLoop(inner_loss, params, omega, 7, 0.05, InnerOptimizer("sgd"), "softmax",
                        compile=True, outer_loss=outer_loss, chunk=3)
    assert _saved_bytes(chunked._graph_rollout()) - kept[2] <= 2 * (state + 16)  # steps 2-4, 5-7


@compiler
@pytest.mark.parametrize("chunk", [2, 3])
def test_compiled_runs_of_steps_equal_plain_unrolled(chunk):
    """Runs of ``chunk`` steps per compiled call, the last ones shorter (single steps), give
    autograd's hypergradient through the eager steps."""
    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=21)
    for k in (2, 5, 6):
        ref = Unrolled(steps=k, lr=0.05, optimizer="adam", learn_lr=True)(
            inner_loss, outer_loss, params, omega)
        theta, om, _ = bk.hypergrad._prepare(params, omega, "softmax")
        loop = InnerLoop(inner_loss, theta, om, k, 0.05, InnerOptimizer("adam"), "softmax",
                         learn_lr=True, compile=True, outer_loss=outer_loss, chunk=chunk)
        res = loop.unrolled()
        assert relative_error(res.grads["omega"], ref.hypergrad) <= 1e-10
        assert float(res.grads["lr"]) == pytest.approx(ref.lr_grad, rel=1e-10)
        assert res.loss == pytest.approx(ref.outer_loss, rel=1e-12)


@compiler
@routes
def test_past_the_recompile_limit_the_steps_run_eagerly_and_exactly(monkeypatch, costate):
    """A captured Python number specialises the compiled step; once torch.compile keeps no
    more variants, the steps run eagerly (one warning) and the result is still exact."""
    torch._dynamo.reset()
    monkeypatch.setattr(bk.hypergrad, "_WARNED", set())
    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=5)
    with torch._dynamo.config.patch(recompile_limit=1):
        for i, c in enumerate((1e-3, 2e-3, 3e-3)):
            def loss(p, w, c=c):
                return inner_loss(p, w) + c * (p["W1"] ** 2).sum()

            args = (loss, outer_loss, params, omega)
            ref = Unrolled(steps=3, lr=0.05, optimizer="adam")(*args)
            method = Unrolled(steps=3, lr=0.05, optimizer="adam", costate=costate, compile=True)
            if i == 1:
                with pytest.warns(UserWarning, match="new variants run eagerly"):
                    res = method(*args)
            else:
                res = method(*args)
            assert relative_error(res.hypergrad, ref.hypergrad) <= 1e-10


@compiler
@routes
def test_compiled_step_takes_a_one_element_loss(costate):
    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=6)
    shaped = lambda p, w: inner_loss(p, w).reshape(1)  # noqa: E731 - accepted by the eager route
    ref = Unrolled(steps=2, lr=0.05, costate=bk.AdjointSweep())(shaped, outer_loss, params, omega)
    res = Unrolled(steps=2, lr=0.05, costate=costate, compile=True)(
        shaped, outer_loss, params, omega)
    assert relative_error(res.hypergrad, ref.hypergrad) <= 1e-10


@compiler
@routes
def test_compile_names_an_inner_loss_it_cannot_trace(costate):
    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=3)

    def untraceable(p, w):
        loss = inner_loss(p, w)
        return loss * 2 if loss.item() > 1e9 else loss  # data-dependent Python control flow

    with pytest.raises(RuntimeError, match=r"compile=True.*traceable.*compile=False"):
        Unrolled(steps=2, lr=0.05, costate=costate, compile=True)(
            untraceable, outer_loss, params, omega)


@compiler
@routes
def test_compiled_route_names_a_non_finite_inner_loss(costate):
    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=4)

    def blows_up(p, w):  # finite at θ⁰ (b1 = 0, checked eagerly), inf once b1 has moved
        return inner_loss(p, w) + torch.where(p["b1"].abs().sum() > 0, torch.inf, 0.0)

    with pytest.raises(FloatingPointError, match=r"inner_loss is inf at inner step 1"):
        Unrolled(steps=4, lr=0.05, costate=costate, compile=True)(
            blows_up, outer_loss, params, omega)
    if costate is None:  # step 1 inside a run of steps compiled as one call: under autograd
        for k in (10, 5):  # (steps 1-4 of 10), and fused with the outer loss (steps 1-4 of 5)
            with pytest.raises(FloatingPointError, match=r"inner_loss is inf at inner step 1\b"):
                Unrolled(steps=k, lr=0.05, compile=True)(blows_up, outer_loss, params, omega)


@compiler
@pytest.mark.parametrize("k", [1, 3])
def test_compiled_last_step_is_fused_with_the_outer_loss(monkeypatch, k):
    """Step k, the outer gradient and step k's VJP are one compiled call: step k is never
    evaluated on its own, and the result is the plain route's."""
    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=7)
    ref = Unrolled(steps=k, lr=0.05, optimizer="momentum")(inner_loss, outer_loss, params, omega)
    steps, fused = [], []
    monkeypatch.setattr(InnerLoop, "step", _spy(InnerLoop.step, lambda self, t, *a: steps.append(t)))
    monkeypatch.setattr(InnerLoop, "terminal_vjp",
                        _spy(InnerLoop.terminal_vjp, lambda self, *a: fused.append(True)))
    for costate in (bk.AdjointSweep(), bk.CheckpointedSweep(2)):
        steps.clear(), fused.clear()
        res = Unrolled(steps=k, lr=0.05, optimizer="momentum", costate=costate, compile=True)(
            inner_loss, outer_loss, params, omega)
        assert k not in steps and fused
        assert relative_error(res.hypergrad, ref.hypergrad) <= 1e-10
        assert res.outer_loss == pytest.approx(ref.outer_loss, rel=1e-12)


@compiler
@pytest.mark.parametrize("k", [5, 7, 10])
def test_compiled_last_run_of_steps_is_fused_with_the_outer_loss(monkeypatch, k):
    """No costate: the last run of ``_CHUNK`` steps, the outer gradient and the run's VJP are
    one compiled call outside autograd (its steps never run in a call under autograd, and
    ``outer_loss`` never runs eagerly); the earlier steps run under autograd, and the result
    (with Adam and a learned rate) is the plain route's."""
    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=22)
    ref = Unrolled(steps=k, lr=0.05, optimizer="adam", learn_lr=True)(
        inner_loss, outer_loss, params, omega)
    calls, outer = _record_calls(monkeypatch), []
    res = Unrolled(steps=k, lr=0.05, optimizer="adam", learn_lr=True, compile=True)(
        inner_loss, lambda p: outer.append(1) or outer_loss(p), params, omega)
    last = k - bk.hypergrad._CHUNK + 1  # the fused run's first step
    assert calls[-1] == ("_terminal_run_vjp", last)
    assert all(t < last for _, t in calls[:-1]) and calls[0] == ("_graph_first_phase", 1)
    assert outer == [1]  # traced once by torch.compile or its eager fallback, never run eagerly
    assert relative_error(res.hypergrad, ref.hypergrad) <= 1e-10
    assert res.lr_grad == pytest.approx(ref.lr_grad, rel=1e-10)
    assert res.outer_loss == pytest.approx(ref.outer_loss, rel=1e-12)


@compiler
def test_compiled_single_step_is_one_call_without_the_state_cotangent(monkeypatch):
    """No costate, one step: the step, the outer gradient and the step's VJP with respect to
    the weights and the rate only (x_0 is a constant) are the only compiled call, and the
    result (with Adam and a learned rate) is the plain route's."""
    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=22)
    ref = Unrolled(steps=1, lr=0.05, optimizer="adam", learn_lr=True)(
        inner_loss, outer_loss, params, omega)
    calls = _record_calls(monkeypatch)
    res = Unrolled(steps=1, lr=0.05, optimizer="adam", learn_lr=True, compile=True)(
        inner_loss, outer_loss, params, omega)
    assert calls == [("_only_step_vjp", 1)]
    # Adam at k = 1: a hypergradient of ~1e-8 set by eps, from cancelling terms (as in the
    # property test above): 1e-15 absolute on top of 1e-10 relative
    torch.testing.assert_close(res.hypergrad, ref.hypergrad, rtol=1e-10, atol=1e-15)
    assert res.lr_grad == pytest.approx(ref.lr_grad, rel=1e-10)
    assert res.outer_loss == pytest.approx(ref.outer_loss, rel=1e-12)
    for n in ref.params:
        assert relative_error(res.params[n], ref.params[n]) <= 1e-12


def _record_calls(monkeypatch) -> list:
    """The ``(function name, step)`` of every compiled call ``InnerLoop._call`` makes from now on."""
    calls = []
    call = InnerLoop._call

    def spy(self, fn, x, t, *rest, **kwargs):
        calls.append((fn.__name__, t))
        return call(self, fn, x, t, *rest, **kwargs)

    monkeypatch.setattr(InnerLoop, "_call", spy)
    return calls


def _spy(method, record):
    def spy(self, *args):
        record(self, *args)
        return method(self, *args)
    return spy


@compiler
@pytest.mark.parametrize("costate, k, fused", [
    (bk.AdjointSweep(), 2, "_terminal_vjp"), (None, 1, "_only_step_vjp"),
    (None, 2, "_terminal_vjp"), (None, 6, "_terminal_run_vjp")],
    ids=["sweep", "autograd-only-step", "autograd-step", "autograd-run"])
def test_an_outer_loss_torch_compile_cannot_trace_runs_unfused_and_exactly(
        monkeypatch, costate, k, fused):
    """The last step (or run of steps) and an outer loss torch.compile cannot trace are tried
    together once; then the steps run compiled, the outer loss eagerly, with the same result."""
    monkeypatch.setattr(bk.hypergrad, "_UNFUSED", set())
    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=8)

    def untraceable(p):
        value = outer_loss(p)
        return value * 2 if value.item() > 1e9 else value  # data-dependent Python control flow

    ref = Unrolled(steps=k, lr=0.05)(inner_loss, untraceable, params, omega)
    compiled = bk.hypergrad._compiled
    tried = []
    monkeypatch.setattr(bk.hypergrad, "_compiled",
                        lambda fn: tried.append(fn.__name__) or compiled(fn))
    for attempt in range(2):  # the second call does not try to compile it again
        tried.clear()
        res = Unrolled(steps=k, lr=0.05, costate=costate, compile=True)(
            inner_loss, untraceable, params, omega)
        assert relative_error(res.hypergrad, ref.hypergrad) <= 1e-10
        assert res.outer_loss == pytest.approx(ref.outer_loss, rel=1e-12)
        assert (fused in tried) == (attempt == 0)
    assert (inner_loss.__code__, untraceable.__code__) in bk.hypergrad._UNFUSED


@compiler
def test_compiled_route_takes_a_callable_object_as_outer_loss():
    """An unhashable callable (a dataclass instance) is identified by its __call__'s code."""
    import dataclasses

    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=12)

    @dataclasses.dataclass
    class Outer:
        scale: float

        def __call__(self, p):
            return self.scale * outer_loss(p)

    ref = Unrolled(steps=2, lr=0.05)(inner_loss, Outer(2.0), params, omega)
    res = Unrolled(steps=2, lr=0.05, costate=bk.AdjointSweep(), compile=True)(
        inner_loss, Outer(2.0), params, omega)
    assert relative_error(res.hypergrad, ref.hypergrad) <= 1e-10


@compiler
@routes
def test_compiled_route_names_a_malformed_inner_loss(costate):
    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=13)
    for k in (1, 2):
        with pytest.raises(ValueError, match="inner_loss must return a real one-element tensor"):
            Unrolled(steps=k, lr=0.05, costate=costate, compile=True)(
                lambda p, w: w * inner_loss(p, w), outer_loss, params, omega)


@compiler
@routes
def test_past_the_recompile_limit_a_malformed_inner_loss_is_named(costate):
    """The eager fallback checks the loss as the compiled call does."""
    torch._dynamo.reset()
    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=16)
    with torch._dynamo.config.patch(recompile_limit=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        Unrolled(steps=2, lr=0.05, costate=costate, compile=True)(inner_loss, outer_loss, params, omega)
        for bad in (lambda p, w: w * inner_loss(p, w), lambda p, w: 1.0):
            with pytest.raises(ValueError, match="inner_loss must return a real one-element tensor"):
                Unrolled(steps=2, lr=0.05, costate=costate, compile=True)(bad, outer_loss, params, omega)


@compiler
@routes
def test_compiled_adam_in_float32_rounds_as_the_eager_route(costate):
    """Adam's bias corrections 1 − βᵗ in float64 (as the eager route's Python floats), not in
    the parameters' float32 (which cost 1e-5 relative)."""
    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=17)
    p32 = {k: v.float() for k, v in params.items()}
    inner32 = lambda p, w: inner_loss({k: v.double() for k, v in p.items()}, w.double()).float()  # noqa: E731
    outer32 = lambda p: outer_loss({k: v.double() for k, v in p.items()}).float()  # noqa: E731
    args = (inner32, outer32, p32, omega.float())
    for k in (4, 1):  # k = 1: without a costate, the single call from the constant x_0
        ref = Unrolled(steps=k, lr=0.05, optimizer="adam")(*args)
        res = Unrolled(steps=k, lr=0.05, optimizer="adam", costate=costate, compile=True)(*args)
        assert res.hypergrad.dtype == torch.float32
        assert relative_error(res.hypergrad, ref.hypergrad) <= 2e-6
        for n in ref.params:
            assert relative_error(res.params[n], ref.params[n]) <= 2e-6


@compiler
def test_compiled_route_refuses_an_outer_loss_that_ignores_the_parameters():
    """As the eager sweep does (the compiled gradient would be zero, not an error)."""
    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=14)
    constant = lambda p: outer_loss({k: v.detach() for k, v in p.items()})  # noqa: E731
    for costate, compile in ((bk.AdjointSweep(), False), (bk.AdjointSweep(), True), (None, True)):
        with pytest.raises(ValueError, match="does not depend on"):
            Unrolled(steps=2, lr=0.05, costate=costate, compile=compile)(
                inner_loss, constant, params, omega)


@compiler
@routes
def test_compiled_route_names_a_non_finite_outer_loss(costate):
    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=9)
    with pytest.raises(FloatingPointError, match=r"outer_loss is inf after 2 inner steps"):
        Unrolled(steps=2, lr=0.05, costate=costate, compile=True)(
            inner_loss, lambda p: outer_loss(p) + torch.inf, params, omega)


@compiler
@routes
def test_compiled_route_refuses_omega_that_does_not_reach_inner_loss(costate):
    """The compiled route checks this only when the hypergradient is exactly zero."""
    inner_loss, outer_loss, params, omega = mlp_problem(GROUPS, WIDTH, seed=10)
    fixed = torch.full((GROUPS,), 1 / GROUPS, dtype=DT)
    with pytest.raises(ValueError, match="omega does not influence inner_loss"):
        Unrolled(steps=2, lr=0.05, costate=costate, compile=True)(
            lambda p, w: inner_loss(p, fixed), outer_loss, params, omega)


@pytest.mark.parametrize("costate", [None, bk.AdjointSweep()])
def test_compile_flag_is_a_bool(costate):
    with pytest.raises(ValueError, match="compile must be True or False"):
        Unrolled(steps=2, lr=0.1, costate=costate, compile="yes")


@compiler
@routes
@pytest.mark.parametrize("normalizer", ["softmax", "sparsemax"])
def test_trainer_with_compiled_hypergradients_matches_eager(normalizer, costate):
    """The trainer's inner loss (zero-weight groups left out before the call) compiles, and the
    run is the eager run's to rounding."""
    from .test_trainers import cleaning_problem, linear, mse

    train, val = cleaning_problem()
    out = []
    for compile in (False, True):
        trainer = bk.trainers.BilevelTrainer(
            linear(), mse, train, val, batch_size=32, normalizer=normalizer, meta_lr=0.5,
            hypergrad=Unrolled(steps=3, lr=0.1, costate=costate, compile=compile))
        trainer.fit(4)
        out.append(trainer.omega.clone())
    if normalizer == "sparsemax":
        assert (bk.normalizers.sparsemax(out[1]) == 0).any()  # the support did change
    torch.testing.assert_close(out[0], out[1], rtol=1e-10, atol=1e-12)


# --- Dynamics.vjp: a subclass's own adjoint -------------------------------------------------

class Linear(bk.Dynamics):
    """x_0 = b_0, x_t = A_t x_{t-1} + b_t; ``vjp`` hand-derived (``wrong`` breaks it)."""

    def __init__(self, T=3, n=4, wrong=False, reply=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.horizon, self.wrong, self.reply = T, wrong, reply
        self.A = torch.nn.Parameter(torch.randn(T, n, n, generator=g, dtype=DT) / 2)
        self.b = torch.nn.Parameter(torch.randn(T + 1, n, generator=g, dtype=DT))

    def initial(self, ctx):
        return self.b[0]

    def step(self, t, x, ctx):
        return self.A[t - 1] @ x + self.b[t]

    def vjp(self, t, x, lam, ctx):
        if self.reply is not None:
            return self.reply(t, x, lam)
        gb = torch.zeros_like(self.b)
        gb[t] = lam
        if t == 0:
            return None, {"b": gb}
        gA = torch.zeros_like(self.A)
        gA[t - 1] = torch.outer(lam, x) * (1.001 if self.wrong else 1)
        return self.A[t - 1].T @ lam, {"A": gA, "b": gb}


def _loss(x):
    return (x ** 2).sum()


def test_hand_written_vjp_is_used_and_exact():
    dyn = Linear()
    ref = bk.AutogradCostate().solve(dyn, None, _loss)
    for solver in (bk.AdjointSweep(), bk.CheckpointedSweep(2)):
        res = solver.solve(dyn, None, _loss)
        for n in ref.grads:
            assert relative_error(res.grads[n], ref.grads[n]) <= 1e-13
    check_dynamics(dyn, None, _loss)


def test_check_dynamics_catches_a_wrong_vjp():
    with pytest.raises(AssertionError):
        check_dynamics(Linear(wrong=True), None, _loss)


@pytest.mark.parametrize("reply, match", [
    (lambda t, x, lam: lam, r"Linear.vjp\(t=3, ...\) must return None or a pair"),
    (lambda t, x, lam: (lam[:2], {}), r"multiplier of shape \(2,\).*expected the state's shape \(4,\)"),
    (lambda t, x, lam: (lam.float(), {}), r"multiplier of shape \(4,\), dtype torch.float32.*expected "
                                          r"the state's shape \(4,\), dtype torch.float64"),
    (lambda t, x, lam: (lam, {"C": lam}), r"gradient for 'C', which is not a trainable parameter"),
    (lambda t, x, lam: (lam, {"A": lam}), r"gradient for 'A' of shape \(4,\).*expected the parameter's "
                                          r"shape \(3, 4, 4\)"),
    (lambda t, x, lam: (lam, {"b": torch.zeros(4, 4)}),
     r"gradient for 'b' of shape \(4, 4\), dtype torch.float32.*expected the parameter's shape "
     r"\(4, 4\), dtype torch.float64"),
])
def test_malformed_vjp_replies_are_named(reply, match):
    with pytest.raises(ValueError, match=match):
        bk.AdjointSweep().solve(Linear(reply=reply), None, _loss)


# --- Dynamics.terminal_vjp: the last phase fused with the loss ------------------------------

class Fused(Linear):
    """``Linear`` whose ``terminal_vjp`` evaluates the last phase once (``scale`` breaks λ_T,
    ``terminal`` rewrites the reply)."""

    def __init__(self, scale=1.0, terminal=None):
        super().__init__()
        self.scale, self.terminal, self.calls = scale, terminal, 0

    def terminal_vjp(self, x, loss, ctx):
        self.calls += 1
        x_T = self.step(self.horizon, x, ctx)
        with torch.enable_grad():
            leaf = x_T.detach().requires_grad_()
            value = loss(leaf)
            (lam_T,) = torch.autograd.grad(value, leaf)
        lam_T = lam_T * self.scale
        reply = (x_T, value.detach(), lam_T, *self.vjp(self.horizon, x, lam_T, ctx))
        return reply if self.terminal is None else self.terminal(reply)


def test_terminal_vjp_is_used_and_exact():
    dyn = Fused()
    ref = bk.AutogradCostate(keep=True).solve(dyn, None, _loss)
    for solver in (bk.AdjointSweep(keep=True), bk.CheckpointedSweep(2, keep=True)):
        calls = dyn.calls
        res = solver.solve(dyn, None, _loss)
        assert dyn.calls == calls + 1
        assert res.loss == pytest.approx(float(ref.loss), rel=1e-14)
        assert relative_error(res.states[-1], ref.states[-1]) <= 1e-14
        assert relative_error(res.multipliers[-1], ref.multipliers[-1]) <= 1e-14
        for n in ref.grads:
            assert relative_error(res.grads[n], ref.grads[n]) <= 1e-13
    check_dynamics(dyn, None, _loss)


@pytest.mark.parametrize("dyn", [
    Fused(scale=1.001),                                         # λ_T
    Fused(terminal=lambda r: (r[0] * 1.001, *r[1:])),           # x_T
    Fused(terminal=lambda r: (r[0], r[1] * 1.001, *r[2:])),     # ℓ(x_T)
], ids=["lambda_T", "x_T", "loss"])
def test_check_dynamics_catches_a_wrong_terminal_vjp(dyn):
    with pytest.raises(AssertionError):
        check_dynamics(dyn, None, _loss)


@pytest.mark.parametrize("terminal, match", [
    (lambda r: r[:4], r"Fused.terminal_vjp\(...\) must return None or \(x_T, loss"),
    (lambda r: (r[0][:2], *r[1:]), r"Fused.terminal_vjp\(...\) returned x_T of shape \(2,\)"),
    (lambda r: (r[0], r[1], r[2][:2], *r[3:]), r"returned lambda_T of shape \(2,\).*expected the state's"),
    (lambda r: (r[0], r[2], *r[2:]), r"Fused.terminal_vjp\(...\) returned a loss of shape \(4,\)"),
    (lambda r: (*r[:3], r[3][:2], r[4]), r"Fused.terminal_vjp\(...\) returned a multiplier of shape \(2,\)"),
    (lambda r: (*r[:4], {"C": r[2]}), r"Fused.terminal_vjp\(...\) returned a gradient for 'C'"),
])
def test_malformed_terminal_vjp_replies_are_named(terminal, match):
    with pytest.raises(ValueError, match=match):
        bk.AdjointSweep().solve(Fused(terminal=terminal), None, _loss)
