"""SD3 / SD3.5 single files (SAI layout) <-> diffusers / transformers key maps, used in both directions.

A released single file holds the MMDiT under `model.diffusion_model.` (fused q|k|v per attention, `x_block` /
`context_block` per joint block, `x_block.attn2` in MMDiT-X blocks, the last block's context block without its
post-attention parts), the VAE under `first_stage_model.` (SD VAE layout, no quant convs) and, in the `incl_clips`
files, CLIP-L, CLIP-G and T5-XXL under `text_encoders.<name>.transformer.` in transformers naming. One table per
component; configs are read from tensor shapes; every key must be consumed or be a known non-model key (kept as an
extra under its original name, so a file round-trips bit-identically).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from library.checkpoints import flux_keys, sd3_configs, sd_keys
from library.checkpoints.keymap import Entry, KeyMap, Layout, check_keys, format_keys
from library.checkpoints.sd_keys import TEXT_MODEL_PREFIX, Shapes
from library.errors import CheckpointError

TRANSFORMER_PREFIX = "model.diffusion_model."
PREFIXES = {
    "transformer": TRANSFORMER_PREFIX,
    "vae": "first_stage_model.",
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}
COMPONENTS = tuple(PREFIXES)
TEXT_ENCODERS = ("clip_l", "clip_g", "t5xxl")
_WB = ("weight", "bias")
_HINT = (
    "Expected an SD3 / SD3.5 MMDiT in the SAI single-file layout (joint_blocks.*, x_embedder.*, pos_embed ...), "
    "optionally under model.diffusion_model."
)
_FILE_HINT = (
    "Expected an SD3 / SD3.5 single file: model.diffusion_model.* (the MMDiT), optionally first_stage_model.* (the "
    "VAE) and text_encoders.{clip_l,clip_g,t5xxl}.transformer.*, matching the architecture read from its shapes."
)

# Non-model keys that released files may carry, by component, relative to the component's prefix. CLIP-L's
# projection is one of them: SD3 reads CLIP-L's pooled output unprojected, so the model holds the identity instead.
CLIP_EXTRAS = ("logit_scale", TEXT_MODEL_PREFIX + "embeddings.position_ids")
OPTIONAL_EXTRAS = {
    "clip_l": (*CLIP_EXTRAS, "text_projection.weight"),
    "clip_g": CLIP_EXTRAS,
    "t5xxl": ("encoder.embed_tokens.weight",),  # the tied embedding, stored again by some files
}

# (original module, diffusers module(s), layout) of the Linears outside the joint blocks, in the MMDiT's module order.
TOP_LINEARS = (
    ("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",), "same"),
    ("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",), "same"),
    ("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",), "same"),
    ("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",), "same"),
    ("context_embedder", ("context_embedder",), "same"),
)
# final_layer.adaLN_modulation is shift|scale in the original, scale|shift in diffusers' norm_out.
FINAL_LINEARS = (
    ("final_layer.linear", ("proj_out",), "same"),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap_halves"),
)
X_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
CONTEXT_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
DUAL_QKV = ("attn2.to_q", "attn2.to_k", "attn2.to_v")
QK_NORMS = {  # RMSNorm scales (qk_norm="rms_norm"), per joint block
    "x_block.attn.ln_q.weight": "attn.norm_q.weight",
    "x_block.attn.ln_k.weight": "attn.norm_k.weight",
    "context_block.attn.ln_q.weight": "attn.norm_added_q.weight",
    "context_block.attn.ln_k.weight": "attn.norm_added_k.weight",
}
DUAL_QK_NORMS = {"x_block.attn2.ln_q.weight": "attn2.norm_q.weight", "x_block.attn2.ln_k.weight": "attn2.norm_k.weight"}
NON_LINEAR = {"pos_embed": "pos_embed.pos_embed", "x_embedder.proj.weight": "pos_embed.proj.weight",
              "x_embedder.proj.bias": "pos_embed.proj.bias"}  # fmt: skip


@dataclass
class SD3Parts:
    """A single file split by component: the configs and state dicts (diffusers / transformers names) of the
    components it holds, by component name, and its non-model keys under their original names."""

    configs: dict[str, dict]
    states: dict[str, dict[str, Tensor]]
    extras: dict[str, Tensor] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# The MMDiT.


def _block_linears(index: int, last: bool, dual: bool) -> Iterator[tuple[str, tuple[str, ...], Layout]]:
    """The Linears of joint block `index` in the reference's module order (context block, then x block).

    The last block's context block only feeds the joint attention: no output projection, no MLP, and its 2-way
    modulation is shift|scale where diffusers' norm1_context holds scale|shift.
    """
    original, model = f"joint_blocks.{index}.", f"transformer_blocks.{index}."

    def row(name: str, parts: tuple[str, ...], layout: Layout = "same"):
        return original + name, tuple(model + part for part in parts), layout

    yield row("context_block.attn.qkv", CONTEXT_QKV, "fused")
    if last:
        yield row("context_block.adaLN_modulation.1", ("norm1_context.linear",), "swap_halves")
    else:
        yield row("context_block.attn.proj", ("attn.to_add_out",))
        yield row("context_block.mlp.fc1", ("ff_context.net.0.proj",))
        yield row("context_block.mlp.fc2", ("ff_context.net.2",))
        yield row("context_block.adaLN_modulation.1", ("norm1_context.linear",))
    yield row("x_block.attn.qkv", X_QKV, "fused")
    yield row("x_block.attn.proj", ("attn.to_out.0",))
    if dual:
        yield row("x_block.attn2.qkv", DUAL_QKV, "fused")
        yield row("x_block.attn2.proj", ("attn2.to_out.0",))
    yield row("x_block.mlp.fc1", ("ff.net.0.proj",))
    yield row("x_block.mlp.fc2", ("ff.net.2",))
    yield row("x_block.adaLN_modulation.1", ("norm1.linear",))  # 9-way (with attn2's) in MMDiT-X blocks


def _linears(config: Mapping) -> Iterator[tuple[str, tuple[str, ...], Layout]]:
    layers = config["num_layers"]
    dual = set(config.get("dual_attention_layers") or ())
    yield from TOP_LINEARS
    for index in range(layers):
        yield from _block_linears(index, index == layers - 1, index in dual)
    yield from FINAL_LINEARS


def transformer_entries(config: Mapping) -> Iterator[Entry]:
    """All rows of an SD3Transformer2DModel config, SAI names without the `model.diffusion_model.` prefix."""
    for original, model in NON_LINEAR.items():
        yield Entry(original, (model,))
    for module, parts, layout in _linears(config):
        for param in _WB:
            yield Entry(f"{module}.{param}", tuple(f"{part}.{param}" for part in parts), layout)
    if config.get("qk_norm"):
        dual = set(config.get("dual_attention_layers") or ())
        for index in range(config["num_layers"]):
            norms = QK_NORMS | (DUAL_QK_NORMS if index in dual else {})
            for original, model in norms.items():
                yield Entry(f"joint_blocks.{index}.{original}", (f"transformer_blocks.{index}.{model}",))


def transformer_keymap(config: Mapping) -> KeyMap:
    return KeyMap(transformer_entries(config))


def linear_modules(config: Mapping) -> list[tuple[str, tuple[str, ...]]]:
    """(SAI module, the diffusers Linear(s) it is made of) for every Linear of the MMDiT, in the reference's module
    order. Adapter networks name their modules by the SAI path and hook the diffusers Linears (three for q|k|v)."""
    return [(module, parts) for module, parts, _ in _linears(config)]


def half_swapped_modules(config: Mapping) -> frozenset[str]:
    """SAI modules whose output rows diffusers holds in the other half order (shift|scale <-> scale|shift): the
    final modulation and the last block's context modulation. A weight delta must swap its halves to move between
    the layouts."""
    return frozenset(module for module, _, layout in _linears(config) if layout == "swap_halves")


def without_prefix(state_dict: Mapping[str, Tensor], prefix: str = TRANSFORMER_PREFIX) -> dict[str, Tensor]:
    """The keys without `prefix` when every key has it (transformer files are saved either way)."""
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix) :]: value for key, value in state_dict.items()}
    return dict(state_dict)


def _layers_with(state_dict: Mapping[str, Tensor], suffix: str) -> tuple[int, ...]:
    pattern = re.compile(r"joint_blocks\.(\d+)\." + re.escape(suffix) + "$")
    return tuple(sorted({int(m.group(1)) for key in state_dict if (m := pattern.match(key))}))


def infer_transformer_config(state_dict: Mapping[str, Tensor], source: str = "Checkpoint") -> dict:
    """The SD3Transformer2DModel config of an SAI-layout MMDiT (no prefix), read from tensor shapes.

    Files without qk norms do not show the head width; the MMDiT's rule (one head per block, 64 wide in the
    releases) gives it. `sample_size` is not stored: the releases' 128, capped at the position-embedding grid.
    """
    if not any(key.startswith("joint_blocks.") for key in state_dict):
        raise CheckpointError(f"{source}: no joint_blocks.* tensors. {_HINT}")
    shapes = Shapes(state_dict, source)
    inner_dim, in_channels, patch_size, _ = shapes("x_embedder.proj.weight")
    layers = shapes.count("joint_blocks.")
    qk_norm = shapes.has("joint_blocks.0.x_block.attn.ln_q.weight")
    head_dim = shapes("joint_blocks.0.x_block.attn.ln_q.weight")[0] if qk_norm else inner_dim // layers
    positions = shapes("pos_embed")[1]
    max_size = round(positions**0.5)
    if inner_dim % head_dim or max_size * max_size != positions:
        raise CheckpointError(
            f"{source}: a {inner_dim}-wide MMDiT with {layers} blocks and {positions} positions fits no SD3 layout "
            "(heads must divide the width, positions must form a square grid)"
        )
    return {
        "sample_size": min(sd3_configs.SAMPLE_SIZE, max_size),
        "patch_size": patch_size,
        "in_channels": in_channels,
        "num_layers": layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": inner_dim // head_dim,
        "joint_attention_dim": shapes("context_embedder.weight")[1],
        "caption_projection_dim": shapes("context_embedder.weight")[0],
        "pooled_projection_dim": shapes("y_embedder.mlp.0.weight")[1],
        "out_channels": shapes("final_layer.linear.weight")[0] // (patch_size * patch_size),
        "pos_embed_max_size": max_size,
        "dual_attention_layers": _layers_with(state_dict, "x_block.attn2.qkv.weight"),
        "qk_norm": "rms_norm" if qk_norm else None,
    }


def variant(config: Mapping) -> str:
    """The release whose architecture the config follows: MMDiT-X blocks (sd3.5-medium), qk norms (sd3.5-large),
    neither (sd3-medium)."""
    if config.get("dual_attention_layers"):
        return "sd3.5-medium"
    return "sd3.5-large" if config.get("qk_norm") else "sd3-medium"


def split_transformer(state_dict: Mapping[str, Tensor], source: str) -> tuple[dict, dict[str, Tensor]]:
    """An SAI-layout MMDiT (with or without prefix) -> (SD3Transformer2DModel config, its state dict)."""
    state_dict = without_prefix(state_dict)
    config = infer_transformer_config(state_dict, source)
    keymap = transformer_keymap(config)
    check_keys(state_dict, keymap.original_names, f"{source}: transformer keys do not match the SD3 layout", _HINT)
    return config, _to_model(keymap, state_dict, source)


def join_transformer(model_state: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """The exact inverse of `split_transformer`: an SD3Transformer2DModel state dict -> SAI names (no prefix)."""
    return _join(transformer_keymap(config), model_state, "transformer")


def _to_model(keymap: KeyMap, state_dict: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    try:
        return keymap.to_model(state_dict)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from err


def _join(keymap: KeyMap, model_state: Mapping[str, Tensor], component: str) -> dict[str, Tensor]:
    check_keys(
        model_state,
        keymap.model_names,
        f"Cannot write the {component} in the SD3 single-file layout",
        f"Expected the state dict of the {component} model built from the given config.",
    )
    return keymap.to_original(model_state)


# ---------------------------------------------------------------------------------------------------------------
# The VAE: the LDM VAE table of sd_keys; the quant convs only where the config has them (the SD3 VAE has none).

_VAE_HINT = "Expected the SD3 VAE in the original layout (encoder.*, decoder.*, optionally under first_stage_model.)."


def vae_keymap(config: Mapping) -> KeyMap:
    skipped = tuple(
        name for name in ("quant_conv", "post_quant_conv") if not config.get(f"use_{name}", True)
    )  # AutoencoderKL builds both unless told not to
    return KeyMap(e for e in sd_keys.vae_entries(config) if not (skipped and e.original.startswith(skipped)))


def infer_vae_config(state_dict: Mapping[str, Tensor], source: str) -> dict:
    """The AutoencoderKL config of an original-layout VAE (no prefix); latent scale and shift are SD3's."""
    shapes = Shapes(state_dict, source)
    levels = shapes.count("encoder.down.")
    if levels == 0:
        raise CheckpointError(f"{source}: no encoder.down.* tensors. {_VAE_HINT}")
    return dict(
        sd3_configs.vae_config(),
        in_channels=shapes("encoder.conv_in.weight")[1],
        out_channels=shapes("decoder.conv_out.weight")[0],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(shapes(f"encoder.down.{level}.block.0.conv2.weight")[0] for level in range(levels)),
        layers_per_block=shapes.count("encoder.down.0.block."),
        latent_channels=shapes("encoder.conv_out.weight")[0] // 2,  # the encoder outputs mean and log-variance
        use_quant_conv=shapes.has("quant_conv.weight"),
        use_post_quant_conv=shapes.has("post_quant_conv.weight"),
    )


def split_vae(state_dict: Mapping[str, Tensor], source: str) -> tuple[dict, dict[str, Tensor]]:
    """An original-layout VAE (with or without `first_stage_model.`) -> (AutoencoderKL config, its state dict)."""
    state_dict = without_prefix(state_dict, PREFIXES["vae"])
    if any(key.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for key in state_dict):
        raise CheckpointError(f"{source} holds diffusers VAE weights; give the diffusers model folder instead")
    config = infer_vae_config(state_dict, source)
    keymap = vae_keymap(config)
    check_keys(state_dict, keymap.original_names, f"{source}: VAE keys do not match the SD VAE layout", _VAE_HINT)
    return config, keymap.to_model(state_dict)


# ---------------------------------------------------------------------------------------------------------------
# Text encoders: transformers names already; the tables check them and place them under the file's prefixes.


def clip_keymap(config: Mapping, component: str) -> KeyMap:
    """CLIP-L (its projection is not stored: identity) or CLIP-G (with its projection), canonical `text_model.`."""
    entries = list(sd_keys.clip_entries(config["num_hidden_layers"], TEXT_MODEL_PREFIX))
    if component == "clip_g":
        entries.append(Entry("text_projection.weight", ("text_projection.weight",)))
    return KeyMap(entries)


def t5_keymap(config: Mapping) -> KeyMap:
    """T5 encoder names; the tied `encoder.embed_tokens.weight` is stored once, as `shared.weight`."""
    names = sorted(flux_keys.t5_key_names(config["num_layers"]) - {"encoder.embed_tokens.weight"})
    return KeyMap(Entry(name, (name,)) for name in names)


def infer_clip_config(state: Mapping[str, Tensor], component: str, source: str) -> dict:
    """CLIPTextConfig kwargs of CLIP-L (quick-GELU, identity projection) or CLIP-G (GELU) from canonical names."""
    shapes = Shapes(state, source)
    vocab_size, hidden_size = shapes(TEXT_MODEL_PREFIX + "embeddings.token_embedding.weight")
    if component == "clip_g":
        base, projection_dim = sd3_configs.clip_g_config(), shapes("text_projection.weight")[0]
    else:
        base, projection_dim = sd3_configs.clip_l_config(), hidden_size
    return dict(
        base,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=shapes(TEXT_MODEL_PREFIX + "encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=shapes.count(TEXT_MODEL_PREFIX + "encoder.layers."),
        num_attention_heads=max(1, hidden_size // 64),  # CLIP-L and bigG use 64-wide heads
        max_position_embeddings=shapes(TEXT_MODEL_PREFIX + "embeddings.position_embedding.weight")[0],
        projection_dim=projection_dim,
    )


_RELEASED_WIDTHS = {"clip_l": 768, "clip_g": 1280}
_WHAT = {  # component_of -> words
    "vae": "a VAE", "clip": "a CLIP text encoder", "t5xxl": "a T5 text encoder", "sd1": "an SD 1.x checkpoint",
    "sd2": "an SD 2.x checkpoint", "sdxl": "an SDXL checkpoint", "flux": "a FLUX.1 transformer",
    "lumina": "a Lumina checkpoint", "diffusers": "an SD3 transformer in diffusers naming (give the diffusers folder)",
}  # fmt: skip
_NAMES = {"transformer": "an SD3 MMDiT", "vae": "a VAE", "clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5-XXL"}


def canonical_clip_names(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CLIP names of any transformers version or file -> canonical `text_model.*` names; the projection, which sits
    beside the text model, keeps its name (sd_keys.text_encoder_from_model_keys covers models without one)."""
    projection = {key: value for key, value in state_dict.items() if key.startswith("text_projection.")}
    rest = {key: value for key, value in state_dict.items() if key not in projection}
    return sd_keys.text_encoder_from_model_keys(rest) | projection


def split_clip(state_dict: Mapping[str, Tensor], component: str, source: str) -> tuple[dict, dict[str, Tensor]]:
    """A CLIP text encoder in transformers naming (with or without `text_model.`) -> (CLIPTextConfig kwargs,
    CLIPTextModelWithProjection state dict). The file's optional extras are left out; CLIP-L gets the identity
    projection SD3 applies."""
    state = {key: value for key, value in state_dict.items() if key not in OPTIONAL_EXTRAS[component]}
    state = canonical_clip_names(state)  # files without the `text_model.` level get it
    config = infer_clip_config(state, component, source)
    other = "clip_g" if component == "clip_l" else "clip_l"
    if config["hidden_size"] == _RELEASED_WIDTHS[other]:
        width = config["hidden_size"]
        raise CheckpointError(f"{source} is {width} wide: it holds {_NAMES[other]}, not {_NAMES[component]}")
    keymap = clip_keymap(config, component)
    check_keys(state, keymap.original_names, f"{source}: {_NAMES[component]} keys do not match",
               "Expected a CLIP text model in transformers naming (text_model.*, text_projection.weight).")  # fmt: skip
    model_state = keymap.to_model(state)
    if component == "clip_l":
        model_state["text_projection.weight"] = _identity(config["hidden_size"], state)
    return config, model_state


def _identity(size: int, like: Mapping[str, Tensor]) -> Tensor:
    reference = next(iter(like.values()))
    dtype = reference.dtype if reference.is_floating_point() else torch.float32
    return torch.eye(size, dtype=dtype, device=reference.device)


def split_t5xxl(state_dict: Mapping[str, Tensor], source: str) -> tuple[dict, dict[str, Tensor]]:
    """A T5 encoder in transformers naming (fp16 / bf16 / plain fp8) -> (T5Config kwargs, T5EncoderModel state dict
    with the tied embedding under both names). Scaled fp8 files are refused (see flux_keys.split_t5xxl)."""
    return flux_keys.split_t5xxl(state_dict, source)


# ---------------------------------------------------------------------------------------------------------------
# Whole single files.


def _component_keymap(component: str, config: Mapping) -> KeyMap:
    if component == "transformer":
        return transformer_keymap(config)
    if component == "vae":
        return vae_keymap(config)
    if component == "t5xxl":
        return t5_keymap(config)
    return clip_keymap(config, component)


def _split_component(component: str, state: Mapping[str, Tensor], source: str) -> tuple[dict, dict[str, Tensor]]:
    if component == "transformer":
        return split_transformer(state, source)
    if component == "vae":
        return split_vae(state, source)
    if component == "t5xxl":
        return split_t5xxl(state, source)
    return split_clip(state, component, source)


def split_checkpoint(state_dict: Mapping[str, Tensor], source: str) -> SD3Parts:
    """An SD3 single file -> the configs and model state dicts of the components it holds, and its extras.

    The MMDiT is required; the VAE and the text encoders are split when the file has them. A file holding only the
    MMDiT may leave out the `model.diffusion_model.` prefix. Every key must be consumed or be a known extra.
    """
    found = component_of(state_dict)
    if found != "transformer":
        raise CheckpointError(
            f"{source} holds {_WHAT.get(found, 'no known model')}, not an SD3 checkpoint. {_FILE_HINT}"
        )
    if not any(key.startswith(TRANSFORMER_PREFIX) for key in state_dict):
        state_dict = {TRANSFORMER_PREFIX + key: value for key, value in state_dict.items()}
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        component = next((name for name, prefix in PREFIXES.items() if key.startswith(prefix)), None)
        if component is not None:
            grouped.setdefault(component, {})[key[len(PREFIXES[component]) :]] = value
    extras = {PREFIXES[name] + key: grouped[name].pop(key) for name, keys in OPTIONAL_EXTRAS.items()
              if name in grouped for key in keys if key in grouped[name]}  # fmt: skip
    parts = SD3Parts({}, {}, extras)
    expected = set(extras)
    for component in COMPONENTS:
        if component not in grouped:
            continue
        state = grouped[component]
        # Each component's config is read from its own tensors; the joint check below names every stray key.
        config = _infer_config(component, state, source)
        keymap = _component_keymap(component, config)
        expected |= {PREFIXES[component] + name for name in keymap.original_names}
        parts.configs[component] = config
    check_keys(state_dict, expected, f"{source}: keys do not match the SD3 single-file layout", _FILE_HINT)
    for component in parts.configs:
        parts.states[component] = _split_component(component, grouped[component], source)[1]
    return parts


def _infer_config(component: str, state: Mapping[str, Tensor], source: str) -> dict:
    if component == "transformer":
        return infer_transformer_config(state, source)
    if component == "vae":
        return infer_vae_config(state, source)
    if component == "t5xxl":
        if "shared.weight" not in state:  # the table stores the tied embedding under this name
            raise CheckpointError(f"{source}: the T5-XXL part has no shared.weight; expected shared.*, encoder.block.*")
        return flux_keys.infer_t5_config(state, source)
    return infer_clip_config(canonical_clip_names(state), component, source)


def _model_state_for_join(component: str, model_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A model's state dict in the names the component's table reads: canonical CLIP names without CLIP-L's identity
    projection, T5 without the second name of its tied embedding."""
    if component in ("clip_l", "clip_g"):
        state = canonical_clip_names(model_state)
        if component == "clip_l":
            state.pop("text_projection.weight", None)
        return state
    if component == "t5xxl":
        return {key: value for key, value in model_state.items() if key != "encoder.embed_tokens.weight"}
    return dict(model_state)


def join_checkpoint(parts: SD3Parts) -> dict[str, Tensor]:
    """The exact inverse of `split_checkpoint`: the components in `parts.states` (the transformer required) and the
    extras of those components -> one SAI-layout single file. Model states may come straight from `state_dict()`."""
    if "transformer" not in parts.states:
        raise CheckpointError("Cannot write an SD3 single file without the transformer")
    checkpoint: dict[str, Tensor] = {}
    for component in COMPONENTS:
        if component not in parts.states:
            continue
        keymap = _component_keymap(component, parts.configs[component])
        original = _join(keymap, _model_state_for_join(component, parts.states[component]), component)
        checkpoint.update({PREFIXES[component] + key: value for key, value in original.items()})
    allowed = {PREFIXES[name] + key for name, keys in OPTIONAL_EXTRAS.items() for key in keys}
    unknown = (parts.extras.keys() - allowed) | (parts.extras.keys() & checkpoint.keys())
    if unknown:
        raise CheckpointError(
            f"Cannot write these extras into an SD3 single file: {format_keys(unknown)}. Extras must be non-model "
            "keys of the SAI layout."
        )
    # Extras of a component that is not written would make readers see a partial component.
    written = tuple(PREFIXES[name] for name in parts.states)
    checkpoint.update({key: value for key, value in parts.extras.items() if key.startswith(written)})
    return checkpoint


# ---------------------------------------------------------------------------------------------------------------
# What a file holds.


def component_of(keys: Iterable[str]) -> str:
    """What a single file holds: `transformer` (an SD3 MMDiT, maybe with VAE and text encoders: see `contents`),
    `vae`, `clip` (CLIP-L or CLIP-G: told apart by width), `t5xxl`, `diffusers` (a diffusers-named SD3 model
    file), another family's id (`sd1`, `sd2`, `sdxl`, `flux`, `lumina`), or `unknown`."""
    keys = set(keys)

    def has(*prefixes: str) -> bool:
        return any(key.startswith(prefixes) for key in keys)

    family = sd_keys.detect_model_type(keys)
    if family == "sd3":
        return "transformer"
    if family != "unknown":
        return family
    if has("transformer_blocks.") and "pos_embed.pos_embed" in keys:
        return "diffusers"
    if has("encoder.down.", PREFIXES["vae"] + "encoder.down."):
        return "vae"
    if has("encoder.block.", "shared."):
        return "t5xxl"
    if has(TEXT_MODEL_PREFIX, "encoder.layers.", "embeddings."):
        return "clip"
    return "unknown"


def contents(keys: Iterable[str]) -> tuple[str, ...]:
    """The components an SD3 single file holds, in COMPONENTS order."""
    keys = list(keys)
    if not any(key.startswith(TRANSFORMER_PREFIX) for key in keys):
        return ("transformer",) if component_of(keys) == "transformer" else ()
    return tuple(name for name in COMPONENTS if any(key.startswith(PREFIXES[name]) for key in keys))


def detect(state_dict: Iterable[str]) -> bool:
    """Whether a state dict (or its keys) is an SD3 / SD3.5 checkpoint: an MMDiT with joint blocks."""
    return component_of(state_dict) == "transformer"
