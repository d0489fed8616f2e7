"""Shared fixtures: tiny models in every format and a toy dataset, built once per test session, offline."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: they gain nothing from more, which idle-wait on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """`tiny_family(family_id)`: the family's tiny models on disk (library/testing/families.py), built once."""
    from library.testing.families import write_tiny

    built = {}

    def get(family: str):
        if family not in built:
            built[family] = write_tiny(family, str(tmp_path_factory.mktemp(f"tiny-{family}")))
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_models_dir(tiny_family) -> str:
    """`sd1` and `sd2-v` tiny models as .safetensors, .ckpt and diffusers folders."""
    return os.path.dirname(tiny_family("sd").files["sd1-safetensors"])


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """A CLIP tokenizer folder rebuilt from open-clip-torch, shared by the runs."""
    from library.checkpoints.tokenizers import write_clip_tokenizer_files

    return write_clip_tokenizer_files(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="session")
def sd_scripts_tokenizer_dir(tmp_path_factory) -> str:
    """A --tokenizer_cache_dir folder in the layout kohya-ss sd-scripts fills (CLIP, SD 2.x, CLIP-G, T5, Gemma)."""
    from library.testing.sd_scripts_tokenizers import write_sd_scripts_tokenizer_cache

    return write_sd_scripts_tokenizer_cache(str(tmp_path_factory.mktemp("sd_scripts_tokenizers")))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tiny_family) -> str:
    """The tiny SDXL model as `sdxl.safetensors` (SGM layout) and `sdxl-diffusers/`."""
    return os.path.dirname(tiny_family("sdxl").files["safetensors"])


@pytest.fixture(scope="session")
def tiny_flux_dir(tiny_family) -> dict[str, str]:
    """The tiny FLUX.1 model as BFL / ae / clip_l / t5xxl files, a diffusers folder and a tokenizer cache (paths)."""
    return tiny_family("flux").files


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory) -> str:
    """A toy dataset of 6 images with captions and 2 regularization images; returns the TOML path."""
    from library.testing.toy_data import write_toy_dataset

    return write_toy_dataset(str(tmp_path_factory.mktemp("data")), count=6, reg_count=2, batch_size=2)


def cli_env(tmp_path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI run: offline, no accelerate config, no hub cache."""
    env = dict(os.environ)
    env["HF_HOME"] = str(tmp_path / "hf_home")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_cli(
    args: list[str], tmp_path, launcher: bool = True, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run an entry script as a user would (through `accelerate launch` with no accelerate config file)."""
    env = cli_env(tmp_path, env)
    if launcher:
        accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
        command = [accelerate, "launch", "--quiet", *args]
    else:
        command = [sys.executable, *args]
    return subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
