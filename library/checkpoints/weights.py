"""Building a model without memory for its weights, then giving it the weights of a checkpoint (no copy)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from library.errors import CheckpointError
from library.training import half_storage


def empty_model(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a model with parameters on the meta device (no memory), buffers real; weights are assigned later."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def assign_weights(
    model: torch.nn.Module, state_dict: dict, dtype: torch.dtype, what: str, source: str
) -> torch.nn.Module:
    """Give a model built by `empty_model` the tensors of `state_dict`; floating ones (fp8 included) are cast to
    `dtype`. Every parameter must be given and every tensor used: otherwise CheckpointError names `what` and `source`.

    The dict is consumed one tensor at a time, so a file's tensors are freed as their converted copies arrive: the
    peak is about the model in `dtype`, not the file plus the model. Under `half_storage.keeping_half_weights()`
    the fp16 / bf16 weights of Linear and Conv2d layers (all but the model's first parameter) stay as they are and
    their layers cast them to `dtype` as they run.
    """
    slots = _tensor_slots(model)
    first = next((name for name, _ in model.named_parameters()), None)
    missing = sorted(set(slots) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(slots))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the {what} weights do not fit the model: missing {_first(missing)}, "
            f"unexpected {_first(unexpected)}"
        )
    for key in list(state_dict):
        module, name, is_parameter = slots[key]
        tensor = state_dict.pop(key)
        current = module._parameters[name] if is_parameter else module._buffers[name]
        if tuple(tensor.shape) != tuple(current.shape):
            raise CheckpointError(
                f"{source}: the {what} tensor {key} has shape {tuple(tensor.shape)}, the model needs "
                f"{tuple(current.shape)}; the file belongs to another architecture"
            )
        keep = is_parameter and name == "weight" and key != first and half_storage.keeps_half(module, tensor, dtype)
        if keep:
            half_storage.cast_as_it_runs(module, dtype)
        elif tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if is_parameter:
            module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=current.requires_grad)
        else:
            module._buffers[name] = tensor
        del tensor
    return model


def _tensor_slots(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str, bool]]:
    """State-dict key -> (module, attribute name, is a parameter) for every persistent tensor of `model`."""
    slots = {}
    for prefix, module in model.named_modules():
        dotted = f"{prefix}." if prefix else ""
        for name, param in module._parameters.items():
            if param is not None:
                slots[dotted + name] = (module, name, True)
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                slots[dotted + name] = (module, name, False)
    return slots


def _first(keys: list[str], count: int = 8) -> str:
    if not keys:
        return "none"
    shown = ", ".join(sorted(keys)[:count])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > count else ''})"
