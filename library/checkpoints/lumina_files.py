"""Reading and writing Lumina Image 2.0 models: the single files users download (transformer, Gemma2, the FLUX.1 AE),
a ComfyUI all-in-one checkpoint, or a diffusers folder, offline; saving the transformer back in the released layout
or a whole diffusers folder."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from library.checkpoints import flux_keys, lumina_configs, lumina_keys
from library.checkpoints.files import load_state_dict, save_state_dict
from library.checkpoints.weights import assign_weights, empty_model
from library.errors import CheckpointError

logger = logging.getLogger(__name__)

COMPONENTS = ("transformer", "gemma2", "ae")
COMPONENT_OPTIONS = {"transformer": "--pretrained_model_name_or_path", "gemma2": "--gemma2", "ae": "--ae"}
COMPONENT_NAMES = {
    "transformer": "a Lumina 2 transformer",
    "gemma2": "a Gemma2 text encoder",
    "ae": "the FLUX.1 autoencoder",
    "checkpoint": "a ComfyUI Lumina 2 checkpoint",
    "unknown": "no Lumina 2 component",
}
DIFFUSERS_SUBFOLDERS = {"transformer": "transformer", "gemma2": "text_encoder", "ae": "vae"}


@dataclass
class LuminaSources:
    """Where each model comes from: a single file, or None to take it from the diffusers folder `folder`."""

    folder: str | None
    transformer: str | None
    gemma2: str | None
    ae: str | None
    allow_pickle: bool = False

    def missing(self) -> list[str]:
        """Options the user must add: every component needs a file unless a diffusers folder provides it."""
        if self.folder is not None:
            return []
        return [COMPONENT_OPTIONS[name] for name in COMPONENTS if getattr(self, name) is None]


def read_component(path: str, component: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of `component` in a single file: the whole file, or its part of an all-in-one checkpoint."""
    state_dict = load_state_dict(path, allow_pickle=allow_pickle)
    found = lumina_keys.component_of(state_dict)
    if found == "checkpoint":
        return lumina_keys.checkpoint_part(state_dict, component, path)
    if found != component:
        raise CheckpointError(
            f"{COMPONENT_OPTIONS[component]} {path} holds {COMPONENT_NAMES[found]}, not {COMPONENT_NAMES[component]}"
        )
    return state_dict


def load_transformer(path: str, dtype: torch.dtype, allow_pickle: bool = False) -> torch.nn.Module:
    from diffusers import Lumina2Transformer2DModel

    config, state = lumina_keys.split_transformer(read_component(path, "transformer", allow_pickle), path)
    logger.info("%s: Lumina 2 transformer, %d layers, %d wide", path, config["num_layers"], config["hidden_size"])
    model = empty_model(lambda: Lumina2Transformer2DModel(**config))
    return assign_weights(model, state, dtype, "transformer", path)


def load_gemma2(path: str, dtype: torch.dtype, allow_pickle: bool = False) -> torch.nn.Module:
    from transformers import Gemma2Config, Gemma2Model

    config, state = lumina_keys.split_gemma2(read_component(path, "gemma2", allow_pickle), path)
    model = assign_weights(empty_model(lambda: Gemma2Model(Gemma2Config(**config))), state, dtype, "Gemma2", path)
    return model.eval()


def load_ae(path: str, dtype: torch.dtype, allow_pickle: bool = False) -> torch.nn.Module:
    """The FLUX.1 AE (FLUX's key map), from `ae.safetensors` or from an all-in-one checkpoint."""
    from diffusers import AutoencoderKL

    config, state = flux_keys.split_ae(read_component(path, "ae", allow_pickle), path)
    return assign_weights(empty_model(lambda: AutoencoderKL(**config)), state, dtype, "AE", path)


def _load_from_folder(folder: str, component: str, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import AutoencoderKL, Lumina2Transformer2DModel
    from transformers import Gemma2Model

    subfolder = DIFFUSERS_SUBFOLDERS[component]
    if not os.path.isfile(os.path.join(folder, subfolder, "config.json")):
        raise CheckpointError(
            f"{folder} has no {subfolder}/config.json: not a diffusers Lumina 2 folder; give the folder of a "
            f"Lumina2Pipeline, or {COMPONENT_OPTIONS[component]} with a single file"
        )
    try:
        if component == "gemma2":
            return Gemma2Model.from_pretrained(folder, subfolder=subfolder, dtype=dtype, local_files_only=True).eval()
        model_class = Lumina2Transformer2DModel if component == "transformer" else AutoencoderKL
        return model_class.from_pretrained(folder, subfolder=subfolder, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load {subfolder} of the diffusers model {folder}: {err}") from err


LOADERS = {"transformer": load_transformer, "gemma2": load_gemma2, "ae": load_ae}


def load_models(sources: LuminaSources, dtype: torch.dtype, ae_dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """The three models by component name; a single file given for a component replaces the folder's."""
    models = {}
    for component in COMPONENTS:
        component_dtype = ae_dtype if component == "ae" else dtype
        path = getattr(sources, component)
        if path is not None:
            models[component] = LOADERS[component](path, component_dtype, sources.allow_pickle)
        else:
            models[component] = _load_from_folder(sources.folder, component, component_dtype)
    check_compatible(models)
    return models


def check_compatible(models: dict[str, torch.nn.Module]) -> None:
    """The AE's latent channels and Gemma2's width must be what the transformer takes."""
    transformer = models["transformer"].config
    if models["ae"].config.latent_channels != transformer.in_channels:
        raise CheckpointError(
            f"the AE has {models['ae'].config.latent_channels} latent channels but the transformer takes "
            f"{transformer.in_channels}: is --ae the FLUX.1 AE?"
        )
    if models["gemma2"].config.hidden_size != transformer.cap_feat_dim:
        raise CheckpointError(
            f"the text encoder is {models['gemma2'].config.hidden_size} wide but the transformer reads "
            f"{transformer.cap_feat_dim}-wide caption features: is --gemma2 Gemma2-2B?"
        )


def save_transformer(transformer: torch.nn.Module, path: str, dtype: torch.dtype | None, metadata: dict[str, str]):
    """Write the transformer as one file in the released layout (what lumina-image-2.safetensors holds)."""
    state = lumina_keys.join_transformer(transformer.state_dict(), dict(transformer.config))
    if dtype is not None:
        state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    save_state_dict(state, path, metadata if path.endswith(".safetensors") else None)


def save_gemma2(gemma2: torch.nn.Module, path: str, dtype: torch.dtype | None) -> None:
    """Write Gemma2 as one file with the `model.` prefix of the released files (what --gemma2 reads back)."""
    state = lumina_keys.join_gemma2(gemma2.state_dict(), gemma2.config.num_hidden_layers)
    if dtype is not None:
        state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    save_state_dict(state, path)


def release_scheduler():
    """The sampler of the release: flow-matching Euler with a static shift of 6."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**lumina_configs.scheduler_config())


def save_diffusers_folder(models: dict, tokenizer, path: str, safe: bool) -> None:
    """Write a Lumina2Pipeline folder with all models, the tokenizer and the release's scheduler (atomically)."""
    from diffusers import Lumina2Pipeline

    from library.atomic import atomic_path

    pipeline = Lumina2Pipeline(
        transformer=models["transformer"],
        scheduler=release_scheduler(),
        vae=models["ae"],
        text_encoder=models["gemma2"],
        tokenizer=tokenizer,
    )
    with atomic_path(path, suffix="") as temp:
        pipeline.save_pretrained(temp, safe_serialization=safe)
