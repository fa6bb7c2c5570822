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
* :mod:`~dino_d2.measure.memory`: peak resident and CUDA memory, and
  :mod:`~dino_d2.measure.inference_memory`: the peak resident memory of a fresh inference
  process (imports, build, load, one image), beside that of its imports alone;
* :mod:`~dino_d2.measure.processes`: a measurement taken in a fresh process, and
  :mod:`~dino_d2.measure.alternation`: runtimes timed alone in fresh processes, alternated
  round by round, each against the reference of its round.

The names are imported on first access (PEP 562), so that running one of these modules as a
fresh process (``python -m dino_d2.measure.inference_memory``) imports only what it needs.
"""

from ..utils.lazy import lazy_exports

__all__ = [
    "random_batches",
    "padded_batch",
    "dataset_batches",
    "time_inference",
    "time_exported",
    "ExportInfoError",
    "export_inputs",
    "time_export",
    "export_batches",
    "time_training",
    "time_training_idle_and_busy",
    "busy_cpu",
    "count_macs",
    "fastest_gemm",
    "inference_limit",
    "model_limits",
    "fast_path_parity",
    "full_float32",
    "perturb_frozen_batchnorm",
    "peak_rss_mb",
    "cuda_peak_mb",
    "InferenceProcessError",
    "inference_process_memory",
    "MeasuredProcessError",
    "run_measured_process",
    "AlternationError",
    "alternate",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "busy_cpu": ".busy",
        "ExportInfoError": ".exports",
        "export_inputs": ".exports",
        "time_export": ".exports",
        "export_batches": ".exports",
        "count_macs": ".flops",
        "dataset_batches": ".inputs",
        "padded_batch": ".inputs",
        "random_batches": ".inputs",
        "cuda_peak_mb": ".memory",
        "peak_rss_mb": ".memory",
        "fast_path_parity": ".parity",
        "full_float32": ".parity",
        "perturb_frozen_batchnorm": ".parity",
        "fastest_gemm": ".limits",
        "inference_limit": ".limits",
        "model_limits": ".limits",
        "time_exported": ".timing",
        "time_inference": ".timing",
        "time_training": ".training",
        "time_training_idle_and_busy": ".training",
        "InferenceProcessError": ".inference_memory",
        "inference_process_memory": ".inference_memory",
        "MeasuredProcessError": ".processes",
        "run_measured_process": ".processes",
        "AlternationError": ".alternation",
        "alternate": ".alternation",
    },
)
