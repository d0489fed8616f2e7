"""Configs of the released FLUX.1 models, shipped so that loading single files never needs the hub.

Diffusers / transformers constructor kwargs for the transformer (dev and schnell differ only in the guidance
embedder), the 16-channel autoencoder, CLIP-L and T5-XXL, plus the tokenizer settings the releases use.
"""

from __future__ import annotations

VARIANTS = ("dev", "schnell")
AE_SCALING_FACTOR = 0.3611  # the FLUX AE's latent scale and shift: z = (latent - shift) * scale
AE_SHIFT_FACTOR = 0.1159
T5_MAX_TOKENS = {"dev": 512, "schnell": 256}  # T5 sequence length each variant was trained with
CLIP_MAX_TOKENS = 77
# The dev schedule of the sampler: mu grows linearly with the image token count between these points.
SCHEDULE_SHIFT_POINTS = ((256, 0.5), (4096, 1.15))


def transformer_config(variant: str) -> dict:
    """FluxTransformer2DModel kwargs of FLUX.1 [dev] or [schnell] (19 double and 38 single blocks, 3072 wide)."""
    return {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": variant == "dev",
        "axes_dims_rope": (16, 56, 56),
    }


def ae_config() -> dict:
    """AutoencoderKL kwargs of the FLUX.1 AE (ae.safetensors): the SD VAE layout, 16 latent channels, no quant convs."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "latent_channels": 16,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": AE_SCALING_FACTOR,
        "shift_factor": AE_SHIFT_FACTOR,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "force_upcast": True,
    }


def clip_l_config() -> dict:
    """CLIPTextConfig kwargs of CLIP ViT-L/14 (clip_l.safetensors)."""
    return {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": CLIP_MAX_TOKENS,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }


def t5xxl_config() -> dict:
    """T5Config kwargs of the T5 v1.1 XXL encoder (t5xxl_fp16.safetensors)."""
    return {
        "vocab_size": 32128,
        "d_model": 4096,
        "d_kv": 64,
        "d_ff": 10240,
        "num_layers": 24,
        "num_heads": 64,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu",
        "layer_norm_epsilon": 1e-6,
        "dropout_rate": 0.0,
        "is_encoder_decoder": False,
        "use_cache": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
    }
