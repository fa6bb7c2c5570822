"""Train or evaluate a dino_d2 LazyConfig with Detectron2's standard training loop.

The command line is Detectron2's (``default_argument_parser``)::

    # train (CUDA when available, else the CPU); add --resume to continue from output_dir
    python tools/lazyconfig_train_net.py --config-file configs/dino_r18_digits.py
    # evaluate a checkpoint
    python tools/lazyconfig_train_net.py --config-file configs/dino_r18_digits.py --eval-only \\
        train.init_checkpoint=output/digits/model_final.pth
    # any config value: key=value overrides
    python tools/lazyconfig_train_net.py --config-file ... train.max_iter=500 optimizer.lr=1e-4

``--num-gpus N`` starts N processes (torch's elastic agent): one per GPU with NCCL, or, on a
machine without CUDA, N CPU processes with Gloo (each gets an equal share of the CPU threads).
The total batch ``dataloader.train.total_batch_size`` is split between them. Started by
``torchrun``, ``srun`` or submitit (``tools/submit_slurm.py``), the script joins their job
instead, and a restarted or requeued job resumes from ``train.output_dir`` without ``--resume``
(``dino_d2.engine.launch``, ``dino_d2.engine.job_env``).

A COCO-format dataset can be used without writing Python::

    ... dataset.train_json=train.json dataset.train_images=train/ \\
        dataset.test_json=val.json dataset.test_images=val/

registers them (as ``custom_train`` / ``custom_test``), points the data loaders and the evaluator
at them and sets ``model.num_classes`` from the json's categories. Builtin dataset names used by
the config, such as ``digits_train`` / ``digits_val``, are registered automatically (the digits
dataset is generated under ``$DETECTRON2_DATASETS/digits``, else ``datasets/digits``, if missing).

Besides Detectron2's keys of ``train`` (see configs/common/train.py), the script reads
``train.clip_grad`` (full-model gradient clipping), ``train.model_ema`` (weight EMA, saved in
the checkpoints under ``"ema"``; ``use_for_eval`` evaluates with the averaged weights) and
``train.amp`` (``enabled=False``: float32; else ``precision``: ``auto``, the default,
trains under bfloat16 autocast where the device computes bfloat16 natively, AVX512-BF16 or AMX
on the CPU, Ampere or later on CUDA, and in float32 elsewhere, as the log says;
``bfloat16`` or ``float16`` force that precision, float16 on CUDA only, with a GradScaler) and ``train.init_class_map`` (optional: the name of a
``dino_d2.checkpoint.class_map`` map, e.g. ``objects365_v2_to_coco``; training from
``train.init_checkpoint`` then gathers its class heads by that map; not on ``--resume``, not
with ``--eval-only``). ``--eval-only`` evaluates ``train.init_checkpoint`` (the last
checkpoint of ``train.output_dir`` with ``--resume``) and writes ``output_dir/eval_results.json``.

Checkpoints are read without running code they may carry (``dino_d2.checkpoint.loading``): one
holding Python objects other than tensors, numbers and containers stops the job with an error
naming the file and the object, unless ``--unsafe-load`` is given (for files you trust). A yaml
``--config-file`` is read as data; a ``.py`` config is code and runs.

Checkpoints are written atomically (``dino_d2.checkpoint.AtomicCheckpointer``): a job killed at any
moment resumes with ``--resume`` from its last complete checkpoint; a full disk loses nothing.
``model.num_classes`` is checked against the datasets' categories at start-up; a process that
fails stops every process of the job (``dino_d2.engine.launch``). See README.md, "What to expect
when things go wrong".
"""

import logging
import os
import sys
from contextlib import contextmanager, nullcontext

import torch
from omegaconf import ListConfig

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser, hooks
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.registry import locate

from dino_d2._compat import fast_coco_eval_available
from dino_d2.checkpoint import AtomicCheckpointer, add_unsafe_load_argument
from dino_d2.checkpoint.class_map import get_class_map
from dino_d2.data import (
    apply_dataset_overrides,
    check_num_classes,
    pop_dataset_overrides,
    register_config_datasets,
)
from dino_d2.engine import (
    EvalHook,
    ModelEMA,
    TrainOptions,
    build_training,
    default_setup,
    default_writers,
    describe_precision,
    inference_autocast,
    inference_dtype,
    launch,
    resolve_device,
)
from dino_d2.engine.job_env import resume_after_restart
from dino_d2.layers.fast_path import optimized_copy
from dino_d2.model_zoo import load_config_file
from dino_d2.utils import write_json
from dino_d2.utils.allocator import keep_freed_memory

logger = logging.getLogger("detectron2")

EPILOG = """
dino_d2 additions:
  --num-gpus N without CUDA runs N CPU processes (Gloo).
  dataset.train_json=... dataset.train_images=... dataset.test_json=... dataset.test_images=...
      train/evaluate on COCO-format datasets; model.num_classes follows their categories.
  dataset.skip_bad_annotations=True
      skip their malformed annotations with one warning instead of stopping.
  dataset.cache=False
      read the jsons whole with Python's json instead of through their memory-mapped cache
      (converted once, streamed, beside the json or under $DINO_D2_CACHE; any size fits).
  dataset.allow_images_outside_root=True
      read image paths that leave the image folder (../x.jpg, /abs/x.jpg) as given, with one
      warning, instead of stopping.
  --unsafe-load
      load checkpoints holding Python objects (full unpickling: only files you trust).
Examples:
  %(prog)s --config-file configs/dino_r18_digits.py
  %(prog)s --config-file configs/dino_r18_digits.py --resume
  %(prog)s --config-file configs/dino_r18_digits.py --eval-only train.init_checkpoint=model.pth
  %(prog)s --num-gpus 8 --config-file configs/dino_r50_4scale_12ep.py
"""


def use_slow_coco_eval_if_needed(cfg) -> None:
    """Makes every COCOEvaluator of the config use pycocotools when Detectron2 has no fast one."""
    if fast_coco_eval_available() or "evaluator" not in cfg.dataloader:
        return
    evaluators = cfg.dataloader.evaluator
    for evaluator in evaluators if isinstance(evaluators, ListConfig) else [evaluators]:
        target = evaluator.get("_target_")
        target = locate(target) if isinstance(target, str) else target
        if isinstance(target, type) and issubclass(target, COCOEvaluator):
            evaluator.use_fast_impl = False


def do_test(cfg, model, ema=None):
    """Evaluates ``model`` (with the averaged weights of ``ema`` if given) on the test loader,
    through a copy with the inference fast path applied (the model itself, which training goes
    on with, is not transformed), in ``train.amp.eval_precision``."""
    if "evaluator" not in cfg.dataloader:
        return {}
    with ema.applied_to(model) if ema is not None else nullcontext():
        evaluated = optimized_copy(model)
    precision = TrainOptions.from_config(cfg.train).amp.eval_precision
    device = next(model.parameters()).device
    dtype = inference_dtype(device, precision)
    logger.info(f"Evaluation in {dtype or torch.float32} (train.amp.eval_precision={precision!r})")
    with inference_autocast(device, precision):
        results = inference_on_dataset(
            evaluated, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
        )
    if comm.is_main_process():
        print_csv_format(results)
    return results


def build_model(cfg, device):
    model = instantiate(cfg.model)
    logger.info(f"Model:\n{model}")
    return model.to(device)


def load_initial_weights(
    checkpointer: AtomicCheckpointer, options: TrainOptions, resume: bool
) -> None:
    """Loads the weights training starts from.

    With ``resume`` and a checkpoint in the output folder, that checkpoint (model, optimizer,
    iteration, ...). Otherwise ``train.init_checkpoint`` (model weights only); when
    ``train.init_class_map`` names a class map, its class heads are gathered by that map
    (:meth:`dino_d2.checkpoint.AtomicCheckpointer.load_with_class_map`).

    Args:
        checkpointer: the training's checkpointer.
        options: the config's ``train`` options.
        resume: ``--resume`` was given.

    Raises:
        KeyError: ``train.init_class_map`` is not a known class map.
        ValueError: ``train.init_class_map`` is set without ``train.init_checkpoint``, or the
            checkpoint's or the model's class heads do not have the map's sizes.
    """
    name = options.init_class_map
    class_map = get_class_map(name) if name else None
    if class_map is None or (resume and checkpointer.has_checkpoint()):
        checkpointer.resume_or_load(options.init_checkpoint, resume=resume)
    elif not options.init_checkpoint:
        raise ValueError(
            f"train.init_class_map={name!r} needs train.init_checkpoint: the checkpoint whose "
            "class heads it maps"
        )
    else:
        checkpointer.load_with_class_map(options.init_checkpoint, class_map)


def do_train(args, cfg, device):
    """Trains: the step of :func:`dino_d2.engine.build_training` (the one ``tools/benchmark.py
    --train`` times), with the job's checkpoints, evaluations and metric files."""
    training = build_training(cfg, device, model=build_model(cfg, device))
    model, trainer, ema, options = training.model, training.trainer, training.ema, training.options
    if options.amp.enabled:
        logger.info(describe_precision(device, trainer.amp_dtype, trainer.grad_scaler))
    else:
        logger.info("float32: train.amp.enabled=False")
    checkpointables = {"trainer": trainer}
    if ema is not None:
        checkpointables["ema"] = ema
    checkpointer = AtomicCheckpointer(
        model, options.output_dir, unsafe_load=args.unsafe_load, **checkpointables
    )
    eval_ema = ema if ema is not None and options.model_ema.use_for_eval else None
    trainer.register_hooks(
        [
            (
                hooks.PeriodicCheckpointer(checkpointer, **options.checkpointer)
                if comm.is_main_process()
                else None
            ),
            EvalHook(options.eval_period, lambda: do_test(cfg, model, eval_ema)),
            (
                hooks.PeriodicWriter(
                    default_writers(options.output_dir, options.max_iter),
                    period=options.log_period,
                )
                if comm.is_main_process()
                else None
            ),
        ]
    )

    load_initial_weights(checkpointer, options, args.resume)
    # A checkpoint stores the iteration that had just finished.
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, options.max_iter)


def do_eval_only(args, cfg, device):
    options = TrainOptions.from_config(cfg.train)
    model = build_model(cfg, device)
    ema_options = options.model_ema
    ema = None
    if ema_options.enabled and ema_options.use_for_eval:
        ema = ModelEMA(model, decay=ema_options.decay)
    checkpointer = AtomicCheckpointer(
        model,
        options.output_dir,
        unsafe_load=args.unsafe_load,
        **({"ema": ema} if ema is not None else {}),
    )
    if args.resume and checkpointer.has_checkpoint():
        path = checkpointer.get_checkpoint_file()
    else:
        path = options.init_checkpoint
    checkpointer.load(path)
    if ema is not None and not ema.restored:
        logger.warning(f"{path} has no EMA weights; evaluating the model's own weights")
        ema = None
    results = do_test(cfg, model, ema)
    if comm.is_main_process():
        path = os.path.join(options.output_dir, "eval_results.json")
        write_json(path, results)
        logger.info(f"Evaluation results written to {path}")
    return results


@contextmanager
def console_logging(name: str = "dino_d2"):
    """Within the block, the main process prints logger ``name``'s INFO records to the console.

    The datasets of ``dataset.train_json=...`` are registered (a large json converted into its
    cache, which takes minutes) before :func:`default_setup` sets up logging, since the saved
    config needs their number of classes; this says what the job is doing meanwhile. Does
    nothing when the logger already has handlers.
    """
    log = logging.getLogger(name)
    if log.handlers or not comm.is_main_process():
        yield
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s]: %(message)s", "%m/%d %H:%M:%S"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def main(args):
    opts, dataset_overrides = pop_dataset_overrides(args.opts)
    cfg = load_config_file(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, opts)
    with console_logging():
        apply_dataset_overrides(cfg, dataset_overrides)
    use_slow_coco_eval_if_needed(cfg)
    # torchrun restarted the job, or SLURM requeued it: it continues from its last checkpoint.
    options = TrainOptions.from_config(cfg.train)
    restart = not args.resume and not args.eval_only and resume_after_restart(options.output_dir)
    args.resume = args.resume or restart
    default_setup(cfg, args)
    # Large activations reuse freed heap memory instead of being page-faulted in on every step.
    keep_freed_memory()
    if restart:
        logger.info("A restarted job: resuming from the last checkpoint of train.output_dir")
    register_config_datasets(cfg)
    check_num_classes(cfg)
    device = resolve_device(options.device)
    logger.info(f"Device: {device}")
    if args.eval_only:
        return do_eval_only(args, cfg, device)
    return do_train(args, cfg, device)


def invoke_main(argv=None) -> None:
    """Parses Detectron2's command line (``argv``, default ``sys.argv[1:]``) and launches
    :func:`main` in ``--num-gpus`` processes on each of ``--num-machines`` machines."""
    parser = default_argument_parser(epilog=EPILOG)
    add_unsafe_load_argument(parser, "train.init_checkpoint and the checkpoints --resume reads")
    args = parser.parse_args(argv)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
