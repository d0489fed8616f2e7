"""Aspect-ratio buckets: the allowed training sizes of a dataset and which one each image uses."""

from __future__ import annotations

import numpy as np

# Guards the floor to bucket steps against float error (511.99999 must count as 512).
_ROUNDING_SLACK = 1e-6


def bucket_sizes(resolution: tuple[int, int], min_reso: int, max_reso: int, steps: int) -> np.ndarray:
    """All (width, height) with sides multiples of `steps` in [min_reso, max_reso] and area <= the resolution's.

    For each width the tallest height that fits is taken, and its transpose too, so portrait and landscape images
    get mirrored choices. Returns an int64 array (K, 2) sorted by width.
    """
    max_area = resolution[0] * resolution[1]
    sizes: set[tuple[int, int]] = set()
    for width in range(min_reso, max_reso + 1, steps):
        height = min(max_reso, max_area // width // steps * steps)
        if height >= min_reso:
            sizes.add((width, height))
            sizes.add((height, width))
    return np.array(sorted(sizes), dtype=np.int64).reshape(-1, 2)


def nearest_buckets(image_sizes: np.ndarray, buckets: np.ndarray) -> np.ndarray:
    """For each image (N, 2) [width, height], the index of the bucket with the nearest aspect ratio.

    Ratios are compared on a log scale so that 2:1 and 1:2 are equally far from 1:1.
    """
    image_ratios = np.log(image_sizes[:, 0] / image_sizes[:, 1])  # (N,)
    bucket_ratios = np.log(buckets[:, 0] / buckets[:, 1])  # (K,)
    return np.abs(image_ratios[:, None] - bucket_ratios[None, :]).argmin(axis=1)


def no_upscale_sizes(image_sizes: np.ndarray, resolution: tuple[int, int], max_reso: int, steps: int) -> np.ndarray:
    """Per-image buckets (N, 2) for bucket_no_upscale: never enlarge an image.

    An image is shrunk (keeping its aspect ratio) only as far as needed to fit the resolution's area and
    `max_reso` per side, then each side is rounded down to a multiple of `steps` (at least `steps`).
    """
    sizes = image_sizes.astype(np.float64)
    max_area = resolution[0] * resolution[1]
    scale = np.minimum.reduce(
        [
            np.ones(len(sizes)),
            np.sqrt(max_area / (sizes[:, 0] * sizes[:, 1])),
            max_reso / sizes[:, 0],
            max_reso / sizes[:, 1],
        ]
    )
    scaled = sizes * scale[:, None]
    rounded = np.floor(scaled / steps + _ROUNDING_SLACK).astype(np.int64) * steps
    return np.maximum(rounded, steps)


def assign_buckets(
    image_sizes: np.ndarray,
    resolution: tuple[int, int],
    enable_bucket: bool,
    no_upscale: bool,
    min_reso: int,
    max_reso: int,
    steps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Buckets of a dataset: returns (sizes (K, 2) [width, height] sorted, bucket index per image (N,))."""
    if not enable_bucket:
        return np.array([resolution], dtype=np.int64), np.zeros(len(image_sizes), dtype=np.int64)
    if no_upscale:
        per_image = no_upscale_sizes(image_sizes, resolution, max_reso, steps)
        sizes, index = np.unique(per_image, axis=0, return_inverse=True)
        return sizes, index.reshape(-1)
    sizes = bucket_sizes(resolution, min_reso, max_reso, steps)
    return sizes, nearest_buckets(image_sizes, sizes)
