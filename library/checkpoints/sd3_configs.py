"""Configs of the released SD3 / SD3.5 models, shipped so that loading single files never needs the hub.

Diffusers / transformers constructor kwargs of the MMDiT of SD3 Medium, SD3.5 Medium (MMDiT-X) and SD3.5 Large, the
16-channel VAE, CLIP-L, CLIP-G and T5-XXL, the tokenizer lengths and the flow-matching schedule of the releases.
"""

from __future__ import annotations

from library.checkpoints import flux_configs

VARIANTS = ("sd3-medium", "sd3.5-medium", "sd3.5-large")
VAE_SCALING_FACTOR = 1.5305  # the SD3 VAE's latent scale and shift: z = (latent - shift) * scale
VAE_SHIFT_FACTOR = 0.0609
CLIP_MAX_TOKENS = 77
T5_MAX_TOKENS = 256  # the reference's --t5xxl_max_token_length default
SCHEDULE_SHIFT = 3.0  # the timestep shift of the releases' flow-matching schedule
SAMPLE_SIZE = 128  # latent size the releases were trained at (1024 px); diffusers' default sample_size

# Blocks 0..12 of SD3.5 Medium carry a second, image-only attention (MMDiT-X).
SD35_MEDIUM_DUAL_ATTENTION_LAYERS = tuple(range(13))


def transformer_config(variant: str) -> dict:
    """SD3Transformer2DModel kwargs of a release: 64-wide heads, one head per block (the MMDiT's depth rule)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown SD3 variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    depth = 38 if variant == "sd3.5-large" else 24
    return {
        "sample_size": SAMPLE_SIZE,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": depth,
        "attention_head_dim": 64,
        "num_attention_heads": depth,
        "joint_attention_dim": 4096,  # T5-XXL width; the CLIP-L|G states are zero-padded to it
        "caption_projection_dim": 64 * depth,
        "pooled_projection_dim": 2048,  # CLIP-L pooled (768) | CLIP-G pooled projection (1280)
        "out_channels": 16,
        "pos_embed_max_size": 384 if variant == "sd3.5-medium" else 192,
        "dual_attention_layers": SD35_MEDIUM_DUAL_ATTENTION_LAYERS if variant == "sd3.5-medium" else (),
        "qk_norm": None if variant == "sd3-medium" else "rms_norm",
    }


def vae_config() -> dict:
    """AutoencoderKL kwargs of the SD3 VAE: the SD VAE layout with 16 latent channels and no quant convs."""
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
        "scaling_factor": VAE_SCALING_FACTOR,
        "shift_factor": VAE_SHIFT_FACTOR,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "force_upcast": True,
    }


def clip_l_config() -> dict:
    """CLIPTextConfig kwargs of CLIP ViT-L/14, loaded as CLIPTextModelWithProjection.

    SD3 uses CLIP-L's pooled output unprojected: the projection is the identity (as diffusers' converter and
    ComfyUI have it), so projection_dim equals the width.
    """
    return flux_configs.clip_l_config()


def clip_g_config() -> dict:
    """CLIPTextConfig kwargs of OpenCLIP ViT-bigG/14 (all 32 layers), loaded as CLIPTextModelWithProjection."""
    return dict(
        flux_configs.clip_l_config(),
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        hidden_act="gelu",
        projection_dim=1280,
    )


def t5xxl_config() -> dict:
    """T5Config kwargs of the T5 v1.1 XXL encoder (the same encoder FLUX.1 uses)."""
    return flux_configs.t5xxl_config()


def scheduler_config() -> dict:
    """FlowMatchEulerDiscreteScheduler kwargs of the releases (scheduler/scheduler_config.json)."""
    return {"num_train_timesteps": 1000, "shift": SCHEDULE_SHIFT}
