from .common.data.coco_detr import dataloader
from .common.models.dino_r50 import model
from .common.optim import AdamW as optimizer
from .common.schedule import lr_multiplier_12ep as lr_multiplier
from .common.train import train

# ImageNet ResNet-50 from torchvision, in Detectron2's layout (tools/convert_checkpoint.py
# --source torchvision-resnet makes the same file from torchvision's own release).
train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
train.output_dir = "./output/dino_r50_4scale_12ep"
train.max_iter = 90000
