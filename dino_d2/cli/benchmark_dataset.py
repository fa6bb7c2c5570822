"""Time and memory of the COCO-format data path: the memory-mapped cache against the json read
whole.

    python tools/make_synthetic_coco.py /data/o365_synthetic.json --scale 0.01
    python tools/benchmark_dataset.py /data/o365_synthetic.json
    python tools/benchmark_dataset.py /data/o365_synthetic.json --json-path

Each figure is measured in fresh processes (``spawn``), so that nothing the benchmark itself
holds is counted:

* conversion: the json converted into its cache (the existing cache of this json content is
  removed first), in a child process; its wall time and peak resident memory (``ru_maxrss``),
  beside the resident memory of the same process after its imports;
* start-up: registration of the dataset (finding the cache) plus opening the loader's dataset
  and reading its first record, in a fresh process;
* records per second: ``--reads`` records at random indices (seeded) through the dataset;
* memory of a job of ``--ranks`` processes with ``--workers`` data-loader workers each (forked,
  as on Linux): every process's PSS (``memory_full_info().pss``: shared pages divided among the
  processes sharing them), after reading ``--reads`` random records per rank and again after
  every process touched every page of the dataset's memory (the maps, or Detectron2's serialized
  list). The dataset's added PSS per process is the job's total PSS minus that of the same job
  over an empty dataset of the same length, divided by the number of processes.

``--json-path`` adds the same figures for the json read whole (``dataset.cache=False``, then
Detectron2's ``DatasetFromList``), whose memory grows with the json: run it at a size it
survives. The targets are printed beside the figures.
"""

import argparse
import gc
import multiprocessing
import os
import random
import shutil
import sys
import time
from typing import Dict, List, Set

import numpy as np
import psutil
import torch

__all__ = ["measure", "main"]

_TARGETS = {
    "convert_peak_rss_mb": "<= 8192 (full size)",
    "startup_s": "",
    "records_per_s": ">= 10000",
    "added_pss_mb": "<= 300",
}
_NAME = "benchmark_dataset"


def _mb(value: float) -> float:
    return value / 1024**2


def _convert(json_file: str, queue) -> None:
    from dino_d2.data.coco_cache import cache_folder, cache_key, ensure_cache
    from dino_d2.measure.memory import peak_rss_mb

    shutil.rmtree(os.path.join(cache_folder(json_file), cache_key(json_file)), ignore_errors=True)
    imports_rss = peak_rss_mb()
    start = time.perf_counter()
    ensure_cache(json_file)
    queue.put(
        {
            "convert_s": time.perf_counter() - start,
            "convert_peak_rss_mb": peak_rss_mb(),
            "convert_imports_rss_mb": imports_rss,
        }
    )


def _open(json_file: str, image_root: str, cache: bool):
    """Registers the json and returns the data loader's dataset (as the training script does)."""
    from detectron2.data.common import DatasetFromList

    from dino_d2.data import get_detection_dataset, register_coco_format_dataset

    register_coco_format_dataset(_NAME, json_file, image_root, cache=cache)
    dataset = get_detection_dataset(_NAME, filter_empty=False)
    return DatasetFromList(dataset, copy=False) if isinstance(dataset, list) else dataset


def _speed(json_file: str, image_root: str, cache: bool, reads: int, queue) -> None:
    from dino_d2.measure.memory import peak_rss_mb

    start = time.perf_counter()
    dataset = _open(json_file, image_root, cache)
    dataset[0]
    startup = time.perf_counter() - start
    # Before the reads: the pages of the maps they touch count in the resident memory too.
    startup_rss = peak_rss_mb()
    indices = random.Random(0).choices(range(len(dataset)), k=reads)
    start = time.perf_counter()
    for index in indices:
        dataset[index]
    queue.put(
        {
            "startup_s": startup,
            "records_per_s": reads / (time.perf_counter() - start),
            "startup_peak_rss_mb": startup_rss,
        }
    )


def _touch(dataset) -> int:
    """Reads one byte of every page of the dataset's memory; returns the bytes covered."""
    if hasattr(dataset, "maps"):  # CachedCocoDataset
        arrays = list(dataset.maps().values())
    else:  # Detectron2's DatasetFromList, serialized
        arrays = [getattr(dataset, "_lst", None), getattr(dataset, "_addr", None)]
    total = 0
    for array in arrays:
        if isinstance(array, np.ndarray) and array.size:
            flat = array.reshape(-1).view(np.uint8)
            int(flat[:: os.sysconf("SC_PAGE_SIZE")].sum())
            total += flat.nbytes
    return total


class _Probe(torch.utils.data.Dataset):
    """Records of ``dataset``; index -1 touches every page of it instead (in the worker)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if index < 0:
            return _touch(self.dataset) if self.dataset is not None else 0
        return self.dataset[index] if self.dataset is not None else {}


class _Phases(torch.utils.data.Sampler):
    """The indices of the current phase (set between epochs by the rank process)."""

    def __init__(self):
        self.indices = []

    def __iter__(self):
        return iter(list(self.indices))

    def __len__(self):
        return len(self.indices)


def _pss(process: psutil.Process, others: Set[int]) -> List[float]:
    """PSS in MiB of ``process`` and of its children but ``others`` (processes it had before
    its data loader started: not part of the measured job)."""
    children = [p for p in process.children(recursive=True) if p.pid not in others]
    return [_mb(p.memory_full_info().pss) for p in [process] + children]


def _job_memory(process: psutil.Process, loader, sampler, indices, workers, barrier):
    others = {p.pid for p in process.children(recursive=True)}
    sampler.indices = indices
    for _ in loader:
        pass
    barrier.wait()
    before = _pss(process, others)
    barrier.wait()
    sampler.indices = [-1] * workers
    touched = sum(loader)
    touched += _touch(loader.dataset.dataset) if loader.dataset.dataset is not None else 0
    barrier.wait()
    after = _pss(process, others)
    barrier.wait()
    return before, after, int(touched)


def _rank(json_file, image_root, cache, reads, workers, barrier, queue) -> None:
    """One rank: an empty dataset's job first (the baseline), then the dataset's."""
    process = psutil.Process()
    results = {}
    for phase in ("empty", "dataset"):
        dataset = _open(json_file, image_root, cache) if phase == "dataset" else None
        length = len(dataset) if dataset is not None else reads
        sampler = _Phases()
        loader = torch.utils.data.DataLoader(
            _Probe(dataset),
            sampler=sampler,
            batch_size=None,
            num_workers=workers,
            persistent_workers=True,
            multiprocessing_context="fork",
        )
        indices = random.Random(os.getpid()).choices(range(length), k=reads)
        results[phase] = _job_memory(process, loader, sampler, indices, workers, barrier)
        del loader, dataset
        gc.collect()
    queue.put(results)


def _child(target, *args) -> Dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    if process.exitcode:
        raise RuntimeError(f"the child process measuring {target.__name__} failed")
    return result


def _job(json_file, image_root, cache, reads, ranks, workers) -> Dict:
    context = multiprocessing.get_context("spawn")
    queue, barrier = context.Queue(), context.Barrier(ranks)
    processes = [
        context.Process(
            target=_rank, args=(json_file, image_root, cache, reads, workers, barrier, queue)
        )
        for _ in range(ranks)
    ]
    for process in processes:
        process.start()
    results = [queue.get() for _ in processes]
    for process in processes:
        process.join()
    count = ranks * (1 + workers)
    empty_total = sum(sum(r["empty"][1]) for r in results)
    before_total = sum(sum(r["dataset"][0]) for r in results)
    after_total = sum(sum(r["dataset"][1]) for r in results)
    return {
        "job_processes": count,
        "pss_before_touch_mb": [round(v) for r in results for v in r["dataset"][0]],
        "pss_after_touch_mb": [round(v) for r in results for v in r["dataset"][1]],
        "touched_mb": _mb(results[0]["dataset"][2]),
        "added_pss_before_touch_mb": (before_total - empty_total) / count,
        "added_pss_mb": (after_total - empty_total) / count,
    }


def measure(json_file: str, image_root: str, *, cache: bool, reads: int, ranks: int, workers: int):
    """The figures of the module docstring for one path (``cache`` or the json read whole)."""
    results = _child(_convert, json_file) if cache else {}
    results.update(_child(_speed, json_file, image_root, cache, reads))
    results.update(_job(json_file, image_root, cache, reads, ranks, workers))
    return results


_ROWS = (
    ("convert_s", "conversion time (s)", "{:.1f}"),
    ("convert_peak_rss_mb", "conversion peak RSS (MiB)", "{:.0f}"),
    ("convert_imports_rss_mb", "  peak RSS before converting (MiB)", "{:.0f}"),
    ("startup_s", "start-up: register + open + 1st record (s)", "{:.3f}"),
    ("startup_peak_rss_mb", "start-up process peak RSS (MiB)", "{:.0f}"),
    ("records_per_s", "records per second (random indices)", "{:,.0f}"),
    ("added_pss_before_touch_mb", "dataset's added PSS per process, read (MiB)", "{:.0f}"),
    ("added_pss_mb", "dataset's added PSS per process, all pages (MiB)", "{:.0f}"),
    ("pss_after_touch_mb", "PSS of each process, all pages (MiB)", "{}"),
)


def _table(columns: Dict[str, Dict]) -> str:
    names = list(columns)
    header = ["", *names, "target"]
    rows = [header]
    for key, label, fmt in _ROWS:
        cells = [fmt.format(columns[n][key]) if key in columns[n] else "-" for n in names]
        rows.append([label, *cells, _TARGETS.get(key, "")])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
        for row in rows
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.epilog = __doc__.split("\n", 2)[2]
    parser.add_argument("json_file", help="a COCO-format json (e.g. tools/make_synthetic_coco.py)")
    parser.add_argument(
        "--image-root", default=None, help="its image folder (default: the json's folder)"
    )
    parser.add_argument("--json-path", action="store_true", help="also measure the json path")
    parser.add_argument("--reads", type=int, default=20000, help="random records read per rank")
    parser.add_argument("--ranks", type=int, default=2, help="processes of the memory job")
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers per rank")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    json_file = os.path.abspath(args.json_file)
    image_root = os.path.abspath(args.image_root or os.path.dirname(json_file))
    size = os.path.getsize(json_file)
    print(f"{json_file}: {size / 1e6:.1f} MB", file=sys.stderr)
    columns = {}
    paths = {"cache": True, "json path": False} if args.json_path else {"cache": True}
    for name, cache in paths.items():
        print(f"measuring the {name}...", file=sys.stderr)
        columns[name] = measure(
            json_file,
            image_root,
            cache=cache,
            reads=args.reads,
            ranks=args.ranks,
            workers=args.workers,
        )
    print(
        f"{json_file} ({size / 1e6:.1f} MB); memory job: {args.ranks} ranks x {args.workers} "
        f"workers; {args.reads} random reads per rank"
    )
    print(_table(columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
