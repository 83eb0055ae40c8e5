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


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    """A small corpus file (the first 40,000 characters of the plays), so that training runs take a second."""
    from llmcourse.data import load_corpus

    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(load_corpus("shakespeare")[:40_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_config(corpus_file):
    """A factory of TrainConfigs for a one-layer, 16-wide model on ``corpus_file``: ``tiny_config(max_steps=40)``."""
    from llmcourse.train import TrainConfig

    def make(**overrides) -> TrainConfig:
        settings = dict(corpus=str(corpus_file), n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_steps=30,
                        warmup_steps=5, eval_interval=10, eval_iters=2, log_interval=5, device="cpu")
        return TrainConfig(**{**settings, **overrides})

    return make


@pytest.fixture
def poison_loss():
    """``poison_loss(trainer, from_step)``: from that step on, the model's loss is nan, as after an overflow."""

    def poison(trainer, from_step: int) -> None:
        original = trainer.model.forward

        def poisoned(idx, targets=None):
            logits, loss = original(idx, targets)
            return logits, (loss * float("nan") if trainer.step >= from_step else loss)

        trainer.model.forward = poisoned

    return poison


@pytest.fixture
def stop_at():
    """``stop_at(step)``: a Callback that stops the run at the evaluation of ``step`` (half of a resume test)."""
    from llmcourse.train import Callback

    class StopAt(Callback):
        def __init__(self, step: int) -> None:
            self.step = step

        def on_eval(self, trainer, record) -> None:
            if trainer.step == self.step:
                trainer.should_stop = True

    return StopAt
