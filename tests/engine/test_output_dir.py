"""The output folder at the start of a job: writable, and another config's checkpoints are
warned about (a new run) or refused (--resume) before anything is overwritten."""

import errno
import logging
import os

import pytest

from detectron2.config import LazyConfig

from dino_d2.utils import OutputWriteError
from dino_d2.engine import output_dir as output_dir_module
from dino_d2.engine.output_dir import (
    OutputDirConflictError,
    check_writable,
    config_differences,
    prepare_output_dir,
)
from dino_d2.model_zoo import get_config


def _config(folder, **changes):
    cfg = get_config("dino_r18_digits.py")
    cfg.train.output_dir = str(folder)
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return cfg


def _files(folder):
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))}


@pytest.fixture
def previous_run(tmp_path):
    """A folder with the checkpoints of a run of the digits config."""
    folder = tmp_path / "out"
    prepare_output_dir(_config(folder), resume=False)
    (folder / "model_0000001.pth").write_bytes(b"weights 1")
    (folder / "model_0000003.pth").write_bytes(b"weights 3")
    (folder / "last_checkpoint").write_text("model_0000003.pth")
    return folder


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_another_model_warns_before_overwriting(previous_run, caplog):
    before = _files(previous_run)
    cfg = _config(previous_run, **{"model.transformer.embed_dim": 64, "model.num_classes": 3})
    with caplog.at_level(logging.WARNING):
        prepare_output_dir(cfg, resume=False)
    (warning,) = _warnings(caplog)
    assert warning.startswith(
        f"train.output_dir {previous_run} holds the checkpoints of another run "
        "(last_checkpoint: model_0000003.pth), whose config.yaml differs from this config in "
    )
    assert "model.transformer.embed_dim (128 -> 64)" in warning
    assert "model.num_classes (10 -> 3)" in warning
    assert "use another train.output_dir to keep them" in warning
    after = _files(previous_run)
    assert {n: after[n] for n in before if n != "config.yaml"} == {
        n: before[n] for n in before if n != "config.yaml"
    }
    assert LazyConfig.load(str(previous_run / "config.yaml")).model.num_classes == 3
    assert sorted(after) == sorted(before)  # no temporary file left


def test_resume_with_another_model_stops_and_changes_nothing(previous_run):
    before = _files(previous_run)
    cfg = _config(previous_run, **{"dataloader.train.dataset.names": "custom_train"})
    with pytest.raises(OutputDirConflictError) as error:
        prepare_output_dir(cfg, resume=True)
    message = str(error.value)
    assert message.startswith("--resume stopped: train.output_dir ")
    assert "dataloader.train.dataset.names ('digits_train' -> 'custom_train')" in message
    assert "Resuming would load that run's weights into a different model" in message
    assert f"train.init_checkpoint={previous_run}/model_0000003.pth without --resume" in message
    assert _files(previous_run) == before


def test_resume_of_the_same_run_with_other_training_settings_is_quiet(previous_run, caplog):
    cfg = _config(previous_run, **{"train.max_iter": 5000, "optimizer.lr": 1e-5})
    with caplog.at_level(logging.WARNING):
        prepare_output_dir(cfg, resume=True)
        prepare_output_dir(cfg, resume=False)
    assert _warnings(caplog) == []
    assert LazyConfig.load(str(previous_run / "config.yaml")).train.max_iter == 5000


def test_checkpoints_without_a_config_warn_on_a_new_run(previous_run, caplog):
    os.remove(previous_run / "config.yaml")
    with caplog.at_level(logging.WARNING):
        prepare_output_dir(_config(previous_run), resume=True)
    assert _warnings(caplog) == []
    os.remove(previous_run / "config.yaml")
    with caplog.at_level(logging.WARNING):
        prepare_output_dir(_config(previous_run), resume=False)
    (warning,) = _warnings(caplog)
    assert "holds checkpoints (last_checkpoint: model_0000003.pth) but no readable config.yaml" in (
        warning
    )


def test_config_differences_lists_missing_and_changed_keys():
    old = {"model": {"a": 1, "b": {"c": 2}}, "dataloader": {"train": {"dataset": {"names": "x"}}}}
    new = {"model": {"a": 1, "b": {"c": 3}, "d": 4}, "train": {"max_iter": 9}}
    assert config_differences(old, new) == [
        ("model.b.c", 2, 3),
        ("model.d", "<missing>", 4),
        ("dataloader.train.dataset.names", "x", None),
    ]


def test_a_read_only_folder_is_reported_at_start(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o555)
    try:
        try:
            (folder / "probe").write_bytes(b"")
            (folder / "probe").unlink()
            root = True
        except PermissionError:
            root = False
        if root:  # chmod does not stop root: refuse as the kernel does for other users
            real_open = os.open

            def refuse(path, flags, *args):
                if os.path.dirname(path) == str(folder) and flags & os.O_CREAT:
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
                return real_open(path, flags, *args)

            monkeypatch.setattr(output_dir_module.os, "open", refuse)
        with pytest.raises(OutputWriteError) as error:
            check_writable(str(folder))
    finally:
        os.chmod(folder, 0o755)
    assert str(error.value).startswith(
        f"train.output_dir {folder} is not writable: Permission denied. The job writes its "
        "checkpoints, metrics.json and config.yaml there"
    )
    assert os.listdir(folder) == []


def test_a_full_disk_while_saving_the_config_keeps_the_old_one(previous_run, monkeypatch):
    from detectron2.config import lazy

    before = _files(previous_run)
    real_open = lazy.PathManager.open

    class HalfWritten:
        def __init__(self, file):
            self._file = file

        def write(self, text):
            self._file.write(text[: len(text) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._file.close()

    def open_half_written(path, mode="r", **kwargs):
        file = real_open(path, mode, **kwargs)
        return HalfWritten(file) if "w" in mode else file

    monkeypatch.setattr(lazy.PathManager, "open", open_half_written)
    with pytest.raises(OutputWriteError, match="Could not write config.yaml in .*incomplete"):
        prepare_output_dir(_config(previous_run, **{"train.max_iter": 7}), resume=True)
    assert _files(previous_run) == before


def test_a_config_that_is_not_yaml_is_saved_as_detectron2_does(tmp_path):
    cfg = _config(tmp_path / "out")
    cfg.model.postprocess = lambda x: x  # noqa: E731 (what yaml cannot hold)
    path = prepare_output_dir(cfg, resume=False)
    assert sorted(os.listdir(tmp_path / "out")) == ["config.yaml", "config.yaml.pkl"]
    assert path == str(tmp_path / "out" / "config.yaml")
