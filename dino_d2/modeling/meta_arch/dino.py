"""DINO: DETR with Improved DeNoising Anchor Boxes (arXiv 2203.03605), as a Detectron2 meta-arch."""

import logging
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances

from dino_d2._compat import image_list_from_tensors
from dino_d2.config import dino_kwargs_from_yacs
from dino_d2.layers.frozen_bn import fold_frozen_batchnorm

from ..transformer import DINOTransformerOutput

__all__ = ["DINO", "padding_masks", "select_top_detections"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class DINO(nn.Module):
    """The DINO detector.

    Input, as every Detectron2 model: a list of dicts with ``image`` (C, H, W) in the
    ``input_format`` channel order and 0-255 range, optionally ``height``/``width`` (the size to
    report detections at) and, in training, ``instances`` with ``gt_boxes`` (absolute XYXY in the
    image's pixels) and ``gt_classes``. Training returns a dict of weighted losses; inference a
    list of ``{"instances": Instances}`` with ``pred_boxes`` (absolute XYXY), ``scores`` and
    ``pred_classes``.

    Padding masks are built from each image's real size in training and in inference. In
    inference, images of different sizes also go through the backbone one at a time
    (``exact_batched_inference``): a convolutional backbone sees the zeros of a padded batch at
    an image's border, so only this makes batched detections equal to one-image-at-a-time ones.

    Extra heads (``heads``) extend the detector without editing it: each is called with the
    :class:`DINOTransformerOutput` and returns named per-query tensors of shape
    (L_dec, N, Q_dn + Q, ...), stored in ``outputs.extras`` where loss terms read them
    (:meth:`QuerySet.extra`); in inference the last layer's values of the selected queries become
    fields of the ``Instances`` under the same names.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        transformer: nn.Module,
        denoising: nn.Module,
        criterion: nn.Module,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str = "RGB",
        num_select: int = 300,
        exact_batched_inference: bool = True,
        heads: Optional[Mapping[str, nn.Module]] = None,
        fuse_frozen_batchnorm: bool = True,
        channels_last: bool = True,
    ):
        """
        Args:
            backbone: a multi-level backbone whose outputs are the transformer's levels, finest
                first, all with the transformer's width (e.g. a :class:`ChannelMapper`).
            transformer: a :class:`DINOTransformer`.
            denoising: a :class:`ContrastiveDenoising` that makes the training-time DN queries.
            criterion: a :class:`DINOCriterion`.
            num_classes: number of object classes; every head must agree (checked here).
            pixel_mean, pixel_std: per-channel normalization, in ``input_format`` order.
            input_format: channel order of the input images, "RGB" or "BGR".
            num_select: detections kept per image (top-k over queries x classes).
            exact_batched_inference: see the class docstring.
            heads: optional extra heads by name (see the class docstring).
            fuse_frozen_batchnorm: run the backbone's convolutions that are followed by a
                ``FrozenBatchNorm2d`` as one convolution (:mod:`dino_d2.layers.frozen_bn`):
                the same results without a pass over the activations; parameters and
                checkpoints are unchanged.
            channels_last: keep the backbone's weights and run its input in the channels-last
                memory format, in which oneDNN's convolutions need no layout conversions
                (same results; about a quarter faster for a ResNet-50 on a CPU).
        """
        super().__init__()
        if fuse_frozen_batchnorm:
            fold_frozen_batchnorm(backbone)
        self.channels_last = channels_last
        if channels_last:
            backbone.to(memory_format=torch.channels_last)
        self.backbone = backbone
        self.transformer = transformer
        self.denoising = denoising
        self.criterion = criterion
        self.num_classes = num_classes
        self.input_format = input_format
        self.num_select = num_select
        self.exact_batched_inference = exact_batched_inference
        heads = dict(heads or {})
        for name, head in heads.items():
            if not isinstance(head, nn.Module):
                raise TypeError(
                    f"heads['{name}'] is a {type(head).__name__}, not a module; in a LazyConfig "
                    f"write model.heads = L(OrderedDict)({name}=L(MyHead)(...)) (Detectron2's "
                    "instantiate only builds what has a _target_)"
                )
        self.heads = nn.ModuleDict(heads)
        self.num_dropped_boxes = 0
        shapes = backbone.output_shape()
        self._levels = list(shapes)
        self._strides = [shapes[name].stride for name in self._levels]
        _check_parts(self)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        return dino_kwargs_from_yacs(cfg)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def num_queries(self) -> int:
        return self.transformer.num_queries

    def forward(self, batched_inputs: List[Dict]):
        images = self.preprocess_image(batched_inputs)
        features, masks = self.extract_features(images)
        if self.training:
            targets = self.prepare_targets(batched_inputs, images.image_sizes)
            dn = self.denoising(targets, self.num_queries)
            if dn is None:
                outputs = self.transformer(features, masks)
            else:
                outputs = self.transformer(
                    features,
                    masks,
                    dn_content=dn.content,
                    dn_boxes=dn.boxes,
                    attn_mask=dn.attn_mask,
                )
            self.run_heads(outputs)
            losses = self.criterion(outputs, targets, dn)
            if dn is None:
                # Keep the label embedding in the graph (as the authors do) so that distributed
                # training does not see an unused parameter when a batch has no objects.
                losses["loss_class_dn"] = (
                    losses["loss_class_dn"] + 0.0 * self.denoising.label_enc.weight.sum()
                )
            return losses

        outputs = self.transformer(features, masks)
        self.run_heads(outputs)
        results = self.inference(outputs, images.image_sizes)
        processed = []
        for result, inputs, image_size in zip(results, batched_inputs, images.image_sizes):
            height = inputs.get("height", image_size[0])
            width = inputs.get("width", image_size[1])
            processed.append({"instances": detector_postprocess(result, height, width)})
        return processed

    def run_heads(self, outputs: DINOTransformerOutput) -> None:
        """Adds every extra head's outputs to ``outputs.extras``."""
        for name, head in self.heads.items():
            produced = head(outputs)
            clash = sorted(set(produced) & set(outputs.extras))
            if clash:
                raise ValueError(f"head '{name}' returns {clash}, which another head returned")
            outputs.extras.update(produced)

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalizes the images and pads them into one (N, C, H, W) tensor."""
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        return self._pad(images)

    def _pad(self, images: List[torch.Tensor]) -> ImageList:
        return image_list_from_tensors(
            images,
            self.backbone.size_divisibility,
            padding_constraints=self.backbone.padding_constraints,
        )

    def run_backbone(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The backbone's outputs for a padded (N, C, H, W) batch of normalized images."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(images)

    def extract_features(self, images: ImageList) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Runs the backbone and builds one padding mask per level.

        Returns:
            features: list over levels, finest first, of (N, C, H_l, W_l).
            masks: list over levels of (N, H_l, W_l) bool, True on padding. Image i's valid
                region at stride s is its top-left ceil(h_i / s) x ceil(w_i / s) cells.
        """
        sizes = images.image_sizes
        if self.training or not self.exact_batched_inference or len(set(sizes)) == 1:
            features = self.run_backbone(images.tensor)
            features = [features[name] for name in self._levels]
        else:
            features = self._features_one_by_one(images)
        image_sizes = _as_size_tensor(sizes, features[0].device)
        return features, padding_masks(features, self._strides, image_sizes)

    def _features_one_by_one(self, images: ImageList) -> List[torch.Tensor]:
        per_image = []
        for i, (h, w) in enumerate(images.image_sizes):
            # Padded exactly as when the image is the only one in its batch.
            single = self._pad([images.tensor[i, :, :h, :w]])
            out = self.run_backbone(single.tensor)
            per_image.append([out[name] for name in self._levels])
        features = []
        for level in range(len(self._levels)):
            maps = [f[level] for f in per_image]
            height = max(m.shape[-2] for m in maps)
            width = max(m.shape[-1] for m in maps)
            features.append(
                torch.cat(
                    [F.pad(m, (0, width - m.shape[-1], 0, height - m.shape[-2])) for m in maps]
                )
            )
        return features

    def prepare_targets(
        self, batched_inputs: List[Dict], image_sizes: List[Tuple[int, int]]
    ) -> List[Dict[str, torch.Tensor]]:
        """Ground truth as the criterion wants it: labels (G,) and normalized cxcywh boxes (G, 4).

        Boxes (absolute XYXY) are clipped to the image; boxes that are then empty (zero or
        negative width or height, or wholly outside the image) or not finite (NaN) are dropped,
        so that no bad annotation reaches the losses. Detectron2's ``DatasetMapper`` already
        does this (``filter_empty_instances``); this guards other mappers. The first drop is
        logged as a warning; :attr:`num_dropped_boxes` counts them all.
        """
        targets = []
        for inputs, (h, w) in zip(batched_inputs, image_sizes):
            instances = inputs["instances"].to(self.device)
            boxes = instances.gt_boxes.tensor.float()
            limits = torch.tensor([w, h, w, h], dtype=boxes.dtype, device=self.device)
            boxes = torch.minimum(boxes.clamp(min=0), limits)
            keep = (
                torch.isfinite(boxes).all(dim=1)
                & (boxes[:, 2] > boxes[:, 0])
                & (boxes[:, 3] > boxes[:, 1])
            )
            dropped = int((~keep).sum())
            if dropped:
                self._note_dropped_boxes(dropped, inputs)
                boxes, labels = boxes[keep], instances.gt_classes[keep]
            else:
                labels = instances.gt_classes
            boxes = box_convert(boxes / limits, "xyxy", "cxcywh")
            targets.append({"labels": labels, "boxes": boxes})
        return targets

    def _note_dropped_boxes(self, dropped: int, inputs: Dict) -> None:
        if self.num_dropped_boxes == 0:
            logger.warning(
                f"Dropped {dropped} empty or non-finite ground-truth box(es) of "
                f"{inputs.get('file_name', 'an image')} (after clipping to the image); "
                "further drops are only counted (DINO.num_dropped_boxes)"
            )
        self.num_dropped_boxes += dropped

    def inference(
        self,
        outputs: DINOTransformerOutput,
        image_sizes: List[Tuple[int, int]],
        num_select: Optional[int] = None,
    ) -> List[Instances]:
        """Top-k over queries x classes of the last decoder layer's sigmoid scores; no NMS.

        Args:
            outputs: the transformer's output (no denoising queries).
            image_sizes: (h, w) of each image before padding.
            num_select: detections per image; None uses ``self.num_select``.

        Returns:
            one Instances per image, boxes in absolute XYXY of that (h, w), plus one field per
            extra head output (its last layer, at the selected queries).
        """
        sizes = _as_size_tensor(image_sizes, outputs.pred_boxes.device)
        boxes, scores, classes, queries = select_top_detections(
            outputs.pred_logits[-1], outputs.pred_boxes[-1], sizes, num_select or self.num_select
        )
        results = []
        for i, (h, w) in enumerate(image_sizes):
            result = Instances((h, w))
            result.pred_boxes = Boxes(boxes[i])
            result.scores = scores[i]
            result.pred_classes = classes[i]
            for name, value in outputs.extras.items():
                result.set(name, value[-1, i, queries[i]])
            results.append(result)
        return results


def _as_size_tensor(sizes: Sequence[Tuple[int, int]], device: torch.device) -> Tensor:
    """(N, 2) int64 ``(h, w)``; the sizes are ints, or 0-d tensors when the model is traced."""
    if sizes and isinstance(sizes[0][0], Tensor):
        return torch.stack([torch.stack(list(size)) for size in sizes]).to(device, torch.long)
    return torch.as_tensor(sizes, dtype=torch.long, device=device)


def padding_masks(
    features: Sequence[Tensor], strides: Sequence[int], image_sizes: Tensor
) -> List[Tensor]:
    """One padding mask per level, from each image's real size.

    Image i's valid region at stride s is its top-left ``ceil(h_i / s) x ceil(w_i / s)`` cells.

    Args:
        features: the levels, each (N, C, H_l, W_l).
        strides: the stride of each level.
        image_sizes: (N, 2) int64 ``(h, w)`` of each image before padding.

    Returns:
        list of (N, H_l, W_l) bool, True on padding.
    """
    masks = []
    for feature, stride in zip(features, strides):
        height, width = feature.shape[-2:]
        valid = torch.div(image_sizes + (stride - 1), stride, rounding_mode="floor")
        rows = torch.arange(height, device=feature.device)[None, :] >= valid[:, :1]
        cols = torch.arange(width, device=feature.device)[None, :] >= valid[:, 1:]
        masks.append(rows[:, :, None] | cols[:, None, :])
    return masks


def select_top_detections(
    logits: Tensor, boxes: Tensor, image_sizes: Tensor, num_select: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """DINO's detections: top-k over queries x classes of the sigmoid scores, no NMS.

    Args:
        logits: (N, Q, K) class logits of the last decoder layer.
        boxes: (N, Q, 4) normalized cxcywh boxes.
        image_sizes: (N, 2) int64 ``(h, w)`` each image's boxes are scaled to.
        num_select: k; fewer when ``Q * K`` is smaller.

    Returns:
        ``(boxes, scores, classes, queries)``: (N, k, 4) absolute XYXY, (N, k) scores in
        descending order, (N, k) int64 classes and (N, k) int64 query of each detection.
    """
    num_classes = logits.shape[-1]
    k = min(num_select, logits.shape[1] * num_classes)
    scores, index = logits.sigmoid().flatten(1).topk(k, dim=1)
    classes = index % num_classes
    queries = torch.div(index, num_classes, rounding_mode="floor")
    selected = torch.gather(boxes, 1, queries[..., None].expand(-1, -1, 4))
    scale = image_sizes.flip(-1).repeat(1, 2).to(boxes.dtype)[:, None]
    return box_convert(selected, "cxcywh", "xyxy") * scale, scores, classes, queries


def _check_parts(model: DINO) -> None:
    """Raises a ValueError naming the setting when the parts of a DINO do not fit together.

    Each part is asked through what it declares: the backbone's ``output_shape()``, the
    transformer's ``num_levels``, ``embed_dim`` and ``num_classes`` and the ``num_classes`` of the
    denoising part and the criterion.
    """
    transformer = model.transformer
    levels, shapes = model._levels, model.backbone.output_shape()
    problems = []
    if len(levels) != transformer.num_levels:
        problems.append(
            f"the backbone gives {len(levels)} levels {levels} but transformer.num_levels is "
            f"{transformer.num_levels}"
        )
    widths = {shapes[name].channels for name in levels}
    if widths != {transformer.embed_dim}:
        problems.append(
            f"the backbone's levels have {sorted(widths)} channels but transformer.embed_dim is "
            f"{transformer.embed_dim}"
        )
    parts = {
        "transformer": transformer.num_classes,
        "denoising": model.denoising.num_classes,
        "criterion": model.criterion.num_classes,
    }
    wrong = {k: v for k, v in parts.items() if v != model.num_classes}
    if wrong:
        problems.append(f"num_classes is {model.num_classes} but {wrong} disagree")
    if problems:
        raise ValueError("DINO: " + "; ".join(problems))
