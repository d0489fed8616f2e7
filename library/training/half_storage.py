"""Frozen weights kept in the file's half precision while training computes in float32.

A checkpoint stored in fp16 or bf16 holds no more than 16 bits per weight, so the float32 copies a float32 run makes
of its frozen layers carry no extra information: they only double the memory. Here a frozen Linear or Conv2d layer
keeps the file's tensor and casts it to float32 as it runs (exact: every fp16 / bf16 value is a float32 value), so
forward outputs and input gradients are the same numbers as with float32 weights, at half the memory for the
weights. The backward pass recasts the half weight instead of keeping a float32 copy per layer for it.

Only for layers nothing trains (the weight gets no gradient); a method that trains the base weights loads them in
float32 as before. The first parameter of a model keeps the compute dtype, so that the dtype diffusers and
transformers report for the model (that of its first floating parameter) stays the compute dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import torch
from torch import nn

HALF_DTYPES = (torch.float16, torch.bfloat16)
_KEEP_HALF: contextvars.ContextVar[bool] = contextvars.ContextVar("keep_half_frozen_weights", default=False)


@contextlib.contextmanager
def keeping_half_weights(enabled: bool = True) -> Iterator[None]:
    """While active, checkpoint loading (`library.checkpoints.weights.assign_weights`) into float32 keeps the half
    precision weights of Linear and Conv2d layers and makes the layers cast them as they run."""
    token = _KEEP_HALF.set(enabled)
    try:
        yield
    finally:
        _KEEP_HALF.reset(token)


def keeps_half(module: nn.Module, tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a loaded `tensor` for `module.weight` stays as it is (loading into float32 under the context)."""
    return (_KEEP_HALF.get() and dtype == torch.float32 and tensor.dtype in HALF_DTYPES
            and supported(module))  # fmt: skip


def supported(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return True
    return (type(module) is nn.Conv2d and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))  # fmt: skip


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.save_for_backward(weight)
        ctx.dtype = dtype
        return nn.functional.linear(x.to(dtype), weight.to(dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = grad.matmul(weight.to(ctx.dtype)) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.settings = (x.shape, dtype, stride, padding, dilation, groups)
        return nn.functional.conv2d(x.to(dtype), weight.to(dtype), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, dtype, stride, padding, dilation, groups = ctx.settings
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(shape, weight.to(dtype), grad, stride, padding, dilation, groups)
        return grad_x, None, None, None, None, None, None, None


def _linear_forward(layer: nn.Linear, dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
    return _Linear.apply(x, layer.weight, layer.bias, dtype)


def _conv_forward(layer: nn.Conv2d, dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
    return _Conv2d.apply(x, layer.weight, layer.bias, dtype, layer.stride, layer.padding, layer.dilation, layer.groups)


def cast_as_it_runs(layer: nn.Module, dtype: torch.dtype) -> None:
    """Make a frozen Linear / Conv2d layer with a half-precision weight compute in `dtype`."""
    forward = _linear_forward if type(layer) is nn.Linear else _conv_forward
    layer.forward = functools.partial(forward, layer, dtype)
    layer.compute_dtype = dtype


def half_stored_layers(model: nn.Module) -> int:
    return sum(1 for layer in model.modules() if getattr(layer, "compute_dtype", None) is not None
               and layer.weight.dtype in HALF_DTYPES)  # fmt: skip
