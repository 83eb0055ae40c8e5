"""Tests for llmcourse.core (Day 1): set_seed, get_device, causal_mask."""

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmcourse.core import causal_mask, get_device, set_seed


# set_seed ------------------------------------------------------------------------------------


def _draw():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_set_seed_repeats_python_numpy_and_torch():
    set_seed(123)
    first = _draw()
    set_seed(123)
    assert _draw() == first


def test_different_seeds_differ():
    set_seed(1)
    first = _draw()
    set_seed(2)
    second = _draw()
    assert all(a != b for a, b in zip(first, second))


def test_set_seed_accepts_the_range_ends_and_numpy_ints():
    set_seed(0)
    set_seed(2**32 - 1)
    set_seed(np.int64(5))
    a = torch.rand(2)
    set_seed(5)
    assert torch.equal(a, torch.rand(2))


@pytest.mark.parametrize("bad", [-1, 2**32])
def test_set_seed_out_of_range(bad):
    with pytest.raises(ValueError, match="seed must be in"):
        set_seed(bad)


@pytest.mark.parametrize("bad", [1.5, "3", None, True, torch.tensor(3)])
def test_set_seed_not_an_int(bad):
    with pytest.raises(TypeError, match="seed must be an int"):
        set_seed(bad)


# get_device ----------------------------------------------------------------------------------


def test_get_device_auto_order():
    device = get_device()
    if torch.cuda.is_available():
        assert device.type == "cuda"
    elif torch.backends.mps.is_available():
        assert device.type == "mps"
    else:
        assert device == torch.device("cpu")


@pytest.mark.parametrize("name", ["cpu", "CPU", " cpu ", torch.device("cpu")])
def test_get_device_cpu_always_works(name):
    assert get_device(name) == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "tpu", "cuda:x", "meta", "", "cpu cuda"])
def test_get_device_unknown_name(name):
    with pytest.raises(ValueError, match="unknown device"):
        get_device(name)


def test_get_device_unknown_torch_device():
    with pytest.raises(ValueError, match="unknown device 'meta'"):
        get_device(torch.device("meta"))


@pytest.mark.parametrize("bad", [0, 1.0, ["cpu"]])
def test_get_device_wrong_type(bad):
    with pytest.raises(TypeError, match="prefer must be"):
        get_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "CUDA:1"])
def test_get_device_cuda_unavailable(name):
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        get_device(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_get_device_cuda_index_out_of_range():
    with pytest.raises(RuntimeError, match="CUDA device"):
        get_device(f"cuda:{torch.cuda.device_count()}")
    assert get_device("cuda:0") == torch.device("cuda:0")


def test_get_device_cuda_unavailable_is_simulated(monkeypatch):
    """The error path for a missing GPU, exercised on every machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        get_device("cuda")


def test_get_device_cuda_index_is_simulated(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert get_device("cuda:1") == torch.device("cuda:1")
    assert get_device() == torch.device("cuda")
    with pytest.raises(RuntimeError, match="has 2 CUDA device"):
        get_device("cuda:2")


def test_get_device_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="MPS"):
        get_device("mps")
    assert get_device() == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert get_device() == torch.device("mps")
    assert get_device("mps") == torch.device("mps")


# causal_mask ---------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=0, max_value=40))
def test_causal_mask_is_j_le_i(size):
    mask = causal_mask(size)
    assert mask.dtype == torch.bool and mask.shape == (size, size)
    i = torch.arange(size)
    assert torch.equal(mask, i[None, :] <= i[:, None])
    assert torch.equal(mask, torch.ones(size, size).tril().bool())


def test_causal_mask_rows():
    mask = causal_mask(4)
    assert mask.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, True, True, False],
        [True, True, True, True],
    ]
    assert mask.sum(dim=1).tolist() == [1, 2, 3, 4]


def test_causal_mask_matches_sdpa_is_causal():
    """Using our mask as attn_mask gives the same result as torch's own is_causal=True."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 6, 4).unbind(0)  # each (B, T, hs)
    ours = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(6))
    torch_causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, torch_causal)


def test_causal_mask_device():
    assert causal_mask(3, device="cpu").device == torch.device("cpu")
    assert causal_mask(3, device=get_device()).device.type == get_device().type
    assert causal_mask(np.int64(3)).shape == (3, 3)


def test_causal_mask_negative():
    with pytest.raises(ValueError, match="size must be >= 0, got -1"):
        causal_mask(-1)


@pytest.mark.parametrize("bad", [2.0, "3", None, True, torch.tensor(3)])
def test_causal_mask_not_an_int(bad):
    with pytest.raises(TypeError, match="size must be an int"):
        causal_mask(bad)
