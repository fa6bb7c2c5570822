from .dino_swin_large_384_4scale_12ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.out_features = ["res2", "res3", "res4", "res5"]
model.transformer.num_levels = 5
train.output_dir = "./output/dino_swin_large_384_5scale_12ep"
