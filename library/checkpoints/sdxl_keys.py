"""SDXL original single-file (SGM layout) <-> diffusers / transformers key map, used in both directions.

An SGM file holds the UNet (`model.diffusion_model.*`), the VAE (`first_stage_model.*`), CLIP ViT-L
(`conditioner.embedders.0.transformer.text_model.*`, transformers names) and OpenCLIP ViT-bigG
(`conditioner.embedders.1.model.*`: fused q|k|v, `text_projection` stored transposed). The UNet, VAE and text tables
are sd_keys' (the same LDM block layout), placed under SDXL's prefixes; every key must be consumed or be a known
non-model key, kept in `SDXLComponents.extras` so a save writes it back unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import Tensor

from library.checkpoints import sd_keys
from library.checkpoints.keymap import Entry, KeyMap, check_keys, format_keys
from library.errors import CheckpointError

UNET_PREFIX = sd_keys.UNET_PREFIX
VAE_PREFIX = sd_keys.VAE_PREFIX
TE1_PREFIX = "conditioner.embedders.0.transformer.text_model."  # CLIP ViT-L/14
TE2_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP ViT-bigG/14
REFINER_TE_PREFIX = "conditioner.embedders.0.model."  # the refiner has only bigG, as embedder 0
VAE_SCALING_FACTOR = 0.13025  # the SDXL VAE's latent scale; not stored in the file
TIME_IDS = 6  # original size (h, w), crop top-left (top, left), target size (h, w)
SDXL_BLOCK_COUNT = 23  # --block_lr values of the SDXL base UNet (see block_lr_groups)

_OPTIONAL_EXTRAS = sd_keys.SCHEDULE_BUFFERS | {
    TE1_PREFIX + "embeddings.position_ids",  # the constant arange, a buffer in old transformers versions
    TE2_PREFIX + "logit_scale",  # CLIP's contrastive temperature; no text model uses it
}
_EXTRA_PREFIXES = ("model_ema.",)
_FILE_HINT = (
    "Expected an SDXL checkpoint in the original single-file layout (model.diffusion_model.*, first_stage_model.*, "
    f"{TE1_PREFIX}*, {TE2_PREFIX}*) matching the inferred architecture."
)


@dataclass
class SDXLArchitecture:
    """Diffusers / transformers configs of the four models of an SDXL checkpoint."""

    unet_config: dict  # kwargs for UNet2DConditionModel(**cfg)
    vae_config: dict  # kwargs for AutoencoderKL(**cfg)
    text_config1: dict  # kwargs for CLIPTextConfig: CLIP ViT-L, loaded as CLIPTextModel
    text_config2: dict  # kwargs for CLIPTextConfig: OpenCLIP ViT-bigG, loaded as CLIPTextModelWithProjection


@dataclass
class SDXLComponents:
    """A checkpoint split into model state dicts (diffusers / transformers names) and non-model extras."""

    unet: dict[str, Tensor]  # diffusers UNet2DConditionModel names
    vae: dict[str, Tensor]  # diffusers AutoencoderKL names
    text_encoder1: dict[str, Tensor]  # CLIPTextModel names with the "text_model." prefix (see sd_keys)
    text_encoder2: dict[str, Tensor]  # CLIPTextModelWithProjection names
    extras: dict[str, Tensor]  # original-layout keys that belong to no model, by their original name


def _component_maps(arch: SDXLArchitecture) -> dict[str, KeyMap]:
    """`SDXLComponents` field name -> key map with full original names."""
    unet = KeyMap(Entry(UNET_PREFIX + e.original, e.model, e.layout) for e in sd_keys.unet_entries(arch.unet_config))
    vae = KeyMap(Entry(VAE_PREFIX + e.original, e.model, e.layout) for e in sd_keys.vae_entries(arch.vae_config))
    text1 = KeyMap(sd_keys.clip_entries(arch.text_config1["num_hidden_layers"], TE1_PREFIX))
    projection = Entry(TE2_PREFIX + "text_projection", ("text_projection.weight",), "transposed")
    text2 = KeyMap([*sd_keys.open_clip_entries(arch.text_config2["num_hidden_layers"], TE2_PREFIX), projection])
    return {"unet": unet, "vae": vae, "text_encoder1": text1, "text_encoder2": text2}


def unet_key_map(unet_config: Mapping) -> KeyMap:
    """The UNet's rows alone, with SGM names relative to the UNet (no `model.diffusion_model.` prefix)."""
    return KeyMap(sd_keys.unet_entries(unet_config))


def sgm_key_names(arch: SDXLArchitecture) -> set[str]:
    """The original names every checkpoint of this architecture must hold (optional extras excluded)."""
    return set().union(*(keymap.original_names for keymap in _component_maps(arch).values()))


def _is_optional_extra(key: str) -> bool:
    return key in _OPTIONAL_EXTRAS or key.startswith(_EXTRA_PREFIXES)


def split_sgm_checkpoint(state_dict: Mapping[str, Tensor], arch: SDXLArchitecture) -> SDXLComponents:
    """Split an SGM-layout checkpoint into model state dicts and extras; every key must be accounted for."""
    extras = {key: tensor for key, tensor in state_dict.items() if _is_optional_extra(key)}
    check_keys(
        (key for key in state_dict if key not in extras),
        sgm_key_names(arch),
        "Checkpoint keys do not match the SDXL checkpoint layout",
        _FILE_HINT,
    )
    models = {name: keymap.to_model(state_dict) for name, keymap in _component_maps(arch).items()}
    return SDXLComponents(**models, extras=extras)


def join_sgm_checkpoint(components: SDXLComponents, arch: SDXLArchitecture) -> dict[str, Tensor]:
    """The exact inverse of `split_sgm_checkpoint`: model state dicts and extras -> SGM-layout checkpoint."""
    checkpoint: dict[str, Tensor] = {}
    for name, keymap in _component_maps(arch).items():
        check_keys(
            getattr(components, name),
            keymap.model_names,
            f"Cannot write the {name} in the SDXL single-file layout",
            f"Expected the state dict of a model built from the architecture's {name} config"
            + (" with canonical names (see sd_keys.text_encoder_from_model_keys)." if name == "text_encoder1" else "."),
        )
        checkpoint.update(keymap.to_original(getattr(components, name)))
    unknown = {key for key in components.extras if not _is_optional_extra(key)} | (
        components.extras.keys() & checkpoint
    )
    if unknown:
        raise CheckpointError(
            f"Cannot write these extras into an SDXL checkpoint: {format_keys(unknown)}. Extras must be non-model "
            "keys of the original layout."
        )
    checkpoint.update(components.extras)
    return checkpoint


# ---------------------------------------------------------------------------------------------------------------
# Module names: the SGM names LoRA files use for the UNet (lora_unet_input_blocks_4_1_...).


def unet_module_names(unet_config: Mapping) -> dict[str, str]:
    """diffusers module path -> SGM module path, for every UNet module that holds weights."""
    names: dict[str, str] = {}
    for entry in unet_key_map(unet_config).entries:
        original = entry.original.rsplit(".", 1)[0]
        model = entry.model[0].rsplit(".", 1)[0]
        names[model] = original
    return names


# ---------------------------------------------------------------------------------------------------------------
# Architecture inference.


_OTHER_FAMILIES = {
    "sd1": ("an SD 1.x checkpoint", "train_network.py / fine_tune.py"),
    "sd2": ("an SD 2.x checkpoint", "train_network.py / fine_tune.py --v2"),
    "sd3": ("an SD3 checkpoint", "sd3_train_network.py / sd3_train.py"),
    "flux": ("a FLUX.1 checkpoint", "the flux_* scripts"),
    "lumina": ("a Lumina checkpoint", "the lumina_* scripts"),
}


def infer_architecture(state_dict: Mapping[str, Tensor], source: str = "Checkpoint") -> SDXLArchitecture:
    """Read the diffusers / transformers configs of an SDXL SGM-layout checkpoint from its tensor shapes."""
    keys = state_dict.keys()
    if any(key.startswith(REFINER_TE_PREFIX) for key in keys) and not any(key.startswith(TE2_PREFIX) for key in keys):
        raise CheckpointError(
            f"{source} is an SDXL refiner checkpoint (OpenCLIP bigG only); only SDXL base models are supported."
        )
    model_type = sd_keys.detect_model_type(keys)
    if model_type != "sdxl":
        what, scripts = _OTHER_FAMILIES.get(model_type, ("not a checkpoint of a known family", None))
        hint = f"; train it with {scripts}" if scripts else " in the original single-file layout"
        raise CheckpointError(f"{source} is {what}, not SDXL{hint}.")
    shapes = sd_keys.Shapes(state_dict, source)
    text_config2 = _open_clip_config(shapes)
    return SDXLArchitecture(
        unet_config=_unet_config(shapes, text_config2["projection_dim"]),
        vae_config=dict(sd_keys.infer_vae_config(shapes), scaling_factor=VAE_SCALING_FACTOR, force_upcast=True),
        text_config1=_clip_config(shapes),
        text_config2=text_config2,
    )


def _unet_config(shapes: sd_keys.Shapes, pooled_dim: int) -> dict:
    config = sd_keys.infer_unet_config(shapes, v2=True)  # SDXL, like SD 2.x: 64-channel heads, linear projections
    addition_input = shapes(UNET_PREFIX + "label_emb.0.0.weight")[1]  # pooled text + 6 sinusoidal size embeddings
    time_dim, remainder = divmod(addition_input - pooled_dim, TIME_IDS)
    if remainder or time_dim < 1:
        raise CheckpointError(
            f"{shapes.source}: the UNet's label_emb takes {addition_input} inputs, which does not fit the text "
            f"encoder's {pooled_dim}-wide pooled output plus {TIME_IDS} size embeddings."
        )
    return config | {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": addition_input,
    }


def _clip_config(shapes: sd_keys.Shapes) -> dict:
    vocab_size, hidden_size = shapes(TE1_PREFIX + "embeddings.token_embedding.weight")
    return _text_config(
        vocab_size,
        hidden_size,
        intermediate_size=shapes(TE1_PREFIX + "encoder.layers.0.mlp.fc1.weight")[0],
        layers=shapes.count(TE1_PREFIX + "encoder.layers."),
        positions=shapes(TE1_PREFIX + "embeddings.position_embedding.weight")[0],
        hidden_act="quick_gelu",
        projection_dim=hidden_size,
    )


def _open_clip_config(shapes: sd_keys.Shapes) -> dict:
    vocab_size, hidden_size = shapes(TE2_PREFIX + "token_embedding.weight")
    return _text_config(
        vocab_size,
        hidden_size,
        intermediate_size=shapes(TE2_PREFIX + "transformer.resblocks.0.mlp.c_fc.weight")[0],
        layers=shapes.count(TE2_PREFIX + "transformer.resblocks."),
        positions=shapes(TE2_PREFIX + "positional_embedding")[0],
        hidden_act="gelu",
        projection_dim=shapes(TE2_PREFIX + "text_projection")[1],
    )


def _text_config(
    vocab_size: int, hidden_size: int, intermediate_size: int, layers: int, positions: int, hidden_act: str,
    projection_dim: int,
) -> dict:  # fmt: skip
    if layers < 2:
        raise CheckpointError("Checkpoint text encoder has fewer than 2 layers; SDXL reads the penultimate one.")
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden_size // 64),  # CLIP-L and OpenCLIP-bigG use 64-channel heads
        "max_position_embeddings": positions,
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
        "projection_dim": projection_dim,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }


def block_lr_groups(unet_config: Mapping, names: Iterable[str]) -> dict[str, int]:
    """diffusers UNet parameter name -> `--block_lr` index, in kohya's order (23 indices for SDXL).

    0: time and size embeddings; then one index per input block (input_blocks.0 is conv_in), one per middle-block
    part (resnet, transformer, resnet), one per output block, and the last for the output layers (out.*).
    """
    original_of = {name: entry.original for entry in unet_key_map(unet_config).entries for name in entry.model}
    inputs = len(unet_config["block_out_channels"]) * (unet_config["layers_per_block"] + 1)
    offsets = {"input_blocks": 1, "middle_block": 1 + inputs, "output_blocks": 4 + inputs}
    groups = {}
    for name in names:
        original = original_of[name]
        if match := re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.", original):
            groups[name] = offsets[match.group(1)] + int(match.group(2))
        elif original.startswith("out."):
            groups[name] = block_count(unet_config) - 1
        else:  # time_embed, label_emb
            groups[name] = 0
    return groups


def block_count(unet_config: Mapping) -> int:
    """How many `--block_lr` values the UNet takes (23 for SDXL)."""
    inputs = len(unet_config["block_out_channels"]) * (unet_config["layers_per_block"] + 1)
    return 2 * inputs + 5
