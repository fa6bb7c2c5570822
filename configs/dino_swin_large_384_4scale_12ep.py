from dino_d2.modeling import SWIN_PRESETS

from .dino_swin_tiny_224_4scale_12ep import dataloader, lr_multiplier, model, optimizer, train

# Swin-L, ImageNet-22k pre-training at 384; checkpointed blocks, as the authors train it.
model.backbone.bottom_up.update(SWIN_PRESETS["large_384"])
model.backbone.bottom_up.use_checkpoint = True
train.output_dir = "./output/dino_swin_large_384_4scale_12ep"
