"""Detectron2's yacs-config entry to the Swin backbone: the ``MODEL.SWIN`` keys and the builder
registered in ``BACKBONE_REGISTRY`` (``MODEL.BACKBONE.NAME = "build_swin_backbone"``).

Kept apart from :mod:`dino_d2.modeling.backbone.swin` so that registering the builder (which
``import dino_d2`` does) does not import timm: the Swin module is imported when a Swin backbone is
built.
"""

from typing import Optional

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY

__all__ = ["add_swin_config", "build_swin_backbone"]


def add_swin_config(cfg: CfgNode) -> None:
    """Add the ``cfg.MODEL.SWIN`` keys (Swin-T defaults) used by :func:`build_swin_backbone`."""
    cfg.MODEL.SWIN = CfgNode()
    cfg.MODEL.SWIN.EMBED_DIM = 96
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE = 224
    cfg.MODEL.SWIN.PATCH_SIZE = 4
    cfg.MODEL.SWIN.MLP_RATIO = 4.0
    cfg.MODEL.SWIN.QKV_BIAS = True
    cfg.MODEL.SWIN.DROP_RATE = 0.0
    cfg.MODEL.SWIN.ATTN_DROP_RATE = 0.0
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.2
    cfg.MODEL.SWIN.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.SWIN.FROZEN_STAGES = -1
    cfg.MODEL.SWIN.USE_CHECKPOINT = False


@BACKBONE_REGISTRY.register()
def build_swin_backbone(cfg: CfgNode, input_shape: Optional[ShapeSpec] = None) -> "SwinBackbone":
    """Build a :class:`SwinBackbone` from ``cfg.MODEL.SWIN`` (see :func:`add_swin_config`).

    Args:
        cfg: a Detectron2 config with the ``MODEL.SWIN`` keys.
        input_shape: shape of the input images; its channels set ``in_chans`` (default 3).
    """
    from .swin import SwinBackbone

    swin = cfg.MODEL.SWIN
    return SwinBackbone(
        embed_dim=swin.EMBED_DIM,
        depths=swin.DEPTHS,
        num_heads=swin.NUM_HEADS,
        window_size=swin.WINDOW_SIZE,
        pretrain_img_size=swin.PRETRAIN_IMG_SIZE,
        patch_size=swin.PATCH_SIZE,
        in_chans=input_shape.channels if input_shape and input_shape.channels else 3,
        mlp_ratio=swin.MLP_RATIO,
        qkv_bias=swin.QKV_BIAS,
        drop_rate=swin.DROP_RATE,
        attn_drop_rate=swin.ATTN_DROP_RATE,
        drop_path_rate=swin.DROP_PATH_RATE,
        out_features=swin.OUT_FEATURES,
        frozen_stages=swin.FROZEN_STAGES,
        use_checkpoint=swin.USE_CHECKPOINT,
    )
