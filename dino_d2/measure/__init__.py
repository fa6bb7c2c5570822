"""Measurement of a dino_d2 model: how fast, how close to this machine's limit, how exact.

The functions behind ``tools/benchmark.py``, ``tools/analyze_model.py`` and
``tools/gpu_check.py``; the training and inference code never imports them.

* :mod:`~dino_d2.measure.inputs`: random images (with boxes for training), a test set's first
  images, a batch padded for an exported graph;
* :mod:`~dino_d2.measure.timing`: inference latency of a model and of an exported graph, and
  :mod:`~dino_d2.measure.exports`: an export timed and compared beside its eager model;
* :mod:`~dino_d2.measure.training`: the training script's step, timed idle and on a busy machine
  (:mod:`~dino_d2.measure.busy`);
* :mod:`~dino_d2.measure.flops`: multiply-accumulates, and :mod:`~dino_d2.measure.limits`: the
  GEMM rate of the fastest library (BLAS, oneDNN) in float32 and bfloat16, and the least time
  this machine's matrix math allows a model in each;
* :mod:`~dino_d2.measure.parity`: the CPU fast path against the plain model, and
  :mod:`~dino_d2.measure.precision_parity`: bfloat16 against float32;
* :mod:`~dino_d2.measure.memory`: peak resident and CUDA memory.
"""

from .busy import busy_cpu
from .exports import ExportInfoError, export_inputs, time_export
from .flops import count_macs
from .inputs import dataset_batches, padded_batch, random_batches
from .memory import cuda_peak_mb, peak_rss_mb
from .parity import fast_path_parity, perturb_frozen_batchnorm
from .limits import fastest_gemm, inference_limit, model_limits
from .timing import time_exported, time_inference
from .training import time_training, time_training_idle_and_busy

__all__ = [
    "random_batches",
    "padded_batch",
    "dataset_batches",
    "time_inference",
    "time_exported",
    "ExportInfoError",
    "export_inputs",
    "time_export",
    "time_training",
    "time_training_idle_and_busy",
    "busy_cpu",
    "count_macs",
    "fastest_gemm",
    "inference_limit",
    "model_limits",
    "fast_path_parity",
    "perturb_frozen_batchnorm",
    "peak_rss_mb",
    "cuda_peak_mb",
]
