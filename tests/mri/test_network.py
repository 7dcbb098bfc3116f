"""The unrolled reconstruction network is an exact Dynamics: check_dynamics passes."""
import pytest
import torch

import bilevelkit as bk
from applications.mri import baselines, fft, masks, sensitivities
from applications.mri.losses import ReconLoss, reconstruction
from applications.mri.network import NetworkConfig, UnrolledRecon, soft_threshold


def batch(coils=3, shape=(12, 10), seed=0, sense=False):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, coils, *shape, generator=g, dtype=torch.complex64)
    m = masks.make("random", shape, 2, 0.2, seed).expand(1, *shape).unsqueeze(0)
    coil_images = fft.ifft2c(k)
    out = {"kspace": k * m + 0.0, "mask": m, "coil_target": coil_images,
           "target": reconstruction(coil_images)}
    if sense:
        s = torch.randn(2, coils, *shape, generator=g, dtype=torch.complex64)
        out["sens"] = s / s.abs().pow(2).sum(1, keepdim=True).sqrt()
    return out


@pytest.mark.parametrize("operator", ["coil", "sense"])
@pytest.mark.parametrize("initial", ["kspace_cnn", "none"])
@pytest.mark.parametrize("warm_start", ["zero_filled", "cg_sense"])
def test_check_dynamics_passes(operator, initial, warm_start):
    torch.manual_seed(0)
    cfg = NetworkConfig(coils=3, phases=2, width=4, kspace_width=4, initial=initial,
                        warm_start=warm_start, operator=operator)
    net = UnrolledRecon(cfg)
    b = batch(sense=cfg.needs_maps)
    ctx = {k: v for k, v in b.items() if k in ("kspace", "mask", "sens")}
    b64 = bk.testing.to_float64(b)
    report = bk.testing.check_dynamics(net, ctx, lambda u: ReconLoss().terminal(u, b64))
    assert any("phases.1.features_back" in q for _, q, _ in report["rows"])
    assert ("initial_net" in dict(net.named_parameters()).__repr__()) == (initial == "kspace_cnn")


def test_untrained_network_is_a_plain_gradient_step():
    """G̃ starts at zero, so phase t is b = u − ρ Aᴴ(Au − f): data consistency improves."""
    torch.manual_seed(0)
    net = UnrolledRecon(NetworkConfig(coils=3, phases=3, initial="none", rho=1.0))
    b = batch()
    states = net.rollout({"kspace": b["kspace"], "mask": b["mask"]})
    # ρ = 1 with a binary mask: one gradient step restores the measured samples exactly.
    torch.testing.assert_close(fft.fft2c(states[1]) * b["mask"], b["kspace"], rtol=1e-5, atol=1e-5)


def test_bad_configuration_and_input():
    with pytest.raises(ValueError, match="network kernel must be odd"):
        NetworkConfig(kernel=4)
    with pytest.raises(ValueError, match="network phases must be an integer >= 1"):
        NetworkConfig(phases=0)
    with pytest.raises(ValueError, match="operator must be 'coil' or 'sense'"):
        NetworkConfig(operator="espirit")
    net = UnrolledRecon(NetworkConfig(coils=4, phases=1))
    with pytest.raises(ValueError, match=r"expects kspace \(B, 4, H, W\) complex, got \(2, 3, 12, 10\)"):
        net.rollout({"kspace": batch()["kspace"], "mask": batch()["mask"]})
    sense = UnrolledRecon(NetworkConfig(coils=3, phases=1, operator="sense"))
    with pytest.raises(ValueError, match="needs coil sensitivities"):
        sense.rollout({"kspace": batch()["kspace"], "mask": batch()["mask"]})


@pytest.mark.parametrize("operator", ["coil", "sense"])
def test_cg_sense_warm_start(operator):
    """warm_start="cg_sense": u_0 is S·v (coil state) or v (SENSE state) with v = cg_iters
    CG-SENSE iterations; the k-space CNN starts at zero, so it starts there too; no maps → clear error."""
    torch.manual_seed(0)
    b = batch(sense=True)
    ctx = {k: b[k] for k in ("kspace", "mask", "sens")}
    v = baselines.cg_sense(b["kspace"], b["mask"], b["sens"], iters=4).unsqueeze(1)
    expected = v if operator == "sense" else b["sens"] * v
    for initial in ("none", "kspace_cnn"):
        net = UnrolledRecon(NetworkConfig(coils=3, phases=1, width=4, kspace_width=4, cg_iters=4,
                                          warm_start="cg_sense", initial=initial, operator=operator))
        u0 = net.initial(ctx)
        if initial == "none":
            assert torch.equal(u0, expected)
        else:  # F⁻¹F(S v), and for SENSE Sᴴ S v = v where Σ|S_c|² = 1
            torch.testing.assert_close(u0, expected, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="='(sense|cg_sense)' needs coil sensitivities"):
            net.rollout({"kspace": b["kspace"], "mask": b["mask"]})
    with pytest.raises(ValueError, match="warm_start must be 'zero_filled' or 'cg_sense'"):
        NetworkConfig(warm_start="espirit")
    with pytest.raises(ValueError, match="initial must be 'kspace_cnn' or 'none'"):
        NetworkConfig(initial="zero_filled")
    with pytest.raises(ValueError, match="network cg_iters must be an integer >= 1"):
        NetworkConfig(cg_iters=0)


@pytest.mark.parametrize("operator", ["coil", "sense"])
def test_gradient_is_that_of_the_data_term(operator):
    """``net.gradient`` (AᴴA u − Aᴴf, Aᴴf kept per batch) is Aᴴ(A u − f) written out with the
    centred FFTs, and follows an in-place change of f."""
    b = batch(sense=True)
    net = UnrolledRecon(NetworkConfig(coils=3, phases=1, operator=operator))
    ctx = {k: b[k].clone() for k in ("kspace", "mask", "sens")}
    g = torch.Generator().manual_seed(3)
    u = torch.randn(2, 1 if operator == "sense" else 3, 12, 10, generator=g, dtype=torch.complex64)
    m, s = ctx["mask"], ctx["sens"]

    def expected():
        if operator == "sense":
            residual = m * fft.fft2c(s * u) - ctx["kspace"]
            return (s.conj() * fft.ifft2c(m * residual)).sum(1, keepdim=True)
        return fft.ifft2c(m * (m * fft.fft2c(u) - ctx["kspace"]))

    torch.testing.assert_close(net.gradient(u, ctx), expected(), rtol=1e-5, atol=1e-5)
    ctx["kspace"].mul_(-2.0)
    torch.testing.assert_close(net.gradient(u, ctx), expected(), rtol=1e-5, atol=1e-5)


def test_phase_correction_is_spread_over_the_coils_by_the_data_profiles():
    """J̃(x) = P ⊙ x: the learned correction u_t − b_t of every pixel is a multiple of the
    coil profile vector P of the measured data (a coil-wise CNN correction would not be)."""
    from applications.mri.sensitivities import profiles

    torch.manual_seed(0)
    net = UnrolledRecon(NetworkConfig(coils=3, phases=1, width=4, initial="none"))
    torch.nn.init.normal_(net.phases[0].features_back[-1].weight, std=0.3)  # G̃ ≠ 0
    b = batch()
    ctx = {"kspace": b["kspace"], "mask": b["mask"]}
    u0, u1 = net.rollout(ctx)
    phase = net.phases[0]
    with torch.no_grad():
        grad_step = u0 - phase.rho * net.gradient(u0, ctx)
        correction = u1 - grad_step
    p = profiles(b["kspace"])
    along = p * (p.conj() * correction).sum(1, keepdim=True)
    assert correction.abs().max() > 1e-3
    torch.testing.assert_close(correction, along, rtol=0, atol=1e-5)


def test_gamma_projects_onto_the_profile_span():
    """γ = 1 with G̃ = 0: u_t = P Pᴴ b_t, the coil images' projection onto the data profiles;
    the SENSE network (one image) has no γ."""
    from applications.mri.sensitivities import profiles

    net = UnrolledRecon(NetworkConfig(coils=3, phases=1, width=4, initial="none"))
    with torch.no_grad():
        net.phases[0].gamma.fill_(1.0)
    b = batch()
    ctx = {"kspace": b["kspace"], "mask": b["mask"]}
    u0, u1 = net.rollout(ctx)
    with torch.no_grad():
        grad_step = u0 - net.phases[0].rho * net.gradient(u0, ctx)
    p = profiles(b["kspace"])
    projected = p * (p.conj() * grad_step).sum(1, keepdim=True)
    assert (grad_step - projected).abs().max() > 1e-2  # the projection does something here
    torch.testing.assert_close(u1, projected, rtol=0, atol=1e-5)
    sense = UnrolledRecon(NetworkConfig(coils=3, phases=1, operator="sense"))
    assert not any("gamma" in n for n, _ in sense.named_parameters())


def test_kspace_network_adds_no_constant():
    """F_0 has no bias: zero measurements give a zero initial state whatever the weights, so it
    cannot put a constant into k-space (a bright dot at the image centre)."""
    torch.manual_seed(0)
    net = UnrolledRecon(NetworkConfig(coils=3, phases=1, width=4, kspace_width=4))
    for p in net.initial_net.parameters():
        torch.nn.init.normal_(p)
    assert all(not n.endswith("bias") for n, _ in net.initial_net.named_parameters())
    b = batch()
    zero = {"kspace": torch.zeros_like(b["kspace"]), "mask": b["mask"]}
    assert net.initial(zero).abs().max() == 0
    assert net.initial({"kspace": b["kspace"], "mask": b["mask"]}).abs().max() > 0


def test_profiles_are_computed_once_per_measurement_and_follow_changes():
    """The profiles are cached for the same unmodified kspace tensor only: an in-place change
    or a new tensor gives fresh profiles, so a rollout never uses another sample's P."""
    from applications.mri.sensitivities import profiles

    net = UnrolledRecon(NetworkConfig(coils=3, phases=2, width=4))
    b = batch()
    f = b["kspace"].clone()
    ctx = {"kspace": f, "mask": b["mask"]}
    first = net.profiles(ctx)
    assert net.profiles(ctx) is first
    f.mul_(torch.exp(1j * torch.linspace(0, 3, f.shape[-1])))  # in place: version changes
    torch.testing.assert_close(net.profiles(ctx), profiles(f))
    other = {"kspace": batch(seed=1)["kspace"], "mask": b["mask"]}
    torch.testing.assert_close(net.profiles(other), profiles(other["kspace"]))
    assert not any(key.startswith("_") for key in net.state_dict())


def test_cg_sense_warm_start_is_kept_for_the_same_measurement_only():
    """The CG-SENSE warm start is cached like the profiles, keyed on kspace, mask and maps:
    changing any of them in place, or passing another batch, recomputes it."""
    net = UnrolledRecon(NetworkConfig(coils=3, phases=1, width=4, warm_start="cg_sense", initial="none"))
    b = batch(sense=True)
    ctx = {k: b[k].clone() for k in ("kspace", "mask", "sens")}

    def fresh(c):
        return c["sens"] * baselines.cg_sense(c["kspace"], c["mask"], c["sens"],
                                              iters=net.cfg.cg_iters).unsqueeze(1)

    first = net.initial(ctx)
    assert torch.equal(net.initial(ctx), first)
    for key in ("kspace", "sens"):
        ctx[key].mul_(torch.exp(1j * torch.linspace(0, 3, ctx[key].shape[-1])))
        torch.testing.assert_close(net.initial(ctx), fresh(ctx))
    ctx["mask"][..., 0] = 0  # drop the first column's samples: a different measurement
    torch.testing.assert_close(net.initial(ctx), fresh(ctx))
    other = {k: batch(sense=True, seed=1)[k] for k in ("kspace", "mask", "sens")}
    torch.testing.assert_close(net.initial(other), fresh(other))
    assert not any(key.startswith("_") for key in net.state_dict())

def test_a_phase_without_prior_is_a_gradient_step_from_any_state():
    """ρ = 1 and a zero learned correction: u − (AᴴAu − Aᴴf) measures f exactly (M² = M)."""
    torch.manual_seed(0)
    net = UnrolledRecon(NetworkConfig(coils=3, phases=1, initial="none", rho=1.0))
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 12, 10, generator=g, dtype=torch.complex64)
    m = masks.make("random", (12, 10), 2, 0.2, 0).expand(1, 12, 10).unsqueeze(0)
    ctx = {"kspace": k * m + 0.0, "mask": m}
    u = torch.randn(2, 3, 12, 10, generator=g, dtype=torch.complex64)
    with torch.no_grad():
        u1 = net.step(1, u, ctx)
    torch.testing.assert_close(fft.fft2c(u1) * m, ctx["kspace"], rtol=1e-5, atol=1e-5)


def test_soft_threshold_closed_form_and_the_sign_of_alpha():
    z = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0]).view(1, 1, 1, 5).repeat(1, 2, 1, 1)
    out = soft_threshold(z, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([-2.0, 0, 0, 0, 2.0]), rtol=0, atol=0)
    net = UnrolledRecon(NetworkConfig(coils=3, phases=1, width=4, initial="none"))
    torch.nn.init.normal_(net.phases[0].features_back[-1].weight, std=0.3)
    b = torch.randn(1, 3, 8, 8, dtype=torch.complex64)
    p = sensitivities.profiles(torch.randn(1, 3, 8, 8, dtype=torch.complex64))
    with torch.no_grad():
        net.phases[0].alpha.fill_(0.05)
        a = net.phases[0].prox(b, p)
        net.phases[0].alpha.fill_(-0.05)  # the threshold is |α|
        torch.testing.assert_close(net.phases[0].prox(b, p), a, rtol=0, atol=0)


def test_convolutions_are_channels_last_and_the_layout_changes_no_result():
    """The layout is a speed choice (oneDNN skips a conversion per call): it survives
    load_state_dict of a contiguous checkpoint and gives the contiguous network's output."""
    torch.manual_seed(0)
    cfg = NetworkConfig(coils=3, phases=2, width=4, kspace_width=4)
    net = UnrolledRecon(cfg)
    for m in net.modules():
        nn_layer = isinstance(m, torch.nn.Conv2d)
        assert not nn_layer or m.weight.is_contiguous(memory_format=torch.channels_last)
    for p in net.parameters():  # train a little away from the zero-initialised layers
        p.data.add_(0.1 * torch.randn_like(p))
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    reloaded = UnrolledRecon(cfg)
    reloaded.load_state_dict(state)
    assert reloaded.phases[0].combine[0].weight.is_contiguous(memory_format=torch.channels_last)
    plain = UnrolledRecon(cfg)
    for p in plain.parameters():
        p.data = p.data.contiguous()
    plain.load_state_dict(state)
    assert not plain.phases[0].combine[0].weight.is_contiguous(memory_format=torch.channels_last)
    ctx = {k: v for k, v in batch().items() if k in ("kspace", "mask")}
    torch.testing.assert_close(reloaded.rollout(ctx)[-1], plain.rollout(ctx)[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("costate", [bk.AutogradCostate(), bk.AdjointSweep(), bk.CheckpointedSweep(1)],
                         ids=lambda c: type(c).__name__)
def test_training_step_keeps_the_weights_layout_without_warnings(costate):
    """Gradients of the channels-last weights come in the weights' layout from every costate
    solver, and the initial-state loss adds to them without autograd's layout warning."""
    import warnings

    from bilevelkit.trainers import BilevelTrainer, TerminalLoss

    torch.manual_seed(0)
    net = UnrolledRecon(NetworkConfig(coils=3, phases=2, width=4, kspace_width=4))
    recon = ReconLoss()
    loss = TerminalLoss(context=lambda b: {k: b[k] for k in ("kspace", "mask")},
                        terminal=recon.terminal, initial=recon.initial)
    b = batch()
    items = [{k: v[i if len(v) == 2 else 0] for k, v in b.items()} for i in range(2)]
    trainer = BilevelTrainer(net, loss, [items], [items], batch_size=1, costate=costate, mode="joint")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.lower_step()
    for p in trainer.models[0].parameters():
        if p.grad is not None and p.dim() == 4:
            assert p.grad.stride() == p.stride()
