"""FLUX.1 single files (BFL layout) <-> diffusers / transformers key maps, used in both directions.

The transformer table maps `flux1-dev.safetensors` names to FluxTransformer2DModel names: fused q|k|v of the double
blocks and q|k|v|mlp of the single blocks' `linear1` are split, the final adaLN modulation's shift|scale halves are
swapped to diffusers' scale|shift. The AE (`ae.safetensors`) is the SD VAE layout without quant convs; CLIP-L and
T5-XXL single files already use transformers names. Configs are read from tensor shapes; every key must be consumed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from torch import Tensor

from library.checkpoints import flux_configs, sd_keys
from library.checkpoints.keymap import Entry, KeyMap, check_keys
from library.checkpoints.sd_keys import Shapes
from library.errors import CheckpointError

COMFY_PREFIX = "model.diffusion_model."  # ComfyUI saves the transformer under this prefix
_WB = ("weight", "bias")
_HINT = "Expected a FLUX.1 transformer in the BFL single-file layout (double_blocks.*, single_blocks.*, img_in ...)."

# Per double block: BFL module -> diffusers module (weight and bias).
DOUBLE_MODULES = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
DOUBLE_FUSED = {  # fused Linear -> the diffusers Linears it holds, in order
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
DOUBLE_NORMS = {  # RMSNorm scales
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
SINGLE_MODULES = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
SINGLE_FUSED_PARTS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")  # linear1 = q|k|v|mlp
SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
TOP_MODULES = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
GUIDANCE_MODULES = {
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
}
FINAL_MODULATION = "final_layer.adaLN_modulation.1"  # shift|scale in BFL, scale|shift in diffusers' norm_out.linear


def _linear_entries(modules: Mapping[str, str], original: str = "", model: str = "") -> Iterator[Entry]:
    for bfl, diffusers in modules.items():
        for param in _WB:
            yield Entry(f"{original}{bfl}.{param}", (f"{model}{diffusers}.{param}",))


def _fused_entry(bfl: str, parts: tuple[str, ...], param: str, sizes: tuple[int, ...] | None = None) -> Entry:
    return Entry(f"{bfl}.{param}", tuple(f"{part}.{param}" for part in parts), "fused", sizes)


def double_block_entries(index: int) -> Iterator[Entry]:
    """The rows of double block `index` (diffusers: transformer_blocks.index)."""
    original, model = f"double_blocks.{index}.", f"transformer_blocks.{index}."
    yield from _linear_entries(DOUBLE_MODULES, original, model)
    for bfl, parts in DOUBLE_FUSED.items():
        for param in _WB:
            yield _fused_entry(original + bfl, tuple(model + part for part in parts), param)
    for bfl, diffusers in DOUBLE_NORMS.items():
        yield Entry(original + bfl, (model + diffusers,))


def single_block_entries(index: int, inner_dim: int, mlp_dim: int) -> Iterator[Entry]:
    """The rows of single block `index` (diffusers: single_transformer_blocks.index)."""
    original, model = f"single_blocks.{index}.", f"single_transformer_blocks.{index}."
    yield from _linear_entries(SINGLE_MODULES, original, model)
    sizes = (inner_dim, inner_dim, inner_dim, mlp_dim)
    for param in _WB:
        yield _fused_entry(original + "linear1", tuple(model + part for part in SINGLE_FUSED_PARTS), param, sizes)
    for bfl, diffusers in SINGLE_NORMS.items():
        yield Entry(original + bfl, (model + diffusers,))


def transformer_entries(config: Mapping) -> Iterator[Entry]:
    """All rows of a FluxTransformer2DModel config, BFL names first."""
    inner_dim = config["num_attention_heads"] * config["attention_head_dim"]
    yield from _linear_entries(TOP_MODULES)
    if config["guidance_embeds"]:
        yield from _linear_entries(GUIDANCE_MODULES)
    for param in _WB:
        yield Entry(f"{FINAL_MODULATION}.{param}", (f"norm_out.linear.{param}",), "swap_halves")
    for index in range(config["num_layers"]):
        yield from double_block_entries(index)
    for index in range(config["num_single_layers"]):
        yield from single_block_entries(index, inner_dim, 4 * inner_dim)  # diffusers fixes mlp_ratio at 4


def transformer_keymap(config: Mapping) -> KeyMap:
    return KeyMap(transformer_entries(config))


def without_comfy_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The transformer keys without ComfyUI's `model.diffusion_model.` prefix (files are saved either way)."""
    if state_dict and all(key.startswith(COMFY_PREFIX) for key in state_dict):
        return {key[len(COMFY_PREFIX) :]: value for key, value in state_dict.items()}
    return dict(state_dict)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary dims per position axis (index, row, column): the release's 16/56/56 of 128, scaled to `head_dim`."""
    first = head_dim // 8
    rest = (head_dim - first) // 2
    if head_dim % 32 or first + 2 * rest != head_dim:
        raise CheckpointError(f"FLUX attention head width {head_dim} is not a multiple of 32; no known model has it")
    return (first, rest, rest)


def infer_transformer_config(state_dict: Mapping[str, Tensor], source: str = "Checkpoint") -> dict:
    """The FluxTransformer2DModel config of a BFL-layout transformer, read from tensor shapes."""
    if not any(key.startswith("double_blocks.") for key in state_dict):
        raise CheckpointError(f"{source}: no double_blocks.* tensors. {_HINT}")
    shapes = Shapes(state_dict, source)
    inner_dim, in_channels = shapes("img_in.weight")
    head_dim = shapes("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": shapes("final_layer.linear.weight")[0],
        "num_layers": shapes.count("double_blocks."),
        "num_single_layers": shapes.count("single_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner_dim // head_dim,
        "joint_attention_dim": shapes("txt_in.weight")[1],
        "pooled_projection_dim": shapes("vector_in.in_layer.weight")[1],
        "guidance_embeds": shapes.has("guidance_in.in_layer.weight"),
        "axes_dims_rope": rope_axes(head_dim),
    }


def block_counts(keys: Iterable[str]) -> tuple[int, int]:
    """(double blocks, single blocks) of a BFL transformer from its tensor names alone."""
    counts = {"double_blocks": 0, "single_blocks": 0}
    for key in keys:
        parts = key.removeprefix(COMFY_PREFIX).split(".")
        if parts[0] in counts and len(parts) > 1 and parts[1].isdigit():
            counts[parts[0]] = max(counts[parts[0]], int(parts[1]) + 1)
    return counts["double_blocks"], counts["single_blocks"]


def variant(config: Mapping) -> str:
    """`dev` (guidance-distilled: has the guidance embedder) or `schnell`."""
    return "dev" if config["guidance_embeds"] else "schnell"


def split_transformer(state_dict: Mapping[str, Tensor], source: str) -> tuple[dict, dict[str, Tensor]]:
    """A BFL-layout transformer -> (FluxTransformer2DModel config, its state dict). Every key must be consumed."""
    state_dict = without_comfy_prefix(state_dict)
    config = infer_transformer_config(state_dict, source)
    keymap = transformer_keymap(config)
    check_keys(state_dict, keymap.original_names, f"{source}: transformer keys do not match the FLUX.1 layout", _HINT)
    try:
        return config, keymap.to_model(state_dict)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from err


def join_transformer(model_state: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """The exact inverse of `split_transformer`: a FluxTransformer2DModel state dict -> BFL layout."""
    keymap = transformer_keymap(config)
    check_keys(
        model_state,
        keymap.model_names,
        "Cannot write the transformer in the BFL layout",
        "Expected the state dict of a FluxTransformer2DModel built from the given config.",
    )
    return keymap.to_original(model_state)


# ---------------------------------------------------------------------------------------------------------------
# The autoencoder: the LDM VAE table of sd_keys, without the quant convs FLUX's AE does not have.

_AE_HINT = "Expected the FLUX.1 autoencoder (ae.safetensors: encoder.*, decoder.* in the original VAE layout)."


def ae_keymap(config: Mapping) -> KeyMap:
    quant_convs = ("quant_conv", "post_quant_conv")
    return KeyMap(entry for entry in sd_keys.vae_entries(config) if not entry.original.startswith(quant_convs))


def infer_ae_config(state_dict: Mapping[str, Tensor], source: str) -> dict:
    """The AutoencoderKL config of an AE file; the latent scale and shift are the FLUX AE's (not in the file)."""
    shapes = Shapes(state_dict, source)
    levels = shapes.count("encoder.down.")
    if levels == 0:
        raise CheckpointError(f"{source}: no encoder.down.* tensors. {_AE_HINT}")
    return dict(
        flux_configs.ae_config(),
        in_channels=shapes("encoder.conv_in.weight")[1],
        out_channels=shapes("decoder.conv_out.weight")[0],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(shapes(f"encoder.down.{level}.block.0.conv2.weight")[0] for level in range(levels)),
        layers_per_block=shapes.count("encoder.down.0.block."),
        latent_channels=shapes("encoder.conv_out.weight")[0] // 2,  # the encoder outputs mean and log-variance
    )


def split_ae(state_dict: Mapping[str, Tensor], source: str) -> tuple[dict, dict[str, Tensor]]:
    """An AE file -> (AutoencoderKL config, AutoencoderKL state dict)."""
    if any(key.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for key in state_dict):
        raise CheckpointError(f"{source} holds diffusers VAE weights; give the diffusers model folder instead")
    config = infer_ae_config(state_dict, source)
    keymap = ae_keymap(config)
    check_keys(state_dict, keymap.original_names, f"{source}: AE keys do not match the FLUX.1 AE layout", _AE_HINT)
    return config, keymap.to_model(state_dict)


def join_ae(model_state: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """An AutoencoderKL state dict -> the ae.safetensors layout."""
    keymap = ae_keymap(config)
    check_keys(model_state, keymap.model_names, "Cannot write the AE in the BFL layout", "Expected an AE state dict.")
    return keymap.to_original(model_state)


# ---------------------------------------------------------------------------------------------------------------
# Text encoders: single files in transformers naming, as users download them for FLUX.

CLIP_FILE_EXTRAS = ("text_projection.weight", "logit_scale", "text_model.embeddings.position_ids")
T5_SCALED_FP8_KEY = "scaled_fp8"


def split_clip_l(state_dict: Mapping[str, Tensor], source: str) -> tuple[dict, dict[str, Tensor]]:
    """clip_l.safetensors -> (CLIPTextConfig kwargs, state dict with canonical `text_model.` names).

    The projection and logit scale some files carry belong to the CLIP training head, which FLUX does not use.
    """
    state = {key: value for key, value in state_dict.items() if key not in CLIP_FILE_EXTRAS}
    state = sd_keys.text_encoder_from_model_keys(state)  # files without the `text_model.` level get it
    prefix = sd_keys.TEXT_MODEL_PREFIX
    shapes = Shapes(state, source)
    vocab_size, hidden_size = shapes(prefix + "embeddings.token_embedding.weight")
    config = dict(
        flux_configs.clip_l_config(),
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=shapes(prefix + "encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=shapes.count(prefix + "encoder.layers."),
        num_attention_heads=max(1, hidden_size // 64),
        max_position_embeddings=shapes(prefix + "embeddings.position_embedding.weight")[0],
        projection_dim=hidden_size,
    )
    expected = KeyMap(sd_keys.clip_entries(config["num_hidden_layers"], prefix)).original_names
    check_keys(state, expected, f"{source}: CLIP-L keys do not match", "Expected a CLIP text model (text_model.*).")
    return config, state


def split_t5xxl(state_dict: Mapping[str, Tensor], source: str) -> tuple[dict, dict[str, Tensor]]:
    """t5xxl_*.safetensors -> (T5Config kwargs, T5EncoderModel state dict with the tied embedding under both names).

    fp16, bf16 and plain fp8 e4m3fn files load alike (the loader casts); "scaled" fp8 files store per-tensor scales
    that would have to be multiplied in, and are refused with a hint.
    """
    if T5_SCALED_FP8_KEY in state_dict or any(key.endswith(".scale_weight") for key in state_dict):
        raise CheckpointError(
            f"{source} is a scaled fp8 T5 file (weights with separate scales); use t5xxl_fp16.safetensors or a plain "
            "t5xxl_fp8_e4m3fn.safetensors"
        )
    state = dict(state_dict)
    embedding = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    if embedding is None:
        raise CheckpointError(f"{source}: no shared.weight; expected a T5 encoder (shared.*, encoder.block.*)")
    state["shared.weight"] = state["encoder.embed_tokens.weight"] = embedding
    config = infer_t5_config(state, source)
    check_keys(state, t5_key_names(config["num_layers"]), f"{source}: T5 keys do not match", "Expected a T5 encoder.")
    return config, state


def infer_t5_config(state: Mapping[str, Tensor], source: str) -> dict:
    """T5Config kwargs from shapes; heads are 64 wide in every T5 v1.1 model."""
    shapes = Shapes(state, source)
    block = "encoder.block.0.layer."
    vocab_size, d_model = shapes("shared.weight")
    return dict(
        flux_configs.t5xxl_config(),
        vocab_size=vocab_size,
        d_model=d_model,
        d_ff=shapes(block + "1.DenseReluDense.wi_0.weight")[0],
        num_layers=shapes.count("encoder.block."),
        num_heads=shapes(block + "0.SelfAttention.q.weight")[0] // flux_configs.t5xxl_config()["d_kv"],
        relative_attention_num_buckets=shapes(block + "0.SelfAttention.relative_attention_bias.weight")[0],
    )


def t5_key_names(layers: int) -> frozenset[str]:
    """The state dict names of a gated-GELU T5 encoder with `layers` blocks."""
    names = {"shared.weight", "encoder.embed_tokens.weight", "encoder.final_layer_norm.weight"}
    names.add("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    for index in range(layers):
        block = f"encoder.block.{index}.layer."
        names.update(f"{block}0.SelfAttention.{name}.weight" for name in ("q", "k", "v", "o"))
        names.update(f"{block}1.DenseReluDense.{name}.weight" for name in ("wi_0", "wi_1", "wo"))
        names.update({f"{block}0.layer_norm.weight", f"{block}1.layer_norm.weight"})
    return frozenset(names)


def component_of(keys) -> str:
    """Which FLUX component a single file holds: transformer, ae, clip_l, t5xxl, or unknown."""
    keys = set(keys)
    if any(key.startswith(("double_blocks.", COMFY_PREFIX + "double_blocks.")) for key in keys):
        return "transformer"
    if any(key.startswith("encoder.down.") for key in keys):
        return "ae"
    if any(key.startswith("encoder.block.") for key in keys):
        return "t5xxl"
    if any(key.startswith(("text_model.", "encoder.layers.")) for key in keys):
        return "clip_l"
    return "unknown"


def linear_modules(config: Mapping) -> list[tuple[str, tuple[str, ...]]]:
    """(BFL module, the diffusers Linear(s) it is made of) for every Linear of the transformer, in file order.

    Adapter networks name their modules by the BFL path and hook the diffusers Linears (several for fused ones).
    """
    modules: list[tuple[str, tuple[str, ...]]] = []
    top = dict(TOP_MODULES, **(GUIDANCE_MODULES if config["guidance_embeds"] else {}))
    modules += [(bfl, (diffusers,)) for bfl, diffusers in top.items()]
    modules.append((FINAL_MODULATION, ("norm_out.linear",)))
    for index in range(config["num_layers"]):
        original, model = f"double_blocks.{index}.", f"transformer_blocks.{index}."
        for bfl, parts in DOUBLE_FUSED.items():
            modules.append((original + bfl, tuple(model + part for part in parts)))
        modules += [(original + bfl, (model + diffusers,)) for bfl, diffusers in DOUBLE_MODULES.items()]
    for index in range(config["num_single_layers"]):
        original, model = f"single_blocks.{index}.", f"single_transformer_blocks.{index}."
        modules.append((original + "linear1", tuple(model + part for part in SINGLE_FUSED_PARTS)))
        modules += [(original + bfl, (model + diffusers,)) for bfl, diffusers in SINGLE_MODULES.items()]
    return modules
