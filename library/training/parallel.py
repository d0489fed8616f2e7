"""Several training processes (`accelerate launch --num_processes N`, one or several machines).

Every process runs the same loop on its own share of each global batch. What they must agree on lives here:

- gradients: the trained modules are wrapped in torch's DistributedDataParallel, so their gradients are averaged
  in buckets while backward still runs (communication overlaps compute) and accumulation steps skip the exchange;
  fused optimizers (which step inside backward) and block swapping (whose weights change device during the step)
  keep the plain all-reduce after backward;
- randomness: noise and timesteps are drawn for the whole global batch from the generator every process holds in
  the same state, and each process takes its slice, so N processes x batch B train exactly like 1 process x N*B;
- stopping: a stop request (Ctrl-C, SIGTERM) or an unreadable image on any process stops every process at the same
  step, after one save;
- work done once: disk caches are written by the main process while the others wait, then read by them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace

import torch

from library.families.base import TrainingInputs

logger = logging.getLogger(__name__)


def world() -> tuple[int, int]:
    """(number of processes, this process's index); (1, 0) without torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the body on the main process first, then on the others (which then find what it wrote)."""
    import torch.distributed as dist

    count, index = world()
    if count > 1 and index != 0:
        dist.barrier()
    try:
        yield
    finally:
        if count > 1 and index == 0:
            dist.barrier()


def broadcast_from_main(value):
    """The main process's `value` on every process (a picklable object)."""
    import torch.distributed as dist

    if world()[0] == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all processes (the value itself with one process)."""
    import torch.distributed as dist

    count = world()[0]
    if count == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / count


def agree(failure: str | None, stop: bool, device: torch.device) -> tuple[str | None, bool]:
    """What every process must act on before the next batch: the first failure message any process met and whether
    any process was asked to stop. One small all-reduce; the messages travel only when a failure happened."""
    import torch.distributed as dist

    if world()[0] == 1:
        return failure, stop
    flags = torch.tensor([failure is not None, stop], dtype=torch.int32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags[0].item():
        messages: list[str | None] = [None] * world()[0]
        dist.all_gather_object(messages, failure)
        failure = next(message for message in messages if message is not None)
    return failure, bool(flags[1].item())


def decorrelate_random_streams(seed: int) -> None:
    """Give every process but the main one global random streams of its own (VAE sampling of uncached latents,
    dropout), so the processes do not draw the same values for different images. The main process keeps its stream,
    so one process trains exactly as before; everything drawn before this (model set-up, caches) was the same on all.
    """
    count, index = world()
    if count > 1 and index > 0:
        torch.manual_seed((seed * 7919 + index) % 2**63)


def global_batch_inputs(
    draw: Callable[[torch.Tensor], TrainingInputs], latents: torch.Tensor, processes: tuple[int, int]
) -> TrainingInputs:
    """`draw(latents)` as if every process's latents were in one batch: the random draws are made for the global
    batch (with this process's latents in its slice, zeros elsewhere) and this process keeps its slice.

    Every process holds the noise generator in the same state, so all make the same draws and stay in step; the
    draws equal those of one process given the whole global batch. Objectives are per sample, so the other
    processes' (zero) latents do not change this slice.
    """
    count, index = processes
    if count == 1:
        return draw(latents)
    size = latents.shape[0]
    full = latents.new_zeros((size * count, *latents.shape[1:]))
    full[index * size : (index + 1) * size] = latents
    inputs = draw(full)
    part = slice(index * size, (index + 1) * size)
    return replace(inputs, **{f.name: getattr(inputs, f.name)[part] for f in fields(inputs)})


class _TrainedModules(torch.nn.Module):
    """The trained modules as one module for DistributedDataParallel. Its forward runs the step's loss computation,
    which reaches the modules through the frozen models (LoRA hooks, the family's calls); DDP only needs their
    parameters to be its own and the loss to come out of its forward."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        super().__init__()
        self.trained = torch.nn.ModuleList(modules)

    def forward(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return compute()


@dataclass
class DataParallel:
    """How this run's gradients meet across processes (see the module's docstring)."""

    processes: tuple[int, int] = (1, 0)
    wrapper: torch.nn.Module | None = None  # DistributedDataParallel over the trained modules, when used
    sharded: list[torch.nn.Module] = field(default_factory=list)  # FSDP roots (library/training/sharding.py)

    @property
    def averages_gradients(self) -> bool:
        """Whether backward itself leaves the averaged gradients (else the loop all-reduces them)."""
        return self.wrapper is not None or bool(self.sharded)

    @property
    def every_process_evaluates(self) -> bool:
        """Sharded modules run only with every process taking part: samples and validation run on all of them
        (the main process writes and logs); otherwise the main process evaluates alone."""
        return bool(self.sharded)

    def full_weights(self):
        """Context in which the main process's trained modules hold their full weights (for saving)."""
        if not self.sharded:
            return contextlib.nullcontext()
        from library.training.sharding import full_weights

        return full_weights(self.sharded, self.processes[1] == 0)

    def loss(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run the loss computation (through DDP when used)."""
        return compute() if self.wrapper is None else self.wrapper(compute)

    def accumulating(self, skip_exchange: bool):
        """Context for forward and backward of a batch; `skip_exchange` for all batches of an accumulation group
        but the last (their gradients add up locally and are exchanged once, with the last one's)."""
        if self.sharded:
            for root in self.sharded:
                root.set_requires_gradient_sync(not skip_exchange)
            return contextlib.nullcontext()
        if self.wrapper is None or not skip_exchange:
            return contextlib.nullcontext()
        return self.wrapper.no_sync()


def data_parallel(
    accelerator,
    modules: list[torch.nn.Module],
    plain_reason: str | None,
    every_parameter_used: bool = True,
    sharded: list[torch.nn.Module] | None = None,
    accumulation: int = 1,
) -> DataParallel:
    """Wrap the trained modules for gradient exchange with overlap (one process: nothing to do).

    `plain_reason` names what rules DDP out for this run (the loop then all-reduces after backward);
    `every_parameter_used`: every step uses the same trained parameters; `accumulation`: batches per optimizer step.
    """
    processes = (accelerator.num_processes, accelerator.process_index)
    if processes[0] == 1:
        return DataParallel(processes)
    if sharded:
        logger.info("%d processes: FSDP reduce-scatters the gradients of the sharded modules", processes[0])
        return DataParallel(processes, sharded=list(sharded))
    if plain_reason:
        logger.info("%d processes: gradients are averaged after backward (%s)", processes[0], plain_reason)
        return DataParallel(processes)
    from torch.nn.parallel import DistributedDataParallel

    device = accelerator.device
    static = every_parameter_used and accumulation == 1
    wrapper = DistributedDataParallel(
        _TrainedModules(modules),
        device_ids=[device.index] if device.type == "cuda" else None,
        forward_sync_buffers=False,  # buffers are equal everywhere (synced once at the start); trained ones are params
        # The same parameters every step (some perhaps never: a LoRA on a text-encoder layer whose output is not
        # used): DDP learns them in the first step. Otherwise, and with accumulation (a static graph cannot skip
        # the exchange of its first batches), it looks for the unused ones in every step.
        static_graph=static,
        find_unused_parameters=not static,
        gradient_as_bucket_view=True,
    )
    logger.info("%d processes: gradients are averaged by DistributedDataParallel during backward", processes[0])
    return DataParallel(processes, wrapper)
