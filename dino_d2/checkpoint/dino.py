"""The layouts of trained DINO detectors: the authors' (and EasyCV's copy of it) and detrex's.

Each layout knows where its file keeps the state dict, how to read the model's sizes from it
(:class:`~dino_d2.checkpoint.architecture.Architecture`) and the :class:`Rule` list that maps
every dino_d2 key onto its own names. dino_d2 name <- authors' (EasyCV: under ``head.``) / detrex:

* ``backbone.convs.{i}.{0,1}`` <- ``input_proj.{i}.{0,1}`` / ``neck.convs.{i}.{conv,norm}``;
  ``backbone.extra_convs.{j}`` <- ``input_proj.{B+j}`` / ``neck.extra_convs.{j}``
  (B backbone levels);
* ``transformer.level_embed`` <- ``transformer.level_embed`` / ``transformer.level_embeds``;
* encoder layer ``self_attn``, ``self_attn_norm``, ``ffn.linear1``, ``ffn.linear2``,
  ``ffn.norm`` <- ``self_attn``, ``norm1``, ``linear1``, ``linear2``, ``norm2`` /
  ``attentions.0``, ``norms.0``, ``ffns.0.layers.0.0``, ``ffns.0.layers.1``, ``norms.1``;
* decoder layer ``self_attn`` (nn.MultiheadAttention), ``self_attn_norm``, ``cross_attn``,
  ``cross_attn_norm``, ``ffn.linear1``, ``ffn.linear2``, ``ffn.norm`` <- ``self_attn``, ``norm2``,
  ``cross_attn``, ``norm1``, ``linear1``, ``linear2``, ``norm3`` / ``attentions.0.attn``,
  ``norms.0``, ``attentions.1``, ``norms.1``, ``ffns.0.layers.0.0``, ``ffns.0.layers.1``,
  ``norms.2``;
* ``transformer.decoder.{norm,ref_point_head}`` <- the same names in both;
* ``transformer.decoder.class_embed.{i}`` / ``bbox_embed.{i}`` <- ``class_embed.{i}`` /
  ``bbox_embed.{i}`` in both (also registered under ``transformer.decoder.``);
* ``transformer.query_selection.class_embed`` / ``bbox_embed`` <-
  ``transformer.enc_out_class_embed`` / ``enc_out_bbox_embed`` / detrex's last heads
  ``class_embed.{L}``, ``bbox_embed.{L}`` (L decoder layers);
* ``transformer.query_selection.{tgt_embed,enc_output,enc_output_norm}`` <-
  ``transformer.{tgt_embed,enc_output,enc_output_norm}`` in both;
* ``denoising.label_enc`` <- ``label_enc`` (the authors' has one spare row) in both.

Class heads and the label embedding keep the rows of :attr:`Architecture.class_rows`.
"""

import re
from typing import Dict, Mapping

from .architecture import DetectorShape
from .classes import coco_category_ids
from .layout import (
    DetectorLayout,
    all_equal,
    count_consecutive,
    layout_indices,
    level_projections,
    require_key,
    rows_rule,
    transformer_sizes,
)
from .mapping import ConversionError, Rule

__all__ = ["AuthorsLayout", "DetrexLayout", "DETECTOR_LAYOUTS"]


# The authors' args that change the computation in ways dino_d2 does not implement, and the
# value dino_d2 computes.
_AUTHORS_FIXED_ARGS = {
    "two_stage_type": "standard",
    "decoder_sa_type": "sa",
    "transformer_activation": "relu",
    "pre_norm": False,
    "decoder_module_seq": ["sa", "ca", "ffn"],
    "num_patterns": 0,
    "two_stage_add_query_num": 0,
    "two_stage_pat_embed": 0,
    "two_stage_learn_wh": False,
    "dilation": False,
    "position_embedding": "sine",
    "embed_init_tgt": True,
    "masks": False,
    "use_deformable_box_attn": False,
    "add_channel_attention": False,
    "dec_layer_number": None,
}


class AuthorsLayout(DetectorLayout):
    """The authors' layout (IDEA-Research/DINO), or EasyCV's copy of it under ``head.``.

    Args:
        name: ``"idea"`` or ``"easycv"``.
        head: prefix of everything but the backbone (``""`` or ``"head."``).
    """

    def __init__(self, name: str, head: str):
        self.name = name
        self.head = head
        if name == "idea":
            self.container = "model"
            self.top_level = ("model", "optimizer", "lr_scheduler", "epoch", "args")
            self.resnet_prefix, self.swin_prefix = "backbone.0.body.", "backbone.0."
        else:
            self.container = "state_dict"
            self.top_level = ("meta", "state_dict", "optimizer")
            self.resnet_prefix = self.swin_prefix = "backbone."
            # EasyCV keeps its matcher and losses inside the head.
            self.ignored_prefixes = tuple(
                f"{head}{m}." for m in ("criterion", "dn_criterion", "matcher", "postprocess")
            )
        self.marker = f"{head}input_proj.0.0.weight"

    def extract(self, checkpoint, use_ema=False):
        if use_ema:
            if not isinstance(checkpoint, Mapping) or "ema_model" not in checkpoint:
                raise ConversionError(f"--use-ema: the {self.name!r} checkpoint has no 'ema_model'")
            checkpoint = {**checkpoint, self.container: checkpoint["ema_model"]}
        extracted = super().extract(checkpoint)
        if extracted is None:
            return None
        state_dict, args = extracted[0], checkpoint.get("args") if self.name == "idea" else None
        if args is not None and not isinstance(args, Mapping):
            args = vars(args)
        return state_dict, args

    def _shape(self, sd):
        h, layout = self.head, self.name
        widths, num_levels, embed_dim = level_projections(sd, h, layout)
        sizes = transformer_sizes(
            sd, f"{h}transformer.encoder.layers.", f"{h}transformer.decoder.layers.", layout
        )
        decoder_layers = sizes["decoder_layers"]
        class_keys = [f"{h}class_embed.{i}.weight" for i in range(decoder_layers)]
        box_keys = [
            f"{h}bbox_embed.{i}.layers.{k}.weight" for i in range(decoder_layers) for k in (0, 1, 2)
        ]
        for key in class_keys + box_keys:
            require_key(sd, key, layout)
        share = all_equal(sd, class_keys) and all(all_equal(sd, box_keys[k::3]) for k in range(3))
        return DetectorShape(
            level_widths=widths,
            num_levels=num_levels,
            embed_dim=embed_dim,
            num_queries=int(require_key(sd, f"{h}transformer.tgt_embed.weight", layout).shape[0]),
            class_rows=int(sd[class_keys[0]].shape[0]),
            label_rows=int(require_key(sd, f"{h}label_enc.weight", layout).shape[0]),
            share_heads=share,
            **sizes,
        )

    def _class_rows(self, shape, num_classes, notes):
        if self.name == "idea" and num_classes is None and shape.class_rows == 91:
            notes.append(
                "class heads: 91 rows indexed by COCO category id -> the 80 COCO classes in "
                "Detectron2's order (pass --num-classes to keep rows 0..N-1 instead)"
            )
            return coco_category_ids()
        return super()._class_rows(shape, num_classes, notes)

    def _read_args(self, args, arch):
        arch.values["transformer.position_embedding.temperature"] = 20
        arch.values["transformer.position_embedding.offset"] = 0.0
        if args is None:
            arch.notes.append(
                f"no training args in the checkpoint: assuming the {self.name} defaults "
                "(position embedding temperature 20, offset 0; the config's attention heads)"
            )
            return
        for name, supported in _AUTHORS_FIXED_ARGS.items():
            if name in args and args[name] != supported:
                raise ConversionError(
                    f"the checkpoint was trained with {name}={args[name]!r}; dino_d2 implements "
                    f"{name}={supported!r} only"
                )
        if (args.get("nms_iou_threshold") or -1) > 0:
            raise ConversionError(
                "the checkpoint's post-processing uses NMS, which dino_d2 does not"
            )
        temperature_h = args.get("pe_temperatureH", 20)
        if args.get("pe_temperatureW", temperature_h) != temperature_h:
            raise ConversionError(
                "the checkpoint uses different position-embedding temperatures for y and x, "
                "which dino_d2's PositionEmbeddingSine does not support"
            )
        arch.values["transformer.position_embedding.temperature"] = temperature_h
        if "nheads" in args:
            arch.num_heads = (int(args["nheads"]), int(args["nheads"]))
            shape = arch.detector
            for part, rows, key in (
                ("encoder", shape.encoder_offsets, "enc_n_points"),
                ("decoder", shape.decoder_offsets, "dec_n_points"),
            ):
                expected = 2 * args["nheads"] * shape.num_levels * args.get(key, 4)
                if key in args and rows != expected:
                    raise ConversionError(
                        f"the {part}'s sampling_offsets have {rows} rows but the args say "
                        f"{args['nheads']} heads x {shape.num_levels} levels x {args[key]} points"
                    )
        if "num_select" in args:
            arch.values["num_select"] = int(args["num_select"])
        if "dn_number" in args:
            arch.values["denoising.dn_number"] = (
                int(args["dn_number"]) if args.get("use_dn", True) else 0
            )
        for ours, theirs in (
            ("label_noise_ratio", "dn_label_noise_ratio"),
            ("box_noise_scale", "dn_box_noise_scale"),
        ):
            if theirs in args:
                arch.values[f"denoising.{ours}"] = float(args[theirs])
        if arch.backbone == "swin" and args.get("backbone_freeze_keywords"):
            arch.notes.append(
                f"the Swin backbone was trained with backbone_freeze_keywords="
                f"{args['backbone_freeze_keywords']}; set model.backbone.bottom_up.frozen_stages "
                "yourself if you train further"
            )

    def _head_rules(self, arch):
        h = self.head
        shape = arch.detector
        rows = arch.class_rows
        backbone_levels = len(shape.level_widths)
        enc, dec = "transformer.encoder.layers.{i}", "transformer.decoder.layers.{i}"
        rules = [
            Rule("backbone.convs.{i}.{m}.{p}", f"{h}input_proj.{{i}}.{{m}}.{{p}}"),
            Rule("transformer.level_embed", f"{h}transformer.level_embed"),
            Rule(f"{enc}.self_attn.{{m}}.{{p}}", f"{h}{enc}.self_attn.{{m}}.{{p}}"),
            Rule(f"{enc}.self_attn_norm.{{p}}", f"{h}{enc}.norm1.{{p}}"),
            Rule(f"{enc}.ffn.linear{{k}}.{{p}}", f"{h}{enc}.linear{{k}}.{{p}}"),
            Rule(f"{enc}.ffn.norm.{{p}}", f"{h}{enc}.norm2.{{p}}"),
            Rule(f"{dec}.self_attn.out_proj.{{p}}", f"{h}{dec}.self_attn.out_proj.{{p}}"),
            Rule(f"{dec}.self_attn.{{p}}", f"{h}{dec}.self_attn.{{p}}"),
            Rule(f"{dec}.self_attn_norm.{{p}}", f"{h}{dec}.norm2.{{p}}"),
            Rule(f"{dec}.cross_attn.{{m}}.{{p}}", f"{h}{dec}.cross_attn.{{m}}.{{p}}"),
            Rule(f"{dec}.cross_attn_norm.{{p}}", f"{h}{dec}.norm1.{{p}}"),
            Rule(f"{dec}.ffn.linear{{k}}.{{p}}", f"{h}{dec}.linear{{k}}.{{p}}"),
            Rule(f"{dec}.ffn.norm.{{p}}", f"{h}{dec}.norm3.{{p}}"),
            Rule("transformer.decoder.norm.{p}", f"{h}transformer.decoder.norm.{{p}}"),
            Rule(
                "transformer.decoder.ref_point_head.layers.{k}.{p}",
                f"{h}transformer.decoder.ref_point_head.layers.{{k}}.{{p}}",
            ),
            rows_rule(
                "transformer.decoder.class_embed.{i}.{p}",
                f"{h}class_embed.{{i}}.{{p}}",
                rows,
                [f"{h}transformer.decoder.class_embed.{{i}}.{{p}}"],
            ),
            Rule(
                "transformer.decoder.bbox_embed.{i}.layers.{k}.{p}",
                f"{h}bbox_embed.{{i}}.layers.{{k}}.{{p}}",
                aliases=(f"{h}transformer.decoder.bbox_embed.{{i}}.layers.{{k}}.{{p}}",),
            ),
            Rule(
                "transformer.query_selection.tgt_embed.weight", f"{h}transformer.tgt_embed.weight"
            ),
            Rule("transformer.query_selection.enc_output.{p}", f"{h}transformer.enc_output.{{p}}"),
            Rule(
                "transformer.query_selection.enc_output_norm.{p}",
                f"{h}transformer.enc_output_norm.{{p}}",
            ),
            rows_rule(
                "transformer.query_selection.class_embed.{p}",
                f"{h}transformer.enc_out_class_embed.{{p}}",
                rows,
            ),
            Rule(
                "transformer.query_selection.bbox_embed.layers.{k}.{p}",
                f"{h}transformer.enc_out_bbox_embed.layers.{{k}}.{{p}}",
            ),
            rows_rule("denoising.label_enc.weight", f"{h}label_enc.weight", rows),
        ]
        for j in range(shape.num_levels - backbone_levels):
            rules.append(
                Rule(
                    f"backbone.extra_convs.{j}.{{m}}.{{p}}",
                    f"{h}input_proj.{backbone_levels + j}.{{m}}.{{p}}",
                )
            )
        return rules


class DetrexLayout(DetectorLayout):
    """detrex's DINO (projects/dino): Detectron2 ResNet or Swin, ChannelMapper neck, detrex layers.

    detrex keeps independent heads (``class_embed.{0-6}``, the last for the encoder) and trains
    with the position embedding ``temperature=10000, offset=-0.5`` and ``freeze_at=1``; none of
    these is stored in the weights, so the detrex defaults are assumed.
    """

    name = "detrex"
    container = "model"
    top_level = ("model", "optimizer", "scheduler", "iteration")
    marker = "neck.convs.0.conv.weight"
    resnet_prefix = swin_prefix = "backbone."
    resnet_naming = "detectron2"
    resnet_freeze_at = 1
    ignored_prefixes = ("criterion.",)

    def _shape(self, sd):
        layout = self.name
        level_embed = require_key(sd, "transformer.level_embeds", layout)
        num_levels, embed_dim = level_embed.shape
        convs = count_consecutive(sd, r"neck\.convs\.(\d+)\.conv\.weight$", "neck.convs")
        extra = len(layout_indices(sd, r"neck\.extra_convs\.(\d+)\.conv\.weight$"))
        if convs + extra != num_levels:
            raise ConversionError(
                f"{convs} neck.convs and {extra} neck.extra_convs but {num_levels} levels in "
                "transformer.level_embeds"
            )
        enc, dec = "transformer.encoder.layers.", "transformer.decoder.layers."
        ffn = r"(\d+)\.ffns\.0\.layers\.0\.0\.weight$"
        decoder_layers = count_consecutive(sd, re.escape(dec) + ffn, "decoder layers")
        heads = count_consecutive(sd, r"class_embed\.(\d+)\.weight$", "class_embed heads")
        if heads != decoder_layers + 1:
            raise ConversionError(
                f"{heads} class_embed heads for {decoder_layers} decoder layers; detrex keeps one "
                "per decoder layer plus one for the encoder"
            )
        return DetectorShape(
            level_widths=[int(sd[f"neck.convs.{i}.conv.weight"].shape[1]) for i in range(convs)],
            num_levels=int(num_levels),
            embed_dim=int(embed_dim),
            encoder_layers=count_consecutive(sd, re.escape(enc) + ffn, "encoder layers"),
            decoder_layers=decoder_layers,
            encoder_ffn=int(require_key(sd, f"{enc}0.ffns.0.layers.0.0.weight", layout).shape[0]),
            decoder_ffn=int(require_key(sd, f"{dec}0.ffns.0.layers.0.0.weight", layout).shape[0]),
            encoder_offsets=int(
                require_key(sd, f"{enc}0.attentions.0.sampling_offsets.weight", layout).shape[0]
            ),
            decoder_offsets=int(
                require_key(sd, f"{dec}0.attentions.1.sampling_offsets.weight", layout).shape[0]
            ),
            num_queries=int(require_key(sd, "transformer.tgt_embed.weight", layout).shape[0]),
            class_rows=int(sd["class_embed.0.weight"].shape[0]),
            label_rows=int(require_key(sd, "label_enc.weight", layout).shape[0]),
            share_heads=False,
        )

    def _read_args(self, args, arch):
        arch.values["transformer.position_embedding.temperature"] = 10000
        arch.values["transformer.position_embedding.offset"] = -0.5
        arch.notes.append(
            "detrex defaults assumed (not stored in the weights): position embedding "
            "temperature 10000 / offset -0.5, ResNet freeze_at=1, the config's attention heads"
        )

    def _head_rules(self, arch):
        shape = arch.detector
        rows = arch.class_rows
        last = shape.decoder_layers
        enc, dec = "transformer.encoder.layers.{i}", "transformer.decoder.layers.{i}"
        linear = {"1": "ffns.0.layers.0.0", "2": "ffns.0.layers.1"}
        rules = [
            Rule("backbone.convs.{i}.0.{p}", "neck.convs.{i}.conv.{p}"),
            Rule("backbone.convs.{i}.1.{p}", "neck.convs.{i}.norm.{p}"),
            Rule("backbone.extra_convs.{i}.0.{p}", "neck.extra_convs.{i}.conv.{p}"),
            Rule("backbone.extra_convs.{i}.1.{p}", "neck.extra_convs.{i}.norm.{p}"),
            Rule("transformer.level_embed", "transformer.level_embeds"),
            Rule(f"{enc}.self_attn.{{m}}.{{p}}", f"{enc}.attentions.0.{{m}}.{{p}}"),
            Rule(f"{enc}.self_attn_norm.{{p}}", f"{enc}.norms.0.{{p}}"),
            Rule(f"{enc}.ffn.norm.{{p}}", f"{enc}.norms.1.{{p}}"),
            Rule(f"{dec}.self_attn.out_proj.{{p}}", f"{dec}.attentions.0.attn.out_proj.{{p}}"),
            Rule(f"{dec}.self_attn.{{p}}", f"{dec}.attentions.0.attn.{{p}}"),
            Rule(f"{dec}.self_attn_norm.{{p}}", f"{dec}.norms.0.{{p}}"),
            Rule(f"{dec}.cross_attn.{{m}}.{{p}}", f"{dec}.attentions.1.{{m}}.{{p}}"),
            Rule(f"{dec}.cross_attn_norm.{{p}}", f"{dec}.norms.1.{{p}}"),
            Rule(f"{dec}.ffn.norm.{{p}}", f"{dec}.norms.2.{{p}}"),
            Rule("transformer.decoder.norm.{p}", "transformer.decoder.norm.{p}"),
            Rule(
                "transformer.decoder.ref_point_head.layers.{k}.{p}",
                "transformer.decoder.ref_point_head.layers.{k}.{p}",
            ),
            Rule("transformer.query_selection.tgt_embed.weight", "transformer.tgt_embed.weight"),
            Rule("transformer.query_selection.enc_output.{p}", "transformer.enc_output.{p}"),
            Rule(
                "transformer.query_selection.enc_output_norm.{p}", "transformer.enc_output_norm.{p}"
            ),
            rows_rule(
                "transformer.query_selection.class_embed.{p}",
                f"class_embed.{last}.{{p}}",
                rows,
                [f"transformer.decoder.class_embed.{last}.{{p}}"],
            ),
            Rule(
                "transformer.query_selection.bbox_embed.layers.{k}.{p}",
                f"bbox_embed.{last}.layers.{{k}}.{{p}}",
                aliases=(f"transformer.decoder.bbox_embed.{last}.layers.{{k}}.{{p}}",),
            ),
            rows_rule(
                "transformer.decoder.class_embed.{i}.{p}",
                "class_embed.{i}.{p}",
                rows,
                ["transformer.decoder.class_embed.{i}.{p}"],
            ),
            Rule(
                "transformer.decoder.bbox_embed.{i}.layers.{k}.{p}",
                "bbox_embed.{i}.layers.{k}.{p}",
                aliases=("transformer.decoder.bbox_embed.{i}.layers.{k}.{p}",),
            ),
            rows_rule("denoising.label_enc.weight", "label_enc.weight", rows),
        ]
        for part in (enc, dec):
            for k, name in linear.items():
                rules.append(Rule(f"{part}.ffn.linear{k}.{{p}}", f"{part}.{name}.{{p}}"))
        return rules


DETECTOR_LAYOUTS: Dict[str, DetectorLayout] = {
    "idea": AuthorsLayout("idea", ""),
    "easycv": AuthorsLayout("easycv", "head."),
    "detrex": DetrexLayout(),
}
