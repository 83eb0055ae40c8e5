"""Fixtures shared by the unit tests (the notebooks' set-up lives in the repository's conftest.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch

# Every way Python code can pull a tensor's value out of it; on a GPU each one makes the CPU wait.
VALUE_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


@pytest.fixture
def no_value_reads(monkeypatch):
    """A context manager inside which reading any tensor's value into Python fails the test.

    It stands in, on the CPU, for "no host synchronization": code that never reads a value back never
    makes the CPU wait for a GPU.
    """

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor value was read back into Python (a host synchronization on a GPU)")

    @contextlib.contextmanager
    def guard():
        with monkeypatch.context() as patch:
            for name in VALUE_READS:
                patch.setattr(torch.Tensor, name, refuse)
            yield

    return guard
