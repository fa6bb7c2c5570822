from .common.models.maskdino_r50 import model as mask_model
from .dino_r18_digits import dataloader, lr_multiplier, model, optimizer, train

# The digits demo with Mask DINO's mask head (configs/common/models/maskdino_r50.py's parts on
# the demo's ResNet-18 DINO): res2 (64 channels) fused into 128-channel mask features, the mask
# terms on 3136 points (a quarter of the authors' 12544: the digits are small), the authors'
# loss and matching weights. Needs the digits masks (dataset format version 2).
model._target_ = mask_model._target_
model.mask_stride = 4
model.backbone.bottom_up.out_features = ["res2", "res3", "res4", "res5"]
model.backbone.in_features = ["res3", "res4", "res5"]
model.heads = mask_model.heads
model.heads.masks.pixel_decoder.in_channels = 64
model.heads.masks.pixel_decoder.mask_dim = 128
model.criterion.matcher.costs = mask_model.criterion.matcher.costs
model.criterion.matcher.cost_options = dict(cost_mask=dict(num_points=3136))
model.criterion.losses = mask_model.criterion.losses
model.criterion.loss_options = dict(
    loss_mask=dict(num_points=3136), loss_dice=dict(num_points=3136)
)
dataloader.train.mapper.use_instance_mask = True
dataloader.train.mapper.instance_mask_format = "bitmask"
dataloader.evaluator.tasks = ("bbox", "segm")
train.output_dir = "./output/maskdino_digits"
