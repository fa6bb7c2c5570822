"""The allocator setting of inference processes."""

import subprocess
import sys

import pytest

from dino_d2.utils.allocator import unmap_large_blocks


def test_threshold_outside_glibc_range_is_refused():
    for bad in (0, -1, (32 << 20) + 1):
        with pytest.raises(ValueError, match="threshold_bytes"):
            unmap_large_blocks(bad)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_takes_the_setting():
    # In a fresh process: the setting is process-wide.
    code = "from dino_d2.utils.allocator import unmap_large_blocks; print(unmap_large_blocks())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "True"
