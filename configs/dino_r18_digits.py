from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem, ResNet
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from .common.data.coco_detr import dataloader
from .common.models.dino_r50 import model
from .common.optim import AdamW as optimizer
from .common.train import train

# The embedded demo: a small DINO trained from scratch on the generated digits dataset
# (dino_d2/data/digits.py; registered and generated on first use as digits_train / digits_val).
# Sized for a CPU: 320-pixel images, ResNet-18, 128 channels, 3 + 3 layers, 100 queries.

# ResNet-18 from scratch: every stage trains and BatchNorm learns (no pretrained statistics).
model.backbone.bottom_up = L(ResNet)(
    stem=L(BasicStem)(in_channels=3, out_channels=64, norm="BN"),
    stages=L(ResNet.make_default_stages)(depth=18, norm="BN"),
    out_features=["res3", "res4", "res5"],
    freeze_at=0,
)
model.transformer.embed_dim = 128
model.transformer.position_embedding.num_pos_feats = 64
model.transformer.encoder.num_layers = 3
model.transformer.decoder.num_layers = 3
model.transformer.encoder.ffn_dim = 512
model.transformer.decoder.ffn_dim = 512
model.transformer.query_selection.num_queries = 100
model.denoising.dn_number = 20
model.num_classes = 10
model.num_select = 100

# Digits change class under mirroring: no flip. Multi-scale around 320; the crop branch resizes
# to 160..240 and crops 160..240 before the final resize, as DETR's 400..600 / 384..600 do at 800.
dataloader.train.dataset.names = "digits_train"
dataloader.train.mapper.augmentations.horizontal_flip = False
dataloader.train.mapper.augmentations.min_sizes = [288, 320, 352]
dataloader.train.mapper.augmentations.max_size = 512
dataloader.train.mapper.augmentations.crop_resize_sizes = [160, 200, 240]
dataloader.train.mapper.augmentations.crop_size = [160, 240]
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 2
dataloader.test.dataset.names = "digits_val"
dataloader.test.mapper.augmentations.min_size = 320
dataloader.test.mapper.augmentations.max_size = 512
dataloader.test.num_workers = 2

optimizer.lr = 2e-4
# The backbone starts from scratch: it learns as fast as the rest.
optimizer.params.backbone_lr_factor = 1.0

# A short linear warm-up (5% of the run) for the from-scratch backbone, a tenfold drop at 90%.
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[1800, 2000]),
    warmup_length=0.05,
    warmup_factor=0.01,
)

train.max_iter = 2000
train.eval_period = 500
train.checkpointer.period = 500
train.log_period = 20
train.init_checkpoint = ""
train.output_dir = "./output/digits"
train.seed = 0
# Trainable BatchNorm: every process uses rank 0's running statistics, so evaluation (spread
# over the processes) and the saved checkpoint agree.
train.ddp.broadcast_buffers = True
