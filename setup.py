"""Build and install dino_d2 and its extensions: ``dino_d2._C`` and, where their runtimes' headers
are found, ``dino_d2._onnxruntime_msda`` and ``dino_d2._openvino_msda``.

The C++ CPU kernels are always compiled. The CUDA kernels are compiled as well whenever a CUDA
toolkit whose version matches torch's CUDA build is found, whether or not a GPU is present
(``FORCE_CUDA=1`` compiles them regardless of the version check, ``FORCE_CUDA=0`` never).
``TORCH_CUDA_ARCH_LIST`` is respected; by default every architecture from Volta to Hopper that
the toolkit supports is compiled, plus PTX for the newest one.

``dino_d2._openvino_msda`` is the deformable-attention operation for OpenVINO (not a Python module:
a library that ``openvino.Core().add_extension`` loads, see ``dino_d2.export.openvino_extension``).
It is compiled against the headers and libraries of the installed ``openvino`` wheel when there is
one (``pip install -e .[openvino]`` first, then this build); ``DINO_D2_OPENVINO=0`` skips it.

``dino_d2._onnxruntime_msda`` is the same operation as an onnxruntime custom op library (loaded by
``SessionOptions.register_custom_ops_library``, see ``dino_d2.export.msda_node``). The onnxruntime
wheel ships no headers: it is compiled against the first folder of ``$DINO_D2_ONNXRUNTIME_INCLUDE``,
``<prefix>/include/onnxruntime`` (where ``make`` puts them, see
``tools/fetch_onnxruntime_headers.py``) and ``/usr/include/onnxruntime`` (Debian's
``libonnxruntime-dev``) that holds them, at API version 21 (onnxruntime 1.21) or newer. It links
nothing of onnxruntime. ``DINO_D2_ONNXRUNTIME=0`` skips it.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

try:
    import torch
except ImportError as error:
    raise SystemExit(
        "dino_d2: setup.py compiles a PyTorch extension against the installed torch, and this "
        "build does not see one. Install torch and Detectron2 first, then run "
        "`pip install --no-build-isolation .` (pip's default build isolation hides them)."
    ) from error

_HERE = os.path.dirname(os.path.abspath(__file__))
_CSRC = os.path.join("dino_d2", "layers", "csrc")
# Volta .. Hopper, as nvcc spells them in --list-gpu-arch.
_DEFAULT_ARCHS = ["70", "72", "75", "80", "86", "87", "89", "90"]


def _toolkit_root():
    """The real folder of the CUDA toolkit, or None.

    torch guesses ``dirname(dirname(which nvcc))``, which is wrong when the ``nvcc`` on PATH is a
    wrapper script or a symlink; a folder is only accepted when it holds ``bin/nvcc`` and
    ``include/cuda.h``.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("utf-8", "replace")
        except OSError:
            head = ""
        # A wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"` names the real one.
        for path in re.findall(r"(/\S+)/bin/nvcc\b", head):
            candidates.append(path)
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            if os.path.isfile(os.path.join(root, "include", "cuda.h")):
                return os.path.realpath(root)
    return None


def _nvcc_output(root, *args):
    return subprocess.check_output([os.path.join(root, "bin", "nvcc"), *args], text=True)


def _cuda_plan():
    """Returns the toolkit folder to compile the CUDA kernels with, or None for a CPU-only build."""
    force = os.environ.get("FORCE_CUDA")
    if force == "0" or torch.version.hip is not None:
        return None
    root = _toolkit_root()
    if root is None:
        if force == "1":
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit (bin/nvcc, include/cuda.h) found")
        return None
    release = re.search(r"release (\d+\.\d+)", _nvcc_output(root, "--version"))
    found = release.group(1) if release else "unknown"
    if force != "1" and found != torch.version.cuda:
        print(
            f"dino_d2: CUDA toolkit {found} at {root} does not match torch's CUDA "
            f"{torch.version.cuda}; building the CPU kernels only (FORCE_CUDA=1 overrides)."
        )
        return None
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        supported = set(re.findall(r"compute_(\d+)", _nvcc_output(root, "--list-gpu-arch")))
        archs = [a for a in _DEFAULT_ARCHS if a in supported]
        if not archs:
            raise RuntimeError(f"the CUDA toolkit at {root} supports none of {_DEFAULT_ARCHS}")
        names = [f"{a[:-1]}.{a[-1]}" for a in archs]
        names[-1] += "+PTX"
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(names)
    return root


def _extensions():
    cuda_root = _cuda_plan()
    if cuda_root is not None:
        # torch.utils.cpp_extension reads CUDA_HOME once, when it is imported.
        os.environ["CUDA_HOME"] = cuda_root
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join(_CSRC, "*.cpp")))
    define_macros = []
    extra_compile_args = {"cxx": ["-O3", "-std=c++20", "-fopenmp"]}
    extension = CppExtension
    if cuda_root is not None:
        print(
            f"dino_d2: compiling the CUDA kernels with {cuda_root} for "
            f"{os.environ['TORCH_CUDA_ARCH_LIST']}"
        )
        extension = CUDAExtension
        sources += sorted(glob.glob(os.path.join(_CSRC, "cuda", "*.cu")))
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3", "-std=c++20"]
    modules = [
        extension(
            "dino_d2._C",
            sources,
            include_dirs=[os.path.join(_HERE, _CSRC)],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ]
    for runtime_module in (_onnxruntime_extension(), _openvino_extension()):
        if runtime_module is not None:
            modules.append(runtime_module)
    return modules, {"build_ext": BuildExtension}


# The oldest onnxruntime C API that csrc/onnxruntime is written against.
_ONNXRUNTIME_API = 21


def _onnxruntime_headers():
    """The first folder of onnxruntime headers of API version 21 or newer, or None."""
    candidates = [os.environ.get("DINO_D2_ONNXRUNTIME_INCLUDE", "")]
    candidates += [os.path.join(sys.prefix, "include", "onnxruntime"), "/usr/include/onnxruntime"]
    for folder in filter(None, candidates):
        header = os.path.join(folder, "onnxruntime_c_api.h")
        if not os.path.isfile(os.path.join(folder, "onnxruntime_lite_custom_op.h")):
            continue
        with open(header, encoding="utf-8") as f:
            found = re.search(r"#define ORT_API_VERSION (\d+)", f.read())
        if found and int(found.group(1)) >= _ONNXRUNTIME_API:
            return folder
        print(f"dino_d2: {header} is older than API version {_ONNXRUNTIME_API}; not used")
    return None


def _onnxruntime_extension():
    """The onnxruntime custom op library, or None when onnxruntime's headers are missing."""
    if os.environ.get("DINO_D2_ONNXRUNTIME") == "0":
        return None
    include = _onnxruntime_headers()
    if include is None:
        print(
            "dino_d2: onnxruntime's headers were not found (tools/fetch_onnxruntime_headers.py); "
            "not building the onnxruntime custom op"
        )
        return None
    return _runtime_extension("onnxruntime", include)


def _runtime_extension(runtime, include, **options):
    """``dino_d2._<runtime>_msda``, from ``csrc/<runtime>/msda_<runtime>.cpp`` against the
    runtime's headers in ``include``."""
    from setuptools import Extension

    return Extension(
        f"dino_d2._{runtime}_msda",
        [os.path.join(_CSRC, runtime, f"msda_{runtime}.cpp")],
        include_dirs=[include, os.path.join(_HERE, _CSRC)],
        extra_compile_args=["-O3", "-std=c++17"],
        **options,
    )


def _openvino_extension():
    """The OpenVINO operation's library, or None when OpenVINO (with its headers) is missing."""
    if os.environ.get("DINO_D2_OPENVINO") == "0":
        return None
    try:
        import openvino
    except ImportError:
        print("dino_d2: openvino is not installed; not building the OpenVINO extension")
        return None
    root = os.path.dirname(openvino.__file__)
    include = os.path.join(root, "include")
    libs = os.path.join(root, "libs")
    # The wheel ships its libraries under their versioned names only (libopenvino.so.2641).
    needed = ["libopenvino.so", "libopenvino_onnx_frontend.so", "libtbb.so"]
    found = [sorted(glob.glob(os.path.join(libs, name + ".*"))) for name in needed]
    if not os.path.isfile(os.path.join(include, "openvino", "op", "op.hpp")) or not all(found):
        print(
            f"dino_d2: the openvino wheel at {root} lacks headers or libraries {needed}; "
            "not building the OpenVINO extension"
        )
        return None
    return _runtime_extension(
        "openvino",
        include,
        # The threading that the wheel's libraries were built with (OpenVINOTargets.cmake).
        define_macros=[("OV_THREAD", "OV_THREAD_TBB_ADAPTIVE")],
        extra_objects=[paths[0] for paths in found],
        extra_link_args=[f"-Wl,-rpath,{os.path.realpath(libs)}"],
    )


def _config_packages():
    return [
        "dino_d2.configs" + root[len("configs") :].replace(os.sep, ".")
        for root, _, files in os.walk("configs")
        if any(f.endswith(".py") for f in files) and "__pycache__" not in root
    ]


ext_modules, cmdclass = _extensions()

setup(
    name="dino_d2",
    version="0.1.0",
    description="DINO (DETR with Improved DeNoising Anchor Boxes) as a Detectron2 plugin",
    python_requires=">=3.9",
    # The LazyConfigs ship inside the package as dino_d2/configs (see dino_d2.model_zoo).
    packages=find_packages(include=["dino_d2", "dino_d2.*"]) + _config_packages(),
    package_dir={"dino_d2.configs": "configs"},
    # Every distribution that dino_d2 and its configs import (tests/test_packaging.py checks this
    # list against the imports), plus shapely, which fvcore needs to crop polygon masks.
    # Detectron2 is required as well but cannot be declared: it is not published on PyPI under
    # its own name (it installs from its git source, or offline as PyPI's pb1-detectron2 sdist of
    # v0.6), and a requirement would make pip fail or build another copy against another torch.
    # Install torch and Detectron2 first (`make` runs tools/install_detectron2.py), then
    # `pip install --no-build-isolation .` so that the extension builds against that torch.
    install_requires=[
        "torch",
        "torchvision",
        "numpy",
        "Pillow",
        "scipy",
        "timm>=1.0.20,<1.1",
        "fvcore",
        "omegaconf",
        "tabulate",
        # dino_d2.model_zoo reads yaml configs as data (safe loading).
        "PyYAML",
        # The digits' RLE masks, the segmentations' checks, Detectron2's COCOEvaluator.
        "pycocotools",
        # fvcore crops polygon masks with it (the DETR crop with instance_mask_format="polygon").
        "shapely",
        "scikit-learn",
        # dino_d2.cli.plot_metrics draws the curves.
        "matplotlib",
        # dino_d2.cli.benchmark reports the process memory.
        "psutil",
        # dino_d2.data.coco_reader streams COCO jsons of any size into the cache (C backend).
        "ijson>=3.1",
    ],
    # `pip install -e .[export]`: ONNX export (onnxscript drives torch.onnx.export(dynamo=True))
    # and onnxruntime to run and verify the exported graphs (dino_d2.export).
    # `pip install -e .[openvino]`: OpenVINO as a second ONNX runtime (tools/benchmark.py
    # --openvino, export_model.py --eval --runtime openvino) and NNCF's int8 quantization
    # (tools/deploy/quantize.py, dino_d2.export.quantize); in the Makefile's DEPS and in CI.
    extras_require={
        "export": ["onnx>=1.23", "onnxruntime>=1.32", "onnxscript>=0.7"],
        "openvino": ["openvino>=2024.0", "nncf>=3.0"],
        "slurm": ["submitit>=1.5"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
