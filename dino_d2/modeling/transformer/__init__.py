"""DINO's deformable transformer: encoder, mixed query selection, decoder."""

from .decoder import DeformableDecoder, DeformableDecoderLayer, build_box_head, build_class_head
from .encoder import (
    DeformableEncoder,
    DeformableEncoderLayer,
    get_encoder_reference_points,
    get_valid_ratio,
)
from .query_selection import MixedQuerySelection, gen_encoder_output_proposals
from .transformer import DINOTransformer

__all__ = [
    "DINOTransformer",
    "DeformableEncoder",
    "DeformableEncoderLayer",
    "DeformableDecoder",
    "DeformableDecoderLayer",
    "MixedQuerySelection",
    "build_box_head",
    "build_class_head",
    "gen_encoder_output_proposals",
    "get_encoder_reference_points",
    "get_valid_ratio",
]
