from detectron2.config import LazyCall as L

from dino_d2.engine import ViTLayerDecay
from dino_d2.modeling.backbone import SimplePyramid, TimmBackbone

from .dino_r50_4scale_12ep import dataloader, lr_multiplier, model, optimizer, train

# A timm ViT-S/16 (its last block through timm's features_only / forward_intermediates, stride
# 16) under dino_d2's own ViTDet-style simple feature pyramid: runs on any Detectron2 version.
# dynamic_img_size interpolates the position embedding to every input size; the pyramid pads the
# images to multiples of 32. Factors 2, 1, 0.5 give strides 8/16/32 and the neck adds 64.
model.backbone.bottom_up = L(SimplePyramid)(
    net=L(TimmBackbone)(
        model_name="vit_small_patch16_224",
        out_indices=(-1,),
        pretrained=False,
        depth=12,
        dynamic_img_size=True,
        drop_path_rate=0.1,
    ),
    in_feature="res4",
    scale_factors=(2.0, 1.0, 0.5),
)
model.backbone.in_features = ["p3", "p4", "p5"]
# ViTDet's layer-wise lr decay (0.7 per block) instead of the 0.1 backbone factor.
optimizer.params.backbone_lr_factor = 1.0
optimizer.params.lr_factor_func = L(ViTLayerDecay)(
    num_layers="${model.backbone.bottom_up.net.depth}", decay_rate=0.7
)
train.init_checkpoint = ""
train.output_dir = "./output/dino_timm_vit_small_4scale_12ep"
