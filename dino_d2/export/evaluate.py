"""COCO evaluation of an exported model, the way Detectron2 evaluates the PyTorch one.

:class:`ExportedDetector` turns the exported graph into a Detectron2 model for
``inference_on_dataset``: it batches the test loader's images, runs the export, turns its
outputs into ``Instances`` and applies ``detector_postprocess`` as DINO does.
"""

from typing import Callable, Dict, List, Sequence

import torch

from detectron2.modeling import detector_postprocess
from detectron2.structures import Boxes, Instances

__all__ = ["ExportedDetector"]


class ExportedDetector:
    """A Detectron2-style model (``list[dict] -> list[{"instances": Instances}]``) around an
    exported DINO.

    Args:
        run: ``(images (N, 3, H, W), image_sizes (N, 2)) -> (boxes, scores, classes)``, e.g.
            :func:`dino_d2.export.exporter.load_exported`.
        dtype: the dtype of the graph's image input.
        min_size: the smallest padded height and width the graph accepts.
    """

    def __init__(self, run: Callable, dtype: torch.dtype, min_size: int = 1):
        self.run = run
        self.dtype = dtype
        self.min_size = min_size

    def __call__(self, batched_inputs: Sequence[Dict]) -> List[Dict[str, Instances]]:
        images = [x["image"] for x in batched_inputs]
        height = max(self.min_size, max(image.shape[-2] for image in images))
        width = max(self.min_size, max(image.shape[-1] for image in images))
        batch = torch.zeros((len(images), 3, height, width), dtype=self.dtype)
        for i, image in enumerate(images):
            batch[i, :, : image.shape[-2], : image.shape[-1]] = image.to(self.dtype)
        sizes = torch.tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.int64)
        # The detections; extra outputs (e.g. mask logits) after them are not evaluated here.
        boxes, scores, classes = (torch.as_tensor(o) for o in self.run(batch, sizes)[:3])
        results = []
        for i, (inputs, size) in enumerate(zip(batched_inputs, sizes.tolist())):
            result = Instances(tuple(size))
            result.pred_boxes = Boxes(boxes[i].float())
            result.scores = scores[i].float()
            result.pred_classes = classes[i].long()
            height_out = inputs.get("height", size[0])
            width_out = inputs.get("width", size[1])
            results.append({"instances": detector_postprocess(result, height_out, width_out)})
        return results
