from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L
from detectron2.data import transforms as T

from .common.data.coco_detr import dataloader
from .common.models.maskdino_r50 import model
from .common.optim import AdamW as optimizer
from .common.train import train

# Mask DINO R50, 50 epochs (the authors' 46.3 mask AP / 51.7 box AP): batch 16, 368,750
# iterations, lr 1e-4 dropped tenfold at 327,778 and 355,092, AdamW weight decay 0.05, backbone
# lr x0.1, full-model gradient clipping at 0.01.
# Large-scale jitter (the authors' coco_instance_lsj mapper): flip, resize by 0.1..2.0 of 1024,
# a 1024 x 1024 crop (padded when smaller).
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=1024, target_width=1024),
    L(T.FixedSizeCrop)(crop_size=(1024, 1024)),
]
dataloader.train.mapper.use_instance_mask = True
dataloader.train.mapper.instance_mask_format = "bitmask"
dataloader.evaluator.tasks = ("bbox", "segm")
optimizer.weight_decay = 0.05
train.clip_grad.max_norm = 0.01
train.max_iter = 368750
lr_multiplier = L(MultiStepParamScheduler)(
    values=[1.0, 0.1, 0.01], milestones=[327778, 355092, 368750]
)
train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
train.output_dir = "./output/maskdino_r50_4scale_50ep"
