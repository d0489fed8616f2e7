"""SD 1.x / 2.x original single-file (LDM layout) <-> diffusers / transformers key map, used in both directions.

One name table per component (UNet, VAE, text encoder), expanded per block from the diffusers configs, plus the
inference of those configs from tensor shapes. Every key of a file must be consumed by a model or be a known
non-model key (kept in `SDComponents.extras` under its original name, so a save writes it back unchanged).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from library.checkpoints.keymap import Entry, KeyMap, check_keys, format_keys
from library.errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # SD 1.x: a transformers CLIPTextModel
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: an OpenCLIP text tower
TEXT_MODEL_PREFIX = "text_model."  # our canonical text-encoder names keep it (transformers < 5.6, original files)

ModelType = Literal["sd1", "sd2", "sdxl", "sd3", "flux", "lumina", "unknown"]

# The DDPM schedule buffers that LDM training saved with the weights; no model uses them.
SCHEDULE_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    }
)
_V1_EXTRAS = SCHEDULE_BUFFERS | {CLIP_PREFIX + "embeddings.position_ids"}
_V2_EXTRAS = SCHEDULE_BUFFERS | {OPEN_CLIP_PREFIX + "logit_scale", OPEN_CLIP_PREFIX + "text_projection"}
_EXTRA_PREFIXES = ("model_ema.",)  # EMA copies of the UNet (names flattened, dots removed) and their counters

_FILE_HINT = (
    "Expected an SD {version} checkpoint in the original single-file layout "
    "(model.diffusion_model.*, first_stage_model.*, {text}*) matching the inferred architecture."
)


@dataclass
class SDComponents:
    """A checkpoint split into model state dicts (diffusers / transformers names) and non-model extras."""

    unet: dict[str, Tensor]  # diffusers UNet2DConditionModel names
    vae: dict[str, Tensor]  # diffusers AutoencoderKL names
    text_encoder: dict[str, Tensor]  # transformers CLIPTextModel names with the "text_model." prefix
    extras: dict[str, Tensor]  # original-layout keys that belong to no model, by their original name


@dataclass
class SDArchitecture:
    """Diffusers / transformers configs of the three models of an SD 1.x / 2.x checkpoint."""

    v2: bool
    unet_config: dict  # kwargs for UNet2DConditionModel(**cfg)
    vae_config: dict  # kwargs for AutoencoderKL(**cfg)
    text_config: dict  # kwargs for transformers CLIPTextConfig(**cfg); v2: one layer fewer than the file


# ---------------------------------------------------------------------------------------------------------------
# Name tables. Each maps original module names to diffusers / transformers module names; `_params` expands them to
# parameter names and `_entries` places them under an original and a model prefix.


def _params(modules: Mapping[str, str], params: tuple[str, ...] = ("weight", "bias")) -> dict[str, str]:
    return {f"{orig}.{param}": f"{model}.{param}" for orig, model in modules.items() for param in params}


def _same(*modules: str) -> dict[str, str]:
    return {name: name for name in modules}


def _entries(table: Mapping[str, str], original_prefix: str, model_prefix: str) -> Iterator[Entry]:
    for orig, model in table.items():
        yield Entry(original_prefix + orig, (model_prefix + model,))


_UNET_TOP = _params(
    {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }
)
# SDXL: the pooled text embedding and the size / crop embeddings enter through `label_emb` (diffusers: text_time).
_UNET_ADDITION_EMBEDDING = _params(
    {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}
)
_UNET_RESNET = _params(
    {
        "in_layers.0": "norm1",
        "in_layers.2": "conv1",
        "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2",
        "out_layers.3": "conv2",
    }
)
_UNET_RESNET_SHORTCUT = _params({"skip_connection": "conv_shortcut"})
_UNET_DOWNSAMPLER = _params({"0.op": "conv"})
_CONV = _params(_same("conv"))  # up/downsamplers
_UNET_TRANSFORMER = _params(_same("norm", "proj_in", "proj_out"))
_UNET_TRANSFORMER_BLOCK = _params(
    _same("attn1.to_out.0", "attn2.to_out.0", "norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2")
) | _params(_same("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v"), ("weight",))

_VAE_COMPONENT_TOP = _params({"conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"})
_VAE_TOP = _params(_same("quant_conv", "post_quant_conv"))
_VAE_RESNET = _params(_same("norm1", "conv1", "norm2", "conv2"))
_VAE_RESNET_SHORTCUT = _params({"nin_shortcut": "conv_shortcut"})
_VAE_ATTENTION_NORM = _params({"norm": "group_norm"})
_VAE_ATTENTION_PROJ = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}  # 1x1 convs <-> Linear

_CLIP_TOP = _params(_same("final_layer_norm")) | _params(
    _same("embeddings.token_embedding", "embeddings.position_embedding"), ("weight",)
)
_CLIP_LAYER = _params(
    _same(
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
        "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2",
    )
)  # fmt: skip
_OPEN_CLIP_TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
} | _params({"ln_final": "final_layer_norm"})
_OPEN_CLIP_LAYER = _params(
    {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
)
_QKV = ("q_proj", "k_proj", "v_proj")  # the order of OpenCLIP's fused in_proj tensors


# ---------------------------------------------------------------------------------------------------------------
# Tables expanded from the configs.


def _unet_resnet(original: str, model: str, shortcut: bool) -> Iterator[Entry]:
    yield from _entries(_UNET_RESNET, original, model)
    if shortcut:
        yield from _entries(_UNET_RESNET_SHORTCUT, original, model)


def _unet_transformer(original: str, model: str, depth: int) -> Iterator[Entry]:
    yield from _entries(_UNET_TRANSFORMER, original, model)
    for block in range(depth):
        yield from _entries(
            _UNET_TRANSFORMER_BLOCK, f"{original}transformer_blocks.{block}.", f"{model}transformer_blocks.{block}."
        )


def unet_entries(cfg: Mapping) -> Iterator[Entry]:
    """The UNet rows of a diffusers UNet2DConditionModel config (SD 1.x / 2.x, and SDXL's per-level depths)."""
    channels, per_level = list(cfg["block_out_channels"]), cfg["layers_per_block"]
    depth = cfg.get("transformer_layers_per_block", 1)
    depths = [depth] * len(channels) if isinstance(depth, int) else list(depth)
    down_attention = [name.startswith("CrossAttn") for name in cfg["down_block_types"]]
    up_attention = [name.startswith("CrossAttn") for name in cfg["up_block_types"]]
    yield from _entries(_UNET_TOP, "", "")
    if cfg.get("addition_embed_type") == "text_time":
        yield from _entries(_UNET_ADDITION_EMBEDDING, "", "")
    yield from _unet_down_entries(channels, per_level, down_attention, depths)
    yield from _unet_resnet("middle_block.0.", "mid_block.resnets.0.", False)
    yield from _unet_transformer("middle_block.1.", "mid_block.attentions.0.", depths[-1])
    yield from _unet_resnet("middle_block.2.", "mid_block.resnets.1.", False)
    yield from _unet_up_entries(len(channels), per_level, up_attention, depths[::-1])


def _unet_down_entries(
    channels: list[int], per_level: int, attention: list[bool], depths: list[int]
) -> Iterator[Entry]:
    """input_blocks: 0 is conv_in, then per level `per_level` resnet(+transformer) blocks and a downsampler."""
    for level in range(len(channels)):
        model = f"down_blocks.{level}."
        for layer in range(per_level):
            original = f"input_blocks.{1 + level * (per_level + 1) + layer}."
            in_channels = channels[level - 1] if layer == 0 and level > 0 else channels[level]
            yield from _unet_resnet(original + "0.", f"{model}resnets.{layer}.", in_channels != channels[level])
            if attention[level]:
                yield from _unet_transformer(original + "1.", f"{model}attentions.{layer}.", depths[level])
        if level < len(channels) - 1:
            downsampler = f"input_blocks.{(level + 1) * (per_level + 1)}."
            yield from _entries(_UNET_DOWNSAMPLER, downsampler, f"{model}downsamplers.0.")


def _unet_up_entries(levels: int, per_level: int, attention: list[bool], depths: list[int]) -> Iterator[Entry]:
    """output_blocks, in diffusers' up_blocks order (deepest level first): `per_level + 1` blocks per level.

    `depths` are the transformer depths in up-block order (diffusers reverses the down-block depths).
    """
    for level in range(levels):
        model = f"up_blocks.{level}."
        for layer in range(per_level + 1):
            original = f"output_blocks.{level * (per_level + 1) + layer}."
            # The skip concatenation always widens the input, so every up resnet has a shortcut conv.
            yield from _unet_resnet(original + "0.", f"{model}resnets.{layer}.", True)
            if attention[level]:
                yield from _unet_transformer(original + "1.", f"{model}attentions.{layer}.", depths[level])
        if level < levels - 1:  # the upsampler follows the last resnet (and its transformer, if any)
            upsampler = f"output_blocks.{level * (per_level + 1) + per_level}.{2 if attention[level] else 1}."
            yield from _entries(_CONV, upsampler, f"{model}upsamplers.0.")


def _vae_resnet(original: str, model: str, shortcut: bool) -> Iterator[Entry]:
    yield from _entries(_VAE_RESNET, original, model)
    if shortcut:
        yield from _entries(_VAE_RESNET_SHORTCUT, original, model)


def _vae_mid(original: str, model: str) -> Iterator[Entry]:
    yield from _vae_resnet(original + "block_1.", model + "resnets.0.", False)
    yield from _vae_resnet(original + "block_2.", model + "resnets.1.", False)
    attention, model_attention = original + "attn_1.", model + "attentions.0."
    yield from _entries(_VAE_ATTENTION_NORM, attention, model_attention)
    for orig, name in _VAE_ATTENTION_PROJ.items():
        yield Entry(f"{attention}{orig}.weight", (f"{model_attention}{name}.weight",), "conv1x1")
        yield Entry(f"{attention}{orig}.bias", (f"{model_attention}{name}.bias",))


def vae_entries(cfg: Mapping) -> Iterator[Entry]:
    channels = list(cfg["block_out_channels"])
    levels, per_level = len(channels), cfg["layers_per_block"]
    yield from _entries(_VAE_TOP, "", "")
    for part in ("encoder.", "decoder."):
        yield from _entries(_VAE_COMPONENT_TOP, part, part)
        yield from _vae_mid(part + "mid.", part + "mid_block.")
    for level in range(levels):
        original, model = f"encoder.down.{level}.", f"encoder.down_blocks.{level}."
        for layer in range(per_level):
            in_channels = channels[level - 1] if layer == 0 and level > 0 else channels[level]
            yield from _vae_resnet(
                f"{original}block.{layer}.", f"{model}resnets.{layer}.", in_channels != channels[level]
            )
        if level < levels - 1:
            yield from _entries(_CONV, f"{original}downsample.", f"{model}downsamplers.0.")
    reversed_channels = channels[::-1]
    for level in range(levels):  # the LDM decoder numbers its levels from the top, diffusers from the bottom
        original, model = f"decoder.up.{levels - 1 - level}.", f"decoder.up_blocks.{level}."
        for layer in range(per_level + 1):
            in_channels = reversed_channels[level - 1] if layer == 0 and level > 0 else reversed_channels[level]
            yield from _vae_resnet(
                f"{original}block.{layer}.", f"{model}resnets.{layer}.", in_channels != reversed_channels[level]
            )
        if level < levels - 1:
            yield from _entries(_CONV, f"{original}upsample.", f"{model}upsamplers.0.")


def clip_entries(layers: int, prefix: str = CLIP_PREFIX) -> Iterator[Entry]:
    """Rows of a transformers CLIP text model stored under `prefix` (SD 1.x's, or SDXL's first encoder)."""
    yield from _entries(_CLIP_TOP, prefix, TEXT_MODEL_PREFIX)
    for layer in range(layers):
        yield from _entries(
            _CLIP_LAYER, f"{prefix}encoder.layers.{layer}.", f"{TEXT_MODEL_PREFIX}encoder.layers.{layer}."
        )


def _open_clip_layer(file_layer: int, model_layer: int, prefix: str = OPEN_CLIP_PREFIX) -> Iterator[Entry]:
    original = f"{prefix}transformer.resblocks.{file_layer}."
    model = f"{TEXT_MODEL_PREFIX}encoder.layers.{model_layer}."
    yield from _entries(_OPEN_CLIP_LAYER, original, model)
    for param, name in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
        yield Entry(f"{original}attn.{name}", tuple(f"{model}self_attn.{qkv}.{param}" for qkv in _QKV), "fused")


def open_clip_entries(layers: int, prefix: str = OPEN_CLIP_PREFIX) -> Iterator[Entry]:
    """Rows of an OpenCLIP text tower under `prefix` (SD 2.x's, or SDXL's second encoder), fused q|k|v split."""
    yield from _entries(_OPEN_CLIP_TOP, prefix, TEXT_MODEL_PREFIX)
    for layer in range(layers):
        yield from _open_clip_layer(layer, layer, prefix)


def _open_clip_last_layer(arch: SDArchitecture) -> KeyMap:
    """The file's last resblock, which SD 2.x does not use; its model names point at the model's last layer."""
    layers = arch.text_config["num_hidden_layers"]
    return KeyMap(_open_clip_layer(layers, layers - 1))


def _component_maps(arch: SDArchitecture) -> dict[str, KeyMap]:
    """`SDComponents` field name -> key map with full original names."""
    unet = KeyMap(Entry(UNET_PREFIX + e.original, e.model, e.layout) for e in unet_entries(arch.unet_config))
    vae = KeyMap(Entry(VAE_PREFIX + e.original, e.model, e.layout) for e in vae_entries(arch.vae_config))
    layers = arch.text_config["num_hidden_layers"]
    text = KeyMap(open_clip_entries(layers) if arch.v2 else clip_entries(layers))
    return {"unet": unet, "vae": vae, "text_encoder": text}


# ---------------------------------------------------------------------------------------------------------------
# Split and join.


def ldm_key_names(arch: SDArchitecture) -> set[str]:
    """The original names every checkpoint of this architecture must hold (optional extras excluded)."""
    names = set().union(*(keymap.original_names for keymap in _component_maps(arch).values()))
    if arch.v2:
        names |= _open_clip_last_layer(arch).original_names
    return names


def _is_optional_extra(key: str, v2: bool) -> bool:
    return key in (_V2_EXTRAS if v2 else _V1_EXTRAS) or key.startswith(_EXTRA_PREFIXES)


def split_ldm_checkpoint(state_dict: Mapping[str, Tensor], arch: SDArchitecture) -> SDComponents:
    """Split an original-layout checkpoint into model state dicts and extras; every key must be accounted for."""
    state_dict = _with_canonical_clip_names(state_dict)
    extras = {key: tensor for key, tensor in state_dict.items() if _is_optional_extra(key, arch.v2)}
    version, text = ("2.x", OPEN_CLIP_PREFIX) if arch.v2 else ("1.x", CLIP_PREFIX)
    check_keys(
        (key for key in state_dict if key not in extras),
        ldm_key_names(arch),
        "Checkpoint keys do not match the SD checkpoint layout",
        _FILE_HINT.format(version=version, text=text),
    )
    if arch.v2:
        extras.update({key: state_dict[key] for key in _open_clip_last_layer(arch).original_names})
    models = {name: keymap.to_model(state_dict) for name, keymap in _component_maps(arch).items()}
    return SDComponents(**models, extras=extras)


def join_ldm_checkpoint(components: SDComponents, arch: SDArchitecture) -> dict[str, Tensor]:
    """The exact inverse of `split_ldm_checkpoint`: model state dicts and extras -> original-layout checkpoint.

    SD 2.x: if the extras lack the file's last text layer (a model loaded from a diffusers folder), a copy of the
    model's last layer is written in its place, so tools expecting all OpenCLIP layers can load the file; SD 2.x
    never uses that layer. Missing `text_projection` / `logit_scale` are left out (no SD pipeline reads them).
    """
    checkpoint: dict[str, Tensor] = {}
    for name, keymap in _component_maps(arch).items():
        state = getattr(components, name)
        check_keys(
            state,
            keymap.model_names,
            f"Cannot write the {name} in the original SD layout",
            f"Expected the state dict of a model built from the architecture's {name} config"
            + (" with canonical names (see text_encoder_from_model_keys)." if name == "text_encoder" else "."),
        )
        checkpoint.update(keymap.to_original(state))
    extras = dict(components.extras)
    if arch.v2:
        extras = _with_last_text_layer(extras, components.text_encoder, arch)
    _check_extras(extras, checkpoint, arch)
    checkpoint.update(extras)
    return checkpoint


def split_ldm_vae(state_dict: Mapping[str, Tensor], source: str) -> tuple[dict, dict[str, Tensor]]:
    """A VAE in the original layout -> (AutoencoderKL config, AutoencoderKL state dict); `source` names the file.

    Accepts a standalone VAE file (`encoder.*`, `decoder.*`, as vae-ft-mse-840000-ema-pruned) or a full SD
    checkpoint, whose `first_stage_model.*` is used and everything else ignored. A standalone file's training-only
    keys (`loss.*`: discriminator / LPIPS, `model_ema.*`) are skipped; any other unknown key is an error.
    """
    if any(key.startswith(VAE_PREFIX) for key in state_dict):
        vae_state = {key: tensor for key, tensor in state_dict.items() if key.startswith(VAE_PREFIX)}
    else:
        if any(key.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for key in state_dict):
            raise CheckpointError(
                f"{source} holds diffusers VAE weights; give the diffusers VAE folder (with its config.json) instead."
            )
        skipped = ("loss.", "model_ema.")
        vae_state = {VAE_PREFIX + key: tensor for key, tensor in state_dict.items() if not key.startswith(skipped)}
    config = infer_vae_config(Shapes(vae_state, source))
    keymap = KeyMap(Entry(VAE_PREFIX + e.original, e.model, e.layout) for e in vae_entries(config))
    check_keys(
        vae_state,
        keymap.original_names,
        f"{source}: VAE keys do not match the SD VAE layout",
        "Expected an SD VAE in the original layout (encoder.*, decoder.*, quant_conv.*, post_quant_conv.*).",
    )
    return config, keymap.to_model(vae_state)


def _with_last_text_layer(extras: dict[str, Tensor], text_encoder: Mapping[str, Tensor], arch: SDArchitecture) -> dict:
    last_layer = _open_clip_last_layer(arch)
    present = last_layer.original_names & extras.keys()
    if present == last_layer.original_names:
        return extras
    if present:
        raise CheckpointError(
            f"The extras hold only part of the last OpenCLIP text layer: missing "
            f"{format_keys(last_layer.original_names - present)}. Keep all of its tensors or none."
        )
    # Clones: safetensors refuses to save tensors that share storage.
    return extras | {key: tensor.clone() for key, tensor in last_layer.to_original(text_encoder).items()}


def _check_extras(extras: Mapping[str, Tensor], checkpoint: Mapping[str, Tensor], arch: SDArchitecture) -> None:
    last_layer = _open_clip_last_layer(arch).original_names if arch.v2 else frozenset()
    unknown = {key for key in extras if not _is_optional_extra(key, arch.v2) and key not in last_layer}
    clashing = extras.keys() & checkpoint.keys()
    if unknown or clashing:
        raise CheckpointError(
            f"Cannot write these extras into an SD {'2.x' if arch.v2 else '1.x'} checkpoint: "
            f"{format_keys(unknown | clashing)}. Extras must be non-model keys of the original layout."
        )


_LEGACY_CLIP_PREFIXES = tuple(
    "cond_stage_model.transformer." + part for part in ("embeddings.", "encoder.", "final_layer_norm.")
)


def _with_canonical_clip_names(state_dict: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """Read SD 1.x files saved from old transformers versions (CLIP names without `text_model.`) canonically.

    Some early fine-tunes and merges have them; a save writes the canonical names.
    """
    if not any(key.startswith(_LEGACY_CLIP_PREFIXES) for key in state_dict):
        return state_dict
    legacy = len("cond_stage_model.transformer.")
    return {
        (CLIP_PREFIX + key[legacy:] if key.startswith(_LEGACY_CLIP_PREFIXES) else key): tensor
        for key, tensor in state_dict.items()
    }


# ---------------------------------------------------------------------------------------------------------------
# Text-encoder names of the installed transformers version.


def text_encoder_to_model_keys(text_encoder: Mapping[str, Tensor], model: torch.nn.Module) -> dict[str, Tensor]:
    """Canonical text-encoder names -> the names `model.state_dict()` uses (transformers >= 5.6 drop `text_model.`)."""
    first_key = next(iter(model.state_dict()))
    if first_key.startswith(TEXT_MODEL_PREFIX):
        return dict(text_encoder)
    return {key.removeprefix(TEXT_MODEL_PREFIX): tensor for key, tensor in text_encoder.items()}


def text_encoder_from_model_keys(model_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A CLIPTextModel state dict of any transformers version -> canonical names (with `text_model.`).

    `embeddings.position_ids` (a persistent buffer in old transformers) is dropped: it is the constant
    arange, not a weight, and an original file's own copy travels in the extras.
    """
    return {
        key if key.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + key: tensor
        for key, tensor in model_state.items()
        if not key.endswith("embeddings.position_ids")
    }


# ---------------------------------------------------------------------------------------------------------------
# Model type detection and architecture inference.


def detect_model_type(keys: Iterable[str]) -> ModelType:
    """Tell the model family of a single-file checkpoint from its characteristic key names."""
    keys = set(keys)

    def has(*prefixes: str) -> bool:
        return any(key.startswith(prefixes) for key in keys)

    def has_denoiser(block: str) -> bool:
        return has(block, UNET_PREFIX + block)

    if has("conditioner.embedders.") or (has(UNET_PREFIX + "label_emb.") and not has("cond_stage_model.")):
        return "sdxl"
    if has_denoiser("joint_blocks."):
        return "sd3"
    if has_denoiser("double_blocks."):
        return "flux"
    if has_denoiser("cap_embedder."):
        return "lumina"
    if has(UNET_PREFIX + "input_blocks."):
        if has(OPEN_CLIP_PREFIX):
            return "sd2"
        if has("cond_stage_model.transformer."):
            return "sd1"
    return "unknown"


_OTHER_FAMILIES = {
    "sdxl": ("an SDXL", "sdxl_"),
    "sd3": ("an SD3", "sd3_"),
    "flux": ("a FLUX.1", "flux_"),
    "lumina": ("a Lumina", "lumina_"),
}


def infer_architecture(state_dict: Mapping[str, Tensor]) -> SDArchitecture:
    """Read the diffusers / transformers configs of an SD 1.x / 2.x original-layout checkpoint from its shapes."""
    model_type = detect_model_type(state_dict)
    if model_type in _OTHER_FAMILIES:
        name, scripts = _OTHER_FAMILIES[model_type]
        raise CheckpointError(f"This is {name} checkpoint, not SD 1.x / 2.x; train it with the {scripts}* scripts.")
    if model_type == "unknown":
        raise CheckpointError(
            "This checkpoint is not an SD 1.x / 2.x checkpoint in the original single-file layout "
            "(model.diffusion_model.*, first_stage_model.*, cond_stage_model.*) nor another known family."
        )
    state_dict = _with_canonical_clip_names(state_dict)
    v2 = model_type == "sd2"
    shapes = Shapes(state_dict)
    return SDArchitecture(
        v2=v2,
        unet_config=infer_unet_config(shapes, v2),
        vae_config=infer_vae_config(shapes),
        text_config=_infer_text_config(shapes, v2),
    )


class Shapes:
    """Shape and index look-ups on a checkpoint, failing with the name of the key that is missing."""

    def __init__(self, state_dict: Mapping[str, Tensor], source: str = "Checkpoint") -> None:
        self.state_dict = state_dict
        self.source = source

    def __call__(self, key: str) -> tuple[int, ...]:
        if key not in self.state_dict:
            raise CheckpointError(
                f"{self.source} lacks {key!r}, needed to read the model architecture; the file is incomplete "
                "or not in the original single-file layout."
            )
        return tuple(self.state_dict[key].shape)

    def has(self, key: str) -> bool:
        return key in self.state_dict

    def count(self, prefix: str) -> int:
        """How many numbered children `prefix<N>.` has (their highest number + 1)."""
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        numbers = [int(m.group(1)) for key in self.state_dict if (m := pattern.match(key))]
        return max(numbers) + 1 if numbers else 0


def infer_unet_config(shapes: Shapes, v2: bool) -> dict:
    """The UNet2DConditionModel config of an LDM / SGM UNet; `v2`: 64-channel heads (SD 2.x and SDXL)."""
    blocks = shapes.count(UNET_PREFIX + "input_blocks.")  # conv_in + per level: resnets and a downsampler
    first_downsampler = next(
        (i for i in range(1, blocks) if shapes.has(f"{UNET_PREFIX}input_blocks.{i}.0.op.weight")), blocks
    )
    per_level = first_downsampler - 1
    if per_level < 1 or blocks % (per_level + 1):
        raise CheckpointError(f"Checkpoint UNet has {blocks} input blocks, which fits no known UNet layout.")
    levels = blocks // (per_level + 1)
    level_blocks = [f"{UNET_PREFIX}input_blocks.{1 + level * (per_level + 1)}." for level in range(levels)]
    channels = tuple(shapes(block + "0.out_layers.3.weight")[0] for block in level_blocks)
    attention = [shapes.has(block + "1.norm.weight") for block in level_blocks]
    mid = UNET_PREFIX + "middle_block.1."
    # Per level (SDXL: 1, 2, 10); a level without attention gets 1, as in the released diffusers configs.
    depths = tuple(
        shapes.count(block + "1.transformer_blocks.") if has_attention else 1
        for block, has_attention in zip(level_blocks, attention)
    )
    return {
        "in_channels": shapes(UNET_PREFIX + "input_blocks.0.0.weight")[1],
        "out_channels": shapes(UNET_PREFIX + "out.2.weight")[0],
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        "block_out_channels": channels,
        "layers_per_block": per_level,
        "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else depths,
        "cross_attention_dim": shapes(mid + "transformer_blocks.0.attn2.to_k.weight")[1],
        # diffusers' `attention_head_dim` is the number of heads here (a known misnomer): SD 1.x uses 8 heads,
        # SD 2.x 64-channel heads.
        "attention_head_dim": tuple(max(1, c // 64) for c in channels) if v2 else 8,
        "norm_num_groups": 32,
        "use_linear_projection": len(shapes(mid + "proj_in.weight")) == 2,
    }


def infer_vae_config(shapes: Shapes) -> dict:
    """The AutoencoderKL config of an LDM-layout VAE (the scaling factor is the SD VAE's; SDXL sets its own)."""
    encoder = VAE_PREFIX + "encoder."
    levels = shapes.count(encoder + "down.")
    if levels == 0:
        raise CheckpointError(f"{shapes.source} has no VAE weights (no encoder.down.* tensors).")
    return {
        "in_channels": shapes(encoder + "conv_in.weight")[1],
        "out_channels": shapes(VAE_PREFIX + "decoder.conv_out.weight")[0],
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": tuple(
            shapes(f"{encoder}down.{level}.block.0.conv2.weight")[0] for level in range(levels)
        ),
        "layers_per_block": shapes.count(encoder + "down.0.block."),
        "latent_channels": shapes(VAE_PREFIX + "post_quant_conv.weight")[0],
        "norm_num_groups": 32,
        "scaling_factor": 0.18215,  # the SD VAE's latent scale; not stored in the file
    }


def _infer_text_config(shapes: Shapes, v2: bool) -> dict:
    if v2:
        vocab_size, hidden_size = shapes(OPEN_CLIP_PREFIX + "token_embedding.weight")
        positions = shapes(OPEN_CLIP_PREFIX + "positional_embedding")[0]
        file_layers = shapes.count(OPEN_CLIP_PREFIX + "transformer.resblocks.")
        intermediate_size = shapes(OPEN_CLIP_PREFIX + "transformer.resblocks.0.mlp.c_fc.weight")[0]
        projection = OPEN_CLIP_PREFIX + "text_projection"
        projection_dim = shapes(projection)[1] if shapes.has(projection) else hidden_size
        layers = file_layers - 1  # SD 2.x conditions on the penultimate layer; the model holds the layers used
    else:
        vocab_size, hidden_size = shapes(CLIP_PREFIX + "embeddings.token_embedding.weight")
        positions = shapes(CLIP_PREFIX + "embeddings.position_embedding.weight")[0]
        layers = shapes.count(CLIP_PREFIX + "encoder.layers.")
        intermediate_size = shapes(CLIP_PREFIX + "encoder.layers.0.mlp.fc1.weight")[0]
        projection_dim = hidden_size
    if layers < 1:
        raise CheckpointError("Checkpoint text encoder has too few layers for an SD 1.x / 2.x text encoder.")
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden_size // 64),  # CLIP-L and OpenCLIP-H use 64-channel heads
        "max_position_embeddings": positions,
        "hidden_act": "gelu" if v2 else "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": projection_dim,
        "bos_token_id": 49406,  # the CLIP tokenizer's <|startoftext|>, <|endoftext|>; pad as in transformers' CLIP
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }
