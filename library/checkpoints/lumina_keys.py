"""Lumina Image 2.0 single files <-> diffusers / transformers key maps, used in both directions.

The transformer table maps the released Next-DiT names (`layers.N.attention.qkv`, `feed_forward.w1` ...) to
Lumina2Transformer2DModel names: the fused q|k|v (unequal parts: grouped-query attention) is split into to_q, to_k,
to_v. No halves are swapped (both sides order the modulations scale, gate, scale, gate). The release also holds a
`norm_final` RMSNorm that it never applies and diffusers does not build; it is read, dropped, and written back as
ones. Gemma2 files are transformers' names with or without the `model.` prefix of Gemma2ForCausalLM. The AE is
FLUX.1's (see flux_keys). A ComfyUI all-in-one checkpoint holds all three under prefixes.
Configs are read from tensor shapes; every key must be consumed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor

from library.checkpoints import lumina_configs
from library.checkpoints.keymap import Entry, KeyMap, check_keys, format_keys
from library.checkpoints.sd_keys import Shapes
from library.errors import CheckpointError

COMFY_PREFIX = "model.diffusion_model."  # ComfyUI saves the transformer under this prefix
_HINT = "Expected a Lumina Image 2.0 transformer (layers.*, noise_refiner.*, context_refiner.*, cap_embedder.* ...)."

# Tensors of the release that no diffusers module holds: the top-level RMSNorm that the release's forward never
# applies (its final layer has a LayerNorm of its own). Written back as ones, the value it was initialised with.
UNUSED_NORM = "norm_final.weight"

# Per block: original Linear -> diffusers Linear (no biases in the blocks' attention and feed-forward).
BLOCK_MODULES = {
    "attention.out": "attn.to_out.0",
    "feed_forward.w1": "feed_forward.linear_1",
    "feed_forward.w2": "feed_forward.linear_2",
    "feed_forward.w3": "feed_forward.linear_3",
}
QKV = "attention.qkv"
QKV_PARTS = ("attn.to_q", "attn.to_k", "attn.to_v")
MODULATION = {"adaLN_modulation.1": "norm1.linear"}  # layers and noise_refiner only; weight and bias
BLOCK_NORMS = {
    "attention.q_norm.weight": "attn.norm_q.weight",
    "attention.k_norm.weight": "attn.norm_k.weight",
    "attention_norm2.weight": "norm2.weight",
    "ffn_norm1.weight": "ffn_norm1.weight",
    "ffn_norm2.weight": "ffn_norm2.weight",
}
# The pre-attention RMSNorm: inside LuminaRMSNormZero for modulated blocks, a plain RMSNorm in the context refiner.
ATTENTION_NORM = {True: "norm1.norm.weight", False: "norm1.weight"}
# (block list, modulated by the timestep), in the order the model runs them; diffusers keeps the names.
BLOCK_LISTS = (("context_refiner", False), ("noise_refiner", True), ("layers", True))
# Top-level Linears with bias.
TOP_MODULES = {
    "t_embedder.mlp.0": "time_caption_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_caption_embed.timestep_embedder.linear_2",
    "cap_embedder.1": "time_caption_embed.caption_embedder.1",
    "x_embedder": "x_embedder",
}
FINAL_MODULES = {
    "final_layer.linear": "norm_out.linear_2",
    "final_layer.adaLN_modulation.1": "norm_out.linear_1",  # scale only (no shift), same in both layouts
}
CAPTION_NORM = {"cap_embedder.0.weight": "time_caption_embed.caption_embedder.0.weight"}  # RMSNorm of Gemma2 features
_WB = ("weight", "bias")


def _entries(table: Mapping[str, str], params: tuple[str, ...], original: str = "", model: str = "") -> Iterator[Entry]:
    for name, diffusers in table.items():
        for param in params:
            yield Entry(f"{original}{name}.{param}", (f"{model}{diffusers}.{param}",))


def qkv_sizes(config: Mapping) -> tuple[int, int, int]:
    """Rows of q, k and v in the fused qkv (grouped-query attention: fewer key/value heads than query heads)."""
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    kv_rows = config["num_kv_heads"] * head_dim
    return (config["hidden_size"], kv_rows, kv_rows)


def config_block_counts(config: Mapping) -> dict[str, int]:
    """Blocks per block list of a Lumina2Transformer2DModel config (both refiners have `num_refiner_layers`)."""
    refiners = config["num_refiner_layers"]
    return {"context_refiner": refiners, "noise_refiner": refiners, "layers": config["num_layers"]}


def block_entries(block_list: str, index: int, modulated: bool, sizes: tuple[int, int, int]) -> Iterator[Entry]:
    """The rows of block `index` of `block_list` (layers, noise_refiner or context_refiner)."""
    prefix = f"{block_list}.{index}."
    yield Entry(f"{prefix}{QKV}.weight", tuple(f"{prefix}{part}.weight" for part in QKV_PARTS), "fused", sizes)
    yield from _entries(BLOCK_MODULES, ("weight",), prefix, prefix)
    if modulated:
        yield from _entries(MODULATION, _WB, prefix, prefix)
    yield Entry(f"{prefix}attention_norm1.weight", (prefix + ATTENTION_NORM[modulated],))
    for original, diffusers in BLOCK_NORMS.items():
        yield Entry(prefix + original, (prefix + diffusers,))


def transformer_entries(config: Mapping) -> Iterator[Entry]:
    """All rows of a Lumina2Transformer2DModel config, original names first (UNUSED_NORM has no row)."""
    yield from _entries(TOP_MODULES, _WB)
    yield from (Entry(original, (diffusers,)) for original, diffusers in CAPTION_NORM.items())
    sizes = qkv_sizes(config)
    counts = config_block_counts(config)
    for block_list, modulated in BLOCK_LISTS:
        for index in range(counts[block_list]):
            yield from block_entries(block_list, index, modulated, sizes)
    yield from _entries(FINAL_MODULES, _WB)


def transformer_keymap(config: Mapping) -> KeyMap:
    return KeyMap(transformer_entries(config))


def without_comfy_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The transformer keys without ComfyUI's `model.diffusion_model.` prefix (files are saved either way)."""
    if state_dict and all(key.startswith(COMFY_PREFIX) for key in state_dict):
        return {key[len(COMFY_PREFIX) :]: value for key, value in state_dict.items()}
    return dict(state_dict)


def _ffn_settings(hidden_size: int, ffn_dim: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) with which diffusers builds a feed-forward `ffn_dim` wide.

    Diffusers rounds int(multiplier * 4 * hidden) up to a multiple of `multiple_of`. The release's rounding (256)
    is kept when it gives the width; otherwise the width itself is the multiple, scaled down when narrower.
    """
    base = 4 * hidden_size
    release = lumina_configs.FFN_MULTIPLE_OF
    if -(-base // release) * release == ffn_dim:
        return release, None
    return ffn_dim, None if ffn_dim >= base else ffn_dim / base


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary dims per position axis (caption index, row, column): a third of the head each, as the release's 32."""
    third = head_dim // 3
    if head_dim % 6:
        raise CheckpointError(
            f"Lumina attention head width {head_dim} does not split into three even rotary parts; no known model has it"
        )
    return (third, third, third)


def infer_transformer_config(state_dict: Mapping[str, Tensor], source: str = "Checkpoint") -> dict:
    """The Lumina2Transformer2DModel config of a transformer in the released layout, read from tensor shapes.

    Patch size, rotary lengths, sample size and norm epsilon are not in the file: the release's are used.
    """
    if not any(key.startswith("layers.") for key in state_dict):
        raise CheckpointError(f"{source}: no layers.* tensors. {_HINT}")
    shapes = Shapes(state_dict, source)
    hidden_size, patch_inputs = shapes("x_embedder.weight")
    patch_area = lumina_configs.PATCH_SIZE**2
    head_dim = shapes("layers.0.attention.q_norm.weight")[0]
    heads = hidden_size // head_dim
    qkv_rows = shapes(f"layers.0.{QKV}.weight")[0]
    refiners = shapes.count("noise_refiner.")
    if shapes.count("context_refiner.") != refiners:
        raise CheckpointError(
            f"{source}: {refiners} noise refiner but {shapes.count('context_refiner.')} context refiner layers; "
            "the diffusers Lumina 2 model has as many of each"
        )
    if patch_inputs % patch_area or hidden_size % head_dim or (qkv_rows - hidden_size) % (2 * head_dim):
        raise CheckpointError(f"{source}: x_embedder / qkv shapes fit no Lumina 2 layout. {_HINT}")
    multiple_of, ffn_dim_multiplier = _ffn_settings(hidden_size, shapes("layers.0.feed_forward.w1.weight")[0])
    out_channels = shapes("final_layer.linear.weight")[0] // patch_area
    return dict(
        lumina_configs.transformer_config(),
        in_channels=patch_inputs // patch_area,
        hidden_size=hidden_size,
        num_layers=shapes.count("layers."),
        num_refiner_layers=refiners,
        num_attention_heads=heads,
        num_kv_heads=(qkv_rows - hidden_size) // (2 * head_dim),
        multiple_of=multiple_of,
        ffn_dim_multiplier=ffn_dim_multiplier,
        axes_dim_rope=rope_axes(head_dim),
        cap_feat_dim=shapes("cap_embedder.0.weight")[0],
        out_channels=None if out_channels == patch_inputs // patch_area else out_channels,  # as the release writes it
    )


def split_transformer(state_dict: Mapping[str, Tensor], source: str) -> tuple[dict, dict[str, Tensor]]:
    """A released-layout transformer -> (Lumina2Transformer2DModel config, its state dict); every key consumed."""
    state_dict = without_comfy_prefix(state_dict)
    config = infer_transformer_config(state_dict, source)
    keymap = transformer_keymap(config)
    found = [key for key in state_dict if key != UNUSED_NORM]
    check_keys(found, keymap.original_names, f"{source}: transformer keys do not match the Lumina 2 layout", _HINT)
    try:
        return config, keymap.to_model(state_dict)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from err


def join_transformer(model_state: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """The inverse of `split_transformer`: a Lumina2Transformer2DModel state dict -> the released layout."""
    keymap = transformer_keymap(config)
    check_keys(
        model_state,
        keymap.model_names,
        "Cannot write the transformer in the Lumina 2 layout",
        "Expected the state dict of a Lumina2Transformer2DModel built from the given config.",
    )
    state = keymap.to_original(model_state)
    reference = model_state["x_embedder.weight"]
    state[UNUSED_NORM] = torch.ones(config["hidden_size"], dtype=reference.dtype, device=reference.device)
    return state


def block_counts(keys: Iterable[str]) -> dict[str, int]:
    """Blocks per block list (layers, noise_refiner, context_refiner) from a transformer's tensor names alone."""
    counts = {block_list: 0 for block_list, _ in BLOCK_LISTS}
    for key in keys:
        parts = key.removeprefix(COMFY_PREFIX).split(".")
        if parts[0] in counts and len(parts) > 1 and parts[1].isdigit():
            counts[parts[0]] = max(counts[parts[0]], int(parts[1]) + 1)
    return counts


def linear_modules(config: Mapping) -> list[tuple[str, tuple[str, ...]]]:
    """(original module, the diffusers Linear(s) it is made of) for every Linear of the transformer: embedders,
    blocks (context refiner, noise refiner, layers), final layer. Adapter networks name their modules by the
    original path and hook the diffusers Linears (three for the fused qkv)."""
    modules = [(original, (diffusers,)) for original, diffusers in TOP_MODULES.items()]
    counts = config_block_counts(config)
    for block_list, modulated in BLOCK_LISTS:
        for index in range(counts[block_list]):
            prefix = f"{block_list}.{index}."
            modules.append((prefix + QKV, tuple(prefix + part for part in QKV_PARTS)))
            modules += [(prefix + original, (prefix + diffusers,)) for original, diffusers in BLOCK_MODULES.items()]
            if modulated:
                modules += [(prefix + original, (prefix + diffusers,)) for original, diffusers in MODULATION.items()]
    modules += [(original, (diffusers,)) for original, diffusers in FINAL_MODULES.items()]
    return modules


# ---------------------------------------------------------------------------------------------------------------
# Gemma2: transformers' Gemma2Model names, in files with Gemma2ForCausalLM's `model.` prefix (ComfyUI's
# gemma_2_2b_fp16.safetensors, Hugging Face's weights) or without it (a saved Gemma2Model).

GEMMA2_FILE_PREFIX = "model."
# Tensors some Gemma2 files carry that Gemma2Model does not use: the language-model head (tied to the embedding)
# and the sentencepiece tokenizer ComfyUI embeds as bytes.
GEMMA2_FILE_EXTRAS = ("lm_head.weight", "spiece_model")
GEMMA2_LAYER_NAMES = (
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
    "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight",
)  # fmt: skip
_GEMMA2_HINT = "Expected a Gemma2-2B text encoder (model.embed_tokens.weight, model.layers.*, model.norm.weight)."


def gemma2_entries(layers: int, prefix: str = GEMMA2_FILE_PREFIX) -> Iterator[Entry]:
    """Rows of a Gemma2 file with `layers` layers: `prefix` + the Gemma2Model name -> the Gemma2Model name."""
    names = ["embed_tokens.weight", "norm.weight"]
    names += [f"layers.{index}.{name}" for index in range(layers) for name in GEMMA2_LAYER_NAMES]
    return (Entry(prefix + name, (name,)) for name in names)


def gemma2_prefix(keys: Iterable[str]) -> str:
    """`model.` when the file's Gemma2 tensors carry Gemma2ForCausalLM's prefix, else the empty string."""
    keys = [key for key in keys if key not in GEMMA2_FILE_EXTRAS]
    return GEMMA2_FILE_PREFIX if keys and all(key.startswith(GEMMA2_FILE_PREFIX) for key in keys) else ""


def infer_gemma2_config(state: Mapping[str, Tensor], source: str) -> dict:
    """Gemma2Config kwargs from shapes (Gemma2Model names); heads are 256 wide as in Gemma2-2B."""
    shapes = Shapes(state, source)
    head_dim = lumina_configs.GEMMA2_HEAD_DIM
    vocab_size, hidden_size = shapes("embed_tokens.weight")
    query_rows, key_rows = shapes("layers.0.self_attn.q_proj.weight")[0], shapes("layers.0.self_attn.k_proj.weight")[0]
    if query_rows % head_dim or key_rows % head_dim:
        raise CheckpointError(
            f"{source}: attention projections of {query_rows} and {key_rows} rows are not whole {head_dim}-wide "
            f"heads. {_GEMMA2_HINT}"
        )
    return dict(
        lumina_configs.gemma2_config(),
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=shapes("layers.0.mlp.gate_proj.weight")[0],
        num_hidden_layers=shapes.count("layers."),
        num_attention_heads=query_rows // head_dim,
        num_key_value_heads=key_rows // head_dim,
    )


def split_gemma2(state_dict: Mapping[str, Tensor], source: str) -> tuple[dict, dict[str, Tensor]]:
    """A Gemma2 file -> (Gemma2Config kwargs, Gemma2Model state dict). The extras some files carry are dropped."""
    state = {key: value for key, value in state_dict.items() if key not in GEMMA2_FILE_EXTRAS}
    prefix = gemma2_prefix(state)
    model_state = {key[len(prefix) :]: value for key, value in state.items()}
    if "embed_tokens.weight" not in model_state:
        raise CheckpointError(f"{source}: no embed_tokens.weight. {_GEMMA2_HINT}")
    config = infer_gemma2_config(model_state, source)
    keymap = KeyMap(gemma2_entries(config["num_hidden_layers"], prefix))
    check_keys(state, keymap.original_names, f"{source}: Gemma2 keys do not match", _GEMMA2_HINT)
    return config, keymap.to_model(state)


def join_gemma2(model_state: Mapping[str, Tensor], layers: int, prefix: str = GEMMA2_FILE_PREFIX) -> dict[str, Tensor]:
    """A Gemma2Model state dict -> a Gemma2 file (by default with the `model.` prefix of the released files)."""
    keymap = KeyMap(gemma2_entries(layers, prefix))
    check_keys(model_state, keymap.model_names, "Cannot write the Gemma2 file", "Expected a Gemma2Model state dict.")
    return keymap.to_original(model_state)


# ---------------------------------------------------------------------------------------------------------------
# Which file is which, and ComfyUI's all-in-one checkpoint (e.g. lumina_2.safetensors, Neta Lumina).

# Component -> the prefixes of its tensors inside an all-in-one checkpoint.
CHECKPOINT_PREFIXES = {
    "transformer": (COMFY_PREFIX,),
    "gemma2": ("text_encoders.gemma2_2b.transformer.",),
    "ae": ("vae.", "first_stage_model."),
}
CHECKPOINT_MARKERS = ("text_encoders.gemma2_2b.logit_scale",)  # ComfyUI's CLIP bookkeeping, no model weight


def component_of(keys: Iterable[str]) -> str:
    """Which Lumina 2 component a single file holds: transformer, gemma2, ae, checkpoint (ComfyUI all-in-one with
    transformer, Gemma2 and AE), or unknown."""
    keys = set(keys)
    if any(key.startswith(COMFY_PREFIX) for key in keys) and any(key.startswith("text_encoders.") for key in keys):
        return "checkpoint"
    plain = {key.removeprefix(COMFY_PREFIX) for key in keys}
    if "cap_embedder.0.weight" in plain or any(key.startswith(("context_refiner.", "noise_refiner.")) for key in plain):
        return "transformer"
    if any(key.startswith("encoder.down.") for key in keys):
        return "ae"
    if any(key.removeprefix(GEMMA2_FILE_PREFIX).startswith("layers.0.post_feedforward_layernorm.") for key in keys):
        return "gemma2"
    return "unknown"


def is_lumina_transformer(keys: Iterable[str]) -> bool:
    """Whether a state dict (or its key names) is a Lumina 2 transformer, alone or inside an all-in-one checkpoint."""
    return component_of(keys) in ("transformer", "checkpoint")


def checkpoint_part(state_dict: Mapping[str, Tensor], component: str, source: str) -> dict[str, Tensor]:
    """The tensors of `component` inside an all-in-one checkpoint, without their prefix.

    Only the prefix is read here; the part's own keys are checked strictly by its split function. Tensors under no
    known prefix are refused, so a file of another architecture does not pass as a checkpoint.
    """
    known = tuple(prefix for prefixes in CHECKPOINT_PREFIXES.values() for prefix in prefixes)
    strays = [key for key in state_dict if not key.startswith(known) and key not in CHECKPOINT_MARKERS]
    if strays:
        raise CheckpointError(
            f"{source}: tensors outside the transformer, Gemma2 and AE of a ComfyUI Lumina 2 checkpoint: "
            f"{format_keys(strays)}"
        )
    part = {}
    for key, value in state_dict.items():
        prefix = next((p for p in CHECKPOINT_PREFIXES[component] if key.startswith(p)), None)
        if prefix is not None:
            part[key[len(prefix) :]] = value
    if not part:
        prefixes = " or ".join(CHECKPOINT_PREFIXES[component])
        raise CheckpointError(f"{source}: the checkpoint holds no {component} (no keys under {prefixes})")
    return part
