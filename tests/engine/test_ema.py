import pytest
import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer

from dino_d2.engine import EMAHook, ModelEMA


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_step(model, seed):
    """Changes every parameter and the BatchNorm statistics, as a training step would."""
    torch.manual_seed(seed)
    model.train()
    model(torch.randn(5, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))


def test_update_is_the_exponential_average_and_copies_integer_buffers():
    model = _model()
    ema = ModelEMA(model, decay=0.9)
    expected = {k: v.double() for k, v in _state(model).items()}
    for step in range(3):
        _train_step(model, seed=step)
        ema.update(model)
        for name, value in _state(model).items():
            if value.is_floating_point():
                expected[name] = 0.9 * expected[name] + 0.1 * value.double()
            else:
                expected[name] = value
    assert ema.num_updates == 3
    for name, average in ema.state.items():
        assert average.dtype == model.state_dict()[name].dtype
        torch.testing.assert_close(average.double(), expected[name].double(), rtol=1e-6, atol=1e-7)
    assert ema.state["1.num_batches_tracked"].item() == 3
    # Running statistics are averaged too (as the authors' ModelEma does).
    assert not torch.equal(ema.state["1.running_mean"], model[1].running_mean)


def test_update_groups_entries_of_every_dtype():
    """Entries of several dtypes are averaged in their own dtype, each as its own formula."""
    model = _model()
    model.register_buffer("scale64", torch.ones(3, dtype=torch.float64))
    model.register_buffer("scale16", torch.ones(3, dtype=torch.bfloat16))
    ema = ModelEMA(model, decay=0.75)
    start = _state(model)
    _train_step(model, seed=3)
    model.scale64.fill_(5.0)
    model.scale16.fill_(5.0)
    ema.update(model)
    for name, value in _state(model).items():
        average = ema.state[name]
        assert average.dtype == value.dtype, name
        if value.is_floating_point():
            expected = 0.75 * start[name].double() + 0.25 * value.double()
            tolerance = 1e-2 if value.dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(average.double(), expected, rtol=tolerance, atol=1e-7)
    assert ema.state["scale64"].tolist() == [2.0, 2.0, 2.0]
    assert ema.state["scale16"].tolist() == [2.0, 2.0, 2.0]


def test_decay_zero_follows_the_model():
    model = _model()
    ema = ModelEMA(model, decay=0.0)
    _train_step(model, seed=1)
    ema.update(model)
    for name, value in _state(model).items():
        torch.testing.assert_close(ema.state[name], value)


def test_applied_to_swaps_in_and_restores_even_on_error():
    model = _model()
    ema = ModelEMA(model, decay=0.5)
    _train_step(model, seed=1)
    ema.update(model)
    own = _state(model)
    with ema.applied_to(model):
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, ema.state[name])
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, own[name])
    with pytest.raises(RuntimeError, match="boom"):
        with ema.applied_to(model):
            raise RuntimeError("boom")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, own[name])


def test_checkpoint_round_trip_and_hook(tmp_path):
    model = _model()
    ema = ModelEMA(model, decay=0.8)
    for step in range(2):
        _train_step(model, seed=step)
        ema.update(model)
    DetectionCheckpointer(model, str(tmp_path), ema=ema).save("model_final")

    fresh = _model(seed=5)
    restored = ModelEMA(fresh, decay=0.8)
    assert not restored.restored
    DetectionCheckpointer(fresh, str(tmp_path), ema=restored).resume_or_load("", resume=True)
    assert restored.restored and restored.num_updates == 2
    for name, value in ema.state.items():
        torch.testing.assert_close(restored.state[name], value)
    # A restored average survives the start of training ...
    EMAHook(restored, fresh).before_train()
    torch.testing.assert_close(restored.state["0.weight"], ema.state["0.weight"])
    # ... one that was not restored restarts from the (possibly just loaded) model weights.
    other = ModelEMA(_model(seed=7), decay=0.8)
    EMAHook(other, fresh).before_train()
    assert other.num_updates == 0
    torch.testing.assert_close(other.state["0.weight"], fresh[0].weight)


def test_mismatched_checkpoint_and_bad_decay():
    ema = ModelEMA(_model(), decay=0.9)
    with pytest.raises(KeyError, match="missing"):
        ema.load_state_dict({"model": {"0.weight": torch.zeros(2, 3)}})
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(_model(), decay=1.0)
