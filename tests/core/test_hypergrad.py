"""Hypergradient strategies against independent answers (float64).

Oracles: weighted ridge regression, whose lower level has the closed form
θ*(ω) = A(σ)⁻¹ c(σ); the adjoint recursion of ``Unrolled``'s docstring written out with
explicit gradients and Hessians (no autograd); the learning-to-reweight formula; torch.optim step by step; and
central finite differences of torch.optim-driven inner loops.
"""
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevelkit import hypergrad as hg
from bilevelkit import normalizers as nz

F64 = torch.float64


@dataclass
class Ridge:
    """inner(θ, w) = Σ_i w_i ‖X_i θ − y_i‖²/n_i + μ‖θ‖², outer(θ) = ‖X_v θ − y_v‖², θ = (a, b)."""

    X: list
    y: list
    Xv: torch.Tensor
    yv: torch.Tensor
    mu: float

    @staticmethod
    def make(groups: int, dim: int, seed: int, sizes=(3, 4, 5), mu: float = 0.3) -> "Ridge":
        g = torch.Generator().manual_seed(seed)
        n = [sizes[i % len(sizes)] for i in range(groups)]
        X = [torch.randn(k, dim, dtype=F64, generator=g) for k in n]
        y = [torch.randn(k, dtype=F64, generator=g) for k in n]
        Xv, yv = torch.randn(6, dim, dtype=F64, generator=g), torch.randn(6, dtype=F64, generator=g)
        return Ridge(X, y, Xv, yv, mu)

    @property
    def dim(self) -> int:
        return self.Xv.shape[1]

    @staticmethod
    def theta(params):
        return torch.cat([params["a"], params["b"]])

    @staticmethod
    def split(theta):
        return {"a": theta[:-1], "b": theta[-1:]}

    def group_losses(self, theta):
        return torch.stack([((X @ theta - y) ** 2).sum() / len(y) for X, y in zip(self.X, self.y)])

    def inner(self, params, weights):
        theta = self.theta(params)
        return (weights * self.group_losses(theta)).sum() + self.mu * (theta**2).sum()

    def outer(self, params):
        return ((self.Xv @ self.theta(params) - self.yv) ** 2).sum()

    # explicit derivatives, no autograd
    def group_grads(self, theta):  # (N, d): g_i = ∇ℓ_i
        return torch.stack([2 * X.T @ (X @ theta - y) / len(y) for X, y in zip(self.X, self.y)])

    def hessian(self, w):  # ∇²_θ inner
        curvature = sum(wi * 2 * X.T @ X / X.shape[0] for wi, X in zip(w, self.X))
        return curvature + 2 * self.mu * torch.eye(self.dim, dtype=F64)

    def grad(self, theta, w):
        return w @ self.group_grads(theta) + 2 * self.mu * theta

    def outer_grad(self, theta):
        return 2 * self.Xv.T @ (self.Xv @ theta - self.yv)

    def optimum(self, w):
        c = sum(wi * 2 * X.T @ y / len(y) for wi, X, y in zip(w, self.X, self.y))
        return torch.linalg.solve(self.hessian(w), c)

    def closed_form_hypergrad(self, omega, normalizer=nz.softmax):
        omega = omega.clone().requires_grad_()
        theta = self.optimum(normalizer(omega))
        return torch.autograd.grad(self.outer(self.split(theta)), omega)[0]

    def safe_lr(self, omega, normalizer=nz.softmax):
        return float(1 / torch.linalg.eigvalsh(self.hessian(normalizer(omega))).max())


def softmax_jacobian(s):
    return torch.diag(s) - torch.outer(s, s)


def omega_for(groups, seed):
    return torch.randn(groups, dtype=F64, generator=torch.Generator().manual_seed(seed + 100))


def start(problem):
    return problem.split(torch.zeros(problem.dim, dtype=F64))


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# --- Unrolled ------------------------------------------------------------------------------


def unrolled_by_hand(p: Ridge, omega, theta0, steps, lr):
    """Forward k SGD steps, then ``Unrolled``'s adjoint recursion with explicit Hessians."""
    s = torch.softmax(omega, 0)
    thetas = [theta0]
    for _ in range(steps):
        thetas.append(thetas[-1] - lr * p.grad(thetas[-1], s))
    adj = p.outer_grad(thetas[-1])
    h = torch.zeros_like(omega)
    for t in reversed(range(steps)):
        h = h - lr * softmax_jacobian(s).T @ (p.group_grads(thetas[t]) @ adj)
        adj = adj - lr * p.hessian(s) @ adj
    return h, thetas[-1]


@given(
    steps=st.integers(1, 6),
    groups=st.integers(1, 4),
    dim=st.integers(2, 4),
    seed=st.integers(0, 10_000),
    lr_scale=st.sampled_from([0.1, 0.5, 1.0, 1.9]),
)
@settings(max_examples=60)
def test_unrolled_equals_hand_written_reverse_mode(steps, groups, dim, seed, lr_scale):
    p = Ridge.make(groups, dim, seed)
    omega = omega_for(groups, seed)
    theta0 = torch.randn(dim, dtype=F64, generator=torch.Generator().manual_seed(seed + 1))
    lr = lr_scale * p.safe_lr(omega)
    res = hg.Unrolled(steps=steps, lr=lr)(p.inner, p.outer, p.split(theta0), omega)
    expected, theta_k = unrolled_by_hand(p, omega, theta0, steps, lr)
    torch.testing.assert_close(res.hypergrad, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(p.theta(res.params), theta_k, rtol=1e-12, atol=1e-12)
    assert res.outer_loss == pytest.approx(float(p.outer(res.params)), rel=1e-12)
    torch.testing.assert_close(res.weights, torch.softmax(omega, 0))
    assert res.hypergrad.shape == omega.shape and not res.hypergrad.requires_grad
    assert not any(v.requires_grad for v in res.params.values()) and res.residual is None


def test_unrolled_approaches_closed_form():
    p = Ridge.make(4, 3, seed=7)
    omega = omega_for(4, 7)
    exact = p.closed_form_hypergrad(omega)
    lr = p.safe_lr(omega)
    errors = [rel_err(hg.Unrolled(steps=k, lr=lr)(p.inner, p.outer, start(p), omega).hypergrad, exact)
              for k in (5, 20, 80, 320)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-8, errors


def torch_optim_outer(p: Ridge, omega, steps, lr, make_optimizer):
    """ℓ^val after `steps` torch.optim steps on inner(·, softmax(ω)), no graph."""
    theta = torch.zeros(p.dim, dtype=F64, requires_grad=True)
    opt = make_optimizer([theta], lr)
    w = torch.softmax(omega, 0)
    for _ in range(steps):
        opt.zero_grad()
        p.inner(p.split(theta), w).backward()
        opt.step()
    return float(p.outer(p.split(theta.detach())))


@pytest.mark.parametrize("optimizer,make", [
    ("sgd", lambda ps, lr: torch.optim.SGD(ps, lr=lr)),
    ("momentum", lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9)),
    ("adam", lambda ps, lr: torch.optim.Adam(ps, lr=lr)),
])
def test_unrolled_matches_finite_differences_of_torch_optim(optimizer, make):
    p = Ridge.make(3, 3, seed=11)
    omega = omega_for(3, 11)
    lr = 0.05 if optimizer == "adam" else 0.5 * p.safe_lr(omega)
    res = hg.Unrolled(steps=5, lr=lr, optimizer=optimizer)(p.inner, p.outer, start(p), omega)
    eps = 1e-6
    def f(om):
        return torch_optim_outer(p, om, 5, lr, make)

    fd = torch.tensor([(f(omega + eps * e) - f(omega - eps * e)) / (2 * eps) for e in torch.eye(3, dtype=F64)],
                      dtype=F64)
    assert rel_err(res.hypergrad, fd) < 1e-6
    assert res.outer_loss == pytest.approx(torch_optim_outer(p, omega, 5, lr, make), rel=1e-12)


# --- the inner optimizer step by step -------------------------------------------------------


@pytest.mark.parametrize("name,kwargs,make", [
    ("sgd", {}, lambda ps: torch.optim.SGD(ps, lr=0.1)),
    ("momentum", {"momentum": 0.9}, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    ("momentum", {"momentum": 0.5}, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.5)),
    ("adam", {}, lambda ps: torch.optim.Adam(ps, lr=0.1)),
    ("adam", {"betas": (0.5, 0.9), "eps": 1e-3},
     lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.5, 0.9), eps=1e-3)),
])
def test_inner_optimizer_equals_torch_optim(name, kwargs, make):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, dtype=F64, generator=g), torch.randn(8, 3, dtype=F64, generator=g)
    init = {"W": torch.randn(3, 4, dtype=F64, generator=g), "b": torch.randn(3, dtype=F64, generator=g)}

    def loss(params, weights):
        return weights.sum() * ((torch.tanh(x @ params["W"].T + params["b"]) - y) ** 2).mean()

    reference = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
    opt = make(list(reference.values()))
    inner = hg.InnerOptimizer(name, **kwargs)
    params, state = dict(init), inner.init(init)
    ones = torch.ones(1, dtype=F64)
    for step in range(1, 7):
        opt.zero_grad()
        loss(reference, ones).backward()
        opt.step()
        params, state = hg.inner_step(loss, {k: v.detach().requires_grad_() for k, v in params.items()},
                                      state, ones, 0.1, inner)
        assert state.step == step
        for k in init:
            torch.testing.assert_close(params[k], reference[k].detach(), rtol=1e-12, atol=1e-14)


def test_adam_with_zero_gradients_stays_finite():
    """A zero gradient (a parameter at its optimum, or unused) must not turn √v' into NaN."""
    p = Ridge.make(3, 3, seed=5)
    omega = omega_for(3, 5)

    def inner(params, weights):  # u = 1 is optimal for every weighting: g_u = 0, v_u = 0
        return p.inner(params, weights) + (weights * (params["u"] - 1) ** 2).sum()

    def outer(params):  # so that a cotangent reaches the Adam update of u
        return p.outer(params) + ((params["u"] - 2) ** 2).sum()

    extra = {"u": torch.ones(3, dtype=F64), "unused": torch.ones(2, dtype=F64)}
    method = hg.Unrolled(steps=4, lr=0.05, optimizer="adam")
    res = method(inner, outer, {**start(p), **extra}, omega)
    plain = method(p.inner, p.outer, start(p), omega)
    torch.testing.assert_close(res.hypergrad, plain.hypergrad, rtol=1e-12, atol=1e-14)
    assert torch.equal(res.params["u"], extra["u"])


# --- FirstOrder ----------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, 3])
def test_first_order_equals_learning_to_reweight_formula(steps):
    p = Ridge.make(4, 3, seed=3)
    omega = omega_for(4, 3)
    lr = 0.5 * p.safe_lr(omega)
    s = torch.softmax(omega, 0)
    theta = torch.zeros(p.dim, dtype=F64)
    for _ in range(steps):
        theta = theta - lr * p.grad(theta, s)
    lookahead = theta - lr * p.grad(theta, s)
    expected = -lr * softmax_jacobian(s).T @ (p.group_grads(theta) @ p.outer_grad(lookahead))
    res = hg.FirstOrder(steps=steps, lr=lr)(p.inner, p.outer, start(p), omega)
    torch.testing.assert_close(res.hypergrad, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(p.theta(res.params), lookahead, rtol=1e-12, atol=1e-14)
    assert res.outer_loss == pytest.approx(float(p.outer(p.split(lookahead))), rel=1e-12)


def test_first_order_is_unrolled_with_one_step():
    """From the same θ, one look-ahead step is one unrolled step (θ⁰ is a constant in both)."""
    p = Ridge.make(3, 4, seed=9)
    omega = omega_for(3, 9)
    theta = start(p)
    a = hg.FirstOrder(steps=0, lr=0.1)(p.inner, p.outer, theta, omega)
    b = hg.Unrolled(steps=1, lr=0.1)(p.inner, p.outer, theta, omega)
    torch.testing.assert_close(a.hypergrad, b.hypergrad, rtol=1e-12, atol=1e-14)


# --- WeightedSum: the inner loss term by term -----------------------------------------------


def terms(p: Ridge, groups=None, square=lambda r: r**2):
    """p's group losses as a WeightedSum (μ = 0: no term outside the weighted sum)."""
    groups = range(len(p.X)) if groups is None else groups
    return hg.WeightedSum({i: (lambda q, X=p.X[i], y=p.y[i]: square(X @ p.theta(q) - y).sum() / len(y))
                           for i in groups})


NORMALIZERS = {"softmax": nz.softmax, "sparsemax": nz.sparsemax, "entmax15": nz.entmax15}


@given(
    method=st.sampled_from(["unrolled", "momentum", "first-order", "first-order-3"]),
    normalizer=st.sampled_from(sorted(NORMALIZERS)),
    groups=st.integers(1, 5),
    seed=st.integers(0, 10_000),
    scale=st.sampled_from([0.3, 1.0, 4.0]),
)
@settings(max_examples=60, deadline=None)
def test_one_step_look_ahead_from_the_terms_equals_autograd(method, normalizer, groups, seed, scale):
    """The look-ahead from the groups' gradients (no double backward) equals reverse mode
    through the same step on the summed loss, for the groups a normalizer keeps."""
    p = Ridge.make(groups, 3, seed=seed, mu=0.0)
    omega = scale * omega_for(groups, seed)
    sigma = NORMALIZERS[normalizer]
    lr = 0.5 / max(1.0, float(torch.linalg.eigvalsh(p.hessian(sigma(omega))).max()))
    method = {"unrolled": hg.Unrolled(1, lr), "first-order": hg.FirstOrder(0, lr),
              "momentum": hg.Unrolled(1, lr, optimizer="momentum"),
              "first-order-3": hg.FirstOrder(3, lr)}[method]
    kept = [i for i, w in enumerate(sigma(omega).tolist()) if w > 0]
    ws = terms(p, kept)
    theta = p.split(torch.randn(p.dim, dtype=F64, generator=torch.Generator().manual_seed(seed)))
    fast = method(ws, p.outer, theta, omega, normalizer=sigma)
    slow = method(lambda q, w: ws(q, w), p.outer, theta, omega, normalizer=sigma)
    torch.testing.assert_close(fast.hypergrad, slow.hypergrad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(p.theta(fast.params), p.theta(slow.params), rtol=1e-12, atol=1e-14)
    assert fast.outer_loss == pytest.approx(slow.outer_loss, rel=1e-12)


class OnceSquare(torch.autograd.Function):
    """x² whose backward cannot itself be differentiated."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


@pytest.mark.parametrize("method", [hg.Unrolled(1, 0.1), hg.FirstOrder(2, 0.1)],
                         ids=lambda m: type(m).__name__)
def test_look_ahead_from_the_terms_needs_first_derivatives_only(method):
    """Each group's gradient is a plain backward pass: a loss differentiable only once works,
    and gives the learning-to-reweight formula, where reverse mode through the step cannot."""
    p = Ridge.make(4, 3, seed=5, mu=0.0)
    omega = omega_for(4, 5)
    ws = terms(p, square=OnceSquare.apply)
    res = method(ws, p.outer, start(p), omega)
    s = torch.softmax(omega, 0)
    theta = torch.zeros(p.dim, dtype=F64)
    for _ in range(getattr(method, "steps") - (1 if isinstance(method, hg.Unrolled) else 0)):
        theta = theta - 0.1 * p.grad(theta, s)
    lookahead = theta - 0.1 * p.grad(theta, s)
    expected = -0.1 * softmax_jacobian(s).T @ (p.group_grads(theta) @ p.outer_grad(lookahead))
    torch.testing.assert_close(res.hypergrad, expected, rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="no autograd path to omega.*once_differentiable"):
        method(lambda q, w: ws(q, w), p.outer, start(p), omega)  # autograd would give zeros


@pytest.mark.parametrize("method", [hg.Unrolled(3, 0.1), hg.Unrolled(1, 0.1, optimizer="adam"),
                                    hg.Implicit(2, 0.1, iters=5)], ids=str)
def test_other_strategies_take_the_weighted_sum_as_a_loss(method):
    p = Ridge.make(3, 3, seed=2, mu=0.0)
    omega = omega_for(3, 2)
    a = method(terms(p), p.outer, start(p), omega)
    b = method(lambda q, w: (w * p.group_losses(p.theta(q))).sum(), p.outer, start(p), omega)
    torch.testing.assert_close(a.hypergrad, b.hypergrad, rtol=1e-10, atol=1e-13)


def test_weighted_sum_errors_name_the_group():
    p = Ridge.make(3, 3, seed=2, mu=0.0)
    for bad in ({}, [lambda q: q], {-1: lambda q: q}, {0: "loss"}, {True: lambda q: q}):
        with pytest.raises(ValueError, match="WeightedSum"):
            hg.WeightedSum(bad)
    with pytest.raises(ValueError, match=r"groups \[0, 1, 2, 5\].*shape \(3,\)"):
        hg.Unrolled(1, 0.1)(hg.WeightedSum({**terms(p).losses, 5: lambda q: q["b"].sum()}),
                            p.outer, start(p), omega_for(3, 2))
    broken = hg.WeightedSum({**terms(p).losses, 1: lambda q: q["b"].sum() * float("nan")})
    for method in (hg.Unrolled(1, 0.1), hg.FirstOrder(0, 0.1)):
        with pytest.raises(FloatingPointError, match="the term of group 1.*nan at inner step 0"):
            method(broken, p.outer, start(p), omega_for(3, 2))
    with pytest.raises(ValueError, match="shape \\(3, 2\\)"):
        hg.FirstOrder(0, 0.1)(terms(p), p.outer, start(p), torch.zeros(3, 2, dtype=F64))


# --- Implicit ------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["cg", "neumann"])
@pytest.mark.parametrize("normalizer", ["softmax", "sparsemax", "entmax15"])
def test_implicit_at_optimum_equals_closed_form(solver, normalizer):
    p = Ridge.make(4, 4, seed=1)
    omega = torch.tensor([0.6, 0.3, -0.9, 0.1], dtype=F64)
    sigma = nz.get(normalizer)
    exact = p.closed_form_hypergrad(omega, sigma)
    theta_star = p.split(p.optimum(sigma(omega)))
    lr = p.safe_lr(omega, sigma)
    iters = 6 if solver == "cg" else 400
    method = hg.Implicit(steps=0, lr=lr, solver=solver, iters=iters)
    res = method(p.inner, p.outer, theta_star, omega, normalizer=normalizer)
    assert rel_err(res.hypergrad, exact) < 1e-6
    assert res.residual < 1e-8
    if normalizer == "sparsemax":
        assert (res.weights == 0).any() and (res.hypergrad[res.weights == 0] == 0).all()


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_implicit_after_inner_steps_equals_closed_form(solver):
    p = Ridge.make(3, 3, seed=2)
    omega = omega_for(3, 2)
    lr = p.safe_lr(omega)
    method = hg.Implicit(steps=600, lr=lr, solver=solver, iters=5 if solver == "cg" else 400)
    res = method(p.inner, p.outer, start(p), omega)
    torch.testing.assert_close(p.theta(res.params), p.optimum(torch.softmax(omega, 0)), rtol=1e-10, atol=1e-12)
    assert rel_err(res.hypergrad, p.closed_form_hypergrad(omega)) < 1e-6


def test_implicit_damping_and_residual():
    """Damping solves (H + δI) v = ∇ℓ^val; too few Neumann terms show up in the residual."""
    p = Ridge.make(3, 3, seed=4)
    omega = omega_for(3, 4)
    s = torch.softmax(omega, 0)
    theta = p.optimum(s)
    v = torch.linalg.solve(p.hessian(s) + 0.5 * torch.eye(3, dtype=F64), p.outer_grad(theta))
    expected = -softmax_jacobian(s).T @ (p.group_grads(theta) @ v)
    res = hg.Implicit(steps=0, lr=0.1, iters=10, damping=0.5)(p.inner, p.outer, p.split(theta), omega)
    torch.testing.assert_close(res.hypergrad, expected, rtol=1e-10, atol=1e-12)
    short = hg.Implicit(steps=0, lr=0.5 * p.safe_lr(omega), solver="neumann", iters=2)
    assert short(p.inner, p.outer, p.split(theta), omega).residual > 1e-3


def test_implicit_rejects_negative_curvature():
    def concave(params, weights):
        return -(weights.sum() * (params["x"] ** 2).sum())

    with pytest.raises(ValueError, match="non-positive curvature"):
        hg.Implicit(steps=0, lr=0.1)(concave, lambda q: (q["x"] ** 2).sum(), {"x": torch.ones(2, dtype=F64)},
                                     torch.zeros(2, dtype=F64))


# --- shapes, normalizers, call conventions ---------------------------------------------------


METHODS = [
    hg.Unrolled(steps=3, lr=0.1),
    hg.Unrolled(steps=3, lr=0.05, optimizer="adam"),
    hg.FirstOrder(steps=2, lr=0.1),
    hg.Implicit(steps=50, lr=0.1, iters=10),
]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_matrix_omega_is_column_by_column(method):
    """Ω (N×M): task j has its own θ_j trained with column j; d/dΩ[:, j] is the vector case."""
    tasks = [Ridge.make(3, 3, seed=s) for s in (20, 21)]
    for t in tasks[1:]:
        t.X, t.y = tasks[0].X, tasks[0].y  # same training groups, different validation sets
    omega = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))

    def inner(params, W):
        return sum(t.inner(params[f"t{j}"], W[:, j]) for j, t in enumerate(tasks))

    def outer(params):
        return sum(t.outer(params[f"t{j}"]) for j, t in enumerate(tasks))

    params = {f"t{j}": {"a": torch.zeros(2, dtype=F64), "b": torch.zeros(1, dtype=F64)} for j in range(2)}
    flat = {f"{j}.{k}": v for j, d in params.items() for k, v in d.items()}

    def nest(f):
        return lambda q, *w: f({j: {k: q[f"{j}.{k}"] for k in ("a", "b")} for j in params}, *w)

    res = method(nest(inner), nest(outer), flat, omega)
    assert res.hypergrad.shape == omega.shape and res.weights.shape == omega.shape
    for j, t in enumerate(tasks):
        col = method(t.inner, t.outer, params[f"t{j}"], omega[:, j])
        torch.testing.assert_close(res.hypergrad[:, j], col.hypergrad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_normalizer_by_name_or_callable(method):
    p = Ridge.make(4, 3, seed=6)
    omega = torch.tensor([0.6, 0.3, -0.9, 0.1], dtype=F64)
    by_name = method(p.inner, p.outer, start(p), omega, normalizer="entmax15")
    by_callable = method(p.inner, p.outer, start(p), omega, normalizer=nz.entmax15)
    torch.testing.assert_close(by_name.hypergrad, by_callable.hypergrad, rtol=0, atol=0)
    hot = method(p.inner, p.outer, start(p), omega, normalizer=lambda w: nz.softmax(w, temperature=0.5))
    torch.testing.assert_close(hot.weights, torch.softmax(2 * omega, 0))
    with torch.no_grad():  # strategies switch gradients on themselves
        again = method(p.inner, p.outer, start(p), omega, normalizer="entmax15")
    torch.testing.assert_close(again.hypergrad, by_name.hypergrad, rtol=0, atol=0)


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_omega_that_does_not_reach_the_inner_loss_is_an_error(method):
    p = Ridge.make(3, 3, seed=8)
    omega = omega_for(3, 8)
    captured = torch.softmax(omega, 0)  # the classic closure bug: weights not taken from the argument

    def closure_bug(params, weights):
        return p.inner(params, captured)

    with pytest.raises(ValueError, match="omega does not influence inner_loss"):
        method(closure_bug, p.outer, start(p), omega)
    with pytest.raises(ValueError, match="omega does not influence inner_loss"):
        method(lambda q, w: p.inner(q, w.detach()), p.outer, start(p), omega)
    with pytest.raises(ValueError, match="normalizer"):
        method(p.inner, p.outer, start(p), omega, normalizer=lambda w: torch.softmax(w.detach(), 0))


@pytest.mark.parametrize("method", METHODS + [hg.Unrolled(1, 0.1), hg.FirstOrder(0, 0.1)],
                         ids=lambda m: f"{type(m).__name__}{m.steps}")
def test_a_hypergradient_that_would_be_silently_zero_is_an_error(method):
    """Weights that reach inner_loss but not its gradient, and an outer_loss that ignores θ,
    are refused (with the loss as a WeightedSum too), as the sweeps refuse them."""
    p = Ridge.make(3, 3, seed=8)
    omega = omega_for(3, 8)
    uniform = torch.full((3,), 1 / 3, dtype=F64)
    with pytest.raises(ValueError, match="no autograd path to omega"):
        method(lambda q, w: p.inner(q, uniform) + w.sum(), p.outer, start(p), omega)
    ignores = lambda q: p.outer({k: v.detach() for k, v in q.items()})  # noqa: E731
    for inner in (p.inner, terms(Ridge.make(3, 3, seed=8, mu=0.0))):
        with pytest.raises(ValueError, match="outer_loss does not depend on the inner parameters"):
            method(inner, ignores, start(p), omega)


@pytest.mark.parametrize("make", [
    lambda: hg.Unrolled(steps=0, lr=0.1),
    lambda: hg.Unrolled(steps=2, lr=0.0),
    lambda: hg.Unrolled(steps=2, lr=0.1, optimizer="rmsprop"),
    lambda: hg.Unrolled(steps=2, lr=0.1, optimizer="momentum", momentum=1.0),
    lambda: hg.Unrolled(steps=2, lr=0.1, optimizer="adam", betas=(0.9, 1.0)),
    lambda: hg.Unrolled(steps=2, lr=0.1, optimizer="adam", eps=0.0),
    lambda: hg.FirstOrder(steps=-1, lr=0.1),
    lambda: hg.FirstOrder(steps=1.5, lr=0.1),
    lambda: hg.FirstOrder(steps=1, lr=-1.0),
    lambda: hg.Implicit(steps=1, lr=float("nan")),
    lambda: hg.Implicit(steps=1, lr=0.1, solver="lu"),
    lambda: hg.Implicit(steps=1, lr=0.1, iters=0),
    lambda: hg.Implicit(steps=1, lr=0.1, damping=-1.0),
    lambda: hg.Implicit(steps=1, lr=0.1, tol=-1.0),
    lambda: hg.Implicit(steps=1, lr=0.1, damping=float("inf")),
    lambda: hg.Implicit(steps=1, lr=0.1, iters=True),
    lambda: hg.Unrolled(steps=2, lr=0.1, optimizer="adam", eps=float("inf")),
])
def test_bad_settings(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_bad_arguments(method):
    p = Ridge.make(3, 3, seed=8)
    omega = omega_for(3, 8)
    integer = {"a": torch.zeros(2, dtype=torch.long), "b": torch.zeros(1)}
    for params in ([torch.zeros(3, dtype=F64)], {}, integer):
        with pytest.raises(ValueError, match="params"):
            method(p.inner, p.outer, params, omega)
    for bad in (torch.tensor([1, 2, 3]), [0.0, 0.0, 0.0]):
        with pytest.raises(ValueError, match="omega"):
            method(p.inner, p.outer, start(p), bad)
    with pytest.raises(ValueError, match="one-element"):
        method(lambda q, w: w * p.inner(q, w), p.outer, start(p), omega)
    elsewhere = {k: v.to("meta") for k, v in start(p).items()}  # another device, on any machine
    with pytest.raises(ValueError, match="params and omega must be on one device"):
        method(p.inner, p.outer, elsewhere, omega)
    with pytest.raises(FloatingPointError, match="outer_loss is nan"):
        method(p.inner, lambda q: p.outer(q) * float("nan"), start(p), omega)


@pytest.mark.parametrize("make", [
    lambda: hg.Unrolled(steps=5, lr=1e200),
    lambda: hg.FirstOrder(steps=5, lr=1e200),
    lambda: hg.Implicit(steps=5, lr=1e200),
])
def test_diverging_inner_loop_names_the_step(make):
    p = Ridge.make(3, 3, seed=8)
    with pytest.raises(FloatingPointError, match="inner_loss is inf at inner step 1"):
        make()(p.inner, p.outer, p.split(torch.ones(3, dtype=F64)), omega_for(3, 8))
