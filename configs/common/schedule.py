from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L

# Iterations at batch 16: one COCO epoch is 7,500 iterations. The learning rate drops tenfold
# once: after epoch 11 of 12, 20 of 24 and 30 of 36, as the authors' lr_drop does.
lr_multiplier_12ep = L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[82500, 90000])
lr_multiplier_24ep = L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[150000, 180000])
lr_multiplier_36ep = L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[225000, 270000])

# The Objects365 recipe (DINO paper, arXiv 2203.03605, Appendix D.2). Pre-training: 26 epochs of
# Objects365 v2 (about 1.74M images) at batch 64, about 27,200 iterations per epoch. Fine-tuning:
# 18 COCO epochs at batch 16. The paper gives no drop epoch for either; the drop follows the
# 12-epoch schedule's proportion (after 11 of 12): after epoch 24 of 26 and 16 of 18.
lr_multiplier_objects365_26ep = L(MultiStepParamScheduler)(
    values=[1.0, 0.1], milestones=[652800, 707200]
)
lr_multiplier_coco_18ep = L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[120000, 135000])
