"""Build a randomly initialised tiny Lumina Image 2.0 and write it as users download it: the transformer in the
released single-file layout, a Gemma2 file with the `model.` prefix, the FLUX.1-style `ae.safetensors`, a diffusers
Lumina2Pipeline folder, and an offline Gemma-style tokenizer folder built with `tokenizers`.

    python -m library.testing.tiny_lumina --out models/tiny_lumina
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import torch

from library.atomic import atomic_path, atomic_write_text
from library.checkpoints import flux_keys, lumina_configs, lumina_files, lumina_keys
from library.checkpoints.files import save_state_dict
from library.checkpoints.gemma_tokenizer import load_gemma_tokenizer
from library.testing import tiny_configs

# Words of the toy dataset's captions, sample prompts and the system prompts, so tokens are mostly whole words.
GEMMA_WORDS = ("a", "an", "the", "of", "and", "photo", "picture", "toy", "image", "painting", "red", "green", "blue",
               "yellow", "circle", "square", "triangle", "cat", "dog", "You", "are", "assistant", "designed", "to",
               "generate", "high", "quality", "images", "based", "on", "user", "prompts", "<Prompt",
               "Start>")  # fmt: skip
GEMMA_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # ids 0-4 as in Gemma
WORD_START = "▁"  # Gemma marks a space before a word with this character


def tiny_transformer_config() -> dict:
    """Next-DiT with the release's proportions: 4 layers (enough to swap 2 with --blocks_to_swap) and 1 refiner
    layer per stream, 24 wide (2 heads of 12 over 1 key/value head, rotary 4/4/4 like 32/32/32 of 96), 32-wide
    caption features, FFN as wide as 4x hidden."""
    return dict(
        lumina_configs.transformer_config(),
        hidden_size=24,
        num_layers=4,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=96,
        axes_dim_rope=(4, 4, 4),
        cap_feat_dim=32,
    )


def tiny_gemma2_config(vocab_size: int) -> dict:
    """Gemma2 32 wide, 2 layers, 2 heads over 1 key/value head of Gemma2-2B's 256 width (the file shows no head
    width, so the tiny one keeps the real one)."""
    return dict(
        lumina_configs.gemma2_config(),
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )


@dataclass
class LuminaModels:
    """The three models of a Lumina 2 setup."""

    transformer: torch.nn.Module
    gemma2: torch.nn.Module
    ae: torch.nn.Module


def gemma_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocabulary, BPE merges): Gemma's special ids, byte-fallback tokens, letters, and each word merged whole,
    with and without the word-start mark."""
    symbols = [f"<0x{byte:02X}>" for byte in range(256)] + sorted(set("".join(GEMMA_WORDS))) + [WORD_START]
    merges = []
    for start in (WORD_START, ""):  # word-start merges rank first, so " dog" becomes "▁dog", not "▁" + "dog"
        for word in GEMMA_WORDS:
            piece = start
            for char in word:
                if piece:
                    merges.append((piece, char))
                piece += char
                symbols.append(piece)
    vocab = {token: index for index, token in enumerate(GEMMA_SPECIAL)}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
    return vocab, list(dict.fromkeys(merges))


def write_gemma_tokenizer(out_dir: str) -> str:
    """A small Gemma-style BPE tokenizer (`tokenizer.json`, byte fallback, `<bos>` prepended) that GemmaTokenizer,
    GemmaTokenizerFast and AutoTokenizer load."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab, merges = gemma_vocab()
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", WORD_START)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tokenizer.decoder = decoders.Sequence([decoders.Replace(WORD_START, " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer.add_special_tokens(list(GEMMA_SPECIAL))
    os.makedirs(out_dir, exist_ok=True)
    with atomic_path(os.path.join(out_dir, "tokenizer.json")) as temp:
        tokenizer.save(temp)
    config = {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
              "unk_token": "<unk>", "mask_token": "<mask>", "add_bos_token": True, "add_eos_token": False,
              "model_max_length": 8192, "padding_side": "right"}  # fmt: skip
    atomic_write_text(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(config))
    return out_dir


def build_models(seed: int = 0) -> LuminaModels:
    """Randomly initialised tiny models, identical for the same seed."""
    from diffusers import AutoencoderKL, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    vocab_size = len(gemma_vocab()[0])
    torch.manual_seed(seed)
    transformer = Lumina2Transformer2DModel(**tiny_transformer_config())
    gemma2 = Gemma2Model(Gemma2Config(**tiny_gemma2_config(vocab_size)))
    ae = AutoencoderKL(**tiny_configs.tiny_flux_ae_config())
    for model in (transformer, gemma2, ae):
        model.eval()
    return LuminaModels(transformer, gemma2, ae)


def transformer_file_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The transformer in the released layout."""
    return lumina_keys.join_transformer(transformer.state_dict(), dict(transformer.config))


def write_single_files(models: LuminaModels, out_dir: str, name: str = "lumina-2") -> dict[str, str]:
    """`<name>.safetensors` (released layout), `gemma2.safetensors` (`model.` prefix, as ComfyUI's file) and
    `ae.safetensors`."""
    paths = {kind: os.path.join(out_dir, f"{stem}.safetensors") for kind, stem in
             (("transformer", name), ("gemma2", "gemma2"), ("ae", "ae"))}  # fmt: skip
    save_state_dict(transformer_file_state(models.transformer), paths["transformer"])
    layers = models.gemma2.config.num_hidden_layers
    save_state_dict(lumina_keys.join_gemma2(models.gemma2.state_dict(), layers), paths["gemma2"])
    save_state_dict(flux_keys.join_ae(models.ae.state_dict(), dict(models.ae.config)), paths["ae"])
    return paths


def write_diffusers_folder(models: LuminaModels, path: str, tokenizer_dir: str) -> str:
    """A diffusers Lumina2Pipeline folder (transformer, vae, text_encoder, tokenizer, scheduler)."""
    parts = {"transformer": models.transformer, "gemma2": models.gemma2, "ae": models.ae}
    lumina_files.save_diffusers_folder(parts, load_gemma_tokenizer(tokenizer_dir), path, safe=True)
    return path


def write_tiny_lumina(out_dir: str, seed: int = 0) -> dict[str, str]:
    """Write every format of the tiny model and its tokenizer folder; returns the paths by kind."""
    models = build_models(seed)
    os.makedirs(out_dir, exist_ok=True)
    paths = write_single_files(models, out_dir)
    paths["tokenizer"] = write_gemma_tokenizer(os.path.join(out_dir, "tokenizer"))
    paths["diffusers"] = write_diffusers_folder(models, os.path.join(out_dir, "lumina-diffusers"), paths["tokenizer"])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description="write a randomly initialised tiny Lumina Image 2.0 in real formats")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for kind, path in write_tiny_lumina(args.out, args.seed).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()


def write_tiny(out_dir: str):
    """The registry builder (library/testing/families.py)."""
    from library.testing.families import TinyFamily

    files = write_tiny_lumina(out_dir)
    return TinyFamily(
        "lumina",
        ("--pretrained_model_name_or_path", files["transformer"], "--gemma2", files["gemma2"], "--ae", files["ae"],
         "--gemma2_tokenizer", files["tokenizer"]),
        ("--pretrained_model_name_or_path", files["diffusers"]),
        {"network": "lumina_train_network.py", "finetune": "lumina_train.py"},
        fast_args=("--gemma2_max_token_length", "32"),
        files=files,
    )  # fmt: skip
