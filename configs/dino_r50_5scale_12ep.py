from .dino_r50_4scale_12ep import dataloader, lr_multiplier, model, optimizer, train

# Five levels: res2 (stride 4) joins res3..res5 and the extra stride-64 level.
model.backbone.bottom_up.out_features = ["res2", "res3", "res4", "res5"]
model.transformer.num_levels = 5
train.output_dir = "./output/dino_r50_5scale_12ep"
