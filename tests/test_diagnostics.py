"""llmcourse.diagnostics (Day 22): the golden rule, gradient norms, update ratios, activation statistics,
early stopping, loss curves, and a run whose loss becomes nan."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from llmcourse.batches import get_batch
from llmcourse.checkpoint import Checkpointer, load_checkpoint, model_from_checkpoint, restore_trainer
from llmcourse.diagnostics import (
    EarlyStopping,
    LayerMonitor,
    activation_stats,
    gradient_norms,
    loss_curves,
    overfit_one_batch,
    plot_loss_curves,
    snapshot_parameters,
    update_ratios,
)
from llmcourse.gpt import GPT, GPTConfig
from llmcourse.train import NonFiniteLossError, Trainer, clip_grad_norm, prepare_data


@pytest.fixture(scope="module")
def data(tiny_config):
    return prepare_data(tiny_config())


def small_gpt(vocab_size: int, n_layer: int = 2, n_embd: int = 32, block_size: int = 32) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=2, n_embd=n_embd, bias=False))


def one_batch(data, batch_size: int = 4, block_size: int = 32):
    return get_batch(data.train, batch_size, block_size, generator=torch.Generator().manual_seed(0))


def cut_below_final_norm(model: GPT) -> GPT:
    """The bug of the notebook: a .detach() just before the final layer norm."""
    model.transformer.ln_f.register_forward_pre_hook(lambda module, args: (args[0].detach(),))
    return model


# ---- overfit one batch -------------------------------------------------------------------------------


def test_a_working_model_overfits_one_batch(data):
    x, y = one_batch(data)
    model = small_gpt(data.tokenizer.vocab_size)
    losses = overfit_one_batch(model, x, y, steps=150, lr=3e-3)
    assert len(losses) == 150 and all(isinstance(v, float) for v in losses)
    assert abs(losses[0] - math.log(data.tokenizer.vocab_size)) < 0.2  # the loss at initialization comes first
    assert losses[-1] < 0.15


def test_a_model_with_a_cut_gradient_cannot_overfit_one_batch(data):
    x, y = one_batch(data)
    working = overfit_one_batch(small_gpt(data.tokenizer.vocab_size), x, y, steps=150, lr=3e-3)
    broken = overfit_one_batch(cut_below_final_norm(small_gpt(data.tokenizer.vocab_size)), x, y, steps=150, lr=3e-3)
    assert broken[0] == working[0]  # the same forward pass...
    assert broken[-1] > 1.5 > working[-1] * 10  # ...but it cannot learn the batch


def test_overfit_one_batch_keeps_the_mode_and_refuses_bad_arguments(data):
    x, y = one_batch(data, 2, 8)
    model = small_gpt(data.tokenizer.vocab_size).eval()
    overfit_one_batch(model, x, y, steps=2)
    assert not model.training
    for kwargs, message in [(dict(steps=0), "steps"), (dict(steps=2.0), "steps"), (dict(lr=0.0), "lr"), (dict(lr=float("nan")), "lr")]:
        with pytest.raises(ValueError, match=message):
            overfit_one_batch(model, x, y, **kwargs)
    with pytest.raises(ValueError, match="same shape"):
        overfit_one_batch(model, x, y[:, :-1])
    with pytest.raises(TypeError, match="logits, loss"):
        overfit_one_batch(LogitsOnly(data.tokenizer.vocab_size), x, y, steps=1)
    frozen = small_gpt(data.tokenizer.vocab_size).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        overfit_one_batch(frozen, x, y)


class LogitsOnly(nn.Module):
    """A language model that forgets to return its loss."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return self.embedding(idx)


# ---- gradient norms ----------------------------------------------------------------------------------


def test_gradient_norms_match_a_manual_computation(data):
    x, y = one_batch(data, 2, 16)
    model = small_gpt(data.tokenizer.vocab_size)
    with pytest.raises(ValueError, match="backward"):
        gradient_norms(model)
    _, loss = model(x, y)
    loss.backward()
    norms = gradient_norms(model)
    assert list(norms) == [name for name, _ in model.named_parameters()]  # tied lm_head appears once, as wte
    assert "lm_head.weight" not in norms
    for name, p in model.named_parameters():
        assert norms[name] == pytest.approx(torch.linalg.vector_norm(p.grad.double()).item(), rel=1e-5)
    overall = math.sqrt(sum(v * v for v in norms.values()))
    assert overall == pytest.approx(clip_grad_norm(model.parameters(), math.inf).item(), rel=1e-5)


def test_gradient_norms_report_zero_where_no_gradient_arrives(data):
    x, y = one_batch(data, 2, 16)
    model = cut_below_final_norm(small_gpt(data.tokenizer.vocab_size))
    _, loss = model(x, y)
    loss.backward()
    norms = gradient_norms(model)
    zero = {name for name, value in norms.items() if value == 0.0}
    assert zero == {name for name, _ in model.named_parameters() if name.startswith(("transformer.wpe.", "transformer.h."))}
    assert norms["transformer.wte.weight"] > 0 and norms["transformer.ln_f.weight"] > 0
    model.transformer.ln_f.weight.requires_grad_(False)  # frozen on purpose: left out
    assert "transformer.ln_f.weight" not in gradient_norms(model)


# ---- update ratios -----------------------------------------------------------------------------------


def test_update_ratios_match_a_manual_computation():
    g = torch.Generator().manual_seed(0)
    before = {"a": torch.rand(4, 5, generator=g) - 0.5, "b": torch.rand(7, generator=g) + 1.0}
    after = {name: value + 0.01 * (torch.rand(value.shape, generator=g) - 0.5) for name, value in before.items()}
    ratios = update_ratios(before, after)
    assert list(ratios) == ["a", "b"]
    for name in before:
        expected = torch.linalg.vector_norm((after[name] - before[name]).double()) / torch.linalg.vector_norm(before[name].double())
        assert ratios[name] == pytest.approx(expected.item(), rel=1e-5)


def test_update_ratios_of_zero_weights_and_bad_arguments():
    zeros = {"moved": torch.zeros(3), "still": torch.zeros(3)}
    assert update_ratios(zeros, {"moved": torch.ones(3), "still": torch.zeros(3)}) == {"moved": math.inf, "still": 0.0}
    with pytest.raises(ValueError, match="same parameters"):
        update_ratios({"a": torch.ones(2)}, {"b": torch.ones(2)})
    with pytest.raises(ValueError, match="changed shape"):
        update_ratios({"a": torch.ones(2)}, {"a": torch.ones(3)})


def test_a_snapshot_is_a_copy_and_adams_first_step_moves_every_weight_by_lr(data):
    x, y = one_batch(data, 2, 32)  # every position of wpe gets a gradient
    model = small_gpt(data.tokenizer.vocab_size)
    _, loss = model(x, y)
    loss.backward()
    before = snapshot_parameters(model)
    torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0).step()
    after = snapshot_parameters(model)
    assert not torch.equal(before["transformer.wte.weight"], model.transformer.wte.weight)  # the copy did not move
    ratios = update_ratios(before, after)
    for name, p in before.items():  # Adam's first step is lr * g / |g|: the ratio is lr / rms(W)
        assert ratios[name] == pytest.approx(1e-3 / p.pow(2).mean().sqrt().item(), rel=0.03)


def test_layer_monitor_records_each_log_step_like_a_manual_measurement(tiny_config, data):
    config = tiny_config(max_steps=12, eval_interval=6, log_interval=5)  # log lines at steps 5, 10 and 12
    monitor = LayerMonitor()
    trainer = Trainer(config, data, callbacks=[monitor], progress=False)
    trainer.run()
    assert [r["step"] for r in monitor.records] == [r["step"] for r in trainer.history if not r["eval"]] == [5, 10, 12]
    assert not trainer.optimizer._optimizer_step_pre_hooks and not trainer.optimizer._optimizer_step_post_hooks

    manual = Trainer(config, data, progress=False)  # the same run, one step at a time
    for _ in range(4):
        manual.train_step()
    before = snapshot_parameters(manual.model)
    manual.train_step()  # step 5, the first log step
    expected_ratios = update_ratios(before, snapshot_parameters(manual.model))
    expected_norms = gradient_norms(manual.model)  # the step left the (clipped) gradients in place
    record = monitor.records[0]
    assert record["update_ratios"].keys() == expected_ratios.keys()
    for name in expected_ratios:
        assert record["update_ratios"][name] == pytest.approx(expected_ratios[name], rel=1e-5)
        assert record["grad_norms"][name] == pytest.approx(expected_norms[name], rel=1e-5)



def test_layer_monitor_takes_its_hooks_off_when_a_run_fails(tiny_config, data, poison_loss):
    monitor = LayerMonitor()
    trainer = Trainer(tiny_config(max_steps=40), data, callbacks=[monitor], progress=False)
    poison_loss(trainer, from_step=7)  # the loss is nan from step 7 on
    with pytest.raises(NonFiniteLossError):
        trainer.run()
    assert monitor.records  # it was hooked in and measured before the loss went bad
    # on_train_end runs also when the run ends with an error, and takes the hooks off the optimizer
    assert not trainer.optimizer._optimizer_step_pre_hooks and not trainer.optimizer._optimizer_step_post_hooks
    monitor.remove_hooks()  # a second removal does nothing
    assert [r["step"] for r in monitor.records] == [5]  # the log line of step 10 raised before on_log


# ---- loss curves -------------------------------------------------------------------------------------


def test_loss_curves_split_a_history():
    history = [
        {"step": 0, "eval": True, "train_loss": 4.0, "val_loss": 4.1},
        {"step": 5, "eval": False, "train_loss": 3.5, "val_loss": None},
        {"step": 10, "eval": False, "train_loss": 3.0, "val_loss": None},
        {"step": 10, "eval": True, "train_loss": 2.9, "val_loss": 3.1},
    ]
    curves = loss_curves(history)
    assert curves == {"logged": ([5, 10], [3.5, 3.0]), "train": ([0, 10], [4.0, 2.9]), "val": ([0, 10], [4.1, 3.1])}
    ax = Figure().add_subplot()  # no window, no backend
    assert plot_loss_curves(history, ax, title="t") is ax
    assert ax.get_title() == "t" and len(ax.lines) == 3
    with pytest.raises(ValueError, match="empty"):
        loss_curves([])
    with pytest.raises(ValueError, match="Trainer record"):
        loss_curves([{"step": 1}])


# ---- early stopping ----------------------------------------------------------------------------------


def feed(stopper: EarlyStopping, val_losses: list[float]) -> list[bool]:
    """Evaluation records, one by one, to a fake trainer; should_stop after each."""
    trainer = SimpleNamespace(should_stop=False, best_val_loss=math.inf)
    stopper.on_train_start(trainer)
    flags = []
    for i, loss in enumerate(val_losses):
        stopper.on_eval(trainer, {"step": 10 * i, "val_loss": loss})
        flags.append(trainer.should_stop)
    return flags


def test_early_stopping_waits_exactly_patience_evaluations():
    stopper = EarlyStopping(patience=3)
    flags = feed(stopper, [3.0, 2.5, 2.6, 2.55, 2.5, 2.7])  # equal to the best is no improvement
    assert flags == [False, False, False, False, True, True]
    assert (stopper.best_val_loss, stopper.best_step, stopper.stopped_step) == (2.5, 10, 40)
    stopper = EarlyStopping(patience=3)
    assert feed(stopper, [3.0, 2.5, 2.6, 2.55, 2.4, 2.6, 2.6]) == [False] * 7  # an improvement resets the count
    assert stopper.bad_evals == 2 and stopper.best_step == 40


def test_early_stopping_min_delta():
    stopper = EarlyStopping(patience=2, min_delta=0.1)
    assert feed(stopper, [3.0, 2.95, 2.85, 2.80, 2.76]) == [False, False, False, False, True]  # only 2.85 is 0.1 better
    assert (stopper.best_val_loss, stopper.best_step, stopper.stopped_step) == (2.85, 20, 40)


def test_early_stopping_refuses_bad_arguments():
    for kwargs in (dict(patience=0), dict(patience=1.5), dict(patience=True), dict(min_delta=-0.01), dict(min_delta=float("inf"))):
        with pytest.raises(ValueError, match="patience|min_delta"):
            EarlyStopping(**kwargs)


def test_early_stopping_ends_a_real_run(tiny_config, data):
    config = tiny_config(max_steps=100, eval_interval=5)
    trainer = Trainer(config, data, callbacks=[EarlyStopping(patience=2)], progress=False)
    scripted = iter([4.0, 3.0, 2.5, 2.6, 2.45, 2.5, 2.7, 1.0, 1.0])  # the validation losses of steps 0, 5, 10, ...
    trainer.evaluate = lambda: {"train": 1.0, "val": next(scripted)}
    trainer.run()
    assert trainer.step == 30  # best at step 20 (2.45); steps 25 and 30 do not improve
    assert [r["step"] for r in trainer.history if r["eval"]] == [0, 5, 10, 15, 20, 25, 30]


# ---- activation statistics ---------------------------------------------------------------------------


def manual_activations(model: GPT, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The residual stream after each block and each MLP's c_fc output, computed by hand."""
    out = {}
    with torch.no_grad():
        h = model.transformer.wte(idx) + model.transformer.wpe.weight[: idx.shape[1]]
        for i, block in enumerate(model.transformer.h):
            a = h + block.attn(block.ln_1(h))
            out[f"transformer.h.{i}.mlp.c_fc"] = block.mlp.c_fc(block.ln_2(a))
            h = block(h)
            out[f"transformer.h.{i}"] = h
    return out


def test_activation_stats_match_a_manual_computation_and_leave_no_hooks(data):
    x, _ = one_batch(data, 4, 16)
    model = small_gpt(data.tokenizer.vocab_size, n_layer=2, n_embd=16, block_size=16)
    model.train()
    stats = activation_stats(model, x, threshold=-0.1)
    assert list(stats) == ["transformer.h.0", "transformer.h.0.mlp.c_fc", "transformer.h.1", "transformer.h.1.mlp.c_fc"]
    model.eval()
    expected = manual_activations(model, x)
    for name, s in stats.items():
        t = expected[name].double()
        assert s["mean"] == pytest.approx(t.mean().item(), abs=1e-6)
        assert s["std"] == pytest.approx(t.std().item(), rel=1e-5)
        assert s["below"] == pytest.approx((t < -0.1).double().mean().item(), abs=1e-9)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_activation_stats_restore_the_mode_and_remove_hooks_after_an_error(data):
    x, _ = one_batch(data, 2, 16)
    model = small_gpt(data.tokenizer.vocab_size, n_layer=1, n_embd=16, block_size=16).train()
    with pytest.raises(ValueError):
        activation_stats(model, torch.cat([x, x], dim=1))  # longer than block_size: the forward pass fails
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_activation_stats_refuses_what_it_cannot_watch(data):
    x, _ = one_batch(data, 2, 16)
    model = small_gpt(data.tokenizer.vocab_size, n_layer=1, n_embd=16, block_size=16)
    with pytest.raises(ValueError, match="not a submodule"):
        activation_stats(model, x, {"stranger": nn.Linear(2, 2)})
    orphan = nn.Linear(2, 2)
    model.add_module("orphan", orphan)  # part of the model, never called by its forward pass
    with pytest.raises(ValueError, match="never called orphan"):
        activation_stats(model, x, {"block": model.transformer.h[0], "orphan": orphan})
    with pytest.raises(ValueError, match="not a GPT"):
        activation_stats(nn.Sequential(nn.Linear(3, 3)), torch.ones(2, 3))
    with pytest.raises(ValueError, match="empty"):
        activation_stats(model, x, {})
    mlp = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 2))
    stats = activation_stats(mlp, torch.ones(5, 3), {"hidden": mlp[0]})  # any model, with named watch points
    assert list(stats) == ["hidden"] and set(stats["hidden"]) == {"mean", "std", "below"}


# ---- a loss that becomes nan ---------------------------------------------------------------------------


def test_a_real_explosion_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_config, data, tmp_path):
    calm = tiny_config(max_steps=20, lr=3e-3, min_lr=3e-3)
    Trainer(calm, data, callbacks=[Checkpointer(tmp_path)], progress=False).run()
    hot = restore_trainer(load_checkpoint(tmp_path / "last.pt"), data=data, callbacks=[Checkpointer(tmp_path)], progress=False,
                          overrides=dict(lr=100.0, min_lr=100.0, grad_clip=0.0, max_steps=60, eval_interval=50))
    with pytest.raises(NonFiniteLossError, match=r"the training loss is (nan|inf) at step \d+ \(lr 1\.00e\+02\)"):
        hot.run()
    assert 20 < hot.step < 50  # before the next evaluation
    assert not [r for r in hot.history if r["eval"] and r["step"] > 20]
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["step"] == 20 and math.isfinite(last["best_val_loss"])
    model = model_from_checkpoint(last)
    x, y = one_batch(data, 2, 16)
    with torch.no_grad():
        _, loss = model(x, y)
    assert torch.isfinite(loss) and loss.item() < math.log(data.tokenizer.vocab_size)


def test_a_poisoned_run_keeps_last_pt_at_the_evaluation_before(tiny_config, data, tmp_path, poison_loss):
    trainer = Trainer(tiny_config(max_steps=40), data, callbacks=[Checkpointer(tmp_path)], progress=False)
    poison_loss(trainer, from_step=23)  # the loss is nan from step 23 on
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at step 25"):
        trainer.run()
    bundle = load_checkpoint(tmp_path / "last.pt")
    assert bundle["step"] == 20 and [r["step"] for r in bundle["history"] if r["eval"]] == [0, 10, 20]

