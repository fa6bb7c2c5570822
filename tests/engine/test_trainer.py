import itertools
import math
import os

import pytest
import torch
from torch import nn

from detectron2.engine import hooks

from dino_d2.checkpoint import AtomicCheckpointer
from dino_d2.engine import (
    EMAHook,
    ModelEMA,
    Trainer,
    amp_settings,
    bfloat16_is_native,
    check_losses_finite,
    describe_precision,
)


class _Toy(nn.Module):
    """A linear model whose loss has large gradients; records the forward's compute dtype."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 3)
        self.head = nn.Linear(3, 1)
        self.forward_dtype = None

    def forward(self, batch):
        hidden = self.linear(batch)
        self.forward_dtype = hidden.dtype
        out = self.head(hidden).float()
        return {"loss_a": 100.0 * out.square().mean(), "loss_b": 10.0 * out.abs().mean()}


def _batches():
    return itertools.repeat(torch.linspace(-3, 3, 8 * 4).view(8, 4))


def _total_norm(grads, norm_type):
    return torch.nn.utils.get_total_norm(grads, norm_type).item()


def _unclipped_grads(model):
    model.zero_grad()
    sum(model(next(_batches())).values()).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_clipping_limits_the_total_norm_of_the_applied_step(norm_type):
    model = _Toy()
    reference = _unclipped_grads(_Toy())
    raw_norm = _total_norm(reference, norm_type)
    max_norm = 0.1
    assert raw_norm > 10 * max_norm
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = Trainer(
        model,
        _batches(),
        optimizer,
        clip_grad_max_norm=max_norm,
        clip_grad_norm_type=norm_type,
    )
    trainer.train(0, 1)
    steps = [b - p.detach() for b, p in zip(before, model.parameters())]
    assert _total_norm(steps, norm_type) <= max_norm * (1 + 1e-5)
    # The step is the gradient scaled down as a whole, not clipped element by element.
    scale = max_norm / raw_norm
    for step, grad in zip(steps, reference):
        torch.testing.assert_close(step, grad * scale, rtol=1e-4, atol=1e-7)
    assert trainer.storage.history("grad_norm").latest() == pytest.approx(raw_norm, rel=1e-5)


def test_no_clipping_applies_the_raw_gradient():
    model = _Toy()
    reference = _unclipped_grads(_Toy())
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model, _batches(), torch.optim.SGD(model.parameters(), lr=1e-3))
    trainer.train(0, 1)
    for b, p, grad in zip(before, model.parameters(), reference):
        torch.testing.assert_close(b - p.detach(), 1e-3 * grad)
    assert "grad_norm" not in trainer.storage.histories()


class _RecordingScaler:
    """A GradScaler stand-in that scales by a large factor and records the order of its calls."""

    def __init__(self, factor=1024.0):
        self.factor = factor
        self.calls = []
        self.norm_at_step = None

    def scale(self, loss):
        self.calls.append("scale")
        return loss * self.factor

    def unscale_(self, optimizer):
        self.calls.append("unscale_")
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(self.factor)

    def step(self, optimizer):
        self.calls.append("step")
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.norm_at_step = _total_norm(grads, 2.0)
        optimizer.step()

    def update(self):
        self.calls.append("update")

    def state_dict(self):
        return {"factor": self.factor}

    def load_state_dict(self, state):
        self.factor = state["factor"]


def test_amp_unscales_before_clipping_on_cpu_bfloat16():
    if not torch.amp.is_autocast_available("cpu"):
        pytest.skip("this PyTorch has no CPU autocast")
    model = _Toy()
    raw_norm = _total_norm(_unclipped_grads(_Toy()), 2.0)
    scaler = _RecordingScaler()
    max_norm = 0.1
    trainer = Trainer(
        model,
        _batches(),
        torch.optim.SGD(model.parameters(), lr=1.0),
        clip_grad_max_norm=max_norm,
        amp_dtype=torch.bfloat16,
        grad_scaler=scaler,
    )
    trainer.train(0, 1)
    assert model.forward_dtype == torch.bfloat16
    assert scaler.calls == ["scale", "unscale_", "step", "update"]
    # Clipped after unscaling: the step sees exactly max_norm (clipping the scaled gradient
    # and unscaling afterwards would leave max_norm / 1024).
    assert scaler.norm_at_step == pytest.approx(max_norm, rel=1e-4)
    # The logged norm is the unscaled one (bfloat16 forward: loose tolerance).
    assert trainer.storage.history("grad_norm").latest() == pytest.approx(raw_norm, rel=0.05)
    assert trainer.state_dict()["grad_scaler"] == {"factor": 1024.0}


def test_amp_without_clipping_leaves_unscaling_to_the_scaler():
    scaler = _RecordingScaler()
    model = _Toy()
    trainer = Trainer(
        model,
        _batches(),
        torch.optim.SGD(model.parameters(), lr=1.0),
        amp_dtype=torch.bfloat16,
        grad_scaler=scaler,
    )
    trainer.train(0, 1)
    assert scaler.calls == ["scale", "step", "update"]


def test_amp_settings():
    assert amp_settings(torch.device("cpu")) == (torch.bfloat16, None)
    assert amp_settings("cpu", "bfloat16") == (torch.bfloat16, None)
    with pytest.raises(ValueError, match="float16 needs CUDA"):
        amp_settings("cpu", "float16")
    with pytest.raises(ValueError, match="precision"):
        amp_settings("cpu", "float8")


@pytest.mark.parametrize(
    "avx512_bf16, amx, native", [(True, False, True), (False, True, True), (False, False, False)]
)
def test_bfloat16_is_native_reads_the_cpu_capabilities(monkeypatch, avx512_bf16, amx, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert bfloat16_is_native("cpu") is native
    assert bfloat16_is_native("meta") is False


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bfloat16_only_where_native(monkeypatch, native):
    """train.amp.precision="auto" (configs/common/train.py): bfloat16 autocast where the CPU has
    bfloat16 instructions, float32 (no autocast dtype) elsewhere, named in the log line."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    dtype, scaler = amp_settings("cpu", "auto")
    assert scaler is None and dtype == (torch.bfloat16 if native else None)
    line = describe_precision("cpu", dtype)
    assert ("bfloat16" in line) if native else line.startswith("float32: this CPU has no bfloat16")
    # An explicit precision is kept whatever the hardware.
    assert amp_settings("cpu", "bfloat16") == (torch.bfloat16, None)


def test_invalid_arguments():
    model = _Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="positive"):
        Trainer(model, _batches(), optimizer, clip_grad_max_norm=0.0)
    with pytest.raises(ValueError, match="grad_scaler"):
        Trainer(model, _batches(), optimizer, grad_scaler=_RecordingScaler())


class _NaNAt(_Toy):
    """``_Toy`` whose ``loss_b`` is NaN from the ``bad_call``-th forward (counting from 0) on."""

    def __init__(self, bad_call):
        super().__init__()
        self.bad_call = bad_call
        self.calls = 0

    def forward(self, batch):
        losses = super().forward(batch)
        if self.calls >= self.bad_call:
            losses["loss_b"] = losses["loss_b"] * float("nan")
        self.calls += 1
        return losses


def test_non_finite_loss_names_iteration_and_terms_and_saves_nothing_after(tmp_path):
    model = _NaNAt(bad_call=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = Trainer(model, _batches(), optimizer)
    ema = ModelEMA(model, decay=0.5)
    checkpointer = AtomicCheckpointer(model, str(tmp_path), trainer=trainer, ema=ema)
    trainer.register_hooks(
        [EMAHook(ema, model), hooks.PeriodicCheckpointer(checkpointer, period=1, max_iter=10)]
    )
    with pytest.raises(FloatingPointError) as error:
        trainer.train(0, 10)
    message = str(error.value)
    assert "iteration 3" in message and "loss_b=nan" in message
    assert "loss_a=" in message.split("finite terms:")[1]  # the finite term is listed as such
    # Checkpoints of iterations 0..2 only, the pointer at the last one, which holds the weights
    # the model still has: the failed step changed nothing.
    files = sorted(f for f in os.listdir(tmp_path) if not f.startswith("."))
    assert files == [
        "last_checkpoint",
        "model_0000000.pth",
        "model_0000001.pth",
        "model_0000002.pth",
    ]
    assert checkpointer.get_checkpoint_file().endswith("model_0000002.pth")
    last = torch.load(checkpointer.get_checkpoint_file(), weights_only=True)
    assert last["iteration"] == 2 and last["ema"]["num_updates"] == 3
    for name, value in model.state_dict().items():
        assert torch.equal(last["model"][name], value), name
        assert torch.isfinite(last["ema"]["model"][name]).all(), name


def test_infinite_loss_is_reported_too():
    with pytest.raises(
        FloatingPointError, match=r"iteration 7: loss_giou=inf \(finite terms: none"
    ):
        check_losses_finite({"loss_giou": torch.tensor(float("inf"))}, 7)
    check_losses_finite({"loss_a": torch.tensor(1.0)}, 7)


class _DeviceScalar(torch.Tensor):
    """A tensor that counts the reads which, on a GPU, wait for the device (item, float, cpu)."""

    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        reads = (torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.tolist, torch.Tensor.cpu)
        if func in reads:
            cls.reads += 1
            with torch._C.DisableTorchFunctionSubclass():
                result = func(*args, **(kwargs or {}))
            return result.as_subclass(torch.Tensor) if isinstance(result, torch.Tensor) else result
        return super().__torch_function__(func, types, args, kwargs)


class _DeviceLosses(_Toy):
    def forward(self, batch):
        return {k: v.as_subclass(_DeviceScalar) for k, v in super().forward(batch).items()}


def test_one_read_of_the_loss_terms_per_step():
    """The terms are read from the device once per step, and the metrics are still written."""
    model = _DeviceLosses()
    trainer = Trainer(model, _batches(), torch.optim.SGD(model.parameters(), lr=1e-3))
    _DeviceScalar.reads = 0
    trainer.train(0, 3)
    assert _DeviceScalar.reads == 3
    history = trainer.storage.histories()
    assert {"loss_a", "loss_b", "total_loss"} <= set(history)
    total = history["total_loss"].latest()
    assert total == pytest.approx(history["loss_a"].latest() + history["loss_b"].latest())
