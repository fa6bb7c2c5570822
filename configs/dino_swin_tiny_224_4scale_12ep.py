from detectron2.config import LazyCall as L

from dino_d2.modeling import SWIN_PRESETS, SwinBackbone

from .dino_r50_4scale_12ep import dataloader, lr_multiplier, model, optimizer, train

# Swin-T (ImageNet-1k, 224): convert Microsoft's release with
# tools/convert_checkpoint.py --source swin and point train.init_checkpoint at the result.
model.backbone.bottom_up = L(SwinBackbone)(
    **SWIN_PRESETS["tiny"],
    drop_path_rate=0.2,
    out_features=["res3", "res4", "res5"],
    use_checkpoint=False,
)
train.init_checkpoint = ""
train.output_dir = "./output/dino_swin_tiny_224_4scale_12ep"
