"""The peak memory of a fresh inference process."""

import numpy as np
import pytest

from dino_d2.measure import InferenceProcessError, inference_process_memory


def test_failed_process_reports_its_error(tmp_path):
    missing = str(tmp_path / "missing.py")
    with pytest.raises(InferenceProcessError, match="missing.py"):
        inference_process_memory(missing, height=32, width=32)


def test_a_large_parent_does_not_count(tmp_path, tiny_dino_config):
    """The figures are the fresh process's own: ``ru_maxrss`` survives ``execve`` and would
    report this process's size at the fork."""
    from detectron2.config import LazyConfig

    from dino_d2.measure import peak_rss_mb

    config = str(tmp_path / "tiny.yaml")
    LazyConfig.save(tiny_dino_config(), config)
    ballast = np.ones(768 * 1024**2 // 8)  # touched: 768 MiB resident in this process
    parent = peak_rss_mb()
    process = inference_process_memory(config, ["train.device=cpu"], height=64, width=96)
    assert 0 < process["imports_rss_mb"] <= process["built_rss_mb"] <= process["peak_rss_mb"]
    assert process["peak_rss_mb"] < parent - 512, (process, parent)
    assert process["num_detections"] > 0 and ballast.sum() > 0
