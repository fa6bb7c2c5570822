"""yacs support: build DINO from a classic Detectron2 config (``MODEL.META_ARCHITECTURE: "DINO"``).

LazyConfigs under ``configs/`` are the primary way to configure dino_d2; this module exists so
that code built around ``get_cfg()`` / ``build_model(cfg)`` can use DINO too::

    cfg = get_cfg()
    add_dino_config(cfg)
    cfg.merge_from_file("my_dino.yaml")
    model = build_model(cfg)
"""

from detectron2.config import CfgNode as CN
from detectron2.modeling import build_backbone

__all__ = ["add_dino_config", "build_dino_parts"]


def add_dino_config(cfg: CN) -> None:
    """Adds ``MODEL.DINO`` (and ``MODEL.SWIN``) with the authors' R50 4-scale defaults."""
    from dino_d2.modeling.backbone import add_swin_config

    add_swin_config(cfg)
    cfg.MODEL.DINO = CN()
    d = cfg.MODEL.DINO
    d.NUM_CLASSES = 80
    # Backbone levels fed to the neck, finest first, and stride-2 levels added after them.
    d.IN_FEATURES = ["res3", "res4", "res5"]
    d.NUM_EXTRA_LEVELS = 1
    d.HIDDEN_DIM = 256
    d.NUM_HEADS = 8
    d.DIM_FEEDFORWARD = 2048
    d.ENC_LAYERS = 6
    d.DEC_LAYERS = 6
    d.NUM_POINTS = 4
    d.DROPOUT = 0.0
    d.NUM_QUERIES = 900
    d.SHARE_HEADS = True
    # Sine position embedding: the authors' 20 / 0.0, detrex's 10000 / -0.5.
    d.PE_TEMPERATURE = 20
    d.PE_OFFSET = 0.0
    d.DN_NUMBER = 100
    d.LABEL_NOISE_RATIO = 0.5
    d.BOX_NOISE_SCALE = 1.0
    d.CLASS_WEIGHT = 1.0
    d.BBOX_WEIGHT = 5.0
    d.GIOU_WEIGHT = 2.0
    d.COST_CLASS = 2.0
    d.COST_BBOX = 5.0
    d.COST_GIOU = 2.0
    d.NUM_SELECT = 300
    d.USE_CHECKPOINT = False
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.280, 103.530]
    cfg.MODEL.PIXEL_STD = [58.395, 57.120, 57.375]
    cfg.INPUT.FORMAT = "RGB"


def build_dino_parts(cfg: CN) -> dict:
    """The keyword arguments of :class:`DINO` built from a yacs config."""
    from dino_d2.layers.position_encoding import PositionEmbeddingSine
    from dino_d2.modeling import (
        ChannelMapper,
        ContrastiveDenoising,
        DeformableDecoder,
        DeformableEncoder,
        DINOCriterion,
        DINOTransformer,
        HungarianMatcher,
        MixedQuerySelection,
    )

    d = cfg.MODEL.DINO
    backbone = ChannelMapper(
        bottom_up=build_backbone(cfg),
        in_features=d.IN_FEATURES,
        out_channels=d.HIDDEN_DIM,
        num_extra_levels=d.NUM_EXTRA_LEVELS,
    )
    num_levels = len(d.IN_FEATURES) + d.NUM_EXTRA_LEVELS
    layer = dict(
        embed_dim=d.HIDDEN_DIM,
        num_heads=d.NUM_HEADS,
        ffn_dim=d.DIM_FEEDFORWARD,
        num_levels=num_levels,
        num_points=d.NUM_POINTS,
        dropout=d.DROPOUT,
        use_checkpoint=d.USE_CHECKPOINT,
    )
    transformer = DINOTransformer(
        encoder=DeformableEncoder(num_layers=d.ENC_LAYERS, **layer),
        decoder=DeformableDecoder(
            num_classes=d.NUM_CLASSES,
            num_layers=d.DEC_LAYERS,
            share_heads=d.SHARE_HEADS,
            scale_query_pos_by_valid_ratio=False,
            **layer,
        ),
        query_selection=MixedQuerySelection(
            embed_dim=d.HIDDEN_DIM, num_classes=d.NUM_CLASSES, num_queries=d.NUM_QUERIES
        ),
        position_embedding=PositionEmbeddingSine(
            num_pos_feats=d.HIDDEN_DIM // 2,
            temperature=d.PE_TEMPERATURE,
            normalize=True,
            offset=d.PE_OFFSET,
        ),
        num_levels=num_levels,
        embed_dim=d.HIDDEN_DIM,
    )
    return dict(
        backbone=backbone,
        transformer=transformer,
        denoising=ContrastiveDenoising(
            num_classes=d.NUM_CLASSES,
            embed_dim=d.HIDDEN_DIM,
            dn_number=d.DN_NUMBER,
            label_noise_ratio=d.LABEL_NOISE_RATIO,
            box_noise_scale=d.BOX_NOISE_SCALE,
        ),
        criterion=DINOCriterion(
            num_classes=d.NUM_CLASSES,
            matcher=HungarianMatcher(
                cost_class=d.COST_CLASS, cost_bbox=d.COST_BBOX, cost_giou=d.COST_GIOU
            ),
            num_decoder_layers=d.DEC_LAYERS,
            class_weight=d.CLASS_WEIGHT,
            bbox_weight=d.BBOX_WEIGHT,
            giou_weight=d.GIOU_WEIGHT,
        ),
        num_classes=d.NUM_CLASSES,
        pixel_mean=cfg.MODEL.PIXEL_MEAN,
        pixel_std=cfg.MODEL.PIXEL_STD,
        input_format=cfg.INPUT.FORMAT,
        num_select=d.NUM_SELECT,
    )
