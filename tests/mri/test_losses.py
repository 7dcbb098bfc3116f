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


def test_per_slice_losses_are_the_losses_of_each_slice_alone():
    """``per_slice=True`` gives ``(B,)``: entry b is the loss of slice b as a batch of one (SSIM
    included), and their mean is the batch loss when SSIM is off (slices of one size)."""
    g = torch.Generator().manual_seed(2)
    coil_target = torch.randn(3, 2, 9, 8, generator=g, dtype=torch.complex128)
    u = coil_target + 0.3 * torch.randn(3, 2, 9, 8, generator=g, dtype=torch.complex128)
    batch = {"coil_target": coil_target, "target": reconstruction(coil_target)}
    one = lambda b: {k: v[b:b + 1] for k, v in batch.items()}  # noqa: E731
    for loss in (ReconLoss(), ReconLoss(ssim_weight=0.5)):
        for part in ("terminal", "initial"):
            per = getattr(loss, part)(u, batch, per_slice=True)
            assert per.shape == (3,)
            alone = torch.stack([getattr(loss, part)(u[b:b + 1], one(b)) for b in range(3)])
            torch.testing.assert_close(per, alone, rtol=1e-13, atol=0)
            if not loss.ssim_weight or part == "initial":
                torch.testing.assert_close(per.mean(), getattr(loss, part)(u, batch), rtol=1e-13, atol=0)


def test_mean_log_is_the_mean_of_each_slices_log_loss():
    g = torch.Generator().manual_seed(3)
    coil_target = torch.randn(4, 2, 8, 8, generator=g, dtype=torch.complex128)
    u_T = coil_target + 0.2 * torch.randn(4, 2, 8, 8, generator=g, dtype=torch.complex128)
    u_0 = coil_target + torch.randn(4, 2, 8, 8, generator=g, dtype=torch.complex128)
    u_T[0] = coil_target[0] + 1e-3  # one slice far better than the rest
    batch = {"coil_target": coil_target, "target": reconstruction(coil_target)}
    loss = ReconLoss()
    one = lambda b: {k: v[b:b + 1] for k, v in batch.items()}  # noqa: E731
    logs = [torch.log(loss.terminal(u_T[b:b + 1], one(b)) + loss.initial(u_0[b:b + 1], one(b)))
            for b in range(4)]
    torch.testing.assert_close(loss.mean_log(u_T, batch, u_0), sum(logs) / 4, rtol=1e-13, atol=0)
    torch.testing.assert_close(loss.mean_log(u_T, batch),
                               loss.terminal(u_T, batch, per_slice=True).log().mean(), rtol=1e-13, atol=0)
    # the good slice's relative change counts: its gradient is not swamped by the others'
    u = u_T.clone().requires_grad_()
    grad = torch.autograd.grad(loss.mean_log(u, batch), u)[0]
    plain = torch.autograd.grad(loss.terminal(u, batch), u)[0]
    assert grad[0].abs().sum() / grad[1:].abs().sum() > 10 * plain[0].abs().sum() / plain[1:].abs().sum()


def test_mean_log_of_an_all_zero_slice_is_finite_and_leaves_the_others_alone():
    """A slice of zeros reconstructed as zeros has loss 0: it adds log 1 = 0 and no gradient,
    where log 0 would stop training with a non-finite objective."""
    g = torch.Generator().manual_seed(4)
    coil_target = torch.randn(3, 2, 8, 8, generator=g, dtype=torch.complex128)
    coil_target[1] = 0
    u = (coil_target + 0.1 * torch.randn(3, 2, 8, 8, generator=g, dtype=torch.complex128))
    u[1] = 0
    u.requires_grad_()
    batch = {"coil_target": coil_target, "target": reconstruction(coil_target)}
    loss = ReconLoss()
    value = loss.mean_log(u, batch, u)
    assert torch.isfinite(value)
    others = loss.terminal(u, batch, per_slice=True) + loss.initial(u, batch, per_slice=True)
    torch.testing.assert_close(value, (others[0].log() + others[2].log()) / 3, rtol=1e-13, atol=0)
    grad = torch.autograd.grad(value, u)[0]
    assert torch.isfinite(grad).all() and not grad[1].any() and grad[0].any()


def test_ssim_term_of_an_all_zero_slice_is_finite():
    """SSIM's range is the reference's maximum: for an all-zero slice returned as zeros the
    term is 0 (SSIM 1), not 0/0."""
    zeros = torch.zeros(2, 2, 8, 8, dtype=torch.complex64)
    batch = {"coil_target": zeros, "target": reconstruction(zeros)}
    loss = ReconLoss(ssim_weight=1.0)
    assert float(loss.terminal(zeros, batch)) == 0
    assert loss.terminal(zeros, batch, per_slice=True).tolist() == [0, 0]
