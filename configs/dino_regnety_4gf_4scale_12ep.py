from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import RegNet
from detectron2.modeling.backbone.regnet import ResBottleneckBlock, SimpleStem

from .dino_r50_4scale_12ep import dataloader, lr_multiplier, model, optimizer, train

# Any Detectron2 backbone works under the DINO head: here Detectron2's RegNetY-4GF, with the
# pycls ImageNet weights of Detectron2's model zoo (BGR input, as pycls trained them).
model.backbone.bottom_up = L(RegNet)(
    stem_class=SimpleStem,
    stem_width=32,
    block_class=ResBottleneckBlock,
    depth=22,
    w_a=31.41,
    w_0=96,
    w_m=2.24,
    group_width=64,
    se_ratio=0.25,
    freeze_at=2,
    norm="FrozenBN",
    out_features=["s2", "s3", "s4"],
)
model.input_format = "BGR"
model.pixel_mean = [103.530, 116.280, 123.675]
model.pixel_std = [57.375, 57.120, 58.395]
dataloader.train.mapper.image_format = "BGR"
dataloader.test.mapper.image_format = "BGR"
train.init_checkpoint = "detectron2://ImageNetPretrained/FAIR/RegNetY-4.0GF_dds_8gpu.pyth"
train.output_dir = "./output/dino_regnety_4gf_4scale_12ep"
