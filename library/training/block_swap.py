"""Memory engine for transformer block lists (FLUX, SD3, Lumina): block swapping between host and compute device,
gradient checkpointing with optional CPU offload of the checkpointed activations.

Block swapping keeps `len(blocks) - N` blocks' weights on the device. Forward: after block i (i < N) ran, its
weights leave and block `len - N + i`'s weights arrive in the tensors it freed. Backward runs the pairs in reverse,
so every block is resident when it runs and a pass ends where it began. On CUDA the copies run on a side stream
from pinned host memory and overlap the compute of the blocks in between; on any device the same plan runs (on the
CPU as plain copies), and an optional recorder logs which blocks were resident at each block's forward / backward.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from library.errors import ConfigError

logger = logging.getLogger(__name__)

MIN_RESIDENT = 2  # blocks that stay on the device in each list: one computing while the next one arrives


def add_offload_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that trade speed for device memory in transformer families."""
    parser.add_argument(
        "--blocks_to_swap",
        type=int,
        default=None,
        help="keep the weights of this many transformer blocks in CPU memory and move them to the GPU only while "
        "they run (forward and backward); more blocks: less GPU memory, slower steps",
    )
    parser.add_argument(
        "--cpu_offload_checkpointing",
        action="store_true",
        help="with --gradient_checkpointing: keep the checkpointed block inputs in CPU memory until the backward "
        "pass needs them (cannot be combined with --blocks_to_swap)",
    )
    add_fp8_arguments(parser)


def add_fp8_arguments(parser: argparse.ArgumentParser) -> None:
    """--fp8_base / --fp8_base_unet (every family; the UNet families get them without block swapping)."""
    parser.add_argument(
        "--fp8_base",
        action="store_true",
        help="store the frozen base weights (denoiser and text encoders) in float8 e4m3fn and compute in the "
        "--mixed_precision dtype; for LoRA-type training",
    )
    parser.add_argument(
        "--fp8_base_unet",
        action="store_true",
        help="like --fp8_base for the denoiser (UNet or transformer) only; the text encoders keep the "
        "--mixed_precision dtype",
    )


@dataclass
class OffloadOptions:
    """Typed block-swap, activation-offload and fp8 options."""

    blocks_to_swap: int | None = None
    cpu_offload_checkpointing: bool = False
    fp8_base: bool = False
    fp8_base_unet: bool = False
    gradient_checkpointing: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OffloadOptions:
        return cls(
            blocks_to_swap=args.blocks_to_swap or None,
            cpu_offload_checkpointing=args.cpu_offload_checkpointing,
            fp8_base=args.fp8_base,
            fp8_base_unet=args.fp8_base_unet,
            gradient_checkpointing=args.gradient_checkpointing,
        )

    def validate(self) -> None:
        if self.blocks_to_swap is not None and self.blocks_to_swap < 0:
            raise ConfigError(f"--blocks_to_swap must be 0 or more, got {self.blocks_to_swap}")
        if self.blocks_to_swap and self.cpu_offload_checkpointing:
            raise ConfigError(
                "--cpu_offload_checkpointing and --blocks_to_swap cannot be combined (both move data between CPU "
                "and GPU around each block); choose one"
            )
        if self.cpu_offload_checkpointing and not self.gradient_checkpointing:
            raise ConfigError(
                "--cpu_offload_checkpointing offloads checkpointed activations: add --gradient_checkpointing"
            )

    @property
    def active(self) -> bool:
        """Whether blocks run under BlockRunners (swapping weights or offloading checkpointed activations)."""
        return bool(self.blocks_to_swap) or self.cpu_offload_checkpointing

    @property
    def fp8_text_encoders(self) -> bool:
        return self.fp8_base

    @property
    def fp8_denoiser(self) -> bool:
        return self.fp8_base or self.fp8_base_unet


@dataclass
class ResidencyRecorder:
    """Which blocks were on the device when each block ran: (phase, block index, resident indices)."""

    events: list[tuple[str, int, tuple[int, ...]]] = field(default_factory=list)

    def record(self, phase: str, index: int, resident: list[bool]) -> None:
        self.events.append((phase, index, tuple(i for i, on_device in enumerate(resident) if on_device)))


def swap_plan(count: int, swap: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(after-forward moves, after-backward moves) as {block that just ran: (leaving, arriving)} pairs.

    Forward: after block i < swap, block i leaves and block count - swap + i arrives. Backward (blocks in reverse):
    after block j >= count - swap, block j leaves and block j - (count - swap) arrives.
    """
    resident = count - swap
    forward = [(i, resident + i) for i in range(swap)]
    backward = [(j, j - resident) for j in range(count - 1, resident - 1, -1)]
    return forward, backward


def initial_residency(count: int, swap: int) -> list[bool]:
    """Blocks on the device at the start of every pass: the first `count - swap`."""
    return [index < count - swap for index in range(count)]


class _AfterBackward(torch.autograd.Function):
    """Identity on a block's inputs; its backward runs once the block's backward is done."""

    @staticmethod
    def forward(ctx, callback: Callable[[], None], *tensors: torch.Tensor):
        ctx.callback = callback
        return tuple(tensor.view_as(tensor) for tensor in tensors)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        ctx.callback()
        return (None, *grads)


class _BeforeBackward(torch.autograd.Function):
    """Identity on a block's outputs; its backward runs just before the block's backward starts."""

    @staticmethod
    def forward(ctx, callback: Callable[[], None], *tensors: torch.Tensor):
        ctx.callback = callback
        return tuple(tensor.view_as(tensor) for tensor in tensors)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        ctx.callback()
        return (None, *grads)


def _through(function, callback: Callable[[], None], value):
    """Pass the grad-requiring tensors of `value` (a tensor, or a tuple/list/dict of them) through `function`."""
    slots: list[tuple[object, object]] = []  # (container, key) of each tensor, None container for `value` itself

    def collect(item, container, key) -> None:
        if isinstance(item, torch.Tensor) and item.requires_grad:
            slots.append((container, key))
        elif isinstance(item, (tuple, list)) and container is None:
            for position, inner in enumerate(item):
                collect(inner, item, position)

    collect(value, None, None)
    if not slots:
        return value
    tensors = [value if container is None else container[key] for container, key in slots]
    passed = function.apply(callback, *tensors)
    if slots[0][0] is None:
        return passed[0]
    items = list(value)
    for (_, key), tensor in zip(slots, passed):
        items[key] = tensor
    return type(value)(items)


class BlockRunner:
    """Runs one list of blocks under the memory plan; installed by replacing each block's `forward`."""

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        device: torch.device | str,
        blocks_to_swap: int = 0,
        checkpointing: bool = False,
        offload_activations: bool = False,
        recorder: ResidencyRecorder | None = None,
    ) -> None:
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.swap = blocks_to_swap
        if self.swap and self.swap > len(self.blocks) - MIN_RESIDENT:
            raise ConfigError(
                f"cannot swap {self.swap} of {len(self.blocks)} blocks: at most {len(self.blocks) - MIN_RESIDENT} "
                f"({MIN_RESIDENT} stay on the device)"
            )
        self.checkpointing = checkpointing
        self.offload_activations = offload_activations
        self.recorder = recorder
        self.resident = [True] * len(self.blocks)
        self.host: dict[int, list[torch.Tensor]] = {}  # host copies of swapped blocks, allocated once
        self.host_current: dict[int, bool] = {}  # whether a block's host copy holds its current weights
        self.forward_moves, self.backward_moves = (dict(moves) for moves in swap_plan(len(self.blocks), self.swap))
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda and self.swap else None
        self.arrived: dict[int, torch.cuda.Event] = {}
        for index, block in enumerate(self.blocks):
            block.forward = self._wrap(index, block.forward)

    # ---- placement -----------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Move the blocks that start a pass off the device to host memory (once, before training)."""
        for index, on_device in enumerate(initial_residency(len(self.blocks), self.swap)):
            if not on_device:
                tensors = self._tensors(index)
                self.host[index] = [self._host_tensor(tensor) for tensor in tensors]
                for host, tensor in zip(self.host[index], tensors):
                    host.copy_(tensor)
                self.host_current[index] = True
                self._assign(index, self.host[index])
                self.resident[index] = False
        for index, on_device in enumerate(self.resident):
            if on_device:
                self.blocks[index].to(self.device)

    def _tensors(self, index: int) -> list[torch.Tensor]:
        block = self.blocks[index]
        return [param.data for param in block.parameters()] + list(block.buffers())

    def _assign(self, index: int, tensors: list[torch.Tensor]) -> None:
        """Point block `index`'s parameters and buffers at `tensors` (same order as `_tensors`)."""
        block = self.blocks[index]
        params = list(block.parameters())
        for param, tensor in zip(params, tensors):
            param.data = tensor
        buffer_tensors = tensors[len(params) :]
        for (module, name), tensor in zip(_buffer_slots(block), buffer_tensors):
            module._buffers[name] = tensor

    def _host_tensor(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=self.cuda)

    def _device_tensor(self, like: torch.Tensor) -> torch.Tensor:
        """A fresh device tensor, when the leaving block's tensors do not fit (blocks of unequal shapes)."""
        return torch.empty(like.shape, dtype=like.dtype, device=self.device)

    # ---- moves ---------------------------------------------------------------------------------------------

    def _move(self, leaving: int, arriving: int) -> None:
        """Block `leaving` goes to host memory; block `arriving` takes its device tensors."""
        device_tensors = self._tensors(leaving)
        if leaving not in self.host:
            self.host[leaving] = [self._host_tensor(tensor) for tensor in device_tensors]
            self.host_current[leaving] = False
        trained = any(param.requires_grad for param in self.blocks[leaving].parameters())
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # `leaving` has finished computing
        with torch.cuda.stream(self.stream) if self.stream is not None else _nullcontext():
            if trained or not self.host_current[leaving]:  # frozen weights are copied out once only
                for host, tensor in zip(self.host[leaving], device_tensors):
                    host.copy_(tensor, non_blocking=self.cuda)
                self.host_current[leaving] = True
            # Blocks of one list may differ (SD3's last joint block, its MMDiT-X blocks): a freed tensor is reused
            # where the arriving one at its position has its shape, a fresh one is made elsewhere.
            freed = device_tensors + [None] * (len(self.host[arriving]) - len(device_tensors))
            targets = [
                tensor if tensor is not None and (tensor.shape, tensor.dtype) == (host.shape, host.dtype)
                else self._device_tensor(host)
                for tensor, host in zip(freed, self.host[arriving])
            ]  # fmt: skip
            for target, host in zip(targets, self.host[arriving]):
                target.copy_(host, non_blocking=self.cuda)
            if self.stream is not None:
                event = torch.cuda.Event()
                event.record(self.stream)
                self.arrived[arriving] = event
        if trained and self.stream is not None:
            # The optimizer may update the host copy on the CPU before the next pass: the copy must be complete.
            self.stream.synchronize()
        self._reassign(leaving, self.host[leaving], torch.device("cpu"))
        self._reassign(arriving, targets, self.device)
        self.resident[leaving], self.resident[arriving] = False, True

    def _reassign(self, index: int, tensors: list[torch.Tensor], device: torch.device) -> None:
        """Point block `index` at `tensors`; gradients (full training without a fused step) go along."""
        params = list(self.blocks[index].parameters())
        grads = [param.grad for param in params]
        for param in params:
            param.grad = None  # a gradient must be on its parameter's device
        self._assign(index, tensors)
        for param, grad in zip(params, grads, strict=True):
            if grad is not None:
                param.grad = grad.to(device)

    def _wait(self, index: int, phase: str) -> None:
        event = self.arrived.pop(index, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        if not self.resident[index]:
            raise RuntimeError(f"block {index} is not on the device at its {phase}; the swap plan was not followed")
        if self.recorder is not None:
            self.recorder.record(phase, index, self.resident)

    def restore(self) -> None:
        """Bring the residency back to a pass's start (after a pass without backward, or a partial backward)."""
        for leaving, arriving in self.backward_moves.items():
            if self.resident[leaving] and not self.resident[arriving]:
                self._move(leaving, arriving)

    def synchronize(self) -> None:
        """Wait for pending copies (before reading host copies, e.g. to save the model)."""
        if self.stream is not None:
            self.stream.synchronize()

    # ---- running -------------------------------------------------------------------------------------------

    def _wrap(self, index: int, forward: Callable) -> Callable:
        def run(*args, **kwargs):
            return self._run(index, forward, args, kwargs)

        return run

    def _run(self, index: int, forward: Callable, args: tuple, kwargs: dict):
        if index == 0 and self.swap:
            self.restore()
        self._wait(index, "forward")
        grad = torch.is_grad_enabled()
        if grad and self.swap:
            args = _through(_AfterBackward, lambda: self._after_backward(index), args)
            kwargs = {key: _through(_AfterBackward, lambda: self._after_backward(index), value)
                      for key, value in kwargs.items()}  # fmt: skip
        checkpointed = grad and self.checkpointing
        output = self._checkpointed(forward, args, kwargs) if checkpointed else forward(*args, **kwargs)
        if grad and self.swap:
            output = _through(_BeforeBackward, lambda: self._wait(index, "backward"), output)
        if index in self.forward_moves:
            self._move(index, self.forward_moves[index])
        return output

    def _after_backward(self, index: int) -> None:
        if index in self.backward_moves and self.resident[index]:
            self._move(index, self.backward_moves[index])

    def _checkpointed(self, forward: Callable, args: tuple, kwargs: dict):
        from torch.utils.checkpoint import checkpoint

        if not self.offload_activations:
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        # The checkpoint keeps its inputs until the backward pass: keep host copies instead, moved back on recompute.
        device = self.device

        def on_device(value):
            if isinstance(value, torch.Tensor):
                return value.to(device, non_blocking=True)
            if isinstance(value, (tuple, list)):
                return type(value)(on_device(item) for item in value)
            return value

        def on_host(value):
            if isinstance(value, torch.Tensor):
                return value.to("cpu", non_blocking=False)
            if isinstance(value, (tuple, list)):
                return type(value)(on_host(item) for item in value)
            return value

        def recompute(*host_args, **host_kwargs):
            return forward(*on_device(host_args), **{key: on_device(value) for key, value in host_kwargs.items()})

        host_kwargs = {key: on_host(value) for key, value in kwargs.items()}
        return checkpoint(recompute, *on_host(args), use_reentrant=False, **host_kwargs)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _buffer_slots(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, name) of every buffer of `block`, in `block.buffers()` order."""
    return [
        (module, name) for module in block.modules() for name, buffer in module._buffers.items() if buffer is not None
    ]


# ---- placing a family's blocks -------------------------------------------------------------------------------


def max_blocks_to_swap(lengths: Sequence[int], swap_counts: Callable[[int], Sequence[int]]) -> int:
    """The largest --blocks_to_swap whose split over the block lists leaves MIN_RESIDENT blocks of each on the
    device."""
    best = 0
    for swap in range(2 * sum(lengths) + 1):
        counts = swap_counts(swap)
        if all(count <= length - MIN_RESIDENT for count, length in zip(counts, lengths, strict=True)):
            best = swap
    return best


def check_blocks_to_swap(
    options: OffloadOptions, lengths: Sequence[int] | None, swap_counts: Callable[[int], Sequence[int]]
) -> None:
    """Refuse a --blocks_to_swap the model cannot take, from the block counts of its config (before loading)."""
    if not options.blocks_to_swap or lengths is None:
        return
    limit = max_blocks_to_swap(lengths, swap_counts)
    if options.blocks_to_swap > limit:
        raise ConfigError(f"--blocks_to_swap {options.blocks_to_swap} is too many for this model: at most {limit}")


def make_runners(
    block_lists: Sequence[Sequence[nn.Module]],
    counts: Sequence[int],
    device: torch.device | str,
    options: OffloadOptions,
    recorder: ResidencyRecorder | None = None,
) -> list[BlockRunner]:
    """One runner per block list, swapping `counts[i]` blocks of list i."""
    return [
        BlockRunner(blocks, device, count, options.gradient_checkpointing, options.cpu_offload_checkpointing, recorder)
        for blocks, count in zip(block_lists, counts, strict=True)
    ]


def place_blocks(
    denoiser: nn.Module,
    others: Sequence[nn.Module],
    block_lists: Sequence[Sequence[nn.Module]],
    counts: Sequence[int],
    device: torch.device | str,
    options: OffloadOptions,
) -> list[BlockRunner]:
    """Move everything but the listed blocks to `device` and put the blocks under runners (swapped blocks stay in
    CPU memory). Returns the runners; they checkpoint their blocks themselves with --gradient_checkpointing."""
    in_lists = {id(block) for blocks in block_lists for block in blocks}
    _move_except(denoiser, in_lists, torch.device(device))
    for model in others:
        model.to(device)
    runners = make_runners(block_lists, counts, device, options)
    for runner in runners:
        runner.prepare()
    return runners


def _move_except(module: nn.Module, skipped: set[int], device: torch.device) -> None:
    """`module.to(device)` for everything outside the modules in `skipped` (ids)."""
    if id(module) in skipped:
        return
    for name, param in module._parameters.items():
        if param is not None:
            param.data = param.data.to(device)
    for name, buffer in module._buffers.items():
        if buffer is not None:
            module._buffers[name] = buffer.to(device)
    for child in module.children():
        _move_except(child, skipped, device)
