"""--fused_backward_pass and --blockwise_fused_optimizers: the optimizer steps inside the backward pass.

Each trained tensor (or each block of the denoiser) gets an optimizer of its own, stepped from a
post-accumulate-grad hook as soon as its gradient is complete; the gradient is dropped right after, so the
gradients of the whole model never exist at once. The optimizer built as usual stays as a never-stepped proxy: the
LR schedule moves its group rates, and these are copied into the small optimizers before each of their steps.
"""

from __future__ import annotations

import argparse
import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from library.errors import CheckpointError, ConfigError
from library.training.optimizers import (
    NAMED_OPTIMIZERS,
    OptimizerOptions,
    current_learning_rates,
    is_adafactor,
    resolve_optimizer_class,
)

logger = logging.getLogger(__name__)

# Methods whose trained weights are the denoiser's own, so that its blocks can carry the optimizers.
BLOCKWISE_METHODS = ("finetune", "dreambooth")


def add_fused_arguments(parser: argparse.ArgumentParser) -> None:
    """The two ways of stepping the optimizer inside the backward pass."""
    parser.add_argument(
        "--fused_backward_pass",
        action="store_true",
        help="step the optimizer for each weight tensor as soon as its gradient is ready and free that gradient at "
        "once, so all gradients never exist together (less memory). --max_grad_norm then clips each tensor on its "
        "own. Not with gradient accumulation or --mixed_precision fp16",
    )
    parser.add_argument(
        "--blockwise_fused_optimizers",
        action="store_true",
        help="one optimizer per block of the denoiser, stepped inside the backward pass when the block's last "
        "gradient arrives, which then frees the block's gradients; --max_grad_norm clips each block on its own. "
        "Full fine-tuning only",
    )


@dataclass
class FusedOptions:
    """Typed fused-step options; `from_args` checks them against the optimizer and precision before loading."""

    fused_backward_pass: bool = False
    blockwise_fused_optimizers: bool = False

    @property
    def enabled(self) -> bool:
        return self.fused_backward_pass or self.blockwise_fused_optimizers

    @property
    def option(self) -> str:
        """The option the user gave, for messages."""
        return "--blockwise_fused_optimizers" if self.blockwise_fused_optimizers else "--fused_backward_pass"

    @classmethod
    def from_args(cls, args: argparse.Namespace, optimizer: OptimizerOptions) -> FusedOptions:
        options = cls(
            fused_backward_pass=getattr(args, "fused_backward_pass", False),
            blockwise_fused_optimizers=getattr(args, "blockwise_fused_optimizers", False),
        )
        if options.enabled:
            options._check(args, optimizer)
        return options

    def _check(self, args: argparse.Namespace, optimizer: OptimizerOptions) -> None:
        if self.fused_backward_pass and self.blockwise_fused_optimizers:
            raise ConfigError(
                "--fused_backward_pass and --blockwise_fused_optimizers are two ways of stepping inside the backward "
                "pass; choose one (per tensor frees memory soonest, per block keeps each block's steps together)"
            )
        accumulation = getattr(args, "gradient_accumulation_steps", 1) or 1
        if accumulation > 1:
            raise ConfigError(
                f"{self.option} steps the optimizer inside every backward pass, so gradients cannot accumulate over "
                f"several batches (--gradient_accumulation_steps {accumulation}); use a larger batch_size or drop "
                f"{self.option}"
            )
        if args.mixed_precision == "fp16" or getattr(args, "full_fp16", False):
            raise ConfigError(
                f"{self.option} does not work with float16 training: the fp16 gradient scaler must see every "
                "gradient before any step. Use --mixed_precision bf16 (optionally with --full_bf16) or no"
            )
        check_fusable_optimizer(optimizer, self.option)
        if optimizer.max_grad_norm > 0:
            logger.info(
                "%s: --max_grad_norm %g clips the gradient of each %s on its own, not the norm of all gradients "
                "together (use --max_grad_norm 0 to turn clipping off)",
                self.option,
                optimizer.max_grad_norm,
                "block" if self.blockwise_fused_optimizers else "tensor",
            )

    def check_method(self, method_name: str) -> None:
        """Blocks belong to the denoiser: only the full-model methods can have an optimizer per block."""
        if self.blockwise_fused_optimizers and method_name not in BLOCKWISE_METHODS:
            raise ConfigError(
                f"--blockwise_fused_optimizers gives each denoiser block its own optimizer, but the {method_name} "
                "method does not train the denoiser's weights; use --fused_backward_pass instead"
            )


def check_fusable_optimizer(optimizer: OptimizerOptions, option: str) -> None:
    """Refuse optimizers that cannot step one tensor at a time with the same result."""
    spec = NAMED_OPTIMIZERS.get(optimizer.optimizer_type.lower())
    optimizer_class = resolve_optimizer_class(optimizer.optimizer_type)
    if spec and spec.adapts_rate:
        raise ConfigError(
            f"{option} cannot be used with --optimizer_type {spec.name}: it estimates one step size from all "
            "gradients together. Use AdaFactor, AdamW or another per-tensor optimizer"
        )
    if optimizer_class.__module__.startswith("schedulefree"):
        raise ConfigError(
            f"{option} cannot be used with --optimizer_type {optimizer.optimizer_type}: schedule-free optimizers "
            "switch all weights between training and evaluation points around every save"
        )
    closure = inspect.signature(optimizer_class.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ConfigError(
            f"{option} cannot be used with --optimizer_type {optimizer.optimizer_type}: its step needs a closure "
            "that evaluates the whole model again"
        )


def default_blocks(denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The denoiser's top-level children, with lists of blocks (`down_blocks`, `transformer_blocks`) split into
    their items: `down_blocks.0`, `down_blocks.1`, ..."""
    blocks = []
    for name, child in denoiser.named_children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            blocks.extend((f"{name}.{index}", item) for index, item in enumerate(child))
        else:
            blocks.append((name, child))
    return blocks


@dataclass
class _Unit:
    """Tensors stepped together by one optimizer: a single tensor, or the trained tensors of one block."""

    name: str
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    # the proxy group each of the unit optimizer's groups copies its rate from, by index: loading a state replaces
    # the group dicts of both optimizers
    proxy_group_indices: list[int]
    arrived: int = 0  # gradients complete in the running backward pass
    expected: int = 0  # gradients the running backward pass will bring (trained tensors of the unit)


@dataclass
class FusedOptimizers:
    """The per-tensor (or per-block) optimizers and their hooks. Register it for checkpointing: its state is the
    optimizer state of the run (the proxy's stays empty)."""

    proxy: torch.optim.Optimizer
    units: list[_Unit]
    max_grad_norm: float
    num_processes: int = 1
    _handles: list = field(default_factory=list, repr=False)

    def install_hooks(self) -> None:
        for unit in self.units:
            for param in unit.params:
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook(unit)))

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, unit: _Unit) -> Callable[[torch.Tensor], None]:
        def gradient_ready(param: torch.Tensor) -> None:
            if self.num_processes > 1:
                _average_gradient(param.grad, self.num_processes)
            if unit.arrived == 0:
                unit.expected = sum(p.requires_grad for p in unit.params)
            unit.arrived += 1
            if unit.arrived >= unit.expected:
                self._step(unit)

        return gradient_ready

    def _step(self, unit: _Unit) -> None:
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in unit.params if p.grad is not None], self.max_grad_norm)
        for group, proxy_index in zip(unit.optimizer.param_groups, unit.proxy_group_indices):
            # The schedule sets the proxy's rate (and whatever else it schedules, e.g. momentum).
            group.update((key, value) for key, value in self.proxy.param_groups[proxy_index].items() if key != "params")
        unit.optimizer.step()
        unit.optimizer.zero_grad(set_to_none=True)
        unit.arrived = 0
        # The LR schedule warns when it steps before its optimizer ever did; the unit optimizers step for the proxy.
        self.proxy._opt_called = True

    def finish_backward(self) -> None:
        """Step the blocks some of whose tensors got no gradient in this backward pass (unused in the forward)."""
        for unit in self.units:
            if unit.arrived:
                self._step(unit)

    def state_dict(self) -> dict:
        return {
            "units": [unit.name for unit in self.units],
            "optimizers": [u.optimizer.state_dict() for u in self.units],
        }

    def load_state_dict(self, state: dict) -> None:
        names = [unit.name for unit in self.units]
        if state["units"] != names:
            raise CheckpointError(
                f"the training state holds {len(state['units'])} fused optimizers, this run has {len(names)}: resume "
                "with the same model, method, --fused_backward_pass / --blockwise_fused_optimizers and trained parts"
            )
        for unit, optimizer_state in zip(self.units, state["optimizers"]):
            unit.optimizer.load_state_dict(optimizer_state)

    def learning_rates(self, lr_scheduler: object | None = None) -> dict[str, float]:
        """`current_learning_rates` of the proxy, with the unit optimizers' state (AdaFactor's relative steps)."""
        return current_learning_rates(_ProxyView(self.proxy, self._first_param_states()), lr_scheduler)

    def _first_param_states(self) -> dict[torch.Tensor, dict]:
        owner = {param: unit for unit in self.units for param in unit.params}
        firsts = [group["params"][0] for group in self.proxy.param_groups if group["params"]]
        return {param: owner[param].optimizer.state.get(param, {}) for param in firsts if param in owner}


class _ProxyView:
    """The proxy optimizer as `current_learning_rates` reads it, with the state the unit optimizers hold."""

    def __init__(self, proxy: torch.optim.Optimizer, state: dict):
        self._proxy = proxy
        self.param_groups = proxy.param_groups
        self.state = state

    def __getattr__(self, name: str):
        return getattr(self._proxy, name)


def _average_gradient(grad: torch.Tensor, num_processes: int) -> None:
    """All processes reach the hooks in the same order (same graph), so each gradient is averaged on its own."""
    import torch.distributed as dist

    dist.all_reduce(grad)
    grad /= num_processes


def _unwrap(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer inside accelerate's wrapper."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def build_fused_optimizers(
    options: OptimizerOptions,
    optimizer: torch.optim.Optimizer,
    blocks: list[tuple[str, torch.nn.Module]] | None = None,
    num_processes: int = 1,
) -> FusedOptimizers:
    """Unit optimizers for the proxy `optimizer`'s parameters, one per tensor, or one per block of `blocks` (tensors
    outside every block get one each); hooks installed."""
    proxy = _unwrap(optimizer)
    block_of = _block_names(blocks or [])
    members: dict[str, list[tuple[torch.nn.Parameter, int]]] = {}
    for group_index, group in enumerate(proxy.param_groups):
        for param_index, param in enumerate(group["params"]):
            name = block_of.get(param, f"group{group_index}.param{param_index}")
            members.setdefault(name, []).append((param, group_index))
    units = [_make_unit(name, pairs, proxy, options) for name, pairs in members.items()]
    fused = FusedOptimizers(proxy, units, options.max_grad_norm, num_processes)
    fused.install_hooks()
    logger.info(
        "%d optimizers stepped inside the backward pass (%s)",
        len(units),
        "one per block" if blocks else "one per tensor",
    )
    return fused


def _block_names(blocks: Iterable[tuple[str, torch.nn.Module]]) -> dict[torch.nn.Parameter, str]:
    return {param: name for name, module in blocks for param in module.parameters()}


def _make_unit(
    name: str, pairs: list[tuple[torch.nn.Parameter, int]], proxy: torch.optim.Optimizer, options: OptimizerOptions
) -> _Unit:
    """One optimizer over `pairs` (tensor, index of its proxy group), with the proxy groups' settings."""
    indices = list(dict.fromkeys(index for _, index in pairs))
    unit_groups = [
        {
            **{key: value for key, value in proxy.param_groups[index].items() if key != "params"},
            "params": [param for param, owner in pairs if owner == index],
        }
        for index in indices
    ]
    optimizer_class = type(proxy)
    kwargs = dict(options.optimizer_args)
    relative_step = is_adafactor(optimizer_class) and kwargs.get("relative_step", True)
    # the groups carry every setting; the constructor arguments are repeated for optimizers that keep some outside
    unit_optimizer = optimizer_class(unit_groups, lr=None if relative_step else options.learning_rate, **kwargs)
    return _Unit(name, [param for param, _ in pairs], unit_optimizer, indices)


def attach_fused_optimizers(
    options: FusedOptions,
    optimizer_options: OptimizerOptions,
    optimizer,
    accelerator,
    blocks: Callable[[], list[tuple[str, torch.nn.Module]]],
) -> FusedOptimizers | None:
    """The fused optimizers of a run (None when not asked for), registered for state saving after the modules."""
    if not options.enabled:
        return None
    fused = build_fused_optimizers(
        optimizer_options,
        optimizer,
        blocks() if options.blockwise_fused_optimizers else None,
        accelerator.num_processes,
    )
    accelerator.register_for_checkpointing(fused)
    return fused
