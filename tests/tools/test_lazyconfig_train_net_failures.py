"""tools/lazyconfig_train_net.py when a user's input or the machine fails: each case stops, or
warns, with a message that says where, as a user running the script sees it.

Runs the script on the tiny digits set of test_lazyconfig_train_net.py. The multi-process cases
use faulty_dino.FaultyDINO, which fails in one chosen process at a chosen iteration.
"""

import copy
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from test_lazyconfig_train_net import CONFIG, REPO, SCRIPT, TINY, checkpoint, data  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 300  # seconds; a job that waits for its collective timeout would take 30 minutes


def start(tmp_path, output_dir, *args, launcher=()):
    """Starts the script (flags first in ``args``, then overrides), by ``python *launcher``."""
    command = [sys.executable, *launcher, SCRIPT, "--config-file", CONFIG, *args]
    command += [f"train.output_dir={output_dir}", f"dataloader.evaluator.output_dir={output_dir}"]
    path = os.pathsep.join(p for p in (REPO, HERE, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(*processes):
    """(return code, output) of each process; all are killed if one runs past TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    results = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=max(1, deadline - time.monotonic()))
            results.append((process.returncode, output))
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return results


def run(tmp_path, output_dir, *args):
    return finish(start(tmp_path, output_dir, *args))[0]


def _with_train_json(data, path):  # noqa: F811 (data is the fixture's value here)
    return [f"dataset.train_json={path}"] + [d for d in data if "train_json" not in d]


@pytest.fixture(scope="module")
def coco(data):  # noqa: F811
    with open(data[0].split("=", 1)[1]) as f:
        return json.load(f)


# 1. Errors that say where.


def test_a_truncated_json_stops_naming_file_dataset_and_position(data, coco, tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(coco)[:600])
    code, output = run(
        tmp_path, str(tmp_path / "out"), "train.max_iter=1", *TINY, *_with_train_json(data, path)
    )
    assert code != 0
    assert f"CocoFormatError: {path} (dataset 'custom_train') is not valid JSON: " in output
    assert "line 1, column " in output and "is it truncated" in output


def test_a_malformed_annotation_stops_naming_annotation_and_field(data, coco, tmp_path):
    bad = copy.deepcopy(coco)
    bad["annotations"][2]["bbox"] = "10,10,5,5"
    path = tmp_path / "train.json"
    path.write_text(json.dumps(bad))
    code, output = run(
        tmp_path, str(tmp_path / "out"), "train.max_iter=1", *TINY, *_with_train_json(data, path)
    )
    assert code != 0
    annotation_id = bad["annotations"][2]["id"]
    assert (
        f"{path} (dataset 'custom_train'): annotation id {annotation_id} (annotations[2]): 'bbox' "
        'is "10,10,5,5" (a string); expected a list of 4 numbers [x, y, width, height] in pixels'
    ) in output
    assert "dataset.skip_bad_annotations=True" in output


def test_skipped_annotations_unknown_images_and_a_mistyped_key_are_warned_about(
    data, coco, tmp_path  # noqa: F811
):
    bad = copy.deepcopy(coco)
    bad["annotations"][0]["bbox"] = [1, 2, 3]
    bad["annotations"][1]["category_id"] = "3"
    bad["annotations"][2]["image_id"] = 999
    path = tmp_path / "train.json"
    path.write_text(json.dumps(bad))
    output_dir = str(tmp_path / "out")
    code, output = run(
        tmp_path,
        output_dir,
        "train.max_iter=1",
        "train.max_itr=5",
        *TINY,
        "dataset.skip_bad_annotations=True",
        *_with_train_json(data, path),
    )
    assert code == 0, output[-5000:]
    assert (
        f"{path} (dataset 'custom_train'): 2 malformed annotations skipped (1 with a bad 'bbox', "
        "1 with a bad 'category_id'); 1 annotation dropped: the image_id is not among the images"
    ) in output
    assert output.count("malformed annotations skipped") == 1
    assert "train.max_itr=5 is not read by the training script or by Detectron2's hooks: did " in (
        output
    )
    assert "did you mean train.max_iter?" in output
    assert checkpoint(output_dir, "model_final.pth")["iteration"] == 0


# 2. One failing process stops the whole job.


def _complete_checkpoint(output_dir, expected_iteration):
    with open(os.path.join(output_dir, "last_checkpoint")) as f:
        name = f.read().strip()
    last = checkpoint(output_dir, name)
    assert last["iteration"] == expected_iteration and "model" in last and "trainer" in last
    assert not glob.glob(os.path.join(output_dir, ".*.tmp"))


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs 2 GPUs or none"
)
def test_two_processes_stop_when_one_fails_in_the_last_iteration(data, tmp_path):  # noqa: F811
    """Detectron2's EvalHook used to start the final evaluation in the failed process, whose
    collectives then waited for the other process until the 30-minute timeout."""
    output_dir = str(tmp_path / "out")
    code, output = run(
        tmp_path,
        output_dir,
        "--num-gpus",
        "2",
        "train.max_iter=4",
        *TINY,
        "model._target_=faulty_dino.FaultyDINO",
        "model.fail_rank=0",
        "model.fail_call=4",
        *data,
    )
    assert code != 0
    assert "JobFailedError: The job was stopped: process rank 0 (machine 0, local rank 0" in output
    assert "failed: RuntimeError: injected failure in rank 0 at call 4" in output
    assert "Start inference" not in output
    _complete_checkpoint(output_dir, expected_iteration=1)


def _port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_machines_stop_when_one_has_a_non_finite_loss(data, tmp_path):  # noqa: F811
    url = f"tcp://127.0.0.1:{_port()}"
    faulty = ["model._target_=faulty_dino.FaultyDINO", "model.fail_rank=1", "model.fail_call=3"]
    machines = [
        start(
            tmp_path,
            str(tmp_path / f"out{m}"),
            *("--num-machines", "2", "--machine-rank", str(m), "--num-gpus", "1"),
            *("--dist-url", url, "train.max_iter=8"),
            *TINY,
            *faulty,
            "model.failure=non_finite",
            *data,
        )
        for m in (0, 1)
    ]
    (code_0, output_0), (code_1, output_1) = finish(*machines)
    assert code_0 != 0 and code_1 != 0
    # Machine 0's launcher shows machine 1's error: where, what, and its traceback.
    assert (
        "JobFailedError: The job was stopped: process rank 1 (machine 1, local rank 0, host "
        in (output_0)
    )
    assert "failed: FloatingPointError: Loss became infinite or NaN at iteration 2" in output_0
    traceback = output_0[output_0.index("Its traceback:") :]
    assert "check_losses_finite" in traceback and "FloatingPointError: Loss became" in traceback
    assert "FloatingPointError: Loss became infinite or NaN at iteration 2" in output_1
    _complete_checkpoint(str(tmp_path / "out0"), expected_iteration=1)


# 3. The output folder.


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory, data):  # noqa: F811
    tmp_path = tmp_path_factory.mktemp("previous")
    output_dir = str(tmp_path / "out")
    code, output = run(tmp_path, output_dir, "train.max_iter=2", *TINY, *data)
    assert code == 0, output[-5000:]
    return output_dir


def test_another_config_warns_before_overwriting_and_resume_stops(previous_run, data, tmp_path):
    output_dir = str(tmp_path / "out")
    shutil.copytree(previous_run, output_dir)
    other_model = [*TINY, "model.transformer.embed_dim=64"]
    other_model += ["model.transformer.position_embedding.num_pos_feats=32"]
    code, output = run(tmp_path, output_dir, "--resume", "train.max_iter=3", *other_model, *data)
    assert code != 0
    assert (
        f"OutputDirConflictError: --resume stopped: train.output_dir {output_dir} holds the "
        in (output)
    )
    assert "model.transformer.embed_dim (32 -> 64)" in output
    with open(os.path.join(output_dir, "last_checkpoint")) as f:
        assert f.read() == "model_final.pth"
    code, output = run(tmp_path, output_dir, "train.max_iter=1", *other_model, *data)
    assert code == 0, output[-5000:]
    warning = output.index("holds the checkpoints of another run (last_checkpoint: model_final")
    assert warning < output.index("Starting training from iteration 0")
    assert "use another train.output_dir to keep them" in output


def _user_namespaces():
    try:
        subprocess.run(["unshare", "-Urm", "true"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@pytest.mark.skipif(not _user_namespaces(), reason="needs `unshare -Urm` (a small tmpfs)")
def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(data, tmp_path):  # noqa: F811
    """A real full disk: the run writes to a tmpfs with room for one checkpoint (131 MiB), not
    two."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    kept = tmp_path / "kept"
    command = [sys.executable, SCRIPT, "--config-file", CONFIG, "train.max_iter=4", *TINY, *data]
    command += ["train.model_ema.enabled=False", f"train.output_dir={mount}/out"]
    script = (
        f"mount -t tmpfs -o size=200m tmpfs {mount} || exit 99; "
        f"{subprocess.list2cmdline(command)}; code=$?; cp -a {mount}/out {kept}; exit $code"
    )
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    result = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    output = result.stdout + result.stderr
    assert result.returncode not in (0, 99), output[-5000:]
    assert (
        f"OutputWriteError: Could not write model_0000003.pth in {mount}/out: No space " in output
    )
    assert "The partial file was removed; last_checkpoint still names model_0000001.pth" in output
    assert "free at least" in output
    _complete_checkpoint(str(kept), expected_iteration=1)
    assert not (kept / "model_0000003.pth").exists()


def _can_freeze_folders(tmp_path):
    folder = tmp_path / "probe"
    folder.mkdir()
    try:
        subprocess.run(["chattr", "+i", str(folder)], check=True, capture_output=True)
    except (OSError, subprocess.SubprocessError):
        return False
    subprocess.run(["chattr", "-i", str(folder)], check=True)
    return True


def test_a_folder_that_becomes_read_only_keeps_the_last_checkpoint(data, tmp_path):  # noqa: F811
    """A real refusal: after the first checkpoint the output folder is made immutable
    (``chattr +i``, which stops root too), so no new file can be created in it."""
    if not _can_freeze_folders(tmp_path):
        pytest.skip("needs `chattr +i` (root, on a file system with immutable folders)")
    output_dir = tmp_path / "out"
    process = start(tmp_path, str(output_dir), "train.max_iter=6", *TINY, *data)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (output_dir / "last_checkpoint").exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        subprocess.run(["chattr", "+i", str(output_dir)], check=True)
        ((code, output),) = finish(process)
    finally:
        subprocess.run(["chattr", "-i", str(output_dir)], check=True)
        finish(process)
    assert code != 0
    assert f"OutputWriteError: Could not write model_0000003.pth in {output_dir}: " in output
    assert "last_checkpoint still names model_0000001.pth, which is complete" in output
    _complete_checkpoint(str(output_dir), expected_iteration=1)
