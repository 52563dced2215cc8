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


@pytest.fixture
def tsdiff_training_windows(monkeypatch):
    """The clean windows ``x0`` that :class:`flowdiff.timeseries.TSDiff` feeds its loss, one tensor per step
    (a list that fills as the test trains)."""
    from flowdiff.timeseries import TSDiff

    seen = []
    original = TSDiff._loss

    def record(self, x0, xt, t, noise, features):
        seen.append(x0.detach().clone())
        return original(self, x0, xt, t, noise, features)

    monkeypatch.setattr(TSDiff, "_loss", record)
    return seen
