from .dino_r50_4scale_12ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.stages.depth = 101
train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-101.pkl"
train.output_dir = "./output/dino_r101_4scale_12ep"
