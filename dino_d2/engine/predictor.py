"""A predictor for LazyConfigs: Detectron2's ``DefaultPredictor``, one image in, ``Instances``
out, resized as the config's test data loader resizes."""

import logging
from typing import Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from detectron2.config import instantiate
from detectron2.data import transforms as T

from ..checkpoint import AtomicCheckpointer
from ..layers.fast_path import optimize_for_cpu_inference
from .defaults import resolve_device
from .precision import inference_autocast, inference_dtype

__all__ = ["Predictor"]

logger = logging.getLogger(__name__)


class Predictor:
    """Detectron2's ``DefaultPredictor`` for a LazyConfig: one image in, ``Instances`` out.

    Builds ``cfg.model`` in eval mode on ``device``, loads ``checkpoint`` (default
    ``cfg.train.init_checkpoint``) with Detectron2's checkpointer, through
    :func:`dino_d2.checkpoint.load_checkpoint_file` (a file whose pickle would run code is refused
    unless ``unsafe_load``), applies the inference fast path
    (:func:`dino_d2.layers.fast_path.optimize_for_cpu_inference`) and resizes each image with
    ``cfg.dataloader.test.mapper.augmentations`` (no resize when the config has none).

    Args:
        cfg: a loaded LazyConfig.
        checkpoint: weights to load; None reads ``cfg.train.init_checkpoint``; "" loads nothing.
        device: e.g. "cpu"; None reads ``cfg.train.device`` (None there: CUDA if available).
        unsafe_load: load ``checkpoint`` with full unpickling (``--unsafe-load``; only a file
            you trust).
        precision: "float32", "auto", "bfloat16" or "float16"
            (:func:`dino_d2.engine.precision.inference_dtype`); None reads
            ``cfg.train.amp.eval_precision`` ("auto" when absent: bfloat16 where native).

    Raises:
        UntrustedFileError: the checkpoint holds Python objects and ``unsafe_load`` is False.
    """

    def __init__(
        self,
        cfg,
        checkpoint: Optional[str] = None,
        device: Optional[str] = None,
        *,
        unsafe_load: bool = False,
        precision: Optional[str] = None,
    ):
        if device is None:
            device = resolve_device(OmegaConf.select(cfg, "train.device", default=None))
        self.device = torch.device(device)
        if precision is None:
            precision = OmegaConf.select(cfg, "train.amp.eval_precision", default="auto")
        self.precision = precision
        self.dtype = inference_dtype(self.device, precision)
        self.model = instantiate(cfg.model).to(self.device).eval()
        if checkpoint is None:
            checkpoint = OmegaConf.select(cfg, "train.init_checkpoint", default="") or ""
        self.checkpoint = checkpoint
        if checkpoint:
            AtomicCheckpointer(self.model, unsafe_load=unsafe_load).load(checkpoint)
        else:
            logger.warning("No checkpoint given: the model keeps its random initial weights")
        optimize_for_cpu_inference(self.model)
        self.input_format = getattr(self.model, "input_format", "RGB")
        augmentations = OmegaConf.select(cfg, "dataloader.test.mapper.augmentations")
        if augmentations is None:
            logger.warning("The config has no dataloader.test.mapper.augmentations: no resize")
            self.augmentations = T.AugmentationList([])
        else:
            self.augmentations = T.AugmentationList(list(instantiate(augmentations)))

    def __call__(self, image: np.ndarray):
        """Detects objects in one image.

        Args:
            image: (H, W, 3) uint8 in the model's ``input_format`` channel order.

        Returns:
            ``Instances`` on the CPU with ``pred_boxes`` (absolute XYXY pixels of ``image``),
            ``scores`` and ``pred_classes``.
        """
        height, width = image.shape[:2]
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        # Kept in the image's own dtype (uint8): the model normalizes any dtype, and a float32
        # copy would stay alive, 4x the size, through the whole forward pass.
        resized = np.ascontiguousarray(aug_input.image.transpose(2, 0, 1))
        inputs = {"image": torch.as_tensor(resized), "height": height, "width": width}
        with torch.no_grad(), inference_autocast(self.device, self.precision):
            (output,) = self.model([inputs])
        return output["instances"].to("cpu")
