"""Tag every image of a folder with a WD14-style ONNX tagger; writes `<image stem>.txt` next to each image.

The model folder holds the `.onnx` file and `selected_tags.csv`; when they are missing they are downloaded once
from the Hugging Face repository --repo_id.
Usage: python finetune/tag_images_by_wd14_tagger.py --batch_size 4 train_data
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass

if __package__ in (None, ""):  # run as `python finetune/<tool>.py`: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2
import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from finetune.image_files import SkippedFiles, batched, check_unique_stems, list_images, load_all, side_file
from finetune.tool_entry import run_tool
from finetune.wd14_tags import (
    TagOptions,
    TagTable,
    append_to_existing,
    read_tag_table,
    select_tags,
    split_tag_list,
)
from library.atomic import atomic_write_text
from library.errors import CheckpointError, ConfigError, MissingPackageError

logger = logging.getLogger(__name__)

DEFAULT_REPO_ID = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
DEFAULT_INPUT_SIZE = 448  # the WD14 taggers' input side, used when the model does not fix it
ONNXRUNTIME_PIN = "onnxruntime==1.31.1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("train_data_dir", help="folder with the images to tag")
    parser.add_argument("--repo_id", default=DEFAULT_REPO_ID, help="Hugging Face repository to download from")
    parser.add_argument(
        "--model_dir", default="wd14_tagger_model", help=f"folder with {MODEL_FILE} and {TAGS_FILE} (downloaded here)"
    )
    parser.add_argument("--force_download", action="store_true", help="download the model again even if present")
    parser.add_argument("--batch_size", type=int, default=1, help="images per inference batch")
    parser.add_argument(
        "--max_data_loader_n_workers", type=int, default=None, help="processes that load images (default: none)"
    )
    parser.add_argument("--caption_extension", default=".txt", help="extension of the tag files (default .txt)")
    parser.add_argument("--thresh", type=float, default=0.35, help="confidence a tag needs (default 0.35)")
    parser.add_argument(
        "--general_threshold", type=float, default=None, help="confidence for general tags (default --thresh)"
    )
    parser.add_argument(
        "--character_threshold", type=float, default=None, help="confidence for character tags (default --thresh)"
    )
    parser.add_argument("--recursive", action="store_true", help="also tag images in subfolders")
    parser.add_argument(
        "--remove_underscore", action="store_true", help="write long_hair as 'long hair' (emoticons such as ^_^ stay)"
    )
    parser.add_argument("--undesired_tags", default="", help="tags never written, separated like the output")
    parser.add_argument("--character_tags_first", action="store_true", help="character tags before general tags")
    parser.add_argument(
        "--character_tag_expand", action="store_true", help="split 'name_(series)' into the tags 'name', 'series'"
    )
    parser.add_argument("--use_rating_tags", action="store_true", help="add the most likely rating tag first")
    parser.add_argument(
        "--use_rating_tags_as_last_tag", action="store_true", help="add the most likely rating tag last"
    )
    parser.add_argument(
        "--always_first_tags", default=None, help="tags put first when present, e.g. '1girl,1boy' (in this order)"
    )
    parser.add_argument("--caption_separator", default=", ", help="separator between tags (default ', ')")
    parser.add_argument(
        "--append_tags", action="store_true", help="keep the tags already in the tag file and add the new ones"
    )
    parser.add_argument("--frequency_tags", action="store_true", help="print how often each tag was written")
    return parser


@dataclass(frozen=True)
class TaggerRun:
    """Everything the tagging loop needs besides the model."""

    tag_options: TagOptions
    caption_extension: str
    caption_separator: str
    append_tags: bool
    batch_size: int
    workers: int | None


def tagger_run(args: argparse.Namespace) -> TaggerRun:
    """Check the options and turn them into a `TaggerRun` (before anything is loaded)."""
    for name in ("thresh", "general_threshold", "character_threshold"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"--{name} = {value} is invalid: expected a confidence between 0 and 1.")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size = {args.batch_size} is invalid: expected 1 or more.")
    if not args.caption_separator:
        raise ConfigError("--caption_separator must not be empty.")
    separator = args.caption_separator
    options = TagOptions(
        general_threshold=args.thresh if args.general_threshold is None else args.general_threshold,
        character_threshold=args.thresh if args.character_threshold is None else args.character_threshold,
        remove_underscore=args.remove_underscore,
        undesired_tags=frozenset(split_tag_list(args.undesired_tags, separator)),
        character_tags_first=args.character_tags_first,
        character_tag_expand=args.character_tag_expand,
        use_rating_tags=args.use_rating_tags or args.use_rating_tags_as_last_tag,
        use_rating_tags_as_last_tag=args.use_rating_tags_as_last_tag,
        always_first_tags=tuple(split_tag_list(args.always_first_tags or "", separator)),
    )
    return TaggerRun(
        options, args.caption_extension, separator, args.append_tags, args.batch_size, args.max_data_loader_n_workers
    )


# ---- the model -------------------------------------------------------------------------------------------------


def model_files(model_dir: str, repo_id: str, force_download: bool) -> tuple[str, str]:
    """Paths of the ONNX model and the tag list, downloading them from `repo_id` when missing or forced."""
    model_path = _find_onnx(model_dir)
    tags_path = os.path.join(model_dir, TAGS_FILE)
    if model_path is not None and os.path.isfile(tags_path) and not force_download:
        return model_path, tags_path
    logger.info("downloading %s and %s from %s into %s", MODEL_FILE, TAGS_FILE, repo_id, model_dir)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        for name in (MODEL_FILE, TAGS_FILE):
            hf_hub_download(repo_id, name, local_dir=model_dir, force_download=force_download)
    except (OSError, HfHubHTTPError) as err:
        raise CheckpointError(
            f"--model_dir {model_dir} has no {MODEL_FILE} and {TAGS_FILE}, and downloading them from --repo_id "
            f"{repo_id} failed ({type(err).__name__}). Put both files into the folder, or check the repository "
            "name and the connection."
        ) from None
    return os.path.join(model_dir, MODEL_FILE), tags_path


def _find_onnx(model_dir: str) -> str | None:
    """`model.onnx`, or the folder's only `.onnx` file."""
    if not os.path.isdir(model_dir):
        return None
    if os.path.isfile(os.path.join(model_dir, MODEL_FILE)):
        return os.path.join(model_dir, MODEL_FILE)
    found = sorted(name for name in os.listdir(model_dir) if name.lower().endswith(".onnx"))
    return os.path.join(model_dir, found[0]) if len(found) == 1 else None


@dataclass
class Tagger:
    """An ONNX tagger session with its input name and image size."""

    session: object
    input_name: str
    size: tuple[int, int]  # (width, height)
    table: TagTable

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) BGR float32 -> (B, N) tag probabilities."""
        output = self.session.run(None, {self.input_name: images})[0]
        if output.ndim != 2 or output.shape[1] != len(self.table.names):
            raise CheckpointError(
                f"the tagger gives {output.shape[-1]} outputs but {TAGS_FILE} lists {len(self.table.names)} tags: "
                "the model and the tag list do not belong together."
            )
        return output


def import_onnxruntime():
    """onnxruntime, or MissingPackageError; called before the model is downloaded, so a missing package costs no
    download."""
    try:
        import onnxruntime
    except ImportError:
        raise MissingPackageError(
            f"tagging needs onnxruntime: pip install {ONNXRUNTIME_PIN} (or onnxruntime-gpu for CUDA)."
        ) from None
    return onnxruntime


def load_tagger(model_path: str, tags_path: str) -> Tagger:
    """Open the ONNX model (on the GPU when onnxruntime has one) and read its tag list."""
    onnxruntime = import_onnxruntime()
    table = read_tag_table(tags_path)
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
    providers = [name for name in wanted if name in onnxruntime.get_available_providers()]
    try:
        session = onnxruntime.InferenceSession(model_path, providers=providers)
    except Exception as err:  # onnxruntime raises its own untyped errors for unreadable models
        raise CheckpointError(f"cannot load the tagger model {model_path}: {err}") from None
    model_input = session.get_inputs()[0]
    shape = model_input.shape  # [batch, height, width, 3]
    height = shape[1] if isinstance(shape[1], int) else DEFAULT_INPUT_SIZE
    width = shape[2] if isinstance(shape[2], int) else DEFAULT_INPUT_SIZE
    logger.info("tagger %s: %d tags, %dx%d input, %s", model_path, len(table.names), width, height, providers[0])
    return Tagger(session, model_input.name, (width, height), table)


def tagger_image(path: str, size: tuple[int, int]) -> np.ndarray:
    """The tagger's view of an image (H, W, 3) float32: upright, transparency on white, padded to a square with
    white, resized, channels in BGR order with values 0..255, as the WD14 models were trained."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        image.load()
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
    image = image.convert("RGB")
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    interpolation = cv2.INTER_AREA if side > max(size) else cv2.INTER_LANCZOS4
    pixels = cv2.resize(np.asarray(square), size, interpolation=interpolation)
    return np.ascontiguousarray(pixels[:, :, ::-1], dtype=np.float32)


# ---- tagging ---------------------------------------------------------------------------------------------------


def write_tags(image_path: str, tags: list[str], run: TaggerRun) -> list[str]:
    """Write the tag file of an image (after the existing tags with --append_tags); returns the tags written."""
    path = side_file(image_path, run.caption_extension)
    if run.append_tags and os.path.isfile(path):
        with open(path, encoding="utf-8-sig") as handle:
            existing = split_tag_list(handle.read(), run.caption_separator)
        tags = append_to_existing(existing, tags, run.tag_options)
    atomic_write_text(path, run.caption_separator.join(tags) + "\n")
    return tags


def tag_images(paths: list[str], tagger: Tagger, run: TaggerRun, skipped: SkippedFiles) -> Counter:
    """Tag every image; returns how often each tag was written."""
    frequencies: Counter = Counter()
    loaded = load_all(paths, functools.partial(tagger_image, size=tagger.size), run.workers)
    with tqdm(total=len(paths), desc="tagging", unit="image") as progress:
        for batch in batched(loaded, run.batch_size):
            good = [item for item in batch if item.error is None]
            for item in batch:
                if item.error is not None:
                    skipped.add(item.path, item.error)
            if good:
                probabilities = tagger.probabilities(np.stack([item.value for item in good]))  # (B, N)
                for item, row in zip(good, probabilities, strict=True):
                    written = write_tags(item.path, select_tags(row, tagger.table, run.tag_options), run)
                    frequencies.update(written)
            progress.update(len(batch))
    return frequencies


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, load the tagger, tag the folder."""
    args = build_parser().parse_args(argv)
    run = tagger_run(args)
    import_onnxruntime()
    paths = list_images(args.train_data_dir, args.recursive)
    check_unique_stems(paths)
    tagger = load_tagger(*model_files(args.model_dir, args.repo_id, args.force_download))
    skipped = SkippedFiles()
    frequencies = tag_images(paths, tagger, run, skipped)
    logger.info("tagged %d of %d images", len(paths) - len(skipped.entries), len(paths))
    skipped.report()
    if args.frequency_tags:
        print("tag frequencies:")  # asked for with --frequency_tags: the list is the product
        for tag, count in sorted(frequencies.items(), key=lambda item: (-item[1], item[0])):
            print(f"  {tag}: {count}")


if __name__ == "__main__":
    run_tool(main)
