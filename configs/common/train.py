# What tools/lazyconfig_train_net.py reads, with DINO's defaults.
train = dict(
    output_dir="./output/dino",
    init_checkpoint="",
    max_iter=90000,
    # Mixed precision: precision="auto" trains under bfloat16 autocast where the device computes
    # bfloat16 natively (AVX512-BF16 / AMX CPUs, Ampere+ GPUs) and in float32 elsewhere;
    # "bfloat16" / "float16" force one; enabled=False trains in float32 everywhere.
    # eval_precision: evaluation's and the demo's ("float32", or "auto" / "bfloat16" / "float16"
    # read as precision is).
    amp=dict(enabled=True, precision="auto", eval_precision="float32"),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    # Full-model gradient clipping; with AMP the gradients are unscaled first.
    clip_grad=dict(enabled=True, max_norm=0.1, norm_type=2.0),
    # Exponential moving average of the weights, checkpointed with the model.
    model_ema=dict(enabled=False, decay=0.9997, use_for_eval=False),
    checkpointer=dict(period=5000, max_to_keep=100),
    eval_period=5000,
    log_period=20,
    seed=-1,
    # None: CUDA when available, else the CPU.
    device=None,
)
