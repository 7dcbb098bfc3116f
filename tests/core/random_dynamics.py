"""Random control systems for property tests: the cases Theorem 1 must hold on."""
from __future__ import annotations

import math

import torch
from hypothesis import strategies as st
from torch import nn

import bilevelkit as bk

ACTIVATIONS = ("tanh", "relu", "linear")
SHARING = ("per-phase", "shared", "both")


def activate(z: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "tanh":
        return torch.tanh(z)
    if kind == "relu":  # split ReLU for complex states
        return torch.complex(z.real.relu(), z.imag.relu()) if z.is_complex() else z.relu()
    return z


class RandomDynamics(bk.Dynamics):
    """``x_t = act(S W_t x_{t-1} + b_t) + x_{t-1}/2`` with per-phase and/or shared weights."""

    def __init__(self, horizon, width, complex_states, sharing, activation, initial_params, seed):
        super().__init__()
        self.horizon, self.activation = horizon, activation
        g = torch.Generator().manual_seed(seed)
        dtype = torch.complex128 if complex_states else torch.float64

        def param(*shape):
            return nn.Parameter(torch.randn(*shape, generator=g, dtype=dtype) / math.sqrt(width))

        self.W0 = param(width, width) if initial_params else None
        per_phase = sharing in ("per-phase", "both")
        self.W = nn.ParameterList([param(width, width) for _ in range(horizon)]) if per_phase else None
        self.b = nn.ParameterList([param(width) for _ in range(horizon)]) if per_phase else None
        self.S = param(width, width) if sharing in ("shared", "both") else None
        self.gain = nn.Parameter(torch.tensor(0.9, dtype=torch.float64))  # real, shared

    def initial(self, ctx):
        return ctx["f"] @ self.W0.T if self.W0 is not None else ctx["f"]

    def step(self, t, x, ctx):
        z = x
        if self.W is not None:
            z = z @ self.W[t - 1].T + self.b[t - 1]
        if self.S is not None:
            z = z @ self.S.T
        return self.gain * activate(z, self.activation) + 0.5 * x


def make_loss(y: torch.Tensor):
    def loss(x):
        return ((x - y).abs() ** 2).mean() + 0.1 * (x.abs() ** 4).mean()
    return loss


@st.composite
def problems(draw, max_horizon=12):
    """A random ``(dynamics, ctx, loss)`` in float64/complex128."""
    T = draw(st.integers(1, max_horizon))
    width = draw(st.integers(1, 5))
    batch = draw(st.integers(1, 3))
    complex_states = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    dyn = RandomDynamics(T, width, complex_states, draw(st.sampled_from(SHARING)),
                         draw(st.sampled_from(ACTIVATIONS)), draw(st.booleans()), seed)
    g = torch.Generator().manual_seed(seed + 1)
    dtype = torch.complex128 if complex_states else torch.float64
    f = torch.randn(batch, width, generator=g, dtype=dtype)
    y = torch.randn(batch, width, generator=g, dtype=dtype)
    return dyn, {"f": f}, make_loss(y)
