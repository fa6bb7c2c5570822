"""The peak memory of a fresh inference process."""

import pytest

from dino_d2.measure import InferenceProcessError, inference_process_memory


def test_failed_process_reports_its_error(tmp_path):
    missing = str(tmp_path / "missing.py")
    with pytest.raises(InferenceProcessError, match="missing.py"):
        inference_process_memory(missing, height=32, width=32)
