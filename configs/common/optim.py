import torch

from detectron2.config import LazyCall as L

from dino_d2.engine import get_optimizer_params

# AdamW, lr 1e-4, backbone lr 1e-5, weight decay 1e-4 on every parameter (the authors' recipe).
# `params.model` is set to the model object by the training script before instantiating.
# fused: one kernel per parameter group, on CPUs and GPUs. PyTorch's default on the CPU is a Python
# loop over the tensors; the fused step measured 4-10x faster for DINO-R50 and the digits model.
AdamW = L(torch.optim.AdamW)(
    params=L(get_optimizer_params)(
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        backbone_lr_factor=0.1,
    ),
    lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
    fused=True,
)
