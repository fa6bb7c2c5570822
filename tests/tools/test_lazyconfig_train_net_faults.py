"""tools/lazyconfig_train_net.py when things go wrong: a job killed mid-checkpoint, reproducible
runs, evaluation that does not depend on the batch size.

Runs the script on the tiny digits set of test_lazyconfig_train_net.py (same helpers, same data).
"""

import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from test_lazyconfig_train_net import (  # noqa: F401 (data is a fixture)
    CONFIG,
    REPO,
    SCRIPT,
    TINY,
    checkpoint,
    data,
    metrics,
    run,
)

from detectron2.config import LazyConfig, instantiate

from dino_d2.utils.atomic import WRITE_DELAY_ENV
from dino_d2.data.digits import generate_digits_dataset

# A warm-up over half of the 8 iterations, so that a schedule restarted at the resume would show.
SCHEDULE = ["train.max_iter=8", "lr_multiplier.warmup_length=0.5"]


def logged_lrs(output_dir):
    """{iteration: lr} of metrics.json (the last record wins when an iteration was repeated)."""
    return {m["iteration"]: m["lr"] for m in metrics(output_dir) if "lr" in m}


def expected_lr(iteration, max_iter=8):
    cfg = LazyConfig.load(CONFIG)
    cfg.lr_multiplier.warmup_length = 0.5
    return cfg.optimizer.lr * instantiate(cfg.lr_multiplier)(iteration / max_iter)


def wait_for(condition, process, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            output = process.stdout.read()
            raise AssertionError(f"training ended early ({process.returncode}):\n{output[-5000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the training run")
        time.sleep(0.02)


def test_killed_while_saving_resumes_from_the_last_complete_checkpoint(data, tmp_path):
    output_dir = str(tmp_path / "out")
    command = [sys.executable, SCRIPT, "--config-file", CONFIG, *SCHEDULE, *TINY, *data]
    command += [f"train.output_dir={output_dir}", f"dataloader.evaluator.output_dir={output_dir}"]
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    # Every checkpoint write pauses 2 s between the complete temporary file and its rename.
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **{WRITE_DELAY_ENV: "2"})
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pointer = os.path.join(output_dir, "last_checkpoint")

    def first_checkpoint_tagged():
        return os.path.isfile(pointer) and open(pointer).read() == "model_0000001.pth"

    def second_checkpoint_being_written():
        return bool(glob.glob(os.path.join(output_dir, ".model_0000003.pth.*.tmp")))

    try:
        wait_for(first_checkpoint_tagged, process)
        wait_for(second_checkpoint_being_written, process)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL

    # Killed after the temporary file was complete, before its rename: the real name does not
    # exist and the pointer still names the last complete checkpoint.
    assert not os.path.exists(os.path.join(output_dir, "model_0000003.pth"))
    with open(pointer) as f:
        assert f.read() == "model_0000001.pth"
    last = checkpoint(output_dir, "model_0000001.pth")
    assert {"model", "trainer", "ema", "iteration"} <= set(last)
    assert {"optimizer", "hooks"} <= set(last["trainer"])  # hooks: the LR scheduler's state
    assert last["iteration"] == 1 and last["ema"]["num_updates"] == 2

    output = run(tmp_path, output_dir, "--resume", *SCHEDULE, *TINY, *data)
    assert "Starting training from iteration 2" in output
    assert "EMA restored from the checkpoint (2 updates)" in output
    final = checkpoint(output_dir, "model_final.pth")
    assert final["iteration"] == 7
    # 2 EMA updates and optimizer steps before the kill, 6 after: both were continued.
    assert final["ema"]["num_updates"] == 8
    steps = {int(state["step"]) for state in final["trainer"]["optimizer"]["state"].values()}
    assert steps == {8}
    # The learning rate follows the schedule of the whole run across the resume.
    lrs = logged_lrs(output_dir)
    assert sorted(lrs) == list(range(8))
    for iteration, lr in lrs.items():
        assert lr == pytest.approx(expected_lr(iteration), rel=1e-6), iteration
    assert len(set(lrs.values())) > 4  # the warm-up really varies the rate
    with open(pointer) as f:
        assert f.read() == "model_final.pth"
    # The killed write's temporary file was removed by the resumed job's first save.
    assert "left by an interrupted checkpoint write" in output
    assert not glob.glob(os.path.join(output_dir, ".*.tmp"))
    assert torch.equal(
        final["model"]["transformer.level_embed"],
        checkpoint(output_dir, "model_0000007.pth")["model"]["transformer.level_embed"],
    )


def test_fixed_seed_gives_identical_runs_on_the_cpu(data, tmp_path):
    """train.seed (0 in the digits config) seeds the weights, the sampler's order, the
    augmentations and the denoising noise: two runs of 20 iterations are the same to the bit."""
    runs = []
    for name in ("a", "b"):
        output_dir = str(tmp_path / name)
        run(
            tmp_path,
            output_dir,
            "train.max_iter=20",
            *TINY,
            "train.seed=1234",
            "train.checkpointer.period=100",
            *data,
        )
        records = [m for m in metrics(output_dir) if "total_loss" in m]
        losses = [{k: v for k, v in m.items() if k.startswith(("loss", "total"))} for m in records]
        runs.append((losses, checkpoint(output_dir, "model_final.pth")))
    (losses_a, final_a), (losses_b, final_b) = runs
    assert [m["total_loss"] for m in losses_a] == [m["total_loss"] for m in losses_b]
    assert losses_a == losses_b and len(losses_a) == 20
    # metrics.json smooths the losses; the weights after 20 updates show every step was equal.
    assert final_a["model"].keys() == final_b["model"].keys()
    for name, value in final_a["model"].items():
        assert torch.equal(value, final_b["model"][name]), name
    # And a different seed really changes the run.
    output_dir = str(tmp_path / "c")
    run(tmp_path, output_dir, "train.max_iter=1", *TINY, "train.seed=99", *data)
    assert metrics(output_dir)[0]["total_loss"] != losses_a[0]["total_loss"]


CROPS = [(64, 64), (64, 48), (48, 64), (56, 40), (40, 56), (64, 52), (52, 36), (60, 60)]


@pytest.fixture(scope="module")
def mixed_size_data(tmp_path_factory):
    """Eight 64-px digits images cropped to eight different sizes (boxes clipped to the crop)."""
    root = generate_digits_dataset(
        tmp_path_factory.mktemp("mixed") / "digits",
        num_train=2,
        num_val=8,
        image_size=64,
        log_every=0,
    )
    path = os.path.join(root, "annotations", "val.json")
    with open(path) as f:
        coco = json.load(f)
    sizes = {}
    for i, image in enumerate(coco["images"]):
        width, height = CROPS[i]
        file_name = os.path.join(root, "val", image["file_name"])
        Image.open(file_name).crop((0, 0, width, height)).save(file_name)
        image["width"], image["height"] = sizes[image["id"]] = width, height
    kept = []
    for annotation in coco["annotations"]:
        width, height = sizes[annotation["image_id"]]
        x, y, w, h = annotation["bbox"]
        w, h = min(x + w, width) - x, min(y + h, height) - y
        if w >= 2 and h >= 2:
            annotation["bbox"], annotation["area"] = [x, y, w, h], w * h
            kept.append(annotation)
    coco["annotations"] = kept
    with open(path, "w") as f:
        json.dump(coco, f)
    assert len(set(sizes.values())) == 8 and kept
    return [
        f"dataset.train_json={root}/annotations/train.json",
        f"dataset.train_images={root}/train",
        f"dataset.test_json={path}",
        f"dataset.test_images={root}/val",
    ]


def test_box_ap_does_not_depend_on_the_test_batch_size(mixed_size_data, tmp_path):
    """The same randomly initialized model (train.seed) evaluated with batches of 1 and of 4
    images of different sizes: the same detections and the same box AP."""
    results = {}
    for batch_size in (1, 4):
        output_dir = str(tmp_path / f"batch{batch_size}")
        run(
            tmp_path,
            output_dir,
            "--eval-only",
            *TINY,
            "train.init_checkpoint=",
            "train.model_ema.enabled=False",
            # Exactness across batch sizes is a float32 property: bfloat16 rounds padded and
            # unpadded batches differently (scores moved by 4e-4 here).
            "train.amp.eval_precision=float32",
            f"dataloader.test.batch_size={batch_size}",
            *mixed_size_data,
        )
        with open(os.path.join(output_dir, "eval_results.json")) as f:
            ap = json.load(f)["bbox"]
        with open(os.path.join(output_dir, "coco_instances_results.json")) as f:
            detections = sorted(json.load(f), key=lambda d: (d["image_id"], -d["score"]))
        results[batch_size] = ap, detections
    (ap_1, detections_1), (ap_4, detections_4) = results[1], results[4]
    assert ap_1.keys() == ap_4.keys()
    for key, value in ap_1.items():
        assert value == ap_4[key] or (math.isnan(value) and math.isnan(ap_4[key])), key
    assert len(detections_1) == len(detections_4) == 8 * 20
    for one, batched in zip(detections_1, detections_4):
        assert one["image_id"] == batched["image_id"]
        assert one["category_id"] == batched["category_id"]
        assert batched["score"] == pytest.approx(one["score"], abs=1e-5)
        assert batched["bbox"] == pytest.approx(one["bbox"], abs=1e-3)
