"""Shared fixtures: tiny models in every format and a toy dataset, built once per test session, offline."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> str:
    """`sd1`, `sd2` and `sd2-v` tiny models as .safetensors, .ckpt and diffusers folders."""
    from library.testing.tiny_models import write_variant

    out = str(tmp_path_factory.mktemp("models"))
    for variant in ("sd1", "sd2-v"):
        write_variant(variant, out)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """A CLIP tokenizer folder rebuilt from open-clip-torch, shared by the runs."""
    from library.checkpoints.tokenizers import write_clip_tokenizer_files

    return write_clip_tokenizer_files(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> str:
    """The tiny SDXL model as `sdxl.safetensors` (SGM layout) and `sdxl-diffusers/`."""
    from library.testing.tiny_sdxl import write_tiny_sdxl

    out = str(tmp_path_factory.mktemp("sdxl"))
    write_tiny_sdxl(out)
    return out


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> dict[str, str]:
    """The tiny FLUX.1 model as BFL / ae / clip_l / t5xxl files, a diffusers folder and a tokenizer cache (paths)."""
    from library.testing.tiny_flux import write_tiny_flux

    return write_tiny_flux(str(tmp_path_factory.mktemp("flux")))


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
