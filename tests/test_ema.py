"""--ema: the average follows its closed form over the recorded weights (fused steps too), resumes bit for bit, and
samples, validation and saves use it when asked while the trained weights stay untouched."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import library.training.trainer as trainer
from library.errors import ConfigError
from library.training.ema import EMAOptions, ExponentialMovingAverage, ema_name
from tests.test_full_model_training import cli_args
from tests.test_sampling import dataset_with_validation
from tests.test_train_network_e2e import train_args
from tests.training_helpers import parsed_args, train_in_process

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only wait


def lora_argv(models_dir: str, dataset: str, out_dir, tokenizer_dir: str, *extra: str, steps: int = 8) -> list[str]:
    argv = train_args(os.path.join(models_dir, "sd1.safetensors"), dataset, str(out_dir), tokenizer_dir,
                      "--lr_scheduler", "cosine", *extra)[1:]  # fmt: skip
    argv[argv.index("--max_train_steps") + 1] = str(steps)
    return argv


class Recorder:
    """Spies on the loop: the trained tensors when the EMA starts and after every step, and the run itself."""

    def __init__(self, monkeypatch):
        self.history: list[list[torch.Tensor]] = []  # [weights at the start, after step 1, after step 2, ...]
        self.run = None
        start_ema, after_step = trainer.start_ema, trainer._after_step

        def recording_start(options, params):
            self.history.append([param.detach().clone() for param in params])
            return start_ema(options, params)

        def recording_after_step(run):
            self.run = run
            self.history.append([param.detach().clone() for param in trainer._trainable_parameters(run)])
            after_step(run)

        monkeypatch.setattr(trainer, "start_ema", recording_start)
        monkeypatch.setattr(trainer, "_after_step", recording_after_step)


def closed_form(history: list[list[torch.Tensor]], options: EMAOptions) -> list[torch.Tensor]:
    """The average after the last step, as a weighted sum of the recorded weights (float64):
    e = prod(a_j) p_0 + sum_j (1 - a_j) prod(a_i, i > j) p_(u_j), with a_j = decay(u_j) ** (u_j - u_(j-1))."""
    updates = [step for step in range(1, len(history)) if step % options.update_every == 0]
    factors = [options.decay_at(step) ** (step - previous) for step, previous in zip(updates, [0, *updates])]
    coefficients = {0: 1.0}  # step -> weight of the weights after that step
    for step, factor in zip(updates, factors):
        coefficients = {key: value * factor for key, value in coefficients.items()}
        coefficients[step] = 1 - factor
    assert sum(coefficients.values()) == pytest.approx(1.0)
    return [
        sum(weight * history[step][index].double() for step, weight in coefficients.items())
        for index in range(len(history[0]))
    ]


# ---- the average -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("network", ["--ema_decay", "0.7"]),
        ("network", ["--ema_decay", "0.9", "--ema_warmup_steps", "1", "--ema_warmup_power", "1",
                     "--ema_update_every", "2"]),
        ("network", ["--ema_decay", "0.8", "--fused_backward_pass", "--optimizer_type", "AdamW"]),
        ("finetune", ["--ema_decay", "0.8", "--blockwise_fused_optimizers", "--optimizer_type", "AdamW",
                      "--learning_rate", "1e-3"]),
    ],
    ids=["every_step", "warmup_every_2", "fused_backward", "finetune_blockwise"],
)  # fmt: skip
def test_ema_equals_closed_form_over_recorded_weights(
    method, extra, tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path, monkeypatch
):
    recorder = Recorder(monkeypatch)
    if method == "network":
        argv = lora_argv(tiny_models_dir, toy_dataset, tmp_path, tokenizer_dir, "--ema", *extra, steps=5)
    else:
        argv = cli_args("", os.path.join(tiny_models_dir, "sd1.safetensors"), toy_dataset, str(tmp_path),
                        tokenizer_dir, "--ema", *extra, "--max_train_steps", "5", "--cpu_threads", "1")[1:]  # fmt: skip

    train_in_process(argv, method=method)

    ema = recorder.run.ema
    assert len(recorder.history) == 6  # the start and 5 steps
    assert not torch.equal(recorder.history[0][0], recorder.history[-1][0])  # the weights did move
    expected = closed_form(recorder.history, ema.options)
    for shadow, value in zip(ema.shadows, expected, strict=True):
        torch.testing.assert_close(shadow.double(), value, rtol=1e-5, atol=1e-7)
    assert ema.last_update == (4 if "--ema_update_every" in extra else 5)


def test_ema_of_half_parameters_averages_in_float32_and_restores_them_exactly():
    param = torch.nn.Parameter(torch.full((4,), 1.0, dtype=torch.bfloat16))
    ema = ExponentialMovingAverage([param], EMAOptions(enabled=True, decay=0.999))
    with torch.no_grad():
        param.add_(1.0)  # 2.0: the average moves by 0.001, below bfloat16's resolution at 1.0 (0.0078)
    ema.update(1)

    assert ema.shadows[0].dtype == torch.float32
    torch.testing.assert_close(ema.shadows[0], torch.full((4,), 1.001))
    with ema.in_place():
        assert torch.equal(param, torch.full((4,), 1.001).to(torch.bfloat16))
    assert torch.equal(param, torch.full((4,), 2.0, dtype=torch.bfloat16))
    torch.testing.assert_close(ema.shadows[0], torch.full((4,), 1.001))


def test_ema_on_cpu_keeps_no_copy_beside_the_weights():
    param = torch.nn.Parameter(torch.randn(3, 3))
    ema = ExponentialMovingAverage([param], EMAOptions(enabled=True, device="cpu"))
    assert ema.shadows[0].device.type == "cpu" and ema.shadows[0].data_ptr() != param.data_ptr()
    assert ema.size_bytes == 9 * 4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--save_ema"], "--save_ema use the EMA weights: add --ema"),
        (["--ema_for_samples", "--save_both"], "--ema_for_samples and --save_both use the EMA weights"),
        (["--ema", "--save_ema", "--save_both"], "choose one"),
        (["--ema", "--ema_decay", "1"], "--ema_decay must be between 0 and 1"),
        (["--ema", "--ema_update_every", "0"], "--ema_update_every must be 1 or more"),
        (["--ema", "--ema_warmup_steps", "0"], "--ema_warmup_steps must be above 0"),
    ],
)
def test_ema_options_are_refused_when_inconsistent(extra, message):
    args = parsed_args("sd", ["--pretrained_model_name_or_path", "m.safetensors", *extra])
    with pytest.raises(ConfigError, match=message):
        EMAOptions.from_args(args)


def test_ema_is_refused_with_a_schedule_free_optimizer():
    from library.training.optimizers import OptimizerOptions

    args = parsed_args("sd", ["--pretrained_model_name_or_path", "m.safetensors", "--ema", "--optimizer_type",
                              "AdamWScheduleFree"])  # fmt: skip
    with pytest.raises(ConfigError, match="schedule-free optimizers already evaluate and save an average"):
        EMAOptions.from_args(args, OptimizerOptions.from_args(args))


def test_ema_names_its_copies_as_if_the_output_name_had_ema():
    assert ema_name("lora", "lora-step00000010.safetensors") == "lora-ema-step00000010.safetensors"
    assert ema_name("lora", "lora-000002") == "lora-ema-000002"
    assert ema_name("lora", "lora-best.safetensors") == "lora-ema-best.safetensors"


# ---- resume --------------------------------------------------------------------------------------------------

EMA_RESUME = ("--ema", "--ema_decay", "0.6", "--ema_warmup_steps", "1", "--ema_update_every", "2", "--save_both")


@pytest.fixture(scope="module")
def uninterrupted(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ema-full")
    train_in_process(lora_argv(tiny_models_dir, toy_dataset, out, tokenizer_dir, *EMA_RESUME, "--save_every_n_steps",
                               "3", "--save_state", "--save_state_on_train_end"))  # fmt: skip
    return out


def assert_identical(path_a, path_b) -> None:
    a, b = load_file(str(path_a)), load_file(str(path_b))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a), [key for key in a if not torch.equal(a[key], b[key])]


def test_resumed_twice_with_ema_is_bit_identical(uninterrupted, tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path):
    second, third = tmp_path / "second", tmp_path / "third"
    train_in_process(lora_argv(tiny_models_dir, toy_dataset, second, tokenizer_dir, *EMA_RESUME, "--resume",
                               str(uninterrupted / "lora-step00000003-state"), "--save_every_n_steps", "6",
                               "--save_state"))  # fmt: skip
    train_in_process(lora_argv(tiny_models_dir, toy_dataset, third, tokenizer_dir, *EMA_RESUME, "--resume",
                               str(second / "lora-step00000006-state"), "--save_state_on_train_end"))  # fmt: skip

    # step 3 is between two updates (every 2 steps): the state carries the step of the last one
    for name in ("lora.safetensors", "lora-ema.safetensors", "lora-state/ema.safetensors"):
        assert_identical(uninterrupted / name, third / name)
    assert_identical(uninterrupted / "lora-ema-step00000006.safetensors", second / "lora-ema-step00000006.safetensors")
    ema = load_file(str(third / "lora-ema.safetensors"))
    trained = load_file(str(third / "lora.safetensors"))
    assert any(not torch.equal(ema[key], trained[key]) for key in trained)


def test_ema_leaves_the_trained_weights_bit_identical(uninterrupted, tiny_models_dir, toy_dataset, tokenizer_dir,
                                                      tmp_path):  # fmt: skip
    train_in_process(lora_argv(tiny_models_dir, toy_dataset, tmp_path, tokenizer_dir))

    assert_identical(uninterrupted / "lora.safetensors", tmp_path / "lora.safetensors")
    with safe_open(str(uninterrupted / "lora-ema.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_ema"] == "True" and metadata["ss_ema_decay"] == "0.6" and metadata["ss_steps"] == "8"
    with safe_open(str(uninterrupted / "lora.safetensors"), "pt") as handle:
        assert "ss_ema" not in handle.metadata()


# ---- where the average is used --------------------------------------------------------------------------------


def test_samples_validation_and_saves_use_the_ema_when_asked(
    tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path, monkeypatch
):
    import library.training.sampling as sampling
    import library.training.validation as validation

    recorder = Recorder(monkeypatch)
    seen: dict[str, list[bool]] = {"samples": [], "validation": []}

    def holds_ema() -> bool:
        """The weights in place are the average of the weights recorded so far (and differ from the trained ones)."""
        ema = recorder.run.ema
        expected = closed_form(recorder.history, ema.options)
        averaged = all(torch.allclose(p.double(), e, rtol=1e-5, atol=1e-7) for p, e in zip(ema.params, expected))
        return averaged and not all(torch.equal(p, t) for p, t in zip(ema.params, recorder.history[-1]))

    draw_one, losses = sampling._draw_one, validation.validation_losses
    monkeypatch.setattr(sampling, "_draw_one", lambda *a, **k: seen["samples"].append(holds_ema()) or draw_one(*a, **k))
    monkeypatch.setattr(validation, "validation_losses",
                        lambda *a, **k: seen["validation"].append(holds_ema()) or losses(*a, **k))  # fmt: skip
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 1\n", encoding="utf-8")
    dataset = dataset_with_validation(toy_dataset, tmp_path)

    train_in_process(lora_argv(tiny_models_dir, dataset, tmp_path / "out", tokenizer_dir, "--ema", "--ema_decay",
                               "0.5", "--ema_for_samples", "--save_ema", "--sample_prompts", str(prompts),
                               "--sample_every_n_steps", "2", "--validate_every_n_steps", "2", steps=4))  # fmt: skip

    assert seen == {"samples": [True, True], "validation": [True, True]}
    ema = recorder.run.ema
    # the trained weights are back after each evaluation, bit for bit
    assert all(torch.equal(param, after) for param, after in zip(ema.params, recorder.history[-1]))
    saved = load_file(str(tmp_path / "out" / "lora.safetensors"))
    network = recorder.run.method.network
    with ema.in_place():
        expected = {key: value.detach().clone() for key, value in network.state_dict().items()}
    assert saved.keys() <= expected.keys()
    assert all(torch.equal(saved[key], expected[key]) for key in saved)
