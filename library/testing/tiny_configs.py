"""Diffusers/transformers configs of tiny SD 1.x / 2.x models and of the full-size SD 1.5 architecture.

Tiny configs follow the same rules as the released models (SD1: 8 attention heads, 1x1-conv projections,
quick-GELU CLIP; SD2: 64-channel heads where possible, linear projections, GELU OpenCLIP), so a checkpoint's
architecture can be read back from its tensor shapes alone, exactly as for real checkpoints.
"""

from __future__ import annotations

CLIP_VOCAB_SIZE = 49408


def tiny_unet_config(v2: bool) -> dict:
    """Two-level UNet, attention in the first level only (like the released models' last level without it)."""
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=(1, 1) if v2 else 8,
        norm_num_groups=32,
        use_linear_projection=v2,
    )


def tiny_vae_config() -> dict:
    """Four levels, so the latent is 1/8 of the image as in the released VAE."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.18215,
    )


def tiny_text_encoder_config(v2: bool) -> dict:
    """CLIP text encoder with the real vocabulary (so the real tokenizer works) and 32-wide layers."""
    return dict(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=1,
        max_position_embeddings=77,
        hidden_act="gelu" if v2 else "quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def sd15_unet_config() -> dict:
    """The released SD 1.5 UNet architecture."""
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
        use_linear_projection=False,
    )


def sd2_unet_config() -> dict:
    """The released SD 2.x UNet architecture (768-v and 512-base share it)."""
    return dict(
        sd15_unet_config(),
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    )


def sd_vae_config() -> dict:
    """The released SD VAE (kl-f8)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )


def clip_l_config() -> dict:
    """CLIP ViT-L/14 text encoder used by SD 1.x."""
    return dict(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=768,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def open_clip_h_config() -> dict:
    """OpenCLIP ViT-H/14 text encoder used by SD 2.x, with all 24 layers as in the original file."""
    return dict(
        clip_l_config(),
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        hidden_act="gelu",
        projection_dim=1024,
    )
