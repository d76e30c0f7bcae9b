import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny.py


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Benchmark entry points called by tests set torch's thread count (kernel_bench --threads 1);
    give every test the count the session started with, so a test's numbers do not depend on
    which tests ran before it (the smooth search's float sums follow the thread count)."""
    import torch
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
