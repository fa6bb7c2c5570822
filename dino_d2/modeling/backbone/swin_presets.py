"""The architectures of the released Swin models, as keyword arguments of
:class:`~dino_d2.modeling.backbone.swin.SwinBackbone`: plain data, readable (by the checkpoint
converters) without importing timm."""

from typing import Dict

__all__ = ["SWIN_PRESETS"]

# Architecture of the released Swin models (keyword arguments of SwinBackbone). The suffix is the
# pre-training resolution; names without one are the 224 models (window 7).
SWIN_PRESETS: Dict[str, Dict[str, object]] = {
    "tiny": dict(
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        window_size=7,
        pretrain_img_size=224,
    ),
    "small": dict(
        embed_dim=96,
        depths=(2, 2, 18, 2),
        num_heads=(3, 6, 12, 24),
        window_size=7,
        pretrain_img_size=224,
    ),
    "base": dict(
        embed_dim=128,
        depths=(2, 2, 18, 2),
        num_heads=(4, 8, 16, 32),
        window_size=7,
        pretrain_img_size=224,
    ),
    "base_384": dict(
        embed_dim=128,
        depths=(2, 2, 18, 2),
        num_heads=(4, 8, 16, 32),
        window_size=12,
        pretrain_img_size=384,
    ),
    "large": dict(
        embed_dim=192,
        depths=(2, 2, 18, 2),
        num_heads=(6, 12, 24, 48),
        window_size=7,
        pretrain_img_size=224,
    ),
    "large_384": dict(
        embed_dim=192,
        depths=(2, 2, 18, 2),
        num_heads=(6, 12, 24, 48),
        window_size=12,
        pretrain_img_size=384,
    ),
}
