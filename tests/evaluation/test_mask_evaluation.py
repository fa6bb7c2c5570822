"""COCOEvaluator with ``segm`` and ``bbox`` on the digits' masks: a model predicting the ground
truth scores 100 on both, and the mask AP is measured on the masks, not on the boxes."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import inference_on_dataset
from detectron2.structures import Boxes, BoxMode, Instances

from dino_d2._compat import build_detection_test_loader, fast_coco_eval_available
from dino_d2.data import DatasetMapper, detr_test_augmentation, register_digits
from dino_d2.data.digits import generate_digits_dataset
from dino_d2.evaluation import COCOEvaluator

NAMES = ("test_masks_digits_train", "test_masks_digits_val")


@pytest.fixture(scope="module")
def digits_val(tmp_path_factory):
    root = generate_digits_dataset(
        tmp_path_factory.mktemp("digits") / "digits", num_train=1, num_val=6, log_every=0
    )
    register_digits(root, names=NAMES)
    yield NAMES[1]
    for name in NAMES:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


class _GroundTruthModel(torch.nn.Module):
    """Predicts each image's ground truth at the image's original size, as a Detectron2 model's
    postprocessing does; ``box_masks=True`` predicts the filled boxes as masks instead."""

    def __init__(self, dataset_name: str, box_masks: bool = False):
        super().__init__()
        self.records = {r["image_id"]: r for r in DatasetCatalog.get(dataset_name)}
        self.box_masks = box_masks

    def forward(self, batched_inputs):
        outputs = []
        for item in batched_inputs:
            record = self.records[item["image_id"]]
            height, width = record["height"], record["width"]
            annotations = record["annotations"]
            boxes = torch.tensor(
                [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations]
            )
            masks = torch.from_numpy(
                np.stack([mask_util.decode(a["segmentation"]) for a in annotations])
            ).bool()
            if self.box_masks:
                masks = torch.zeros_like(masks)
                for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
                    mask[y0:y1, x0:x1] = True
            instances = Instances((height, width))
            instances.pred_boxes = Boxes(boxes.float())
            instances.scores = torch.linspace(1.0, 0.5, len(annotations))
            instances.pred_classes = torch.tensor([a["category_id"] for a in annotations])
            instances.pred_masks = masks
            outputs.append({"instances": instances})
        return outputs


def _evaluate(dataset_name, output_dir, **model_options):
    loader = build_detection_test_loader(
        dataset=DatasetCatalog.get(dataset_name),
        mapper=DatasetMapper(
            is_train=False,
            augmentations=detr_test_augmentation(min_size=192, max_size=320),
            image_format="RGB",
        ),
        num_workers=0,
    )
    evaluator = COCOEvaluator(
        dataset_name,
        tasks=("bbox", "segm"),
        output_dir=str(output_dir),
        use_fast_impl=fast_coco_eval_available(),
    )
    return inference_on_dataset(_GroundTruthModel(dataset_name, **model_options), loader, evaluator)


def test_perfect_masks_score_100_on_segm_and_bbox(digits_val, tmp_path):
    results = _evaluate(digits_val, tmp_path)
    assert results["segm"]["AP"] == pytest.approx(100.0)
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert (tmp_path / "coco_instances_results.json").is_file()


def test_segm_is_measured_on_the_masks(digits_val, tmp_path):
    results = _evaluate(digits_val, tmp_path, box_masks=True)
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP"] < 60.0
