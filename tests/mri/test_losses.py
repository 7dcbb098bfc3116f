"""The training loss (docs/mri.md, "The network") against its closed form."""
import torch

from applications.mri.losses import ReconLoss, reconstruction


def test_loss_parts_equal_their_closed_form():
    """terminal = mean |RSS(u) − target| + mean |u − u*|², initial = 0.01 · mean |u_0 − u*|."""
    g = torch.Generator().manual_seed(0)
    coil_target = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.complex128)
    u = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.complex128)
    batch = {"coil_target": coil_target, "target": reconstruction(coil_target) + 0.1}
    rss = torch.sqrt((u.abs() ** 2).sum(1))
    expected = (rss - batch["target"]).abs().mean() + ((u - coil_target).abs() ** 2).mean()
    torch.testing.assert_close(ReconLoss().terminal(u, batch), expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(ReconLoss().initial(u, batch),
                               0.01 * (u - coil_target).abs().mean(), rtol=1e-14, atol=0)


def test_sense_coil_target_is_the_combined_image():
    """With maps S (Σ|S|² = 1) the state is one image v and its target Sᴴu*: for u* = S v
    exactly, the initial loss of v is zero."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.complex128)
    s = s / torch.linalg.vector_norm(s, dim=1, keepdim=True)
    v = torch.randn(2, 1, 6, 5, generator=g, dtype=torch.complex128)
    batch = {"coil_target": s * v, "sens": s, "target": reconstruction(s * v)}
    assert float(ReconLoss().initial(v, batch)) < 1e-12
