import copy

import torch

from detectron2.config import instantiate
from detectron2.layers import Conv2d, FrozenBatchNorm2d

from dino_d2.layers.frozen_bn import FrozenBNConv2d, fold_frozen_batchnorm
from dino_d2.model_zoo import get_config


def _randomized_frozen_bn(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0.0, 0.1, generator=generator)
                m.running_mean.normal_(0.0, 0.1, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
    return module


def _resnet(depth=18):
    cfg = get_config("dino_r50_4scale_12ep.py").model.backbone.bottom_up
    cfg.stages.depth = depth
    del cfg.stages.stride_in_1x1
    cfg.freeze_at = 0
    return _randomized_frozen_bn(instantiate(cfg))


def test_folded_convolutions_give_the_same_outputs_and_gradients():
    plain = _resnet()
    fused = copy.deepcopy(plain)
    assert fold_frozen_batchnorm(fused) == sum(
        type(m) is Conv2d and isinstance(m.norm, FrozenBatchNorm2d) for m in plain.modules()
    )
    assert any(type(m) is FrozenBNConv2d for m in fused.modules())
    assert fused.state_dict().keys() == plain.state_dict().keys()
    # float64: in float32 the rounding of the two orders can flip a max-pool choice in the stem,
    # which moves its gradient to another pixel.
    plain, fused = plain.double(), fused.double()
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = []
    for model in (plain, fused):
        out = model(x)
        sum(
            (v * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))).sum()
            for v in out.values()
        ).backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (out0, grad0), (out1, grad1) = results
    for key in out0:
        torch.testing.assert_close(out1[key], out0[key], rtol=1e-10, atol=1e-10)
    for name in grad0:
        torch.testing.assert_close(grad1[name], grad0[name], rtol=1e-9, atol=1e-9)
    # Eval and no-grad (Detectron2's FrozenBatchNorm2d uses F.batch_norm there), float32 too.
    plain, fused, x = plain.float(), fused.float(), x.float()
    with torch.no_grad():
        for key, value in plain.eval()(x).items():
            torch.testing.assert_close(fused.eval()(x)[key], value, rtol=1e-4, atol=1e-4)


def test_a_loaded_checkpoint_reaches_the_folded_convolution():
    fused = _resnet()
    fold_frozen_batchnorm(fused)
    other = _randomized_frozen_bn(_resnet(), seed=3)
    fused.load_state_dict(other.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for key, value in other.eval()(x).items():
            torch.testing.assert_close(fused.eval()(x)[key], value, rtol=1e-4, atol=1e-4)


def test_other_convolutions_are_left_alone():
    conv = Conv2d(3, 4, 3, norm=torch.nn.BatchNorm2d(4))
    assert fold_frozen_batchnorm(conv) == 0 and type(conv) is Conv2d
