from .common.schedule import lr_multiplier_36ep as lr_multiplier
from .dino_r50_4scale_12ep import dataloader, model, optimizer, train

train.max_iter = 270000
train.output_dir = "./output/dino_r50_4scale_36ep"
