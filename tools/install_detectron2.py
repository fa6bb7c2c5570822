"""Install Detectron2 into the running Python environment, the best way this machine allows.

1. A Detectron2 that already imports is kept as it is.
2. With access to GitHub, Detectron2 is built from its official git source (main).
3. Offline, PyPI's ``pb1-detectron2==0.6`` (an sdist of the v0.6 release) is downloaded, mended
   for current numpy, Pillow and setuptools, given back its model-zoo configs, and built without
   its C++ ops (DINO uses none of them; COCOEvaluator runs with ``use_fast_impl=False``).

Usage: ``python tools/install_detectron2.py``. Exits non-zero with a message on failure.
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

GIT_URL = "https://github.com/facebookresearch/detectron2.git"
OFFLINE_SDIST = "pb1-detectron2==0.6"
DOWNLOAD_PIP = "pip==23.2.1"

# (pattern, replacement) applied to every .py file of the offline sdist.
_SOURCE_FIXES = [
    (re.compile(r"\bnp\.int\b(?!\w)"), "int"),
    (re.compile(r"\bnp\.float\b(?!\w)"), "float"),
    (re.compile(r"\bnp\.bool\b(?!\w)"), "bool"),
    (re.compile(r"\bImage\.LINEAR\b"), "Image.BILINEAR"),
]
# Requirements of the sdist's setup.py that no longer install or work; the real dependencies are
# installed by the Makefile beforehand, and the build uses --no-deps.
_EMPTY_EXTENSION = "#include <torch/extension.h>\n\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}\n"


def _pip(*args):
    subprocess.check_call([sys.executable, "-m", "pip", *args])


def _installed():
    probe = "import detectron2, detectron2.data, detectron2.modeling; print(detectron2.__file__)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def _github_reachable(timeout=15):
    if shutil.which("git") is None:
        return False
    try:
        subprocess.run(
            ["git", "ls-remote", "--heads", GIT_URL, "main"],
            capture_output=True,
            timeout=timeout,
            check=True,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
    except (subprocess.SubprocessError, OSError):
        return False
    return True


def _mend_sdist(src):
    """Makes the v0.6 sdist at `src` build and import with current dependencies."""
    for path in glob.glob(os.path.join(src, "detectron2", "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        mended = text
        for pattern, replacement in _SOURCE_FIXES:
            mended = pattern.sub(replacement, mended)
        if mended != text:
            with open(path, "w", encoding="utf-8") as f:
                f.write(mended)
    # The sdist lacks the C++ sources; an empty module keeps `from detectron2 import _C` working.
    csrc = os.path.join(src, "detectron2", "layers", "csrc")
    os.makedirs(csrc, exist_ok=True)
    with open(os.path.join(csrc, "vision.cpp"), "w", encoding="utf-8") as f:
        f.write(_EMPTY_EXTENSION)
    # setup.py packages the model-zoo configs from a top-level configs/ the sdist lacks.
    zoo = os.path.join(src, "detectron2", "model_zoo", "configs")
    top = os.path.join(src, "configs")
    if os.path.isdir(zoo) and not os.path.exists(top):
        shutil.copytree(zoo, top)
    setup_py = os.path.join(src, "setup.py")
    with open(setup_py, encoding="utf-8") as f:
        text = f.read()
    text = text.replace('"black==21.4b2"', '"black"').replace('"iopath>=0.1.7,<0.1.10"', '"iopath"')
    # A direct URL dependency (in an optional extra) that current pip rejects.
    text = re.sub(r'\n\s*"panopticapi @ [^"]*",', "", text)
    with open(setup_py, "w", encoding="utf-8") as f:
        f.write(text)


def _download_sdist(folder):
    """Downloads the offline sdist into `folder` with pip.

    pip >= 24 refuses to even download this sdist: preparing its metadata finds a direct URL
    dependency (panopticapi, in an optional extra) and stops. An older pip, installed for this
    one download into a scratch folder, still downloads it.
    """
    scratch = os.path.join(folder, "pip")
    _pip("install", "--quiet", "--no-deps", "--target", scratch, DOWNLOAD_PIP)
    env = {**os.environ, "PYTHONPATH": scratch}
    subprocess.check_call(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--no-build-isolation",
            "-d",
            folder,
            OFFLINE_SDIST,
        ],
        env=env,
    )


def _install_offline():
    with tempfile.TemporaryDirectory(prefix="detectron2-sdist-") as tmp:
        _download_sdist(tmp)
        archives = glob.glob(os.path.join(tmp, "*.tar.gz"))
        if len(archives) != 1:
            raise RuntimeError(f"expected one sdist of {OFFLINE_SDIST} in {tmp}, got {archives}")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(tmp, filter="data")
        (src,) = [p for p in glob.glob(os.path.join(tmp, "pb1-detectron2-*")) if os.path.isdir(p)]
        _mend_sdist(src)
        env_cuda = os.environ.pop("FORCE_CUDA", None)
        try:
            _pip("install", "--no-build-isolation", "--no-deps", src)
        finally:
            if env_cuda is not None:
                os.environ["FORCE_CUDA"] = env_cuda


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offline", action="store_true", help="skip the git source")
    args = parser.parse_args()
    found = _installed()
    if found:
        print(f"detectron2 already installed at {found}; keeping it")
        return
    if not args.offline and _github_reachable():
        print(f"building detectron2 from {GIT_URL}")
        _pip("install", "--no-build-isolation", f"git+{GIT_URL}")
    else:
        print(f"GitHub not reachable: building detectron2 from PyPI's {OFFLINE_SDIST} sdist")
        _install_offline()
    found = _installed()
    if not found:
        sys.exit("detectron2 was installed but does not import; see the output above")
    print(f"detectron2 installed at {found}")


if __name__ == "__main__":
    main()
