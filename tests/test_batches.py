"""llmcourse.batches (Day 9): train_val_split, get_batch, TokenWindows, pad_batch, token files on disk."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from llmcourse.batches import (
    IGNORE_INDEX,
    TOKEN_FILE_MAGIC,
    PaddedBatch,
    TokenFileHeader,
    TokenWindows,
    _pin_for_copy,
    get_batch,
    pad_batch,
    read_token_header,
    read_tokens,
    token_dtype,
    train_val_split,
    write_tokens,
)

# ---- train_val_split ---------------------------------------------------------------------------------


def test_split_is_a_tail_split_of_views():
    data = torch.arange(100)
    train, val = train_val_split(data, 0.1)
    assert torch.equal(train, torch.arange(90)) and torch.equal(val, torch.arange(90, 100))
    assert train.data_ptr() == data.data_ptr()  # a view, no copy
    train, val = train_val_split(np.arange(10, dtype=np.uint16), 0.25)
    assert train.tolist() == list(range(8)) and val.tolist() == [8, 9]  # 2.5 rounds to 2


@pytest.mark.parametrize("fraction", [0, 1, -0.5, 2, float("nan")])
def test_split_rejects_bad_fractions(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(torch.arange(10), fraction)


@pytest.mark.parametrize("n, fraction", [(1, 0.5), (10, 0.01), (10, 0.99)])
def test_split_refuses_an_empty_part(n, fraction):
    with pytest.raises(ValueError, match="at least 1"):
        train_val_split(torch.arange(n), fraction)


# ---- get_batch ---------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 300), st.integers(1, 16), st.integers(1, 64), st.integers(0, 2**31))
def test_batches_are_shifted_windows(n, batch_size, block_size, seed):
    """With data[i] == i, a row of x is start + arange(T) and y is exactly x + 1."""
    block_size = min(block_size, n - 1)
    x, y = get_batch(torch.arange(n), batch_size, block_size, generator=torch.Generator().manual_seed(seed))
    assert x.shape == y.shape == (batch_size, block_size) and x.dtype == y.dtype == torch.int64
    starts = x[:, 0]
    assert torch.equal(x, starts[:, None] + torch.arange(block_size))
    assert torch.equal(y, x + 1)
    assert int(starts.min()) >= 0 and int(starts.max()) <= n - block_size - 1


def test_every_start_is_reachable():
    g = torch.Generator().manual_seed(0)
    x, _ = get_batch(torch.arange(20), 5000, 5, generator=g)
    assert set(x[:, 0].tolist()) == set(range(15))  # 0 .. N - T - 1, nothing else


def test_data_of_exactly_one_block():
    x, y = get_batch(torch.arange(9), 3, 8)
    assert torch.equal(x, torch.arange(8).expand(3, 8)) and torch.equal(y, torch.arange(1, 9).expand(3, 8))


def test_generator_makes_batches_repeatable():
    data = torch.randint(0, 50, (1000,), generator=torch.Generator().manual_seed(1))
    first = get_batch(data, 4, 16, generator=torch.Generator().manual_seed(7))
    second = get_batch(data, 4, 16, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    torch.manual_seed(3)
    global_first = get_batch(data, 4, 16)
    torch.manual_seed(3)
    assert torch.equal(get_batch(data, 4, 16)[0], global_first[0])  # no generator: torch's global one


@pytest.mark.parametrize(
    "make", [lambda a: a, lambda a: a.astype(np.uint16), lambda a: a.astype(np.uint32), lambda a: torch.from_numpy(a).to(torch.int32), lambda a: torch.from_numpy(a.astype(np.uint16))]
)
def test_numpy_arrays_and_small_dtypes_give_the_same_batch(make):
    base = np.random.default_rng(0).integers(0, 60_000, size=500)
    expected = get_batch(torch.from_numpy(base), 6, 12, generator=torch.Generator().manual_seed(5))
    got = get_batch(make(base), 6, 12, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) and b.dtype == torch.int64 and b.is_contiguous() for a, b in zip(expected, got))


def test_device_argument_on_cpu():
    for device in ("cpu", torch.device("cpu")):
        x, y = get_batch(torch.arange(50), 2, 4, device=device)
        assert x.device.type == y.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_argument_on_cuda():
    data = torch.arange(1000)
    x, y = get_batch(data, 8, 32, device="cuda", generator=torch.Generator().manual_seed(0))
    assert x.is_cuda and y.is_cuda and torch.equal(y.cpu(), x.cpu() + 1)
    x2, y2 = get_batch(data.cuda(), 8, 32, generator=torch.Generator().manual_seed(0))  # data already on the GPU
    assert x2.is_cuda and torch.equal(x2, x)
    x3, y3 = get_batch(data.cuda(), 8, 32, device="cuda", generator=torch.Generator().manual_seed(0))  # nothing to pin
    assert x3.is_cuda and torch.equal(x3, x) and torch.equal(y3, y)


@pytest.mark.parametrize(
    "source, target, pinned",
    [("cpu", "cuda", True), ("cpu", "cuda:1", True), ("cuda", "cuda", False), ("cuda:0", "cpu", False), ("cpu", "cpu", False), ("cpu", "meta", False)],
)
def test_only_a_cpu_to_cuda_copy_goes_through_pinned_memory(source, target, pinned):
    assert _pin_for_copy(torch.device(source), torch.device(target)) is pinned


def test_get_batch_reads_no_value_back_for_tensor_data(no_value_reads):
    """Gathering a batch from a tensor never reads a value into Python (no wait for a GPU holding the data)."""
    data, gen = torch.arange(1000), torch.Generator().manual_seed(0)
    with no_value_reads():
        x, y = get_batch(data, 8, 32, generator=gen)
    assert torch.equal(y, x + 1)


def test_data_shorter_than_one_block_plus_one():
    with pytest.raises(ValueError, match=r"block_size \+ 1 = 9"):
        get_batch(torch.arange(8), 2, 8)
    with pytest.raises(ValueError, match="has 0 tokens"):
        get_batch(torch.zeros(0, dtype=torch.long), 1, 1)


@pytest.mark.parametrize(
    "data, error",
    [
        (torch.rand(100), TypeError),
        (torch.ones(100, dtype=torch.bool), TypeError),
        (np.ones(100), TypeError),
        ([1, 2, 3, 4], TypeError),
        (torch.arange(100).view(10, 10), ValueError),
    ],
)
def test_bad_data(data, error):
    with pytest.raises(error):
        get_batch(data, 2, 4)


@pytest.mark.parametrize(
    "batch_size, block_size, error",
    [(0, 4, ValueError), (2, 0, ValueError), (-1, 4, ValueError), (2.0, 4, TypeError), (2, True, TypeError), (2, "4", TypeError)],
)
def test_bad_sizes(batch_size, block_size, error):
    with pytest.raises(error):
        get_batch(torch.arange(100), batch_size, block_size)


# ---- TokenWindows and DataLoader ---------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 200), st.integers(1, 30), st.one_of(st.none(), st.integers(1, 40)))
def test_windows_cover_the_data(n, block_size, stride):
    block_size = min(block_size, n - 1)
    ds = TokenWindows(torch.arange(n), block_size, stride)
    step = block_size if stride is None else stride
    assert len(ds) == (n - block_size - 1) // step + 1
    for i in range(len(ds)):
        x, y = ds[i]
        assert torch.equal(x, torch.arange(i * step, i * step + block_size)) and torch.equal(y, x + 1)
    last_target = (len(ds) - 1) * step + block_size
    assert last_target <= n - 1 and last_target + step > n - 1  # no room for one more window


def test_windows_indexing():
    ds = TokenWindows(torch.arange(10), 4)
    assert len(ds) == 2 and torch.equal(ds[-1][0], ds[1][0]) and torch.equal(ds[-2][0], ds[0][0])
    assert torch.equal(ds[np.int64(1)][1], torch.tensor([5, 6, 7, 8]))
    for bad in (2, -3, 100):
        with pytest.raises(IndexError, match="out of range"):
            ds[bad]
    with pytest.raises(TypeError):
        ds[1.0]
    assert repr(ds) == "TokenWindows(2 windows, block_size=4, stride=4)"


def test_windows_on_a_memmap_and_with_a_dataloader(tmp_path):
    path = write_tokens(tmp_path / "t.bin", np.arange(1000), vocab_size=1000)
    ds = TokenWindows(read_tokens(path), block_size=16, stride=8)
    x, y = ds[3]
    assert x.dtype == torch.int64 and torch.equal(x, torch.arange(24, 40)) and torch.equal(y, x + 1)
    loader = DataLoader(ds, batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen = []
    for xb, yb in loader:
        assert xb.shape[1:] == (16,) and torch.equal(yb[:, :-1], xb[:, 1:])
        seen.extend(xb[:, 0].tolist())
    assert sorted(seen) == [8 * i for i in range(len(ds))]  # every window exactly once per epoch


@pytest.mark.parametrize("kwargs, error", [({"block_size": 10}, ValueError), ({"block_size": 0}, ValueError), ({"block_size": 4, "stride": 0}, ValueError), ({"block_size": 4, "stride": 1.5}, TypeError)])
def test_windows_errors(kwargs, error):
    with pytest.raises(error):
        TokenWindows(torch.arange(10), **kwargs)


def test_windows_need_token_data():
    with pytest.raises(TypeError):
        TokenWindows(torch.rand(10), 4)
    with pytest.raises(ValueError, match="block_size \\+ 1"):
        TokenWindows(np.arange(4, dtype=np.uint16), 4)


# ---- token files -------------------------------------------------------------------------------------


def test_token_dtype_limits():
    assert token_dtype(1) == token_dtype(65_536) == np.dtype("<u2")
    assert token_dtype(65_537) == token_dtype(2**32) == np.dtype("<u4")
    with pytest.raises(ValueError, match="too large"):
        token_dtype(2**32 + 1)
    with pytest.raises(ValueError):
        token_dtype(0)
    with pytest.raises(TypeError):
        token_dtype(75.0)


@pytest.mark.parametrize(
    "vocab_size, largest, itemsize", [(75, 74, 2), (65_536, 65_535, 2), (65_537, 65_536, 4), (2**32, 2**32 - 1, 4)]
)
def test_write_and_read_round_trip(tmp_path, vocab_size, largest, itemsize):
    ids = [0, 1, largest, 7, largest]
    path = write_tokens(tmp_path / "ids.bin", ids, vocab_size)
    assert path.stat().st_size == 32 + itemsize * len(ids)
    header = read_token_header(path)
    assert header == TokenFileHeader(np.dtype(f"<u{itemsize}"), vocab_size, len(ids))
    tokens = read_tokens(path)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.dtype(f"<u{itemsize}") and tokens.tolist() == ids
    with pytest.raises(ValueError):
        tokens[0] = 1  # opened read-only


def test_the_header_layout_is_as_documented(tmp_path):
    path = write_tokens(tmp_path / "ids.bin", torch.tensor([258, 1]), vocab_size=300)
    raw = path.read_bytes()
    assert raw[:8] == TOKEN_FILE_MAGIC == b"LLMCTOKS"
    assert struct.unpack("<IIQQ", raw[8:32]) == (1, 2, 300, 2)
    assert raw[32:] == bytes([2, 1, 1, 0])  # 258 = 0x0102, little-endian


@pytest.mark.parametrize("ids", [torch.arange(5), np.arange(5, dtype=np.int32), np.arange(5, dtype=np.uint64), list(range(5)), tuple(range(5))])
def test_write_accepts_tensors_arrays_and_lists(tmp_path, ids):
    assert read_tokens(write_tokens(tmp_path / "ids.bin", ids, 5)).tolist() == [0, 1, 2, 3, 4]


def test_empty_files(tmp_path):
    path = write_tokens(tmp_path / "empty.bin", [], 10)
    assert path.stat().st_size == 32
    tokens = read_tokens(path)
    assert tokens.shape == (0,) and tokens.dtype == np.uint16


@pytest.mark.parametrize("ids, vocab_size, match", [([1, 2, 75], 75, "token id 75 at position 2"), ([0, -1], 75, "token id -1 at position 1"), ([70_000], 65_536, "token id 70000")])
def test_ids_that_do_not_fit_are_refused_and_nothing_is_written(tmp_path, ids, vocab_size, match):
    path = tmp_path / "ids.bin"
    with pytest.raises(ValueError, match=match):
        write_tokens(path, ids, vocab_size)
    assert list(tmp_path.iterdir()) == []


def test_a_refused_write_keeps_the_old_file(tmp_path):
    path = write_tokens(tmp_path / "ids.bin", [1, 2, 3], 10)
    with pytest.raises(ValueError):
        write_tokens(path, [1, 2, 30], 10)
    assert read_tokens(path).tolist() == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.bin"]


@pytest.mark.parametrize("ids, vocab_size, error", [([0.5, 1.0], 10, TypeError), ([[1, 2]], 10, ValueError), ([1], 2**32 + 1, ValueError), ([1], 0, ValueError), (["a"], 10, TypeError)])
def test_write_errors(tmp_path, ids, vocab_size, error):
    with pytest.raises(error):
        write_tokens(tmp_path / "ids.bin", ids, vocab_size)


def test_reading_damaged_or_foreign_files(tmp_path):
    good = write_tokens(tmp_path / "good.bin", list(range(10)), 10).read_bytes()
    cases = {
        "truncated.bin": (good[:-1], "damaged"),
        "extra.bin": (good + b"\x00\x00", "damaged"),
        "short.bin": (good[:10], "not an llmcourse token file"),
        "foreign.bin": (b"\x00" * 64, "not an llmcourse token file"),
        "version.bin": (good[:8] + struct.pack("<I", 2) + good[12:], "version 2"),
        "itemsize.bin": (good[:12] + struct.pack("<I", 8) + good[16:], "itemsize 8"),
    }
    for name, (content, match) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=match):
            read_tokens(path)
    with pytest.raises(FileNotFoundError):
        read_tokens(tmp_path / "missing.bin")


def test_get_batch_samples_a_token_file(tmp_path):
    ids = np.random.default_rng(1).integers(0, 75, size=5000)
    tokens = read_tokens(write_tokens(tmp_path / "ids.bin", ids, 75))
    from_file = get_batch(tokens, 8, 64, generator=torch.Generator().manual_seed(2))
    from_tensor = get_batch(torch.from_numpy(ids), 8, 64, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(a, b) for a, b in zip(from_file, from_tensor))


# ---- pad_batch -----------------------------------------------------------------------------------------


def test_pad_batch_pads_inputs_targets_and_mask():
    batch = pad_batch([torch.tensor([5, 6, 7, 8]), torch.tensor([1, 2]), np.array([3, 4, 9], dtype=np.uint16)], pad_id=0)
    assert isinstance(batch, PaddedBatch) and IGNORE_INDEX == -100
    assert batch.x.tolist() == [[5, 6, 7], [1, 0, 0], [3, 4, 0]]
    assert batch.y.tolist() == [[6, 7, 8], [2, -100, -100], [4, 9, -100]]
    assert batch.mask.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    assert batch.x.dtype == batch.y.dtype == torch.int64 and batch.mask.dtype == torch.bool


def test_pad_batch_custom_ids_and_equal_lengths():
    batch = pad_batch([torch.tensor([1, 2, 3]), torch.tensor([4, 5])], pad_id=7, ignore_index=-1)
    assert batch.x.tolist() == [[1, 2], [4, 7]] and batch.y.tolist() == [[2, 3], [5, -1]]
    same = pad_batch([torch.arange(5), torch.arange(5, 10)])
    assert same.mask.all() and torch.equal(same.x[:, 1:], same.y[:, :-1])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(0, 49), min_size=2, max_size=12), min_size=1, max_size=6))
def test_pad_batch_keeps_every_pair(seqs):
    batch = pad_batch([torch.tensor(s) for s in seqs], pad_id=3)
    assert batch.x.shape == batch.y.shape == batch.mask.shape == (len(seqs), max(map(len, seqs)) - 1)
    for b, s in enumerate(seqs):
        n = len(s) - 1
        assert batch.x[b, :n].tolist() == s[:-1] and batch.y[b, :n].tolist() == s[1:]
        assert batch.mask[b].sum() == n and (batch.y[b, n:] == -100).all() and (batch.x[b, n:] == 3).all()


def test_pad_batch_loss_ignores_the_padding():
    batch = pad_batch([torch.tensor([1, 2, 3, 4, 5]), torch.tensor([6, 7])])
    logits = torch.randn(*batch.x.shape, 10, generator=torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(logits.view(-1, 10), batch.y.view(-1), ignore_index=IGNORE_INDEX)
    per_position = torch.nn.functional.cross_entropy(logits.view(-1, 10), batch.y.view(-1).clamp(min=0), reduction="none")
    torch.testing.assert_close(loss, per_position.view(batch.y.shape)[batch.mask].mean())


def test_pad_batch_is_a_collate_fn():
    items = [torch.arange(n) for n in (3, 6, 2, 5)]
    loader = DataLoader(items, batch_size=2, collate_fn=pad_batch)
    shapes = [tuple(b.x.shape) for b in loader]
    assert shapes == [(2, 5), (2, 4)]
    x, y, mask = next(iter(loader))
    assert mask.sum().item() == 2 + 5


@pytest.mark.parametrize(
    "sequences, kwargs, error, match",
    [
        ([], {}, ValueError, "at least one"),
        ([torch.tensor([1])], {}, ValueError, "at least 2"),
        ([torch.tensor([[1, 2]])], {}, ValueError, "1-D"),
        ([torch.tensor([1.0, 2.0])], {}, TypeError, "integer"),
        ([[1, 2, 3]], {}, TypeError, "numpy array"),
        ([torch.tensor([1, 2])], {"pad_id": -1}, ValueError, "pad_id"),
        ([torch.tensor([1, 2])], {"pad_id": 1.0}, TypeError, "pad_id"),
        ([torch.tensor([1, 2])], {"ignore_index": True}, TypeError, "ignore_index"),
    ],
)
def test_pad_batch_rejects_bad_input(sequences, kwargs, error, match):
    with pytest.raises(error, match=match):
        pad_batch(sequences, **kwargs)
