from .common.schedule import lr_multiplier_objects365_26ep as lr_multiplier
from .dino_swin_large_384_5scale_12ep import dataloader, model, optimizer, train

# DINO Swin-L 5-scale pre-trained on Objects365 v2, the authors' recipe (DINO paper, arXiv
# 2203.03605, Appendix D.2): 26 epochs on 64 A100 GPUs with one image each (batch 64), the
# default COCO augmentation, checkpointed Swin blocks, mixed precision and 1000 denoising queries
# (the paper's "1000 DN queries", read as the dn_number that is 100 in the COCO recipe); lr,
# weight decay and clipping as on COCO (Table 8). The paper also moves all but the first 5,000
# val images into training and validates on those 5,000; this config trains on the train split
# and evaluates on the whole val split.
dataloader.train.dataset.names = "objects365_v2_train"
dataloader.test.dataset.names = "objects365_v2_val"
dataloader.train.total_batch_size = 64
# mmdetection lists three images of the v2 train json that the published patches lack.
dataloader.train.mapper.skip_unreadable = True
model.num_classes = 365
model.denoising.dn_number = 1000
train.amp.enabled = True
train.max_iter = 707200
# Every two epochs: one evaluation reads 80,000 images.
train.eval_period = 54400
train.output_dir = "./output/dino_swin_large_384_5scale_objects365v2_26ep"
