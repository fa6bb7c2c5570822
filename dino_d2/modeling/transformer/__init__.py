"""DINO's deformable transformer: encoder, mixed query selection, decoder."""

from .decoder import (
    DecoderOutput,
    DeformableDecoder,
    DeformableDecoderLayer,
    build_box_head,
    build_class_head,
)
from .encoder import DeformableEncoder, DeformableEncoderLayer, get_encoder_reference_points
from dino_d2.layers.multi_scale_levels import MultiScaleLevels, valid_extent
from .query_selection import MixedQuerySelection, SelectedQueries, gen_encoder_output_proposals
from .transformer import DINOTransformer, DINOTransformerOutput, HeadOutputs

__all__ = [
    "DINOTransformer",
    "DINOTransformerOutput",
    "HeadOutputs",
    "DecoderOutput",
    "DeformableEncoder",
    "DeformableEncoderLayer",
    "DeformableDecoder",
    "DeformableDecoderLayer",
    "MixedQuerySelection",
    "MultiScaleLevels",
    "SelectedQueries",
    "build_box_head",
    "build_class_head",
    "gen_encoder_output_proposals",
    "get_encoder_reference_points",
    "valid_extent",
]
