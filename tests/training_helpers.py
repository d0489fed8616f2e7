"""Training runs inside the test process: what an entry script runs under `accelerate launch`, without paying the
interpreter and import start-up for every run (seconds per run on a busy machine)."""

from __future__ import annotations

import torch


def train_in_process(argv: list[str], family: str = "sd", method: str = "network") -> None:
    """`run_training(family, method)` on `argv` (options only, no script name); user errors exit like the CLI.

    The loop sets torch's thread count and accelerate keeps one process-wide state; both are restored so the runs
    leave the test process as they found it.
    """
    from accelerate.state import AcceleratorState

    from library.training.entry import run_training

    threads = torch.get_num_threads()
    try:
        run_training(family, method, "test run", argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        torch.set_num_threads(threads)


def parsed_args(family: str, argv: list[str], method: str = "network"):
    """The namespace an entry script for `family` x `method` parses from `argv` (every option with its default; the
    required --output_dir is filled in when `argv` lacks it)."""
    from library.families import get_family_class
    from library.methods import get_method_class
    from library.training.entry import build_parser

    if "--output_dir" not in argv:
        argv = [*argv, "--output_dir", "unused"]
    return build_parser(get_family_class(family), get_method_class(method), "test").parse_args(argv)
