"""Fully sharded data parallel (torch FSDP2, `fully_shard`) for full fine-tuning on several processes.

Asked for the way accelerate users ask for it: `accelerate launch --use_fsdp ...` or an accelerate config file with
`distributed_type: FSDP`, whose settings reach the processes as `ACCELERATE_USE_FSDP` / `FSDP_*` variables. The
trainer reads them and shards the trained modules itself (accelerate's own FSDP mode wants to wrap one model and
its optimizer together; here the trained modules are reached through the family's code): every large block of the
denoiser's block list is a unit of its own, the rest of the denoiser and each trained text encoder one more. The
optimizer steps on the shards; states and results gather the full weights (and optimizer state) on the main process,
so a state folder and a saved model look exactly like a one-process run's.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from library.errors import ConfigError

logger = logging.getLogger(__name__)

# accelerate writes the sharding strategy by name or by its FSDP1 number
_RESHARD = {"FULL_SHARD": True, "1": True, "SHARD_GRAD_OP": False, "2": False}
_UNSUPPORTED = {"NO_SHARD": "3", "HYBRID_SHARD": "4", "HYBRID_SHARD_ZERO2": "5"}
BLOCK_SHARE = 0.02  # a denoiser block with at least this share of its parameters is a sharding unit of its own


def _flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class ShardingOptions:
    """FSDP as accelerate's launcher or config file asked for it."""

    enabled: bool = False
    reshard_after_forward: bool = True
    offload_params: bool = False
    activation_checkpointing: bool = False

    @classmethod
    def from_environment(cls) -> ShardingOptions:
        if not _flag("ACCELERATE_USE_FSDP"):
            return cls()
        strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").strip().upper()
        if strategy in _UNSUPPORTED or strategy in _UNSUPPORTED.values():
            raise ConfigError(
                f"FSDP sharding strategy {strategy} (accelerate config / --fsdp_sharding_strategy) is not supported: "
                "use FULL_SHARD or SHARD_GRAD_OP, or launch without --use_fsdp for plain data parallel training"
            )
        reshard = _RESHARD.get(strategy, True)
        if "FSDP_RESHARD_AFTER_FORWARD" in os.environ:  # FSDP2's own setting, when given
            value = os.environ["FSDP_RESHARD_AFTER_FORWARD"].strip().upper()
            reshard = _RESHARD[value] if value in _RESHARD else _flag("FSDP_RESHARD_AFTER_FORWARD", "true")
        return cls(True, reshard, _flag("FSDP_OFFLOAD_PARAMS"), _flag("FSDP_ACTIVATION_CHECKPOINTING"))

    def check(self, method, refused: dict[str, bool], num_processes: int) -> None:
        """What FSDP cannot be combined with, one line each (before any model loads). `refused`: option -> used."""
        if not self.enabled:
            return
        if not method.trains_base_weights:
            raise ConfigError(
                f"FSDP (accelerate --use_fsdp) shards the weights of full fine-tuning; the {method.name} method trains "
                "small modules that every process holds whole. Launch without --use_fsdp (plain data parallel)"
            )
        for name, used in refused.items():
            if used:
                raise ConfigError(f"FSDP (accelerate --use_fsdp) cannot be combined with {name}")
        if num_processes == 1:
            logger.warning("FSDP asked for with one process: nothing to shard, training as usual")


def take_over_from_accelerate() -> None:
    """Keep accelerate out of its own FSDP mode (which prepares one model with its optimizer); the trainer shards."""
    os.environ.pop("ACCELERATE_USE_FSDP", None)


def _parameter_slots(modules: list[torch.nn.Module]) -> dict[int, tuple[torch.nn.Module, str]]:
    return {
        id(param): (owner, name)
        for module in modules
        for owner in module.modules()
        for name, param in owner._parameters.items()
        if param is not None
    }


def shard_modules(
    options: ShardingOptions,
    denoiser: torch.nn.Module,
    blocks: list[tuple[str, torch.nn.Module]],
    text_encoders: list[torch.nn.Module],
    param_groups: list[dict],
    device: torch.device,
) -> list[torch.nn.Module]:
    """fully_shard the denoiser (its large blocks as units) and the trained text encoders; the optimizer parameter
    groups are pointed at the sharded parameters. Returns the sharded roots."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    roots = [denoiser, *text_encoders]
    slots = _parameter_slots(roots)
    settings = {
        "reshard_after_forward": options.reshard_after_forward,
        "offload_policy": CPUOffloadPolicy() if options.offload_params and device.type == "cuda" else OffloadPolicy(),
    }
    total = sum(param.numel() for param in denoiser.parameters())
    units = 0
    for _, block in blocks:
        if sum(param.numel() for param in block.parameters()) >= BLOCK_SHARE * total:
            fully_shard(block, **settings)
            units += 1
    for root in roots:
        fully_shard(root, **settings)
    for group in param_groups:  # fully_shard replaced every parameter by a sharded one of the same name
        group["params"] = [slots[id(param)][0]._parameters[slots[id(param)][1]] for param in group["params"]]
    logger.info("FSDP: denoiser sharded in %d block units plus its root, %d text encoder(s); reshard after forward: %s",
                units, len(text_encoders), options.reshard_after_forward)  # fmt: skip
    return roots


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


class FullModuleState:
    """A sharded module as accelerate checkpoints it: `state_dict` gathers the full weights on the main process (all
    processes take part), `load_state_dict` gives every process its shards of a full state."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.module, options=_full_options())

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.module, state, options=StateDictOptions(full_state_dict=True))


class FullOptimizerState:
    """The optimizer over sharded parameters, checkpointed with its full state (as one process would have it)."""

    def __init__(self, modules: list[torch.nn.Module], optimizer: torch.optim.Optimizer) -> None:
        self.container = torch.nn.ModuleList(modules)
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.container, self.optimizer, options=_full_options())

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.container, self.optimizer, state, options=StateDictOptions(full_state_dict=True))


@contextlib.contextmanager
def full_weights(roots: list[torch.nn.Module], is_main: bool) -> Iterator[None]:
    """Inside, on the main process, the sharded modules hold their full weights (on the CPU) as plain parameters, so
    the family's savers read them like any model; the shards are back afterwards. Every process must enter (the
    weights are gathered); the others hold their shards throughout."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    states = [get_model_state_dict(root, options=_full_options()) for root in roots]
    if not is_main:
        yield
        return
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        for root, state in zip(roots, states, strict=True):
            for key, tensor in state.items():
                prefix, _, name = key.rpartition(".")
                owner = root.get_submodule(prefix) if prefix else root
                if name in owner._parameters:
                    swapped.append((owner, name, owner._parameters[name]))
                    owner._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
        yield
    finally:
        for owner, name, sharded in reversed(swapped):
            owner._parameters[name] = sharded
