from collections import OrderedDict

from detectron2.config import LazyCall as L

from dino_d2.projects.mask_dino import MaskDINO, MaskHead, MaskPixelDecoder

from .dino_r50 import model

# Mask DINO (IDEA-Research/MaskDINO, configs/coco/instance-segmentation/
# maskdino_R50_bs16_50ep_3s_dowsample1_2048.yaml): DINO's 4-scale encoder over res3..res5 plus
# one stride-64 level, the res2 map fused into the mask features, 9 decoder layers, 300 queries,
# 100 denoising queries, FFN 2048; the backbone's stem and stages all train (FREEZE_AT 0).
model._target_ = MaskDINO
model.mask_stride = 4
# Mask-enhanced anchors (INITIALIZE_BOX_TYPE 'mask2box' in the R50 recipe).
model.mask_box_init = "mask2box"
model.backbone.bottom_up.out_features = ["res2", "res3", "res4", "res5"]
model.backbone.bottom_up.freeze_at = 0
model.backbone.in_features = ["res3", "res4", "res5"]
model.heads = L(OrderedDict)(
    masks=L(MaskHead)(
        pixel_decoder=L(MaskPixelDecoder)(
            in_channels=256,
            embed_dim="${....transformer.embed_dim}",
            mask_dim=256,
            feature="res2",
        ),
        embed_dim="${...transformer.embed_dim}",
    )
)
model.transformer.decoder.num_layers = 9
# The pixel decoder's PositionEmbeddingSine(normalize=True): temperature 10000, no offset.
model.transformer.position_embedding.temperature = 10000
model.transformer.position_embedding.offset = 0.0
# The authors' inverse_sigmoid clamps at 1e-5 (DINO's at 1e-3): the decoder's boxes, the
# denoising boxes and the mask-derived anchors.
model.transformer.decoder.box_logit_eps = 1e-5
model.transformer.query_selection.num_queries = 300
model.denoising.dn_number = 100
# DN_NOISE_SCALE 0.4: labels changed with probability 0.2, boxes jittered by 0.4. (The authors'
# Mask DINO denoising has no negative queries; DINO's contrastive denoising keeps them.)
model.denoising.label_noise_ratio = 0.4
model.denoising.box_noise_scale = 0.4
# Matching: class 4, box L1 5, GIoU 2, mask BCE 5 + dice 5 (cost_mask = BCE + dice on the
# same 12544 random points); losses with the same weights, the mask terms on 12544 importance-
# sampled points (oversample 3, importance ratio 0.75: the loss terms' defaults).
model.criterion.matcher.costs = dict(cost_class=4.0, cost_bbox=5.0, cost_giou=2.0, cost_mask=5.0)
model.criterion.matcher.cost_options = dict(cost_mask=dict(num_points=12544, dice_weight=1.0))
model.criterion.losses = dict(
    loss_class=4.0, loss_bbox=5.0, loss_giou=2.0, loss_mask=5.0, loss_dice=5.0
)
# TEST.DETECTIONS_PER_IMAGE: 100.
model.num_select = 100
