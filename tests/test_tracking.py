"""TensorBoard logging: the dated run folder, and per-step loss and learning-rate series in the event files."""

from __future__ import annotations

import os
import re

import pytest
import torch

from library.training.tracking import StepMetrics, log_step_metrics
from tests.conftest import run_cli
from tests.test_train_network_e2e import train_args


class RecordingAccelerator:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def log(self, values: dict, step: int) -> None:
        self.logged.append((step, values))


def test_step_metrics_are_logged_in_step_order_with_their_own_values():
    accelerator = RecordingAccelerator()
    pending = [
        StepMetrics(step, {"loss/current": torch.tensor(step / 10)}, {"lr/unet": 0.1 * step}) for step in (1, 2, 3)
    ]
    log_step_metrics(accelerator, pending)
    assert [step for step, _ in accelerator.logged] == [1, 2, 3]
    assert accelerator.logged[2][1] == {"loss/current": pytest.approx(0.3), "lr/unet": pytest.approx(0.3)}
    assert pending == []
    log_step_metrics(accelerator, pending)  # nothing pending: nothing logged
    assert len(accelerator.logged) == 3


def scalar_series(run_folder: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_folder)
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_every_step_of_loss_and_learning_rate(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path):
    logs = tmp_path / "logs"
    args = train_args(
        os.path.join(tiny_models_dir, "sd1.safetensors"),
        toy_dataset,
        str(tmp_path / "out"),
        tokenizer_dir,
        "--logging_dir",
        str(logs),
        "--log_prefix",
        "style1_",
        "--log_with",
        "tensorboard",
        "--log_tracker_name",
        "tiny",
        "--lr_scheduler",
        "linear",
        "--wandb_api_key",
        "wandb-secret-key",
    )
    result = run_cli(args, tmp_path, launcher=False)
    assert result.returncode == 0, result.stdout + result.stderr
    (dated,) = os.listdir(logs)
    assert re.fullmatch(r"style1_\d{14}", dated), dated
    run_folder = logs / dated / "tiny"
    series = scalar_series(str(run_folder))

    current = series["loss/current"]
    assert [step for step, _ in current] == [1, 2, 3, 4]
    assert all(value > 0 for _, value in current)
    averages = [value for _, value in series["loss/average"]]
    running = [sum(value for _, value in current[: index + 1]) / (index + 1) for index in range(4)]
    assert averages == pytest.approx(running, rel=1e-5)
    assert series["loss/epoch"] == [(4, pytest.approx(running[-1], rel=1e-5))]  # the partial epoch at the end
    # each step logs the rate the scheduler set after it: linear decay of 1e-3 over 4 steps
    decay = [(1, pytest.approx(7.5e-4)), (2, pytest.approx(5e-4)), (3, pytest.approx(2.5e-4)), (4, 0.0)]
    assert series["lr/unet"] == decay and series["lr/textencoder"] == decay
    for top, _dirs, names in os.walk(logs):
        for name in names:
            with open(os.path.join(top, name), "rb") as handle:
                assert b"wandb-secret-key" not in handle.read()
