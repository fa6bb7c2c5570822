from dino_d2.modeling import SWIN_PRESETS

from .dino_swin_tiny_224_4scale_12ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.update(SWIN_PRESETS["small"])
train.output_dir = "./output/dino_swin_small_224_4scale_12ep"
