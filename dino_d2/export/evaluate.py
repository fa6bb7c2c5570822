"""COCO evaluation of an exported model, the way Detectron2 evaluates the PyTorch one.

:class:`ExportedDetector` turns the exported graph into a Detectron2 model for
``inference_on_dataset``: it batches the test loader's images, runs the export, turns its
outputs into ``Instances`` (extra outputs as fields, by name) and hands them to the model's own
post-processing (:meth:`dino_d2.modeling.DINO.postprocess`: ``detector_postprocess``; Mask
DINO's pastes the masks), so the export is evaluated as the PyTorch model is. :func:`coco_ap` evaluates any such model on
a config's test set; :func:`pad_batch` is the padded batch the graph takes.
"""

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from detectron2.modeling import detector_postprocess
from detectron2.structures import Boxes, Instances

__all__ = ["ExportedDetector", "coco_ap", "pad_batch"]


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
        batch, sizes = pad_batch([x["image"] for x in batched_inputs], self.dtype, self.min_size)
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


def pad_batch(
    images: Sequence[torch.Tensor], dtype: torch.dtype, min_size: int = 1
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The exported graph's inputs for a list of images.

    Args:
        images: (3, H_i, W_i) tensors, 0-255 values (a test mapper's ``"image"``).
        dtype: the dtype of the graph's image input.
        min_size: the smallest padded height and width the graph accepts.

    Returns:
        ``images (N, 3, H, W)`` of ``dtype``, each image at the top left of its slot and zeros
        elsewhere (H, W: the largest height and width, at least ``min_size``), and
        ``image_sizes (N, 2)`` int64, each image's real (height, width).
    """
    height = max(min_size, max(image.shape[-2] for image in images))
    width = max(min_size, max(image.shape[-1] for image in images))
    batch = torch.zeros((len(images), 3, height, width), dtype=dtype)
    for i, image in enumerate(images):
        batch[i, :, : image.shape[-2], : image.shape[-1]] = image.to(dtype)
    sizes = torch.tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.int64)
    return batch, sizes


def coco_ap(cfg, detector: Callable) -> Dict[str, float]:
    """The COCO AP of ``detector`` on the config's test set, per task the evaluator reports.

    Args:
        cfg: a LazyConfig with ``dataloader.test`` and ``dataloader.evaluator``; its builtin
            test datasets (the digits, ...) are registered first.
        detector: a Detectron2-style model (``list[dict] -> list[{"instances": ...}]``), e.g.
            the PyTorch model or an :class:`ExportedDetector`.

    Returns:
        ``{"bbox": AP, ...}`` (``"segm"`` too for a model with masks), AP in percent.

    Raises:
        ValueError: the config has no ``dataloader.evaluator``.
    """
    from detectron2.config import instantiate
    from detectron2.evaluation import inference_on_dataset
    from omegaconf import OmegaConf

    from dino_d2 import _compat
    from dino_d2.data import register_builtin_datasets

    if "evaluator" not in cfg.dataloader:
        raise ValueError("the config has no dataloader.evaluator: nothing to evaluate with")
    if not _compat.fast_coco_eval_available():
        cfg.dataloader.evaluator.use_fast_impl = False
    names = OmegaConf.select(cfg, "dataloader.test.dataset.names")
    register_builtin_datasets([names] if isinstance(names, str) else list(names))
    evaluation = inference_on_dataset(
        detector, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    return {task: float(metrics["AP"]) for task, metrics in evaluation.items()}


def _detector_postprocess(results: List[Instances], output_sizes) -> List[Dict[str, Instances]]:
    return [
        {"instances": detector_postprocess(result, height, width)}
        for result, (height, width) in zip(results, output_sizes)
    ]
