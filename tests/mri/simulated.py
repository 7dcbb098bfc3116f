"""A small textured multi-coil object with known coil maps, shared by the MRI tests."""
import math

import torch

from applications.mri.fft import fft2c, ifft2c

N = 96


def simulate(n=N, coils=8, seed=0, noise=0.01):
    """Smooth textured object (ellipse, Gaussian blob, low-pass noise texture, smooth phase);
    coil maps 1/(z − z_c) of loops on a ring of radius 1.2 (FOV [−1, 1]²), normalised to
    Σ|S_c|² = 1; fully sampled k-space with complex Gaussian noise. complex128."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(-1, 1, n, dtype=torch.float64)
    y, x = torch.meshgrid(t, t, indexing="ij")
    f = torch.arange(n, dtype=torch.float64) - n // 2
    lowpass = torch.exp(-(f[:, None] ** 2 + f[None, :] ** 2) / (2 * (n / 10) ** 2))
    texture = ifft2c(fft2c(torch.randn(n, n, generator=g, dtype=torch.complex128)) * lowpass).real
    support = torch.sigmoid(40 * (1 - (x / 0.75) ** 2 - (y / 0.9) ** 2))
    blob = torch.exp(-((x - 0.3) ** 2 + (y + 0.2) ** 2) / 0.1)
    level = (0.6 + 0.3 * blob + 0.15 * texture / texture.std()).clamp_min(0.05)
    obj = support * level * torch.exp(0.8j * (x + 0.5 * y))
    centres = 1.2 * torch.exp(2j * math.pi * torch.arange(coils, dtype=torch.float64) / coils)
    sens = 1 / (torch.complex(x, y) - centres[:, None, None])
    sens = sens / torch.linalg.vector_norm(sens, dim=0)
    kspace = fft2c(sens * obj) + noise * torch.randn(coils, n, n, generator=g, dtype=torch.complex128)
    return obj, sens, kspace, support > 0.5
