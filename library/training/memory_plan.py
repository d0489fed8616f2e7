"""The memory plan logged at the start of training: what is where, in which dtype, how large.

One line per model (its weights by device and dtype, quantized and fp8 storage named as such), then the trained
parameters with their gradients, the optimizer state, the EMA and the swapped blocks. Sizes of what does not exist
yet (gradients, optimizer state) are what the first step will allocate.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch

logger = logging.getLogger(__name__)

GIB = 2**30
# optimizer state per trained parameter, in units of the parameter's size (8-bit optimizers: bytes per value)
STATES = {"SGD": 1, "Lion": 1, "Adafactor": 0.1, "Prodigy": 4, "DAdapt": 3}
EIGHT_BIT_BYTES = 2


def _storage(tensor: torch.Tensor) -> str:
    kind = type(tensor).__name__
    if kind == "Params4bit":
        return "nf4"
    if kind == "Int8Params":
        return "int8"
    return str(tensor.dtype).removeprefix("torch.")


def _placement(module: torch.nn.Module) -> str:
    sizes: dict[tuple[str, str], int] = defaultdict(int)
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type == "meta":
            continue
        sizes[(str(tensor.device), _storage(tensor))] += tensor.numel() * tensor.element_size()
    if not sizes:
        return "freed"
    return ", ".join(f"{size / GIB:.2f} GiB {dtype} on {device}" for (device, dtype), size in sorted(sizes.items()))


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer, trained_bytes: int, trained_values: int) -> int:
    name = type(getattr(optimizer, "optimizer", optimizer)).__name__
    if "8bit" in name:
        return trained_values * EIGHT_BIT_BYTES
    for prefix, states in STATES.items():
        if name.startswith(prefix):
            return int(trained_bytes * states)
    return trained_bytes * 2  # Adam and its kin: two moments


def memory_plan(run) -> list[str]:
    """The plan's lines for a run whose models are placed and optimizer built."""
    models = run.models
    lines = [f"denoiser: {_placement(models.denoiser)}", f"VAE: {_placement(models.vae)}"]
    lines += [f"text encoder {index + 1}: {_placement(encoder)}" for index, encoder in enumerate(models.text_encoders)]
    trained = [param for group in run.optimizer.param_groups for param in group["params"]]
    values = sum(param.numel() for param in trained)
    size = sum(param.numel() * param.element_size() for param in trained)
    where = sorted({str(param.device) for param in trained})
    lines.append(f"trained: {values / 1e6:.2f}M values, {size / GIB:.3f} GiB on {', '.join(where)}, the same again "
                 "for their gradients")  # fmt: skip
    optimizer = type(getattr(run.optimizer, "optimizer", run.optimizer)).__name__
    lines.append(f"optimizer {optimizer}: about {_optimizer_state_bytes(run.optimizer, size, values) / GIB:.3f} GiB "
                 "of state beside the trained values")  # fmt: skip
    if run.ema is not None:
        where_ema = "in CPU memory" if run.options.ema.device == "cpu" else "beside the trained values"
        lines.append(f"EMA: {size / GIB:.3f} GiB {where_ema}")
    for runner in run.runners:
        if runner.swap:
            lines.append(f"block swap: {runner.swap} of {len(runner.blocks)} blocks kept in CPU memory, moved to "
                         f"{runner.device} while they run")  # fmt: skip
    if run.parallel.processes[0] > 1:
        how = "sharded by FSDP" if run.parallel.sharded else "whole on every process"
        lines.append(f"{run.parallel.processes[0]} processes: trained modules {how}")
    return lines


def log_memory_plan(run) -> None:
    for line in memory_plan(run):
        logger.info("memory plan: %s", line)
