from omegaconf import OmegaConf

from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.evaluation import COCOEvaluator

from dino_d2.data.transforms import detr_test_augmentation, detr_train_augmentation

dataloader = OmegaConf.create()

# Flip, then either a multi-scale resize (shortest side 480..800, longest 1333) or
# resize -> random crop 384..600 -> multi-scale resize, each with probability 0.5.
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=L(detr_train_augmentation)(),
        image_format="RGB",
        use_instance_mask=False,
    ),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=L(detr_test_augmentation)(),
        image_format="RGB",
    ),
    num_workers=4,
)

dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}")
