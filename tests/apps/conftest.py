"""Fixtures shared by the app tests."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The apps' tests run tiny models, which gain nothing from intra-op threads; on a shared
    2-core machine a second thread waiting for a busy core made them up to 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
