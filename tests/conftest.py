"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture()
def one_thread():
    """Tiny models: one intra-op thread is faster than two on a shared 2-core machine (use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
