"""Algorithm 1 and Algorithm 3 loops: exact resume, guards, and that Ω learns what it should."""
import copy

import pytest
import torch
from torch.utils.data import TensorDataset

import bilevelkit as bk
from bilevelkit.trainers import BilevelTrainer, MLMTrainer, NonFiniteError, TerminalLoss

from .random_dynamics import RandomDynamics

DT = torch.float64


def regression_group(beta, n, g, corrupt=False):
    X = torch.randn(n, beta.numel(), generator=g, dtype=DT)
    y = X @ beta + 0.1 * torch.randn(n, generator=g, dtype=DT)
    if corrupt:  # flipped, amplified, noisy targets
        y = -2 * y + torch.randn(n, generator=g, dtype=DT)
    return TensorDataset(X, y)


def mse(model, batch):
    X, y = batch
    return ((model(X).squeeze(-1) - y) ** 2).mean()


def linear(d=5):
    torch.manual_seed(0)
    return torch.nn.Linear(d, 1).to(DT)


# --- MLMTrainer (Algorithm 3) ---------------------------------------------------------------

def dynamics_problem(complex_states=True):
    dyn = RandomDynamics(5, 3, complex_states, "both", "tanh", True, 7)
    g = torch.Generator().manual_seed(1)
    dtype = torch.complex128 if complex_states else DT
    batches = [(torch.randn(4, 3, generator=g, dtype=dtype),
                torch.randn(4, 3, generator=g, dtype=dtype)) for _ in range(3)]
    loss = TerminalLoss(context=lambda b: {"f": b[0]},
                        terminal=lambda x, b: ((x - b[1]).abs() ** 2).mean())
    return dyn, batches, loss


def test_mlm_trajectories_identical_for_every_solver():
    runs = {}
    for solver in (bk.AutogradCostate(), bk.AdjointSweep(), bk.CheckpointedSweep(1),
                   bk.CheckpointedSweep(3)):
        dyn, batches, loss = dynamics_problem()
        trainer = MLMTrainer(dyn, loss, costate=solver, lr=1e-2)
        trainer.fit(batches[:1], epochs=8)
        runs[repr(solver)] = (trainer.history, torch.cat([p.detach().flatten() for p in dyn.parameters()]))
    ref_hist, ref_params = runs.pop("AutogradCostate(keep=False)")
    assert ref_hist[-1] < ref_hist[0]
    for name, (hist, params) in runs.items():
        assert hist == pytest.approx(ref_hist, rel=1e-12), name
        torch.testing.assert_close(params, ref_params, rtol=1e-11, atol=1e-13)


def test_mlm_guard_keeps_last_good_state():
    dyn, batches, loss = dynamics_problem()
    trainer = MLMTrainer(dyn, loss, lr=1e-2)
    trainer.fit(batches[:1], epochs=1)
    before = copy.deepcopy(trainer.state_dict())
    bad = (batches[0][0], batches[0][1] * float("nan"))
    with pytest.raises(NonFiniteError, match=r"epoch 1, step 1: loss is not finite"):
        trainer.step(bad)
    for k, v in trainer.dynamics.state_dict().items():
        assert torch.equal(v, before["model"][k])
    assert all(p.grad is None for p in dyn.parameters())


# --- BilevelTrainer (Algorithm 1) -----------------------------------------------------------

def cleaning_problem(N=6, corrupted=(1, 4), M=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    beta = torch.randn(5, generator=g, dtype=DT)
    train = [regression_group(beta, 32, g, i in corrupted) for i in range(N)]
    val = [regression_group(beta, 32, g) for _ in range(M)]
    return train, val


@pytest.mark.parametrize("normalizer", ["softmax", "sparsemax"])
def test_hyper_cleaning_downweights_corrupted_groups(normalizer):
    train, val = cleaning_problem(M=2)
    trainer = BilevelTrainer(linear(), mse, train, val, normalizer=normalizer,
                             hypergrad=bk.hypergrad.Unrolled(steps=3, lr=0.1), lr=0.05,
                             meta_lr=0.3, batch_size=16, seed=1)
    trainer.fit(60)
    W = trainer.weights
    N = len(train)
    assert W.shape == (N, 2)
    torch.testing.assert_close(W.sum(0), torch.ones(2, dtype=W.dtype))
    for i in (1, 4):
        assert (W[i] < 0.5 / N).all(), f"corrupted group {i} keeps weight {W[i].tolist()}"
    if normalizer == "sparsemax":
        assert (W == 0).any()
    assert trainer.history[-1]["val_loss"][0] < 0.1


def test_task_correlation_learns_domain_blocks():
    """Groups 0-2 come from domain A, 3-5 from domain B; task j validates on domain j."""
    g = torch.Generator().manual_seed(3)
    betas = [torch.randn(5, generator=g, dtype=DT) for _ in range(2)]
    train = [regression_group(betas[i // 3], 32, g) for i in range(6)]
    val = [regression_group(b, 32, g) for b in betas]
    trainer = BilevelTrainer(linear(), mse, train, val, hypergrad=bk.hypergrad.Unrolled(steps=3, lr=0.1),
                             lr=0.05, meta_lr=0.3, batch_size=16, task_names=["A", "B"])
    trainer.fit(40)
    W = trainer.weights
    assert W[:3, 0].sum() > 0.8 and W[3:, 1].sum() > 0.8, W


def test_joint_mode_keeps_uniform_weights():
    train, val = cleaning_problem()
    trainer = BilevelTrainer(linear(), mse, train, val, mode="joint", batch_size=8)
    trainer.fit(3)
    torch.testing.assert_close(trainer.weights, torch.full((6,), 1 / 6, dtype=DT))


class Two(torch.nn.Module):
    """A model with a sub-module the task models can share."""

    def __init__(self):
        super().__init__()
        self.initial_net, self.head = torch.nn.Linear(5, 5).to(DT), torch.nn.Linear(5, 1).to(DT)

    def forward(self, x):
        return self.head(torch.tanh(self.initial_net(x)))


def test_resume_is_exact_and_shared_modules_are_shared():
    train, val = cleaning_problem(M=2)

    def make():
        torch.manual_seed(0)
        return BilevelTrainer(Two(), mse, train, val, shared=("initial_net",), batch_size=8,
                              hypergrad=bk.hypergrad.Unrolled(steps=2, lr=0.1), seed=5)

    full = make()
    full.fit(4)
    first = make()
    assert first.models[0].initial_net is first.models[1].initial_net
    assert first.models[0].head is not first.models[1].head
    first.fit(2)
    state = copy.deepcopy(first.state_dict())
    resumed = make()
    resumed.load_state_dict(state)
    resumed.fit(4)
    assert torch.equal(resumed.omega, full.omega)
    for (k, a), b in zip(full.models.state_dict().items(), resumed.models.state_dict().values()):
        assert torch.equal(a, b), k
    assert resumed.history == full.history


def test_bilevel_guard_names_epoch_and_task():
    train, val = cleaning_problem()
    bad_val = [TensorDataset(val[0].tensors[0], val[0].tensors[1] * float("inf"))]
    trainer = BilevelTrainer(linear(), mse, train, bad_val, task_names=["knee"], batch_size=8)
    trainer.lower_step()
    omega = trainer.omega.clone()
    with pytest.raises(NonFiniteError, match=r"epoch 0, task 'knee': hypergradient"):
        trainer.upper_step()
    assert torch.equal(trainer.omega, omega)
    bad_train = [TensorDataset(t.tensors[0], t.tensors[1] * float("nan")) for t in train]
    trainer = BilevelTrainer(linear(), mse, bad_train, val, task_names=["knee"], batch_size=8)
    params = copy.deepcopy(trainer.models.state_dict())
    with pytest.raises(NonFiniteError, match=r"epoch 0, task 'knee': weighted training loss"):
        trainer.lower_step()
    for k, v in trainer.models.state_dict().items():
        assert torch.equal(v, params[k]), k  # untouched by the failed step
    assert all(p.grad is None for p in trainer.models.parameters())
    # a finite loss with a non-finite gradient: √|b| at b = 0 has an infinite slope
    model = linear()
    with torch.no_grad():
        model.bias.zero_()
    kinked = lambda m, batch: mse(m, batch) + m.bias.abs().sqrt().sum()  # noqa: E731
    trainer = BilevelTrainer(model, kinked, train, val, task_names=["knee"], batch_size=8)
    with pytest.raises(NonFiniteError, match=r"epoch 0: the lower-level gradient of task 'knee', "
                                             r"parameter 'bias'"):
        trainer.lower_step()


def test_bilevel_with_dynamics_and_costate_solver():
    """Lower level through a costate solver equals the plain autograd lower level."""
    dyn, batches, loss = dynamics_problem(complex_states=False)  # hypergradients: real θ
    data = [list(zip(b[0], b[1])) for b in batches]
    out = []
    for costate in (None, bk.CheckpointedSweep(2)):
        trainer = BilevelTrainer(dyn, loss, data[:2], data[2:], costate=costate, batch_size=2,
                                 hypergrad=bk.hypergrad.FirstOrder(steps=0, lr=0.1))
        trainer.fit(2)
        out.append((trainer.omega.clone(), [p.detach().clone() for p in trainer.models.parameters()],
                    [v for h in trainer.history for v in h["train_loss"]]))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-10, atol=1e-12)
    assert out[1][2] == pytest.approx(out[0][2], rel=1e-10)  # the logged losses too
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bad_arguments():
    train, val = cleaning_problem()
    with pytest.raises(ValueError, match="at least one training group"):
        BilevelTrainer(linear(), mse, [], val)
    with pytest.raises(ValueError, match="mode must be 'meta' or 'joint'"):
        BilevelTrainer(linear(), mse, train, val, mode="both")
    with pytest.raises(ValueError, match="shared='nope'"):
        BilevelTrainer(linear(), mse, train, val, shared=("nope",))
    for kwargs, message in [
            ({"hypergrad": "implicit"}, "hypergrad must be a strategy instance"),
            ({"hypergrad": bk.hypergrad.FirstOrder}, "hypergrad must be a strategy instance"),
            ({"costate": "adjoint"}, "costate must be a solver instance"),
            ({"costate": bk.AdjointSweep}, "costate must be a solver instance"),
            ({"costate": bk.AdjointSweep()}, "costate needs the loss as a TerminalLoss"),
            ({"normalizer": lambda w: torch.softmax(w, 0)}, r"called as normalizer\(scores, dim=0\)"),
            ({"normalizer": lambda w, dim: torch.sigmoid(w)}, "onto the probability simplex")]:
        with pytest.raises(ValueError, match=message):
            BilevelTrainer(linear(), mse, train, val, **kwargs)
    with pytest.raises(ValueError, match=r"train_groups must be a list of datasets, one per group; "
                                         r"got TensorDataset \(one dataset: wrap it in a list\)"):
        BilevelTrainer(linear(), mse, train[0], val)
    with pytest.raises(ValueError, match="val_tasks must be a list of datasets, one per task"):
        BilevelTrainer(linear(), mse, train, val[0])
    with pytest.raises(ValueError, match="costate needs the loss as a TerminalLoss"):
        MLMTrainer(linear(), mse, costate=bk.AdjointSweep())
    with pytest.raises(ValueError, match="groups_per_step must be None or an integer"):
        BilevelTrainer(linear(), mse, train, val, groups_per_step=True)
    for bad in (2.5, -1, True):
        with pytest.raises(ValueError, match="epochs must be an integer >= 0"):
            BilevelTrainer(linear(), mse, train, val).fit(bad)
    with pytest.raises(ValueError, match="keep must be True or False, got 'yes'"):
        bk.AdjointSweep(keep="yes")
    with pytest.raises(ValueError, match="keep must be True or False"):
        bk.CheckpointedSweep(3, keep=1)
    mlm = MLMTrainer(linear(), mse)
    with pytest.raises(ValueError, match="epoch 0: batches gave no batch to train on"):
        mlm.fit([], 3)
    with pytest.raises(ValueError, match="got a Dataset, whose items are single samples"):
        mlm.fit(train[0], 1)
    with pytest.raises(ValueError, match="epochs must be an integer >= 0"):
        mlm.fit([train[0][:8]], 2.5)
    # callables that keep the contract (called with dim, or with dim bound) train like the built-in
    b = BilevelTrainer(linear(), mse, train, val, batch_size=8)
    b.fit(2)
    for sigma in (lambda w, dim=0: torch.softmax(w, dim), torch.softmax,
                  lambda w, *, dim: torch.softmax(w, dim)):
        a = BilevelTrainer(linear(), mse, train, val, normalizer=sigma, batch_size=8)
        a.fit(2)
        assert torch.equal(a.omega, b.omega)


def test_numpy_numbers_and_one_element_losses_are_accepted():
    np = pytest.importorskip("numpy")
    train, val = cleaning_problem()
    runs = []
    for schedule, epochs in ((bk.trainers.cosine(4), 2), (bk.trainers.cosine(np.int64(4)), np.int64(2)),
                             (lambda e: np.float32(bk.trainers.cosine(4)(e)), 2),
                             (lambda e: torch.tensor(bk.trainers.cosine(4)(e), dtype=DT), 2)):
        trainer = BilevelTrainer(linear(), mse, train, val, batch_size=8, lr_schedule=schedule)
        trainer.fit(epochs)
        runs.append(trainer.optimizer.param_groups[0]["lr"])
    assert runs[0] == runs[1] == runs[3] and runs[2] == pytest.approx(runs[0], rel=1e-6)
    with pytest.raises(ValueError, match=r"lr_schedule\(0\) returned True"):
        BilevelTrainer(linear(), mse, train, val, lr_schedule=lambda e: True).fit(1)
    column = lambda model, batch: mse(model, batch).reshape(1, 1)  # noqa: E731  (r.T @ r / n)
    BilevelTrainer(linear(), column, train, val, batch_size=8).fit(1)
    bk.testing.check_dynamics(RandomDynamics(2, 3, False, "both", "tanh", True, 0),
                              {"f": torch.randn(2, 3, dtype=DT)}, lambda x: (x ** 2).sum(),
                              rtol=np.float32(1e-6))


def test_mlm_fit_takes_an_iterable_dataset_of_batches():
    train, _ = cleaning_problem()

    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([train[0][:8], train[0][8:16]])

    trainer = MLMTrainer(linear(), mse)
    assert len(trainer.fit(Batches(), 2)) == 4
    once = (b for b in [train[0][:8]])
    with pytest.raises(ValueError, match="epoch 1: batches gave no batch.*one-shot iterator"):
        MLMTrainer(linear(), mse).fit(once, 2)


def test_a_loss_that_is_not_a_scalar_is_named():
    train, val = cleaning_problem()
    per_sample = lambda model, batch: (model(batch[0]).squeeze(-1) - batch[1]) ** 2  # noqa: E731
    with pytest.raises(ValueError, match=r"loss\(model, batch\) must return a scalar, got shape"):
        BilevelTrainer(linear(), per_sample, train, val, batch_size=8).fit(1)
    dyn, batches, _ = dynamics_problem()  # the plain rollout (no costate solver) checks too
    terminal = TerminalLoss(context=lambda b: {"f": b[0]}, terminal=lambda x, b: (x - b[1]).abs() ** 2)
    with pytest.raises(ValueError, match=r"terminal\(x_T, batch\) must return a scalar, got shape"):
        terminal(dyn, batches[0])
    initial = TerminalLoss(context=lambda b: {"f": b[0]}, terminal=lambda x, b: x.abs().mean(),
                           initial=lambda x, b: x.abs())
    with pytest.raises(ValueError, match=r"initial\(x_0, batch\) must return a scalar, got shape"):
        initial(dyn, batches[0])
    with pytest.raises(ValueError, match=r"initial\(x_0, batch\) must return a scalar, got shape"):
        MLMTrainer(dyn, initial, costate=bk.AdjointSweep()).step(batches[0])  # the costate path


def test_initial_state_loss_reaches_theta_0_like_autograd():
    dyn, batches, _ = dynamics_problem()
    loss = TerminalLoss(context=lambda b: {"f": b[0]},
                        terminal=lambda x, b: ((x - b[1]).abs() ** 2).mean(),
                        initial=lambda x0, b: 0.3 * (x0 - b[1]).abs().mean())
    grads = []
    for costate in (None, bk.AdjointSweep()):
        model = copy.deepcopy(dyn)
        value = bk.trainers._backward(model, loss, batches[0], 1.0, costate)
        grads.append((float(value), {n: p.grad for n, p in model.named_parameters()}))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-12)
    for n, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][n], g, rtol=1e-10, atol=1e-14)
    assert grads[0][1]["W0"].abs().sum() > 0
    # a weight c (a group's share of the weighted loss) scales the gradient, not the value
    model = copy.deepcopy(dyn)
    value = bk.trainers._backward(model, loss, batches[0], 0.25, bk.AdjointSweep())
    params = dict(dyn.named_parameters())
    expected = torch.autograd.grad(0.25 * loss(dyn, batches[0]), list(params.values()))
    assert float(value) == pytest.approx(grads[0][0], rel=1e-12)
    for (n, p), g in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-14)


def test_sampled_groups_still_clean_the_data():
    """groups_per_step draws groups from W: an unbiased, cheaper lower level that still works."""
    train, val = cleaning_problem()
    trainer = BilevelTrainer(linear(), mse, train, val, groups_per_step=2,
                             hypergrad=bk.hypergrad.Unrolled(steps=3, lr=0.1), lr=0.05,
                             meta_lr=0.3, batch_size=16, seed=1, lower_steps=3)
    trainer.fit(60)
    for i in (1, 4):
        assert float(trainer.weights[i]) < 0.5 / 6
    with pytest.raises(ValueError, match="groups_per_step must be None or an integer >= 1"):
        BilevelTrainer(linear(), mse, train, val, groups_per_step=0)


def test_sampled_lower_level_is_unbiased():
    train, val = cleaning_problem()
    trainer = BilevelTrainer(linear(), mse, train, val, groups_per_step=3)
    with torch.no_grad():
        trainer.omega.copy_(torch.linspace(-1, 1, 6, dtype=DT))
    W = trainer.weights
    draws = torch.zeros(6, dtype=DT)
    for _ in range(2000):
        for i, c in trainer._lower_terms(0):
            draws[i] += c
    torch.testing.assert_close(draws / 2000, W, atol=0.02, rtol=0)


def test_bad_sizes_and_rates_name_the_argument():
    train, val = cleaning_problem()
    for kwargs, message in [({"batch_size": 0}, "batch_size must be None"),
                            ({"batch_size": -1}, "batch_size must be None"),
                            ({"val_batch_size": 2.5}, "val_batch_size must be None"),
                            ({"inner_lr": -1.0}, "inner_lr must be a finite number > 0"),
                            ({"meta_lr": float("nan")}, "meta_lr must be a finite number > 0"),
                            ({"lr": 0}, "lr must be a finite number > 0")]:
        with pytest.raises(ValueError, match=message):
            BilevelTrainer(linear(), mse, train, val, **kwargs)
    empty = TensorDataset(torch.zeros(0, 5, dtype=DT), torch.zeros(0, dtype=DT))
    with pytest.raises(ValueError, match="training group 'b' is empty"):
        BilevelTrainer(linear(), mse, [train[0], empty], val, group_names=["a", "b"])


def test_state_dict_is_a_snapshot():
    """A state kept in memory resumes from where it was taken, not from later training."""
    train, val = cleaning_problem()
    trainer = BilevelTrainer(linear(), mse, train, val, lower_steps=2, batch_size=8, seed=3)
    trainer.fit(1)
    kept = trainer.state_dict()
    reference = copy.deepcopy(kept)
    trainer.fit(3)
    for k, v in reference["models"].items():
        assert torch.equal(kept["models"][k], v), k
    assert kept["optimizer"]["state"][0]["step"] == reference["optimizer"]["state"][0]["step"]
    resumed = BilevelTrainer(linear(), mse, train, val, lower_steps=2, batch_size=8, seed=3)
    resumed.load_state_dict(kept)
    resumed.fit(3)
    assert torch.equal(resumed.omega, trainer.omega)
    for a, b in zip(resumed.models.parameters(), trainer.models.parameters()):
        assert torch.equal(a, b)


def test_upper_step_leaves_buffers_and_frozen_weights_alone():
    """The look-ahead of the hypergradient trains what the lower level trains: frozen weights
    stay put inside it, and batch-norm statistics are not updated from its batches (nor from
    the validation batch)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4),
                              torch.nn.Linear(4, 1)).to(DT)
    net[2].weight.requires_grad_(False)
    train, val = cleaning_problem()
    trainer = BilevelTrainer(net, mse, train, val, batch_size=8)
    seen = {}

    def spy(*args, **kwargs):
        seen["params"] = args[2]
        seen["result"] = bk.hypergrad.Unrolled(steps=2, lr=0.1)(*args, **kwargs)
        return seen["result"]

    trainer.hypergrad = spy
    trainer.lower_step()
    model = trainer.models[0]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    trainer.upper_step()
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert "model.2.weight" not in seen["params"] and "model.2.weight" not in seen["result"].params
    assert not torch.equal(trainer.omega, torch.zeros_like(trainer.omega))


def test_negative_curvature_in_the_upper_step_names_epoch_and_task():
    """Implicit(cg) on a non-convex lower level: the error says where, and Ω stays."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(DT)
    train, val = cleaning_problem()
    trainer = BilevelTrainer(net, mse, train, val, task_names=["knee"], batch_size=8,
                             hypergrad=bk.hypergrad.Implicit(steps=0, lr=0.1, iters=30))
    omega = trainer.omega.clone()
    with pytest.raises(bk.hypergrad.NegativeCurvatureError,
                       match=r"epoch 0, task 'knee': hypergradient failed: CG met non-positive"):
        trainer.upper_step()
    assert torch.equal(trainer.omega, omega)


def test_mlm_trainer_is_adam_on_the_loss():
    """MLMTrainer equals a hand-written loop: zero_grad, loss.backward(), torch.optim.Adam."""
    dyn, batches, loss = dynamics_problem()
    reference = copy.deepcopy(dyn)
    trainer = MLMTrainer(dyn, loss, lr=1e-2)
    trainer.fit(batches[:2], epochs=3)
    opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    values = []
    for _ in range(3):
        for batch in batches[:2]:
            opt.zero_grad()
            value = loss(reference, batch)
            value.backward()
            opt.step()
            values.append(float(value.detach()))
    assert trainer.history == pytest.approx(values, rel=1e-10)
    for (n, a), b in zip(dyn.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=n)


def test_mlm_resume_is_exact():
    dyn, batches, loss = dynamics_problem()
    full = MLMTrainer(copy.deepcopy(dyn), loss, lr=1e-2)
    full.fit(batches, epochs=4)
    first = MLMTrainer(copy.deepcopy(dyn), loss, lr=1e-2)
    first.fit(batches, epochs=2)
    resumed = MLMTrainer(copy.deepcopy(dyn), loss, lr=1e-2)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    resumed.fit(batches, epochs=4)
    assert resumed.history == full.history
    for a, b in zip(resumed.dynamics.parameters(), full.dynamics.parameters()):
        assert torch.equal(a, b)


def test_mlm_guard_on_a_finite_loss_with_an_infinite_gradient():
    dyn, batches, loss = dynamics_problem()
    name, p = next(iter(dyn.named_parameters()))
    with torch.no_grad():
        p.zero_()
    # √|θ| at θ = 0: a finite value with an infinite slope (a plain loss: autograd route)
    kinked = lambda model, b: loss(model, b) + dict(model.named_parameters())[name].abs().sqrt().sum()  # noqa: E731
    trainer = MLMTrainer(dyn, kinked, lr=1e-2)
    before = copy.deepcopy(trainer.state_dict())
    with pytest.raises(NonFiniteError, match=f"epoch 0: gradient of '{name}'"):
        trainer.step(batches[0])
    for k, v in trainer.dynamics.state_dict().items():
        assert torch.equal(v, before["model"][k]), k
    assert all(q.grad is None for q in dyn.parameters())


def test_bilevel_guard_on_a_non_finite_hypergradient():
    """The trainer checks what a (user's) strategy returns, not only what raises inside it."""
    train, val = cleaning_problem()
    trainer = BilevelTrainer(linear(), mse, train, val, task_names=["knee"], batch_size=8)

    def nan_strategy(inner_loss, outer_loss, params, omega, normalizer):
        return bk.hypergrad.HypergradResult(params=params, hypergrad=torch.full_like(omega, float("nan")),
                                            weights=normalizer(omega), outer_loss=0.0)

    trainer.hypergrad = nan_strategy
    omega = trainer.omega.clone()
    with pytest.raises(NonFiniteError, match=r"epoch 0, task 'knee': hypergradient"):
        trainer.upper_step()
    assert torch.equal(trainer.omega, omega)


def test_a_shared_module_takes_one_step_not_one_per_task():
    """F_0 shared by M = 3 task models is one parameter of the optimizer: Adam's first step
    moves each of its weights by at most lr (once per task would be up to 3·lr)."""
    train, val = cleaning_problem(M=3)
    torch.manual_seed(0)
    lr = 1e-2
    trainer = BilevelTrainer(Two(), mse, train, val, shared=("initial_net",), batch_size=8, lr=lr)
    ids = [id(p) for group in trainer.optimizer.param_groups for p in group["params"]]
    assert len(ids) == len(set(ids)) == 2 + 3 * 2  # initial_net.{weight,bias} + 3 heads
    before = trainer.models[0].initial_net.weight.detach().clone()
    trainer.lower_step()
    step = (trainer.models[0].initial_net.weight.detach() - before).abs().max()
    assert 0.5 * lr < float(step) <= lr * (1 + 1e-9)


@pytest.mark.parametrize("normalizer", ["softmax", "sparsemax"])
@pytest.mark.parametrize("hypergrad", [bk.hypergrad.Unrolled(steps=1, lr=0.1),
                                       bk.hypergrad.FirstOrder(steps=2, lr=0.1)],
                         ids=lambda h: type(h).__name__)
def test_upper_step_look_ahead_from_the_groups_equals_autograd(normalizer, hypergrad):
    """The trainer hands its inner loss over term by term (a WeightedSum of the groups in the
    support); the run equals one whose strategy sees a plain function, differentiated twice."""
    train, val = cleaning_problem(M=2)

    def plain(inner_loss, *args, **kwargs):
        assert isinstance(inner_loss, bk.hypergrad.WeightedSum)
        return hypergrad(lambda p, w: inner_loss(p, w), *args, **kwargs)

    out = []
    for strategy in (hypergrad, plain):
        trainer = BilevelTrainer(linear(), mse, train, val, normalizer=normalizer, meta_lr=0.5,
                                 batch_size=16, hypergrad=strategy, seed=2)
        trainer.fit(6)
        out.append((trainer.omega.clone(), [v for h in trainer.history for v in h["val_loss"]]))
    if normalizer == "sparsemax":
        assert (bk.normalizers.sparsemax(out[0][0]) == 0).any()  # groups left out of the sum
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-10, atol=1e-12)
    assert out[0][1] == pytest.approx(out[1][1], rel=1e-10)


def test_lr_schedule_sets_each_epochs_rate_and_resumes_exactly():
    train, val = cleaning_problem(M=2)
    seen = []

    def make(schedule):
        torch.manual_seed(0)
        trainer = BilevelTrainer(linear(), mse, train, val, lr=0.05, batch_size=8, seed=2,
                                 lr_schedule=schedule)
        trainer.step_callbacks.append(lambda tr, kind, _: seen.append(
            (tr.epoch, kind, tr.optimizer.param_groups[0]["lr"])))
        return trainer

    schedule = bk.trainers.cosine(4)
    full = make(schedule)
    full.fit(4)
    factors = [1.0, (1 + 2 ** -0.5) / 2, 0.5, (1 - 2 ** -0.5) / 2]  # (1 + cos(π e / 4)) / 2
    for epoch, kind, lr in seen:
        assert lr == pytest.approx(0.05 * factors[epoch], rel=1e-12), (epoch, kind)
    assert {e for e, _, _ in seen} == {0, 1, 2, 3}
    constant = make(None)
    constant.fit(4)  # the schedule changes the run: it is applied, not just recorded
    assert not torch.equal(constant.omega, full.omega)
    half = make(schedule)
    half.fit(2)
    resumed = make(schedule)
    resumed.load_state_dict(copy.deepcopy(half.state_dict()))
    resumed.fit(4)
    assert torch.equal(resumed.omega, full.omega)
    for (k, a), b in zip(full.models.state_dict().items(), resumed.models.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("factor", [-0.5, float("nan"), float("inf"), None])
def test_a_bad_lr_schedule_factor_names_the_epoch(factor):
    train, val = cleaning_problem()
    trainer = BilevelTrainer(linear(), mse, train, val, lr_schedule=lambda e: 1.0 if e == 0 else factor)
    trainer.fit(1)
    with pytest.raises(ValueError, match=r"lr_schedule\(1\) returned .*expected a finite number >= 0"):
        trainer.fit(2)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="cosine: epochs must be an integer >= 1"):
            bk.trainers.cosine(bad)


class ComplexLinear(torch.nn.Module):
    """y = Re(x · w) + b with a complex weight, or the same weight held as its real view (d, 2).
    The scalar b comes first, so in one flat vector of the parameters w starts at an odd
    offset (the costate and compiled routes slice such a vector)."""

    def __init__(self, w, as_real):
        super().__init__()
        self.as_real = as_real
        self.b = torch.nn.Parameter(torch.zeros(1, dtype=DT))
        self.w = torch.nn.Parameter(torch.view_as_real(w).clone() if as_real else w.clone())

    def forward(self, x):  # torch.complex: view_as_complex refuses a slice at an odd offset
        w = torch.complex(self.w[..., 0], self.w[..., 1]) if self.as_real else self.w
        return (x.to(w.dtype) @ w).real.unsqueeze(-1) + self.b


@pytest.mark.parametrize("hypergrad", [bk.hypergrad.Unrolled(steps=2, lr=0.1),
                                       bk.hypergrad.Unrolled(steps=2, lr=0.05, optimizer="adam"),
                                       bk.hypergrad.Unrolled(steps=2, lr=0.1, costate=bk.AdjointSweep()),
                                       bk.hypergrad.Unrolled(steps=2, lr=0.1, compile=True),
                                       bk.hypergrad.Implicit(steps=2, lr=0.1, iters=5)],
                         ids=["sgd", "adam", "costate", "compile", "implicit"])
def test_complex_parameters_take_part_in_the_upper_step_as_their_real_view(hypergrad):
    """A complex weight's run equals the run of the same model written with the weight's real
    view (an independent parametrisation): Ω and the weights agree after lower and upper steps."""
    train, val = cleaning_problem(M=2)
    w = torch.randn(5, dtype=torch.complex128, generator=torch.Generator().manual_seed(4))
    runs = []
    for as_real in (False, True):
        trainer = BilevelTrainer(ComplexLinear(w, as_real), mse, train, val, hypergrad=hypergrad,
                                 lr=0.05, meta_lr=0.3, batch_size=8, seed=3)
        trainer.fit(3)
        runs.append(trainer)
    complex_run, real_run = runs
    assert not torch.equal(complex_run.omega, torch.zeros_like(complex_run.omega))
    torch.testing.assert_close(complex_run.omega, real_run.omega, rtol=1e-10, atol=1e-12)
    for a, b in zip(complex_run.models, real_run.models):
        torch.testing.assert_close(torch.view_as_real(a.w.detach()), b.w.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.b.detach(), b.b.detach(), rtol=1e-10, atol=1e-12)


RESIDUAL_SCRIPT = """# BilevelTrainer with implicit hypergradients in 1 or 2 processes: writes the logged residuals
import json, sys
import torch
from torch.utils.data import TensorDataset
import bilevelkit as bk

if __name__ == "__main__":
    import torch.distributed as dist
    import os
    if len(sys.argv) > 3:  # rank, world size, rendezvous file: no port to race for
        dist.init_process_group("gloo", init_method="file://" + sys.argv[5], rank=int(sys.argv[3]),
                                world_size=int(sys.argv[4]))
    g = torch.Generator().manual_seed(int(sys.argv[2]))
    beta = torch.randn(5, generator=g, dtype=torch.float64)

    def group(n, scale):
        x = torch.randn(n, 5, generator=g, dtype=torch.float64)
        return TensorDataset(x, scale * (x @ beta) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64))

    train = [group(16, s) for s in (1.0, -1.0, 2.0, 0.5)]
    val = [group(16, s) for s in (1.0, -2.0, 0.3, 3.0)]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    loss = lambda m, b: ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()
    tr = bk.trainers.BilevelTrainer(model, loss, train, val, batch_size=8, val_batch_size=8,
                                    hypergrad=bk.hypergrad.Implicit(steps=1, lr=0.1, solver="neumann", iters=3))
    per_task = []
    orig = tr.hypergrad
    def spy(*a, **k):
        r = orig(*a, **k); per_task.append(r.residual); return r
    tr.hypergrad = spy
    tr.fit(2)
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump({"logged": [h["hypergrad_residual"] for h in tr.history], "per_task": per_task}, fh)
    if dist.is_initialized():
        dist.destroy_process_group()
    # the file rendezvous's store can abort the interpreter's teardown ("terminate called without
    # an active exception", 1 run in 6 here) after everything above has finished: skip it
    sys.stderr.flush()
    os._exit(0)
"""


def test_implicit_residual_in_the_logs_is_the_largest_over_all_processes(tmp_path):
    """Under torch.distributed each process solves for its own tasks; the epoch's logs carry the
    largest residual of all of them, as one process computes it (seed 1: a task of process 1
    has it in epoch 0, so process 0's own tasks alone would log less)."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "resid.py"
    script.write_text(RESIDUAL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.json"), "1"], env=env,
                   check=True, timeout=300)
    # two processes joined through a rendezvous file (torchrun would pick a free port, which a
    # launch running beside this test can take first)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "two.json"), "1",
                               str(rank), "2", str(tmp_path / "rendezvous")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    for rank, proc in enumerate(procs):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"process {rank} failed:\n{err[-3000:]}"
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert len(one["logged"]) == 2
    assert one["logged"][0] == max(one["per_task"][:4])
    assert two["logged"] == pytest.approx(one["logged"], rel=1e-9)
    assert max(two["per_task"][:2]) < two["logged"][0]  # process 0's own tasks had less


def test_a_model_and_batch_of_different_dtypes_are_named():
    x = torch.randn(16, 5, dtype=DT)
    data = TensorDataset(x, x.sum(1))
    conv = torch.nn.Sequential(torch.nn.Unflatten(1, (1, 5)), torch.nn.Conv1d(1, 1, 3),
                               torch.nn.Flatten(), torch.nn.Linear(3, 1))
    for model in (torch.nn.Linear(5, 1), conv):  # float32 weights, float64 data
        with pytest.raises(ValueError, match=r"epoch 0, task 'task0', group 'group0': the loss failed "
                                             r"on a dtype mismatch: the model's parameters are "
                                             r"float32, the batch holds float64 tensors"):
            BilevelTrainer(model, mse, [data, data], [data], batch_size=4).fit(1)
        with pytest.raises(ValueError, match=r"epoch 0, step 0: the loss failed on a dtype mismatch"):
            MLMTrainer(model, mse).fit([data[:8]], 1)
    with pytest.raises(RuntimeError, match="boom"):  # other errors pass through unchanged
        MLMTrainer(linear(), lambda m, b: (_ for _ in ()).throw(RuntimeError("boom"))).fit([data[:8]], 1)


def test_upper_loss_is_the_objective_of_the_upper_step():
    """With ``upper_loss`` the upper step descends d upper_loss(θ − η Σ_i W_i ∇ℓ_i(θ)) / dΩ:
    Ω under SGD(lr=1) moves by minus that, computed here by autograd through the look-ahead;
    the logged validation losses are ``upper_loss``'s, and ``loss`` itself is not used there."""
    train, val = cleaning_problem(N=3, M=2)
    eta = 0.1

    def mean_log(model, batch):  # the mean log of every sample's squared error
        X, y = batch
        return ((model(X).squeeze(-1) - y) ** 2).log().mean()

    trainer = BilevelTrainer(linear(), mse, train, val, upper_loss=mean_log, batch_size=None,
                             hypergrad=bk.hypergrad.Unrolled(steps=1, lr=eta))
    trainer.meta_optimizer = torch.optim.SGD([trainer.omega], lr=1.0)
    omega = torch.randn(trainer.omega.shape, generator=torch.Generator().manual_seed(5), dtype=DT)
    with torch.no_grad():
        trainer.omega.copy_(omega)
        trainer.models[1].weight.add_(0.3)  # task models that differ: each task's own is used
    logged = trainer.upper_step()

    whole = [ds.tensors for ds in train]
    for j, model in enumerate(trainer.models):
        om = omega[:, j].clone().requires_grad_()
        w = torch.softmax(om, 0)
        params = dict(model.named_parameters())
        inner = sum(w[i] * mse(lambda X: torch.func.functional_call(model, params, (X,)), b)
                    for i, b in enumerate(whole))
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        new = {n: p - eta * g for (n, p), g in zip(params.items(), grads)}
        outer = mean_log(lambda X: torch.func.functional_call(model, new, (X,)), val[j].tensors)
        expected = torch.autograd.grad(outer, om)[0]
        torch.testing.assert_close(omega[:, j] - trainer.omega[:, j].detach(), expected,
                                   rtol=1e-9, atol=1e-12)
        assert logged[j] == pytest.approx(float(outer.detach()), rel=1e-12)
        with torch.no_grad():
            assert abs(float(outer) - float(mse(model, val[j].tensors))) > 1e-3  # not the training loss
    with pytest.raises(ValueError, match="upper_loss must be a function"):
        BilevelTrainer(linear(), mse, train, val, upper_loss="log")
    per_sample = BilevelTrainer(linear(), mse, train, val,
                                upper_loss=lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2)
    with pytest.raises(ValueError, match=r"upper_loss\(model, batch\) must return a scalar, got shape \(32,\)"):
        per_sample.fit(1)
    log_of_zero = BilevelTrainer(linear(), mse, train, val,
                                 upper_loss=lambda m, b: (0 * mse(m, b)).log())
    with pytest.raises(NonFiniteError, match=r"epoch 0, task 'task0': hypergradient failed: .*"
                                             r"upper_loss\(model, batch\) on the validation minibatch"):
        log_of_zero.fit(1)
    assert not log_of_zero.omega.any()
