"""Configs of the released Lumina Image 2.0, shipped so that loading single files never needs the hub.

Diffusers / transformers constructor kwargs of the Next-DiT 2B transformer and its Gemma2-2B text encoder, the
tokenizer and prompt settings the reference trainer uses, and the release's flow-matching schedule. The autoencoder
is FLUX.1's (`ae.safetensors`), so its config, latent scale and shift come from `flux_configs`.
"""

from __future__ import annotations

from library.checkpoints import flux_configs

PATCH_SIZE = 2  # every released Lumina 2 model patches the 16-channel latent 2x2 (the file cannot tell)
LATENT_CHANNELS = 16
ROPE_AXES_LENGTHS = (300, 512, 512)  # rotary positions per axis: caption index, row, column
FFN_MULTIPLE_OF = 256  # the release rounds the feed-forward width up to a multiple of this

GEMMA2_HEAD_DIM = 256  # Gemma2-2B's attention head width; a Gemma2 file holds q/k/v rows, not heads
GEMMA2_VOCAB_SIZE = 256000
GEMMA2_REPO = "google/gemma-2-2b"  # the reference trainer's tokenizer source
LUMINA_REPO = "Alpha-VLLM/Lumina-Image-2.0"  # the diffusers release; its tokenizer/ is the same Gemma tokenizer
GEMMA2_MAX_TOKENS = 256  # the reference's --gemma2_max_token_length default (also the diffusers pipeline's)
GEMMA2_HIDDEN_STATE = -2  # the transformer reads Gemma2's second-to-last hidden state

# Prompts start with a system prompt and this separator (the reference and the diffusers pipeline join them so).
SYSTEM_PROMPT_SEPARATOR = " <Prompt Start> "
# The two system prompts the reference documents: general purpose, and stronger image-text alignment.
SYSTEM_PROMPTS = {
    "general": "You are an assistant designed to generate high-quality images based on user prompts.",
    "alignment": "You are an assistant designed to generate high-quality images with the highest degree of "
    "image-text alignment based on textual prompts.",
}
# The diffusers Lumina2Pipeline's default system prompt (used when sampling with diffusers).
PIPELINE_SYSTEM_PROMPT = (
    "You are an assistant designed to generate superior images with the superior degree of image-text alignment "
    "based on textual prompts or user prompts."
)

# The release samples with a fixed time shift of 6 (the reference's --discrete_flow_shift default); the mu
# points below are the resolution-dependent shift of the reference's `nextdit_shift` timestep sampling.
DISCRETE_FLOW_SHIFT = 6.0
NUM_TRAIN_TIMESTEPS = 1000
SCHEDULE_SHIFT_POINTS = ((256, 0.5), (4096, 1.15))


def transformer_config() -> dict:
    """Lumina2Transformer2DModel kwargs of Lumina Image 2.0 (Next-DiT 2B: 26 layers, 2304 wide, 24 heads over
    8 key/value heads, 2 refiner layers per stream, 2304-wide Gemma2 caption features)."""
    return {
        "sample_size": 128,
        "patch_size": PATCH_SIZE,
        "in_channels": LATENT_CHANNELS,
        "out_channels": None,
        "hidden_size": 2304,
        "num_layers": 26,
        "num_refiner_layers": 2,
        "num_attention_heads": 24,
        "num_kv_heads": 8,
        "multiple_of": FFN_MULTIPLE_OF,
        "ffn_dim_multiplier": None,
        "norm_eps": 1e-5,
        "scaling_factor": 1.0,
        "axes_dim_rope": (32, 32, 32),
        "axes_lens": ROPE_AXES_LENGTHS,
        "cap_feat_dim": 2304,
    }


def gemma2_config() -> dict:
    """Gemma2Config kwargs of Gemma2-2B (26 layers, 2304 wide, 8 heads of 256 over 4 key/value heads)."""
    return {
        "vocab_size": GEMMA2_VOCAB_SIZE,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": GEMMA2_HEAD_DIM,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "tie_word_embeddings": True,
        "use_cache": False,  # an encoder here: no generation, so no key/value cache
    }


def ae_config() -> dict:
    """AutoencoderKL kwargs of the autoencoder: FLUX.1's, with its latent scale and shift."""
    return flux_configs.ae_config()


def tokenizer_settings() -> dict:
    """How the reference tokenizes for Gemma2: pad on the right to the max length, a <bos> first, no <eos>."""
    return {"max_length": GEMMA2_MAX_TOKENS, "padding_side": "right", "bos_token_id": 2, "eos_token_id": 1,
            "pad_token_id": 0}  # fmt: skip


def scheduler_config() -> dict:
    """FlowMatchEulerDiscreteScheduler kwargs of the release: a static shift of 6 over 1000 training steps."""
    (low_tokens, low_shift), (high_tokens, high_shift) = SCHEDULE_SHIFT_POINTS
    return {
        "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
        "shift": DISCRETE_FLOW_SHIFT,
        "use_dynamic_shifting": False,
        "base_shift": low_shift,
        "max_shift": high_shift,
        "base_image_seq_len": low_tokens,
        "max_image_seq_len": high_tokens,
    }


def with_system_prompt(prompt: str, system_prompt: str | None) -> str:
    """The text Gemma2 reads: `<system prompt> <Prompt Start> <prompt>`, or the prompt alone without one."""
    return f"{system_prompt}{SYSTEM_PROMPT_SEPARATOR}{prompt}" if system_prompt else prompt
