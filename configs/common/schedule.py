from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L

# Iterations at batch 16: one COCO epoch is 7,500 iterations. The learning rate drops tenfold
# once: after epoch 11 of 12, 20 of 24 and 30 of 36, as the authors' lr_drop does.
lr_multiplier_12ep = L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[82500, 90000])
lr_multiplier_24ep = L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[150000, 180000])
lr_multiplier_36ep = L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[225000, 270000])
