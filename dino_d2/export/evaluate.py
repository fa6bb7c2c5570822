"""COCO evaluation of an exported model, the way Detectron2 evaluates the PyTorch one.

:class:`ExportedDetector` turns the exported graph into a Detectron2 model for
``inference_on_dataset``: it batches the test loader's images, runs the export, turns its
outputs into ``Instances`` (extra outputs as fields, by name) and hands them to the model's own
post-processing (:meth:`dino_d2.modeling.DINO.postprocess`: ``detector_postprocess``; Mask
DINO's pastes the masks), so the export is evaluated as the PyTorch model is.
"""

from typing import Callable, Dict, List, Optional, Sequence

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
        postprocess: the model's ``postprocess(results, output_sizes)`` (e.g. the bound method
            of the model that was exported); None: Detectron2's ``detector_postprocess``.
        extra_names: the names of the graph's outputs after the detections
            (:meth:`dino_d2.export.graph.InferenceGraph.output_names`), set as fields.
    """

    def __init__(
        self,
        run: Callable,
        dtype: torch.dtype,
        min_size: int = 1,
        postprocess: Optional[Callable] = None,
        extra_names: Sequence[str] = (),
    ):
        self.run = run
        self.dtype = dtype
        self.min_size = min_size
        self.postprocess = postprocess or _detector_postprocess
        self.extra_names = tuple(extra_names)

    def __call__(self, batched_inputs: Sequence[Dict]) -> List[Dict[str, Instances]]:
        images = [x["image"] for x in batched_inputs]
        height = max(self.min_size, max(image.shape[-2] for image in images))
        width = max(self.min_size, max(image.shape[-1] for image in images))
        batch = torch.zeros((len(images), 3, height, width), dtype=self.dtype)
        for i, image in enumerate(images):
            batch[i, :, : image.shape[-2], : image.shape[-1]] = image.to(self.dtype)
        sizes = torch.tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.int64)
        outputs = [torch.as_tensor(o) for o in self.run(batch, sizes)]
        boxes, scores, classes = outputs[:3]
        extras = dict(zip(self.extra_names, outputs[3:]))
        results, output_sizes = [], []
        for i, (inputs, size) in enumerate(zip(batched_inputs, sizes.tolist())):
            result = Instances(tuple(size))
            result.pred_boxes = Boxes(boxes[i].float())
            result.scores = scores[i].float()
            result.pred_classes = classes[i].long()
            for name, value in extras.items():
                result.set(name, value[i].float() if value.is_floating_point() else value[i])
            results.append(result)
            output_sizes.append((inputs.get("height", size[0]), inputs.get("width", size[1])))
        return self.postprocess(results, output_sizes)


def _detector_postprocess(results: List[Instances], output_sizes) -> List[Dict[str, Instances]]:
    return [
        {"instances": detector_postprocess(result, height, width)}
        for result, (height, width) in zip(results, output_sizes)
    ]
