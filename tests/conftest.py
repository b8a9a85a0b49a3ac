"""Shared pytest set-up, kept generic: a hypothesis profile, torch threads per xdist worker and
the `gpu` marker's skip."""

import os

import pytest
import torch
from hypothesis import settings

# Shared 2-core CI machines make per-example timings noisy (the first example also pays for
# torch's warm-up), so no deadline by default. Example counts stay whatever each test asks.
settings.register_profile("attnkit", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "attnkit"))

# auto's choices in the tests follow the cost rules' default rates, not rates measured on
# this machine (measured beside other tests on a busy machine, they vary from run to run and
# would move a choice that sits near a boundary). tests/attnkit/backends/test_rates.py tests
# the measured rates themselves; ATTNKIT_RATES=measured runs the suite on them.
if os.environ.get("ATTNKIT_RATES", "default") == "measured":
    os.environ.pop("ATTNKIT_RATES")
else:
    os.environ["ATTNKIT_RATES"] = "default"

# Under pytest-xdist (make test runs -n auto) the workers share the cores: each gets its share
# of torch's threads, never more threads than cores in all (on a shared 2-core machine an
# OpenMP barrier waiting for a descheduled thread made small ops up to 10x slower). Tests
# that compare thread counts set theirs explicitly.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` when CUDA is not available (DESIGN.md, tier 3)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
