from dino_d2.modeling import SWIN_PRESETS

from .dino_swin_tiny_224_4scale_12ep import dataloader, lr_multiplier, model, optimizer, train

# Swin-B, ImageNet-22k pre-training at 384.
model.backbone.bottom_up.update(SWIN_PRESETS["base_384"])
train.output_dir = "./output/dino_swin_base_384_4scale_12ep"
