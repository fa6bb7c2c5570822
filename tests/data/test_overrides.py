"""Datasets given on the command line (dataset.train_json=...) and the config's builtin datasets."""

import json
import os

import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog

from dino_d2.data import (
    CUSTOM_TEST_DATASET,
    CUSTOM_TRAIN_DATASET,
    apply_dataset_overrides,
    builtin,
    builtin_dataset_names,
    pop_dataset_overrides,
    register_builtin_datasets,
    register_config_datasets,
)
from dino_d2.data.coco_cache import cache_key
from dino_d2.data.digits import generate_digits_dataset
from dino_d2.model_zoo import get_config


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("defaults") / "digits"
    return generate_digits_dataset(root, num_train=2, num_val=2, image_size=64, log_every=0)


def _unregister(*names):
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


@pytest.fixture
def custom_names():
    yield
    _unregister(CUSTOM_TRAIN_DATASET, CUSTOM_TEST_DATASET)


def _overrides(root, **replace):
    opts = {
        "train_json": os.path.join(root, "annotations", "train.json"),
        "train_images": os.path.join(root, "train"),
        "test_json": os.path.join(root, "annotations", "val.json"),
        "test_images": os.path.join(root, "val"),
    }
    opts.update(replace)
    return opts


def test_pop_dataset_overrides():
    opts, datasets = pop_dataset_overrides(
        ["train.max_iter=5", "dataset.train_json=a.json", "model.x=1", "dataset.test_images=d"]
    )
    assert opts == ["train.max_iter=5", "model.x=1"]
    assert datasets == {"train_json": "a.json", "test_images": "d"}
    assert pop_dataset_overrides(None) == ([], {})
    with pytest.raises(ValueError, match="unknown dataset override 'dataset.val_json'"):
        pop_dataset_overrides(["dataset.val_json=a"])
    with pytest.raises(ValueError, match="needs a value"):
        pop_dataset_overrides(["dataset.train_json="])
    with pytest.raises(ValueError, match="twice"):
        pop_dataset_overrides(["dataset.train_json=a", "dataset.train_json=b"])
    _, datasets = pop_dataset_overrides(["dataset.skip_bad_annotations=True"])
    assert datasets == {"skip_bad_annotations": True}
    _, datasets = pop_dataset_overrides(["dataset.skip_bad_annotations=false"])
    assert datasets == {"skip_bad_annotations": False}
    with pytest.raises(ValueError, match="takes True or False"):
        pop_dataset_overrides(["dataset.skip_bad_annotations=yes"])
    _, datasets = pop_dataset_overrides(
        ["dataset.cache=False", "dataset.allow_images_outside_root=true"]
    )
    assert datasets == {"cache": False, "allow_images_outside_root": True}


def test_cache_override_reaches_the_registration(digits_root, custom_names):
    cfg = get_config("dino_r18_digits.py")
    apply_dataset_overrides(cfg, _overrides(digits_root))
    assert MetadataCatalog.get(CUSTOM_TRAIN_DATASET).coco_cache.endswith(
        os.path.join("train.json.dino_d2-cache", cache_key(_overrides(digits_root)["train_json"]))
    )
    apply_dataset_overrides(cfg, dict(_overrides(digits_root), cache=False))
    assert MetadataCatalog.get(CUSTOM_TRAIN_DATASET).coco_cache is None
    with pytest.raises(ValueError, match="dataset.cache applies to the datasets of"):
        apply_dataset_overrides(cfg, {"cache": False})


def test_skip_bad_annotations_override_reaches_the_registration(
    digits_root, tmp_path, custom_names
):
    with open(os.path.join(digits_root, "annotations", "train.json")) as f:
        content = json.load(f)
    content["annotations"][0]["bbox"] = "1,2,3,4"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(content))
    cfg = get_config("dino_r18_digits.py")
    overrides = _overrides(digits_root, train_json=str(bad))
    with pytest.raises(ValueError, match="'bbox' is \"1,2,3,4\""):
        apply_dataset_overrides(cfg, overrides)
    apply_dataset_overrides(cfg, dict(overrides, skip_bad_annotations=True))
    kept = sum(len(r["annotations"]) for r in DatasetCatalog.get(CUSTOM_TRAIN_DATASET))
    assert kept == len(content["annotations"]) - 1
    with pytest.raises(ValueError, match="applies to the datasets of dataset.train_json"):
        apply_dataset_overrides(cfg, {"skip_bad_annotations": True})


def test_dataset_overrides_register_and_set_num_classes(digits_root, custom_names):
    cfg = get_config("dino_r18_digits.py")
    cfg.model.num_classes = 3
    apply_dataset_overrides(cfg, _overrides(digits_root))
    assert cfg.dataloader.train.dataset.names == CUSTOM_TRAIN_DATASET
    assert cfg.dataloader.test.dataset.names == CUSTOM_TEST_DATASET
    assert cfg.model.num_classes == 10
    # Every head follows model.num_classes through the config's interpolations.
    assert cfg.model.transformer.decoder.num_classes == 10
    assert len(DatasetCatalog.get(CUSTOM_TEST_DATASET)) == 2
    assert MetadataCatalog.get(CUSTOM_TEST_DATASET).json_file.endswith("val.json")


def test_dataset_overrides_refuse_disagreeing_categories(digits_root, tmp_path, custom_names):
    with open(os.path.join(digits_root, "annotations", "val.json")) as f:
        content = json.load(f)
    content["categories"] = content["categories"][:9]
    content["annotations"] = [a for a in content["annotations"] if a["category_id"] <= 9]
    other = tmp_path / "val9.json"
    other.write_text(json.dumps(content))
    cfg = get_config("dino_r18_digits.py")
    with pytest.raises(ValueError, match="categories of dataset.train_json"):
        apply_dataset_overrides(cfg, _overrides(digits_root, test_json=str(other)))
    with pytest.raises(ValueError, match="go together"):
        apply_dataset_overrides(cfg, {"train_json": "x.json"})


def test_builtin_datasets_are_registered_on_demand(digits_root, tmp_path, monkeypatch):
    assert {"digits_train", "digits_val"} <= set(builtin_dataset_names())
    _unregister("digits_train", "digits_val")
    requested = []

    def fake_ensure(folder, **kwargs):
        # The real one generates the full-size dataset; point at the small one instead.
        requested.append(folder)
        os.symlink(digits_root, folder)
        return folder

    monkeypatch.setattr(builtin, "ensure_digits_dataset", fake_ensure)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    cfg = get_config("dino_r18_digits.py")
    try:
        registered = register_config_datasets(cfg)
        assert sorted(registered) == ["digits_train", "digits_val"]
        assert requested == [os.path.join(str(tmp_path), "digits")]
        assert len(DatasetCatalog.get("digits_val")) == 2
        assert MetadataCatalog.get("digits_train").thing_classes == [str(d) for d in range(10)]
        # Registered names, Detectron2's own and unknown ones are left alone.
        assert register_builtin_datasets(["digits_train", "coco_2017_val", "nonexistent"]) == []
    finally:
        _unregister("digits_train", "digits_val")
