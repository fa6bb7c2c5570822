#!/usr/bin/env python
"""Run an exported dino_d2 ONNX model on images, with onnxruntime, numpy and Pillow only.

    python tools/deploy/onnx_predict.py --model export/model.onnx --input photo.jpg more/ \\
        --output onnx_out --score-threshold 0.5

No PyTorch, Detectron2 or dino_d2 is imported: this file is all a deployment needs beside the
model and the JSON that ``tools/deploy/export_model.py`` writes next to it (``model.json`` for
``model.onnx``), which says how to prepare the images:

* images are read as ``tools/demo.py`` reads them (EXIF orientation applied, 16-bit grayscale
  scaled to 8 bits, then 3 channels in the model's ``input_format``);
* resized as the config's test data loader resizes them (Detectron2's ``ResizeShortestEdge``:
  the shorter side to ``short_edge_length``, the longer at most ``max_size``, each side rounded
  ``int(x + 0.5)``, Pillow's bilinear filter);
* batched as ``(N, 3, H, W)`` in the graph's input dtype, padded with zeros at the bottom and
  right, with ``image_sizes (N, 2)`` int64 giving each image's real height and width. The
  graph normalizes, pads to the backbone's divisibility and masks the padding itself.

``model.json`` is read as data: each value used (``input_format``, ``resize``, ``class_names``)
is checked for its type and range, and a wrong one stops with an error naming the file, the key,
the value and what was expected; nothing in it is evaluated.

Boxes come back in the resized image's pixels and are scaled to the original image and
clipped, empty ones dropped, as Detectron2's ``detector_postprocess`` does.
``OUTPUT/detections.json`` has the layout of ``tools/demo.py``'s and ``OUTPUT/<image>.png`` the
image with its boxes drawn. Existing files are never replaced without ``--overwrite``.

Masks: a Mask DINO export has a fourth output, ``mask_logits`` (N, K, h, w), each detection's
mask logits at the mask features' stride (``mask_stride`` in the JSON, default 4) of the padded
batch, top-left aligned. They are pasted as Mask DINO's inference pastes them (bilinear
upsampling by the stride, the image's own top-left part cropped, bilinear resizing to the
original image, PyTorch's ``align_corners=False`` arithmetic as matrices), a pixel is in the
mask where its logit is > 0, and the score becomes Mask DINO's: the class score times the mean
mask probability inside the mask. The masks are drawn filled and each detection in the JSON
gets ``"mask"``, an uncompressed COCO RLE (``{"size": [H, W], "counts": [runs, column-major,
zeros first]}``; pycocotools reads it with ``frPyObjects``).
"""

import argparse
import glob
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageOps

__all__ = [
    "InputError",
    "OnnxPredictor",
    "collect_images",
    "load_preprocessing",
    "read_image",
    "resized_shape",
    "main",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DETECTIONS_FILE = "detections.json"
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_DTYPES = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32}
_INPUT_FORMATS = ("RGB", "BGR")
MASK_OUTPUT = "mask_logits"
_MASK_CHUNK = 16  # detections pasted at a time (bounds the memory of large images)
_PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180))
# The largest resize target accepted from model.json, in pixels a side.
MAX_IMAGE_SIDE = 1 << 15


class InputError(Exception):
    """A problem with the inputs or outputs of the command line, reported without a traceback."""


def load_preprocessing(model_path: str, path: Optional[str] = None) -> Dict:
    """The pre-processing JSON of a model: ``path``, or the model's path with ``.json``."""
    path = path or os.path.splitext(model_path)[0] + ".json"
    if not os.path.isfile(path):
        raise InputError(
            f"{path} not found: the pre-processing JSON that tools/deploy/export_model.py writes "
            "beside the model (give it with --preprocessing)"
        )
    with open(path) as f:
        try:
            info = json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(info, dict):
        raise InputError(f"{path} holds a JSON {type(info).__name__}; expected an object")
    missing = [k for k in ("input_format", "resize") if k not in info]
    if missing:
        raise InputError(f"{path} lacks {missing}; re-export the model to get a complete one")
    _check_preprocessing(path, info)
    return info


def _invalid(path: str, key: str, value, expected: str) -> InputError:
    return InputError(f"{path}: {key} is {value!r}; expected {expected}")


def _check_preprocessing(path: str, info: Dict) -> None:
    """Checks the type and range of each value :class:`OnnxPredictor` reads."""
    if info["input_format"] not in _INPUT_FORMATS:
        raise _invalid(path, "input_format", info["input_format"], "'RGB' or 'BGR'")
    resize = info["resize"]
    if not isinstance(resize, dict):
        raise _invalid(path, "resize", resize, "an object with short_edge_length and max_size")
    if resize.get("type", "ResizeShortestEdge") != "ResizeShortestEdge":
        raise _invalid(path, "resize.type", resize["type"], "'ResizeShortestEdge'")
    for key in ("short_edge_length", "max_size"):
        value = resize.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_IMAGE_SIDE:
            raise _invalid(path, f"resize.{key}", value, f"an integer in 1..{MAX_IMAGE_SIDE}")
    stride = info.get("mask_stride", 4)
    if isinstance(stride, bool) or not isinstance(stride, int) or not 0 < stride <= 64:
        raise _invalid(path, "mask_stride", stride, "an integer in 1..64")
    names = info.get("class_names")
    if names is not None and not (
        isinstance(names, list) and all(isinstance(name, str) for name in names)
    ):
        raise _invalid(path, "class_names", names, "a list of strings")


def read_image(path: str, input_format: str) -> np.ndarray:
    """(H, W, 3) uint8 in ``input_format`` ("RGB" or "BGR"), read as Detectron2 reads it."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in _SIXTEEN_BIT_MODES:
                values = np.asarray(image, dtype=np.float64) / 257.0
                image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
            array = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:  # Pillow raises all three on bad files
        raise InputError(f"cannot read image {path}: {e}") from e
    return array[:, :, ::-1] if input_format == "BGR" else array


def resized_shape(height: int, width: int, short_edge: int, max_size: int) -> Tuple[int, int]:
    """Detectron2's ``ResizeShortestEdge.get_output_shape``: (new_height, new_width)."""
    size = float(short_edge)
    scale = size / min(height, width)
    new_h, new_w = (size, scale * width) if height < width else (scale * height, size)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def _has_glob_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def collect_images(inputs: Sequence[str]) -> List[str]:
    """Files, folders (their images, sorted) and glob patterns, in order, without duplicates."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, name)
                for name in os.listdir(item)
                if name.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                raise InputError(f"the folder {item} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        elif _has_glob_magic(item) and not os.path.exists(item):
            found = sorted(p for p in glob.glob(item) if p.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise InputError(f"no image matches {item!r}")
        else:
            found = [item]
        paths.extend(found)
    return list(dict.fromkeys(paths))


class OnnxPredictor:
    """An exported DINO in an onnxruntime session, with the pre- and post-processing.

    Args:
        model_path: the ``.onnx`` file.
        preprocessing: its pre-processing JSON (see :func:`load_preprocessing`).
        providers: onnxruntime execution providers; default the CPU.
        custom_op_library: dino_d2's onnxruntime custom op library, which runs the
            ``dino_d2::MultiScaleDeformableAttention`` nodes of an export made with
            ``--msda-backend node``; default: a ``_onnxruntime_msda*.so`` beside the model, if any.
    """

    def __init__(
        self,
        model_path: str,
        preprocessing: Dict,
        providers=None,
        custom_op_library: Optional[str] = None,
    ):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if custom_op_library is None:
            beside = glob.glob(
                os.path.join(os.path.dirname(os.path.abspath(model_path)), "_onnxruntime_msda*.so")
            )
            custom_op_library = sorted(beside)[0] if beside else None
        if custom_op_library is not None:
            if not os.path.isfile(custom_op_library):
                raise InputError(f"the custom op library {custom_op_library} does not exist")
            try:
                options.register_custom_ops_library(custom_op_library)
            except Exception as e:  # onnxruntime's own exception types
                raise InputError(f"onnxruntime cannot load {custom_op_library}: {e}") from e
        try:
            self.session = onnxruntime.InferenceSession(
                model_path, options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime's own exception types
            if "dino_d2" not in str(e) or custom_op_library is not None:
                raise
            raise InputError(
                f"{model_path} holds dino_d2's deformable-attention nodes (--msda-backend node): "
                "give --custom-op-library with dino_d2's dino_d2/_onnxruntime_msda*.so, or put "
                "that file beside the model"
            ) from e
        inputs = self.session.get_inputs()
        if len(inputs) != 2:
            raise InputError(
                f"{model_path} has {len(inputs)} inputs; a dino_d2 export has two, the image "
                "batch (N, 3, H, W) and image_sizes (N, 2)"
            )
        self.image_input, self.sizes_input = inputs
        if self.image_input.type not in _DTYPES:
            raise InputError(f"{model_path}: unexpected image input type {self.image_input.type}")
        self.dtype = _DTYPES[self.image_input.type]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_format = preprocessing["input_format"]
        self.resize = preprocessing["resize"]
        self.class_names = list(preprocessing.get("class_names") or [])
        self.mask_stride = preprocessing.get("mask_stride", 4)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Resizes one (H, W, 3) uint8 image as the test data loader does."""
        height, width = image.shape[:2]
        new_h, new_w = resized_shape(
            height, width, self.resize["short_edge_length"], self.resize["max_size"]
        )
        if (new_h, new_w) == (height, width):
            return image
        resized = Image.fromarray(np.ascontiguousarray(image)).resize(
            (new_w, new_h), Image.BILINEAR
        )
        return np.asarray(resized)

    def batch(self, images: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """Pads resized (H_i, W_i, 3) images into the graph's (N, 3, H, W) batch and sizes."""
        height = max(image.shape[0] for image in images)
        width = max(image.shape[1] for image in images)
        batch = np.zeros((len(images), 3, height, width), dtype=self.dtype)
        for i, image in enumerate(images):
            batch[i, :, : image.shape[0], : image.shape[1]] = image.transpose(2, 0, 1)
        sizes = np.array([image.shape[:2] for image in images], dtype=np.int64)
        return batch, sizes

    def run(self, batch: np.ndarray, image_sizes: Optional[np.ndarray]) -> Dict[str, np.ndarray]:
        """Runs the graph after checking its inputs; returns ``boxes``, ``scores``, ``classes``
        (and ``mask_logits`` for a model with masks).

        Raises:
            InputError: stating the expected input when the batch, its dtype or the sizes are
                wrong.
        """
        expected = f"(N, 3, H, W) {self.dtype.__name__} in {self.input_format} order"
        if image_sizes is None:
            raise InputError(
                f"image_sizes is missing: the graph takes the image batch {expected} and "
                "image_sizes (N, 2) int64, each image's real (height, width) inside the padding"
            )
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise InputError(f"the image batch has shape {batch.shape}; expected {expected}")
        if batch.dtype != self.dtype:
            raise InputError(
                f"the image batch is {batch.dtype}; this model was exported for {expected}"
                + (" (0-255 values)" if self.dtype == np.float32 else "")
            )
        image_sizes = np.asarray(image_sizes)
        if image_sizes.shape != (batch.shape[0], 2) or image_sizes.dtype != np.int64:
            raise InputError(
                f"image_sizes has shape {image_sizes.shape} and dtype {image_sizes.dtype}; "
                f"expected ({batch.shape[0]}, 2) int64 (height, width) of each image"
            )
        outputs = self.session.run(
            None, {self.image_input.name: batch, self.sizes_input.name: image_sizes}
        )
        named = dict(zip(self.output_names, outputs))
        result = dict(zip(("boxes", "scores", "classes"), outputs))
        if MASK_OUTPUT in named:
            result["mask_logits"] = named[MASK_OUTPUT]
        return result

    def __call__(self, images: Sequence[np.ndarray]) -> List[Dict[str, np.ndarray]]:
        """Detections of (H, W, 3) uint8 images in ``input_format``, in their own pixels.

        Returns:
            one dict per image: ``boxes`` (K, 4) absolute XYXY, ``scores`` (K,), ``classes``
            (K,), boxes clipped to the image, empty ones dropped; with masks also ``masks``
            (K, H, W) bool and the mask-rescored ``scores`` (see the module docstring).
        """
        prepared = [self.prepare(image) for image in images]
        batch, sizes = self.batch(prepared)
        outputs = self.run(batch, sizes)
        results = []
        for i, (image, resized) in enumerate(zip(images, prepared)):
            height, width = image.shape[:2]
            scale = np.array(
                [width / resized.shape[1], height / resized.shape[0]] * 2, dtype=np.float32
            )
            boxes = outputs["boxes"][i] * scale
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            found = {
                "boxes": boxes[keep],
                "scores": outputs["scores"][i][keep],
                "classes": outputs["classes"][i][keep],
            }
            if "mask_logits" in outputs:
                logits = outputs["mask_logits"][i][keep]
                found["masks"], mask_scores = _paste_masks(
                    logits, self.mask_stride, resized.shape[:2], (height, width)
                )
                found["scores"] = found["scores"] * mask_scores
            results.append(found)
        return results

    def class_name(self, class_id: int) -> str:
        if 0 <= class_id < len(self.class_names):
            return str(self.class_names[class_id])
        return str(class_id)


def _resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of PyTorch's bilinear resize along one axis
    (``align_corners=False``, no antialiasing): ``out = matrix @ in``."""
    source = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
    low = np.minimum(source.astype(np.int64), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    weight = (source - low).astype(np.float32)
    matrix = np.zeros((size_out, size_in), dtype=np.float32)
    rows = np.arange(size_out)
    np.add.at(matrix, (rows, low), 1.0 - weight)
    np.add.at(matrix, (rows, high), weight)
    return matrix


def _paste_masks(
    logits: np.ndarray, stride: int, image_size: Tuple[int, int], output_size: Tuple[int, int]
) -> Tuple[np.ndarray, np.ndarray]:
    """(K, h, w) mask logits of the padded batch at ``stride`` to (K, H, W) bool masks of the
    original image, and each mask's score (mean probability inside the mask, 0 when empty)."""
    axes = []
    for axis in (0, 1):
        upsampled = _resize_matrix(logits.shape[1 + axis], logits.shape[1 + axis] * stride)
        cropped = upsampled[: image_size[axis]]
        axes.append(_resize_matrix(image_size[axis], output_size[axis]) @ cropped)
    masks = np.zeros((len(logits), *output_size), dtype=bool)
    scores = np.zeros(len(logits), dtype=np.float32)
    for start in range(0, len(logits), _MASK_CHUNK):
        chunk = logits[start : start + _MASK_CHUNK].astype(np.float32)
        pasted = np.einsum("Hh,khw,Ww->kHW", axes[0], chunk, axes[1], optimize=True)
        inside = pasted > 0
        probabilities = np.where(inside, 1.0 / (1.0 + np.exp(-pasted)), 0.0)
        area = inside.reshape(len(chunk), -1).sum(1)
        scores[start : start + len(chunk)] = probabilities.reshape(len(chunk), -1).sum(1) / (
            area + 1e-6
        )
        masks[start : start + len(chunk)] = inside
    return masks, scores


def _mask_rle(mask: np.ndarray) -> Dict:
    """Uncompressed COCO RLE of an (H, W) bool mask: run lengths in column-major order, the
    first run of zeros (possibly empty)."""
    flat = mask.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _draw(image: np.ndarray, detections: List[Dict], input_format: str) -> Image.Image:
    rgb = image[:, :, ::-1] if input_format == "BGR" else image
    blended = rgb.astype(np.float32)
    for k, detection in enumerate(detections):
        if "mask_array" in detection:
            colour = np.array(_PALETTE[k % len(_PALETTE)], dtype=np.float32)
            inside = detection["mask_array"]
            blended[inside] = 0.5 * blended[inside] + 0.5 * colour
    canvas = Image.fromarray(np.rint(blended).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for detection in detections:
        x0, y0, x1, y1 = detection["box"]
        draw.rectangle([x0, y0, x1, y1], outline=(0, 255, 0), width=2)
        label = f"{detection['class_name']} {detection['score']:.2f}"
        draw.text((x0 + 2, y0 + 1), label, fill=(255, 255, 0))
    return canvas


def _output_names(paths: Sequence[str]) -> List[str]:
    names, used = [], set()
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, k = f"{stem}.png", 0
        while name in used:
            k += 1
            name = f"{stem}_{k}.png"
        used.add(name)
        names.append(name)
    return names


def predict_images(
    predictor: OnnxPredictor,
    paths: Sequence[str],
    output_dir: str,
    *,
    score_threshold: float = 0.3,
    overwrite: bool = False,
    extra: Optional[Dict] = None,
) -> Dict:
    """Detects, draws and writes ``output_dir/<name>.png`` and ``detections.json``."""
    names = _output_names(paths)
    targets = [os.path.join(output_dir, n) for n in [*names, DETECTIONS_FILE]]
    existing = [t for t in targets if os.path.exists(t)]
    if existing and not overwrite:
        raise InputError(f"{', '.join(existing[:3])} already exist(s); use --overwrite to replace")
    os.makedirs(output_dir, exist_ok=True)
    results = {**(extra or {}), "score_threshold": score_threshold, "images": []}
    for path, name in zip(paths, names):
        image = read_image(path, predictor.input_format)
        (found,) = predictor([image])
        order = np.argsort(-found["scores"], kind="stable")
        detections = []
        for j in order:
            if found["scores"][j] < score_threshold:
                continue
            detection = {
                "box": [round(float(v), 2) for v in found["boxes"][j]],
                "score": round(float(found["scores"][j]), 4),
                "class_id": int(found["classes"][j]),
                "class_name": predictor.class_name(int(found["classes"][j])),
            }
            if "masks" in found:
                detection["mask_array"] = found["masks"][j]
            detections.append(detection)
        _draw(image, detections, predictor.input_format).save(os.path.join(output_dir, name))
        for detection in detections:
            if "mask_array" in detection:
                detection["mask"] = _mask_rle(detection.pop("mask_array"))
        results["images"].append(
            {
                "file": path,
                "height": int(image.shape[0]),
                "width": int(image.shape[1]),
                "visualization": name,
                "detections": detections,
            }
        )
        print(f"{path}: {len(detections)} detection(s) with score >= {score_threshold} -> {name}")
    with open(os.path.join(output_dir, DETECTIONS_FILE), "w") as f:
        json.dump(results, f, indent=2)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="the exported .onnx file")
    parser.add_argument("--input", nargs="+", required=True, help="images, folders or globs")
    parser.add_argument("--output", required=True, help="folder for the PNGs and detections.json")
    parser.add_argument("--preprocessing", help="the model's JSON (default: MODEL with .json)")
    parser.add_argument("--score-threshold", type=float, default=0.3)
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument(
        "--custom-op-library",
        help="dino_d2's onnxruntime library (dino_d2/_onnxruntime_msda*.so) for an export made "
        "with --msda-backend node (default: such a file beside the model)",
    )
    args = parser.parse_args(argv)
    try:
        if not os.path.isfile(args.model):
            raise InputError(f"the model {args.model} does not exist")
        paths = collect_images(args.input)
        preprocessing = load_preprocessing(args.model, args.preprocessing)
        predictor = OnnxPredictor(
            args.model, preprocessing, custom_op_library=args.custom_op_library
        )
        predict_images(
            predictor,
            paths,
            args.output,
            score_threshold=args.score_threshold,
            overwrite=args.overwrite,
            extra={"model": args.model},
        )
    except InputError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {os.path.join(args.output, DETECTIONS_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
