"""Shared test settings.

Hypothesis runs derandomized (a CI failure reproduces locally) with no deadline (torch's first
calls are slow). ``HYPOTHESIS_PROFILE=fast`` cuts every property to a few examples for quick
local iteration; the default profile is what CI runs.
"""
import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("fast", parent=settings.get_profile("default"), max_examples=10)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(1)  # small tensors: one thread is faster and never oversubscribes
