"""Every family end to end through its LoRA script: train, save, load the file back into the family's models through
the shared adapter layer, and see the denoiser's output change. A new family joins with one line in FAMILIES."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open

from library.families import get_family_class
from networks import lora
from tests.conftest import run_cli
from tests.test_train_network_e2e import epoch_losses
from tests.training_helpers import parsed_args

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

FAMILIES = ["sd", "sdxl", "flux", "sd3", "lumina"]


def lora_run(tiny, dataset: str, out_dir: str) -> list[str]:
    return [
        tiny.scripts["network"], *tiny.model_args, *tiny.fast_args,
        "--dataset_config", dataset, "--output_dir", out_dir, "--output_name", "lora",
        "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "2",
        "--learning_rate", "1e-3", "--max_train_steps", "2", "--seed", "3",
        "--max_data_loader_n_workers", "0", "--cpu_threads", "1",
    ]  # fmt: skip


def denoiser_output(family, models) -> torch.Tensor:
    """The denoiser's prediction for fixed latents, timestep and caption (64 px images)."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, models.vae.config.latent_channels, 8, 8, generator=generator)
    batch = {"original_sizes": [(64, 64)], "crop_top_lefts": [(0, 0)], "target_size": (64, 64)}
    with torch.no_grad():
        conditioning = family.encode_conditioning(models, ["a photo of a red circle"], batch)
        return family.predict(models, latents, torch.tensor([500]), conditioning)


@pytest.mark.parametrize("family_id", FAMILIES)
def test_lora_trains_saves_and_changes_the_reloaded_models_output(family_id, tiny_family, toy_dataset, tmp_path):
    tiny = tiny_family(family_id)
    result = run_cli(lora_run(tiny, toy_dataset, str(tmp_path / "out")), tmp_path, launcher=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    losses = epoch_losses(output)
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses
    # the memory plan: every model with its size, device and dtype, and the trained values
    assert re.search(r"memory plan: denoiser: \d+\.\d\d GiB float32 on cpu", output)
    assert re.search(r"memory plan: trained: \d+\.\d\dM values, .* GiB on cpu", output)
    assert "memory plan: optimizer AdamW: about" in output
    path = str(tmp_path / "out" / "lora.safetensors")
    with safe_open(path, "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert keys and all(key.startswith("lora_") for key in keys)
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_steps"] == "2"
    assert metadata["modelspec.architecture"].endswith("/lora")

    family = get_family_class(family_id)(parsed_args(family_id, list(tiny.model_args)))
    family.validate()
    models = family.load(torch.float32)
    base = denoiser_output(family, models)
    table = family.adapter_targets(models)
    network, weights = lora.create_network_from_weights(1.0, path, models.vae, family.network_text_encoders(models),
                                                        family.network_denoiser(models), adapter_targets=table)
    network.apply_to(None, None, True, True)
    network.load_weights(path)
    assert set(network.file_state_dict()) == set(weights) == keys  # every module of the file found its layer
    with_lora = denoiser_output(family, models)
    assert not torch.allclose(base, with_lora)
    network.set_multiplier(0.0)
    assert torch.equal(denoiser_output(family, models), base)
