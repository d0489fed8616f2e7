"""--ema: an exponential moving average of the trained parameters, kept beside them (one copy, on the CPU when
asked), updated after every optimizer step and part of the training state; samples, validation and saves can use it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from library.errors import ConfigError
from library.training.optimizers import OptimizerOptions, resolve_optimizer_class

logger = logging.getLogger(__name__)

STATE_FILE = "ema.safetensors"  # in a training state folder
EMA_SUFFIX = "-ema"  # --save_both: `<output_name>-ema...` beside every `<output_name>...` file
HALF_DTYPES = (torch.float16, torch.bfloat16)


def add_ema_arguments(parser: argparse.ArgumentParser) -> None:
    """The EMA's options: its decay, how often it is updated, where it lives and where it is used."""
    parser.add_argument(
        "--ema",
        action="store_true",
        help="keep an exponential moving average (EMA) of the trained weights; it is saved in training states, and "
        "samples, validation and saved files use it with --ema_for_samples / --save_ema / --save_both",
    )
    parser.add_argument(
        "--ema_decay",
        type=float,
        default=0.999,
        help="share of the average kept at each optimizer step: it averages over about 1 / (1 - decay) recent steps "
        "(default 0.999: about 1000)",
    )
    parser.add_argument(
        "--ema_warmup_steps",
        type=float,
        default=None,
        help="warm-up: at step t the decay is min(--ema_decay, 1 - (1 + t / N) ** -power), so early steps are not "
        "averaged with the untrained start; with power 1 and N 1 it is the plain mean of all steps so far",
    )
    parser.add_argument(
        "--ema_warmup_power", type=float, default=0.75, help="the power of --ema_warmup_steps (default 0.75)"
    )
    parser.add_argument(
        "--ema_update_every",
        type=int,
        default=1,
        help="update the EMA every N optimizer steps, with the decay of N steps (decay ** N), so the horizon stays "
        "the same; less time spent when the EMA is on the CPU (default 1)",
    )
    parser.add_argument(
        "--ema_device",
        type=str,
        default="same",
        choices=["same", "cpu"],
        help="where the EMA lives: beside the trained weights (same, fastest) or in CPU memory (cpu: no device "
        "memory, a copy of the weights to the CPU at every update)",
    )
    parser.add_argument(
        "--ema_for_samples", action="store_true", help="draw sample images with the EMA weights (needs --ema)"
    )
    parser.add_argument(
        "--save_ema",
        action="store_true",
        help="saved files hold the EMA weights instead of the trained ones, and the validation loss measures them "
        "(needs --ema)",
    )
    parser.add_argument(
        "--save_both",
        action="store_true",
        help="save every file twice: the trained weights as usual and the EMA weights as <output_name>-ema... beside "
        "them (needs --ema)",
    )


@dataclass
class EMAOptions:
    """Typed EMA options; `from_args` checks them before any model loads."""

    enabled: bool = False
    decay: float = 0.999
    warmup_steps: float | None = None
    warmup_power: float = 0.75
    update_every: int = 1
    device: Literal["same", "cpu"] = "same"
    for_samples: bool = False
    save_ema: bool = False
    save_both: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, optimizer: OptimizerOptions | None = None) -> EMAOptions:
        options = cls(
            enabled=getattr(args, "ema", False),
            decay=getattr(args, "ema_decay", 0.999),
            warmup_steps=getattr(args, "ema_warmup_steps", None),
            warmup_power=getattr(args, "ema_warmup_power", 0.75),
            update_every=getattr(args, "ema_update_every", 1),
            device=getattr(args, "ema_device", "same"),
            for_samples=getattr(args, "ema_for_samples", False),
            save_ema=getattr(args, "save_ema", False),
            save_both=getattr(args, "save_both", False),
        )
        options.validate()
        if options.enabled and optimizer is not None:
            check_optimizer(optimizer)
        return options

    def validate(self) -> None:
        uses = [name for name, on in (("--ema_for_samples", self.for_samples), ("--save_ema", self.save_ema),
                                      ("--save_both", self.save_both)) if on]  # fmt: skip
        if uses and not self.enabled:
            raise ConfigError(f"{' and '.join(uses)} use the EMA weights: add --ema to keep them")
        if self.save_ema and self.save_both:
            raise ConfigError("--save_ema saves the EMA weights instead of the trained ones, --save_both saves both; "
                              "choose one")  # fmt: skip
        if not 0 < self.decay < 1:
            raise ConfigError(f"--ema_decay must be between 0 and 1 (e.g. 0.999), got {self.decay}")
        if self.warmup_steps is not None and self.warmup_steps <= 0:
            raise ConfigError(f"--ema_warmup_steps must be above 0, got {self.warmup_steps}")
        if self.warmup_power <= 0:
            raise ConfigError(f"--ema_warmup_power must be above 0, got {self.warmup_power}")
        if self.update_every < 1:
            raise ConfigError(f"--ema_update_every must be 1 or more, got {self.update_every}")

    def decay_at(self, step: int) -> float:
        """The decay of one optimizer step at step `step` (1-based), warm-up included."""
        if self.warmup_steps is None:
            return self.decay
        return min(self.decay, 1 - (1 + step / self.warmup_steps) ** -self.warmup_power)

    @property
    def for_validation(self) -> bool:
        """Validation measures what the saved files hold, so --save_best keeps the weights it measured."""
        return self.save_ema


def check_optimizer(optimizer: OptimizerOptions) -> None:
    """Schedule-free optimizers evaluate at an average of their own: an EMA of their training point is refused."""
    optimizer_class = resolve_optimizer_class(optimizer.optimizer_type)
    if optimizer_class.__module__.startswith("schedulefree"):
        raise ConfigError(
            f"--ema cannot be used with --optimizer_type {optimizer.optimizer_type}: schedule-free optimizers already "
            "evaluate and save an average of the weights; drop --ema or use another optimizer"
        )


class ExponentialMovingAverage:
    """One copy of the trained parameters, averaged after each optimizer step: e <- d**k * e + (1 - d**k) * p, with k
    the steps since the last update. Half-precision parameters average in float32 (a bfloat16 average could not
    take steps smaller than bfloat16's resolution, about 1/128 of the value)."""

    def __init__(self, params: list[torch.nn.Parameter], options: EMAOptions):
        self.params = params
        self.options = options
        self.last_update = 0  # the optimizer step of the last update (0: the weights training started from)
        self.shadows = [
            param.detach().to(
                device="cpu" if options.device == "cpu" else param.device,
                dtype=torch.float32 if param.dtype in HALF_DTYPES else param.dtype,
                copy=True,
            )
            for param in params
        ]

    @property
    def size_bytes(self) -> int:
        return sum(shadow.numel() * shadow.element_size() for shadow in self.shadows)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average in the weights after optimizer step `step`, when an update is due."""
        if step % self.options.update_every:
            return
        weight = 1 - self.options.decay_at(step) ** (step - self.last_update)
        self.last_update = step
        together = [(s, p) for s, p in zip(self.shadows, self.params) if (s.device, s.dtype) == (p.device, p.dtype)]
        if together:
            torch._foreach_lerp_([s for s, _ in together], [p.detach() for _, p in together], weight)
        for shadow, param in zip(self.shadows, self.params):
            if (shadow.device, shadow.dtype) != (param.device, param.dtype):  # one tensor at a time: no second copy
                shadow.lerp_(param.detach().to(shadow.device, shadow.dtype), weight)

    @contextlib.contextmanager
    def in_place(self) -> Iterator[None]:
        """Inside: the parameters hold the EMA weights; afterwards the trained weights, bit for bit.

        Tensors of one dtype are swapped (the average waits where the weights were), so no second copy is made;
        half-precision parameters are backed up on the EMA's device instead.
        """
        with torch.no_grad():
            backups = [_swap(shadow, param) for shadow, param in zip(self.shadows, self.params)]
        try:
            yield
        finally:
            with torch.no_grad():
                for shadow, param, backup in zip(self.shadows, self.params, backups):
                    if backup is None:
                        _swap(shadow, param)
                    else:
                        param.copy_(backup)

    # ---- the training state -------------------------------------------------------------------------------------

    def save_to(self, folder: str) -> None:
        """Write the average into a state folder (called inside the folder's atomic write)."""
        from safetensors.torch import save_file

        tensors = {f"{index:06d}": shadow.detach().cpu().contiguous() for index, shadow in enumerate(self.shadows)}
        save_file(tensors, os.path.join(folder, STATE_FILE), {"last_update": str(self.last_update)})

    @torch.no_grad()
    def load_from(self, folder: str, global_step: int) -> None:
        """Restore the average from a state folder (after the weights); a state saved without --ema starts it from
        the resumed weights."""
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            logger.warning("--ema: the state %s holds no EMA (saved without --ema); the EMA starts from its weights",
                           folder)  # fmt: skip
            for shadow, param in zip(self.shadows, self.params):
                shadow.copy_(param.detach())
            self.last_update = global_step
            return
        from safetensors import safe_open

        with safe_open(path, "pt") as handle:
            names = sorted(handle.keys())
            shapes = [tuple(handle.get_slice(name).get_shape()) for name in names]
            if shapes != [tuple(shadow.shape) for shadow in self.shadows]:
                raise ConfigError(
                    f"--resume: the EMA in {path} holds {len(names)} tensors that do not fit the {len(self.shadows)} "
                    "trained tensors of this run; resume with the options of the run that saved it"
                )
            for name, shadow in zip(names, self.shadows):
                shadow.copy_(handle.get_tensor(name))
            self.last_update = int(handle.metadata()["last_update"])


def _swap(shadow: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor | None:
    """Put the average into `param` (under no_grad); the trained weights go into `shadow` when the dtypes match,
    else into the returned backup."""
    saved = param.detach().to(shadow.device, copy=True)
    param.copy_(shadow)
    if shadow.dtype != param.dtype:
        return saved
    shadow.copy_(saved)
    return None


def start_ema(options: EMAOptions, params: list[torch.nn.Parameter]) -> ExponentialMovingAverage | None:
    """The run's EMA of `params` (the optimizer's parameters), or None without --ema."""
    if not options.enabled:
        return None
    ema = ExponentialMovingAverage(params, options)
    where = "in CPU memory" if options.device == "cpu" else "beside the trained weights"
    warmup = (f", warm-up 1 - (1 + t / {options.warmup_steps:g}) ** -{options.warmup_power:g}"
              if options.warmup_steps is not None else "")  # fmt: skip
    logger.info("EMA of %d trained tensors (%.1f MiB) %s: decay %g%s, updated every %d step(s)", len(params),
                ema.size_bytes / 2**20, where, options.decay, warmup, options.update_every)  # fmt: skip
    return ema


def uses_ema(ema: ExponentialMovingAverage | None, purpose: str) -> bool:
    """Whether an evaluation for `purpose` ("samples", "validation", "result", "ema_result") uses the EMA."""
    if ema is None:
        return False
    options = ema.options
    return {
        "samples": options.for_samples,
        "validation": options.for_validation,
        "result": options.save_ema,
        "ema_result": True,
    }[purpose]


def result_variants(ema: ExponentialMovingAverage | None, output_name: str, path: str) -> list[tuple[str, str]]:
    """(path, purpose) of each file a save to `path` writes: the result, and with --save_both its EMA copy beside it,
    named as if --output_name were `<output_name>-ema` (`lora-step00000010.safetensors` ->
    `lora-ema-step00000010.safetensors`)."""
    variants = [(path, "result")]
    if ema is not None and ema.options.save_both:
        folder, name = os.path.split(path)
        variants.append((os.path.join(folder, ema_name(output_name, name)), "ema_result"))
    return variants


def ema_name(output_name: str, name: str) -> str:
    """The name of the EMA copy of the save `name` (every save's name starts with `output_name`)."""
    assert name.startswith(output_name), (name, output_name)
    return output_name + EMA_SUFFIX + name[len(output_name) :]


def ema_metadata(ema: ExponentialMovingAverage | None, purpose: str) -> dict[str, str]:
    """The `ss_ema*` keys of a file that holds EMA weights (none for trained weights)."""
    if not uses_ema(ema, purpose):
        return {}
    options = ema.options
    values = {"ss_ema": "True", "ss_ema_decay": str(options.decay), "ss_ema_update_every": str(options.update_every)}
    if options.warmup_steps is not None:
        values["ss_ema_warmup"] = f"{options.warmup_steps:g},{options.warmup_power:g}"
    return values
