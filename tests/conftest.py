"""Shared pytest set-up, kept generic: a hypothesis profile and the `gpu` marker's skip."""

import os

import pytest
import torch
from hypothesis import settings

# Shared 2-core CI machines make per-example timings noisy (the first example also pays for
# torch's warm-up), so no deadline by default. Example counts stay whatever each test asks.
settings.register_profile("attnkit", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "attnkit"))


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` when CUDA is not available (DESIGN.md, tier 3)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
