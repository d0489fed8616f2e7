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
