from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem, ResNet
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from .common.data.coco_detr import dataloader
from .common.models.dino_r50 import model
from .common.optim import AdamW as optimizer
from .common.train import train

# The embedded demo: a small DINO trained from scratch on the generated digits dataset
# (dino_d2/data/digits.py; registered and generated on first use as digits_train / digits_val),
# sized so that all of `make demo` takes at most 21 minutes on a 2-core CPU with bfloat16.
#
# Measured on a 2-core CPU with another process busy on one core, batch 8, forward + backward
# + AdamW, one torch thread, float32: 4.2 s/iter at 320 px, 2.0 at 224, 1.6 at 192, 1.2 at 160.
# On idle cores, in the training script: 0.99 s/iter at 192 px in float32, 0.72-0.76 under
# bfloat16 autocast (see below). On a busy machine the training script drops to one compute
# thread by itself (dino_d2.engine.threads): two threads fighting for one core took 6.1 s/iter
# (224 px) and 24 (320 px).

# ResNet-18 from scratch: every stage trains and BatchNorm learns (no pretrained statistics).
# At 224 px timm's resnet10t, regnetx_004 and mobilenetv3_large_100 measured 1.5-1.7 s/iter
# against ResNet-18's 2.0: too small a gain to trade for an untested from-scratch backbone.
# res2 (stride 4) features instead of the extra stride-64 level cost 2.5-3x (3.6 s/iter at 160 px).
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
model.transformer.encoder.layer.ffn_dim = 512
model.transformer.decoder.layer.ffn_dim = 512
# At most 6 digits an image: 50 queries and 10 denoising groups' worth of queries are plenty.
model.transformer.query_selection.num_queries = 50
model.denoising.dn_number = 10
model.num_classes = 10
model.num_select = 50

# Images at 192 px (0.6 of the 320-px canvas): digits become 10-38 px, still at least one
# stride-8 cell, and a step costs 1.6 s instead of 4.2. Digits change class under mirroring: no
# flip. Multi-scale around 192.
dataloader.train.dataset.names = "digits_train"
dataloader.train.mapper.augmentations.horizontal_flip = False
dataloader.train.mapper.augmentations.min_sizes = [176, 192, 208]
dataloader.train.mapper.augmentations.max_size = 320
# No crop branch: the validation images are whole canvases, and a crop (resized back to 192 px on
# its short side) comes out up to 192x320, so a batch with one crop is padded to that size. In
# 700-iteration runs of the whole schedule (one thread each, two runs side by side), box AP 42.9
# without crops against 39.2 with them (crop probability 0.5; crops of 96..144 px after resizing
# the short side to 96..144), and steps 7% shorter on idle cores.
dataloader.train.mapper.augmentations.crop_prob = 0.0
dataloader.train.total_batch_size = 8
# One worker: the images are small and the second core is better left to other work.
dataloader.train.num_workers = 1
dataloader.test.dataset.names = "digits_val"
dataloader.test.mapper.augmentations.min_size = 192
dataloader.test.mapper.augmentations.max_size = 320
dataloader.test.num_workers = 1

# From scratch, a high learning rate pays: after 150 iterations lr 1e-3 had lower losses than
# 4e-4 (total loss 10.1 against 11.5) and box AP 3.3 against 0.5.
optimizer.lr = 1e-3
# The backbone starts from scratch: it learns as fast as the rest.
optimizer.params.backbone_lr_factor = 1.0

# A short linear warm-up (5% of the run) for the from-scratch backbone, a tenfold drop at 87%.
# Chosen by measurement (one thread per run while a second run held the other core): with
# 1,150 iterations and the drop at 1,000, box AP 15.0 / 24.0 / 32.4 / 46.7 / 53.6 at iterations
# 250 / 500 / 750 / 1,000 / 1,150; the same images in batches of 4 (2,400 iterations, drop at
# 2,100) gave 11.7 / 23.6 / 33.4 / 44.5 / 54.9 at the same points: alike per image, so batch 8
# stays. In 700-iteration runs of the whole schedule (as above), lr 1e-3 gave box AP 39.2,
# 7e-4 37.7, 2e-3 24.4, and a cosine decay from 1e-3 32.2. The length fills `make demo`'s 21
# minutes: 1,900 bfloat16 steps of 0.546 s on idle cores (the first release's float32 steps
# took 1.25 s, and 1,000 of them 22 min).
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[1650, 1900]),
    warmup_length=0.05,
    warmup_factor=0.01,
)

train.max_iter = 1900
train.eval_period = 475
train.checkpointer.period = 475
train.log_period = 20
train.init_checkpoint = ""
train.output_dir = "./output/digits"
train.seed = 0
# Trainable BatchNorm: every process uses rank 0's running statistics, so evaluation (spread
# over the processes) and the saved checkpoint agree.
train.ddp.broadcast_buffers = True
