"""Layer-wise learning-rate decay for a plain ViT backbone (BEiT, MAE, ViTDet).

The blocks of a pretrained ViT are trained with learning rates that shrink geometrically towards
the input: the last block gets ``decay_rate`` times the base rate, the one before it
``decay_rate**2``, ..., the patch and position embeddings ``decay_rate**(num_layers + 1)``.
"""

import re

__all__ = ["ViTLayerDecay"]

# Parameters that come before the first block: patch and position embeddings, the prefix tokens
# of timm ViTs (class, register and mask tokens) and timm's pre-block norm.
_EMBEDDING = re.compile(r"\.(patch_embed|pos_embed|cls_token|reg_token|mask_token|norm_pre)(\.|$)")
_BLOCK = re.compile(r"\.blocks\.(\d+)\.")


class ViTLayerDecay:
    """The learning-rate factor of a parameter, given its full name in the model.

    Use it as ``lr_factor_func`` of :func:`dino_d2.engine.get_optimizer_params`. A parameter
    whose name starts with ``prefix`` (the ViT is somewhere below it) gets layer id 0 when it is
    an embedding or prefix token, ``i + 1`` inside ``blocks.{i}`` and ``num_layers + 1``
    otherwise; its factor is ``decay_rate ** (num_layers + 1 - layer_id)``. Everything else,
    including the feature pyramid and the neck, gets 1.0.

    For the parameter names of Detectron2 main's ViTDet ``ViT`` this gives the same factors as
    Detectron2's ``get_vit_lr_decay_rate`` (including its exception for the convolutional
    ``residual`` blocks, which keep factor 1.0); it also places timm's ``cls_token`` and
    ``reg_token`` with the embeddings. Being a class, it keeps LazyConfigs free of
    ``functools.partial``.

    Args:
        num_layers: number of ViT blocks (12 for ViT-B, 24 for ViT-L).
        decay_rate: factor between consecutive blocks (ViTDet: 0.7 for B, 0.8 for L, 0.9 for H).
        prefix: start of the names of the backbone's parameters.
    """

    def __init__(self, *, num_layers: int, decay_rate: float, prefix: str = "backbone."):
        if num_layers < 1:
            raise ValueError(f"ViTLayerDecay: num_layers must be positive, got {num_layers}")
        if not 0.0 < decay_rate <= 1.0:
            raise ValueError(f"ViTLayerDecay: decay_rate must be in (0, 1], got {decay_rate}")
        self.num_layers = num_layers
        self.decay_rate = decay_rate
        self.prefix = prefix

    def layer_id(self, name: str) -> int:
        """0 for embeddings, ``i + 1`` for ``blocks.{i}``, ``num_layers + 1`` for the rest."""
        if not name.startswith(self.prefix):
            return self.num_layers + 1
        if _EMBEDDING.search(name):
            return 0
        block = _BLOCK.search(name)
        if block and ".residual." not in name:
            layer = int(block.group(1)) + 1
            if layer > self.num_layers:
                raise ValueError(
                    f"ViTLayerDecay: parameter {name!r} is in block {layer - 1}, but num_layers "
                    f"is {self.num_layers}"
                )
            return layer
        return self.num_layers + 1

    def __call__(self, name: str) -> float:
        return self.decay_rate ** (self.num_layers + 1 - self.layer_id(name))

    def __repr__(self) -> str:
        return (
            f"ViTLayerDecay(num_layers={self.num_layers}, decay_rate={self.decay_rate}, "
            f"prefix={self.prefix!r})"
        )
