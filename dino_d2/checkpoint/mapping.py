"""Name mapping between a foreign state dict and a dino_d2 model, driven by the model's keys.

A :class:`Rule` pairs a *target* name template (a dino_d2 key) with the *source* name template
that holds the same tensor in another layout. Templates are dotted names with ``{field}``
placeholders, each standing for one dotted component: the rule
``Rule("encoder.layers.{i}.self_attn_norm.{p}", "encoder.layers.{i}.norm1.{p}")`` maps every
encoder layer and both LayerNorm parameters. Because every key of the target is
looked up in turn, a tensor the checkpoint lacks, a shape that does not fit and a checkpoint
tensor that nothing uses are all found and reported by name.
"""

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import torch

__all__ = ["ConversionError", "Rule", "map_state_dict", "format_keys"]

_FIELD = re.compile(r"\{(\w+)\}")


class ConversionError(ValueError):
    """A checkpoint does not fit the requested layout or the target model."""


def format_keys(keys: Iterable[str], limit: int = 8) -> str:
    """``'a', 'b', ... (N more)`` for error messages."""
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _compile(template: str) -> "re.Pattern[str]":
    parts = _FIELD.split(template)
    # re.split with one group alternates literal text and field names.
    pattern = "".join(
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^.]+)" for i, part in enumerate(parts)
    )
    return re.compile(pattern)


@dataclass(frozen=True)
class Rule:
    """One target name template and where the source keeps that tensor.

    Attributes:
        target: template of the dino_d2 key.
        source: template of the source key; same fields as ``target``.
        transform: applied to the source tensor (e.g. selecting class rows), or None.
        aliases: templates of other source keys holding the same tensor (the authors register
            their shared heads twice); used when ``source`` is absent and consumed either way.
        note: what ``transform`` does, for shape error messages.
    """

    target: str
    source: str
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    aliases: Tuple[str, ...] = ()
    note: str = ""

    def sources(self, fields: Mapping[str, str]) -> List[str]:
        """The source key, then its aliases, for the given field values."""
        return [t.format(**fields) for t in (self.source,) + self.aliases]


def map_state_dict(
    target: Mapping[str, torch.Size],
    source: Mapping[str, torch.Tensor],
    rules: Sequence[Rule],
    layout: str,
) -> Tuple[Dict[str, torch.Tensor], Set[str]]:
    """Fills every target key from ``source`` with the first rule that matches it.

    Args:
        target: target key -> expected shape (e.g. from a model's ``state_dict()``).
        source: the foreign state dict.
        rules: tried in order for each target key.
        layout: name of the source layout, for error messages.

    Returns:
        ``(converted, consumed)``: the target state dict, and the source keys it used (aliases
        included).

    Raises:
        ConversionError: a target key no rule covers, a source tensor the checkpoint lacks, or a
            shape that does not fit; the message names the keys and shapes.
    """
    compiled = [(_compile(rule.target), rule) for rule in rules]
    converted: Dict[str, torch.Tensor] = {}
    consumed: Set[str] = set()
    for key, shape in target.items():
        for pattern, rule in compiled:
            found = pattern.fullmatch(key)
            if found:
                break
        else:
            raise ConversionError(
                f"the {layout!r} layout has no rule for the model key {key!r}; the target config "
                "builds a part this converter does not know"
            )
        names = rule.sources(found.groupdict())
        present = [name for name in names if name in source]
        if not present:
            raise ConversionError(
                f"the checkpoint lacks {names[0]!r}, which the {layout!r} layout expects for the "
                f"model key {key!r}"
            )
        consumed.update(present)
        original = source[present[0]]
        try:
            value = rule.transform(original) if rule.transform is not None else original
        except IndexError as error:
            raise ConversionError(
                f"{present[0]!r} of shape {tuple(original.shape)} cannot give {key!r}: {error}"
            ) from None
        if tuple(value.shape) != tuple(shape):
            detail = (
                f" ({rule.note}: {tuple(original.shape)} -> {tuple(value.shape)})"
                if rule.transform is not None
                else ""
            )
            raise ConversionError(
                f"shape mismatch: {present[0]!r} gives {key!r} the shape {tuple(value.shape)}"
                f"{detail}, the model expects {tuple(shape)}"
            )
        converted[key] = value
    return converted, consumed
