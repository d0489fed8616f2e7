"""Building a model without memory for its weights, then giving it the weights of a checkpoint (no copy)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from library.errors import CheckpointError


def empty_model(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a model with parameters on the meta device (no memory), buffers real; weights are assigned later."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def assign_weights(
    model: torch.nn.Module, state_dict: dict, dtype: torch.dtype, what: str, source: str
) -> torch.nn.Module:
    """Load `state_dict` into a model built by `empty_model`; floating tensors (fp8 included) are cast to `dtype`.

    Every parameter must be given and every tensor used: otherwise CheckpointError names `what` and `source`.
    """
    converted = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state_dict.items()}
    result = model.load_state_dict(converted, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{source}: the {what} weights do not fit the model: missing {_first(result.missing_keys)}, "
            f"unexpected {_first(result.unexpected_keys)}"
        )
    return model


def _first(keys: list[str], count: int = 8) -> str:
    if not keys:
        return "none"
    shown = ", ".join(sorted(keys)[:count])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > count else ''})"
