"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one intra-op thread, restored afterwards.

    The problems in most test modules are tiny: a second thread only adds contention (up to 10x
    slower on a loaded 2-core machine). A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
