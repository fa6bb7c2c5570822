"""The options under a config's ``train``, read into typed values with their defaults.

Detectron2 has no schema for ``train`` (a free-form dict in LazyConfigs). :class:`TrainOptions`
is dino_d2's: the training script, :func:`dino_d2.engine.default_setup` and
:func:`dino_d2.engine.training.build_training` read ``cfg.train`` only through
:meth:`TrainOptions.from_config`, so the fields below are the keys that are read, and the check
of mistyped keys (:mod:`dino_d2.engine.train_keys`) derives the known keys from them. A new
option is one new field (in a nested dataclass for a sub-dict such as ``train.amp``).

Two sub-dicts are handed whole to Detectron2 or PyTorch: ``train.ddp`` to Detectron2's
``create_ddp_model`` (and so ``DistributedDataParallel``) and ``train.checkpointer`` to Detectron2's
``PeriodicCheckpointer``; their known keys are those callables' keyword arguments.

The defaults are those of ``configs/common/train.py``.
"""

import dataclasses
import inspect
import typing
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from omegaconf import OmegaConf

__all__ = ["AmpOptions", "ClipGradOptions", "EMAOptions", "TrainOptions", "option_keys"]


_Receivers = Callable[[], Sequence[Tuple[Callable, Tuple[str, ...]]]]


def _handed_to(receivers: _Receivers) -> Dict[str, Any]:
    """Field metadata of a sub-dict passed whole as keyword arguments.

    ``receivers()`` returns the callables that take them, each with its parameters that the
    sub-dict does not fill; it is called lazily, so that reading options imports neither
    torch's DDP nor Detectron2's hooks.
    """
    return {"handed_to": receivers}


def _ddp():
    from torch.nn.parallel import DistributedDataParallel

    from detectron2.engine.defaults import create_ddp_model

    return [
        (create_ddp_model, ("model",)),
        (DistributedDataParallel.__init__, ("self", "module")),
    ]


def _periodic_checkpointer():
    from detectron2.engine.hooks import PeriodicCheckpointer

    return [(PeriodicCheckpointer.__init__, ("self", "checkpointer"))]


@dataclasses.dataclass(frozen=True)
class AmpOptions:
    """``train.amp``: mixed precision.

    Attributes:
        enabled: train under autocast (False: float32 everywhere).
        precision: "auto" (bfloat16 where the device computes it natively, float32 elsewhere),
            "float16" (CUDA, with a GradScaler) or "bfloat16"; None: float16 on CUDA, bfloat16
            elsewhere (:func:`dino_d2.engine.precision.amp_settings`).
        eval_precision: the precision of evaluation and of the demo's inference, whether or not
            training is mixed: "auto" (the default: bfloat16 where native, float32 elsewhere),
            "bfloat16" / "float16" as ``precision`` reads them, or "float32" (:func:`dino_d2.engine.precision.inference_autocast`).
    """

    enabled: bool = True
    precision: Optional[str] = "auto"
    eval_precision: str = "auto"


@dataclasses.dataclass(frozen=True)
class ClipGradOptions:
    """``train.clip_grad``: clipping of the norm of all gradients together.

    Attributes:
        enabled: clip.
        max_norm: the largest total norm.
        norm_type: the p of the p-norm.
    """

    enabled: bool = True
    max_norm: float = 0.1
    norm_type: float = 2.0


@dataclasses.dataclass(frozen=True)
class EMAOptions:
    """``train.model_ema``: an exponential moving average of the weights.

    Attributes:
        enabled: keep the average (checkpointed under ``"ema"``).
        decay: the weight of the previous average at every step.
        use_for_eval: evaluate with the averaged weights.
    """

    enabled: bool = False
    decay: float = 0.9997
    use_for_eval: bool = False


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """The options under ``train`` that dino_d2's training reads.

    Attributes:
        output_dir: where checkpoints, logs, metrics and ``config.yaml`` go.
        init_checkpoint: the weights training starts from ("" for none).
        init_class_map: the name of a :mod:`dino_d2.checkpoint.class_map` map that gathers the
            class heads of ``init_checkpoint``; None: loaded as it is.
        max_iter: the number of training iterations.
        amp: mixed precision.
        clip_grad: gradient clipping.
        model_ema: the weight average.
        ddp: keyword arguments of Detectron2's ``create_ddp_model`` (``fp16_compression``) and
            ``DistributedDataParallel``.
        checkpointer: keyword arguments of Detectron2's ``PeriodicCheckpointer``.
        eval_period: iterations between evaluations.
        log_period: iterations between metric writes.
        seed: the random seed (of process 0; each process adds its rank); negative: random.
        device: "cuda", "cpu", ...; None: CUDA when available, else the CPU.
        cudnn_benchmark: let cuDNN pick its algorithms by timing them (training only).
    """

    output_dir: str = "./output/dino"
    init_checkpoint: str = ""
    init_class_map: Optional[str] = None
    max_iter: int = 90000
    amp: AmpOptions = dataclasses.field(default_factory=AmpOptions)
    clip_grad: ClipGradOptions = dataclasses.field(default_factory=ClipGradOptions)
    model_ema: EMAOptions = dataclasses.field(default_factory=EMAOptions)
    ddp: Dict[str, Any] = dataclasses.field(
        default_factory=lambda: dict(
            broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False
        ),
        metadata=_handed_to(_ddp),
    )
    checkpointer: Dict[str, Any] = dataclasses.field(
        default_factory=lambda: dict(period=5000, max_to_keep=100),
        metadata=_handed_to(_periodic_checkpointer),
    )
    eval_period: int = 5000
    log_period: int = 20
    seed: int = -1
    device: Optional[str] = None
    cudnn_benchmark: bool = False

    @classmethod
    def from_config(cls, train) -> "TrainOptions":
        """Reads a config's ``train`` node (a DictConfig or a dict); absent keys take defaults.

        Keys that no field names are left to :func:`dino_d2.engine.check_train_keys`, which
        warns about them (a user's own code may read them).

        Raises:
            ValueError: naming the key, when a value has the wrong type (``train.max_iter="5"``)
                or a sub-dict is not a dict.
        """
        if OmegaConf.is_config(train):
            train = OmegaConf.to_container(train, resolve=True)
        return _read(cls, train, "train")


def _read(cls, values, prefix: str):
    if not isinstance(values, Mapping):
        raise ValueError(f"{prefix} must be a dict of options, got {values!r}")
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in values:
            continue
        key, value = f"{prefix}.{field.name}", values[field.name]
        if dataclasses.is_dataclass(field.type):
            value = _read(field.type, value, key)
        elif "handed_to" in field.metadata:
            if not isinstance(value, Mapping):
                raise ValueError(f"{key} must be a dict of keyword arguments, got {value!r}")
            value = dict(value)
        elif not _matches(field.type, value):
            raise ValueError(f"{key} must be {_type_name(field.type)}, got {value!r}")
        kwargs[field.name] = value
    return cls(**kwargs)


def _types(annotation) -> Tuple[type, ...]:
    if typing.get_origin(annotation) is typing.Union:
        return tuple(t for arg in typing.get_args(annotation) for t in _types(arg))
    if annotation is float:
        return (int, float)  # 1 for 1.0
    return (annotation,)


def _matches(annotation, value) -> bool:
    accepted = _types(annotation)
    if isinstance(value, bool) and bool not in accepted:
        return False  # a bool is an int to isinstance
    return isinstance(value, accepted)


def _type_name(annotation) -> str:
    names = {type(None): "None", int: "an integer", float: "a number", str: "a string"}
    names[bool] = "True or False"
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in _types(annotation)))


def _parameters(function: Callable, skip: Tuple[str, ...]) -> List[str]:
    names = []
    for name, parameter in inspect.signature(function).parameters.items():
        if name in skip or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        names.append(name)
    return names


def option_keys(cls=TrainOptions, prefix: str = "") -> List[str]:
    """The dotted keys below ``train`` that ``cls`` (default :class:`TrainOptions`) reads.

    A field holding a nested options dataclass gives its fields' keys (``amp.enabled``); a
    sub-dict handed whole to a callable gives that callable's keyword arguments
    (``ddp.find_unused_parameters``); any other field is one key.
    """
    keys = []
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(field.type):
            keys.extend(option_keys(field.type, key + "."))
        elif "handed_to" in field.metadata:
            for function, skip in field.metadata["handed_to"]():
                keys.extend(f"{key}.{name}" for name in _parameters(function, skip))
        else:
            keys.append(key)
    return list(dict.fromkeys(keys))
