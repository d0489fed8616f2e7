"""Build randomly initialised tiny SD3 / SD3.5 models and write them as users download them: SAI single files with and
without the text encoders, separate `clip_l` / `clip_g` / `t5xxl` files, a diffusers folder and an offline tokenizer
cache (CLIP rebuilt from open-clip-torch, the small T5 tokenizer of tiny_flux).

    python -m library.testing.tiny_sd3 --out models/tiny_sd3
"""

from __future__ import annotations

import argparse
import os

import torch

from library.checkpoints import sd3_configs, sd3_files, sd3_keys
from library.checkpoints.files import save_state_dict
from library.testing import tiny_configs
from library.testing.tiny_flux import write_tokenizer_cache

TINY_VARIANTS = ("sd3", "sd3.5m")  # SD3 Medium-like, SD3.5 Medium-like (MMDiT-X blocks, qk norms)
CLIP_L_WIDTH, CLIP_G_WIDTH, CLIP_G_PROJECTION = 16, 24, 20  # distinct, so swapped encoders fail on shapes
T5_WIDTH = tiny_configs.tiny_t5_config()["d_model"]  # 40: the CLIP-L | CLIP-G states (16 + 24) fill it exactly


def tiny_transformer_config(variant: str = "sd3") -> dict:
    """A 32-wide MMDiT: `sd3` has 4 blocks of 4 heads (one head per block, as the releases, since files without qk
    norms do not show the head width); `sd3.5m` has 3 blocks of 2 heads, qk norms and attn2 in blocks 0 and 1."""
    dual = variant == "sd3.5m"
    layers, heads, head_dim = (3, 2, 16) if dual else (4, 4, 8)
    return {
        "sample_size": 16,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": T5_WIDTH,
        "caption_projection_dim": heads * head_dim,
        "pooled_projection_dim": CLIP_L_WIDTH + CLIP_G_PROJECTION,
        "out_channels": 16,
        "pos_embed_max_size": 16,  # latents up to 32 x 32 (images up to 256 px)
        "dual_attention_layers": (0, 1) if dual else (),
        "qk_norm": "rms_norm" if dual else None,
    }


def tiny_vae_config() -> dict:
    """The tiny 4-level VAE (1/8 size) with the SD3 VAE's 16 latent channels, scale and shift, no quant convs."""
    return dict(
        tiny_configs.tiny_vae_config(),
        latent_channels=16,
        scaling_factor=sd3_configs.VAE_SCALING_FACTOR,
        shift_factor=sd3_configs.VAE_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
    )


def tiny_clip_configs() -> tuple[dict, dict]:
    """(CLIP-L-like: quick-GELU, 2 layers, identity projection; CLIP-G-like: GELU, 3 layers, 20-wide projection),
    with the real vocabulary so the real tokenizer works."""
    clip_l = dict(tiny_configs.tiny_text_encoder_config(v2=False), hidden_size=CLIP_L_WIDTH, intermediate_size=32,
                  num_hidden_layers=2, projection_dim=CLIP_L_WIDTH)  # fmt: skip
    clip_g = dict(tiny_configs.tiny_text_encoder_config(v2=True), hidden_size=CLIP_G_WIDTH, intermediate_size=48,
                  num_hidden_layers=3, projection_dim=CLIP_G_PROJECTION)  # fmt: skip
    return clip_l, clip_g


def build_models(seed: int = 0, variant: str = "sd3") -> sd3_files.SD3Models:
    """Randomly initialised tiny models, identical for the same seed; CLIP-L's projection is the identity SD3 uses."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_l_config, clip_g_config = tiny_clip_configs()
    # The transformer last: the VAE and text encoders come out the same for every variant.
    vae = AutoencoderKL(**tiny_vae_config())
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**clip_l_config))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**clip_g_config))
    t5xxl = T5EncoderModel(T5Config(**tiny_configs.tiny_t5_config()))
    transformer = SD3Transformer2DModel(**tiny_transformer_config(variant))
    models = sd3_files.SD3Models(transformer, vae, clip_l, clip_g, t5xxl)
    with torch.no_grad():
        models.clip_l.text_projection.weight.copy_(torch.eye(CLIP_L_WIDTH))
        # Files store the position grid and loaders take it from there: random values catch one that recomputes it.
        models.transformer.pos_embed.pos_embed.normal_(std=0.02)
    for name in sd3_keys.COMPONENTS:
        getattr(models, name).eval()
    return models


def release_extras(models: sd3_files.SD3Models) -> dict[str, torch.Tensor]:
    """Non-model keys as released `incl_clips` files carry them: CLIP-L's (unused) projection and position ids."""
    prefix = sd3_keys.PREFIXES["clip_l"]
    positions = models.clip_l.config.max_position_embeddings
    return {
        prefix + "text_projection.weight": torch.eye(CLIP_L_WIDTH),
        prefix + "text_model.embeddings.position_ids": torch.arange(positions)[None],
    }


def write_single_file(models: sd3_files.SD3Models, path: str, text_encoders: bool) -> str:
    """An SAI-layout single file: MMDiT and VAE, with the three text encoders inside when `text_encoders`."""
    with_extras = sd3_files.SD3Models(**{name: getattr(models, name) for name in sd3_keys.COMPONENTS},
                                      extras=release_extras(models))  # fmt: skip
    encoders = sd3_keys.TEXT_ENCODERS if text_encoders else ()
    save_state_dict(sd3_files.checkpoint_state(with_extras, encoders), path)
    return path


def write_encoder_files(models: sd3_files.SD3Models, out_dir: str) -> dict[str, str]:
    """`clip_l.safetensors` (with a random projection that SD3 ignores), `clip_g.safetensors` and `t5xxl.safetensors`
    (the tied embedding stored once), in transformers naming as the SD3.5 repository's text_encoders/ ships them."""
    paths = {name: os.path.join(out_dir, f"{name}.safetensors") for name in sd3_keys.TEXT_ENCODERS}
    clip_l = sd3_keys.canonical_clip_names(models.clip_l.state_dict())
    clip_l["text_projection.weight"] = torch.randn(CLIP_L_WIDTH, CLIP_L_WIDTH)
    save_state_dict(clip_l, paths["clip_l"])
    save_state_dict(sd3_keys.canonical_clip_names(models.clip_g.state_dict()), paths["clip_g"])
    t5_state = {key: value for key, value in models.t5xxl.state_dict().items() if key != "encoder.embed_tokens.weight"}
    save_state_dict(t5_state, paths["t5xxl"])
    return paths


def write_diffusers_folder(models: sd3_files.SD3Models, path: str, tokenizer_dir: str) -> str:
    """A diffusers SD3 folder (transformer, vae, three text encoders and tokenizers, scheduler)."""
    sd3_files.save_diffusers_folder(models, sd3_files.load_tokenizers(cache_dir=tokenizer_dir), path)
    return path


def write_tiny_sd3(out_dir: str, seed: int = 0, diffusers_variants: tuple[str, ...] = TINY_VARIANTS) -> dict[str, str]:
    """Write both tiny variants: `<variant>.safetensors` (with encoders), `<variant>-no-te.safetensors` (MMDiT and
    VAE), `<variant>-diffusers/` (for `diffusers_variants`); the shared encoder files and the tokenizer cache.
    Returns paths by name."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"tokenizers": write_tokenizer_cache(os.path.join(out_dir, "tokenizers"))}
    for variant in TINY_VARIANTS:
        models = build_models(seed, variant)
        paths[variant] = write_single_file(models, os.path.join(out_dir, f"{variant}.safetensors"), True)
        no_te = os.path.join(out_dir, f"{variant}-no-te.safetensors")
        paths[f"{variant}-no-te"] = write_single_file(models, no_te, False)
        if variant in diffusers_variants:
            folder = os.path.join(out_dir, f"{variant}-diffusers")
            paths[f"{variant}-diffusers"] = write_diffusers_folder(models, folder, paths["tokenizers"])
    paths.update(write_encoder_files(models, out_dir))
    return paths


def write_tiny(out_dir: str):
    """The registry builder (library/testing/families.py): the SD3.5-M-like model, its single file holding the
    text encoders."""
    from library.testing.families import TinyFamily

    files = write_tiny_sd3(out_dir)
    return TinyFamily(
        "sd3",
        ("--pretrained_model_name_or_path", files["sd3.5m"], "--tokenizer_cache_dir", files["tokenizers"]),
        ("--pretrained_model_name_or_path", files["sd3.5m-diffusers"], "--tokenizer_cache_dir", files["tokenizers"]),
        {"network": "sd3_train_network.py", "finetune": "sd3_train.py"},
        fast_args=("--t5xxl_max_token_length", "16"),
        files=files,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description="write randomly initialised tiny SD3 models in the real formats")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for kind, path in write_tiny_sd3(args.out, args.seed).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
