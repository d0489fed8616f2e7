"""Batching for several training processes, simulated as two ranks over the same dataset."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from library.data.batching import count_batches, plan_batches
from tests.dataset_helpers import group_of, one_dataset, subset_lines, write_images


def _two_ranks(tmp_path, batch_size: int = 2, seed: int = 4):
    # 7 square images and 4 wide ones (with bucketing: two buckets).
    folder = write_images(tmp_path / "a", [(32, 32)] * 7 + [(64, 32)] * 4)
    dataset = f"resolution = 32\nbatch_size = {batch_size}\nenable_bucket = true\nmin_bucket_reso = 16\n"
    dataset += "max_bucket_reso = 64\nbucket_reso_steps = 16"
    path = one_dataset(tmp_path, dataset, subset_lines(folder))
    return [group_of(path, seed=seed, num_processes=2, process_index=rank) for rank in (0, 1)]


def test_ranks_get_equal_batch_counts_from_the_same_bucket_at_every_step(tmp_path):
    rank0, rank1 = _two_ranks(tmp_path)
    assert len(rank0) == len(rank1) == 3  # buckets of 7 and 4 in global batches of 4: 2 + 1
    dataset = rank0.datasets[0]
    for (d0, ids0), (d1, ids1) in zip(rank0.batch_plan(), rank1.batch_plan(), strict=True):
        buckets = {int(dataset.bucket_of_image[dataset.samples[i]]) for i in ids0 + ids1}
        assert d0 == d1 and len(buckets) == 1
        assert 1 <= len(ids0) <= 2 and 1 <= len(ids1) <= 2


def test_each_sample_is_used_once_per_epoch_across_ranks(tmp_path):
    rank0, rank1 = _two_ranks(tmp_path)
    for epoch in (0, 1):
        rank0.set_epoch(epoch)
        rank1.set_epoch(epoch)
        used = Counter(i for group in (rank0, rank1) for _, ids in group.batch_plan() for i in ids)
        # Bucket of 7: the last global batch has 3 samples for 2 ranks (2 + 1), so nothing is used twice.
        assert sorted(used) == list(range(11)) and set(used.values()) == {1}


def test_batch_tensors_match_between_ranks_per_step(tmp_path):
    rank0, rank1 = _two_ranks(tmp_path)
    for index in range(len(rank0)):
        assert rank0[index]["target_size"] == rank1[index]["target_size"]


def test_plan_pads_a_bucket_smaller_than_the_number_of_processes():
    sample_buckets = np.array([0, 0, 0, 0, 1])  # bucket 1 has one sample for 4 processes
    batches = plan_batches(sample_buckets, 2, batch_size=1, num_processes=4, rng=np.random.default_rng(0))
    assert [len(shares) for shares in batches] == [4, 4]
    assert [sorted(np.concatenate(shares).tolist()) for shares in batches] == [[0, 1, 2, 3], [4, 4, 4, 4]]


def test_single_process_plan_keeps_full_batches_and_a_last_partial_one():
    batches = plan_batches(np.zeros(9, dtype=np.int64), 1, batch_size=4, num_processes=1, rng=np.random.default_rng(0))
    assert [len(shares[0]) for shares in batches] == [4, 4, 1]
    assert count_batches(np.array([9, 4]), batch_size=4) == 4
    assert count_batches(np.array([9, 4]), batch_size=2, num_processes=2) == 4


def test_set_processes_rejects_a_rank_outside_the_group(tmp_path):
    rank0, _ = _two_ranks(tmp_path)
    with pytest.raises(ValueError, match="process 2 of 2 does not exist"):
        rank0.set_processes(2, 2)


def test_dataloader_set_epoch_reaches_the_group(tmp_path):
    rank0, _ = _two_ranks(tmp_path)
    loader = rank0.make_dataloader(num_workers=0, persistent=False)
    epoch0 = rank0.batch_plan()
    loader.set_epoch(1)
    assert rank0.batch_plan() != epoch0
