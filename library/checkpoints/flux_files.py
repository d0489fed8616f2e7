"""Reading and writing FLUX.1 models: the four single files users download (transformer, ae, clip_l, t5xxl) or a
diffusers folder, offline; saving the transformer back in the BFL layout or a whole diffusers folder."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from library.checkpoints import flux_configs, flux_keys, sd_keys
from library.checkpoints.diffusers_folders import keep_text_model_level
from library.checkpoints.files import load_state_dict, save_state_dict
from library.checkpoints.weights import assign_weights, empty_model
from library.errors import CheckpointError

logger = logging.getLogger(__name__)

COMPONENT_OPTIONS = {"transformer": "--pretrained_model_name_or_path", "ae": "--ae", "clip_l": "--clip_l",
                     "t5xxl": "--t5xxl"}  # fmt: skip
COMPONENT_NAMES = {"transformer": "a FLUX.1 transformer", "ae": "the FLUX.1 autoencoder", "clip_l": "a CLIP-L text "
                   "encoder", "t5xxl": "a T5-XXL text encoder", "unknown": "no FLUX.1 component"}  # fmt: skip
DIFFUSERS_SUBFOLDERS = {"transformer": "transformer", "ae": "vae", "clip_l": "text_encoder", "t5xxl": "text_encoder_2"}


@dataclass
class FluxSources:
    """Where each model comes from: a single file, or None to take it from the diffusers folder `folder`."""

    folder: str | None
    transformer: str | None
    ae: str | None
    clip_l: str | None
    t5xxl: str | None
    allow_pickle: bool = False

    def missing(self) -> list[str]:
        """Options the user must add: every component needs a file unless a diffusers folder provides it."""
        if self.folder is not None:
            return []
        return [COMPONENT_OPTIONS[name] for name in ("ae", "clip_l", "t5xxl") if getattr(self, name) is None]


def read_component(path: str, component: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a single file, checked to hold `component`."""
    state_dict = load_state_dict(path, allow_pickle=allow_pickle)
    found = flux_keys.component_of(state_dict)
    if found != component:
        raise CheckpointError(
            f"{COMPONENT_OPTIONS[component]} {path} holds {COMPONENT_NAMES[found]}, not {COMPONENT_NAMES[component]}"
        )
    return state_dict


def load_transformer(path: str, dtype: torch.dtype, allow_pickle: bool = False) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    config, state = flux_keys.split_transformer(read_component(path, "transformer", allow_pickle), path)
    logger.info("%s: FLUX.1 [%s] transformer (BFL layout)", path, flux_keys.variant(config))
    return assign_weights(empty_model(lambda: FluxTransformer2DModel(**config)), state, dtype, "transformer", path)


def load_ae(path: str, dtype: torch.dtype, allow_pickle: bool = False) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    config, state = flux_keys.split_ae(read_component(path, "ae", allow_pickle), path)
    return assign_weights(empty_model(lambda: AutoencoderKL(**config)), state, dtype, "AE", path)


def load_clip_l(path: str, dtype: torch.dtype, allow_pickle: bool = False) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    config, state = flux_keys.split_clip_l(read_component(path, "clip_l", allow_pickle), path)
    model = empty_model(lambda: CLIPTextModel(CLIPTextConfig(**config)))
    return assign_weights(model, sd_keys.text_encoder_to_model_keys(state, model), dtype, "CLIP-L", path)


def load_t5xxl(path: str, dtype: torch.dtype, allow_pickle: bool = False) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    state_dict = read_component(path, "t5xxl", allow_pickle)
    if any(value.dtype == torch.float8_e4m3fn for value in state_dict.values()):
        logger.info("%s: float8 e4m3fn weights, cast to %s", path, dtype)
    config, state = flux_keys.split_t5xxl(state_dict, path)
    model = assign_weights(empty_model(lambda: T5EncoderModel(T5Config(**config))), state, dtype, "T5-XXL", path)
    model.encoder.embed_tokens = model.shared  # one embedding, as the model ties it
    return model


def _load_from_folder(folder: str, component: str, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    classes = {"transformer": FluxTransformer2DModel, "ae": AutoencoderKL, "clip_l": CLIPTextModel,
               "t5xxl": T5EncoderModel}  # fmt: skip
    subfolder = DIFFUSERS_SUBFOLDERS[component]
    if not os.path.isfile(os.path.join(folder, subfolder, "config.json")):
        raise CheckpointError(
            f"{folder} has no {subfolder}/config.json: not a diffusers FLUX.1 folder; give the folder of a "
            f"FluxPipeline, or {COMPONENT_OPTIONS[component]} with a single file"
        )
    try:
        return classes[component].from_pretrained(folder, subfolder=subfolder, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load {subfolder} of the diffusers model {folder}: {err}") from err


LOADERS = {"transformer": load_transformer, "ae": load_ae, "clip_l": load_clip_l, "t5xxl": load_t5xxl}


def load_models(sources: FluxSources, dtype: torch.dtype, ae_dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """The four models by component name; a single file given for a component replaces the folder's."""
    models = {}
    for component in ("transformer", "ae", "clip_l", "t5xxl"):
        component_dtype = ae_dtype if component == "ae" else dtype
        path = getattr(sources, component)
        if path is not None:
            models[component] = LOADERS[component](path, component_dtype, sources.allow_pickle)
        else:
            models[component] = _load_from_folder(sources.folder, component, component_dtype)
    if models["ae"].config.latent_channels * 4 != models["transformer"].config.in_channels:
        raise CheckpointError(
            f"the AE has {models['ae'].config.latent_channels} latent channels but the transformer takes "
            f"{models['transformer'].config.in_channels} packed inputs (4 per channel): is --ae the FLUX.1 AE?"
        )
    return models


def save_transformer(transformer: torch.nn.Module, path: str, dtype: torch.dtype | None, metadata: dict[str, str]):
    """Write the transformer as one BFL-layout file (what flux1-dev.safetensors holds)."""
    state = flux_keys.join_transformer(transformer.state_dict(), dict(transformer.config))
    if dtype is not None:
        state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    save_state_dict(state, path, metadata if path.endswith(".safetensors") else None)


def release_scheduler():
    """The sampler of the FLUX.1 releases: flow-matching Euler whose shift grows with the image token count
    (mu from 0.5 at 256 tokens to 1.15 at 4096, the dev schedule)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    (low_tokens, low_shift), (high_tokens, high_shift) = flux_configs.SCHEDULE_SHIFT_POINTS
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=low_shift, max_shift=high_shift,
        base_image_seq_len=low_tokens, max_image_seq_len=high_tokens,
    )  # fmt: skip


def save_diffusers_folder(models: dict, tokenizers: list, path: str, safe: bool) -> None:
    """Write a FluxPipeline folder with all models, both tokenizers and the release's scheduler (atomically)."""
    from diffusers import FluxPipeline

    from library.atomic import atomic_path

    pipeline = FluxPipeline(
        scheduler=release_scheduler(),
        vae=models["ae"],
        text_encoder=models["clip_l"],
        tokenizer=tokenizers[0],
        text_encoder_2=models["t5xxl"],
        tokenizer_2=tokenizers[1],
        transformer=models["transformer"],
    )
    with atomic_path(path, suffix="") as temp:
        pipeline.save_pretrained(temp, safe_serialization=safe)
        keep_text_model_level(temp)  # readable by transformers < 5.6 too
