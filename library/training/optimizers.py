"""Optimizers built from the command-line strings (the named ones of the training guide, any `torch.optim` class,
any `module.Class`), and the helpers the loop needs around them: schedule-free modes and the rates to log."""

from __future__ import annotations

import argparse
import ast
import difflib
import inspect
import logging
from dataclasses import dataclass, field

import torch

from library.errors import ConfigError
from library.training.lr_schedulers import (
    add_lr_scheduler_arguments,
    build_lr_scheduler,
    check_lr_scheduler_options,
    import_dotted,
    normalize_scheduler_name,
)

logger = logging.getLogger(__name__)

__all__ = [
    "NAMED_OPTIMIZERS",
    "OptimizerOptions",
    "OptimizerSpec",
    "add_optimizer_arguments",
    "build_lr_scheduler",
    "build_optimizer",
    "current_learning_rates",
    "parse_key_values",
    "parse_value",
    "resolve_optimizer_class",
    "set_optimizer_mode",
]


@dataclass(frozen=True)
class OptimizerSpec:
    """A named optimizer: where its class lives, the pip package it needs, and arguments added when omitted."""

    name: str
    target: str
    package: str | None = None
    defaults: dict[str, object] = field(default_factory=dict)
    adapts_rate: bool = False  # D-Adaptation / Prodigy: --learning_rate multiplies the rate they estimate


_NESTEROV = {"momentum": 0.9, "nesterov": True}
NAMED_OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name.lower(): spec
    for spec in (
        OptimizerSpec("AdamW", "torch.optim.AdamW"),
        OptimizerSpec("AdamW8bit", "bitsandbytes.optim.AdamW8bit", "bitsandbytes"),
        OptimizerSpec("PagedAdamW8bit", "bitsandbytes.optim.PagedAdamW8bit", "bitsandbytes"),
        OptimizerSpec("Lion", "lion_pytorch.Lion", "lion-pytorch"),
        OptimizerSpec("Lion8bit", "bitsandbytes.optim.Lion8bit", "bitsandbytes"),
        OptimizerSpec("PagedLion8bit", "bitsandbytes.optim.PagedLion8bit", "bitsandbytes"),
        OptimizerSpec("SGDNesterov", "torch.optim.SGD", defaults=_NESTEROV),
        OptimizerSpec("SGDNesterov8bit", "bitsandbytes.optim.SGD8bit", "bitsandbytes", _NESTEROV),
        OptimizerSpec("DAdaptation", "dadaptation.DAdaptAdam", "dadaptation", adapts_rate=True),
        OptimizerSpec("DAdaptAdam", "dadaptation.DAdaptAdam", "dadaptation", adapts_rate=True),
        OptimizerSpec("DAdaptAdaGrad", "dadaptation.DAdaptAdaGrad", "dadaptation", adapts_rate=True),
        OptimizerSpec("DAdaptAdan", "dadaptation.DAdaptAdan", "dadaptation", adapts_rate=True),
        OptimizerSpec("DAdaptSGD", "dadaptation.DAdaptSGD", "dadaptation", adapts_rate=True),
        OptimizerSpec("DAdaptLion", "dadaptation.DAdaptLion", "dadaptation", adapts_rate=True),
        OptimizerSpec(
            "DAdaptAdamPreprint", "dadaptation.experimental.DAdaptAdamPreprint", "dadaptation", adapts_rate=True
        ),
        OptimizerSpec("DAdaptAdanIP", "dadaptation.experimental.DAdaptAdanIP", "dadaptation", adapts_rate=True),
        OptimizerSpec("Prodigy", "prodigyopt.Prodigy", "prodigyopt", adapts_rate=True),
        OptimizerSpec("AdaFactor", "transformers.optimization.Adafactor", "transformers", {"relative_step": True}),
        OptimizerSpec("RAdamScheduleFree", "schedulefree.RAdamScheduleFree", "schedulefree"),
        OptimizerSpec("AdamWScheduleFree", "schedulefree.AdamWScheduleFree", "schedulefree"),
        OptimizerSpec("SGDScheduleFree", "schedulefree.SGDScheduleFree", "schedulefree"),
    )
}
LEGACY_FLAGS = {"use_8bit_adam": "AdamW8bit", "use_lion_optimizer": "Lion"}
# D-Adaptation and Prodigy expect a multiplier near 1.0; outside this range the user most likely gave a plain rate.
ADAPTIVE_RATE_RANGE = (0.1, 10.0)


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    """Optimizer and schedule options."""
    parser.add_argument(
        "--optimizer_type",
        type=str,
        default=None,
        help="optimizer (case-insensitive): "
        + ", ".join(spec.name for spec in NAMED_OPTIMIZERS.values())
        + ", any torch.optim class name, or a module.Class path (default: AdamW)",
    )
    parser.add_argument(
        "--optimizer_args",
        type=str,
        nargs="*",
        default=[],
        help='extra optimizer arguments as key=value, e.g. "weight_decay=0.01" "betas=.9,.999"',
    )
    parser.add_argument("--use_8bit_adam", action="store_true", help="older spelling of --optimizer_type AdamW8bit")
    parser.add_argument("--use_lion_optimizer", action="store_true", help="older spelling of --optimizer_type Lion")
    parser.add_argument("--learning_rate", type=float, default=2e-6, help="learning rate")
    parser.add_argument(
        "--max_grad_norm", type=float, default=1.0, help="clip the gradient norm to this value (0 disables clipping)"
    )
    add_lr_scheduler_arguments(parser)


@dataclass
class OptimizerOptions:
    """Typed optimizer and schedule options, checked against each other before any model loads."""

    optimizer_type: str
    optimizer_args: dict[str, object]
    learning_rate: float
    max_grad_norm: float
    lr_scheduler: str
    lr_warmup_steps: float
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    scheduler_args: dict[str, object] = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OptimizerOptions:
        if args.learning_rate is not None and args.learning_rate <= 0:
            raise ConfigError(f"--learning_rate must be above 0, got {args.learning_rate}")
        optimizer_type = _optimizer_type_from_flags(args)
        spec = NAMED_OPTIMIZERS.get(optimizer_type.lower())
        optimizer_class = resolve_optimizer_class(optimizer_type)
        options = cls(
            optimizer_type=spec.name if spec else optimizer_type,
            optimizer_args=parse_key_values(args.optimizer_args or [], "--optimizer_args"),
            learning_rate=args.learning_rate,
            max_grad_norm=args.max_grad_norm,
            lr_scheduler=normalize_scheduler_name(args.lr_scheduler),
            lr_warmup_steps=args.lr_warmup_steps,
            lr_scheduler_num_cycles=getattr(args, "lr_scheduler_num_cycles", 1),
            lr_scheduler_power=getattr(args, "lr_scheduler_power", 1.0),
            scheduler_args=parse_key_values(getattr(args, "scheduler_args", None) or [], "--scheduler_args"),
        )
        if spec:
            options._add_defaults(spec)
        options._check_adafactor(is_adafactor(optimizer_class))
        check_lr_scheduler_options(options)
        _check_optimizer_args(optimizer_class, options)
        if _is_schedule_free(optimizer_class) and (options.lr_scheduler != "constant" or options.lr_warmup_steps):
            logger.warning(
                "%s keeps its own schedule: use --lr_scheduler constant and warm up with --optimizer_args "
                "warmup_steps=N (given: --lr_scheduler %s, --lr_warmup_steps %g)",
                options.optimizer_type,
                options.lr_scheduler,
                options.lr_warmup_steps,
            )
        return options

    def _add_defaults(self, spec: OptimizerSpec) -> None:
        """Add the arguments the guide documents for this optimizer when the user left them out."""
        if spec.name.startswith("SGDNesterov") and self.optimizer_args.get("nesterov", True) is not True:
            raise ConfigError(
                f"--optimizer_type {spec.name} always uses nesterov=True; for plain momentum SGD use "
                "--optimizer_type SGD with --optimizer_args momentum=0.9"
            )
        for key, value in spec.defaults.items():
            if key not in self.optimizer_args:
                self.optimizer_args[key] = value
                logger.info("%s: added the default optimizer argument %s=%s", spec.name, key, value)

    def _check_adafactor(self, adafactor: bool) -> None:
        """AdaFactor with relative_step=True sets its own step sizes and therefore uses its own schedule."""
        if not adafactor:
            if self.lr_scheduler == "adafactor":
                raise ConfigError(
                    f"--lr_scheduler adafactor only works with --optimizer_type AdaFactor (got {self.optimizer_type})"
                )
            return
        relative = self.optimizer_args.get("relative_step", True)
        if not relative and self.optimizer_args.get("warmup_init", False):
            raise ConfigError(
                "--optimizer_args warmup_init=True needs relative_step=True: AdaFactor warms up its own relative steps"
            )
        if relative:
            self._use_adafactor_schedule()
            return
        if self.lr_scheduler == "adafactor":
            raise ConfigError(
                "--lr_scheduler adafactor needs AdaFactor's relative_step=True; with relative_step=False "
                "pick a schedule such as constant_with_warmup"
            )
        if self.lr_scheduler != "constant_with_warmup" or self.max_grad_norm != 0:
            logger.info(
                "AdaFactor with relative_step=False usually trains best with --lr_scheduler constant_with_warmup "
                "and --max_grad_norm 0"
            )

    def _use_adafactor_schedule(self) -> None:
        if self.lr_warmup_steps:
            raise ConfigError(
                "--lr_warmup_steps does not apply to AdaFactor with relative_step=True (it schedules its own steps); "
                "drop it, or use --optimizer_args warmup_init=True"
            )
        if self.lr_scheduler != "adafactor":
            logger.info(
                "AdaFactor with relative_step=True sets its own step sizes: using --lr_scheduler adafactor instead "
                "of %s; --learning_rate %g is only the rate reported before the first step",
                self.lr_scheduler,
                self.learning_rate,
            )
            self.lr_scheduler = "adafactor"


def _optimizer_type_from_flags(args: argparse.Namespace) -> str:
    """--optimizer_type, or the optimizer named by one legacy flag (logged once); AdamW when none is given."""
    legacy = [flag for flag in LEGACY_FLAGS if getattr(args, flag, False)]
    if len(legacy) > 1:
        raise ConfigError("--use_8bit_adam and --use_lion_optimizer exclude each other; give one --optimizer_type")
    if legacy and args.optimizer_type:
        raise ConfigError(
            f"--{legacy[0]} and --optimizer_type {args.optimizer_type} both choose the optimizer; keep only "
            "--optimizer_type"
        )
    if legacy:
        logger.info("--%s is the older spelling of --optimizer_type %s", legacy[0], LEGACY_FLAGS[legacy[0]])
        return LEGACY_FLAGS[legacy[0]]
    return args.optimizer_type or "AdamW"


def resolve_optimizer_class(optimizer_type: str) -> type[torch.optim.Optimizer]:
    """The optimizer class for a name of the guide, a `torch.optim` class name or a `module.Class` path."""
    spec = NAMED_OPTIMIZERS.get(optimizer_type.lower())
    if spec:
        return import_dotted(spec.target, f"--optimizer_type {spec.name}", spec.package)
    torch_names = {
        name.lower(): name
        for name, value in vars(torch.optim).items()
        if isinstance(value, type) and issubclass(value, torch.optim.Optimizer)
    }
    if optimizer_type.lower() in torch_names:
        return getattr(torch.optim, torch_names[optimizer_type.lower()])
    if "." in optimizer_type:
        optimizer_class = import_dotted(optimizer_type, "--optimizer_type")
        if not callable(optimizer_class):
            raise ConfigError(f"--optimizer_type {optimizer_type!r} is not an optimizer class")
        return optimizer_class
    known = [spec.name for spec in NAMED_OPTIMIZERS.values()] + sorted(torch_names.values())
    close = difflib.get_close_matches(optimizer_type.lower(), [name.lower() for name in known], n=1)
    hint = f" Did you mean {next(name for name in known if name.lower() == close[0])!r}?" if close else ""
    raise ConfigError(
        f"--optimizer_type {optimizer_type!r} is unknown.{hint} Choose one of "
        f"{', '.join(spec.name for spec in NAMED_OPTIMIZERS.values())}, a torch.optim class, or a module.Class path."
    )


def is_adafactor(optimizer_class: type) -> bool:
    """Whether this is transformers' Adafactor, which needs lr=None in its relative-step mode."""
    return optimizer_class.__name__ == "Adafactor" and optimizer_class.__module__.startswith("transformers")


def _is_schedule_free(optimizer: object) -> bool:
    """Schedule-free optimizers (package `schedulefree`) switch the weights between train and eval modes."""
    optimizer_class = optimizer if isinstance(optimizer, type) else type(optimizer)
    return optimizer_class.__module__.startswith("schedulefree") and callable(getattr(optimizer_class, "eval", None))


def parse_value(text: str) -> object:
    """A command-line value as a Python literal: numbers, booleans, tuples (`0.9,0.999`), else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        return float(text)  # "inf", "nan": literal_eval does not read them
    except ValueError:
        return text


def parse_key_values(items: list[str], option: str) -> dict[str, object]:
    """`["a=1", "b=0.9,0.999"]` -> `{"a": 1, "b": (0.9, 0.999)}`; a malformed item names the option."""
    result = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{option}: expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        result[key.strip()] = parse_value(value)
    return result


def _check_optimizer_args(optimizer_class: type, options: OptimizerOptions) -> None:
    """Each --optimizer_args key must be one the class takes, with a value of the type of its default; then a
    trial construction on a dummy parameter catches out-of-range values before any model loads."""
    name = optimizer_class.__name__
    try:
        parameters = inspect.signature(optimizer_class.__init__).parameters
    except (TypeError, ValueError):  # no readable signature: leave the checks to the trial construction
        parameters = {"kwargs": inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)}
    takes_any = any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values())
    for key, value in options.optimizer_args.items():
        if key == "lr":
            raise ConfigError("--optimizer_args lr: set the learning rate with --learning_rate")
        parameter = parameters.get(key)
        if key in ("self", "params") or (parameter is None and not takes_any):
            allowed = [known for known in parameters if known not in ("self", "params", "lr")]
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"--optimizer_args {key}: {name} has no such argument.{hint} It takes: {', '.join(allowed)}"
            )
        if parameter is None:
            continue
        expected = _type_problem(value, parameter.default)
        if expected:
            raise ConfigError(
                f"--optimizer_args {key}={value!r}: {name} expects {expected} (its default is {parameter.default!r})"
            )
    _instantiate(optimizer_class, [torch.nn.Parameter(torch.zeros(1))], options)


def _type_problem(value: object, default: object) -> str | None:
    """What an argument whose default is `default` expects, when `value` does not fit it; None when it fits."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "a boolean (True/False)"
    if isinstance(default, (int, float)):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if isinstance(default, (tuple, list)):
        numbers = isinstance(value, (tuple, list)) and all(
            isinstance(item, (int, float, type(None))) and not isinstance(item, bool) for item in value
        )
        if numbers and (not default or len(value) == len(default)):
            return None
        return f"{len(default)} comma-separated numbers" if default else "comma-separated numbers"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    return None


def _instantiate(
    optimizer_class: type, param_groups: list[dict] | list[torch.nn.Parameter], options: OptimizerOptions
) -> torch.optim.Optimizer:
    kwargs = dict(options.optimizer_args)
    relative_step = is_adafactor(optimizer_class) and kwargs.get("relative_step", True)
    learning_rate = None if relative_step else options.learning_rate  # Adafactor refuses a manual lr here
    try:
        return optimizer_class(param_groups, lr=learning_rate, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"--optimizer_type {options.optimizer_type} with --optimizer_args {options.optimizer_args} and "
            f"--learning_rate {options.learning_rate:g}: {err}"
        ) from err


def build_optimizer(options: OptimizerOptions, param_groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer over the given parameter groups (each may carry its own `lr`)."""
    optimizer_class = resolve_optimizer_class(options.optimizer_type)
    spec = NAMED_OPTIMIZERS.get(options.optimizer_type.lower())
    if spec and spec.adapts_rate:
        optimizer_class, param_groups = _adaptive_rate_groups(
            spec.name, optimizer_class, param_groups, options.learning_rate
        )
    rates = [group.get("lr", options.learning_rate) for group in param_groups]
    if is_adafactor(optimizer_class) and options.optimizer_args.get("relative_step", True) and len(set(rates)) > 1:
        logger.warning("AdaFactor with relative_step=True ignores the per-group learning rates %s", rates)
    optimizer = _instantiate(optimizer_class, param_groups, options)
    if _is_schedule_free(optimizer):
        optimizer.train()  # schedule-free optimizers refuse to step in their initial eval mode
    logger.info(
        "optimizer %s.%s, args %s", optimizer_class.__module__, optimizer_class.__name__, options.optimizer_args
    )
    return optimizer


def _adaptive_rate_groups(
    name: str, optimizer_class: type, param_groups: list[dict], learning_rate: float
) -> tuple[type, list[dict]]:
    """D-Adaptation and Prodigy step every group with d * one rate (group 0's, or the largest). The guide's
    per-group multipliers (`--unet_lr 1.0 --text_encoder_lr 0.5`) become DAdaptAdam's `layer_scale`; for the
    others each group's step is scaled by its multiplier after the optimizer computed it (see `_group_scaled`).
    Returns the class to build and its groups."""
    rates = [group.get("lr", learning_rate) for group in param_groups]
    low, high = ADAPTIVE_RATE_RANGE
    if any(rate and not low <= rate <= high for rate in rates):
        logger.warning(
            "%s estimates the learning rate itself; the given rates (%s) multiply that estimate and are usually "
            "about 1.0 (e.g. --learning_rate 1.0, or --unet_lr 1.0 --text_encoder_lr 0.5)",
            name,
            ", ".join(f"{rate:g}" for rate in rates),
        )
    if len({rate for rate in rates if rate}) <= 1:
        return optimizer_class, param_groups
    probe = optimizer_class([torch.nn.Parameter(torch.zeros(1))])  # `layer_scale` is a group key, not an argument
    key = "layer_scale" if "layer_scale" in probe.defaults else "rate_scale"
    top = max(rates)
    logger.info("%s: per-group rates %s applied as multipliers (%s) of the rate %g", name, rates, key, top)
    groups = [
        {**group, "lr": top, key: rate / top} if rate else {**group, "lr": 0.0}
        for group, rate in zip(param_groups, rates)
    ]
    return (optimizer_class if key == "layer_scale" else _group_scaled(optimizer_class)), groups


def _group_scaled(optimizer_class: type) -> type:
    """`optimizer_class` whose step moves each group's parameters by `rate_scale` times the update it computed.

    D-Adaptation variants other than DAdaptAdam (and Prodigy) refuse, or ignore, different rates per group; scaling
    the finished update gives each group its share of the one adapted rate, which is what the guide's split rates
    mean. The parameters of scaled groups are copied once per step for this.
    """

    class GroupScaled(optimizer_class):
        def step(self, closure=None):
            scaled = [group for group in self.param_groups if group.get("rate_scale", 1.0) != 1.0]
            before = [[param.detach().clone() for param in group["params"]] for group in scaled]
            loss = super().step(closure)
            with torch.no_grad():
                for group, previous in zip(scaled, before):
                    for param, old in zip(group["params"], previous):
                        param.lerp_(old, 1.0 - group["rate_scale"])  # old + scale * (new - old)
            return loss

    GroupScaled.__name__ = GroupScaled.__qualname__ = optimizer_class.__name__
    GroupScaled.__module__ = optimizer_class.__module__
    return GroupScaled


def _unwrap(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer inside accelerate's (or DeepSpeed's) wrappers."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def set_optimizer_mode(optimizer: torch.optim.Optimizer, training: bool) -> None:
    """Switch a schedule-free optimizer to its training or evaluation weights; a no-op for any other optimizer.

    Call with training=False before evaluation, sampling and saving, and with training=True before the next step.
    """
    inner = _unwrap(optimizer)
    if _is_schedule_free(inner):
        inner.train() if training else inner.eval()


def current_learning_rates(
    optimizer: torch.optim.Optimizer, lr_scheduler: object | None = None, names: list[str] | None = None
) -> dict[str, float]:
    """The rate each parameter group actually steps with, keyed `lr/<name>` for logging.

    D-Adaptation and Prodigy report d * lr; AdaFactor in relative-step mode the step size it computes; schedule-free
    optimizers their warmed-up rate. `names` label the groups in order (default `group0`, `group1`, ...); a group
    without a rate of its own falls back to the schedule's last rate.
    """
    inner = _unwrap(optimizer)
    scheduled = _last_scheduled_rates(lr_scheduler)
    rates = {}
    for index, group in enumerate(inner.param_groups):
        name = names[index] if names and index < len(names) else group.get("name", f"group{index}")
        rate = group["lr"] if group.get("lr") is not None else scheduled.get(index, 0.0)
        rates[f"lr/{name}"] = float(_effective_rate(inner, group, rate))
    return rates


def _last_scheduled_rates(lr_scheduler: object | None) -> dict[int, float]:
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper keeps it in .scheduler
    get_last_lr = getattr(scheduler, "get_last_lr", None)
    if not callable(get_last_lr):
        return {}
    try:
        return dict(enumerate(get_last_lr()))
    except AttributeError:  # a schedule that has not stepped yet
        return {}


def _effective_rate(optimizer: torch.optim.Optimizer, group: dict, rate: float) -> float:
    if "d" in group:  # D-Adaptation, Prodigy: the group's lr and multiplier (layer_scale / rate_scale) scale d
        return group["d"] * rate * group.get("layer_scale", 1.0) * group.get("rate_scale", 1.0)
    if group.get("relative_step") and hasattr(optimizer, "_get_lr"):  # AdaFactor computes its step per parameter
        state = optimizer.state.get(group["params"][0], {})
        return optimizer._get_lr(group, state) if "step" in state else rate
    if "scheduled_lr" in group:  # schedule-free: lr after its own warm-up
        return group["scheduled_lr"]
    return rate
