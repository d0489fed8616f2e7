"""Tiny models for the finetune/ tool tests, built offline: a BLIP captioner and a WD14-style ONNX tagger."""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image

BLIP_WORDS = "a picture of red blue green circle square triangle with on the background toy shape girl".split()

# (name, category, probability for every image); category 9 = rating, 4 = character, 0 = general.
TAGGER_TAGS = [
    ("general", 9, 0.85),
    ("sensitive", 9, 0.2),
    ("questionable", 9, 0.05),
    ("explicit", 9, 0.01),
    ("1girl", 0, 0.95),
    ("long_hair", 0, 0.6),
    ("blue_eyes", 0, 0.4),
    ("smile", 0, 0.3),
    ("^_^", 0, 0.8),
    ("hatsune_miku", 4, 0.7),
    ("kaname_madoka_(mahou_shoujo)", 4, 0.5),
    ("solo", 0, 0.36),
]
RED_TAG = "red_theme"  # probability ~0.99 for red images, ~0.007 for blue ones: shows the BGR input order
TAGGER_SIDE = 32


def write_tiny_blip(out_dir: str, seed: int = 0) -> str:
    """A randomly initialised BLIP captioning model with a small BERT vocabulary, saved in transformers format."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration
    from transformers.models.blip import BlipImageProcessorPil

    os.makedirs(out_dir, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BLIP_WORDS, "[DEC]"]
    vocab_path = os.path.join(out_dir, "vocab.txt")
    with open(vocab_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab_path, bos_token="[DEC]")
    text = dict(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        encoder_hidden_size=32, max_position_embeddings=96, bos_token_id=len(vocab) - 1, pad_token_id=0,
        sep_token_id=3, eos_token_id=3,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    BlipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(out_dir)
    return out_dir


class _TinyTagger(torch.nn.Module):
    """Probabilities from the mean colour: fixed per tag, except RED_TAG which follows the red channel."""

    def __init__(self):
        super().__init__()
        probabilities = torch.tensor([p for _, _, p in TAGGER_TAGS] + [0.5])
        self.head = torch.nn.Linear(3, len(probabilities))
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(torch.logit(probabilities))
            self.head.weight[-1, 2] = 10.0  # input is BGR: channel 2 is red
            self.head.bias[-1] = -5.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, H, W, 3) BGR 0..255 -> (B, N)
        return torch.sigmoid(self.head(images.mean(dim=(1, 2)) / 255.0))


def write_tiny_tagger(out_dir: str) -> str:
    """A WD14-layout model folder: `model.onnx` (NHWC input, fixed side) and `selected_tags.csv`."""
    os.makedirs(out_dir, exist_ok=True)
    example = torch.zeros(1, TAGGER_SIDE, TAGGER_SIDE, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but needs only `onnx`, and is fast
        torch.onnx.export(
            _TinyTagger().eval(), (example,), os.path.join(out_dir, "model.onnx"), dynamo=False,
            input_names=["input_1"], output_names=["predictions_sigmoid"], dynamic_axes={"input_1": {0: "batch"}},
        )
    rows = ["tag_id,name,category,count"]
    rows += [f"{index},{name},{category},100" for index, (name, category, _) in enumerate(TAGGER_TAGS)]
    rows.append(f"{len(TAGGER_TAGS)},{RED_TAG},0,100")
    with open(os.path.join(out_dir, "selected_tags.csv"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(rows) + "\n")
    return out_dir


def write_solid_images(folder: str, colors: dict[str, tuple[int, int, int]], size=(48, 32)) -> list[str]:
    """One solid-colour PNG per name; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, color in colors.items():
        path = os.path.join(folder, f"{name}.png")
        Image.fromarray(np.full((size[1], size[0], 3), color, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def write_broken_image(folder: str, name: str = "broken.png") -> str:
    """A file with an image extension that is not an image."""
    path = os.path.join(folder, name)
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\nthis is not a png")
    return path
