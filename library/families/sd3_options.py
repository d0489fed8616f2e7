"""The `sd3` family's command-line options (names and defaults of the reference trainer's SD3 scripts), typed, and
their checks that need no model."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch

from library.checkpoints import sd3_configs, sd3_files
from library.errors import ConfigError
from library.training import flow_matching

WEIGHTING_SCHEMES = ("uniform", "sigma_sqrt", "logit_normal", "mode", "cosmap")
T5_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip
FULL_TRAINING_METHODS = ("finetune", "dreambooth")


@dataclass
class SD3Options:
    """The `sd3` family's options, typed."""

    pretrained_model_name_or_path: str
    clip_l: str | None
    clip_g: str | None
    t5xxl: str | None
    vae: str | None
    tokenizer_cache_dir: str | None
    t5xxl_tokenizer: str | None
    allow_pickle: bool
    mixed_precision: str
    t5xxl_max_token_length: int
    apply_lg_attn_mask: bool
    apply_t5_attn_mask: bool
    dropout_rates: tuple[float, float, float]  # CLIP-L, CLIP-G, T5-XXL
    pos_emb_random_crop_rate: float
    enable_scaled_pos_embed: bool
    training_shift: float
    flow: flow_matching.FlowMatchingOptions
    t5xxl_device: str | None
    t5xxl_dtype: str | None
    save_clip: bool
    save_t5xxl: bool
    refused: dict[str, object]  # SD 1.x / 2.x options given, which SD3 has no use for
    train_t5xxl: bool = False
    num_last_block_to_freeze: int | None = None
    text_encoder_lrs: tuple[float | None, float | None, float | None] = (None, None, None)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SD3Options:
        flow = flow_matching.FlowMatchingOptions(
            model_prediction_type="sigma_scaled",  # SD3's preconditioning: the loss compares clean latents
            weighting_scheme=args.weighting_scheme,
            logit_mean=args.logit_mean,
            logit_std=args.logit_std,
            mode_scale=args.mode_scale,
        )
        plain = {name: getattr(args, name) for name in (
            "pretrained_model_name_or_path", "clip_l", "clip_g", "t5xxl", "vae", "tokenizer_cache_dir",
            "t5xxl_tokenizer", "allow_pickle", "mixed_precision", "t5xxl_max_token_length", "apply_lg_attn_mask",
            "apply_t5_attn_mask", "pos_emb_random_crop_rate", "enable_scaled_pos_embed", "training_shift",
            "t5xxl_device", "t5xxl_dtype", "save_clip", "save_t5xxl", "train_t5xxl", "num_last_block_to_freeze",
        )}  # fmt: skip
        refused = {name: getattr(args, name) for name in ("v2", "v_parameterization", "clip_skip")}
        return cls(
            **plain,
            dropout_rates=(args.clip_l_dropout_rate, args.clip_g_dropout_rate, args.t5_dropout_rate),
            flow=flow,
            refused={name: value for name, value in refused.items() if value not in (None, False)},
            text_encoder_lrs=(args.text_encoder_lr1, args.text_encoder_lr2, args.text_encoder_lr3),
        )

    def sources(self) -> sd3_files.SD3Sources:
        return sd3_files.SD3Sources(self.pretrained_model_name_or_path, self.vae, self.clip_l, self.clip_g,
                                    self.t5xxl, self.allow_pickle)  # fmt: skip

    @property
    def t5_dtype(self) -> torch.dtype | None:
        return T5_DTYPES[self.t5xxl_dtype] if self.t5xxl_dtype else None

    def validate(self) -> None:
        """Values and combinations; raise ConfigError naming the option."""
        if self.refused:
            given = ", ".join(f"--{name}" for name in self.refused)
            raise ConfigError(f"{given}: SD 1.x / 2.x options that do not apply to SD3 (SD3 has its own text encoders "
                              "and predicts flow velocity); remove them")  # fmt: skip
        if self.t5xxl_max_token_length < 1:
            raise ConfigError(f"--t5xxl_max_token_length must be 1 or more, got {self.t5xxl_max_token_length}")
        if self.training_shift <= 0:
            raise ConfigError(f"--training_shift must be above 0, got {self.training_shift}")
        names = ("--clip_l_dropout_rate", "--clip_g_dropout_rate", "--t5_dropout_rate", "--pos_emb_random_crop_rate")
        for name, rate in zip(names, (*self.dropout_rates, self.pos_emb_random_crop_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ConfigError(f"{name} must be between 0 and 1, got {rate}")
        for index, rate in enumerate(self.text_encoder_lrs, start=1):
            if rate is not None and rate < 0:
                raise ConfigError(f"--learning_rate_te{index} must not be negative, got {rate}")
        if self.num_last_block_to_freeze is not None and self.num_last_block_to_freeze < 0:
            raise ConfigError(f"--num_last_block_to_freeze must be 0 or more, got {self.num_last_block_to_freeze}")
        self._check_t5_device()

    def _check_t5_device(self) -> None:
        if self.t5xxl_device is None:
            return
        try:
            device = torch.device(self.t5xxl_device)
        except RuntimeError as err:
            raise ConfigError(f"--t5xxl_device {self.t5xxl_device!r} is no device; use e.g. cpu or cuda:1") from err
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.type == "cuda" and (device.index or 0) >= cuda_count:
            raise ConfigError(f"--t5xxl_device {self.t5xxl_device}: this machine has no such CUDA device")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the models and tokenizers come from, and where T5-XXL runs."""
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="the SD3 / SD3.5 model: an original single file (sd3_medium.safetensors, sd3.5_large.safetensors; files "
        "with the text encoders inside need no --clip_l/--clip_g/--t5xxl) or a local diffusers folder",
    )
    parser.add_argument("--clip_l", type=str, default=None, help="CLIP-L file (default: the one inside the model file)")
    parser.add_argument("--clip_g", type=str, default=None, help="CLIP-G file (default: the one inside the model file)")
    parser.add_argument(
        "--t5xxl", type=str, default=None, help="T5-XXL file, fp16 / bf16 or plain fp8 e4m3fn (default: the model's)"
    )
    parser.add_argument("--vae", type=str, default=None, help="VAE file replacing the model's own")
    parser.add_argument(
        "--tokenizer_cache_dir",
        type=str,
        default=None,
        help="folder with the CLIP tokenizer's files and a t5xxl/ subfolder with the T5 tokenizer (for offline "
        "training), or one kohya-ss sd-scripts filled (openai_clip-vit-large-patch14/, "
        "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k/, google_t5-v1_1-xxl/; read only); a CLIP tokenizer rebuilt from "
        "open-clip-torch is saved at its top on first use",
    )
    parser.add_argument(
        "--t5xxl_tokenizer",
        type=str,
        default=None,
        help="folder of the T5 tokenizer (tokenizer.json, or spiece.model with sentencepiece installed)",
    )
    parser.add_argument(
        "--t5xxl_device",
        type=str,
        default=None,
        help="device T5-XXL runs on, e.g. cpu to keep its memory off the GPU (default: the training device)",
    )
    parser.add_argument(
        "--t5xxl_dtype",
        type=str,
        default=None,
        choices=sorted(T5_DTYPES),
        help="precision of T5-XXL's weights (default: the --mixed_precision dtype)",
    )
    parser.add_argument(
        "--save_clip", action="store_true", help="sd3_train.py: write CLIP-L and CLIP-G into the saved single file"
    )
    parser.add_argument(
        "--save_t5xxl", action="store_true", help="sd3_train.py: write T5-XXL into the saved single file"
    )


def add_conditioning_arguments(parser: argparse.ArgumentParser) -> None:
    """How captions become conditioning, and the position-embedding options of SD3.5."""
    parser.add_argument(
        "--t5xxl_max_token_length",
        type=int,
        default=sd3_configs.T5_MAX_TOKENS,
        help=f"T5 tokens per caption (default {sd3_configs.T5_MAX_TOKENS})",
    )
    parser.add_argument(
        "--apply_lg_attn_mask", action="store_true", help="hide the caption's padding from CLIP-L and CLIP-G"
    )
    parser.add_argument("--apply_t5_attn_mask", action="store_true", help="hide the caption's padding from T5-XXL")
    for name, encoder in (("clip_l", "CLIP-L"), ("clip_g", "CLIP-G"), ("t5", "T5-XXL")):
        parser.add_argument(
            f"--{name}_dropout_rate",
            type=float,
            default=0.0,
            help=f"share of training captions whose {encoder} output is replaced by zeros (default 0)",
        )
    parser.add_argument(
        "--pos_emb_random_crop_rate",
        type=float,
        default=0.0,
        help="SD3.5: share of training steps that take the position embeddings from a random place of the grid "
        "instead of its centre (default 0)",
    )
    parser.add_argument(
        "--enable_scaled_pos_embed",
        action="store_true",
        help="SD3.5, experimental: position grids rescaled to each dataset resolution, for multi-resolution training",
    )


def add_objective_arguments(parser: argparse.ArgumentParser) -> None:
    """Timestep sampling and loss weighting of the flow-matching objective (SD3 paper, section 3.1)."""
    parser.add_argument(
        "--training_shift",
        type=float,
        default=1.0,
        help="shift s applied to the drawn timesteps, t' = s*t / (1 + (s-1)*t); above 1 trains noisier steps more "
        "(default 1.0)",
    )
    parser.add_argument(
        "--weighting_scheme",
        type=str,
        default="uniform",
        choices=WEIGHTING_SCHEMES,
        help="logit_normal / mode: how often each timestep is drawn; sigma_sqrt / cosmap: loss weight per timestep; "
        "uniform: neither (default)",
    )
    parser.add_argument("--logit_mean", type=float, default=0.0, help="mean of the logit_normal density (default 0)")
    parser.add_argument("--logit_std", type=float, default=1.0, help="std of the logit_normal density (default 1)")
    parser.add_argument("--mode_scale", type=float, default=1.29, help="scale of the mode density (default 1.29)")


def add_refused_arguments(parser: argparse.ArgumentParser) -> None:
    """SD 1.x / 2.x options users carry over from other scripts: parsed, so that they are refused with a reason."""
    parser.add_argument("--v2", action="store_true", help="not used by SD3 (refused)")
    parser.add_argument("--v_parameterization", action="store_true", help="not used by SD3 (refused)")
    parser.add_argument("--clip_skip", type=int, default=None, help="not used by SD3 (refused)")


def add_method_arguments(method: str, parser: argparse.ArgumentParser) -> None:
    """sd3_train.py's own options; the other methods get their defaults."""
    parser.set_defaults(train_t5xxl=False, num_last_block_to_freeze=None, text_encoder_lr1=None,
                        text_encoder_lr2=None, text_encoder_lr3=None)  # fmt: skip
    if method == "network":
        parser.set_defaults(network_module="networks.lora_sd3")
    if method not in FULL_TRAINING_METHODS:
        return
    parser.add_argument(
        "--train_t5xxl", action="store_true", help="train T5-XXL too (needs --train_text_encoder; much memory)"
    )
    parser.add_argument(
        "--num_last_block_to_freeze",
        type=int,
        default=None,
        help="keep the last N joint blocks of the MMDiT as they are (not trained)",
    )
    for index, name in ((1, "CLIP-L"), (2, "CLIP-G"), (3, "T5-XXL")):
        parser.add_argument(
            f"--learning_rate_te{index}",
            dest=f"text_encoder_lr{index}",
            type=float,
            default=None,
            help=f"learning rate of {name} when it trains; default --learning_rate_te, else --learning_rate",
        )


def diffusers_folder_class(folder: str) -> str | None:
    """The pipeline class a diffusers folder names in model_index.json (None when it has none)."""
    import json

    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        return None
    with open(index, encoding="utf-8") as file:
        return json.load(file).get("_class_name")
