"""tools/lazyconfig_train_net.py end to end, as a user runs it, on a tiny digits dataset (CPU)."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from detectron2.config import LazyConfig

from dino_d2.data.digits import generate_digits_dataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "tools", "lazyconfig_train_net.py")
CONFIG = os.path.join(REPO, "configs", "dino_r18_digits.py")

# The digits config shrunk to seconds per run: 1 + 1 layers, 10 queries, 32 channels, 64-pixel
# images, batches of 2, no data-loader workers.
TINY = [
    "model.transformer.encoder.num_layers=1",
    "model.transformer.decoder.num_layers=1",
    "model.transformer.query_selection.num_queries=10",
    "model.transformer.embed_dim=32",
    "model.transformer.position_embedding.num_pos_feats=16",
    "model.backbone.num_groups=8",
    "model.transformer.encoder.layer.ffn_dim=64",
    "model.transformer.decoder.layer.ffn_dim=64",
    "model.denoising.dn_number=4",
    "model.num_select=20",
    "dataloader.train.mapper.augmentations.min_sizes=[64]",
    "dataloader.train.mapper.augmentations.max_size=64",
    "dataloader.train.mapper.augmentations.crop_resize_sizes=[64]",
    "dataloader.train.mapper.augmentations.crop_size=[48,64]",
    "dataloader.test.mapper.augmentations.min_size=64",
    "dataloader.test.mapper.augmentations.max_size=64",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    "train.log_period=1",
    "train.eval_period=0",
    "train.checkpointer.period=2",
    "train.model_ema.enabled=True",
    "train.model_ema.decay=0.9",
    "train.model_ema.use_for_eval=True",
]


def run(tmp_path, output_dir, *args):
    """Runs the script; returns its console output. The evaluator keeps its predictions."""
    command = [sys.executable, SCRIPT, "--config-file", CONFIG, *args]
    command += [f"train.output_dir={output_dir}", f"dataloader.evaluator.output_dir={output_dir}"]
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    return output


def metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def train_iterations(output_dir):
    return [m["iteration"] for m in metrics(output_dir) if "total_loss" in m]


def final_eval(output_dir):
    evals = [m for m in metrics(output_dir) if "bbox/AP" in m]
    return {k: v for k, v in evals[-1].items() if k.startswith("bbox/")}


def checkpoint(output_dir, name):
    return torch.load(os.path.join(output_dir, name), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = generate_digits_dataset(
        tmp_path_factory.mktemp("tools") / "digits",
        num_train=8,
        num_val=4,
        image_size=64,
        log_every=0,
    )
    return [
        f"dataset.train_json={root}/annotations/train.json",
        f"dataset.train_images={root}/train",
        f"dataset.test_json={root}/annotations/val.json",
        f"dataset.test_images={root}/val",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """Four iterations with checkpoints every 2 and a final evaluation (EMA weights)."""
    tmp_path = tmp_path_factory.mktemp("trained")
    output_dir = str(tmp_path / "out")
    output = run(tmp_path, output_dir, "train.max_iter=4", *TINY, *data)
    return output_dir, output


def test_training_writes_checkpoints_metrics_and_config(trained):
    output_dir, output = trained
    files = set(os.listdir(output_dir))
    assert {"model_0000001.pth", "model_0000003.pth", "model_final.pth"} <= files
    assert {"metrics.json", "config.yaml", "log.txt", "last_checkpoint"} <= files
    assert any(f.startswith("events.out.tfevents") for f in files)
    assert train_iterations(output_dir) == [0, 1, 2, 3]
    first = metrics(output_dir)[0]
    assert {"total_loss", "loss_class", "loss_bbox_dn", "lr", "grad_norm", "data_time"} <= set(
        first
    )
    # Clipping is on (max_norm 0.1) and active: the logged norm is the one before clipping.
    assert first["grad_norm"] > 0.1
    assert "bbox/AP50" in final_eval(output_dir)
    assert "eta:" in output and "EMA started from the model's weights" in output
    final = checkpoint(output_dir, "model_final.pth")
    assert final["iteration"] == 3 and final["ema"]["num_updates"] == 4
    ema_weight = final["ema"]["model"]["transformer.level_embed"]
    assert not torch.equal(ema_weight, final["model"]["transformer.level_embed"])
    saved = LazyConfig.load(os.path.join(output_dir, "config.yaml"))
    assert saved.model.num_classes == 10 and saved.dataloader.train.dataset.names == "custom_train"


def test_resume_continues_from_the_last_checkpoint_with_its_ema(trained, data, tmp_path):
    output_dir = str(tmp_path / "out")
    shutil.copytree(trained[0], output_dir)
    output = run(tmp_path, output_dir, "--resume", "train.max_iter=6", *TINY, *data)
    assert "Starting training from iteration 4" in output
    assert "EMA restored from the checkpoint (4 updates)" in output
    assert train_iterations(output_dir) == [0, 1, 2, 3, 4, 5]
    resumed = checkpoint(output_dir, "model_0000005.pth")
    assert resumed["iteration"] == 5
    # 4 updates before the resume, 2 after: the average was continued, not restarted.
    assert resumed["ema"]["num_updates"] == 6
    with open(os.path.join(output_dir, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"
    assert checkpoint(output_dir, "model_final.pth")["iteration"] == 5


def test_eval_only_reproduces_the_final_evaluation(trained, data, tmp_path):
    train_dir = trained[0]
    output_dir = str(tmp_path / "eval")
    checkpoint_file = os.path.join(train_dir, "model_final.pth")
    output = run(
        tmp_path,
        output_dir,
        "--eval-only",
        f"train.init_checkpoint={checkpoint_file}",
        *TINY,
        *data,
    )
    assert "Loading ema from" in output
    with open(os.path.join(output_dir, "eval_results.json")) as f:
        results = {f"bbox/{k}": v for k, v in json.load(f)["bbox"].items()}
    expected = final_eval(train_dir)
    assert results.keys() == expected.keys()
    for key, value in expected.items():
        assert value == results[key] or (math.isnan(value) and math.isnan(results[key])), key
    # The same detections, to the last digit (the metrics of an untrained model are mostly 0).
    with open(os.path.join(train_dir, "coco_instances_results.json")) as f:
        trained_predictions = json.load(f)
    with open(os.path.join(output_dir, "coco_instances_results.json")) as f:
        assert json.load(f) == trained_predictions
    assert len(trained_predictions) == 4 * 20


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs 2 GPUs or none"
)
def test_two_processes(data, tmp_path):
    output_dir = str(tmp_path / "out")
    run(
        tmp_path,
        output_dir,
        "--num-gpus",
        "2",
        "--dist-url",
        "auto",
        "train.max_iter=2",
        *TINY,
        *data,
    )
    with open(os.path.join(output_dir, "log.txt")) as f:
        assert "World size: 2" in f.read()
    assert os.path.isfile(os.path.join(output_dir, "log.txt.rank1"))
    assert train_iterations(output_dir) == [0, 1]
    assert checkpoint(output_dir, "model_final.pth")["iteration"] == 1
    assert "bbox/AP" in final_eval(output_dir)
