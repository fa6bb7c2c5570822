"""tools/fetch_onnxruntime_headers.py: where the headers cannot be had it says why and lets the build
go on (or fails with --strict); a folder that holds them is kept; the package's headers land in
DEST only whole. The real download is what ``make`` runs, and the tests that load dino_d2's
onnxruntime library (tests/export) fail without it."""

import os
import re

import pytest


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("fetch_onnxruntime_headers")


def test_a_folder_with_the_headers_is_kept(tool, tmp_path, capsys):
    for name in tool.NEEDED:
        (tmp_path / name).write_text("// header\n")
    assert tool.main([str(tmp_path), "--strict"]) == 0
    assert "already holds the headers" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == sorted(tool.NEEDED)


def test_without_apt_it_says_why_and_the_build_goes_on(tool, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tool.shutil, "which", lambda name: None)
    dest = tmp_path / "include" / "onnxruntime"
    assert tool.main([str(dest), "--mirror", "http://127.0.0.1:9/debian"]) == 0
    err = capsys.readouterr().err
    assert "apt-get is not on PATH" in err and "builds without its onnxruntime custom op" in err
    assert tool.main([str(dest), "--mirror", "http://127.0.0.1:9/debian", "--strict"]) == 1
    assert not dest.exists()


def test_a_failed_download_leaves_no_partial_headers(tool, tmp_path, monkeypatch, capsys):
    if tool.shutil.which("apt-get") is None or not os.path.isfile(tool.KEYRING):
        pytest.skip("needs apt-get and Debian's keyring (a Debian machine, as CI's)")
    dest = tmp_path / "onnxruntime"
    # Nothing listens on this loopback port: no package list, so no package to download.
    assert tool.main([str(dest), "--mirror", "http://127.0.0.1:9/debian", "--strict"]) == 1
    assert re.search(
        r"cannot fetch libonnxruntime-dev \(apt-get \w+ .*failed", capsys.readouterr().err
    )
    assert not dest.exists() and not (tmp_path / "onnxruntime.partial").exists()
