"""Method `textual_inversion`: learn the embedding vectors of a new word (--token_string); every model stays frozen.

The new tokens are added to the tokenizer and get their own trainable vectors beside the frozen token-embedding
table, so the rest of the text encoder cannot change. The result is an embedding file that AUTOMATIC1111, ComfyUI
(`emb_params`) and diffusers (`load_textual_inversion`) load.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
from dataclasses import dataclass

import torch

from library.atomic import atomic_path
from library.checkpoints.files import load_state_dict, save_state_dict
from library.errors import CheckpointError, ConfigError
from library.families.base import LoadedModels, ModelFamily
from library.methods.base import MethodOptions, TrainingMethod

logger = logging.getLogger(__name__)

SAVE_FORMATS = ("safetensors", "pt", "ckpt")
SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: None}
EMBEDDING_KEY = "emb_params"  # the key AUTOMATIC1111 and ComfyUI read from a safetensors embedding
A1111_PLACEHOLDER_ID = 265  # AUTOMATIC1111's legacy "*" token id in .pt embeddings

# Caption templates: "{}" stands for the token string. Objects describe how a thing is shown, styles how a
# picture is made, so the embedding learns the subject or the look respectively.
OBJECT_TEMPLATES = (
    "a photo of {}",
    "a picture showing {}",
    "{} on a plain background",
    "{} seen up close",
    "a snapshot of {} in daylight",
    "a well-lit photograph of {}",
    "{} photographed from the side",
    "a low-light shot of {}",
    "a sharp, detailed image of {}",
    "a slightly blurry photo of {}",
    "{} in the middle of the frame",
    "a small {} in a wide shot",
    "a cropped image of {}",
    "an image featuring {}",
)
STYLE_TEMPLATES = (
    "art in the style of {}",
    "a painting made in the {} style",
    "an illustration, {} style",
    "a drawing in the manner of {}",
    "artwork by {}",
    "a landscape painted in the style of {}",
    "a portrait in the style of {}",
    "a still life in the style of {}",
    "{} style artwork",
    "a sketch in the style of {}",
    "a picture rendered in the {} style",
    "a detailed work in the style of {}",
)


class AddedTokenEmbedding(torch.nn.Module):
    """A token embedding whose ids from the base vocabulary size on map to trainable vectors; the base is frozen."""

    def __init__(self, base: torch.nn.Embedding, vectors: torch.Tensor):
        super().__init__()
        self.base = base
        self.vocab_size = base.num_embeddings
        self.vectors = torch.nn.Parameter(vectors)  # (N, D)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        base = self.base(input_ids.clamp(max=self.vocab_size - 1))  # (B, L, D)
        added = self.vectors[(input_ids - self.vocab_size).clamp(min=0)]  # (B, L, D)
        return torch.where((input_ids >= self.vocab_size).unsqueeze(-1), added.to(base.dtype), base)


def token_names(token_string: str, count: int) -> list[str]:
    """The tokens a word of `count` vectors is spelt with: the word itself, then the word with 1, 2, ..."""
    return [token_string] + [f"{token_string}{index}" for index in range(1, count)]


def read_embedding(path: str) -> torch.Tensor:
    """The vectors (N, D) of an embedding file: safetensors (one tensor, e.g. `emb_params`) or AUTOMATIC1111 .pt."""
    if path.lower().endswith(".safetensors"):
        tensors = load_state_dict(path)
        if EMBEDDING_KEY in tensors:
            return tensors[EMBEDDING_KEY]
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        raise CheckpointError(f"--weights {path}: expected one tensor or {EMBEDDING_KEY!r}, found {sorted(tensors)}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several error types for unreadable or unsafe files
        raise CheckpointError(f"--weights {path} is not a readable embedding file: {err}") from err
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):
        return next(iter(data["string_to_param"].values()))
    raise CheckpointError(f"--weights {path}: not an embedding (no 'string_to_param' or {EMBEDDING_KEY!r})")


@dataclass(frozen=True)
class TextualInversionOptions(MethodOptions):
    """The typed options of textual inversion."""

    token_string: str | None
    init_word: str | None
    num_vectors_per_token: int
    use_object_template: bool
    use_style_template: bool
    weights: str | None
    learning_rate: float
    save_model_as: str
    save_precision: str | None


class TextualInversionMethod(TrainingMethod):
    """Train new token embeddings for --token_string."""

    name = "textual_inversion"
    adapter = "textual-inversion"
    options_class = TextualInversionOptions

    @classmethod
    def default_options(cls) -> dict:
        # A handful of embedding vectors learns nothing at full-model rates (the shared default is 2e-6).
        return {"learning_rate": 5e-3}

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.embedding: AddedTokenEmbedding | None = None
        self.models: LoadedModels | None = None
        self.start_vectors: torch.Tensor | None = None
        self.rng = random.Random(0)
        self.warned_missing_token = False
        self.weighted_captions = getattr(args, "weighted_captions", False)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--token_string", type=str, default=None, help="the new word to learn; captions must contain it"
        )
        parser.add_argument(
            "--init_word", type=str, default=None, help="start the new vectors from this word's token embeddings"
        )
        parser.add_argument(
            "--num_vectors_per_token", type=int, default=1, help="embedding vectors the new word stands for"
        )
        parser.add_argument(
            "--use_object_template",
            action="store_true",
            help="ignore the captions and use sentences describing an object (e.g. 'a photo of <token>')",
        )
        parser.add_argument(
            "--use_style_template",
            action="store_true",
            help="ignore the captions and use sentences describing a style (e.g. 'art in the style of <token>')",
        )
        parser.add_argument("--weights", type=str, default=None, help="continue from this saved embedding file")
        parser.add_argument(
            "--save_model_as",
            type=str,
            default="safetensors",
            choices=SAVE_FORMATS,
            help="embedding file format: safetensors (key emb_params), or pt / ckpt in AUTOMATIC1111's layout",
        )

    def validate(self) -> None:
        args = self.options
        if not args.token_string or not args.token_string.strip() or " " in args.token_string.strip():
            raise ConfigError("--token_string is required: one new word without spaces, e.g. --token_string mychar4")
        if args.num_vectors_per_token < 1:
            raise ConfigError(f"--num_vectors_per_token must be 1 or more, got {args.num_vectors_per_token}")
        if args.use_object_template and args.use_style_template:
            raise ConfigError("--use_object_template and --use_style_template exclude each other; choose one")
        if self.weighted_captions:
            raise ConfigError(
                "--weighted_captions does not work with textual inversion: the learned token's vectors stand in the "
                "caption as plain tokens; remove --weighted_captions (or the brackets from the captions)"
            )
        if args.init_word is not None and not args.init_word.strip():
            raise ConfigError("--init_word is empty; give a word whose meaning is close to what you teach")
        if args.weights is not None:
            if not os.path.isfile(args.weights):
                raise ConfigError(f"--weights: file not found: {args.weights}")
            self.start_vectors = self.read_start_vectors(args.weights)
            vectors = self.start_vectors
            if vectors.ndim != self.vector_dims or vectors.shape[-2] != args.num_vectors_per_token:
                raise ConfigError(
                    f"--weights {args.weights} holds {tuple(self.start_vectors.shape)} vectors but "
                    f"--num_vectors_per_token is {args.num_vectors_per_token}; make them match"
                )

    vector_dims = 2  # the start vectors of --weights: (vectors per token, width)

    @staticmethod
    def read_start_vectors(path: str) -> torch.Tensor:
        """The vectors of a --weights file."""
        return read_embedding(path)

    @property
    def trains_text_encoder(self) -> bool:
        return True  # gradients must flow through the (frozen) text encoder to the new vectors

    @property
    def tokens(self) -> list[str]:
        return token_names(self.options.token_string.strip(), self.options.num_vectors_per_token)

    def setup(self, family: ModelFamily, models: LoadedModels) -> list[dict]:
        if len(models.text_encoders) != 1:
            raise ConfigError(f"textual inversion supports one text encoder; the {family.id} family has more")
        self.models = models
        tokenizer, encoder = models.tokenizers[0], models.text_encoders[0]
        self._add_tokens(tokenizer)
        base = encoder.get_input_embeddings()
        vectors = self._initial_vectors(tokenizer, base.weight.detach()).to(base.weight.device)
        self.embedding = AddedTokenEmbedding(base, vectors)
        encoder.set_input_embeddings(self.embedding)
        self.rng = random.Random(torch.initial_seed())  # seeded by the run's --seed
        logger.info(
            "learning %d vector(s) for %s as tokens %s",
            len(self.tokens),
            self.options.token_string,
            ", ".join(self.tokens),
        )
        return [{"params": [self.embedding.vectors], "lr": self.options.learning_rate}]

    def _add_tokens(self, tokenizer) -> None:
        vocab = tokenizer.get_vocab()
        known = [token for token in self.tokens if token in vocab or f"{token}</w>" in vocab]
        if known:
            raise ConfigError(
                f"--token_string {self.options.token_string}: the tokenizer already knows {', '.join(known)}; choose a "
                "string that is not a word, e.g. a rare letter combination with a digit"
            )
        added = tokenizer.add_tokens(self.tokens)
        first = tokenizer.convert_tokens_to_ids(self.tokens[0])
        expected = list(range(first, first + len(self.tokens)))
        if added != len(self.tokens) or tokenizer.convert_tokens_to_ids(self.tokens) != expected:
            raise ConfigError(f"--token_string {self.options.token_string}: the tokenizer could not add {self.tokens}")

    def _initial_vectors(self, tokenizer, table: torch.Tensor) -> torch.Tensor:
        """(N, D) fp32: --weights, else the --init_word's token vectors (repeated), else random like the table."""
        count, width = self.options.num_vectors_per_token, table.shape[1]
        if self.start_vectors is not None:
            if self.start_vectors.shape[1] != width:
                raise ConfigError(
                    f"--weights {self.options.weights} has vectors of width {self.start_vectors.shape[1]}; this text "
                    f"encoder needs {width} (was it trained for another model version?)"
                )
            return self.start_vectors.float().clone()
        if self.options.init_word is None:
            mean, std = table.float().mean(0), table.float().std(0)
            return mean + std * torch.randn(count, width)
        ids = tokenizer(self.options.init_word, add_special_tokens=False).input_ids
        if len(ids) > count:
            logger.warning(
                "--init_word %r has %d tokens; only the first %d start the vectors",
                self.options.init_word,
                len(ids),
                count,
            )
        return table[[ids[index % len(ids)] for index in range(count)]].float().clone()

    def trainable_modules(self) -> list[torch.nn.Module]:
        return [self.embedding]

    def prepare_captions(self, captions: list[str], rng: random.Random | None = None) -> list[str]:
        args = self.options
        templates = (
            OBJECT_TEMPLATES if args.use_object_template else STYLE_TEMPLATES if args.use_style_template else None
        )
        if templates is not None:
            rng = rng or self.rng
            captions = [rng.choice(templates).format(args.token_string) for _ in captions]
        elif not self.warned_missing_token and any(args.token_string.lower() not in c.lower() for c in captions):
            logger.warning(
                "some captions lack --token_string %s; those images teach the embedding nothing", args.token_string
            )
            self.warned_missing_token = True
        if len(self.tokens) == 1:
            return captions
        pattern = re.compile(re.escape(args.token_string), re.IGNORECASE)
        spelt = " ".join(self.tokens)
        return [pattern.sub(spelt, caption) for caption in captions]

    def output_extension(self) -> str:
        return "." + self.options.save_model_as

    def save(self, path: str, metadata: dict[str, str], unwrap) -> None:
        vectors = unwrap(self.embedding).vectors.detach().float().cpu()
        dtype = SAVE_DTYPES[self.options.save_precision]
        if dtype is not None:
            vectors = vectors.to(dtype)
        if self.options.save_model_as == "safetensors":
            save_state_dict({EMBEDDING_KEY: vectors}, path, metadata)
            return
        payload = {
            "string_to_token": {"*": A1111_PLACEHOLDER_ID},
            "string_to_param": {"*": vectors.clone()},
            "name": self.options.token_string,
            "step": int(metadata.get("ss_steps", 0)),
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
        }
        with atomic_path(path) as temp:
            torch.save(payload, temp)

    def metadata(self) -> dict[str, str]:
        args = self.options
        template = "object" if args.use_object_template else "style" if args.use_style_template else None
        return {
            "ss_token_string": args.token_string,
            "ss_num_vectors_per_token": str(args.num_vectors_per_token),
            "ss_init_word": args.init_word,
            "ss_caption_template": template,
            "ss_weights": os.path.basename(args.weights) if args.weights else None,
        }
