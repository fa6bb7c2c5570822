"""The layout of the authors' Mask DINO checkpoints (IDEA-Research/MaskDINO, a Detectron2 project).

A released file is Detectron2's ``{"model": state_dict, ...}``; the model is Detectron2's ResNet
(or the authors' Swin) under ``backbone.``, the pixel decoder under
``sem_seg_head.pixel_decoder.`` and the decoder under ``sem_seg_head.predictor.``. dino_d2 name
(the Mask DINO project of ``dino_d2.projects.mask_dino``) <- authors' name, with
``P = sem_seg_head.pixel_decoder.`` and ``Q = sem_seg_head.predictor.``:

* ``backbone.bottom_up.*`` <- ``backbone.*`` (Detectron2 naming; Swin as the authors' DINO);
* ``backbone.convs.{i}.{0,1}`` <- ``P input_proj.{i}.{0,1}`` and ``backbone.extra_convs.{j}`` <-
  ``P input_proj.{B+j}`` (B backbone levels), levels from fine to coarse, as the released
  ``FEATURE_ORDER: low2high`` configs keep them;
* ``transformer.level_embed`` <- ``P transformer.level_embed``; encoder layer ``self_attn``,
  ``self_attn_norm``, ``ffn.linear{1,2}``, ``ffn.norm`` <- ``P transformer.encoder.layers.{i}``
  ``self_attn``, ``norm1``, ``linear{1,2}``, ``norm2``;
* decoder layers <- ``Q decoder.layers.{i}`` with the authors' DINO names (``norm2`` after
  self-attention, ``norm1`` after cross-attention, ``norm3`` after the FFN); the authors'
  decoder flattens the levels coarse first (``MaskDINODecoder.forward``), so the level axis of
  its cross-attention's ``sampling_offsets`` and ``attention_weights`` rows (heads, levels,
  points) is reversed;
* ``transformer.decoder.norm`` and the mask head's ``heads.masks.norm`` <- ``Q decoder_norm``
  (also saved as ``Q decoder.norm``), ``transformer.decoder.ref_point_head`` <-
  ``Q decoder.ref_point_head``;
* every decoder layer's ``class_embed`` and the proposals' ``query_selection.class_embed`` <-
  the one ``Q class_embed``; every ``bbox_embed`` and ``query_selection.bbox_embed`` <-
  ``Q _bbox_embed`` (also saved as ``Q bbox_embed.{i}`` and ``Q decoder.bbox_embed.{i}``);
* ``transformer.query_selection.{enc_output,enc_output_norm}`` <- ``Q enc_output{,_norm}``,
  ``transformer.query_selection.tgt_embed`` <- ``Q query_feat`` and
  ``denoising.label_enc`` <- ``Q label_enc`` (one row a class, no spare row);
* ``heads.masks.pixel_decoder.{lateral,output,mask_features}`` <- ``P adapter_1``,
  ``P layer_1``, ``P mask_features``; ``heads.masks.mask_embed`` <- ``Q mask_embed``.

What the weights cannot tell is taken from the released instance-segmentation configs, with a
note: a checkpoint without ``Q query_feat`` (``LEARN_TGT: False``, the released default) takes
its content queries from the selected proposals (``model.content_from_proposals=True``; the
query selection's then unused ``tgt_embed`` is filled with zeros) and has 300 queries; one with
it learns them (``content_from_proposals=False``, ``tgt_embed`` <- ``Q query_feat``). The class
head reads the states normed again (``class_on_normed_states=True``), and the anchors are the
config's mask-enhanced ones (the 46.3 / 52.3 AP releases: ``mask2box``).

Refused, with the reason: a ``FEATURE_ORDER: high2low`` checkpoint (coarse level first), whose
level order dino_d2's neck does not have.
"""

from typing import List

import torch

from .architecture import DetectorShape, match_feature_names
from .layout import (
    DetectorLayout,
    level_projections,
    require_key,
    rows_rule,
    transformer_sizes,
)
from .mapping import ConversionError, Rule
from .resnet import RESNET_STAGE_CHANNELS

__all__ = ["MaskDINOLayout", "PIXEL_DECODER", "PREDICTOR"]

PIXEL_DECODER = "sem_seg_head.pixel_decoder."
PREDICTOR = "sem_seg_head.predictor."
# NUM_OBJECT_QUERIES of the released configs, for a checkpoint that does not store it.
_RELEASED_QUERIES = torch.empty(300, 0)


def _reverse_levels(num_heads: int, num_levels: int):
    """A transform reversing the level axis of a deformable attention's ``sampling_offsets`` or
    ``attention_weights`` rows, laid out (heads, levels, points[, 2])."""

    def reverse(tensor: torch.Tensor) -> torch.Tensor:
        grouped = tensor.reshape(num_heads, num_levels, -1, *tensor.shape[1:])
        return grouped.flip(1).reshape(tensor.shape)

    return reverse


def _zero_content(num_queries: int):
    """A transform giving the unused ``tgt_embed`` (num_queries, C) zeros from a (C, C) weight."""

    def zeros(weight: torch.Tensor) -> torch.Tensor:
        return weight.new_zeros((num_queries, weight.shape[1]))

    return zeros


class MaskDINOLayout(DetectorLayout):
    """The authors' Mask DINO (Detectron2 ResNet or Swin, ``sem_seg_head``)."""

    name = "maskdino"
    container = "model"
    top_level = ("model", "iteration")
    marker = PIXEL_DECODER + "input_proj.0.0.weight"
    resnet_prefix = swin_prefix = "backbone."
    resnet_naming = "detectron2"
    resnet_freeze_at = 0
    ignored_prefixes = ("criterion.",)

    def inspect(self, state_dict, args, num_classes):
        arch = super().inspect(state_dict, args, num_classes)
        arch.family = "maskdino"
        learned = PREDICTOR + "query_feat.weight" in state_dict
        if not learned:
            arch.notes.append(
                "content queries from the selected proposals (LEARN_TGT False: no query_feat), "
                f"{arch.detector.num_queries} queries as released; the unused tgt_embed is zeros"
            )
        arch.notes.append("anchors: the config's mask-enhanced initialisation (not stored)")
        adapter = require_key(state_dict, PIXEL_DECODER + "adapter_1.weight", self.name)
        if arch.backbone == "resnet":
            channels = list(RESNET_STAGE_CHANNELS)
        else:
            width = arch.backbone_values["embed_dim"]
            channels = [width * 2**i for i in range(len(arch.backbone_values["depths"]))]
        (fused,) = match_feature_names([int(adapter.shape[1])], channels, "the mask adapter")
        levels = arch.backbone_values["out_features"]
        arch.backbone_values["out_features"] = sorted({fused, *levels})
        mask_features = require_key(state_dict, PIXEL_DECODER + "mask_features.weight", self.name)
        arch.values.update(
            {
                "backbone.in_features": levels,
                "heads.masks.pixel_decoder.in_channels": int(adapter.shape[1]),
                "heads.masks.pixel_decoder.feature": fused,
                "heads.masks.pixel_decoder.mask_dim": int(mask_features.shape[0]),
                "content_from_proposals": not learned,
                "class_on_normed_states": True,
            }
        )
        return arch

    def _shape(self, sd):
        layout, p, q = self.name, PIXEL_DECODER, PREDICTOR
        widths, num_levels, embed_dim = level_projections(sd, p, layout)
        if widths != sorted(widths):
            raise ConversionError(
                f"the pixel decoder's level projections take {widths} channels, coarse level "
                "first (FEATURE_ORDER: high2low); dino_d2's levels go from fine to coarse "
                "(the released low2high checkpoints), so this one cannot be expressed"
            )
        return DetectorShape(
            level_widths=widths,
            num_levels=num_levels,
            embed_dim=embed_dim,
            num_queries=int(sd.get(q + "query_feat.weight", _RELEASED_QUERIES).shape[0]),
            class_rows=int(require_key(sd, q + "class_embed.weight", layout).shape[0]),
            label_rows=int(require_key(sd, q + "label_enc.weight", layout).shape[0]),
            share_heads=True,
            **transformer_sizes(
                sd, p + "transformer.encoder.layers.", q + "decoder.layers.", layout
            ),
        )

    def _read_args(self, args, arch):
        # The pixel decoder's PositionEmbeddingSine(normalize=True): temperature 10000, no offset.
        arch.values["transformer.position_embedding.temperature"] = 10000
        arch.values["transformer.position_embedding.offset"] = 0.0
        # NHEADS of the pixel decoder's encoder and of the decoder in every released config.
        arch.num_heads = (8, 8)
        arch.notes.append(
            "Mask DINO defaults assumed (a Detectron2 checkpoint stores no config): position "
            "embedding temperature 10000 / offset 0, ResNet freeze_at=0, 8 attention heads, the "
            "config's denoising and test-time settings"
        )

    def _content_rule(self, arch) -> Rule:
        target = "transformer.query_selection.tgt_embed.weight"
        if not arch.values["content_from_proposals"]:
            return Rule(target, PREDICTOR + "query_feat.weight")
        queries = arch.detector.num_queries
        return Rule(
            target,
            PREDICTOR + "enc_output.weight",
            _zero_content(queries),
            note=f"unused with content_from_proposals: ({queries}, C) zeros",
        )

    def _head_rules(self, arch) -> List[Rule]:
        p, q = PIXEL_DECODER, PREDICTOR
        rows = arch.class_rows
        backbone_levels = len(arch.detector.level_widths)
        enc, dec = "transformer.encoder.layers.{i}", "transformer.decoder.layers.{i}"
        penc, qdec = p + enc, q + "decoder.layers.{i}"
        box = q + "_bbox_embed.layers.{k}.{p}"
        # The authors' decoder reads the levels coarse first (MaskDINODecoder.forward flattens
        # them in reverse), the encoder and dino_d2 fine first.
        reverse = _reverse_levels(arch.num_heads[1], arch.detector.num_levels)
        rules = [
            Rule("backbone.convs.{i}.{m}.{p}", p + "input_proj.{i}.{m}.{p}"),
            Rule("transformer.level_embed", p + "transformer.level_embed"),
            Rule(f"{enc}.self_attn.{{m}}.{{p}}", penc + ".self_attn.{m}.{p}"),
            Rule(f"{enc}.self_attn_norm.{{p}}", penc + ".norm1.{p}"),
            Rule(f"{enc}.ffn.linear{{k}}.{{p}}", penc + ".linear{k}.{p}"),
            Rule(f"{enc}.ffn.norm.{{p}}", penc + ".norm2.{p}"),
            Rule(f"{dec}.self_attn.out_proj.{{p}}", qdec + ".self_attn.out_proj.{p}"),
            Rule(f"{dec}.self_attn.{{p}}", qdec + ".self_attn.{p}"),
            Rule(f"{dec}.self_attn_norm.{{p}}", qdec + ".norm2.{p}"),
            Rule(
                f"{dec}.cross_attn.sampling_offsets.{{p}}",
                qdec + ".cross_attn.sampling_offsets.{p}",
                reverse,
                note="levels reversed",
            ),
            Rule(
                f"{dec}.cross_attn.attention_weights.{{p}}",
                qdec + ".cross_attn.attention_weights.{p}",
                reverse,
                note="levels reversed",
            ),
            Rule(f"{dec}.cross_attn.{{m}}.{{p}}", qdec + ".cross_attn.{m}.{p}"),
            Rule(f"{dec}.cross_attn_norm.{{p}}", qdec + ".norm1.{p}"),
            Rule(f"{dec}.ffn.linear{{k}}.{{p}}", qdec + ".linear{k}.{p}"),
            Rule(f"{dec}.ffn.norm.{{p}}", qdec + ".norm3.{p}"),
            Rule(
                "transformer.decoder.norm.{p}",
                q + "decoder_norm.{p}",
                aliases=(q + "decoder.norm.{p}",),
            ),
            Rule("heads.masks.norm.{p}", q + "decoder_norm.{p}", aliases=(q + "decoder.norm.{p}",)),
            Rule(
                "transformer.decoder.ref_point_head.layers.{k}.{p}",
                q + "decoder.ref_point_head.layers.{k}.{p}",
            ),
            rows_rule("transformer.decoder.class_embed.{i}.{p}", q + "class_embed.{p}", rows),
            rows_rule("transformer.query_selection.class_embed.{p}", q + "class_embed.{p}", rows),
            Rule(
                "transformer.decoder.bbox_embed.{i}.layers.{k}.{p}",
                box,
                aliases=(
                    q + "bbox_embed.{i}.layers.{k}.{p}",
                    q + "decoder.bbox_embed.{i}.layers.{k}.{p}",
                ),
            ),
            Rule("transformer.query_selection.bbox_embed.layers.{k}.{p}", box),
            self._content_rule(arch),
            Rule("transformer.query_selection.enc_output.{p}", q + "enc_output.{p}"),
            Rule("transformer.query_selection.enc_output_norm.{p}", q + "enc_output_norm.{p}"),
            rows_rule("denoising.label_enc.weight", q + "label_enc.weight", rows),
            Rule("heads.masks.pixel_decoder.lateral.{m}", p + "adapter_1.{m}"),
            Rule("heads.masks.pixel_decoder.lateral.norm.{p}", p + "adapter_1.norm.{p}"),
            Rule("heads.masks.pixel_decoder.output.{m}", p + "layer_1.{m}"),
            Rule("heads.masks.pixel_decoder.output.norm.{p}", p + "layer_1.norm.{p}"),
            Rule("heads.masks.pixel_decoder.mask_features.{p}", p + "mask_features.{p}"),
            Rule("heads.masks.mask_embed.layers.{k}.{p}", q + "mask_embed.layers.{k}.{p}"),
        ]
        for j in range(arch.detector.num_levels - backbone_levels):
            rules.append(
                Rule(
                    f"backbone.extra_convs.{j}.{{m}}.{{p}}",
                    f"{p}input_proj.{backbone_levels + j}.{{m}}.{{p}}",
                )
            )
        return rules
