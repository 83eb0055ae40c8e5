"""Tests for llmcourse.loss (Day 5): cross_entropy against F.cross_entropy, its errors, and perplexity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llmcourse.loss import REDUCTIONS, cross_entropy, perplexity


def reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"):
    """torch's loss with classes last: flatten (B, T, C) to (B*T, C), reshape 'none' back."""
    C = logits.size(-1)
    out = F.cross_entropy(logits.reshape(-1, C), targets.reshape(-1).long(), ignore_index=ignore_index, reduction=reduction)
    return out.reshape(targets.shape) if reduction == "none" else out


def batch(shape: tuple[int, ...], C: int, ignored: float = 0.0, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, C, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, C, shape, generator=gen)
    if ignored:
        targets[torch.rand(shape, generator=gen) < ignored] = -100
    return logits, targets


# ---------------------------------------------------------------------------------------------
# Equal to torch


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(7,), (3, 5)], ids=["N,C", "B,T,C"])
@pytest.mark.parametrize("ignored", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_match_torch(reduction, shape, ignored, dtype):
    logits, targets = batch(shape, C=11, ignored=ignored, dtype=dtype)
    ours_in = logits.clone().requires_grad_(True)
    torch_in = logits.clone().requires_grad_(True)
    ours = cross_entropy(ours_in, targets, reduction=reduction)
    expected = reference(torch_in, targets, reduction=reduction)
    assert ours.shape == expected.shape
    assert ours.dtype == expected.dtype
    torch.testing.assert_close(ours, expected)
    ours.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(ours_in.grad, torch_in.grad)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.sampled_from([(1,), (5,), (2, 3), (4, 1), (1, 6)]),
    C=st.integers(min_value=1, max_value=40),
    ignored=st.sampled_from([0.0, 0.5, 1.0]),
    reduction=st.sampled_from(REDUCTIONS),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_property_equal_to_torch(shape, C, ignored, reduction, seed):
    logits, targets = batch(shape, C, ignored=ignored, seed=seed)
    torch.testing.assert_close(cross_entropy(logits, targets, reduction=reduction), reference(logits, targets, reduction=reduction), equal_nan=True)


def test_custom_ignore_index_inside_the_class_range():
    logits, targets = batch((4, 6), C=5, seed=1)
    ours = cross_entropy(logits, targets, ignore_index=0)
    torch.testing.assert_close(ours, reference(logits, targets, ignore_index=0))
    # positions whose target is 0 contribute nothing
    per_position = cross_entropy(logits, targets, ignore_index=0, reduction="none")
    assert (per_position[targets == 0] == 0).all()
    assert (per_position[targets != 0] > 0).all()


def test_mean_divides_by_counted_targets_only():
    logits, targets = batch((10,), C=4, seed=2)
    targets[:6] = -100
    per_position = cross_entropy(logits, targets, reduction="none")
    torch.testing.assert_close(cross_entropy(logits, targets), per_position[6:].mean())


def test_all_ignored_matches_torch():
    logits = torch.randn(2, 3, 5)
    targets = torch.full((2, 3), -100)
    assert math.isnan(cross_entropy(logits, targets).item())
    assert math.isnan(reference(logits, targets).item())
    assert cross_entropy(logits, targets, reduction="sum").item() == 0.0
    assert torch.equal(cross_entropy(logits, targets, reduction="none"), torch.zeros(2, 3))


def test_empty_batch_matches_torch():
    logits, targets = torch.randn(0, 5), torch.zeros(0, dtype=torch.long)
    assert math.isnan(cross_entropy(logits, targets).item()) and math.isnan(F.cross_entropy(logits, targets).item())
    assert cross_entropy(logits, targets, reduction="sum").item() == 0.0


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_any_integer_target_dtype(dtype):
    logits, targets = batch((6,), C=7, seed=3)
    torch.testing.assert_close(cross_entropy(logits, targets.to(dtype)), F.cross_entropy(logits, targets))


def test_huge_logits_give_finite_losses():
    logits = torch.tensor([[0.0, 1e4], [-1e4, 1e4]])
    targets = torch.tensor([0, 0])
    losses = cross_entropy(logits, targets, reduction="none")
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses, torch.tensor([1e4, 2e4]))


def test_gradient_is_softmax_minus_onehot():
    logits, targets = batch((8,), C=6, seed=4, dtype=torch.float64)
    logits.requires_grad_(True)
    cross_entropy(logits, targets).backward()
    expected = (torch.softmax(logits.detach(), -1) - F.one_hot(targets, 6)) / 8
    torch.testing.assert_close(logits.grad, expected)


@pytest.mark.parametrize("V", [2, 65, 50257])
def test_uniform_logits_give_ln_V(V):
    loss = cross_entropy(torch.zeros(3, V), torch.tensor([0, 1, V - 1]))
    assert abs(loss.item() - math.log(V)) < 1e-4


def test_small_random_logits_are_close_to_ln_V():
    gen = torch.Generator().manual_seed(0)
    logits = 0.02 * torch.randn(256, 65, generator=gen)
    loss = cross_entropy(logits, torch.randint(0, 65, (256,), generator=gen))
    assert abs(loss.item() - math.log(65)) < 0.01


# ---------------------------------------------------------------------------------------------
# Errors


def test_target_out_of_range_names_value_and_range():
    logits = torch.randn(3, 65)
    with pytest.raises(ValueError, match=r"target 70 is outside \[0, 65\)"):
        cross_entropy(logits, torch.tensor([1, 70, 2]))
    with pytest.raises(ValueError, match=r"target 65 is outside \[0, 65\)"):
        cross_entropy(logits, torch.tensor([65, 0, 0]))
    with pytest.raises(ValueError, match=r"target -1 is outside \[0, 65\)") as info:
        cross_entropy(logits, torch.tensor([-1, 0, 0]))
    assert info.value.__suppress_context__  # gather's terse error is not shown above ours
    with pytest.raises(ValueError, match=r"target -100 is outside"):  # -100 is only skipped when it is ignore_index
        cross_entropy(logits, torch.tensor([-100, 0, 0]), ignore_index=-1)


def test_range_check_reads_nothing_back(no_value_reads):
    """The target check runs on the device: no value comes back to Python (no host synchronization)."""
    logits, targets = torch.randn(2, 4, 65, requires_grad=True), torch.randint(0, 65, (2, 4))
    targets[0, 0] = -100
    expected = F.cross_entropy(logits.reshape(-1, 65), targets.reshape(-1))
    with no_value_reads():
        loss = cross_entropy(logits, targets)
        loss.backward()
    torch.testing.assert_close(loss, expected)


def test_out_of_range_check_skips_ignored_positions():
    logits = torch.randn(2, 3, 4)
    targets = torch.tensor([[0, -100, 3], [-100, -100, 1]])
    torch.testing.assert_close(cross_entropy(logits, targets), reference(logits, targets))


@pytest.mark.parametrize(
    "targets, match",
    [
        (torch.tensor([0.0, 1.0, 2.0]), "integer class indices"),
        (torch.tensor([True, False, True]), "integer class indices"),
        (torch.tensor([0, 1, 2], dtype=torch.complex64), "integer class indices"),
        ([0, 1, 2], "must be a tensor"),
    ],
)
def test_non_integer_targets_raise_type_error(targets, match):
    with pytest.raises(TypeError, match=match):
        cross_entropy(torch.randn(3, 4), targets)


@pytest.mark.parametrize(
    "logits, targets, error, match",
    [
        (torch.randn(5), torch.tensor(1), ValueError, r"\(N, C\) or \(B, T, C\)"),
        (torch.randn(2, 2, 2, 3), torch.zeros(2, 2, 2, dtype=torch.long), ValueError, r"\(N, C\) or \(B, T, C\)"),
        (torch.randn(2, 3, 5), torch.zeros(6, dtype=torch.long), ValueError, r"targets must have shape \(2, 3\)"),
        (torch.randn(4, 5), torch.zeros(3, dtype=torch.long), ValueError, r"targets must have shape \(4,\)"),
        (torch.arange(6).view(2, 3), torch.zeros(2, dtype=torch.long), TypeError, "floating-point"),
        ([[0.0, 1.0]], torch.zeros(1, dtype=torch.long), TypeError, "floating-point"),
    ],
)
def test_bad_shapes_and_types(logits, targets, error, match):
    with pytest.raises(error, match=match):
        cross_entropy(logits, targets)


def test_bad_reduction_and_ignore_index():
    logits, targets = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="reduction must be one of"):
        cross_entropy(logits, targets, reduction="avg")
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        cross_entropy(logits, targets, ignore_index=-100.0)


# ---------------------------------------------------------------------------------------------
# Perplexity


def test_perplexity_of_numbers():
    assert perplexity(0) == 1.0
    assert abs(perplexity(math.log(65)) - 65) < 1e-9
    assert abs(perplexity(1.4697) - math.exp(1.4697)) < 1e-12
    assert isinstance(perplexity(2.0), float)
    assert perplexity(1e6) == math.inf
    assert math.isnan(perplexity(float("nan")))


def test_perplexity_of_tensors_keeps_grad():
    loss = torch.tensor([0.0, math.log(2.0), math.log(50257.0)], requires_grad=True)
    ppl = perplexity(loss)
    assert isinstance(ppl, torch.Tensor)
    torch.testing.assert_close(ppl, torch.tensor([1.0, 2.0, 50257.0]))
    ppl.sum().backward()
    torch.testing.assert_close(loss.grad, ppl.detach())  # d/dx exp(x) = exp(x)


def test_perplexity_of_a_uniform_model_is_V():
    loss = cross_entropy(torch.zeros(4, 65), torch.tensor([0, 5, 9, 64]))
    assert abs(perplexity(loss).item() - 65) < 1e-3


@pytest.mark.parametrize(
    "bad, error",
    [(-0.1, ValueError), (torch.tensor([0.5, -1.0]), ValueError), ("2.0", TypeError), (True, TypeError), (torch.tensor([1, 2]), TypeError), (None, TypeError)],
)
def test_perplexity_errors(bad, error):
    with pytest.raises(error):
        perplexity(bad)
