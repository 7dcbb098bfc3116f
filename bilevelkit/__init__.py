"""bilevelkit: unrolled networks and meta-learned hyperparameters as optimal control.

The core imports torch only. See ``docs/theory.md`` for the maths and ``docs/guide.md`` for
writing your own :class:`Dynamics`.
"""
from . import normalizers, hypergrad, trainers, testing
from .costate import AdjointSweep, AutogradCostate, CheckpointedSweep, CostateResult
from .dynamics import Dynamics
from .lagrangian import Lagrangian

__all__ = [
    "Dynamics", "Lagrangian", "CostateResult", "AutogradCostate", "AdjointSweep",
    "CheckpointedSweep", "normalizers", "hypergrad", "trainers", "testing",
]
__version__ = "0.1.0"
