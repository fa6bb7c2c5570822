"""Access to the LazyConfigs that ship with dino_d2, installed or not, and to config files.

A regular install carries them as package data under ``dino_d2/configs``; a source checkout or an
editable install reads the repository's ``configs/``.

:func:`load_config_file` is how every tool reads a ``--config-file``: a ``.py`` LazyConfig is
Python code and runs (only use ones you trust, as any script), while a ``.yaml`` (a
``config.yaml`` that ``LazyConfig.save`` wrote) is read as data. Detectron2 v0.6's
``LazyConfig.load`` reads yaml with ``yaml.unsafe_load``, whose ``!!python/object/apply`` tags
call any function at load time; here the yaml is read with ``yaml.safe_load``'s rules plus the
tags ``LazyConfig.save`` writes for dino_d2's configs: ``!!python/tuple`` (a tuple),
``!!python/name:module.attr`` (a class or function, looked up as a ``_target_`` string is, not
called) and ``!!python/object/apply:functools.partial`` (a partial, built without calling what it
wraps). Any other Python tag (``!!python/object/apply`` of another callable,
``!!python/object/new``, ``!!python/object``) stops with :class:`UnsafeConfigError` before
anything runs. Note that a config of either kind names the
callables (``_target_``) that ``instantiate`` calls to build the model: a config from someone
else is code to review, whatever its format.
"""

import functools
import os
from importlib import resources

import yaml

__all__ = ["UnsafeConfigError", "get_config", "get_config_file", "list_configs", "load_config_file"]


class UnsafeConfigError(ValueError):
    """A yaml config holds a tag that would build a Python object (and could run code)."""


class _ConfigYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also builds tuples, as ``LazyConfig.save`` writes them."""


def _construct_name(loader: yaml.SafeLoader, suffix: str, node: yaml.Node):
    """``!!python/name:module.attr``: the object, found as Detectron2 finds a ``_target_``."""
    from detectron2.utils.registry import locate

    return locate(suffix)


def _construct_partial(loader: yaml.SafeLoader, node: yaml.Node) -> functools.partial:
    """``!!python/object/apply:functools.partial``: ``args``, ``kwds`` and the ``state`` that
    ``partial.__reduce__`` gives; nothing is called but ``partial`` itself."""
    if isinstance(node, yaml.SequenceNode):
        return functools.partial(*loader.construct_sequence(node, deep=True))
    value = loader.construct_mapping(node, deep=True)
    result = functools.partial(*value.get("args", ()), **value.get("kwds", {}))
    if value.get("state"):
        result.__setstate__(tuple(value["state"]))
    return result


_ConfigYamlLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple",
    lambda loader, node: tuple(loader.construct_sequence(node)),
)
_ConfigYamlLoader.add_multi_constructor("tag:yaml.org,2002:python/name:", _construct_name)
_ConfigYamlLoader.add_constructor(
    "tag:yaml.org,2002:python/object/apply:functools.partial", _construct_partial
)

_SOURCE_CONFIGS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"
)


def _config_root() -> str:
    packaged = resources.files("dino_d2").joinpath("configs")
    if packaged.is_dir():
        return str(packaged)
    if os.path.isdir(_SOURCE_CONFIGS):
        return _SOURCE_CONFIGS
    raise FileNotFoundError(
        f"dino_d2's configs are neither installed with the package nor at {_SOURCE_CONFIGS}"
    )


def list_configs() -> list:
    """Names of the model configs (the top-level files), e.g. ``dino_r50_4scale_12ep.py``."""
    return sorted(
        f
        for f in os.listdir(_config_root())
        if f.startswith(("dino_", "maskdino_")) and f.endswith(".py")
    )


def get_config_file(config_path: str) -> str:
    """The file of a shipped config.

    Args:
        config_path: name relative to the configs folder, e.g. ``"dino_r50_4scale_12ep.py"``.
    """
    path = os.path.join(_config_root(), config_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{config_path!r} is not one of dino_d2's configs; available: {', '.join(list_configs())}"
        )
    return path


def get_config(config_path: str):
    """Loads a shipped LazyConfig (an omegaconf DictConfig with model, dataloader, optimizer, ...)."""
    from detectron2.config import LazyConfig

    return LazyConfig.load(get_config_file(config_path))


def _load_yaml(path: str):
    with open(path) as f:
        try:
            return yaml.load(f, Loader=_ConfigYamlLoader)
        except yaml.constructor.ConstructorError as error:
            line = getattr(error.problem_mark, "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise UnsafeConfigError(
                f"{path}{where}: {error.problem}. dino_d2 reads yaml configs as data only: a "
                "tag that builds a Python object could run code when loaded. Write the value as "
                "plain yaml (a _target_ string for an object to instantiate), or use a .py "
                "LazyConfig, which is code and runs like any script (only ones you trust)."
            ) from None


def load_config_file(path: str):
    """Loads a config file as Detectron2's ``LazyConfig.load`` does, yaml as data only.

    Args:
        path: a ``.py`` LazyConfig (executed: Python code) or a ``.yaml`` / ``.yml`` file (read
            with ``yaml.safe_load``'s rules and the tags listed in the module's doc).

    Returns:
        an omegaconf ``DictConfig``.

    Raises:
        UnsafeConfigError: the yaml has a tag that would build a Python object; nothing ran.
    """
    from detectron2.config import LazyConfig
    from omegaconf import OmegaConf

    if os.path.splitext(path)[1] not in (".yaml", ".yml"):
        return LazyConfig.load(path)
    return OmegaConf.create(_load_yaml(path), flags={"allow_objects": True})
