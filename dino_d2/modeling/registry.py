"""The registries through which DINO's criterion and matcher find their loss and cost terms.

A new term is a function registered here plus one config line naming it with its weight; no
class of dino_d2 needs an edit (see docs/EXTENDING.md)::

    from dino_d2.modeling import LOSSES

    @LOSSES.register()
    def loss_my_term(matched, scale=1.0):  # a MatchedQueries -> scalar Tensor (or None)
        ...

    # in the LazyConfig
    model.criterion.losses.loss_my_term = 0.5
"""

from typing import Callable, Dict, Iterable

from detectron2.utils.registry import Registry

__all__ = ["LOSSES", "MATCHING_COSTS", "lookup"]

LOSSES = Registry("LOSSES")
LOSSES.__doc__ = """Loss terms of DINOCriterion: ``f(matched: MatchedQueries, **options)``
returning an unweighted scalar Tensor, or None when the term does not apply to that query set.
Registered under the function's name, which is also the key of the loss (``loss_class``,
``loss_class_0``, ``loss_class_enc``, ``loss_class_dn``, ...)."""

MATCHING_COSTS = Registry("MATCHING_COSTS")
MATCHING_COSTS.__doc__ = """Cost terms of HungarianMatcher: ``f(logits (M, K), boxes (M, 4),
labels (G,), gt_boxes (G, 4), **options)`` returning the (M, G) cost, boxes normalized cxcywh."""


def lookup(registry: Registry, names: Iterable[str], what: str) -> Dict[str, Callable]:
    """The registered functions of ``names``.

    Raises:
        ValueError: naming the unknown entries and the registered ones.
    """
    known = dict(registry)
    names = list(names)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"unknown {what} {unknown}; the {registry._name} registry has {sorted(known)}. "
            f"Register a function with @dino_d2.modeling.{registry._name}.register() (and import "
            "its module before the model is built)"
        )
    return {name: known[name] for name in names}
