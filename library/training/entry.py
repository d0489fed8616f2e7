"""What every entry script runs: build the parser from the parts that apply, parse, train, report user errors."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys

from library.errors import UserError
from library.training.interrupts import TrainingInterrupted
from library.training.loop_options import resolve_mixed_precision
from library.training.metadata import SecretFilter, secret_values

logger = logging.getLogger("library")


def build_parser(family_class, method_class, description: str) -> argparse.ArgumentParser:
    """The parser with the options of the loop, optimizer, dataset engine, checkpoint reading, family and method."""
    from library.checkpoints.files import add_checkpoint_arguments
    from library.data.dataset import add_dataset_arguments
    from library.data.latent_cache import add_latent_cache_arguments
    from library.data.text_cache import add_text_cache_arguments
    from library.training.best_checkpoint import add_best_checkpoint_arguments
    from library.training.block_swap import add_fp8_arguments, add_offload_arguments
    from library.training.config_file import add_config_file_arguments
    from library.training.ema import add_ema_arguments
    from library.training.fused_optimizers import add_fused_arguments
    from library.training.hub import add_hub_arguments
    from library.training.loop_options import add_loop_arguments
    from library.training.loss import add_loss_arguments
    from library.training.memory_options import add_memory_arguments
    from library.training.noise import add_noise_arguments
    from library.training.optimizers import add_optimizer_arguments
    from library.training.sampling import add_sampling_arguments
    from library.training.saving import add_saving_arguments
    from library.training.tracking import add_tracking_arguments
    from library.training.validation import add_validation_arguments

    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    family_group = parser.add_argument_group(f"model ({family_class.id})")
    family_class.add_arguments(family_group)
    if family_class.text_cache_suffix is not None:
        add_text_cache_arguments(family_group, family_class.text_cache_suffix)
    if family_class.block_list_names:
        add_offload_arguments(parser.add_argument_group("block swapping and offload"))
    else:
        add_fp8_arguments(parser.add_argument_group("fp8 base"))
    method_group = parser.add_argument_group(f"method ({method_class.name})")
    method_class.add_arguments(method_group)
    family_class.add_method_arguments(method_class.name, method_group)
    add_dataset_arguments(parser.add_argument_group("dataset"))
    add_latent_cache_arguments(parser.add_argument_group("latent cache"))
    add_loop_arguments(parser.add_argument_group("training"))
    add_memory_arguments(parser.add_argument_group("precision and memory"))
    add_optimizer_arguments(parser.add_argument_group("optimizer"))
    add_fused_arguments(parser.add_argument_group("optimizer step inside the backward pass"))
    add_noise_arguments(parser.add_argument_group("noise and timesteps"))
    add_loss_arguments(parser.add_argument_group("loss"))
    add_saving_arguments(parser.add_argument_group("saving and resuming"))
    add_tracking_arguments(parser.add_argument_group("logging"))
    add_sampling_arguments(parser.add_argument_group("sample images"))
    validation_group = parser.add_argument_group("validation")
    add_validation_arguments(validation_group)
    add_best_checkpoint_arguments(validation_group)
    add_ema_arguments(parser.add_argument_group("EMA of the trained weights"))
    add_checkpoint_arguments(parser.add_argument_group("checkpoint files"))
    add_hub_arguments(parser.add_argument_group("hugging face hub"))
    add_config_file_arguments(parser.add_argument_group("config file"))
    parser.set_defaults(**method_class.default_options())
    return parser


def configure_logging() -> None:
    """One handler for the whole run; only the main process logs at INFO."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # peft imports bitsandbytes when installed; its CPU backend warns about optional kernels on every start.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def attach_negative_values(argv: list[str]) -> list[str]:
    """`--learning_rate -1e-4` as `--learning_rate=-1e-4`: argparse reads a value starting with "-" as an option
    unless it is a plain negative number, and would say "expected one argument" instead of checking the value."""
    joined: list[str] = []
    for token in argv:
        if joined and _NEGATIVE_NUMBER.match(token) and joined[-1].startswith("--") and "=" not in joined[-1]:
            joined[-1] = f"{joined[-1]}={token}"
        else:
            joined.append(token)
    return joined


def hide_secrets_in_logs(secrets: list[str]) -> None:
    """Every handler of the root logger replaces the run's tokens in the messages it writes."""
    for handler in logging.getLogger().handlers:
        for old in [item for item in handler.filters if isinstance(item, SecretFilter)]:
            handler.removeFilter(old)
        handler.addFilter(SecretFilter(secrets))


def receive_stop_signals() -> None:
    """SIGINT and SIGTERM reach the run in every phase: unblocked (a parent may leave them blocked; the mask survives
    exec), and SIGINT not ignored (a job a shell starts in the background inherits SIGINT ignored, and Python then
    installs no KeyboardInterrupt for it; the training phase handles SIGINT either way, so loading does too)."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_training(family_id: str, method_id: str, description: str, argv: list[str] | None = None) -> None:
    """Parse the command line for `family_id` x `method_id` and train; user errors end with one line, exit 1."""
    from library.families import get_family_class
    from library.methods import get_method_class
    from library.training.config_file import parse_with_config_file, write_config_file

    receive_stop_signals()
    family_class = get_family_class(family_id)
    method_class = get_method_class(method_id)
    parser = build_parser(family_class, method_class, description)
    configure_logging()
    try:
        argv = attach_negative_values(sys.argv[1:] if argv is None else argv)
        args = parse_with_config_file(parser, argv)  # a --config_file's values are defaults the command line overrides
        hide_secrets_in_logs(secret_values(args))
        if args.output_config:
            write_config_file(parser, args)
            return
        resolve_mixed_precision(args)  # before the family reads it: accelerate launch's precision when not given
        from library.training.trainer import train

        train(family_class(args), method_class(args), args)
    except UserError as err:
        logger.error("%s", err)
        sys.exit(1)
    except TrainingInterrupted as stop:
        where = f"; continue with --resume {stop.state_folder}" if stop.state_folder else ""
        if int(os.environ.get("RANK", "0")) == 0:  # every process stopped at the same step; say it once
            logger.warning("training stopped at step %d%s", stop.step, where)
        sys.exit(130)
    except KeyboardInterrupt:
        logger.error("interrupted")
        sys.exit(130)
