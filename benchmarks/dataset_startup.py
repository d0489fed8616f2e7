"""Dataset start-up time (config -> ready to batch) and peak memory for 10,000 images of mixed sizes.

Usage: python benchmarks/dataset_startup.py [--folder /tmp/dataset_startup_bench] [--count 10000]

The images (PNG and JPEG, 64..768 px per side, half with caption files) are generated once into --folder and
reused. Each measurement runs in a fresh Python process and prints one JSON line:
{"name", "family": null, "settings", "device": "cpu", "seconds", "peak_rss_bytes", "versions", ...}
(benchmarks/harness.py); with --results the lines are also appended to that file.
- cold: the image and caption files are evicted from the OS page cache first (posix_fadvise DONTNEED; folder
  entries stay cached), no metadata cache;
- warm: the same again, files now in the page cache;
- cache_info_first: cache_info = true without a cache file (the scan writes metadata_cache.json);
- cache_info_warm: cache_info = true with the cache file present.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from multiprocessing import Pool

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness

REPO_ROOT = harness.REPO_ROOT
SUBSETS = 4  # the images are spread over this many folders (subsets), as real datasets often are


def _write_image(task: tuple[str, int, int, int]) -> None:
    import numpy as np
    from PIL import Image

    path, width, height, seed = task
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, 3)
    ramp = np.linspace(0, 60, width, dtype=np.float32)[None, :, None]
    pixels = np.clip(base[None, None, :] + ramp + rng.normal(0, 4, (height, 1, 1)), 0, 255).astype(np.uint8)
    pixels = np.broadcast_to(pixels, (height, width, 3))
    Image.fromarray(np.ascontiguousarray(pixels)).save(path, quality=90)


def generate(folder: str, count: int) -> None:
    """Write the images once; a marker file says the set is complete."""
    marker = os.path.join(folder, f"complete_{count}")
    if os.path.exists(marker):
        return
    import numpy as np

    rng = np.random.default_rng(0)
    tasks = []
    for index in range(count):
        subset = os.path.join(folder, f"subset{index % SUBSETS}")
        os.makedirs(subset, exist_ok=True)
        width, height = (int(side) for side in rng.integers(2, 25, 2) * 32)
        extension = ".png" if index % 2 else ".jpg"
        tasks.append((os.path.join(subset, f"img{index:05d}{extension}"), width, height, index))
        if index % 4 < 2:
            with open(os.path.join(subset, f"img{index:05d}.txt"), "w", encoding="utf-8") as file:
                file.write(f"a picture, number {index}, tag{index % 7}, tag{index % 11}\n")
    started = time.perf_counter()
    with Pool(os.cpu_count() or 1) as pool:
        pool.map(_write_image, tasks, chunksize=64)
    open(marker, "w").close()
    print(f"generated {count} images in {time.perf_counter() - started:.0f} s into {folder}", file=sys.stderr)


def write_config(folder: str, cache_info: bool) -> str:
    lines = ["[general]", "enable_bucket = true", "caption_extension = '.txt'", "shuffle_caption = true"]
    lines += [f"cache_info = {str(cache_info).lower()}", "", "[[datasets]]", "resolution = 512", "batch_size = 4"]
    for index in range(SUBSETS):
        subset_dir = os.path.join(folder, f"subset{index}").replace("\\", "/")
        lines += ["[[datasets.subsets]]", f"image_dir = '{subset_dir}'", "class_tokens = 'sks thing'"]
    path = os.path.join(folder, f"bench_{'cache' if cache_info else 'plain'}.toml")
    with open(path, "w", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")
    return path


def evict_page_cache(folder: str) -> None:
    """Ask the OS to drop the files' cached pages (no root needed; works for files not being written)."""
    for root, _, names in os.walk(folder):
        for name in names:
            descriptor = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)


def remove_caches(folder: str) -> None:
    for index in range(SUBSETS):
        path = os.path.join(folder, f"subset{index}", "metadata_cache.json")
        if os.path.exists(path):
            os.remove(path)


def child(config: str) -> None:
    """Measured in a fresh process: imports first (not timed), then config -> ready to batch."""
    sys.path.insert(0, REPO_ROOT)
    import logging

    from library.config.dataset_config import load_dataset_config
    from library.data.dataset import DatasetGroup

    logging.basicConfig(level=logging.WARNING)
    imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    started = time.perf_counter()
    group = DatasetGroup.from_config(load_dataset_config(config), seed=0, prior_loss_weight=1.0)
    steps = len(group)
    group.batch_plan()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    counts = {"steps": steps, "images": group.num_train_images, "imported": imported}
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak} | counts))


def measure(name: str, config: str, settings: dict, results: str | None) -> None:
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", config], capture_output=True, text=True, check=True
    )
    data = json.loads(result.stdout.strip().splitlines()[-1])
    # Most of the peak is the interpreter with torch imported; the rest is what the dataset itself holds.
    settings = settings | {
        "images": data["images"],
        "steps_per_epoch": data["steps"],
        "peak_rss_after_imports_bytes": data["imported"],
    }
    harness.emit(harness.make_record(name, None, settings, "cpu", [data["seconds"]], data["peak_rss_bytes"]), results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="/tmp/dataset_startup_bench", help="where the images are (generated once)")
    parser.add_argument("--count", type=int, default=10000, help="number of images")
    parser.add_argument("--results", default=None, help="also append every JSON line to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    folder = os.path.join(args.folder, str(args.count))
    generate(folder, args.count)
    plain, cached = write_config(folder, cache_info=False), write_config(folder, cache_info=True)
    settings = {"resolution": 512, "enable_bucket": True, "subsets": SUBSETS, "formats": "png+jpg"}
    remove_caches(folder)
    evict_page_cache(folder)
    runs = [
        ("dataset_startup_cold", plain, {"cache_info": False, "page_cache": "evicted"}),
        ("dataset_startup_warm", plain, {"cache_info": False, "page_cache": "warm"}),
        ("dataset_startup_cache_info_first", cached, {"cache_info": True, "cache_file": "absent"}),
        ("dataset_startup_cache_info_warm", cached, {"cache_info": True, "cache_file": "present"}),
    ]
    for name, config, extra in runs:
        measure(name, config, settings | extra, args.results)


if __name__ == "__main__":
    main()
