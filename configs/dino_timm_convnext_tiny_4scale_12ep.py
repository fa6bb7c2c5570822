from detectron2.config import LazyCall as L

from dino_d2.modeling import TimmBackbone

from .dino_r50_4scale_12ep import dataloader, lr_multiplier, model, optimizer, train

# Any timm network built with features_only=True serves as the backbone: its feature_info gives
# the channels and strides, and stride 8/16/32 outputs are named res3/res4/res5.
model.backbone.bottom_up = L(TimmBackbone)(
    model_name="convnext_tiny",
    out_indices=(1, 2, 3),
    pretrained=False,
)
model.backbone.in_features = ["res3", "res4", "res5"]
train.init_checkpoint = ""
train.output_dir = "./output/dino_timm_convnext_tiny_4scale_12ep"
