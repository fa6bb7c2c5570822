"""DINO: DETR with Improved DeNoising Anchor Boxes (arXiv 2203.03605), as a Detectron2 meta-arch."""

import logging
from functools import partial
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, detector_postprocess
from detectron2.structures import ImageList, Instances

from dino_d2._compat import image_list_from_tensors
from dino_d2.config import dino_kwargs_from_yacs

from ..transformer import DINOTransformerOutput, HeadOutputs, MultiScaleLevels
from ..transformer.query_selection import SelectedQueries
from .targets import target_fields
from .detections import (
    DINODetections,
    Sizes,
    as_size_tensor,
    gather_queries,
    padding_masks,
    select_top_detections,
)

__all__ = ["DINO"]

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

    Inference has one path, on tensors: :meth:`detect` (normalization, padding, masks,
    backbone, transformer, extra heads, top-k), which ``forward`` calls before Detectron2's
    ``detector_postprocess`` and which the export graph and the verifications call too.
    Padding masks are built from each image's real size in training and in inference. In
    inference, images of different sizes can also go through the backbone one at a time
    (``exact_batched``, by default ``exact_batched_inference``): a convolutional backbone sees
    the zeros of a padded batch at an image's border, so only this makes batched detections
    equal to one-image-at-a-time ones.

    The CPU fast path is not part of the model: apply
    :func:`dino_d2.layers.fast_path.optimize_for_cpu_inference` to a built model.

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
            exact_batched_inference: the default of :meth:`detect`'s ``exact_batched``.
            heads: optional extra heads by name (see the class docstring).
        """
        super().__init__()
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
        self._levels = tuple(shapes)
        self._strides = tuple(shapes[name].stride for name in self._levels)
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

    @property
    def levels(self) -> Tuple[str, ...]:
        """The backbone outputs the transformer reads, finest first."""
        return self._levels

    @property
    def strides(self) -> Tuple[int, ...]:
        """The stride of each of :attr:`levels`."""
        return self._strides

    @property
    def size_divisibility(self) -> int:
        """What the backbone wants the padded height and width to be multiples of."""
        constraints = self.backbone.padding_constraints or {}
        return int(
            constraints.get("size_divisibility")
            or constraints.get("size_divisiblity")
            or self.backbone.size_divisibility
            or 0
        )

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        sizes = as_size_tensor(images.image_sizes, self.device)
        features, masks, inputs = self._extract(images.tensor, sizes, exact_batched=False)
        targets = self.prepare_targets(
            batched_inputs, images.image_sizes, tuple(images.tensor.shape[-2:])
        )
        dn = self.denoising(targets, self.num_queries)
        refine = partial(self.refine_queries, features=inputs)
        if dn is None:
            outputs = self.transformer(features, masks, refine_queries=refine)
        else:
            outputs = self.transformer(
                features,
                masks,
                dn_content=dn.content,
                dn_boxes=dn.boxes,
                attn_mask=dn.attn_mask,
                refine_queries=refine,
            )
        outputs.features = inputs
        self.run_heads(outputs)
        return self.criterion(outputs, targets, dn)

    def inference(self, batched_inputs: List[Dict], do_postprocess: bool = True) -> List:
        """Detections of Detectron2 inputs: :meth:`detect` on the padded batch, then
        :meth:`postprocess` to each input's ``height`` x ``width`` (its image's size when
        absent).

        Returns:
            ``[{"instances": Instances}]``, or with ``do_postprocess=False`` the ``Instances``
            at each image's own size.
        """
        images = self.batch_images(batched_inputs)
        results = self.detect(images.tensor, images.image_sizes).to_instances(images.image_sizes)
        if not do_postprocess:
            return self.postprocess(results, None)
        sizes = [
            (inputs.get("height", size[0]), inputs.get("width", size[1]))
            for inputs, size in zip(batched_inputs, images.image_sizes)
        ]
        return self.postprocess(results, sizes)

    def postprocess(
        self, results: List[Instances], output_sizes: Optional[Sequence[Tuple[int, int]]]
    ) -> List:
        """The detections of :meth:`detect` (as :meth:`DINODetections.to_instances` gives them,
        extra outputs as fields) made into what :meth:`inference` returns: with
        ``output_sizes``, ``[{"instances": ...}]`` rescaled by Detectron2's
        ``detector_postprocess``; with None, the ``Instances`` at each image's own size. An
        exported model's outputs go through the same method (:class:`dino_d2.export.evaluate.
        ExportedDetector`), so a subclass that turns its extra outputs into fields (Mask DINO's
        masks) does it once for both.
        """
        if output_sizes is None:
            return results
        return [
            {"instances": detector_postprocess(result, height, width)}
            for result, (height, width) in zip(results, output_sizes)
        ]

    def detect(
        self,
        images: Tensor,
        image_sizes: Sizes,
        *,
        exact_batched: Optional[bool] = None,
        num_select: Optional[int] = None,
    ) -> DINODetections:
        """DINO's inference on tensors; exportable (with ``exact_batched=False``).

        Args:
            images: (N, 3, H, W) of any dtype, 0-255 values in :attr:`input_format` channel
                order; image i fills the top-left ``image_sizes[i]`` of its slot, and the rest
                (padding, whose values do not matter) need not reach the backbone's
                divisibility.
            image_sizes: (N, 2) int64 tensor (or N pairs) of real (height, width).
            exact_batched: images of different sizes through the backbone one at a time (see
                the class docstring); None uses ``exact_batched_inference``. Not exportable.
            num_select: detections per image; None uses ``num_select``.

        Returns:
            the :class:`DINODetections` of the last decoder layer, extra heads' outputs
            included.
        """
        sizes = as_size_tensor(image_sizes, images.device)
        if exact_batched is None:
            exact_batched = self.exact_batched_inference
        features, masks, inputs = self._extract(self.normalize(images, sizes), sizes, exact_batched)
        refine = partial(self.refine_queries, features=inputs)
        outputs = self.transformer(features, masks, refine_queries=refine)
        outputs.features = inputs
        self.run_heads(outputs)
        # Detections in float32 whatever precision the layers ran in (bfloat16 autocast gives
        # bfloat16 logits): the scores' ranking and the extras' values are not rounded again.
        boxes, scores, classes, queries = select_top_detections(
            outputs.pred_logits[-1].float(),
            outputs.pred_boxes[-1].float(),
            sizes,
            num_select or self.num_select,
        )
        extras = {
            name: gather_queries(v[-1].float() if v.is_floating_point() else v[-1], queries)
            for name, v in outputs.extras.items()
        }
        return DINODetections(boxes, scores, classes, queries, sizes, extras)

    def refine_queries(
        self,
        selected: SelectedQueries,
        memory: Tensor,
        levels: MultiScaleLevels,
        *,
        features: Dict[str, Tensor],
    ) -> SelectedQueries:
        """The selected queries the decoder starts from; DINO keeps them as they are.

        A subclass may change their ``content`` or ``anchors`` before decoding (Mask DINO's
        mask-enhanced anchors); ``features`` is the backbone's other outputs (what
        ``outputs.features`` will hold), where maps it computes may be left for the heads.
        """
        return selected

    def run_heads(self, outputs: DINOTransformerOutput) -> None:
        """Adds every extra head's outputs to ``outputs.extras`` (and, for a head that returns
        :class:`HeadOutputs` with ``proposals``, to ``outputs.enc_extras``)."""
        for name, head in self.heads.items():
            produced = HeadOutputs.of(head(outputs))
            for got, have in (
                (produced.queries, outputs.extras),
                (produced.proposals, outputs.enc_extras),
            ):
                clash = sorted(set(got) & set(have))
                if clash:
                    raise ValueError(f"head '{name}' returns {clash}, which another head returned")
                have.update(got)

    def batch_images(self, batched_inputs: List[Dict]) -> ImageList:
        """The inputs' 0-255 images padded (with zeros) into one batch as the backbone wants."""
        return self._pad([x["image"].to(self.device) for x in batched_inputs])

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalizes the images and pads them into one (N, C, H, W) tensor."""
        images = self.batch_images(batched_inputs)
        sizes = as_size_tensor(images.image_sizes, self.device)
        return ImageList(self.normalize(images.tensor, sizes), images.image_sizes)

    def normalize(self, images: Tensor, image_sizes: Tensor) -> Tensor:
        """(N, C, H, W) 0-255 images to normalized ones, zero on the padding, padded to the
        backbone's divisibility (and square, if it asks for that).

        Args:
            images: (N, C, H, W), image i in the top-left ``image_sizes[i]`` of its slot.
            image_sizes: (N, 2) int64 real (height, width).
        """
        height, width = images.shape[-2:]
        x = (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        rows = torch.arange(height, device=x.device)[None, :] < image_sizes[:, :1]
        cols = torch.arange(width, device=x.device)[None, :] < image_sizes[:, 1:]
        return self._pad_tensor(x * (rows[:, :, None] & cols[:, None, :])[:, None].to(x.dtype))

    def _pad(self, images: List[Tensor]) -> ImageList:
        return image_list_from_tensors(
            images, self.size_divisibility, padding_constraints=self.backbone.padding_constraints
        )

    def _pad_tensor(self, x: Tensor) -> Tensor:
        """Zero padding of a batch at the bottom and right, as :meth:`_pad` pads."""
        height, width = x.shape[-2:]
        square = (self.backbone.padding_constraints or {}).get("square_size", 0)
        d = self.size_divisibility
        if square > 0:
            height = width = max(square, height, width)
        if d > 1:
            height, width = height + (d - height % d) % d, width + (d - width % d) % d
        if not isinstance(height, torch.SymInt) and (height, width) == tuple(x.shape[-2:]):
            return x  # already padded (Detectron2's batching pads to the divisibility)
        return F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]))

    def extract_features(
        self, images: Tensor, image_sizes: Tensor, exact_batched: bool
    ) -> Tuple[List[Tensor], List[Tensor]]:
        """Runs the backbone and builds one padding mask per level.

        Args:
            images: (N, C, H, W) normalized images, padded as :meth:`normalize` pads.
            image_sizes: (N, 2) int64 real (height, width).
            exact_batched: images of different sizes through the backbone one at a time.

        Returns:
            features: list over levels, finest first, of (N, C, H_l, W_l).
            masks: list over levels of (N, H_l, W_l) bool, True on padding. Image i's valid
                region at stride s is its top-left ceil(h_i / s) x ceil(w_i / s) cells.
        """
        features, masks, _ = self._extract(images, image_sizes, exact_batched)
        return features, masks

    def _extract(
        self, images: Tensor, image_sizes: Tensor, exact_batched: bool
    ) -> Tuple[List[Tensor], List[Tensor], Dict[str, Tensor]]:
        """:meth:`extract_features`, and the backbone's other outputs by name (a neck's inputs,
        e.g. ``res2``: what ``outputs.features`` holds for the heads)."""
        many = exact_batched and images.shape[0] > 1
        sizes = [tuple(size) for size in image_sizes.tolist()] if many else []
        if len(set(sizes)) > 1:
            out = self._features_one_by_one(images, sizes)
        else:
            out = self.backbone(images)
        features = [out[name] for name in self._levels]
        inputs = {name: value for name, value in out.items() if name not in self._levels}
        return features, padding_masks(features, self._strides, image_sizes), inputs

    def _features_one_by_one(
        self, images: Tensor, sizes: List[Tuple[int, int]]
    ) -> Dict[str, Tensor]:
        per_image = []
        for i, (h, w) in enumerate(sizes):
            # Padded exactly as when the image is the only one in its batch.
            per_image.append(self.backbone(self._pad_tensor(images[i : i + 1, :, :h, :w])))
        features = {}
        for name in per_image[0]:
            maps = [out[name] for out in per_image]
            height = max(m.shape[-2] for m in maps)
            width = max(m.shape[-1] for m in maps)
            features[name] = torch.cat(
                [F.pad(m, (0, width - m.shape[-1], 0, height - m.shape[-2])) for m in maps]
            )
        return features

    def prepare_targets(
        self,
        batched_inputs: List[Dict],
        image_sizes: List[Tuple[int, int]],
        padded_size: Optional[Tuple[int, int]] = None,
    ) -> List[Dict[str, torch.Tensor]]:
        """Ground truth as the criterion wants it: labels (G,) and normalized cxcywh boxes (G, 4),
        and every other field of the ``Instances`` under its own name, as a tensor with the same
        boxes kept (see :func:`target_fields`: e.g. ``gt_masks`` as (G, H_pad, W_pad) uint8,
        each image's mask in the top-left of the ``padded_size`` batch frame, the maximum of
        ``image_sizes`` when None).

        Boxes (absolute XYXY) are clipped to the image; boxes that are then empty (zero or
        negative width or height, or wholly outside the image) or not finite (NaN) are dropped,
        so that no bad annotation reaches the losses. Detectron2's ``DatasetMapper`` already
        does this (``filter_empty_instances``); this guards other mappers. The first drop is
        logged as a warning; :attr:`num_dropped_boxes` counts them all.
        """
        if padded_size is None:
            padded_size = tuple(max(size[i] for size in image_sizes) for i in (0, 1))
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
            fields = target_fields(instances, keep if dropped else None, padded_size)
            targets.append({**fields, "labels": labels, "boxes": boxes})
        return targets

    def _note_dropped_boxes(self, dropped: int, inputs: Dict) -> None:
        if self.num_dropped_boxes == 0:
            logger.warning(
                f"Dropped {dropped} empty or non-finite ground-truth box(es) of "
                f"{inputs.get('file_name', 'an image')} (after clipping to the image); "
                "further drops are only counted (DINO.num_dropped_boxes)"
            )
        self.num_dropped_boxes += dropped


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
