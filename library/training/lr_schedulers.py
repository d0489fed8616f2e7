"""Learning-rate schedules: the named schedules of diffusers, AdaFactor's own, or any `module.Class`.

Every schedule here multiplies each parameter group's own base rate, so `--unet_lr` and `--text_encoder_lr` keep
their ratio from the first step to the last.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from library.errors import ConfigError, MissingPackageError

if TYPE_CHECKING:
    from library.training.optimizers import OptimizerOptions

logger = logging.getLogger(__name__)

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "adafactor")
WARMUP_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup")
# Schedule arguments that one of our options sets, and that option; --scheduler_args may not set them again.
OWN_SCHEDULE_ARGUMENTS = {
    "num_warmup_steps": "--lr_warmup_steps",
    "num_training_steps": "the total step count (--max_train_steps / --max_train_epochs)",
    "num_cycles": "--lr_scheduler_num_cycles",
    "power": "--lr_scheduler_power",
    "initial_lr": "--learning_rate",
}


def add_lr_scheduler_arguments(parser: argparse.ArgumentParser) -> None:
    """The schedule options: name, warm-up, cycles, power and free arguments for a custom class."""
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help="learning-rate schedule: " + ", ".join(SCHEDULERS) + ", or any module.Class (default: constant)",
    )
    parser.add_argument(
        "--lr_warmup_steps",
        type=float,
        default=0,
        help="warm-up steps of the schedule; a value below 1 is a fraction of the total steps",
    )
    parser.add_argument(
        "--lr_scheduler_num_cycles", type=int, default=1, help="number of restarts of cosine_with_restarts"
    )
    parser.add_argument("--lr_scheduler_power", type=float, default=1.0, help="power of the polynomial schedule")
    parser.add_argument(
        "--scheduler_args",
        type=str,
        nargs="*",
        default=[],
        help='extra schedule arguments as key=value, e.g. "lr_end=1e-6", or those of a module.Class schedule',
    )


def normalize_scheduler_name(name: str) -> str:
    """A named schedule in lower case, a `module.Class` as given; anything else is a ConfigError."""
    if name.lower() in SCHEDULERS:
        return name.lower()
    if "." in name:
        return name
    close = difflib.get_close_matches(name.lower(), SCHEDULERS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"--lr_scheduler {name!r} is unknown.{hint} Choose one of {', '.join(SCHEDULERS)}, or give a module.Class path."
    )


def check_lr_scheduler_options(options: OptimizerOptions) -> None:
    """Check the schedule options against each other and the schedule's signature, before any model loads."""
    name = options.lr_scheduler
    warmup = options.lr_warmup_steps
    if warmup < 0:
        raise ConfigError(f"--lr_warmup_steps must not be negative, got {warmup:g}")
    if warmup >= 1 and warmup != int(warmup):
        raise ConfigError(f"--lr_warmup_steps {warmup:g}: give a whole step count, or a fraction below 1")
    if warmup > 0 and name not in WARMUP_SCHEDULERS:
        raise ConfigError(
            f"--lr_warmup_steps has no effect with --lr_scheduler {name}; use one of {', '.join(WARMUP_SCHEDULERS)}"
            " (e.g. constant_with_warmup), or drop --lr_warmup_steps"
        )
    if options.lr_scheduler_num_cycles < 1:
        raise ConfigError(f"--lr_scheduler_num_cycles must be at least 1, got {options.lr_scheduler_num_cycles}")
    if options.lr_scheduler_power <= 0:
        raise ConfigError(f"--lr_scheduler_power must be positive, got {options.lr_scheduler_power:g}")
    if options.lr_scheduler_num_cycles != 1 and name != "cosine_with_restarts":
        logger.warning("--lr_scheduler_num_cycles is only used by cosine_with_restarts; ignored for %s", name)
    if options.lr_scheduler_power != 1.0 and name != "polynomial":
        logger.warning("--lr_scheduler_power is only used by polynomial; ignored for %s", name)
    factory = schedule_factory(name)
    _check_schedule_arguments(factory, name, _own_arguments(options, total_steps=1), options.scheduler_args)


def schedule_factory(name: str) -> Callable[..., torch.optim.lr_scheduler.LRScheduler]:
    """The function or class that makes the schedule `name` (a normalized name)."""
    if name == "adafactor":
        return import_dotted("transformers.optimization.AdafactorSchedule", "--lr_scheduler adafactor")
    if name in SCHEDULERS:
        from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

        return TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    factory = import_dotted(name, "--lr_scheduler")
    if not callable(factory):
        raise ConfigError(f"--lr_scheduler {name!r} is not a class or function")
    return factory


def import_dotted(path: str, option: str, package: str | None = None) -> object:
    """The object at `package.module.Name`. A package that is not installed is a MissingPackageError naming what
    to pip install (`package` when its pip name differs from its import name)."""
    module_name, _, attribute = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        top = (err.name or module_name).split(".")[0]
        if importlib.util.find_spec(top) is not None:
            raise ConfigError(f"{option} {path!r}: {err}") from err
        raise MissingPackageError(
            f"{option} {path!r} needs the package {package or top!r}, which is not installed: "
            f"pip install {package or top}"
        ) from err
    except ValueError as err:  # an empty module name such as ".Class"
        raise ConfigError(f"{option} {path!r} is not a module.Class path") from err
    if not attribute or not hasattr(module, attribute):
        raise ConfigError(f"{option} {path!r}: module {module_name!r} has no attribute {attribute!r}")
    return getattr(module, attribute)


def _check_schedule_arguments(
    factory: Callable, name: str, own: dict[str, object], scheduler_args: dict[str, object]
) -> None:
    """Reject --scheduler_args keys the schedule does not take, or that one of our own options sets."""
    parameters = inspect.signature(factory).parameters
    takes_any = any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values())
    for key in scheduler_args:
        if key in own and key in parameters:
            raise ConfigError(f"--scheduler_args {key}: set it with {OWN_SCHEDULE_ARGUMENTS[key]} instead")
        if key == "optimizer" or (key not in parameters and not takes_any):
            allowed = sorted(set(parameters) - set(own) - {"optimizer", "self"})
            raise ConfigError(
                f"--scheduler_args {key}: the {name} schedule does not take it; it takes: "
                f"{', '.join(allowed) or 'none'}"
            )


def _own_arguments(options: OptimizerOptions, total_steps: int) -> dict[str, object]:
    """What our own options feed into the schedule; a custom class gets nothing but --scheduler_args."""
    name = options.lr_scheduler
    if name == "adafactor":
        return {"initial_lr": options.learning_rate}  # the rate reported until AdaFactor's first step
    if name not in SCHEDULERS:
        return {}
    own = {
        "num_warmup_steps": warmup_step_count(options.lr_warmup_steps, total_steps),
        "num_training_steps": total_steps,
    }
    if name == "cosine_with_restarts":
        own["num_cycles"] = options.lr_scheduler_num_cycles
    elif name == "polynomial":
        own["power"] = options.lr_scheduler_power
    return own


def warmup_step_count(warmup: float, total_steps: int) -> int:
    """`--lr_warmup_steps` as a step count: a value below 1 is that fraction of the total steps (rounded down)."""
    return int(warmup * total_steps) if 0 < warmup < 1 else int(warmup)


def build_lr_scheduler(
    options: OptimizerOptions, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule over `total_steps` optimizer steps; options were checked by `OptimizerOptions.from_args`."""
    name = options.lr_scheduler
    factory = schedule_factory(name)
    warmup_steps = warmup_step_count(options.lr_warmup_steps, total_steps)
    if warmup_steps > total_steps:
        logger.warning("--lr_warmup_steps %d is longer than the whole run (%d steps)", warmup_steps, total_steps)
    parameters = inspect.signature(factory).parameters
    own = {key: value for key, value in _own_arguments(options, total_steps).items() if key in parameters}
    kwargs = own | options.scheduler_args
    try:
        scheduler = factory(optimizer, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--lr_scheduler {name} with --scheduler_args {options.scheduler_args}: {err}") from err
    logger.info("LR schedule %s over %d steps (%d warm-up), arguments %s", name, total_steps, warmup_steps, kwargs)
    return scheduler
