"""Batches of one dataset for an epoch, planned for every training process at once.

A global batch holds up to `batch_size x num_processes` samples of ONE bucket; process r takes its r-th share.
So at every step all processes work on the same image size (none waits for another's larger bucket), all get the
same number of batches, and each sample is used once per epoch across the processes. When the last global batch
of a bucket has fewer samples than processes, a few samples of that bucket are used twice so that no process goes
without (at most num_processes - 1 per bucket, as torch's DistributedSampler pads).
"""

from __future__ import annotations

import numpy as np


def count_batches(per_bucket: np.ndarray, batch_size: int, num_processes: int = 1) -> int:
    """Steps per epoch for samples counted per bucket."""
    per_step = batch_size * num_processes
    return int((-(-per_bucket // per_step)).sum())


def plan_batches(
    sample_buckets: np.ndarray, num_buckets: int, batch_size: int, num_processes: int, rng: np.random.Generator
) -> list[list[np.ndarray]]:
    """Global batches as lists of `num_processes` arrays of sample ids (one per process), bucket by bucket.

    Samples are shuffled within their bucket; a process's share never exceeds `batch_size`.
    """
    shuffled = rng.permutation(len(sample_buckets))
    by_bucket = shuffled[np.argsort(sample_buckets[shuffled], kind="stable")]
    per_bucket = np.bincount(sample_buckets, minlength=num_buckets)
    per_step = batch_size * num_processes
    batches = []
    start = 0
    for count in per_bucket.tolist():
        bucket_ids = by_bucket[start : start + count]
        start += count
        for offset in range(0, count, per_step):
            batches.append(_share(bucket_ids[offset : offset + per_step], bucket_ids, batch_size, num_processes))
    return batches


def _share(ids: np.ndarray, bucket_ids: np.ndarray, batch_size: int, num_processes: int) -> list[np.ndarray]:
    if len(ids) == batch_size * num_processes:
        return [ids[rank * batch_size : (rank + 1) * batch_size] for rank in range(num_processes)]
    if len(ids) < num_processes:
        ids = np.concatenate([ids, np.resize(bucket_ids, num_processes - len(ids))])
    return np.array_split(ids, num_processes)  # sizes differ by at most one
