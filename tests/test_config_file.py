"""Training config files: --config_file values as defaults, --output_config round trip, clear errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from library.errors import ConfigError
from library.training.config_file import parse_with_config_file, write_config_file
from library.training.entry import build_parser, run_training

TOKEN = "hf_SeCrEtToKeN123"
# fmt: off
OPTIONS = [
    "--pretrained_model_name_or_path", "model.safetensors",
    "--output_dir", "out",
    "--dataset_config", "data.toml",  # a Path option
    "--resolution", "512,768",  # a comma-separated value that parses to a list
    "--network_dim", "8",
    "--learning_rate", "1e-4",
    "--optimizer_args", "weight_decay=0.1", "betas=0.9,0.99",  # nargs="*"
    "--mixed_precision", "bf16",  # choices
    "--caption_prefix", 'é "q" C:\\x \x7f',  # characters TOML must escape
    "--save_state",  # a switch
    "--huggingface_repo_id", "me/my-lora",
    "--huggingface_token", TOKEN,
    "--wandb_api_key", "wandb-secret-key",
]
# fmt: on


def sd_network_parser():
    from library.families import get_family_class
    from library.methods import get_method_class

    return build_parser(get_family_class("sd"), get_method_class("network"), "test")


def parse(argv: list[str]):
    return parse_with_config_file(sd_network_parser(), argv)


def options_of(args) -> dict:
    values = vars(args).copy()
    for name in ("config_file", "output_config", "huggingface_token", "wandb_api_key"):
        values.pop(name)
    return values


def test_output_config_round_trips_every_kind_of_option(tmp_path):
    config = tmp_path / "run.toml"
    original = parse([*OPTIONS, "--config_file", str(config), "--output_config"])
    write_config_file(sd_network_parser(), original)
    reread = parse(["--config_file", str(config)])
    assert options_of(reread) == options_of(original)
    assert reread.resolution == [512, 768] and reread.optimizer_args == ["weight_decay=0.1", "betas=0.9,0.99"]
    assert reread.dataset_config == Path("data.toml") and reread.save_state is True
    assert reread.learning_rate == pytest.approx(1e-4)


def test_output_config_leaves_out_secrets_and_defaults(tmp_path):
    config = tmp_path / "run.toml"
    write_config_file(sd_network_parser(), parse([*OPTIONS, "--config_file", str(config), "--output_config"]))
    text = config.read_text()
    assert TOKEN not in text and "wandb-secret-key" not in text
    tables = tomllib.loads(text)
    assert tables["saving_and_resuming"] == {"save_state": True}
    assert tables["optimizer"]["learning_rate"] == pytest.approx(1e-4)
    assert "output_name" not in tables["training"]  # left at its default
    assert "huggingface_token" not in tables.get("hugging_face_hub", {})


def test_output_config_through_the_entry_writes_and_exits(tmp_path):
    run_training("sd", "network", "test", [*OPTIONS, "--config_file", str(tmp_path / "run"), "--output_config"])
    assert tomllib.loads((tmp_path / "run.toml").read_text())["model"]["pretrained_model_name_or_path"]


def test_output_config_refuses_to_overwrite(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("# mine\n")
    with pytest.raises(ConfigError, match="already exists"):
        write_config_file(sd_network_parser(), parse([*OPTIONS, "--config_file", str(config), "--output_config"]))
    assert config.read_text() == "# mine\n"


def test_output_config_needs_config_file():
    with pytest.raises(ConfigError, match="--output_config needs --config_file"):
        write_config_file(sd_network_parser(), parse([*OPTIONS, "--output_config"]))


def test_config_file_tables_are_flattened_and_command_line_overrides(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        "pretrained_model_name_or_path = 'model.safetensors'\n"
        "[training]\noutput_dir = 'from_file'\nmax_train_steps = 40\n"
        "[training.more]\nseed = 3\n"
        "[network]\nnetwork_dim = 16\nnetwork_args = ['conv_dim=4']\n"
    )
    args = parse(["--config_file", str(config), "--max_train_steps", "5"])
    assert (args.output_dir, args.max_train_steps, args.seed) == ("from_file", 5, 3)
    assert args.network_dim == 16 and args.network_args == ["conv_dim=4"]


def test_config_file_name_without_extension_gets_toml(tmp_path):
    (tmp_path / "run.toml").write_text("pretrained_model_name_or_path = 'm'\noutput_dir = 'o'\n")
    assert parse(["--config_file", str(tmp_path / "run")]).output_dir == "o"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[optimizer]\nlearnig_rate = 1e-4",
            r"run.toml: unknown option 'optimizer.learnig_rate'; did you mean 'learning_rate'",
        ),
        ("max_train_steps = 'many'", r"run.toml: max_train_steps: expected an integer, got 'many'"),
        ("max_train_steps = 2.5", r"max_train_steps: expected an integer, got 2.5"),
        ("learning_rate = true", r"learning_rate: expected a number, got True"),
        ("output_name = 5", r"output_name: expected a string \(in quotes\), got 5"),
        ("save_state = 'yes'", r"save_state: this option is a switch; write true or false"),
        ("mixed_precision = 'bf61'", r"mixed_precision: 'bf61' is not one of no, fp16, bf16; did you mean 'bf16'"),
        ("optimizer_args = 'a=1'", r"optimizer_args: expected a list"),
        ("network_dim = [4, 8]", r"network_dim: expected an integer"),
        ("seed = 1\n[training]\nseed = 2", r"'seed' is set twice \(seed and training.seed\)"),
        ("config_file = 'other.toml'", r"'config_file' only works on the command line"),
        ("[[datasets]]\nbatch_size = 2", r"'datasets' is a dataset config table; put datasets in the file given"),
        ("a = [", r"is not valid TOML"),
    ],
)
def test_config_file_rejects_bad_keys_and_values(tmp_path, text, message):
    config = tmp_path / "run.toml"
    config.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        parse(["--config_file", str(config), "--pretrained_model_name_or_path", "m", "--output_dir", "o"])


def test_config_file_missing_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="--config_file: file not found: .*nothing.toml"):
        parse(["--config_file", str(tmp_path / "nothing.toml")])


def test_config_file_errors_end_the_entry_with_one_line(tmp_path, caplog):
    config = tmp_path / "run.toml"
    config.write_text("max_train_step = 3\n")
    with pytest.raises(SystemExit) as stop:
        run_training("sd", "network", "test", ["--config_file", str(config)])
    assert stop.value.code == 1
    assert "unknown option 'max_train_step'; did you mean 'max_train_steps'?" in caplog.text
