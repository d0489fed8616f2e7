"""Sort images into aspect-ratio buckets, encode each with the VAE of an SD model and save the latents.

Writes `<image stem>.npz` next to every image (`latents`: raw VAE latents (C, h, w) float32, `original_size`:
(width, height), `crop_ltrb`: the crop in the resized image), `<image stem>_flip.npz` with --flip_aug, and the
metadata with each image's `train_resolution` [width, height].
Usage: python finetune/prepare_buckets_latents.py --full_path train_data meta_clean.json meta_lat.json model.ckpt
           --batch_size 4 --max_resolution 512,512 --mixed_precision no
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import zipfile
from dataclasses import dataclass

if __package__ in (None, ""):  # run as `python finetune/<tool>.py`: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from tqdm import tqdm

from finetune.image_files import (
    Loaded,
    SkippedFiles,
    check_unique_stems,
    image_key,
    list_images,
    load_all,
    shorten,
    side_file,
)
from finetune.metadata_io import read_metadata, write_metadata
from finetune.tool_entry import run_tool
from library.atomic import atomic_path
from library.checkpoints.files import add_checkpoint_arguments
from library.data.buckets import assign_buckets
from library.data.images import load_image, read_image_size
from library.data.transforms import resize_and_crop
from library.errors import ConfigError, DatasetError, UserError

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("train_data_dir", help="folder with the images")
    parser.add_argument("in_json", help="metadata file to read (from the merge and clean tools)")
    parser.add_argument("out_json", help="metadata file to write, with train_resolution (may be in_json itself)")
    parser.add_argument("model_name_or_path", help="SD 1.x/2.x checkpoint file or diffusers folder whose VAE is used")
    parser.add_argument("--v2", action="store_true", help="the model is SD 2.x")
    parser.add_argument("--vae", default=None, help="use this VAE (file or diffusers folder) instead of the model's")
    add_checkpoint_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=1, help="images encoded together (default 1)")
    parser.add_argument(
        "--max_data_loader_n_workers", type=int, default=None, help="processes that load images (default: none)"
    )
    parser.add_argument(
        "--max_resolution", default="512,512", help="training resolution 'width,height' (default 512,512)"
    )
    parser.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side (default 256)")
    parser.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side (default 1024)")
    parser.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket sides are multiples of this")
    parser.add_argument(
        "--bucket_no_upscale", action="store_true", help="never enlarge an image: small images get their own bucket"
    )
    parser.add_argument(
        "--mixed_precision", choices=sorted(WEIGHT_DTYPES), default="no", help="VAE precision (default no = fp32)"
    )
    parser.add_argument("--full_path", action="store_true", help="the metadata keys are absolute image paths")
    parser.add_argument("--flip_aug", action="store_true", help="also save latents of the mirrored image")
    parser.add_argument(
        "--skip_existing", action="store_true", help="keep .npz files that already hold latents of the right size"
    )
    parser.add_argument("--recursive", action="store_true", help="also use images in subfolders")
    return parser


@dataclass(frozen=True)
class BucketOptions:
    """The bucket options, checked like the dataset config checks the same options."""

    resolution: tuple[int, int]  # (width, height)
    min_reso: int
    max_reso: int
    steps: int
    no_upscale: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BucketOptions:
        options = cls(
            _parse_resolution(args.max_resolution),
            args.min_bucket_reso,
            args.max_bucket_reso,
            args.bucket_reso_steps,
            args.bucket_no_upscale,
        )
        if options.steps < 1:
            raise ConfigError(f"--bucket_reso_steps = {options.steps} is invalid: expected 1 or more.")
        for name, value in (("--min_bucket_reso", options.min_reso), ("--max_bucket_reso", options.max_reso)):
            if value < 1 or value % options.steps:
                raise ConfigError(f"{name} = {value} is invalid: expected a multiple of --bucket_reso_steps.")
        if options.min_reso > min(options.resolution) or options.max_reso < max(options.resolution):
            raise ConfigError(
                f"buckets --min_bucket_reso {options.min_reso} .. --max_bucket_reso {options.max_reso} must include "
                f"--max_resolution {args.max_resolution}; lower --min_bucket_reso or raise --max_bucket_reso."
            )
        return options


def _parse_resolution(text: str) -> tuple[int, int]:
    """'512,768' -> (512, 768); '512' -> (512, 512)."""
    parts = [part.strip() for part in text.split(",")]
    try:
        sides = [int(part) for part in parts]
    except ValueError:
        sides = []
    if len(sides) == 1:
        sides *= 2
    if len(sides) != 2 or min(sides) < 1:
        raise ConfigError(f"--max_resolution {text!r} is invalid: expected 'width,height' such as 512,512.")
    return sides[0], sides[1]


@dataclass(frozen=True)
class SourceOptions:
    """Where the images and their metadata come from."""

    train_data_dir: str
    in_json: str
    full_path: bool
    recursive: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SourceOptions:
        return cls(args.train_data_dir, args.in_json, args.full_path, args.recursive)


@dataclass(frozen=True)
class ModelOptions:
    """Which VAE encodes, and in which precision."""

    model_name_or_path: str
    v2: bool
    vae: str | None
    allow_pickle: bool
    mixed_precision: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelOptions:
        return cls(args.model_name_or_path, args.v2, args.vae, args.allow_pickle, args.mixed_precision)


@dataclass(frozen=True)
class EncodeOptions:
    """How the images are fed to the VAE."""

    batch_size: int
    workers: int | None
    flip_aug: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EncodeOptions:
        if args.batch_size < 1:
            raise ConfigError(f"--batch_size = {args.batch_size} is invalid: expected 1 or more.")
        return cls(args.batch_size, args.max_data_loader_n_workers, args.flip_aug)


# ---- planning ----------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """The images to encode, with their metadata keys and buckets."""

    paths: list[str]
    keys: list[str]
    sizes: np.ndarray  # (N, 2) [width, height] as displayed
    buckets: np.ndarray  # (K, 2) [width, height]
    bucket_of_image: np.ndarray  # (N,)

    def bucket(self, index: int) -> tuple[int, int]:
        width, height = self.buckets[self.bucket_of_image[index]]
        return int(width), int(height)


def plan_images(source: SourceOptions, metadata: dict, options: BucketOptions, skipped: SkippedFiles) -> Plan:
    """List the images that have a metadata entry, read their sizes and assign buckets."""
    paths = list_images(source.train_data_dir, source.recursive)
    check_unique_stems(paths)
    keys = [image_key(path, source.train_data_dir, source.full_path) for path in paths]
    chosen = [(path, key) for path, key in zip(paths, keys, strict=True) if key in metadata]
    if not chosen:
        raise DatasetError(
            f"none of the {len(paths)} images in {source.train_data_dir} has an entry in {source.in_json} (first key "
            f"looked for: {keys[0]!r}); was the metadata written {'without' if source.full_path else 'with'} "
            "--full_path? Use the same setting here."
        )
    if len(chosen) < len(paths):
        absent = [path for path, key in zip(paths, keys, strict=True) if key not in metadata]
        logger.warning(
            "%d image(s) have no entry in %s and are left out: %s", len(absent), source.in_json, shorten(absent)
        )
    readable, sizes = [], []
    for path, key in tqdm(chosen, desc="reading image sizes", unit="image"):
        try:
            sizes.append(read_image_size(path))
            readable.append((path, key))
        except UserError as err:
            skipped.add(path, str(err))
    if not readable:
        raise DatasetError(f"none of the images in {source.train_data_dir} could be read.")
    size_array = np.array(sizes, dtype=np.int64).reshape(-1, 2)
    buckets, bucket_of_image = assign_buckets(
        size_array, options.resolution, True, options.no_upscale, options.min_reso, options.max_reso, options.steps
    )
    return Plan([p for p, _ in readable], [k for _, k in readable], size_array, buckets, bucket_of_image)


def bucket_summary(plan: Plan) -> str:
    """Images per bucket and the mean aspect-ratio error of the assignment."""
    counts = np.bincount(plan.bucket_of_image, minlength=len(plan.buckets))
    lines = [f"{len(plan.paths)} images in {int((counts > 0).sum())} buckets (width x height: images):"]
    lines += [
        f"  {w}x{h}: {count}" for (w, h), count in zip(plan.buckets.tolist(), counts.tolist(), strict=True) if count
    ]
    image_ratios = plan.sizes[:, 0] / plan.sizes[:, 1]
    bucket_ratios = plan.buckets[plan.bucket_of_image, 0] / plan.buckets[plan.bucket_of_image, 1]
    lines.append(f"mean aspect ratio error: {np.abs(image_ratios - bucket_ratios).mean():.4f}")
    return "\n".join(lines)


def has_latents(npz_path: str, shape: tuple[int, int]) -> bool:
    """Whether `npz_path` exists and holds latents of spatial size `shape` (h, w)."""
    if not os.path.isfile(npz_path):
        return False
    try:
        with np.load(npz_path) as data:
            return "latents" in data and tuple(data["latents"].shape[1:]) == shape
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False


# ---- encoding ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cropped:
    """An image resized and cropped to its bucket."""

    pixels: np.ndarray  # (H, W, 3) uint8
    original_size: tuple[int, int]  # (width, height)
    crop_ltrb: tuple[int, int, int, int]


def load_cropped(path: str, targets: dict[str, tuple[int, int]]) -> Cropped:
    """Decode `path` and cover-resize and centre-crop it to its bucket, as the dataset engine does."""
    image = load_image(path)
    width, height = targets[path]
    pixels, (top, left) = resize_and_crop(image, (width, height))
    return Cropped(pixels, (image.shape[1], image.shape[0]), (left, top, left + width, top + height))


def save_latents(path: str, latents: np.ndarray, cropped: Cropped) -> None:
    """Write one .npz atomically."""
    with atomic_path(path) as temp:
        np.savez(
            temp,
            latents=latents,
            original_size=np.array(cropped.original_size, dtype=np.int64),
            crop_ltrb=np.array(cropped.crop_ltrb, dtype=np.int64),
        )


class LatentEncoder:
    """The VAE of the model, through the `sd` family's loader and encoder."""

    def __init__(self, options: ModelOptions):
        import torch

        from library.families.sd import SDFamily

        # Through the family's own parser, so every family option gets its default.
        parser = argparse.ArgumentParser(allow_abbrev=False)
        SDFamily.add_arguments(parser)
        add_checkpoint_arguments(parser)
        family_argv = ["--pretrained_model_name_or_path", options.model_name_or_path]
        family_argv += ["--v2"] * options.v2 + ["--allow_pickle"] * options.allow_pickle
        family_argv += ["--vae", options.vae] if options.vae else []
        self.family = SDFamily(parser.parse_args(family_argv))
        self.family.validate()
        self.models = self.family.load(getattr(torch, WEIGHT_DTYPES[options.mixed_precision]))
        self.models.vae.to("cuda" if torch.cuda.is_available() else "cpu")
        vae_config = self.models.vae.config
        self.factor = 2 ** (len(vae_config.block_out_channels) - 1)

    def encode(self, batch: list[np.ndarray]) -> np.ndarray:
        """RGB crops (B, H, W, 3) uint8 of one bucket -> raw latents (B, C, H/f, W/f) float32."""
        import torch

        images = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)
        with torch.no_grad():
            latents = self.family.encode_images(self.models, images)
        return latents.float().cpu().numpy()


def encode_all(
    plan: Plan, indices: list[int], encoder: LatentEncoder, options: EncodeOptions, skipped: SkippedFiles
) -> list[int]:
    """Encode the images `indices` bucket by bucket; returns the indices whose latents were written."""
    indices = sorted(indices, key=lambda i: int(plan.bucket_of_image[i]))  # batches never mix buckets
    paths = [plan.paths[i] for i in indices]
    targets = {plan.paths[i]: plan.bucket(i) for i in indices}
    index_of = {plan.paths[i]: i for i in indices}
    written: list[int] = []
    batch: list[Loaded] = []
    with tqdm(total=len(indices), desc="encoding latents", unit="image") as progress:
        for item in load_all(paths, functools.partial(load_cropped, targets=targets), options.workers):
            if item.error is not None:
                skipped.add(item.path, item.error)
                progress.update(1)
                continue
            if batch and (targets[batch[0].path] != targets[item.path] or len(batch) == options.batch_size):
                written += _encode_batch(batch, encoder, options.flip_aug, index_of, progress)
                batch = []
            batch.append(item)
        if batch:
            written += _encode_batch(batch, encoder, options.flip_aug, index_of, progress)
    return written


def _encode_batch(batch: list[Loaded], encoder: LatentEncoder, flip: bool, index_of: dict, progress) -> list[int]:
    crops = [item.value for item in batch]
    latents = encoder.encode([crop.pixels for crop in crops])  # (B, C, h, w)
    flipped = encoder.encode([crop.pixels[:, ::-1] for crop in crops]) if flip else None
    for position, (item, crop) in enumerate(zip(batch, crops, strict=True)):
        save_latents(side_file(item.path, ".npz"), latents[position], crop)
        if flipped is not None:
            save_latents(side_file(item.path, "_flip.npz"), flipped[position], crop)
    progress.update(len(batch))
    return [index_of[item.path] for item in batch]


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, plan the buckets, encode, write the metadata."""
    args = build_parser().parse_args(argv)
    buckets, source = BucketOptions.from_args(args), SourceOptions.from_args(args)
    encoding, model = EncodeOptions.from_args(args), ModelOptions.from_args(args)
    metadata = read_metadata(source.in_json, "in_json")
    skipped = SkippedFiles()
    plan = plan_images(source, metadata, buckets, skipped)
    print(bucket_summary(plan))  # the bucket summary is part of what this tool reports
    encoder = LatentEncoder(model)
    todo, done = list(range(len(plan.paths))), []
    if args.skip_existing:
        todo, done = _split_existing(plan, encoder.factor, encoding.flip_aug)
        logger.info("--skip_existing: %d images already have latents of their bucket size", len(done))
    done += encode_all(plan, todo, encoder, encoding, skipped)
    for index in sorted(done):
        metadata[plan.keys[index]]["train_resolution"] = list(plan.bucket(index))
    skipped.report()
    write_metadata(args.out_json, metadata)


def _split_existing(plan: Plan, factor: int, flip: bool) -> tuple[list[int], list[int]]:
    """Image indices still to encode, and those whose .npz (and _flip.npz with flip) already fit their bucket."""
    todo, done = [], []
    for index, path in enumerate(plan.paths):
        width, height = plan.bucket(index)
        shape = (height // factor, width // factor)
        present = has_latents(side_file(path, ".npz"), shape)
        present = present and (not flip or has_latents(side_file(path, "_flip.npz"), shape))
        (done if present else todo).append(index)
    return todo, done


if __name__ == "__main__":
    run_tool(main)
