from .dino_swin_large_384_4scale_12ep import model as swin_dino
from .dino_swin_large_384_4scale_12ep import train as swin_train
from .maskdino_r50_4scale_50ep import dataloader, lr_multiplier, model, optimizer, train

# Mask DINO Swin-L (IN-22k, 384), 50 epochs (the authors' 52.3 mask AP / 59.0 box AP;
# swin/maskdino_R50_bs16_50ep_4s_dowsample1_2048.yaml): the encoder over res2..res5 plus one
# stride-64 level (5 levels), res2 (192 channels) fused into the mask features.
model.backbone.bottom_up = swin_dino.backbone.bottom_up
model.backbone.bottom_up.out_features = ["res2", "res3", "res4", "res5"]
model.backbone.in_features = ["res2", "res3", "res4", "res5"]
model.transformer.num_levels = 5
model.heads.masks.pixel_decoder.in_channels = 192
# INITIALIZE_BOX_TYPE 'bitmask' in the Swin-L recipe.
model.mask_box_init = "bitmask"
train.init_checkpoint = swin_train.init_checkpoint
train.output_dir = "./output/maskdino_swin_large_384_5scale_50ep"
