from .common.schedule import lr_multiplier_coco_18ep as lr_multiplier
from .dino_swin_large_384_5scale_12ep import dataloader
from .dino_swin_large_384_5scale_objects365v2_26ep import model, optimizer, train

# The Objects365 pre-training fine-tuned on COCO, the authors' recipe (DINO paper, arXiv
# 2203.03605, Appendix D.2 and D.3): 18 epochs on 16 A100 GPUs with one image each (batch 16),
# images 1.5x larger than the COCO recipe's: shorter side 720..1200, longer side at most 2000.
# The paper scales the resize; the crop branch's sizes are scaled by the same 1.5 here.
dataloader.train.mapper.augmentations.update(
    min_sizes=[720, 768, 816, 864, 912, 960, 1008, 1056, 1104, 1152, 1200],
    max_size=2000,
    crop_resize_sizes=[600, 750, 900],
    crop_size=[576, 900],
)
dataloader.test.mapper.augmentations.min_size = 1200
dataloader.test.mapper.augmentations.max_size = 2000

# The class heads start from the Objects365 classes whose names match COCO's
# (dino_d2/data/objects365_coco_map.py); the unmatched COCO class starts fresh.
model.num_classes = 80
train.init_checkpoint = "./output/dino_swin_large_384_5scale_objects365v2_26ep/model_final.pth"
train.init_class_map = "objects365_v2_to_coco"
train.max_iter = 135000
train.eval_period = 5000
train.output_dir = "./output/dino_swin_large_384_5scale_objects365v2_coco_18ep"
