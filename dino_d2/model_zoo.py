"""Access to the LazyConfigs that ship with dino_d2, installed or not.

A regular install carries them as package data under ``dino_d2/configs``; a source checkout or an
editable install reads the repository's ``configs/``.
"""

import os
from importlib import resources

__all__ = ["get_config", "get_config_file", "list_configs"]

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
        f for f in os.listdir(_config_root()) if f.startswith("dino_") and f.endswith(".py")
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
