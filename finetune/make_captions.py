"""Caption every image of a folder with BLIP; writes `<image stem>.caption` next to each image.

The model is a BLIP captioning model in transformers format: a local folder or a Hugging Face model id.
Usage: python finetune/make_captions.py --batch_size 8 train_data
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from dataclasses import dataclass
from typing import Any

if __package__ in (None, ""):  # run as `python finetune/<tool>.py`: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from tqdm import tqdm

from finetune.image_files import SkippedFiles, batched, check_unique_stems, list_images, load_all, side_file
from finetune.tool_entry import run_tool
from library.atomic import atomic_write_text
from library.data.images import load_image
from library.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

DEFAULT_CAPTION_WEIGHTS = "Salesforce/blip-image-captioning-large"
# The BLIP captioning weights were fine-tuned to continue this prefix; it is given to the model and cut from the
# output, as the BLIP authors do.
CAPTION_PROMPT = "a picture of "
SAMPLING_REPETITION_PENALTY = 1.1  # the BLIP reference sampler's value; beam search uses none


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("train_data_dir", help="folder with the images to caption")
    parser.add_argument(
        "--caption_weights",
        default=DEFAULT_CAPTION_WEIGHTS,
        help=f"BLIP captioning model: a local transformers folder or a hub id (default {DEFAULT_CAPTION_WEIGHTS})",
    )
    parser.add_argument("--caption_extension", default=".caption", help="extension of the caption files")
    parser.add_argument("--beam_search", action="store_true", help="beam search (no randomness) instead of sampling")
    parser.add_argument("--num_beams", type=int, default=1, help="beams of --beam_search (default 1)")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling: keep this probability mass")
    parser.add_argument("--max_length", type=int, default=75, help="most tokens of a caption (default 75)")
    parser.add_argument("--min_length", type=int, default=5, help="fewest tokens of a caption (default 5)")
    parser.add_argument("--batch_size", type=int, default=1, help="images per batch")
    parser.add_argument(
        "--max_data_loader_n_workers", type=int, default=None, help="processes that load images (default: none)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random seed of the sampling; without it each run samples differently (the seed used is logged)",
    )
    parser.add_argument("--recursive", action="store_true", help="also caption images in subfolders")
    parser.add_argument("--debug", action="store_true", help="print each caption with its image")
    return parser


@dataclass(frozen=True)
class GenerationOptions:
    """How captions are decoded."""

    beam_search: bool
    num_beams: int
    top_p: float
    max_length: int
    min_length: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> GenerationOptions:
        if args.num_beams < 1 or args.batch_size < 1:
            raise ConfigError("--num_beams and --batch_size must be 1 or more.")
        if not 0.0 < args.top_p <= 1.0:
            raise ConfigError(f"--top_p = {args.top_p} is invalid: expected a probability in (0, 1].")
        if not 0 <= args.min_length <= args.max_length or args.max_length < 1:
            raise ConfigError(
                f"--min_length {args.min_length} / --max_length {args.max_length}: expected 0 <= min <= max, max >= 1."
            )
        return cls(args.beam_search, args.num_beams, args.top_p, args.max_length, args.min_length)

    def generate_kwargs(self) -> dict[str, Any]:
        lengths = {"max_new_tokens": self.max_length, "min_new_tokens": self.min_length}
        if self.beam_search:
            return {"do_sample": False, "num_beams": self.num_beams, **lengths}
        return {"do_sample": True, "top_p": self.top_p, "repetition_penalty": SAMPLING_REPETITION_PENALTY, **lengths}


@dataclass(frozen=True)
class CaptionRun:
    """How images are read and captions written."""

    caption_extension: str
    batch_size: int
    workers: int | None
    debug: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CaptionRun:
        return cls(args.caption_extension, args.batch_size, args.max_data_loader_n_workers, args.debug)


@dataclass
class Captioner:
    """A BLIP captioning model with its tokenizer and image processor."""

    model: Any
    tokenizer: Any
    image_processor: Any

    def captions(self, images: list[np.ndarray], options: GenerationOptions) -> list[str]:
        """Captions of RGB images (H, W, 3) uint8, without the prompt."""
        import torch

        device = self.model.device
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]  # (B, 3, H, W)
        prompt = self.tokenizer([CAPTION_PROMPT] * len(images), return_tensors="pt").input_ids  # (B, P)
        with torch.no_grad():
            output = self.model.generate(
                pixel_values=pixel_values.to(device, self.model.dtype),
                input_ids=prompt.to(device),
                **options.generate_kwargs(),
            )
        # BLIP's generate drops the prompt's final [SEP]; the rest of the prompt leads every output.
        texts = self.tokenizer.batch_decode(output[:, prompt.shape[1] - 1 :], skip_special_tokens=True)
        return [text.strip() for text in texts]


def load_captioner(source: str) -> Captioner:
    """Load the BLIP model (GPU when available), its tokenizer and its image processor from `source`."""
    import torch
    from transformers import AutoTokenizer, BlipForConditionalGeneration
    from transformers.models.blip import BlipImageProcessorPil  # the default BLIP processor needs torchvision

    if os.path.isfile(source) or source.startswith(("http://", "https://")):
        raise CheckpointError(
            f"--caption_weights {source}: expected a BLIP captioning model in transformers format (a folder with "
            f"config.json, or a hub id such as {DEFAULT_CAPTION_WEIGHTS}); original BLIP .pth files are not read."
        )
    local = os.path.isdir(source)
    looks_like_path = os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1 or "\\" in source
    if looks_like_path and not local:
        raise CheckpointError(f"--caption_weights {source}: folder not found.")
    try:
        model = BlipForConditionalGeneration.from_pretrained(source, local_files_only=local)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        image_processor = BlipImageProcessorPil.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"--caption_weights {source}: cannot load a BLIP captioning model: {err}") from None
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    logger.info("BLIP model %s on %s", source, model.device)
    return Captioner(model, tokenizer, image_processor)


def caption_images(paths: list[str], captioner: Captioner, run: CaptionRun, options: GenerationOptions) -> SkippedFiles:
    """Caption and write every image; returns the images that could not be used."""
    skipped = SkippedFiles()
    loaded = load_all(paths, load_image, run.workers)
    with tqdm(total=len(paths), desc="captioning", unit="image") as progress:
        for batch in batched(loaded, run.batch_size):
            for item in batch:
                if item.error is not None:
                    skipped.add(item.path, item.error)
            good = [item for item in batch if item.error is None]
            captions = captioner.captions([item.value for item in good], options) if good else []
            for item, caption in zip(good, captions, strict=True):
                if not caption:
                    skipped.add(item.path, "the model produced an empty caption")
                    continue
                atomic_write_text(side_file(item.path, run.caption_extension), caption + "\n")
                if run.debug:
                    tqdm.write(f"{item.path}: {caption}")
            progress.update(len(batch))
    return skipped


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, load BLIP, caption the folder."""
    args = build_parser().parse_args(argv)
    options = GenerationOptions.from_args(args)
    paths = list_images(args.train_data_dir, args.recursive)
    check_unique_stems(paths)
    captioner = load_captioner(args.caption_weights)
    import torch

    seed = args.seed if args.seed is not None else random.randint(0, 2**31 - 1)
    torch.manual_seed(seed)
    if not options.beam_search:
        logger.info("sampling with seed %d%s", seed, "" if args.seed is not None else " (pass --seed to repeat it)")
    skipped = caption_images(paths, captioner, CaptionRun.from_args(args), options)
    logger.info("captioned %d of %d images", len(paths) - len(skipped.entries), len(paths))
    skipped.report()


if __name__ == "__main__":
    run_tool(main)
