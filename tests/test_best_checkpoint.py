"""--save_best and early stopping: through the CLI on a dataset with validation images, a run whose validation loss
rises stops after the patience, exits cleanly and leaves the best checkpoint with its step and loss."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.errors import ConfigError
from library.training.best_checkpoint import BestCheckpointOptions
from library.training.validation import ValidationOptions
from tests.conftest import run_cli
from tests.test_sampling import dataset_with_validation
from tests.test_train_network_e2e import train_args
from tests.training_helpers import parsed_args

PATIENCE = 2
VALIDATION_LINE = re.compile(r"(?<!best )validation loss (\S+) at step (\d+) \(")  # not the final "best ..." line


def validations(output: str) -> list[tuple[int, float]]:
    """(step, loss) of every validation the run logged."""
    return [(int(step), float(loss)) for loss, step in VALIDATION_LINE.findall(output)]


def expected_stop(losses: list[float], patience: int, min_delta: float = 0.0) -> tuple[int, int]:
    """(index of the best loss, index of the validation that stops the run), as the options define them."""
    best = improved = None
    since = 0
    for index, loss in enumerate(losses):
        if best is None or loss < losses[best]:
            best = index
        if improved is None or loss < improved - min_delta:
            improved, since = loss, 0
            continue
        since += 1
        if since >= patience:
            return best, index
    raise AssertionError(f"the losses never stopped improving: {losses}")


@pytest.fixture(scope="module")
def stopped_run(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path_factory):
    """A LoRA run at a learning rate high enough that the validation loss falls, then rises (validated each step)."""
    root = tmp_path_factory.mktemp("best")
    dataset = dataset_with_validation(toy_dataset, root)
    args = train_args(os.path.join(tiny_models_dir, "sd1.safetensors"), dataset, str(root / "out"), tokenizer_dir,
                      "--learning_rate", "0.1", "--validate_every_n_steps", "1", "--save_every_n_steps", "1",
                      "--save_best", "--early_stopping_patience", str(PATIENCE),
                      "--save_state_on_train_end")  # fmt: skip
    args[args.index("--max_train_steps") + 1] = "30"
    result = run_cli(args, root)
    return result, root / "out", result.stderr + result.stdout


def test_early_stopping_ends_the_run_cleanly_after_the_patience(stopped_run):
    result, out, output = stopped_run
    logged = validations(output)
    best, stop = expected_stop([loss for _, loss in logged], PATIENCE)
    best_step, stop_step = logged[best][0], logged[stop][0]

    assert result.returncode == 0, output
    assert "Traceback" not in output
    assert [step for step, _ in logged] == list(range(1, stop_step + 1))  # validated each step, none after the stop
    assert 1 < best_step < stop_step < 30  # the loss fell, then rose
    assert f"early stopping at step {stop_step}: {PATIENCE} validation(s) in a row without a loss below" in output
    best_file = out / "lora-best.safetensors"
    assert f"best validation loss {logged[best][1]:.6f} at step {best_step}, saved as {best_file}" in output
    with safe_open(str(out / "lora.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_steps"] == str(stop_step)  # the final result: the weights at the stop
    with open(out / "lora-state" / "train_state.json", encoding="utf-8") as handle:
        assert json.load(handle)["global_step"] == stop_step  # the final state, to continue with more patience
    with open(out / "lora-state" / "best_checkpoint.json", encoding="utf-8") as handle:
        tracking = json.load(handle)
    assert tracking["best_step"] == best_step and tracking["evaluations_since"] == PATIENCE
    step_saves = sorted(int(name[9:17]) for name in os.listdir(out) if re.fullmatch(r"lora-step\d{8}\.safetensors",
                                                                                     name))  # fmt: skip
    assert step_saves == list(range(1, stop_step))  # the stop step's weights are the final result
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # no temporary left behind


def test_best_checkpoint_is_the_save_of_the_lowest_validation_loss(stopped_run):
    _, out, output = stopped_run
    logged = validations(output)
    best_step, best_loss = min(logged, key=lambda item: item[1])

    with safe_open(str(out / "lora-best.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_steps"] == str(best_step)
    assert float(metadata["ss_validation_loss"]) == pytest.approx(best_loss, abs=1e-6)
    best = load_file(str(out / "lora-best.safetensors"))
    same_step = load_file(str(out / f"lora-step{best_step:08d}.safetensors"))
    assert best.keys() == same_step.keys()
    assert all(torch.equal(best[key], same_step[key]) for key in best)
    final = load_file(str(out / "lora.safetensors"))
    assert any(not torch.equal(best[key], final[key]) for key in best)


def test_best_and_early_stopping_need_validation_images():
    args = parsed_args("sd", ["--pretrained_model_name_or_path", "m.safetensors", "--save_best",
                              "--early_stopping_patience", "3"])  # fmt: skip
    options = BestCheckpointOptions.from_args(args)
    with pytest.raises(ConfigError, match="--save_best and --early_stopping_patience act on the validation loss"):
        options.check_validation(ValidationOptions(has_data=False))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--early_stopping_patience", "0"], "--early_stopping_patience must be 1 or more"),
        (["--early_stopping_min_delta", "0.01"], "--early_stopping_min_delta needs --early_stopping_patience"),
        (["--early_stopping_patience", "2", "--early_stopping_min_delta=-1"], "must be 0 or more"),
    ],
)
def test_early_stopping_options_are_checked(extra, message):
    args = parsed_args("sd", ["--pretrained_model_name_or_path", "m.safetensors", *extra])
    with pytest.raises(ConfigError, match=message):
        BestCheckpointOptions.from_args(args)
