"""Normalizers: simplex, sparsity, shift invariance, gradients, and an independent oracle.

The oracle for sparsemax / entmax-1.5 is bisection on the threshold τ of
p = [x − τ]₊^{1/(α−1)}, which shares nothing with the sort-based implementation.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevelkit import normalizers as nz

ALL = [nz.softmax, nz.sparsemax, nz.entmax15]
SPARSE = [nz.sparsemax, nz.entmax15]


def bisection(w: torch.Tensor, dim: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparsemax (Σ[w − τ]₊ = 1) or entmax-1.5 (Σ[w/2 − τ]₊² = 1) by bisection: (p, τ)."""
    x = (w if kind == "sparsemax" else w / 2).movedim(dim, -1)
    power = 1 if kind == "sparsemax" else 2
    hi = x.amax(-1, keepdim=True)
    lo = hi - 1  # the mass is ≥ 1 there and 0 at hi
    for _ in range(200):
        mid = (lo + hi) / 2
        heavy = (x - mid).clamp(min=0).pow(power).sum(-1, keepdim=True) > 1
        lo, hi = torch.where(heavy, mid, lo), torch.where(heavy, hi, mid)
    tau = (lo + hi) / 2
    return (x - tau).clamp(min=0).pow(power).movedim(-1, dim), tau.movedim(-1, dim)


@st.composite
def scores(draw):
    """Vectors or matrices, a valid dim, with ties (integers) and scales up to 1e6."""
    shape = draw(st.one_of(
        st.tuples(st.integers(1, 7)),
        st.tuples(st.integers(1, 5), st.integers(1, 5)),
    ))
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    n = 1
    for s in shape:
        n *= s
    entry = st.one_of(st.integers(-3, 3).map(float), st.floats(-3, 3, allow_nan=False))
    values = draw(st.lists(entry, min_size=n, max_size=n))
    scale = draw(st.sampled_from([1e-3, 0.5, 1.0, 2.0, 10.0, 1e3, 1e6]))
    return torch.tensor(values, dtype=torch.float64).reshape(shape) * scale, dim


@given(scores(), st.floats(-1e3, 1e3))
@settings(max_examples=150)
def test_simplex_oracle_and_shift_invariance(case, shift):
    w, dim = case
    for f in ALL:
        p = f(w, dim=dim)
        assert p.shape == w.shape and p.dtype == w.dtype
        assert torch.isfinite(p).all() and (p >= 0).all()
        torch.testing.assert_close(p.sum(dim), torch.ones_like(p.sum(dim)), rtol=0, atol=1e-12)
        torch.testing.assert_close(f(w + shift, dim=dim), p, rtol=0, atol=1e-8)
    for f, kind in [(nz.sparsemax, "sparsemax"), (nz.entmax15, "entmax15")]:
        p = f(w, dim=dim)
        ref, tau = bisection(w, dim, kind)
        torch.testing.assert_close(p, ref, rtol=0, atol=1e-8)
        x = w if kind == "sparsemax" else w / 2
        clearly_outside = x < tau - 1e-6 * (1 + x.abs())
        assert (p[clearly_outside] == 0).all()  # exact zeros, not tiny positives


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
def test_oracle_on_many_random_columns(scale):
    w = scale * torch.randn(7, 2000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for f, kind in [(nz.sparsemax, "sparsemax"), (nz.entmax15, "entmax15")]:
        torch.testing.assert_close(f(w), bisection(w, 0, kind)[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("f", ALL)
@pytest.mark.parametrize("shape,dim", [((6,), 0), ((5, 3), 0), ((5, 3), 1), ((2, 3, 4), -1)])
def test_gradcheck(f, shape, dim):
    # Random normal scores: no entry sits on a support boundary (a tie point), a.s.
    g = torch.Generator().manual_seed(3)
    w = (0.7 * torch.randn(shape, dtype=torch.float64, generator=g)).requires_grad_()
    support = (f(w, dim=dim) > 0).sum(dim)
    if f is not nz.softmax:
        assert (support >= 1).all() and (support < w.shape[dim]).any()  # a nontrivial support
    assert torch.autograd.gradcheck(lambda v: f(v, dim=dim), (w,))
    if f is not nz.softmax:  # the custom backward is itself differentiable (Hessians of σ)
        assert torch.autograd.gradgradcheck(lambda v: f(v, dim=dim), (w,))


@pytest.mark.parametrize("f", SPARSE)
def test_backward_lives_on_the_support(f):
    w = torch.tensor([[1.2, 0.1], [1.0, -2.0], [-3.0, 0.3], [0.9, 0.2]], dtype=torch.float64)
    w.requires_grad_()
    p = f(w)
    (grad,) = torch.autograd.grad((p * torch.arange(8.0, dtype=w.dtype).view(4, 2)).sum(), w)
    assert (p == 0).any()
    assert (grad[p == 0] == 0).all()
    torch.testing.assert_close(grad.sum(0), torch.zeros(2, dtype=w.dtype), rtol=0, atol=1e-12)


@pytest.mark.parametrize("f", ALL)
def test_torch_func_and_columns(f):
    w = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    columns = torch.stack([f(w[:, j]) for j in range(3)], dim=1)
    torch.testing.assert_close(f(w), columns, rtol=0, atol=1e-15)
    jac = torch.func.jacrev(f)(w[:, 0])
    torch.testing.assert_close(jac, torch.autograd.functional.jacobian(f, w[:, 0]))


def test_known_values():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(nz.sparsemax(t(1.0, 0.8, -5.0)), t(0.6, 0.4, 0.0), rtol=0, atol=1e-15)
    assert torch.equal(nz.sparsemax(t(0.0, 0.5, 2.0)), t(0.0, 0.0, 1.0))
    torch.testing.assert_close(nz.entmax15(t(1e6, 1e6, 0.0)), t(0.5, 0.5, 0.0), rtol=0, atol=1e-15)
    assert torch.equal(nz.sparsemax(t(7.0)), t(1.0))
    torch.testing.assert_close(nz.softmax(t(0.0, 2.0), temperature=2.0), torch.softmax(t(0.0, 1.0), 0))
    rows = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for dim in (0, 1):  # the temperature path along either axis of a matrix
        torch.testing.assert_close(nz.softmax(rows, dim=dim, temperature=0.5),
                                   torch.softmax(rows / 0.5, dim=dim), rtol=1e-14, atol=0)
    # entmax-1.5 of two scores a ≥ b with a − b < 2: τ solves (a/2 − τ)² + (b/2 − τ)² = 1.
    p = nz.entmax15(t(0.4, 0.0))
    d = 0.2
    torch.testing.assert_close(p, t((d + (2 - d**2) ** 0.5) ** 2 / 4, (-d + (2 - d**2) ** 0.5) ** 2 / 4))
    extreme = t(1e308, -1e308, 1e308)  # differences overflow to -inf: still no NaN
    overflowing_sum = t(1e308, 1e308, 0.0)  # finite scores whose sum is inf
    for f in ALL:
        torch.testing.assert_close(f(extreme), t(0.5, 0.0, 0.5), rtol=0, atol=1e-15)
        torch.testing.assert_close(f(overflowing_sum), t(0.5, 0.5, 0.0), rtol=0, atol=1e-15)
    x32 = torch.tensor([0.3, -0.2, 0.1])
    for f in ALL:
        assert f(x32).dtype == torch.float32


@pytest.mark.parametrize("f", ALL)
def test_bad_input(f):
    with pytest.raises(ValueError, match="NaN or Inf"):
        f(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        f(torch.tensor([[0.0, float("inf")]]), dim=1)
    with pytest.raises(ValueError, match="empty"):
        f(torch.empty(0))
    with pytest.raises(ValueError, match="empty"):
        f(torch.empty(3, 0), dim=1)
    with pytest.raises(ValueError, match="0-d"):
        f(torch.tensor(1.0))
    with pytest.raises(ValueError, match="out of range"):
        f(torch.zeros(3), dim=1)
    with pytest.raises(ValueError, match="floating"):
        f(torch.tensor([1, 2]))
    with pytest.raises(TypeError):
        f([0.0, 1.0])


def test_temperature_and_get():
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            nz.softmax(torch.zeros(3), temperature=temperature)
    assert nz.get("softmax") is nz.softmax
    assert nz.get("sparsemax") is nz.sparsemax
    assert nz.get("entmax15") is nz.entmax15
    custom = lambda w: nz.softmax(w, temperature=0.5)  # noqa: E731
    assert nz.get(custom) is custom
    with pytest.raises(ValueError, match="softmax, sparsemax, entmax15"):
        nz.get("sparsemax2")
    with pytest.raises(ValueError):
        nz.get(None)


def test_extreme_but_finite_scores():
    """Large scores at a small temperature, and a long column of near-ties in float32 (where
    entmax's support test, written as cumulative sums, once lost all its digits)."""
    p = nz.softmax(torch.tensor([1e38, 0.0]), temperature=0.1)
    assert torch.equal(p, torch.tensor([1.0, 0.0]))
    ties = torch.cat([torch.zeros(1), torch.full((200_000,), -2.02)])
    for f in ALL:
        p = f(ties)
        assert p.dtype == torch.float32 and bool(torch.isfinite(p).all()) and bool((p >= 0).all())
        assert float(p.double().sum()) == pytest.approx(1.0, abs=1e-4), f.__name__  # float32 rounding
    oracle, _ = bisection(ties.double(), 0, "entmax15")
    torch.testing.assert_close(nz.entmax15(ties).double(), oracle, atol=1e-6, rtol=0)
