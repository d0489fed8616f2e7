"""Reading and writing SD3 / SD3.5 models offline: an SAI single file (with or without the text encoders), separate
CLIP-L / CLIP-G / T5-XXL / VAE files, or a diffusers folder; saving back as one SAI-layout file or a diffusers folder.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from library.checkpoints import sd3_configs, sd3_keys, sd_keys
from library.checkpoints.diffusers_folders import keep_text_model_level
from library.checkpoints.files import load_state_dict, save_state_dict
from library.checkpoints.t5_tokenizer import T5_FILES, load_t5_tokenizer
from library.checkpoints.tokenizers import load_clip_g_tokenizer, load_clip_tokenizer
from library.checkpoints.weights import assign_weights, empty_model
from library.errors import CheckpointError

logger = logging.getLogger(__name__)

COMPONENTS = sd3_keys.COMPONENTS  # transformer, vae, clip_l, clip_g, t5xxl
COMPONENT_OPTIONS = {"transformer": "--pretrained_model_name_or_path", "vae": "--vae", "clip_l": "--clip_l",
                     "clip_g": "--clip_g", "t5xxl": "--t5xxl"}  # fmt: skip
COMPONENT_NAMES = {"transformer": "the SD3 MMDiT", "vae": "the VAE", "clip_l": "CLIP-L", "clip_g": "CLIP-G",
                   "t5xxl": "T5-XXL"}  # fmt: skip
DIFFUSERS_SUBFOLDERS = {"transformer": "transformer", "vae": "vae", "clip_l": "text_encoder",
                        "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"}  # fmt: skip
# component_of's answer each standalone file must give
_FILE_KINDS = {"vae": "vae", "clip_l": "clip", "clip_g": "clip", "t5xxl": "t5xxl"}
_KIND_WORDS = {"transformer": "an SD3 MMDiT", "vae": "a VAE", "clip": "a CLIP text encoder", "t5xxl": "a T5 encoder",
               "diffusers": "an SD3 transformer in diffusers naming", "sd1": "an SD 1.x checkpoint",
               "sd2": "an SD 2.x checkpoint", "sdxl": "an SDXL checkpoint", "flux": "a FLUX.1 transformer",
               "lumina": "a Lumina checkpoint", "unknown": "no known model"}  # fmt: skip


@dataclass
class SD3Sources:
    """Where each model comes from: `checkpoint` is a single file or a diffusers folder; a separate file given for a
    component replaces the checkpoint's own."""

    checkpoint: str
    vae: str | None = None
    clip_l: str | None = None
    clip_g: str | None = None
    t5xxl: str | None = None
    allow_pickle: bool = False

    @property
    def folder(self) -> str | None:
        """The diffusers folder, when the checkpoint is one."""
        return self.checkpoint if os.path.isdir(self.checkpoint) else None

    def missing(self) -> list[str]:
        """Options the user must add: every component needs a file unless the checkpoint holds it. Reads only the
        single file's key names (for .safetensors only the header), so it is cheap to call before loading."""
        if self.folder is not None:
            return []
        held = sd3_keys.contents(file_keys(self.checkpoint, self.allow_pickle))
        return [COMPONENT_OPTIONS[name] for name in COMPONENTS[1:] if name not in held and getattr(self, name) is None]


@dataclass
class SD3Models:
    """The five models of an SD3 setup, and the non-model keys of the single file they came from (written back)."""

    transformer: torch.nn.Module
    vae: torch.nn.Module
    clip_l: torch.nn.Module
    clip_g: torch.nn.Module
    t5xxl: torch.nn.Module
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def variant(self) -> str:
        """sd3-medium, sd3.5-medium or sd3.5-large: the release the transformer's architecture follows."""
        return sd3_keys.variant(dict(self.transformer.config))


def file_keys(path: str, allow_pickle: bool = False) -> list[str]:
    """The tensor names of a weight file (only the header of a safetensors file is read)."""
    if path.lower().endswith(".safetensors") and os.path.isfile(path):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as handle:
                return list(handle.keys())
        except Exception as err:  # safetensors raises several private error types for a damaged header
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    return list(load_state_dict(path, allow_pickle))


def read_component(path: str, component: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a separate component file, checked to hold `component`."""
    state_dict = load_state_dict(path, allow_pickle=allow_pickle)
    found = sd3_keys.component_of(state_dict)
    if found != _FILE_KINDS[component]:
        raise CheckpointError(
            f"{COMPONENT_OPTIONS[component]} {path} holds {_KIND_WORDS.get(found, found)}, not "
            f"{COMPONENT_NAMES[component]}"
        )
    return state_dict


def build_model(component: str, config: dict, state: dict, dtype: torch.dtype, source: str) -> torch.nn.Module:
    """The model of `component` built from its config, holding `state` (diffusers / transformers names)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    factories = {
        "transformer": lambda: SD3Transformer2DModel(**config),
        "vae": lambda: AutoencoderKL(**config),
        "clip_l": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**config)),
        "clip_g": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**config)),
        "t5xxl": lambda: T5EncoderModel(T5Config(**config)),
    }
    if component == "t5xxl" and any(value.dtype == torch.float8_e4m3fn for value in state.values()):
        logger.info("%s: float8 e4m3fn T5-XXL weights, cast to %s", source, dtype)
    model = empty_model(factories[component])
    if component in ("clip_l", "clip_g"):
        state = sd_keys.text_encoder_to_model_keys(state, model)
    model = assign_weights(model, state, dtype, COMPONENT_NAMES[component], source)
    if component == "t5xxl":
        model.encoder.embed_tokens = model.shared  # one embedding, as the model ties it
    return model.eval()


def load_component_file(path: str, component: str, dtype: torch.dtype, allow_pickle: bool = False) -> torch.nn.Module:
    """A separate VAE, CLIP-L, CLIP-G or T5-XXL file (T5 in fp16, bf16 or fp8 e4m3fn, upcast to `dtype`)."""
    state_dict = read_component(path, component, allow_pickle)
    if component == "vae":
        config, state = sd3_keys.split_vae(state_dict, path)
    elif component == "t5xxl":
        config, state = sd3_keys.split_t5xxl(state_dict, path)
    else:
        config, state = sd3_keys.split_clip(state_dict, component, path)
    return build_model(component, config, state, dtype, path)


def _load_from_folder(folder: str, component: str, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    classes = {"transformer": SD3Transformer2DModel, "vae": AutoencoderKL, "clip_l": CLIPTextModelWithProjection,
               "clip_g": CLIPTextModelWithProjection, "t5xxl": T5EncoderModel}  # fmt: skip
    subfolder = DIFFUSERS_SUBFOLDERS[component]
    if not os.path.isfile(os.path.join(folder, subfolder, "config.json")):
        raise CheckpointError(
            f"{folder} has no {subfolder}/config.json: not a diffusers SD3 folder; give the folder of a "
            f"StableDiffusion3Pipeline, or {COMPONENT_OPTIONS[component]} with a single file"
        )
    kwargs = {"subfolder": subfolder, "torch_dtype": dtype, "local_files_only": True}
    try:
        model = classes[component].from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load {subfolder} of the diffusers model {folder}: {err}") from err
    return model.eval()


def load_models(
    sources: SD3Sources, dtype: torch.dtype, vae_dtype: torch.dtype, t5_dtype: torch.dtype | None = None
) -> SD3Models:
    """The five models; a separate file given for a component replaces the checkpoint's own. T5 uses `t5_dtype`
    (default `dtype`)."""
    dtypes = {name: dtype for name in COMPONENTS} | {"vae": vae_dtype, "t5xxl": t5_dtype or dtype}
    separate = {name: getattr(sources, name) for name in COMPONENTS[1:] if getattr(sources, name) is not None}
    models: dict[str, torch.nn.Module] = {}
    extras: dict[str, torch.Tensor] = {}
    if sources.folder is not None:
        for name in COMPONENTS:
            if name not in separate:
                models[name] = _load_from_folder(sources.folder, name, dtypes[name])
    else:
        parts = sd3_keys.split_checkpoint(load_state_dict(sources.checkpoint, sources.allow_pickle), sources.checkpoint)
        missing = [COMPONENT_OPTIONS[name] for name in COMPONENTS if name not in parts.states and name not in separate]
        if missing:
            raise CheckpointError(
                f"{sources.checkpoint} holds no {', '.join(n[2:] for n in missing)}: give {' and '.join(missing)}"
            )
        for name in parts.states:
            if name in separate:
                logger.info("%s: using %s %s instead of the checkpoint's own", name, COMPONENT_OPTIONS[name],
                            separate[name])  # fmt: skip
                continue
            models[name] = build_model(name, parts.configs[name], parts.states[name], dtypes[name], sources.checkpoint)
        # copies, not views: a view into the memory-mapped file would keep all of its pages resident for the run
        kept = tuple(sd3_keys.PREFIXES[name] for name in models)
        extras = {key: value.clone() for key, value in parts.extras.items() if key.startswith(kept)}
    for name, path in separate.items():
        models[name] = load_component_file(path, name, dtypes[name], sources.allow_pickle)
    loaded = SD3Models(**models, extras=extras)
    check_compatible(loaded)
    logger.info("%s: SD3 transformer of the %s architecture", sources.checkpoint, loaded.variant)
    return loaded


def check_compatible(models: SD3Models) -> None:
    """The widths that connect the models must agree (a swapped or foreign file shows up here, not mid-step)."""
    transformer = models.transformer.config
    clip_l, clip_g, t5 = models.clip_l.config, models.clip_g.config, models.t5xxl.config
    latent_channels, pooled = models.vae.config.latent_channels, clip_l.projection_dim + clip_g.projection_dim
    problems = []
    if latent_channels != transformer.in_channels:
        problems.append(
            f"the VAE has {latent_channels} latent channels, the transformer takes {transformer.in_channels} "
            "(is --vae the SD3 VAE?)"
        )
    if pooled != transformer.pooled_projection_dim:
        problems.append(
            f"CLIP-L and CLIP-G pool to {clip_l.projection_dim} + {clip_g.projection_dim} values, the transformer "
            f"takes {transformer.pooled_projection_dim} (are --clip_l and --clip_g swapped?)"
        )
    if t5.d_model != transformer.joint_attention_dim or clip_l.hidden_size + clip_g.hidden_size > t5.d_model:
        problems.append(
            f"T5 is {t5.d_model} wide and CLIP-L + CLIP-G {clip_l.hidden_size} + {clip_g.hidden_size}, the "
            f"transformer reads {transformer.joint_attention_dim}-wide text states"
        )
    if problems:
        raise CheckpointError("the SD3 models do not fit together: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers.


def load_tokenizers(model_dir: str | None = None, cache_dir: str | None = None, t5_path: str | None = None) -> list:
    """[CLIP-L, CLIP-G, T5] tokenizers, offline. CLIP-L pads with its end token, CLIP-G with "!" (as the releases'
    tokenizers do); T5 comes from `t5_path`, the diffusers folder's tokenizer_3/ or `cache_dir`."""
    clip_l = load_clip_tokenizer(False, model_dir=model_dir, cache_dir=cache_dir)
    clip_g = load_clip_g_tokenizer(clip_l, model_dir=model_dir, cache_dir=cache_dir)
    folder3 = os.path.join(model_dir, "tokenizer_3") if model_dir else None
    if t5_path is None and folder3 and any(os.path.isfile(os.path.join(folder3, name)) for name in T5_FILES):
        t5_path = folder3
    # model_dir is not passed on: its tokenizer_2/ is CLIP-G's here, not T5's as in FLUX folders
    t5 = load_t5_tokenizer(t5_path, None, cache_dir)
    return [clip_l, clip_g, t5]


# ---------------------------------------------------------------------------------------------------------------
# Saving.


def model_configs(models: SD3Models) -> dict[str, dict]:
    """Each model's config as a plain dict, by component name (what the key maps are built from)."""
    configs = {name: dict(getattr(models, name).config) for name in ("transformer", "vae")}
    configs |= {name: getattr(models, name).config.to_dict() for name in sd3_keys.TEXT_ENCODERS}
    return configs


def checkpoint_state(models: SD3Models, text_encoders: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The transformer, the VAE and the named text encoders (clip_l, clip_g, t5xxl) in the SAI single-file layout,
    with the extras of those components."""
    unknown = set(text_encoders) - set(sd3_keys.TEXT_ENCODERS)
    if unknown:
        raise ValueError(f"unknown text encoder(s) {sorted(unknown)}; expected some of {sd3_keys.TEXT_ENCODERS}")
    names = ("transformer", "vae", *text_encoders)
    configs = model_configs(models)
    parts = sd3_keys.SD3Parts(
        configs={name: configs[name] for name in names},
        states={name: getattr(models, name).state_dict() for name in names},
        extras=models.extras,
    )
    return sd3_keys.join_checkpoint(parts)


def save_checkpoint(
    models: SD3Models,
    path: str,
    dtype: torch.dtype | None,
    metadata: dict[str, str] | None = None,
    text_encoders: tuple[str, ...] = (),
) -> None:
    """Write one SAI-layout file (what sd3.5_large.safetensors holds: MMDiT and VAE), with the named text encoders
    inside when asked (as the `incl_clips` files); atomically."""
    state = checkpoint_state(models, text_encoders)
    if dtype is not None:
        state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    save_state_dict(state, path, metadata if path.endswith(".safetensors") else None)


def release_scheduler():
    """The sampler of the SD3 / SD3.5 releases: flow-matching Euler with shift 3.0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**sd3_configs.scheduler_config())


def build_pipeline(models: SD3Models, tokenizers: list):
    """A StableDiffusion3Pipeline of the models, their three tokenizers and the release's scheduler."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=models.transformer,
        scheduler=release_scheduler(),
        vae=models.vae,
        text_encoder=models.clip_l,
        tokenizer=tokenizers[0],
        text_encoder_2=models.clip_g,
        tokenizer_2=tokenizers[1],
        text_encoder_3=models.t5xxl,
        tokenizer_3=tokenizers[2],
    )


def save_diffusers_folder(models: SD3Models, tokenizers: list, path: str, safe: bool = True) -> None:
    """Write a StableDiffusion3Pipeline folder with all models, the three tokenizers and the scheduler (atomically)."""
    from library.atomic import atomic_path

    with atomic_path(path, suffix="") as temp:
        build_pipeline(models, tokenizers).save_pretrained(temp, safe_serialization=safe)
        keep_text_model_level(temp)  # readable by transformers < 5.6 too
