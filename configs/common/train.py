# What tools/lazyconfig_train_net.py reads, with DINO's defaults.
train = dict(
    output_dir="./output/dino",
    init_checkpoint="",
    max_iter=90000,
    # Mixed precision: precision="auto" trains under bfloat16 autocast where the device computes
    # bfloat16 natively (AVX512-BF16 / AMX CPUs, Ampere+ GPUs) and in float32 elsewhere;
    # "bfloat16" / "float16" force one; enabled=False trains in float32 everywhere.
    # eval_precision: evaluation's and the demo's, read as precision is ("auto": bfloat16 where
    # native, float32 elsewhere; "float32" forces float32). The digits demo's checkpoint gives
    # box AP 60.39 evaluated in bfloat16 against 60.31 in float32.
    amp=dict(enabled=True, precision="auto", eval_precision="auto"),
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
