"""Fixtures shared by several test modules.

Only pytest and torch are imported here: the ops tests must run where detectron2 is not
installed (benchmarks/gpu_check.sh also runs them with --noconftest).
"""
import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Tiny models run faster on one thread: on a shared CPU, extra threads mostly wait on each other.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
