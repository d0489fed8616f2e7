"""Options of the shared training loop: run length, output, precision, memory, seed."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

from library.errors import ConfigError

logger = logging.getLogger(__name__)

PRECISIONS = ("no", "fp16", "bf16")


def add_loop_arguments(parser: argparse.ArgumentParser) -> None:
    """The loop's options (saving formats belong to the method, data options to the dataset engine)."""
    parser.add_argument("--output_dir", type=str, required=True, help="folder the trained files are written to")
    parser.add_argument(
        "--output_name", type=str, default="last", help="file name of the result without extension (default: last)"
    )
    parser.add_argument("--max_train_steps", type=int, default=1600, help="number of training steps (default 1600)")
    parser.add_argument(
        "--max_train_epochs", type=int, default=None, help="number of epochs; overrides --max_train_steps when given"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, recorded)")
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=PRECISIONS,
        help="compute precision of the frozen parts (default: what accelerate was launched with, from `accelerate "
        "launch --mixed_precision` or the accelerate config; else no)",
    )
    parser.add_argument(
        "--gradient_checkpointing", action="store_true", help="recompute activations in backward to save memory"
    )
    parser.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="batches whose gradients are summed (averaged) into one optimizer step: N batches of size B update "
        "like one batch of N*B. Steps (--max_train_steps, schedules, saves) count optimizer steps (default 1)",
    )
    parser.add_argument(
        "--prior_loss_weight", type=float, default=1.0, help="loss weight of regularization images (default 1.0)"
    )
    parser.add_argument(
        "--cpu_threads",
        type=int,
        default=None,
        help="CPU threads per process when training on the CPU (default: all cores shared among the processes; "
        "accelerate's own default of one thread is overridden)",
    )


def resolve_mixed_precision(args: argparse.Namespace) -> str:
    """--mixed_precision, or when it is not given, the precision accelerate was launched with (`accelerate launch
    --mixed_precision bf16` and the accelerate config reach the script as ACCELERATE_MIXED_PRECISION); "no" when
    neither says. Sets args.mixed_precision and logs the precision in use; call once, right after parsing."""
    given = getattr(args, "mixed_precision", None)
    source = "--mixed_precision"
    if given is None:
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
        if launched in PRECISIONS:
            given, source = launched, "accelerate launch / accelerate config"
        else:
            given, source = "no", "default"
    args.mixed_precision = given
    names = {"no": "float32 (no mixed precision)", "fp16": "fp16 mixed precision", "bf16": "bf16 mixed precision"}
    logger.info("computing in %s (from %s)", names[given], source)
    return given


MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass
class LoopOptions:
    """Typed loop options."""

    output_dir: str
    output_name: str
    max_train_steps: int
    max_train_epochs: int | None
    seed: int | None
    mixed_precision: str
    gradient_checkpointing: bool
    cpu_threads: int | None
    gradient_accumulation_steps: int = 1

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LoopOptions":
        options = cls(
            output_dir=args.output_dir,
            output_name=args.output_name,
            max_train_steps=args.max_train_steps,
            max_train_epochs=args.max_train_epochs,
            seed=args.seed,
            mixed_precision=args.mixed_precision or resolve_mixed_precision(args),
            gradient_checkpointing=args.gradient_checkpointing,
            cpu_threads=args.cpu_threads,
            gradient_accumulation_steps=getattr(args, "gradient_accumulation_steps", 1),
        )
        options.validate()
        return options

    def validate(self) -> None:
        for name in ("max_train_steps", "max_train_epochs", "cpu_threads", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be 1 or more, got {value}")
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise ConfigError(f"--output_dir {self.output_dir} exists and is not a folder")
        if not self.output_name or any(sep in self.output_name for sep in "/\\"):
            raise ConfigError(f"--output_name must be a plain file name without folders, got {self.output_name!r}")
        stem, extension = os.path.splitext(self.output_name)
        if extension.lower() in MODEL_EXTENSIONS:
            raise ConfigError(
                f"--output_name {self.output_name}: give the name without extension (--output_name {stem}); the "
                "extension comes from --save_model_as"
            )
