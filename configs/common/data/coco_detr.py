from omegaconf import OmegaConf

from detectron2.config import LazyCall as L

from dino_d2._compat import build_detection_test_loader, build_detection_train_loader
from dino_d2.data.datasets import get_detection_dataset
from dino_d2.data.mapper import DatasetMapper
from dino_d2.data.transforms import detr_test_augmentation, detr_train_augmentation
from dino_d2.evaluation import COCOEvaluator

dataloader = OmegaConf.create()

# Flip, then either a multi-scale resize (shortest side 480..800, longest 1333) or
# resize -> random crop 384..600 -> multi-scale resize, each with probability 0.5.
# get_detection_dataset: a memory-mapped dataset read by index for datasets registered with the
# cache (dataset.train_json=...), Detectron2's list of dicts for the others.
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset)(names="coco_2017_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=L(detr_train_augmentation)(),
        image_format="RGB",
        use_instance_mask=False,
        # Named in the error about an unreadable image; True skips such images with a warning.
        dataset_name="${..dataset.names}",
        skip_unreadable=False,
    ),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset)(names="coco_2017_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=L(detr_test_augmentation)(),
        image_format="RGB",
        dataset_name="${..dataset.names}",
    ),
    # Images per batch and process (Detectron2 main's argument, also on v0.6 via _compat).
    batch_size=1,
    num_workers=4,
)

# Detectron2's COCOEvaluator whose output files a failed write (full disk) never truncates.
dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}")
