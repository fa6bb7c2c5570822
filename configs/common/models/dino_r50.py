from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem, ResNet

from dino_d2.layers.position_encoding import PositionEmbeddingSine
from dino_d2.modeling import (
    DINO,
    ChannelMapper,
    ContrastiveDenoising,
    DeformableDecoder,
    DeformableEncoder,
    DINOCriterion,
    DINOTransformer,
    HungarianMatcher,
    MixedQuerySelection,
)
from dino_d2.modeling.transformer import DeformableDecoderLayer, DeformableEncoderLayer

# DINO-4scale with a ResNet-50: the authors' R50 recipe (IDEA-Research/DINO, DINO_4scale.py).
model = L(DINO)(
    backbone=L(ChannelMapper)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
            stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=False, norm="FrozenBN"),
            out_features=["res3", "res4", "res5"],
            # The authors train res3..res5 and freeze the stem and res2.
            freeze_at=2,
        ),
        in_features="${.bottom_up.out_features}",
        out_channels="${..transformer.embed_dim}",
        num_extra_levels=1,
    ),
    transformer=L(DINOTransformer)(
        # Each stack holds num_layers clones of its layer, initialised one by one.
        encoder=L(DeformableEncoder)(
            layer=L(DeformableEncoderLayer)(
                embed_dim="${...embed_dim}",
                num_heads=8,
                ffn_dim=2048,
                num_levels="${...num_levels}",
                num_points=4,
                dropout=0.0,
            ),
            num_layers=6,
            use_checkpoint=False,
        ),
        decoder=L(DeformableDecoder)(
            num_classes="${...num_classes}",
            layer=L(DeformableDecoderLayer)(
                embed_dim="${...embed_dim}",
                num_heads=8,
                ffn_dim=2048,
                num_levels="${...num_levels}",
                num_points=4,
                dropout=0.0,
            ),
            num_layers=6,
            share_heads=True,
            scale_query_pos_by_valid_ratio=False,
            use_checkpoint=False,
        ),
        query_selection=L(MixedQuerySelection)(
            embed_dim="${..embed_dim}",
            num_classes="${...num_classes}",
            num_queries=900,
        ),
        position_embedding=L(PositionEmbeddingSine)(
            # Half of embed_dim: the sine embedding of y then x fills the channels.
            num_pos_feats=128,
            # The authors' 20 / 0.0; detrex uses 10000 / -0.5.
            temperature=20,
            normalize=True,
            offset=0.0,
        ),
        num_levels=4,
        embed_dim=256,
    ),
    denoising=L(ContrastiveDenoising)(
        num_classes="${..num_classes}",
        embed_dim="${..transformer.embed_dim}",
        dn_number=100,
        label_noise_ratio=0.5,
        # 1.0 as the authors' training scripts pass it (their config file says 0.4).
        box_noise_scale=1.0,
    ),
    criterion=L(DINOCriterion)(
        num_classes="${..num_classes}",
        # Matching cost and loss terms by name (dino_d2.modeling.MATCHING_COSTS / LOSSES) with
        # their weights; a registered term is added with one more line.
        matcher=L(HungarianMatcher)(costs=dict(cost_bbox=5.0, cost_class=2.0, cost_giou=2.0)),
        num_decoder_layers="${..transformer.decoder.num_layers}",
        losses=dict(loss_class=1.0, loss_bbox=5.0, loss_giou=2.0),
    ),
    num_classes=80,
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    input_format="RGB",
    num_select=300,
)
