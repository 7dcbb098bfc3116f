"""The two training loops: Algorithm 3 (MLM) and Algorithm 1 (bilevel meta-learning).

``MLMTrainer`` trains one dynamics by forward states, backward multipliers (any costate
solver) and an Adam step on θ. ``BilevelTrainer`` trains M task models on N weighted training
groups and learns the weight matrix ``W = σ(Ω)`` (``Ω ∈ R^{N×M}``, normalized column by column)
from the validation losses of the M tasks (the training loss, or a given ``upper_loss``).

Data are plain indexable datasets (``len`` and ``__getitem__``, e.g. a ``TensorDataset`` or an
MRI ``SliceDataset``); minibatch indices come from the trainer's own seeded generator, so a
run restored with ``load_state_dict`` continues exactly as if never interrupted. Under
``torch.distributed`` each rank takes its share of every global minibatch and gradients and
hypergradients are averaged across ranks.
"""
from __future__ import annotations

import copy
import functools
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import Dataset, IterableDataset, default_collate

from . import hypergrad as hg
from . import normalizers
from .costate import AdjointSweep
from .dynamics import Dynamics, check_loss

__all__ = ["TerminalLoss", "NonFiniteError", "MLMTrainer", "BilevelTrainer", "cosine"]

Callback = Callable[[Any, dict], None]


class NonFiniteError(FloatingPointError):
    """A loss or (hyper)gradient was NaN or infinite; the step was not applied."""


@dataclass
class TerminalLoss:
    """A loss of a :class:`Dynamics` on a batch: ``ℓ(x_T, batch) [+ ℓ_0(x_0, batch)]``.

    ``ctx = context(batch)``; ``terminal`` is the loss on the final state and the optional
    ``initial`` a loss on ``x_0 = F_0(f; θ_0)`` (it only reaches ``θ_0``, so its gradient is
    one back-propagation through ``F_0``, added to the costate solver's). Callable as
    ``loss(model, batch)`` (plain rollout, for hypergradients and evaluation); the trainers use
    the parts to run a costate solver instead.
    """

    context: Callable[[Any], Any]
    terminal: Callable[[Tensor, Any], Tensor]
    initial: Callable[[Tensor, Any], Tensor] | None = None

    def __call__(self, model: Dynamics, batch: Any) -> Tensor:
        states = model.rollout(self.context(batch))
        value = check_loss(self.terminal(states[-1], batch), "terminal(x_T, batch)")
        if self.initial is None:
            return value
        return value + check_loss(self.initial(states[0], batch), "initial(x_0, batch)")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(tensors: Sequence[Tensor], mean: bool = True) -> None:
    """Sum (or average) tensors across ranks in place (no-op without torch.distributed)."""
    rank, world = _world()
    if world > 1:
        for t in tensors:
            dist.all_reduce(t)
            if mean:
                t.div_(world)


def _finite_or_raise(value: Tensor, what: str) -> None:
    if not normalizers.all_finite(value):
        raise NonFiniteError(f"{what} is not finite ({value.detach().flatten()[:4].tolist()}...); "
                             "the step was not applied and the last good state is kept")


def _integer(value: Any) -> int | None:
    """``value`` as an int if it is an integer (Python's or numpy's, not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def _check_epochs(epochs: Any) -> int:
    n = _integer(epochs)
    if n is None or n < 0:
        raise ValueError(f"epochs must be an integer >= 0 (the epoch count to reach), got {epochs!r}")
    return n


def _check_costate(costate: Any, loss: Any) -> None:
    """A solver instance, given with a :class:`TerminalLoss` (a plain loss would ignore it)."""
    if costate is None:
        return
    if isinstance(costate, type) or not callable(getattr(costate, "backward", None)):
        raise ValueError(f"costate must be a solver instance such as bk.AdjointSweep() or "
                         f"bk.CheckpointedSweep(3), got {costate!r}")
    if not isinstance(loss, TerminalLoss):
        raise ValueError("costate needs the loss as a TerminalLoss(context, terminal): the solver "
                         "runs the dynamics itself; a plain loss(model, batch) is trained by "
                         "autograd, so leave costate out with it")


def _check_groups(name: str, groups: Any) -> None:
    """A sequence of datasets, not one dataset (whose samples would each become a group)."""
    if isinstance(groups, Dataset) or not isinstance(groups, Sequence):
        raise ValueError(f"{name} must be a list of datasets, one per "
                         f"{'group' if name == 'train_groups' else 'task'}; got "
                         f"{type(groups).__name__}" + (" (one dataset: wrap it in a list)"
                                                       if isinstance(groups, Dataset) else ""))


def _check_normalizer(normalizer: Callable, n: int, dtype: torch.dtype, device: Any) -> None:
    """A callable σ is called as ``σ(scores, dim=0)`` and must land on the simplex."""
    probe = 0.5 * torch.arange(n, dtype=dtype, device=device)
    try:
        w = normalizer(probe, dim=0)
    except TypeError as err:
        raise ValueError(f"a normalizer is called as normalizer(scores, dim=0) and must map each "
                         f"slice along dim onto the simplex; calling it failed: {err}") from None
    if not (isinstance(w, Tensor) and w.shape == probe.shape and bool((w >= 0).all())
            and abs(float(w.sum()) - 1) < 1e-4):
        raise ValueError(f"a normalizer must map scores onto the probability simplex (weights "
                         f">= 0 summing to 1 along dim); it maps {probe.tolist()} to "
                         f"{w.tolist() if isinstance(w, Tensor) else w!r}")


def _real_dtypes(obj: Any) -> set[torch.dtype]:
    """The real dtypes (complex64 counts as float32) of the float tensors in a nested batch."""
    if isinstance(obj, Tensor):
        return {obj.dtype.to_real()} if obj.is_floating_point() or obj.is_complex() else set()
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return set().union(*(_real_dtypes(x) for x in items))


def _backward_named(model: nn.Module, loss: Callable, batch: Any, scale: float | Tensor,
                    costate: Any, where: str) -> Tensor:
    """:func:`_backward`; a dtype mismatch between the model and the batch is named."""
    try:
        return _backward(model, loss, batch, scale, costate)
    except RuntimeError as err:
        ours = _real_dtypes(list(model.parameters()))
        theirs = _real_dtypes(batch)
        text = str(err)
        dtype_words = ("dtype", "scalar type", "Input type", "Double", "Float", "Half")
        if not (ours and theirs - ours and any(w in text for w in dtype_words)):
            raise
        fmt = lambda ds: ", ".join(sorted(str(d).replace("torch.", "") for d in ds))  # noqa: E731
        raise ValueError(
            f"{where}: the loss failed on a dtype mismatch: the model's parameters are "
            f"{fmt(ours)}, the batch holds {fmt(theirs)} tensors; convert the data (e.g. in "
            f"collate) or the model (e.g. model.double()). torch said: {text.splitlines()[0]}"
        ) from None


def _backward(model: nn.Module, loss: Callable, batch: Any, scale: float | Tensor,
              costate: Any) -> Tensor:
    """Accumulate ``scale · ∇_θ loss(model, batch)`` into ``.grad``; return the loss value."""
    if costate is not None and isinstance(loss, TerminalLoss):
        ctx = loss.context(batch)
        value = costate.backward(model, ctx, lambda x: scale * loss.terminal(x, batch)) / scale
        if loss.initial is not None:
            with torch.enable_grad():
                value_0 = check_loss(loss.initial(model.initial(ctx), batch), "initial(x_0, batch)")
            if value_0.requires_grad:
                (scale * value_0).backward()
            value = value + value_0.detach()
        return value
    value = check_loss(loss(model, batch), "loss(model, batch)")
    (scale * value).backward()
    return value.detach()


class _Sampler:
    """Seeded minibatches from indexable datasets; each rank takes its slice of the batch."""

    def __init__(self, seed: int, collate: Callable):
        self.generator = torch.Generator().manual_seed(seed)
        self.collate = collate

    def indices(self, dataset: Any, size: int | None) -> Tensor:
        n = len(dataset)
        return torch.arange(n) if size is None or size >= n else \
            torch.randperm(n, generator=self.generator)[:size]

    def collect(self, dataset: Any, idx: Tensor, split: bool = True) -> Any:
        """The samples ``idx`` collated; with ``split`` only this rank's share of them."""
        if split:
            rank, world = _world()
            idx = idx[rank::world]
        return self.collate([dataset[int(i)] for i in idx])

    def batch(self, dataset: Any, size: int | None) -> Any:
        """A random minibatch (the same on every rank), this rank's share of it."""
        return self.collect(dataset, self.indices(dataset, size))


class MLMTrainer:
    """Algorithm 3: forward states, backward multipliers, an optimizer step on θ.

    ``loss`` is a :class:`TerminalLoss` (or any ``loss(model, batch)``, then trained by plain
    autograd); ``costate`` any solver (default :class:`AdjointSweep`); the optimizer Adam with
    learning rate ``lr`` unless one is given. Every solver gives the same trajectory.
    """

    def __init__(self, dynamics: Dynamics, loss: TerminalLoss | Callable, *, costate: Any = None,
                 lr: float = 1e-3, optimizer: torch.optim.Optimizer | None = None,
                 callbacks: Sequence[Callback] = ()):
        _check_costate(costate, loss)
        self.dynamics, self.loss = dynamics, loss
        self.costate = AdjointSweep() if costate is None else costate
        self.optimizer = optimizer or torch.optim.Adam(dynamics.parameters(), lr=lr)
        self.callbacks = list(callbacks)
        self.epoch = 0
        self.history: list[float] = []

    def step(self, batch: Any) -> float:
        """One iteration on ``batch``; returns its loss."""
        self.optimizer.zero_grad(set_to_none=True)
        value = _backward_named(self.dynamics, self.loss, batch, 1.0, self.costate,
                                f"epoch {self.epoch}, step {len(self.history)}")
        grads = [p.grad for p in self.dynamics.parameters() if p.grad is not None]
        _all_reduce([value, *grads])
        try:
            _finite_or_raise(value, f"epoch {self.epoch}, step {len(self.history)}: loss")
            for (name, p) in self.dynamics.named_parameters():
                if p.grad is not None:
                    _finite_or_raise(p.grad, f"epoch {self.epoch}: gradient of {name!r}")
        except NonFiniteError:
            self.optimizer.zero_grad(set_to_none=True)
            raise
        self.optimizer.step()
        self.history.append(float(value))
        return float(value)

    def fit(self, batches: Callable[[int], Any] | Sequence[Any], epochs: int) -> list[float]:
        """Run until ``epochs``; ``batches`` is a sequence of batches or ``epoch -> iterable``."""
        epochs = _check_epochs(epochs)
        if isinstance(batches, Dataset) and not isinstance(batches, IterableDataset):
            raise ValueError("batches must be a sequence of batches (a DataLoader, a list) or a "
                             "function epoch -> batches; got a Dataset, whose items are single "
                             "samples: wrap it in a DataLoader")
        while self.epoch < epochs:
            losses = [self.step(b) for b in (batches(self.epoch) if callable(batches) else batches)]
            if not losses:
                raise ValueError(f"epoch {self.epoch}: batches gave no batch to train on (a one-shot "
                                 "iterator, such as a generator, is used up after one epoch: pass "
                                 "a list, a DataLoader or a function epoch -> batches)")
            logs = {"epoch": self.epoch, "loss": sum(losses) / max(len(losses), 1)}
            self.epoch += 1
            for cb in self.callbacks:
                cb(self, logs)
        return self.history

    def state_dict(self) -> dict:
        return {"model": copy.deepcopy(self.dynamics.state_dict()),
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "epoch": self.epoch, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.dynamics.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.history = state["epoch"], list(state["history"])


def cosine(epochs: int) -> Callable[[int], float]:
    """Half-cosine decay over ``epochs``: epoch ``e`` (from 0) gets ``(1 + cos(π e / epochs)) / 2``
    of the learning rate, 1 at the first epoch, near 0 at the last. For ``lr_schedule``."""
    n = _integer(epochs)
    if n is None or n < 1:
        raise ValueError(f"cosine: epochs must be an integer >= 1, got {epochs!r}")
    return lambda e: 0.5 * (1 + math.cos(math.pi * e / n))


class _Bound(nn.Module):
    """``forward(batch) = loss(model, batch)``, so ``functional_call`` can swap θ."""

    def __init__(self, model: nn.Module, loss: Callable):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch: Any) -> Tensor:
        return self.loss(self.model, batch)


class BilevelTrainer:
    """Algorithm 1: lower-level training of M task models, upper-level steps on Ω.

    N training groups ``train_groups`` and M validation tasks ``val_tasks`` (indexable
    datasets). Task ``j`` has its own copy of ``model``; sub-modules named in ``shared`` (e.g.
    ``("initial_net",)``) are one object for all tasks. ``Ω`` is ``(N, M)``, or ``(N,)`` when
    ``M = 1``, initialised to 0 (uniform weights); ``W = σ(Ω)`` column by column.

    One epoch: ``lower_steps`` times, draw a minibatch of every group and take one optimizer
    step (Adam, ``lr``) on ``Σ_j Σ_i W_ij ℓ(θ^(j); B_i)`` (groups with ``W_ij = 0`` are not
    evaluated; ``groups_per_step = g`` replaces the sum over all N groups by an unbiased
    estimate from g groups drawn from ``W_:j``, so a step costs g instead of N); then ``upper_steps`` times, compute each column's hypergradient with
    ``hypergrad`` (default ``Unrolled(steps=1, lr=inner_lr)``) on fresh minibatches and take an
    Adam step (``meta_lr``) on Ω. ``mode="joint"`` keeps Ω = 0: uniform weights, the baseline.
    ``costate`` (with a :class:`TerminalLoss`) trains the lower level by a costate solver.
    ``lr_schedule(e)`` multiplies ``lr`` for the lower steps of epoch ``e`` (from 0), e.g.
    :func:`cosine`; a function of the epoch alone, so a resumed run continues it exactly.
    ``upper_loss(model, batch)`` is the upper objective on the validation tasks (default
    ``loss``; unused in joint mode), e.g. a metric the lower level is not trained on (it must
    still be differentiable in the weights) or one that weighs every validation sample alike;
    the upper steps' ``val_loss`` logs are its values.

    ``normalizer`` is a name of ``normalizers.NAMES`` or a callable ``σ(scores, dim=0)`` that
    maps each slice along ``dim`` onto the simplex (checked once on a probe). Complex
    parameters take part in the hypergradient as their real views ``(..., 2)``.

    ``callbacks(trainer, logs)`` run after every epoch (logging, checkpoints; ``logs`` has
    ``epoch``, ``train_loss``, ``val_loss``, ``weights`` and, with :class:`Implicit`
    hypergradients, ``hypergrad_residual``, the largest relative residual of the epoch's solves),
    ``step_callbacks(trainer, "lower" | "upper", losses)`` after every step (progress bars). A
    non-finite loss, gradient or hypergradient raises :class:`NonFiniteError` naming the epoch
    and task before anything is updated.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: TerminalLoss | Callable[[nn.Module, Any], Tensor],
        train_groups: Sequence[Any],
        val_tasks: Sequence[Any],
        *,
        group_names: Sequence[str] | None = None,
        task_names: Sequence[str] | None = None,
        mode: str = "meta",
        normalizer: str | Callable = "softmax",
        hypergrad: Any = None,
        inner_lr: float = 1e-2,
        lower_steps: int = 1,
        upper_steps: int = 1,
        lr: float = 1e-3,
        meta_lr: float = 0.1,
        batch_size: int | None = 8,
        val_batch_size: int | None = None,
        groups_per_step: int | None = None,
        shared: Sequence[str] = (),
        costate: Any = None,
        lr_schedule: Callable[[int], float] | None = None,
        upper_loss: Callable[[nn.Module, Any], Tensor] | None = None,
        seed: int = 0,
        collate: Callable = default_collate,
        callbacks: Sequence[Callback] = (),
        step_callbacks: Sequence[Callable[[Any, str, list[float]], None]] = (),
    ):
        _check_groups("train_groups", train_groups)
        _check_groups("val_tasks", val_tasks)
        _check_costate(costate, loss)
        if hypergrad is not None and (isinstance(hypergrad, type) or not callable(hypergrad)):
            raise ValueError("hypergrad must be a strategy instance such as "
                             "bk.hypergrad.Unrolled(steps=1, lr=0.01), FirstOrder(...) or "
                             f"Implicit(...), got {hypergrad!r}")
        if not train_groups or not val_tasks:
            raise ValueError("BilevelTrainer needs at least one training group and one "
                             f"validation task, got {len(train_groups)} and {len(val_tasks)}")
        if mode not in ("meta", "joint"):
            raise ValueError(f"mode must be 'meta' or 'joint', got {mode!r}")
        for name, v in (("lower_steps", lower_steps), ("upper_steps", upper_steps)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        for name, v in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be None (whole dataset) or an integer >= 1, got {v!r}")
        rates = [("lr", lr), ("meta_lr", meta_lr)] + ([("inner_lr", inner_lr)] if hypergrad is None else [])
        for name, v in rates:
            hg.check_rate(name, v)
        N, M = len(train_groups), len(val_tasks)
        self.group_names = list(group_names or [f"group{i}" for i in range(N)])
        self.task_names = list(task_names or [f"task{j}" for j in range(M)])
        if len(self.group_names) != N or len(self.task_names) != M:
            raise ValueError("group_names/task_names must name every group/task once")
        for kind, names, sets in (("training group", self.group_names, train_groups),
                                  ("validation task", self.task_names, val_tasks)):
            for name, data in zip(names, sets):
                if len(data) == 0:
                    raise ValueError(f"{kind} {name!r} is empty")
        if upper_loss is not None and not callable(upper_loss):
            raise ValueError(f"upper_loss must be a function (model, batch) -> scalar, got {upper_loss!r}")
        self.loss, self.train_groups, self.val_tasks = loss, list(train_groups), list(val_tasks)
        self.upper_loss = loss if upper_loss is None else (  # named if it is not a scalar
            lambda model, batch: check_loss(upper_loss(model, batch), "upper_loss(model, batch)"))
        self.mode, self.normalizer = mode, normalizers.get(normalizer)
        if not isinstance(normalizer, str):  # called as σ(Ω, dim=0) here, σ(column) by strategies
            self.normalizer = functools.partial(self.normalizer, dim=0)
        self.hypergrad = hypergrad or hg.Unrolled(steps=1, lr=inner_lr)
        self.lower_steps, self.upper_steps = lower_steps, upper_steps
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        if groups_per_step is not None and (not isinstance(groups_per_step, int)
                                            or isinstance(groups_per_step, bool) or groups_per_step < 1):
            raise ValueError(f"groups_per_step must be None or an integer >= 1, got {groups_per_step!r}")
        self.groups_per_step = groups_per_step
        self.costate, self.callbacks = costate, list(callbacks)
        self.lr, self.lr_schedule = lr, lr_schedule
        self.step_callbacks = list(step_callbacks)

        self.models = nn.ModuleList(copy.deepcopy(model) for _ in range(M))
        for name in shared:
            try:
                common = self.models[0].get_submodule(name)
            except AttributeError as err:
                raise ValueError(f"shared={name!r}: the model has no sub-module of that name") from err
            for m in self.models[1:]:
                m.set_submodule(name, common)
        ref = next(iter(self.models[0].parameters()), torch.zeros(()))
        dtype = (ref.dtype.to_real() if ref.is_floating_point() or ref.is_complex()
                 else torch.get_default_dtype())  # Ω is real: complex64 weights give float32
        self.omega = torch.zeros((N, M) if M > 1 else (N,), dtype=dtype, device=ref.device)
        if not isinstance(normalizer, str):
            _check_normalizer(self.normalizer, N, dtype, ref.device)
        self.optimizer = torch.optim.Adam(self._unique_params(), lr=lr)
        self.meta_optimizer = torch.optim.Adam([self.omega], lr=meta_lr)
        self.sampler = _Sampler(seed, collate)
        self.epoch = 0
        self.history: list[dict] = []
        self._residuals: list[float] = []  # of implicit hypergradients' solves, this epoch

    def _param_name(self, param: nn.Parameter) -> str:
        """``task 'name', parameter 'sub.module.weight'`` (the first task holding a shared one)."""
        for j, m in enumerate(self.models):
            for n, p in m.named_parameters():
                if p is param:
                    return f"task {self.task_names[j]!r}, parameter {n!r}"
        return "a parameter"

    def _unique_params(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for m in self.models:
            for p in m.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    @property
    def weights(self) -> Tensor:
        """``W = σ(Ω)`` (N×M, each column on the simplex; a vector when M = 1), detached."""
        return self.normalizer(self.omega.detach(), dim=0)

    def _column(self, j: int) -> tuple[Tensor, Tensor]:
        omega = self.omega if self.omega.dim() == 1 else self.omega[:, j]
        return omega, self.normalizer(omega.detach(), dim=0)

    def _lower_terms(self, j: int) -> list[tuple[int, Tensor]]:
        """``(i, c_i)`` with ``Σ_i c_i ℓ_i`` the task's lower-level loss: ``c = W_:j`` over the
        groups with positive weight or, with ``groups_per_step = g``, the unbiased estimate
        from ``g`` groups drawn from ``W_:j`` (``c_i`` = draws of ``i`` / ``g``)."""
        _, w = self._column(j)
        if self.groups_per_step is None:
            return [(i, w[i]) for i in range(len(w)) if float(w[i]) > 0]
        draws = torch.multinomial(w.cpu(), self.groups_per_step, replacement=True,
                                  generator=self.sampler.generator)
        counts = torch.bincount(draws, minlength=len(w)).to(w)
        return [(i, counts[i] / self.groups_per_step) for i in range(len(w)) if counts[i] > 0]

    def lower_step(self) -> list[float]:
        """One optimizer step on ``Σ_j Σ_i W_ij ℓ(θ^(j); B_i)``; returns each task's loss."""
        self.optimizer.zero_grad(set_to_none=True)
        batches: dict[int, Any] = {}
        losses = []
        for j, model in enumerate(self.models):
            total = torch.zeros((), dtype=self.omega.dtype, device=self.omega.device)
            for i, c in self._lower_terms(j):
                if i not in batches:
                    batches[i] = self.sampler.batch(self.train_groups[i], self.batch_size)
                total = total + c * _backward_named(
                    model, self.loss, batches[i], c, self.costate,
                    f"epoch {self.epoch}, task {self.task_names[j]!r}, group {self.group_names[i]!r}")
            losses.append(total)
        params = self._unique_params()
        _all_reduce([*losses, *(p.grad for p in params if p.grad is not None)])
        try:
            for j, value in enumerate(losses):
                _finite_or_raise(value, f"epoch {self.epoch}, task {self.task_names[j]!r}: "
                                        "weighted training loss")
            for p in params:
                if p.grad is not None:
                    _finite_or_raise(p.grad, f"epoch {self.epoch}: the lower-level gradient of "
                                             f"{self._param_name(p)}")
        except NonFiniteError:
            self.optimizer.zero_grad(set_to_none=True)
            raise
        self.optimizer.step()
        return [float(v) for v in losses]

    def upper_step(self) -> list[float]:
        """One Adam step on Ω from every task's hypergradient; returns the validation losses."""
        grad = torch.zeros_like(self.omega)
        val_losses = torch.zeros(len(self.models), dtype=grad.dtype, device=grad.device)
        plans = [([self.sampler.indices(g, self.batch_size) for g in self.train_groups],
                  self.sampler.indices(v, self.val_batch_size)) for v in self.val_tasks]
        rank, world = _world()
        for j, model in enumerate(self.models):
            if j % world != rank:  # under torch.distributed, tasks are shared out among ranks
                continue
            bound = _Bound(model, self.loss)
            batches = [self.sampler.collect(g, idx, split=False)
                       for g, idx in zip(self.train_groups, plans[j][0])]
            val = self.sampler.collect(self.val_tasks[j], plans[j][1], split=False)

            # the look-ahead works on copies of the buffers (e.g. batch-norm statistics), which
            # the upper level must not update, and moves only what the lower level trains
            buffers = {f"model.{n}": b.clone() for n, b in model.named_buffers()}
            omega, w = self._column(j)
            # groups of zero weight (sparsemax) cost nothing; decided here, not inside the loss,
            # so the loss has no data-dependent branch (torch.compile) and no device syncs
            support = [i for i, x in enumerate(w.tolist()) if x > 0]

            # hypergradients work on real tensors: a complex weight takes part as its real view
            # (..., 2), whose gradient is torch's (∂/∂Re + i ∂/∂Im) for complex parameters
            params = {f"model.{n}": p.detach() for n, p in model.named_parameters() if p.requires_grad}
            complex_names = frozenset(n for n, p in params.items() if p.is_complex())
            params = {n: torch.view_as_real(p) if n in complex_names else p for n, p in params.items()}

            def as_model(params, buffers=buffers, complex_names=complex_names):
                # torch.complex, not view_as_complex: the strategies may hand over slices of one
                # flat vector, whose offsets view_as_complex refuses
                return {**buffers, **{n: torch.complex(p[..., 0], p[..., 1]) if n in complex_names
                                      else p for n, p in params.items()}}

            def group_loss(params, bound=bound, batch=None, as_model=as_model):
                return functional_call(bound, as_model(params), (batch,))

            # term by term, so that a one-step look-ahead takes each group's gradient once
            inner_loss = hg.WeightedSum({i: functools.partial(group_loss, batch=batches[i])
                                         for i in support})

            upper = bound if self.upper_loss is self.loss else _Bound(model, self.upper_loss)

            def outer_loss(params, bound=upper, val=val, as_model=as_model):
                return functional_call(bound, as_model(params), (val,))

            try:
                res = self.hypergrad(inner_loss, outer_loss, params, omega.detach(),
                                     normalizer=self.normalizer)
            except (FloatingPointError, hg.NegativeCurvatureError) as err:
                kind = NonFiniteError if isinstance(err, FloatingPointError) else type(err)
                named = "" if self.upper_loss is self.loss else \
                    " (outer_loss is upper_loss(model, batch) on the validation minibatch)"
                raise kind(f"epoch {self.epoch}, task {self.task_names[j]!r}: hypergradient "
                           f"failed: {err}{named}; Ω was not updated") from err
            if grad.dim() == 1:
                grad.copy_(res.hypergrad)
            else:
                grad[:, j] = res.hypergrad
            val_losses[j] = res.outer_loss
            if res.residual is not None:
                self._residuals.append(res.residual)
        _all_reduce([grad, val_losses], mean=False)
        for j in range(len(self.models)):
            column = grad if grad.dim() == 1 else grad[:, j]
            _finite_or_raise(column, f"epoch {self.epoch}, task {self.task_names[j]!r}: hypergradient")
        self.meta_optimizer.zero_grad(set_to_none=True)
        self.omega.grad = grad
        self.meta_optimizer.step()
        self.omega.grad = None
        return val_losses.tolist()

    def run_epoch(self) -> dict:
        """Lower steps, then (in meta mode) upper steps; returns the epoch's logs."""
        if self.lr_schedule is not None:
            got = self.lr_schedule(self.epoch)
            try:  # Python and numpy numbers and one-element tensors
                factor = float(got)
            except (TypeError, ValueError, RuntimeError):
                factor = float("nan")
            if isinstance(got, bool) or not math.isfinite(factor) or factor < 0:
                raise ValueError(f"lr_schedule({self.epoch}) returned {got!r}; expected a "
                                 "finite number >= 0 (the factor of lr for that epoch)")
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * factor
        train, val = [], []
        for kind, step, out in (("lower", self.lower_step, train), ("upper", self.upper_step, val)):
            for _ in range(self.lower_steps if kind == "lower" else
                           self.upper_steps if self.mode == "meta" else 0):
                out.append(step())
                for cb in self.step_callbacks:
                    cb(self, kind, out[-1])
        mean = lambda rows: [sum(c) / len(c) for c in zip(*rows)] if rows else []  # noqa: E731
        logs = {"epoch": self.epoch, "train_loss": mean(train), "val_loss": mean(val),
                "weights": self.weights.cpu().tolist()}
        residual = max(self._residuals, default=-1.0)  # an unconverged implicit solve shows here
        self._residuals = []
        # every process solves for its own tasks: the largest of them all (no upper step, no solve)
        if _world()[1] > 1 and self.mode == "meta" and self.upper_steps:
            worst = torch.tensor([residual], dtype=torch.float64, device=self.omega.device)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            residual = float(worst)
        if residual >= 0:
            logs["hypergrad_residual"] = residual
        self.epoch += 1
        self.history.append(logs)
        for cb in self.callbacks:
            cb(self, logs)
        return logs

    def fit(self, epochs: int) -> list[dict]:
        """Run epochs until ``self.epoch == epochs`` (resumes where a restored state left off)."""
        epochs = _check_epochs(epochs)
        while self.epoch < epochs:
            self.run_epoch()
        return self.history

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: models, Ω, optimizers, sampler RNG, epoch."""
        # copies, not views: a state kept in memory must not move on with further training
        return {"models": copy.deepcopy(self.models.state_dict()), "omega": self.omega.detach().clone(),
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "meta_optimizer": copy.deepcopy(self.meta_optimizer.state_dict()),
                "sampler": self.sampler.generator.get_state(), "epoch": self.epoch,
                "history": copy.deepcopy(self.history)}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["omega"].shape) != tuple(self.omega.shape):
            raise ValueError(f"checkpoint has Ω of shape {tuple(state['omega'].shape)}, this "
                             f"trainer has {tuple(self.omega.shape)} (groups × tasks differ)")
        self.models.load_state_dict(state["models"])
        with torch.no_grad():
            self.omega.copy_(state["omega"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.sampler.generator.set_state(state["sampler"])
        self.epoch, self.history = state["epoch"], copy.deepcopy(state["history"])
