"""SENSE and coil operators: dot-product tests, normal operator, masking, shapes, errors."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from applications.mri.fft import fft2c, ifft2c
from applications.mri.operators import CoilOperator, SenseOperator, apply_mask, rss


def _randn(shape, g, dtype=torch.complex128):
    return torch.randn(shape, generator=g, dtype=dtype)


@st.composite
def problems(draw):
    """Random batch axes, coil count, odd/even image sizes and a 1-D (1, W) or 2-D (H, W) mask."""
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    c, h, w = draw(st.integers(1, 4)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    mask_shape = (1, w) if draw(st.booleans()) else (h, w)
    mask = torch.rand(mask_shape, generator=g, dtype=torch.float64)
    if draw(st.booleans()):  # binary (sampling), else weighted (M² ≠ M)
        mask = (mask < 0.5).double()
    return batch, c, h, w, mask, g


def _inner(a, b):
    return torch.vdot(a.flatten(), b.flatten())


@given(problems())
def test_sense_dot_product_and_normal(problem):
    batch, c, h, w, mask, g = problem
    op = SenseOperator(_randn((*batch, c, h, w), g), mask)
    v, y = _randn((*batch, h, w), g), _randn((*batch, c, h, w), g)
    torch.testing.assert_close(_inner(op.forward(v), y), _inner(v, op.adjoint(y)))
    torch.testing.assert_close(op.normal(v), op.adjoint(op.forward(v)))


@given(problems())
def test_coil_dot_product_and_normal(problem):
    batch, c, h, w, mask, g = problem
    op = CoilOperator(mask)
    u, y = _randn((*batch, c, h, w), g), _randn((*batch, c, h, w), g)
    torch.testing.assert_close(_inner(op.forward(u), y), _inner(u, op.adjoint(y)))
    torch.testing.assert_close(op.normal(u), op.adjoint(op.forward(u)))
    torch.testing.assert_close(op.normal(u), ifft2c(mask**2 * fft2c(u)))


def test_normal_differentiates_maps_and_mask_like_the_composition_and_can_be_reused():
    """Learned maps or masks: ``normal``'s gradients equal those of adjoint(forward(·)), also
    on a second call of the same operator (no cached graph is back-propagated twice)."""
    g = torch.Generator().manual_seed(5)
    sens = _randn((2, 3, 5, 6), g).requires_grad_()
    mask = torch.rand(1, 6, generator=g, dtype=torch.float64).requires_grad_()
    v, u = _randn((2, 5, 6), g), _randn((2, 3, 5, 6), g)
    sense, coil = SenseOperator(sens, mask), CoilOperator(mask)
    for _ in range(2):
        for op, x, inputs in ((sense, v, (sens, mask)), (coil, u, (mask,))):
            fast = torch.autograd.grad(op.normal(x).abs().pow(2).sum(), inputs)
            slow = torch.autograd.grad(op.adjoint(op.forward(x)).abs().pow(2).sum(), inputs)
            for a, b in zip(fast, slow):
                torch.testing.assert_close(a, b)


def test_sense_matches_definition_and_keeps_dtype():
    g = torch.Generator().manual_seed(0)
    sens, v = _randn((3, 5, 6), g, torch.complex64), _randn((5, 6), g, torch.complex64)
    mask = torch.tensor([[1.0, 0, 1, 1, 0, 1]], dtype=torch.float64)
    op = SenseOperator(sens, mask)
    y = op.forward(v)
    assert y.dtype == torch.complex64 and y.shape == (3, 5, 6)
    torch.testing.assert_close(y, mask.float() * fft2c(sens * v))
    torch.testing.assert_close(op.adjoint(y), (sens.conj() * ifft2c(mask.float() * y)).sum(0))


def test_per_sample_masks_broadcast_over_batch():
    g = torch.Generator().manual_seed(1)
    u = _randn((2, 3, 4, 5), g)
    masks = (torch.rand(2, 1, 1, 5, generator=g) < 0.5).double()
    out = CoilOperator(masks).forward(u)
    for b in range(2):
        torch.testing.assert_close(out[b], CoilOperator(masks[b, 0]).forward(u[b]))


def test_masking_leaves_no_negative_zero():
    k = torch.complex(-torch.ones(2, 4, 4, dtype=torch.float64), -torch.ones(2, 4, 4, dtype=torch.float64))
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    out = apply_mask(k, mask)
    unsampled = out[..., mask[0] == 0]
    assert not torch.signbit(unsampled.real).any() and not torch.signbit(unsampled.imag).any()


def test_rss():
    u = torch.tensor([[[3.0 + 0j]], [[0.0 + 4j]]])
    torch.testing.assert_close(rss(u), torch.tensor([[5.0]]))
    g = torch.Generator().manual_seed(2)
    sens = _randn((4, 5, 5), g)
    sens = sens / torch.linalg.vector_norm(sens, dim=0)
    v = _randn((5, 5), g)
    torch.testing.assert_close(rss(sens * v), v.abs())


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.ones(3, 5), "does not broadcast"),
        (torch.ones(4, 2), "does not broadcast"),
        (torch.ones(5), "at least 2 axes"),
        (torch.ones(4, 5, dtype=torch.complex64), "must be real"),
    ],
)
def test_bad_masks(mask, match):
    u = torch.zeros(2, 4, 5, dtype=torch.complex64)
    with pytest.raises(ValueError, match=match):
        CoilOperator(mask).forward(u)
    if mask.dim() >= 2 and not mask.is_complex():  # CG-SENSE and the network call only normal
        with pytest.raises(ValueError, match=match):
            CoilOperator(mask).normal(u)
        with pytest.raises(ValueError, match=match):
            SenseOperator(torch.ones(2, 4, 5, dtype=torch.complex64), mask).normal(u[0])


def test_bad_shapes():
    sens = torch.ones(2, 4, 5, dtype=torch.complex64)
    op = SenseOperator(sens, torch.ones(1, 5))
    with pytest.raises(ValueError, match="image shape"):
        op.forward(torch.ones(4, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="k-space shape"):
        op.adjoint(torch.ones(3, 4, 5, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex"):
        SenseOperator(sens.real, torch.ones(1, 5))
    with pytest.raises(ValueError, match="complex"):
        op.forward(torch.ones(4, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(3)
    sens, v = _randn((3, 6, 7), g), _randn((6, 7), g)
    mask = torch.ones(1, 7)  # stays on the CPU: the operator moves it
    op_gpu = SenseOperator(sens.cuda(), mask)
    torch.testing.assert_close(op_gpu.normal(v.cuda()).cpu(), SenseOperator(sens, mask).normal(v))

def test_coil_normal_follows_the_input_precision():
    """The uncentred M² kept by ``normal`` is re-made for another dtype: a complex64 call
    first must not round the next complex128 one."""
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(1, 7, generator=g, dtype=torch.float64) * 0.7 + 0.1  # weighted, M² ≠ M
    op = CoilOperator(mask)
    op.normal(torch.randn(2, 5, 7, generator=g, dtype=torch.complex64))
    u = torch.randn(2, 5, 7, generator=g, dtype=torch.complex128)
    torch.testing.assert_close(op.normal(u), ifft2c(mask**2 * fft2c(u)), rtol=1e-13, atol=1e-13)
