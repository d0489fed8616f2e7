"""Unit tests of the loop's helpers: gradient averaging across processes, buckets, step-save discovery."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from library.training.saving import step_saves
from library.training.trainer import _average_gradients, _buckets


def _average_in_rank(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    params[0].grad = torch.full((3,), float(rank + 1))
    params[1].grad = torch.full((2, 2), float(10 * (rank + 1)))
    _average_gradients(params, world)
    results[rank] = (params[0].grad.tolist(), params[1].grad.tolist())
    dist.destroy_process_group()


def test_average_gradients_gives_every_process_the_mean():
    manager = mp.Manager()
    results = manager.dict()
    port = 29500 + os.getpid() % 1000
    mp.spawn(_average_in_rank, args=(2, port, results), nprocs=2, join=True)
    assert results[0] == results[1] == ([1.5, 1.5, 1.5], [[15.0, 15.0], [15.0, 15.0]])


def test_buckets_respect_the_limit_and_keep_order():
    tensors = [torch.zeros(n) for n in (3, 3, 5, 1, 10)]
    sizes = [[t.numel() for t in bucket] for bucket in _buckets(tensors, 6)]
    assert sizes == [[3, 3], [5, 1], [10]]


def test_step_saves_finds_files_folders_and_states(tmp_path):
    for name in ("run-step00000002.safetensors", "run-step00000002-state", "run-step00000004", "other-step00000001.pt"):
        path = tmp_path / name
        path.mkdir() if "." not in name else path.write_text("x")
    found = sorted((step, os.path.basename(path)) for step, path in step_saves(str(tmp_path), "run"))
    assert found == [(2, "run-step00000002-state"), (2, "run-step00000002.safetensors"), (4, "run-step00000004")]


def test_textual_inversion_has_its_own_learning_rate_default():
    from library.families import get_family_class
    from library.methods import get_method_class
    from library.training.entry import build_parser

    family = get_family_class("sd")
    ti = build_parser(family, get_method_class("textual_inversion"), "")
    network = build_parser(family, get_method_class("network"), "")
    required = ["--pretrained_model_name_or_path", "m", "--output_dir", "o", "--token_string", "tok",
                "--init_word", "dog"]
    assert ti.parse_args(required).learning_rate == 5e-3
    assert ti.parse_args([*required, "--learning_rate", "1e-4"]).learning_rate == 1e-4
    assert network.parse_args(required[:4]).learning_rate == 2e-6
