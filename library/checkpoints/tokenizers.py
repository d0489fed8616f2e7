"""CLIP tokenizers: found locally (never an empty one), or rebuilt offline from the BPE merges of open-clip-torch.

SD 1.x uses OpenAI's CLIP ViT-L/14 tokenizer; SD 2.x uses the same vocabulary with "!" as padding token.
The vocabulary is fully determined by the 48,894 BPE merges, which the open-clip-torch package ships as
`bpe_simple_vocab_16e6.txt.gz`, so we can write standard `vocab.json` / `merges.txt` files without a hub.
"""

from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import logging
import os

from library.atomic import atomic_path
from library.checkpoints.tokenizer_cache import cache_folders
from library.errors import CheckpointError

logger = logging.getLogger(__name__)

CLIP_VOCAB_SIZE = 49408
CLIP_MERGE_COUNT = CLIP_VOCAB_SIZE - 256 * 2 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
SD1_TOKENIZER_REPO = "openai/clip-vit-large-patch14"
SD2_TOKENIZER_REPO = "stabilityai/stable-diffusion-2-1"


def byte_symbols() -> list[str]:
    """The 256 stand-in characters of byte-level BPE, in vocabulary order: printable bytes first, then the rest."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def _open_clip_bpe_path() -> str | None:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")
    return path if os.path.isfile(path) else None


def write_clip_tokenizer_files(out_dir: str, pad_token: str = EOS_TOKEN) -> str:
    """Write vocab.json, merges.txt and configs of the CLIP tokenizer into `out_dir`, rebuilt from open-clip-torch."""
    bpe_path = _open_clip_bpe_path()
    if bpe_path is None:
        raise CheckpointError(
            "No CLIP tokenizer found locally and open-clip-torch (which carries the CLIP BPE merges) is not "
            "installed. Install it with `pip install --no-deps open-clip-torch==3.3.0`, or pass "
            "--tokenizer_cache_dir pointing to a folder with a saved CLIP tokenizer."
        )
    with gzip.open(bpe_path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + CLIP_MERGE_COUNT]]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise CheckpointError(f"{bpe_path} gives {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n",
        "special_tokens_map.json": json.dumps(
            {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
        ),
        "tokenizer_config.json": json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": BOS_TOKEN,
                "eos_token": EOS_TOKEN,
                "unk_token": EOS_TOKEN,
                "pad_token": pad_token,
                "do_lower_case": True,
            }
        ),
    }
    os.makedirs(out_dir, exist_ok=True)
    for name, text in files.items():
        with atomic_path(os.path.join(out_dir, name)) as temp:
            with open(temp, "w", encoding="utf-8") as handle:
                handle.write(text)
    return out_dir


def _try_load(source: str, **kwargs):
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        logger.debug("no tokenizer at %s: %s", source, err)
        return None
    # Offline, a hub lookup can return a tokenizer without vocabulary instead of failing: never accept that.
    if len(tokenizer) < CLIP_VOCAB_SIZE or tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        logger.warning("ignoring the tokenizer at %s: it has only %d tokens", source, len(tokenizer))
        return None
    return tokenizer


def _with_pad_token(tokenizer, pad_token: str):
    if tokenizer.pad_token != pad_token:
        tokenizer.pad_token = pad_token
    return tokenizer


def _in_hub_cache(repo: str, subfolder: str | None) -> bool:
    """Whether the hub cache holds the repo's tokenizer (asking from_pretrained offline can build an empty one)."""
    from huggingface_hub import try_to_load_from_cache

    filename = f"{subfolder}/vocab.json" if subfolder else "vocab.json"
    return isinstance(try_to_load_from_cache(repo, filename), str)


def rebuilt_tokenizer_folder() -> str:
    """Where a CLIP tokenizer rebuilt from open-clip-torch is kept between runs without --tokenizer_cache_dir."""
    from huggingface_hub import constants

    return os.path.join(constants.HF_HOME, "diffusion-trainer", "clip_tokenizer")


def _from_folders(folders: list[str]):
    """The tokenizer of the first of `folders` with a vocab.json that loads and is not empty, else None."""
    for folder in folders:
        if os.path.isfile(os.path.join(folder, "vocab.json")):
            tokenizer = _try_load(folder)
            if tokenizer is not None:
                return tokenizer
    return None


def load_clip_tokenizer(v2: bool, model_dir: str | None = None, cache_dir: str | None = None):
    """The SD tokenizer, looked up in order: the diffusers folder, `cache_dir` (our layout, then sd-scripts'), the
    hub cache, open-clip-torch.

    With `cache_dir` given and holding none, the rebuilt tokenizer is saved at its top for the next run.
    """
    pad_token = "!" if v2 else EOS_TOKEN
    if model_dir is not None and os.path.isdir(os.path.join(model_dir, "tokenizer")):
        tokenizer = _try_load(os.path.join(model_dir, "tokenizer"))
        if tokenizer is not None:
            return tokenizer
    # The vocabulary is the same for SD 1.x and 2.x; only the padding token differs, so a shared cache folder or
    # the hub cache is used with the padding of the model at hand.
    kinds = ("clip_sd2", "clip_l") if v2 else ("clip_l", "clip_sd2")  # the other version's copy serves as well
    folders = dict.fromkeys(folder for kind in kinds for folder in cache_folders(cache_dir, kind))  # ordered, unique
    tokenizer = _from_folders(list(folders))
    if tokenizer is not None:
        return _with_pad_token(tokenizer, pad_token)
    repo, subfolder = (SD2_TOKENIZER_REPO, "tokenizer") if v2 else (SD1_TOKENIZER_REPO, None)
    if _in_hub_cache(repo, subfolder):
        kwargs = {"subfolder": subfolder} if subfolder else {}
        tokenizer = _try_load(repo, local_files_only=True, **kwargs)
        if tokenizer is not None:
            return _with_pad_token(tokenizer, pad_token)
    target = cache_dir or rebuilt_tokenizer_folder()
    if os.path.isfile(os.path.join(target, "vocab.json")):
        tokenizer = _try_load(target)
        if tokenizer is not None:
            return _with_pad_token(tokenizer, pad_token)
    logger.info("building the CLIP tokenizer from open-clip-torch's BPE merges into %s", target)
    write_clip_tokenizer_files(target, pad_token=pad_token)
    tokenizer = _try_load(target)
    if tokenizer is None:
        raise CheckpointError(f"the CLIP tokenizer written to {target} could not be loaded")
    return tokenizer


def load_clip_g_tokenizer(clip_l, model_dir: str | None = None, cache_dir: str | None = None):
    """The second CLIP tokenizer of SDXL / SD3 (OpenCLIP ViT-bigG): the diffusers folder's tokenizer_2/, else
    sd-scripts' copy in `cache_dir` or a copy of `clip_l` (the same vocabulary), padding with "!" as the releases'
    tokenizer_2/ does."""
    tokenizer = _from_folders([os.path.join(model_dir, "tokenizer_2")] if model_dir else [])
    if tokenizer is not None:
        return tokenizer
    # sd-scripts saves the hub repo's tokenizer as it is and sets the padding to "!" (id 0) after loading it
    tokenizer = _from_folders(cache_folders(cache_dir, "clip_g"))
    return _with_pad_token(copy.deepcopy(clip_l) if tokenizer is None else tokenizer, "!")
