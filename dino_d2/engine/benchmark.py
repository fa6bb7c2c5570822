"""Timing a dino_d2 model: inference latency and training steps, inputs, memory, a busy machine.

The functions behind ``tools/benchmark.py`` (a thin command line over them) and
``tools/gpu_check.py``:

* inputs: :func:`random_batches` (random images, with random ground-truth boxes for training)
  and :func:`dataset_batches` (the first images of a config's test loader);
* :func:`time_inference`: latency per image of a model in eval mode, without gradients, and
  :func:`time_exported` the same for an exported graph;
* :func:`matrix_math_limit`: the model's multiply-accumulates (fvcore) at this machine's
  :func:`sgemm_gmacs` rate, the least time any implementation could take;
* :func:`build_training` and :func:`time_training`: the training step of
  ``tools/lazyconfig_train_net.py`` (forward, loss check, backward, gradient clipping, metrics,
  optimizer step and EMA update, under autocast when the config asks for it) on a fixed batch,
  without a data loader;
* :func:`peak_rss_mb`: the process's peak resident memory;
* :func:`busy_cpu`: starts processes that keep cores busy, so that a figure "on a busy machine"
  can be reproduced.

Every time is measured on the wall clock around the work, after synchronizing CUDA.
"""

import contextlib
import itertools
import logging
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from omegaconf import OmegaConf
from torch import Tensor

from detectron2.config import instantiate
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from ..data import register_builtin_datasets
from ..export.verify import pad_images
from .ema import ModelEMA
from .flops import count_macs
from .threads import AdaptiveThreads, CpuLoadMonitor, threads_set_by_user
from .trainer import Trainer, amp_settings

__all__ = [
    "peak_rss_mb",
    "random_batches",
    "padded_batch",
    "dataset_batches",
    "time_inference",
    "time_exported",
    "sgemm_gmacs",
    "matrix_math_limit",
    "TrainingSetup",
    "build_training",
    "time_training",
    "time_training_idle_and_busy",
    "busy_cpu",
]

logger = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """The process's peak resident set size so far, in MiB (building the model counts too)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024


def random_batches(
    num_batches: int,
    batch_size: int,
    height: int,
    width: int,
    *,
    num_boxes: int = 0,
    num_classes: int = 1,
    seed: int = 0,
) -> List[List[Dict]]:
    """``num_batches`` references to one batch of random images, with boxes for training.

    Args:
        num_batches: length of the returned list (every item is the same batch).
        batch_size: images per batch.
        height, width: image size in pixels.
        num_boxes: ground-truth boxes per image; 0 gives inference inputs (no ``instances``).
        num_classes: classes are drawn from ``0..num_classes-1``.
        seed: seed of the random generator.

    Returns:
        batches of dicts with ``image`` (3, height, width) float32 holding whole numbers in
        0-255 (what a uint8 image holds) and, with
        ``num_boxes``, ``instances`` holding ``gt_boxes`` (absolute XYXY inside the image, each
        side at least 1/20 of the image's) and ``gt_classes`` (int64).
    """
    generator = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(batch_size):
        pixels = torch.randint(256, (3, height, width), generator=generator)
        item = {"image": pixels.to(torch.float32)}
        if num_boxes:
            size = torch.tensor([width, height], dtype=torch.float32)
            wh = (0.05 + 0.45 * torch.rand(num_boxes, 2, generator=generator)) * size
            x0y0 = torch.rand(num_boxes, 2, generator=generator) * (size - wh)
            instances = Instances((height, width))
            instances.gt_boxes = Boxes(torch.cat([x0y0, x0y0 + wh], dim=1))
            instances.gt_classes = torch.randint(num_classes, (num_boxes,), generator=generator)
            item["instances"] = instances
        batch.append(item)
    return [batch] * num_batches


def padded_batch(batch: List[Dict], dtype: torch.dtype = torch.uint8) -> Tuple[Tensor, Tensor]:
    """One batch of model inputs as an exported graph takes it: ``(images, image_sizes)``.

    Args:
        batch: dicts with ``image`` (3, H, W), 0-255.
        dtype: of the padded ``images`` (N, 3, max H, max W); each image in its top-left corner.
    """
    return pad_images([item["image"].round().to(dtype) for item in batch])


def dataset_batches(cfg, num_batches: int, batch_size: int) -> List[List[Dict]]:
    """Batches of the first images of ``cfg.dataloader.test`` (read and resized by its mapper).

    A dataset with fewer images than needed is cycled through.
    """
    names = OmegaConf.select(cfg, "dataloader.test.dataset.names")
    register_builtin_datasets([names] if isinstance(names, str) else list(names))
    needed = num_batches * batch_size
    inputs = []
    for batch in instantiate(cfg.dataloader.test):
        inputs.extend(batch)
        if len(inputs) >= needed:
            break
    if not inputs:
        raise ValueError(f"the test data loader of the config ({names}) yields no images")
    if len(inputs) < needed:
        logger.info(f"The test set has {len(inputs)} images; cycling through them")
    inputs = list(itertools.islice(itertools.cycle(inputs), needed))
    return [inputs[i : i + batch_size] for i in range(0, needed, batch_size)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_loop(
    device: torch.device, step: Callable[[], int], num_steps: int, warmup: int, unit: str
) -> Tuple[List[float], List[int]]:
    """Runs ``step()`` (returning its number of units) ``warmup + num_steps`` times.

    Returns the seconds per unit and the compute threads of each timed step; resets CUDA's peak
    memory after the warm-up.
    """
    seconds, threads = [], []
    for index in range(warmup + num_steps):
        if index == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        num_threads = torch.get_num_threads()
        _synchronize(device)
        start = time.perf_counter()
        units = step()
        _synchronize(device)
        elapsed = (time.perf_counter() - start) / units
        if index >= warmup:
            seconds.append(elapsed)
            threads.append(num_threads)
            label = f"iteration {index - warmup + 1}/{num_steps}"
        else:
            label = f"warm-up {index + 1}/{warmup}"
        logger.info(f"{label}: {1000 * elapsed:.1f} ms/{unit} ({num_threads} threads)")
    return seconds, threads


def _cuda_peak_mb(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1024**2


def time_inference(
    model, batches: Sequence[List[Dict]], warmup: int, *, amp_dtype: Optional[torch.dtype] = None
) -> Dict:
    """Runs ``model`` on every batch without gradients; times all but the first ``warmup``.

    Args:
        model: a Detectron2 model in eval mode.
        batches: lists of model inputs (dicts with ``image``).
        warmup: number of leading batches not timed.
        amp_dtype: run under ``torch.autocast`` to this dtype; None: full precision.

    Returns:
        ``latency_ms_median`` / ``_mean`` / ``_min`` per image (a batch's time divided by its
        size), ``images_per_s`` and ``cuda_max_memory_allocated_mb`` (None off CUDA).
    """
    device = next(model.parameters()).device

    batch_iter = iter(batches)

    def step():
        batch = next(batch_iter)
        model(batch)
        return len(batch)

    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    with torch.no_grad(), autocast:
        seconds, _ = _timed_loop(device, step, len(batches) - warmup, warmup, "image")
    return {**_latency_summary(seconds), "cuda_max_memory_allocated_mb": _cuda_peak_mb(device)}


def _latency_summary(seconds: Sequence[float]) -> Dict:
    per_image_ms = [1000 * s for s in seconds]
    return {
        "latency_ms_median": statistics.median(per_image_ms),
        "latency_ms_mean": statistics.fmean(per_image_ms),
        "latency_ms_min": min(per_image_ms),
        "images_per_s": 1000 / statistics.fmean(per_image_ms),
    }


def time_exported(
    run: Callable[[Tensor, Tensor], Sequence],
    batches: Sequence[Tuple[Tensor, Tensor]],
    warmup: int,
) -> Dict:
    """Times an exported graph (:func:`dino_d2.export.exporter.load_exported`) like
    :func:`time_inference` times the model: on every ``(images, image_sizes)`` batch, all but
    the first ``warmup`` timed.

    Returns:
        ``latency_ms_median`` / ``_mean`` / ``_min`` per image and ``images_per_s``.
    """
    batch_iter = iter(batches)

    def step():
        images, image_sizes = next(batch_iter)
        run(images, image_sizes)
        return len(images)

    seconds, _ = _timed_loop(torch.device("cpu"), step, len(batches) - warmup, warmup, "image")
    return _latency_summary(seconds)


def sgemm_gmacs(device="cpu", size: int = 4096, repeats: int = 5) -> float:
    """This machine's float32 matrix-multiply rate, in GMAC/s (10^9 multiply-adds a second).

    The median of ``repeats`` timed ``torch.mm`` of two ``size`` x ``size`` matrices (after one
    untimed), with the current thread count: the rate no convolution or linear layer of the same
    precision can beat on this machine.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(size, size, generator=generator).to(device)
    b = torch.rand(size, size, generator=generator).to(device)
    seconds = []
    for index in range(repeats + 1):
        _synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _synchronize(device)
        if index:
            seconds.append(time.perf_counter() - start)
    return size**3 / statistics.median(seconds) / 1e9


def matrix_math_limit(model, image: Tensor, latency_s: float) -> Dict:
    """How far an inference is from this machine's matrix-math limit.

    The limit is the model's multiply-accumulates on ``image`` (fvcore's count,
    :func:`dino_d2.engine.flops.count_macs`) done at :func:`sgemm_gmacs`'s rate.

    Args:
        model: the model in eval mode.
        image: (3, H, W) on the model's device.
        latency_s: the measured seconds per image.

    Returns:
        ``gmacs``, ``sgemm_gmacs_per_s``, ``limit_s`` and ``latency_to_limit`` (the ratio).
    """
    with torch.no_grad():
        macs, _ = count_macs(model, image)
    rate = sgemm_gmacs(image.device)
    limit = macs / 1e9 / rate
    return {
        "gmacs": macs / 1e9,
        "sgemm_gmacs_per_s": rate,
        "limit_s": limit,
        "latency_to_limit": latency_s / limit,
    }


class TrainingSetup:
    """The parts of one training step, as ``tools/lazyconfig_train_net.py`` builds them.

    Attributes:
        model: the model, in training mode on its device.
        trainer: a :class:`Trainer` over a data loader that repeats one batch.
        ema: the config's :class:`ModelEMA`, or None when ``train.model_ema`` is off.
        threads: the :class:`AdaptiveThreads` of a CPU training, or None.
    """

    def __init__(
        self,
        model,
        trainer: Trainer,
        ema: Optional[ModelEMA],
        threads: Optional[AdaptiveThreads] = None,
    ):
        self.model = model
        self.trainer = trainer
        self.ema = ema
        self.threads = threads

    def step(self, iteration: int) -> None:
        """One training iteration: the trainer's step, the EMA update, the thread count."""
        self.trainer.iter = iteration
        self.trainer.run_step()
        if self.ema is not None:
            self.ema.update(self.model)
        if self.threads is not None:
            self.threads.update()


def build_training(cfg, batch: List[Dict], device) -> TrainingSetup:
    """Builds the model, the optimizer, the trainer and the EMA of ``cfg`` on ``device``.

    On the CPU the thread count follows the free cores (:class:`AdaptiveThreads`), as in
    ``tools/lazyconfig_train_net.py``, unless the user chose it (:func:`threads_set_by_user`).

    Args:
        cfg: a dino_d2 LazyConfig (``model``, ``optimizer``, ``train.clip_grad``,
            ``train.amp``, ``train.model_ema`` are read).
        batch: the training inputs every step sees (dicts with ``image`` and ``instances``).
        device: where the model lives.
    """
    device = torch.device(device)
    model = instantiate(cfg.model).to(device).train()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    amp_dtype, grad_scaler = None, None
    if cfg.train.amp.enabled:
        amp_dtype, grad_scaler = amp_settings(device, cfg.train.amp.get("precision"))
    clip = cfg.train.clip_grad
    trainer = Trainer(
        model,
        itertools.repeat(batch),
        optimizer,
        clip_grad_max_norm=clip.max_norm if clip.enabled else None,
        clip_grad_norm_type=clip.norm_type,
        amp_dtype=amp_dtype,
        grad_scaler=grad_scaler,
    )
    ema_cfg = cfg.train.model_ema
    ema = ModelEMA(model, decay=ema_cfg.decay) if ema_cfg.enabled else None
    threads = None
    if device.type == "cpu" and threads_set_by_user() is None:
        threads = AdaptiveThreads()
    return TrainingSetup(model, trainer, ema, threads)


def _training_loop(setup: TrainingSetup) -> Callable[[], int]:
    iterations = itertools.count()

    def step():
        setup.step(next(iterations))
        return 1

    return step


def time_training(setup: TrainingSetup, num_iter: int, warmup: int) -> Dict:
    """Times ``warmup + num_iter`` training steps of ``setup``; the first ``warmup`` are not timed.

    Returns:
        ``step_s_median`` / ``_mean`` / ``_min`` (seconds per step), ``threads`` (the compute
        threads of each timed step), ``total_loss`` (of the last step, a sanity figure: it
        must be finite) and ``cuda_max_memory_allocated_mb`` (None off CUDA).
    """
    device = next(setup.model.parameters()).device
    with EventStorage(0) as storage:
        setup.trainer.storage = storage
        seconds, threads = _timed_loop(device, _training_loop(setup), num_iter, warmup, "step")
        total_loss = storage.history("total_loss").latest()
    return {
        "step_s_median": statistics.median(seconds),
        "step_s_mean": statistics.fmean(seconds),
        "step_s_min": min(seconds),
        "threads": threads,
        "total_loss": total_loss,
        "cuda_max_memory_allocated_mb": _cuda_peak_mb(device),
    }


def _settle(step: Callable[[], int], seconds: float) -> int:
    """Runs untimed steps for at least ``seconds``; returns how many."""
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    return count


def time_training_idle_and_busy(
    setup: TrainingSetup,
    num_rounds: int,
    warmup: int,
    *,
    block: int = 3,
    busy_processes: int = 1,
    settle_s: float = 5.0,
) -> Dict:
    """Times training steps on this machine as it is, and with ``busy_processes`` cores kept busy.

    Idle and busy blocks alternate (idle, busy, idle, busy, ...), so that a drift of the
    machine's speed affects both alike; the busy processes run during the busy blocks only
    (:func:`busy_cpu`). Each block first runs untimed steps for ``settle_s`` seconds, so that
    the thread count has followed the change (:class:`AdaptiveThreads` steps down within about
    a second and back up after about three), then times ``block`` steps.

    Returns:
        ``step_s_median`` / ``_min`` and ``threads`` of the idle steps, ``busy_step_s_median``
        / ``_min`` and ``busy_threads`` of the busy ones, ``busy_ratio`` (busy median / idle
        median), ``busy_ratio_per_round`` (the same ratio for each pair of blocks, to show the
        spread), ``busy_processes``, ``settle_steps`` (untimed steps, in total),
        ``others_cpus_idle`` / ``_busy`` (for each timed block, the CPUs that other processes
        used meanwhile, the busy ones included; None without ``/proc/stat``: an "idle" block
        with other load was not idle), ``total_loss`` (of the last step) and
        ``cuda_max_memory_allocated_mb`` (None off CUDA).
    """
    device = next(setup.model.parameters()).device
    idle, idle_threads, busy, busy_threads, rounds = [], [], [], [], []
    others = {"idle": [], "busy": []}
    monitor = CpuLoadMonitor()
    settle_steps = 0

    def timed_block(kind):
        monitor.sample()
        seconds, threads = _timed_loop(device, step, block, 0, "step")
        load = monitor.sample()
        others[kind].append(None if load is None else round(load[1], 2))
        return seconds, threads

    with EventStorage(0) as storage:
        setup.trainer.storage = storage
        step = _training_loop(setup)
        _timed_loop(device, step, 0, warmup, "step")
        for index in range(num_rounds):
            logger.info(f"round {index + 1}/{num_rounds}: idle")
            settle_steps += _settle(step, settle_s)
            idle_block, threads = timed_block("idle")
            idle += idle_block
            idle_threads += threads
            logger.info(f"round {index + 1}/{num_rounds}: {busy_processes} busy process(es)")
            with busy_cpu(busy_processes):
                settle_steps += _settle(step, settle_s)
                busy_block, threads = timed_block("busy")
            busy += busy_block
            busy_threads += threads
            rounds.append(statistics.median(busy_block) / statistics.median(idle_block))
        total_loss = storage.history("total_loss").latest()
    return {
        "step_s_median": statistics.median(idle),
        "step_s_min": min(idle),
        "threads": idle_threads,
        "busy_step_s_median": statistics.median(busy),
        "busy_step_s_min": min(busy),
        "busy_threads": busy_threads,
        "busy_ratio": statistics.median(busy) / statistics.median(idle),
        "busy_ratio_per_round": rounds,
        "busy_processes": busy_processes,
        "settle_steps": settle_steps,
        "others_cpus_idle": others["idle"],
        "others_cpus_busy": others["busy"],
        "total_loss": total_loss,
        "cuda_max_memory_allocated_mb": _cuda_peak_mb(device),
    }


# Spins until its parent is gone, so that a killed benchmark leaves no busy process behind.
_SPIN = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass\n"


@contextlib.contextmanager
def busy_cpu(num_processes: int = 1, settle_s: float = 0.5) -> Iterator[List[int]]:
    """Keeps ``num_processes`` cores busy with spinning Python processes while inside.

    The processes are ordinary, unpinned and of normal priority, as another user's job would be;
    they are killed on exit, also when the body raises.

    Args:
        num_processes: number of spinning processes (each takes one core).
        settle_s: seconds to wait after starting them, so that they run before the body starts.

    Yields:
        their process ids.
    """
    processes = [
        subprocess.Popen([sys.executable, "-c", _SPIN], stdin=subprocess.DEVNULL)
        for _ in range(num_processes)
    ]
    try:
        time.sleep(settle_s)
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"the busy process exited with code {process.returncode}")
        yield [process.pid for process in processes]
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait()
