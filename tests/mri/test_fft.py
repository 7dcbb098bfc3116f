"""fft2c / ifft2c: numpy reference (odd and even sizes), inverse, unitarity, centred origin."""
import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from applications.mri.fft import fft2c, ifft2c

shapes = st.tuples(
    st.lists(st.integers(1, 3), max_size=2),  # batch axes
    st.integers(1, 9),
    st.integers(1, 9),
)


def _random(shape, seed, dtype=torch.complex128):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


def _reference(x: np.ndarray) -> np.ndarray:
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=axes), axes=axes, norm="ortho"), axes=axes)


@given(shapes, st.integers(0, 2**16), st.sampled_from([torch.complex64, torch.complex128]))
def test_fft2c_matches_numpy_reference(shape, seed, dtype):
    batch, h, w = shape
    x = _random((*batch, h, w), seed, dtype)
    tol = 1e-5 if dtype == torch.complex64 else 1e-12
    expected = _reference(x.numpy().astype(np.complex128))
    np.testing.assert_allclose(fft2c(x).numpy(), expected, atol=tol, rtol=tol)
    assert fft2c(x).dtype == dtype


@given(shapes, st.integers(0, 2**16))
def test_ifft2c_inverts_fft2c(shape, seed):
    batch, h, w = shape
    x = _random((*batch, h, w), seed)
    torch.testing.assert_close(ifft2c(fft2c(x)), x, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(fft2c(ifft2c(x)), x, atol=1e-12, rtol=1e-12)


@given(shapes, st.integers(0, 2**16))
def test_unitary_and_adjoint(shape, seed):
    batch, h, w = shape
    x, y = _random((*batch, h, w), seed), _random((*batch, h, w), seed + 1)
    torch.testing.assert_close(torch.linalg.vector_norm(fft2c(x)), torch.linalg.vector_norm(x))
    lhs = torch.vdot(fft2c(x).flatten(), y.flatten())
    torch.testing.assert_close(lhs, torch.vdot(x.flatten(), ifft2c(y).flatten()))


def test_origin_is_the_centre_pixel():
    for h, w in [(4, 6), (5, 7), (4, 5)]:
        k = fft2c(torch.ones(h, w, dtype=torch.complex128))
        expected = torch.zeros(h, w, dtype=torch.complex128)
        expected[h // 2, w // 2] = (h * w) ** 0.5
        torch.testing.assert_close(k, expected, atol=1e-12, rtol=0)
