"""What the tests of adapter types and LoRA tools share: tiny families loaded as training loads them, networks of every
adapter type on them, and the denoiser's output to compare. A new family joins through FAMILIES."""

from __future__ import annotations

import importlib

import torch

from library.families import get_family_class
from tests.test_families_e2e import denoiser_output
from tests.training_helpers import parsed_args, train_in_process

FAMILIES = ["sd", "sdxl", "flux"]
# --network_module and --network_args of each adapter type
TYPES = {
    "lora": ("networks.lora", {}),
    "dora": ("networks.lora", {"use_dora": "True"}),
    "loha": ("networks.loha", {}),
    "lokr": ("networks.lokr", {"factor": "4"}),
}
# tensor names of each type in kohya-format files, as LyCORIS writes them and ComfyUI reads them
SUFFIXES = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},
}


def load(family_id: str, argv) -> tuple:
    """(family, models) as a training script loads them from these model options."""
    family = get_family_class(family_id)(parsed_args(family_id, list(argv)))
    family.validate()
    return family, family.load(torch.float32)


def with_model(argv, path: str) -> list[str]:
    """Model options with another --pretrained_model_name_or_path."""
    argv = list(argv)
    argv[argv.index("--pretrained_model_name_or_path") + 1] = path
    return argv


def network(adapter_type: str, family, models, multiplier: float = 1.0, seed: int = 2, **network_args: str):
    """A network of `adapter_type` on the family's models with every tensor moved off its initial (no-op) values,
    as after training; not applied yet."""
    module_name, type_args = TYPES[adapter_type]
    module = importlib.import_module(module_name)
    created = module.create_network(multiplier, 4, 2, models.vae, family.network_text_encoders(models),
                                    family.network_denoiser(models), adapter_targets=family.adapter_targets(models),
                                    **type_args, **network_args)  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in created.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return created


def output(family, models) -> torch.Tensor:
    """The denoiser's prediction for a fixed input and caption (text encoders included)."""
    return denoiser_output(family, models)


def train(tiny, dataset: str, out_dir: str, adapter_type: str, *extra: str) -> str:
    """Two training steps of `adapter_type` on the tiny family, in this process; the saved file's path."""
    module_name, type_args = TYPES[adapter_type]
    network_args = [f"{key}={value}" for key, value in type_args.items()]
    argv = [*tiny.model_args, *tiny.fast_args, "--dataset_config", dataset, "--output_dir", out_dir,
            "--output_name", "lora", "--network_module", module_name, "--network_dim", "4", "--network_alpha", "2",
            "--learning_rate", "1e-2", "--max_train_steps", "2", "--seed", "3", "--max_data_loader_n_workers", "0",
            "--cpu_threads", "1", *extra]  # fmt: skip
    if network_args:
        argv += ["--network_args", *network_args]
    train_in_process(argv, tiny.family)
    return f"{out_dir}/lora.safetensors"
