"""tools/lazyconfig_train_net.py on dataset.train_json through the memory-mapped cache (the
default): a short training run whose data loader reads the cache in worker processes, and an
image path outside the image folder refused, then allowed, as a user sees it."""

import json
import os
import shutil

from test_lazyconfig_train_net import TINY, checkpoint, data, run  # noqa: F401
from test_lazyconfig_train_net_failures import run as run_failing

from dino_d2.data.coco_cache import cache_folder, cache_key, is_valid_cache


def _copy(data, tmp_path):  # noqa: F811 (data is the fixture's value here)
    """The digits overrides with the train json copied into tmp_path (its own cache)."""
    source = data[0].split("=", 1)[1]
    path = tmp_path / "train.json"
    shutil.copy(source, path)
    return str(path), [f"dataset.train_json={path}"] + data[1:]


def test_training_reads_the_cache_in_workers(data, tmp_path):  # noqa: F811
    path, overrides = _copy(data, tmp_path)
    output_dir = str(tmp_path / "out")
    workers = ["dataloader.train.num_workers=2", "train.max_iter=2"]
    output = run(tmp_path, output_dir, *TINY, *workers, *overrides)
    # The conversion runs before the job's logging is set up; it is shown all the same.
    assert f"Converting {path} into a memory-mapped cache" in output
    assert f"Converted {path} in " in output
    assert is_valid_cache(os.path.join(cache_folder(path), cache_key(path)), cache_key(path))
    assert checkpoint(output_dir, "model_final.pth")["iteration"] == 1
    # dataset.cache=False reads the json whole; a second run reuses the cache as it is.
    built = os.listdir(cache_folder(path))
    run(
        tmp_path,
        str(tmp_path / "json"),
        *TINY,
        "train.max_iter=1",
        "dataset.cache=False",
        *overrides,
    )
    assert os.listdir(cache_folder(path)) == built


def test_an_image_outside_the_image_folder_is_refused_then_allowed(data, tmp_path):  # noqa: F811
    path, overrides = _copy(data, tmp_path)
    content = json.loads(open(path).read())
    images = os.path.basename(overrides[1].split("=", 1)[1])
    # Leaves the image folder and comes back: the file exists, the path is still refused.
    content["images"][1]["file_name"] = f"../{images}/" + content["images"][1]["file_name"]
    with open(path, "w") as f:
        json.dump(content, f)
    code, output = run_failing(tmp_path, str(tmp_path / "out"), *TINY, *overrides)
    assert code != 0
    image = content["images"][1]
    assert (
        f"CocoFormatError: {path} (dataset 'custom_train'): image id {image['id']}: "
        f"{image['file_name']!r} points outside the image folder"
    ) in output
    assert "dataset.allow_images_outside_root=True" in output
    allowed = ["dataset.allow_images_outside_root=True", "train.max_iter=1"]
    code, output = run_failing(tmp_path, str(tmp_path / "out"), *TINY, *allowed, *overrides)
    assert code == 0, output[-5000:]
    assert output.count("1 image outside the image folder, read as given") == 1
