"""Build randomly initialised tiny FLUX.1 models and write them as users download them: the BFL transformer file,
`ae.safetensors`, `clip_l.safetensors`, `t5xxl.safetensors`, a diffusers folder, and an offline tokenizer cache
(CLIP rebuilt from open-clip-torch, a small T5 unigram tokenizer built with `tokenizers`).

    python -m library.testing.tiny_flux --out models/tiny_flux
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import torch

from library.atomic import atomic_path, atomic_write_text
from library.checkpoints import flux_files, flux_keys, sd_keys
from library.checkpoints.files import save_state_dict
from library.checkpoints.tokenizer_cache import our_folder
from library.checkpoints.tokenizers import EOS_TOKEN, write_clip_tokenizer_files
from library.testing import tiny_configs

# Words of the toy dataset's captions and sample prompts, so tokens are mostly whole words.
T5_WORDS = ("a", "an", "the", "of", "and", "photo", "picture", "toy", "image", "painting", "red", "green", "blue",
            "yellow", "circle", "square", "triangle", "cat", "dog")  # fmt: skip
T5_SPECIAL = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5


@dataclass
class FluxModels:
    """The four models of a FLUX.1 setup."""

    transformer: torch.nn.Module
    ae: torch.nn.Module
    clip_l: torch.nn.Module
    t5xxl: torch.nn.Module


def build_models(seed: int = 0, guidance_embeds: bool = True) -> FluxModels:
    """Randomly initialised tiny models (dev-like unless `guidance_embeds` is False), identical for the same seed."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**tiny_configs.tiny_flux_transformer_config(guidance_embeds))
    ae = AutoencoderKL(**tiny_configs.tiny_flux_ae_config())
    clip_l = CLIPTextModel(CLIPTextConfig(**tiny_configs.tiny_flux_clip_config()))
    t5xxl = T5EncoderModel(T5Config(**tiny_configs.tiny_t5_config()))
    for model in (transformer, ae, clip_l, t5xxl):
        model.eval()
    return FluxModels(transformer, ae, clip_l, t5xxl)


def transformer_file_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The transformer in the BFL layout."""
    return flux_keys.join_transformer(transformer.state_dict(), dict(transformer.config))


def write_single_files(models: FluxModels, out_dir: str, name: str = "flux-dev") -> dict[str, str]:
    """`<name>.safetensors`, `ae.safetensors`, `clip_l.safetensors` (with the projection some files carry) and
    `t5xxl.safetensors` (the tied embedding stored once, under `shared.weight`)."""
    paths = {kind: os.path.join(out_dir, f"{stem}.safetensors") for kind, stem in
             (("transformer", name), ("ae", "ae"), ("clip_l", "clip_l"), ("t5xxl", "t5xxl"))}  # fmt: skip
    save_state_dict(transformer_file_state(models.transformer), paths["transformer"])
    save_state_dict(flux_keys.join_ae(models.ae.state_dict(), dict(models.ae.config)), paths["ae"])
    clip_state = sd_keys.text_encoder_from_model_keys(models.clip_l.state_dict())
    hidden = models.clip_l.config.hidden_size
    clip_state["text_projection.weight"] = torch.zeros(hidden, hidden)
    save_state_dict(clip_state, paths["clip_l"])
    t5_state = {key: value for key, value in models.t5xxl.state_dict().items() if key != "encoder.embed_tokens.weight"}
    save_state_dict(t5_state, paths["t5xxl"])
    return paths


def write_t5_tokenizer(out_dir: str) -> str:
    """A small T5-style unigram tokenizer (`tokenizer.json`): T5's special ids, `</s>` appended, metaspace words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [(token, 0.0) for token in T5_SPECIAL] + [("▁" + word, -2.0) for word in T5_WORDS]
    pieces += [(char, -8.0) for char in "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-"] + [("▁", -6.0)]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    os.makedirs(out_dir, exist_ok=True)
    with atomic_path(os.path.join(out_dir, "tokenizer.json")) as temp:
        tokenizer.save(temp)
    config = {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
              "model_max_length": 512, "extra_ids": 0}  # fmt: skip
    atomic_write_text(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(config))
    return out_dir


def write_tokenizer_cache(out_dir: str) -> str:
    """A --tokenizer_cache_dir folder: the CLIP tokenizer's files and the T5 tokenizer in its subfolder."""
    write_clip_tokenizer_files(out_dir, EOS_TOKEN)
    write_t5_tokenizer(our_folder(out_dir, "t5xxl"))
    return out_dir


def build_pipeline(models: FluxModels, tokenizer_dir: str):
    """A diffusers FluxPipeline of the tiny models."""
    from diffusers import FluxPipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    return FluxPipeline(
        scheduler=flux_files.release_scheduler(),
        vae=models.ae,
        text_encoder=models.clip_l,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        text_encoder_2=models.t5xxl,
        tokenizer_2=T5TokenizerFast.from_pretrained(our_folder(tokenizer_dir, "t5xxl")),
        transformer=models.transformer,
    )


def write_diffusers_folder(models: FluxModels, path: str, tokenizer_dir: str) -> str:
    """A diffusers FLUX folder (transformer, vae, text_encoder, text_encoder_2, both tokenizers, scheduler)."""
    build_pipeline(models, tokenizer_dir).save_pretrained(path, safe_serialization=True)
    return path


def write_tiny_flux(out_dir: str, seed: int = 0) -> dict[str, str]:
    """Write every format of the tiny dev-like model, a schnell-like transformer file and the tokenizer cache."""
    models = build_models(seed)
    os.makedirs(out_dir, exist_ok=True)
    tokenizers = write_tokenizer_cache(os.path.join(out_dir, "tokenizers"))
    paths = write_single_files(models, out_dir)
    schnell = build_models(seed, guidance_embeds=False).transformer
    paths["schnell"] = os.path.join(out_dir, "flux-schnell.safetensors")
    save_state_dict(transformer_file_state(schnell), paths["schnell"])
    paths["diffusers"] = write_diffusers_folder(models, os.path.join(out_dir, "flux-diffusers"), tokenizers)
    paths["tokenizers"] = tokenizers
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description="write a randomly initialised tiny FLUX.1 model in the real formats")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for kind, path in write_tiny_flux(args.out, args.seed).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()


def write_tiny(out_dir: str):
    """The registry builder (library/testing/families.py)."""
    from library.testing.families import TinyFamily

    files = write_tiny_flux(out_dir)
    return TinyFamily(
        "flux",
        ("--pretrained_model_name_or_path", files["transformer"], "--ae", files["ae"], "--clip_l", files["clip_l"],
         "--t5xxl", files["t5xxl"], "--tokenizer_cache_dir", files["tokenizers"]),
        ("--pretrained_model_name_or_path", files["diffusers"], "--tokenizer_cache_dir", files["tokenizers"]),
        {"network": "flux_train_network.py", "finetune": "flux_train.py"},
        fast_args=("--t5xxl_max_token_length", "16"),
        files=files,
    )  # fmt: skip
