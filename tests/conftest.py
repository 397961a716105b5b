"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_threads():
    """A test that runs the CLI in-process (``--threads 1``) must not leave the next test on
    one thread: the thread count changes which kernels run and so the float rounding."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def one_thread():
    """Tiny models: one intra-op thread is faster than two on a shared 2-core machine (use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Test modules whose assertions are numbers that float rounding could change (parity with the
# official code and with float64 references, expected records, attack strength, the speed
# layer): `make test` runs them a second time under another CPU kernel set.
NUMERICS = {
    "test_accel.py", "test_accel_pack.py", "test_accel_changes.py", "test_attacks.py",
    "test_attacks_reference.py", "test_autoattack.py", "test_eval_autoattack.py",
    "test_engine.py", "test_denoise_ops.py", "test_models.py", "test_pretrained.py",
    "test_cheap_training.py", "test_autoattack_fashion_mnist.py", "test_surgery.py",
    "test_hub_specs.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in NUMERICS:
            item.add_marker(pytest.mark.numerics)
