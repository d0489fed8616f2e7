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


# SDXL -----------------------------------------------------------------------------------------------------------
# Tiny SDXL follows the released layout: no attention in the first level, deeper transformers further down,
# 64-channel heads, linear projections, a `text_time` addition embedding fed by encoder 2's pooled output. The two
# text encoders differ in width (32 and 48) and encoder 2 projects to 40, so a swapped encoder or an untransposed
# text projection shows up as a shape error.


def tiny_sdxl_unet_config() -> dict:
    """Three levels like SDXL (so its 23 UNet blocks): context 32 + 48, pooled 40 + 6 x 8 size embeddings."""
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=80,
        attention_head_dim=(1, 1, 1),
        norm_num_groups=32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=88,
    )


def tiny_sdxl_vae_config() -> dict:
    """The tiny VAE with the SDXL VAE's latent scale."""
    return dict(tiny_vae_config(), scaling_factor=0.13025, force_upcast=True)


def tiny_sdxl_text_encoder_configs() -> tuple[dict, dict]:
    """(CLIP ViT-L-like encoder 1, OpenCLIP bigG-like encoder 2 with a 40-wide projection)."""
    clip_l = tiny_text_encoder_config(v2=False)
    big_g = dict(tiny_text_encoder_config(v2=True), hidden_size=48, intermediate_size=96, projection_dim=40,
                 num_attention_heads=1)  # fmt: skip
    return clip_l, big_g


def sdxl_unet_config() -> dict:
    """The released SDXL 1.0 base UNet."""
    return dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20),
        norm_num_groups=32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def sdxl_vae_config() -> dict:
    """The released SDXL VAE (the SD VAE architecture with another latent scale)."""
    return dict(sd_vae_config(), sample_size=1024, scaling_factor=0.13025, force_upcast=True)


def open_clip_bigg_config() -> dict:
    """OpenCLIP ViT-bigG/14 text encoder used by SDXL as encoder 2 (all 32 layers, 1280-wide projection)."""
    return dict(
        clip_l_config(),
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        hidden_act="gelu",
        projection_dim=1280,
    )


# FLUX.1 ---------------------------------------------------------------------------------------------------------
# Tiny FLUX keeps the released proportions that the shape inference relies on: 32-wide heads scaled like 128
# (rotary dims 4/14/14 of 16/56/56), MLP ratio 4, 16 latent channels packed 2x2 (64 inputs). The T5 (40 wide) and
# CLIP (32 wide) widths differ, so a swapped text input shows up as a shape error.


def tiny_flux_transformer_config(guidance_embeds: bool = True) -> dict:
    """Three double and four single blocks (enough to swap some), 64 wide (2 heads of 32); dev-like with the
    guidance embedder."""
    return dict(
        patch_size=1,
        in_channels=64,
        num_layers=3,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=40,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 14, 14),
    )


def tiny_flux_ae_config() -> dict:
    """The tiny 4-level VAE (1/8 size) with FLUX's 16 latent channels, scale and shift and no quant convs."""
    return dict(
        tiny_vae_config(),
        latent_channels=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
    )


def tiny_flux_clip_config() -> dict:
    """CLIP-L-like text encoder (the real vocabulary, 32 wide)."""
    return tiny_text_encoder_config(v2=False)


def tiny_t5_config(vocab_size: int = 128) -> dict:
    """Gated-GELU T5 encoder, 40 wide, one 64-wide head (T5 v1.1 head width), two blocks."""
    return dict(
        vocab_size=vocab_size,
        d_model=40,
        d_kv=64,
        d_ff=48,
        num_layers=2,
        num_heads=1,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )
