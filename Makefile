# Two commands do everything on a fresh machine: `make test` and `make demo`.
# Each step leaves a stamp in .venv/ so a second run skips what is done.

PYTHON_VERSION ?= 3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CSRC := $(wildcard dino_d2/layers/csrc/*.cpp dino_d2/layers/csrc/*.h dino_d2/layers/csrc/cuda/*.cu \
	dino_d2/layers/csrc/openvino/*.cpp dino_d2/layers/csrc/onnxruntime/*.cpp)

TORCH := torch==2.14.1 torchvision==0.29.1
# setup.py's `export` extra (ONNX export and its tests), installed here because the package
# itself is installed with --no-deps.
EXPORT_DEPS := "onnx>=1.23" "onnxruntime>=1.32" "onnxscript>=0.7"
# setup.py's `openvino` extra: OpenVINO and NNCF (int8), about 60 MB of wheels, 190 MB installed.
OPENVINO_DEPS := "openvino>=2024.0" "nncf>=3.0"
# setup.py's `slurm` extra: tools/submit_slurm.py (and its test, with the local executor).
SLURM_DEPS := "submitit>=1.5"
DEPS := "setuptools<81" wheel ninja "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" pycocotools shapely \
	timm==1.0.31 scipy omegaconf hydra-core yacs termcolor tabulate cloudpickle tqdm tensorboard \
	matplotlib pillow "opencv-python-headless<5" pydot black psutil scikit-learn pytest ijson \
	$(EXPORT_DEPS) $(OPENVINO_DEPS) $(SLURM_DEPS)

.PHONY: setup test demo benchmark gpu-check clean-build

setup: $(VENV)/.stamp-dino_d2

# pip >= 25.3 builds the editable install through PEP 660 (older pip runs `setup.py develop`).
$(VENV)/.stamp-python:
	python$(PYTHON_VERSION) -m venv $(VENV)
	$(PIP) install --upgrade "pip>=25.3"
	touch $@

$(VENV)/.stamp-torch: $(VENV)/.stamp-python
	$(PIP) install $(TORCH)
	touch $@

$(VENV)/.stamp-deps: $(VENV)/.stamp-torch Makefile
	$(PIP) install $(DEPS)
	touch $@

$(VENV)/.stamp-detectron2: $(VENV)/.stamp-deps tools/install_detectron2.py
	$(PY) tools/install_detectron2.py
	touch $@

# onnxruntime's C headers (the wheel has none), from Debian's libonnxruntime-dev, for dino_d2's
# custom op library; where they cannot be had, the build goes on without that library.
$(VENV)/.stamp-onnxruntime-headers: $(VENV)/.stamp-python tools/fetch_onnxruntime_headers.py
	$(PY) tools/fetch_onnxruntime_headers.py $(VENV)/include/onnxruntime
	touch $@

# Compiles dino_d2._C (C++ always, CUDA when a matching toolkit is found), the onnxruntime custom
# op (against those headers) and the OpenVINO operation (against the openvino wheel of DEPS), and
# installs the package in editable mode; only re-run when the sources or setup.py change.
$(VENV)/.stamp-dino_d2: $(VENV)/.stamp-detectron2 $(VENV)/.stamp-onnxruntime-headers setup.py $(CSRC)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

test: setup
	$(PY) -m pytest tests -q

# The main job: generate the digits dataset (once), train and evaluate the digits DINO on the
# CPU, render predictions on a few validation images and plot the loss and AP curves.
DEMO_CONFIG := configs/dino_r18_digits.py
DEMO_OUT := output/digits

demo: setup
	$(PY) tools/make_digits_dataset.py --root datasets/digits
	$(PY) tools/lazyconfig_train_net.py --config-file $(DEMO_CONFIG) train.output_dir=$(DEMO_OUT)
	$(PY) tools/demo.py --config-file $(DEMO_CONFIG) --checkpoint $(DEMO_OUT)/model_final.pth \
		--input "datasets/digits/val/00000[1-6].png" --output $(DEMO_OUT)/predictions --overwrite
	$(PY) tools/plot_metrics.py $(DEMO_OUT)/metrics.json --output $(DEMO_OUT)/curves.png

benchmark: setup
	$(PY) tools/benchmark_msda.py

# On a machine with one CUDA GPU: compiles the CUDA kernels for that GPU (once; FORCE_CUDA=1 stops
# with an error when no CUDA toolkit is found), then runs the GPU tests, the deformable-attention
# benchmark, DINO-R50 inference and training steps in fp32, bf16 and fp16, and prints one JSON
# summary (tools/gpu_check.py; within 10 minutes).
gpu-check: $(VENV)/.stamp-dino_d2-cuda
	$(PY) tools/gpu_check.py

$(VENV)/.stamp-dino_d2-cuda: $(VENV)/.stamp-detectron2 $(VENV)/.stamp-onnxruntime-headers setup.py $(CSRC)
	arch=$$($(PY) tools/gpu_check.py --print-cuda-arch) && rm -rf build && \
		FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$$arch" $(PIP) install --no-build-isolation --no-deps -e .
	touch $(VENV)/.stamp-dino_d2 $@

clean-build:
	rm -rf build dino_d2/_C*.so $(VENV)/.stamp-dino_d2 $(VENV)/.stamp-dino_d2-cuda
