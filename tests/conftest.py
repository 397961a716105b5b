"""Fixtures shared by several test modules."""

from pathlib import Path

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
# layer): `make test` runs them a second time under another CPU kernel set. Whole folders, then
# single modules, relative to tests/.
NUMERICS = {
    "accel", "attacks", "models",
    "evaluation/test_engine.py", "evaluation/test_autoattack_columns.py",
    "hub/test_tensorpack.py", "hub/test_specs.py", "training/test_cheap_recipes.py",
}
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        rel = item.path.resolve().relative_to(TESTS)
        if rel.as_posix() in NUMERICS or rel.parts[0] in NUMERICS:
            item.add_marker(pytest.mark.numerics)
