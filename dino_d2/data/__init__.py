"""Data: DETR-style augmentation, a DatasetMapper with clear errors for unreadable images, the
digits demo dataset, dataset registration (including the builtin datasets registered on demand
by name: the digits, Objects365 v1 and v2), COCO jsons read with errors that name the file,
annotation and field, and their memory-mapped cache for datasets of any size; the datasets a
job names on the command line (``dataset.train_json=...``) and the check of ``num_classes``."""

from .builtin import builtin_dataset_names, register_builtin, register_builtin_datasets
from .cached_dataset import CachedCocoDataset
from .coco_cache import ensure_cache
from .coco_json import CocoFormatError
from .datasets import (
    get_detection_dataset,
    load_cached_coco,
    default_datasets_root,
    load_coco_format_json,
    log_degenerate_boxes,
    register_coco_format_dataset,
    register_digits,
)
from .digits import (
    DIGIT_CLASSES,
    digits_dataset_info,
    ensure_digits_dataset,
    generate_digits_dataset,
)
from .mapper import DatasetMapper, MissingMasksError, UnreadableImageError, read_image
from .objects365 import Objects365LayoutError, register_objects365
from .overrides import (
    CUSTOM_TEST_DATASET,
    CUSTOM_TRAIN_DATASET,
    DATASET_OVERRIDE_KEYS,
    apply_dataset_overrides,
    check_num_classes,
    config_dataset_names,
    pop_dataset_overrides,
    register_config_datasets,
)
from .transforms import RandomChoice, detr_test_augmentation, detr_train_augmentation

__all__ = [
    "DatasetMapper",
    "MissingMasksError",
    "UnreadableImageError",
    "read_image",
    "RandomChoice",
    "detr_train_augmentation",
    "detr_test_augmentation",
    "DIGIT_CLASSES",
    "generate_digits_dataset",
    "ensure_digits_dataset",
    "digits_dataset_info",
    "default_datasets_root",
    "register_digits",
    "register_coco_format_dataset",
    "load_coco_format_json",
    "CocoFormatError",
    "log_degenerate_boxes",
    "load_cached_coco",
    "get_detection_dataset",
    "CachedCocoDataset",
    "ensure_cache",
    "register_builtin",
    "builtin_dataset_names",
    "register_builtin_datasets",
    "register_objects365",
    "Objects365LayoutError",
    "DATASET_OVERRIDE_KEYS",
    "CUSTOM_TRAIN_DATASET",
    "CUSTOM_TEST_DATASET",
    "pop_dataset_overrides",
    "apply_dataset_overrides",
    "config_dataset_names",
    "register_config_datasets",
    "check_num_classes",
]
