"""Family `sdxl`: Stable Diffusion XL base (epsilon or v-prediction), from SGM single files or diffusers folders.

Conditioning: the penultimate hidden states of CLIP ViT-L (encoder 1) and OpenCLIP ViT-bigG (encoder 2) side by
side, encoder 2's projected pooled output, and per image its size / crop embeddings as the dataset engine made the
crop. The DDPM objective and caption tokenization are SD's.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass

import torch

from library.adapters.targets import with_text_model_level
from library.checkpoints import sd_keys, sdxl_keys
from library.checkpoints.files import load_state_dict
from library.checkpoints.hub_models import hub_offline
from library.checkpoints.tokenizers import load_clip_g_tokenizer, load_clip_tokenizer
from library.checkpoints.weights import assign_weights, empty_model
from library.errors import CheckpointError, ConfigError
from library.families.base import LoadedModels, ModelFamily
from library.families.sd import (
    TOKENS_PER_CHUNK,
    SDFamily,
    SDOptions,
    add_shared_model_arguments,
    check_model_paths,
    merge_chunk_states,
    refuse_other_families,
)
from library.families.sdxl_view import sgm_unet_view
from library.text.weighted_captions import add_weighted_caption_arguments, apply_token_weights

logger = logging.getLogger(__name__)

BASE_MODEL_VERSION = "sdxl_base_v1-0"  # ss_base_model_version of SDXL files, as users' tools read it
TEXT_ENCODER_NAMES = ("CLIP ViT-L/14", "OpenCLIP ViT-bigG/14")  # encoder 1, encoder 2
FULL_TRAINING_METHODS = ("finetune", "dreambooth")


@dataclass
class SDXLOptions(SDOptions):
    """The `sdxl` family's options, typed (SD's fields, SD 2.x flags and clip skip fixed off)."""

    no_half_vae: bool = False
    text_encoder_lrs: tuple[float | None, float | None] = (None, None)
    block_lr: tuple[float, ...] | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SDXLOptions:
        base = dataclasses.replace(SDOptions.from_args(args), v2=False, clip_skip=None)
        return cls(
            **{field.name: getattr(base, field.name) for field in dataclasses.fields(SDOptions)},
            no_half_vae=args.no_half_vae,
            text_encoder_lrs=(args.text_encoder_lr1, args.text_encoder_lr2),
            block_lr=parse_block_lr(args.block_lr),
        )


def parse_block_lr(text: str | None) -> tuple[float, ...] | None:
    """`--block_lr "1e-6,2e-6,..."` -> the learning rates, checked for count (23) and values."""
    if text is None:
        return None
    expected = sdxl_keys.SDXL_BLOCK_COUNT
    parts = [part.strip() for part in text.split(",")]
    try:
        values = tuple(float(part) for part in parts)
    except ValueError as err:
        raise ConfigError(f"--block_lr must be {expected} comma-separated numbers, got {text!r}") from err
    if len(values) != expected:
        raise ConfigError(
            f"--block_lr needs {expected} comma-separated learning rates (one per SDXL UNet block: embeddings, 9 input "
            f"blocks, 3 middle-block parts, 9 output blocks, output layers), got {len(values)}"
        )
    if any(value < 0 for value in values):
        raise ConfigError(f"--block_lr values must not be negative, got {text!r}")
    return values


class SDXLFamily(SDFamily):
    """Stable Diffusion XL (base)."""

    id = "sdxl"
    text_cache_suffix = "_sdxl_te.safetensors"

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)  # SD's objective and tokenizer settings
        self.options = SDXLOptions.from_args(args)
        self.is_v2 = False
        for option, given in (("--v2", args.v2), ("--clip_skip", args.clip_skip is not None)):
            if given:
                logger.warning(
                    "%s does not apply to SDXL and is ignored: SDXL conditions on the penultimate layer of its two "
                    "fixed text encoders (CLIP ViT-L and OpenCLIP ViT-bigG)",
                    option,
                )

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--pretrained_model_name_or_path",
            type=str,
            required=True,
            help="base model: an SDXL checkpoint in the original single-file layout (sd_xl_base_1.0.safetensors), "
            "a local diffusers model folder, or a diffusers model id on the hub",
        )
        parser.add_argument(
            "--v_parameterization", action="store_true", help="the base model predicts v (v-prediction SDXL models)"
        )
        add_shared_model_arguments(parser)
        parser.add_argument(
            "--no_half_vae",
            action="store_true",
            help="keep the VAE in float32 under --mixed_precision fp16/bf16 (the SDXL VAE overflows in fp16)",
        )
        add_weighted_caption_arguments(parser)
        # accepted so that commands copied from SD 1.x / 2.x runs work; SDXL's encoders and layers are fixed
        parser.add_argument("--v2", action="store_true", help="ignored with a warning: SDXL is not SD 2.x")
        parser.add_argument(
            "--clip_skip",
            type=int,
            default=None,
            help="ignored with a warning: SDXL always conditions on the penultimate layer of both text encoders",
        )
        parser.set_defaults(no_token_padding=False)  # SD's option that SDXL fixes: captions are padded

    @classmethod
    def add_method_arguments(cls, method: str, parser: argparse.ArgumentParser) -> None:
        te1, te2 = TEXT_ENCODER_NAMES
        # One learning rate per encoder under method-specific names; the same destination, so SDXLOptions reads it
        parser.set_defaults(text_encoder_lr1=None, text_encoder_lr2=None, block_lr=None)
        if method == "network":
            for index, name in ((1, te1), (2, te2)):
                parser.add_argument(
                    f"--text_encoder_lr{index}",
                    type=float,
                    default=None,
                    help=f"learning rate of the LoRA modules of text encoder {index} ({name}); default "
                    "--text_encoder_lr, else --learning_rate",
                )
        if method in FULL_TRAINING_METHODS:
            for index, name in ((1, te1), (2, te2)):
                parser.add_argument(
                    f"--learning_rate_te{index}",
                    dest=f"text_encoder_lr{index}",
                    type=float,
                    default=None,
                    help=f"learning rate of text encoder {index} ({name}) with --train_text_encoder; default "
                    "--learning_rate_te, else --learning_rate",
                )
            parser.add_argument(
                "--block_lr",
                type=str,
                default=None,
                help="23 comma-separated learning rates, one per UNet block in order: time/size embeddings, "
                "input_blocks 0-8, middle_block 0-2, output_blocks 0-8, output layers (0 freezes a block)",
            )

    def validate(self, method=None) -> None:
        ModelFamily.validate(self, method)  # SD's own checks (SD 2.x flags, clip skip) do not apply
        options = self.options
        check_model_paths(options.pretrained_model_name_or_path, options.vae)
        refuse_other_families(options.pretrained_model_name_or_path, ("sdxl",), method)
        self.check_fp8(method)
        for index, rate in enumerate(options.text_encoder_lrs, start=1):
            if rate is not None and rate < 0:
                raise ConfigError(f"the learning rate of text encoder {index} must not be negative, got {rate}")

    # ---- loading -------------------------------------------------------------------------------------------

    def load(self, weight_dtype: torch.dtype) -> LoadedModels:
        path = self.options.pretrained_model_name_or_path
        vae_dtype = torch.float32 if self.options.no_half_vae else weight_dtype
        if vae_dtype == torch.float16:
            logger.warning("the SDXL VAE can overflow in float16 (NaN latents); --no_half_vae keeps it in float32")
        if os.path.isfile(path):
            models = self._load_single_file(path, weight_dtype, vae_dtype)
        else:
            models = self._load_diffusers(path, weight_dtype, vae_dtype)
        if self.options.vae is not None:
            models.vae = self._load_vae(self.options.vae, vae_dtype)
        for model in [models.denoiser, models.vae, *models.text_encoders]:
            model.requires_grad_(False)
            model.eval()
        self.store_base_in_fp8(models, weight_dtype)
        return models

    def _load_single_file(self, path: str, weight_dtype: torch.dtype, vae_dtype: torch.dtype) -> LoadedModels:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        state_dict = load_state_dict(path, allow_pickle=self.options.allow_pickle)
        arch = sdxl_keys.infer_architecture(state_dict, path)
        try:
            parts = sdxl_keys.split_sgm_checkpoint(state_dict, arch)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from err
        logger.info("%s: SDXL checkpoint (original single-file layout)", path)
        del state_dict
        unet = empty_model(lambda: UNet2DConditionModel(**arch.unet_config))
        assign_weights(unet, parts.unet, weight_dtype, "UNet", path)
        vae = empty_model(lambda: AutoencoderKL(**arch.vae_config))
        assign_weights(vae, parts.vae, vae_dtype, "VAE", path)
        text1 = empty_model(lambda: CLIPTextModel(CLIPTextConfig(**arch.text_config1)))
        assign_weights(
            text1, sd_keys.text_encoder_to_model_keys(parts.text_encoder1, text1), weight_dtype, "text encoder 1", path
        )
        text2 = empty_model(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**arch.text_config2)))
        assign_weights(text2, parts.text_encoder2, weight_dtype, "text encoder 2", path)
        tokenizers = self._tokenizers(None)
        extras = dict(parts.extras)
        return LoadedModels(unet, vae, [text1, text2], tokenizers, extras={"sgm_extras": extras})

    def _load_diffusers(self, path: str, weight_dtype: torch.dtype, vae_dtype: torch.dtype) -> LoadedModels:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        local = os.path.isdir(path)
        if local and not os.path.isfile(os.path.join(path, "unet", "config.json")):
            raise CheckpointError(
                f"{path} is a folder but not a diffusers model (no unet/config.json); give a diffusers model folder "
                "or a single checkpoint file"
            )
        kwargs = {"torch_dtype": weight_dtype, "local_files_only": local or hub_offline()}  # hub ids: cache first
        try:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kwargs)
            if unet.config.addition_embed_type != "text_time":
                raise CheckpointError(f"{path} is not an SDXL model (its UNet takes no size conditioning)")
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **dict(kwargs, torch_dtype=vae_dtype))
            text1 = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kwargs)
            text2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kwargs)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot load the diffusers SDXL model {path}: {err}") from err
        return LoadedModels(unet, vae, [text1, text2], self._tokenizers(path if local else None))

    def _tokenizers(self, model_dir: str | None) -> list:
        """Encoder 1 pads with its end token, encoder 2 (OpenCLIP) with "!", as the release's tokenizers do."""
        cache_dir = self.options.tokenizer_cache_dir
        tokenizer1 = load_clip_tokenizer(False, model_dir=model_dir, cache_dir=cache_dir)
        return [tokenizer1, load_clip_g_tokenizer(tokenizer1, model_dir=model_dir, cache_dir=cache_dir)]

    def _load_vae(self, path: str, weight_dtype: torch.dtype) -> torch.nn.Module:
        vae = super()._load_vae(path, weight_dtype)
        if os.path.isfile(path):  # an original-layout file stores no scale; it is the SDXL VAE's
            vae.register_to_config(scaling_factor=sdxl_keys.VAE_SCALING_FACTOR)
        return vae

    # ---- conditioning --------------------------------------------------------------------------------------

    def encode_text(self, models: LoadedModels, captions: list[str]) -> dict[str, torch.Tensor]:
        """(B, 77 or 2 + chunks*75, D1 + D2) hidden states and encoder 2's pooled projection (B, P)."""
        encoder1, encoder2 = models.text_encoders
        weights = None
        if self.weighted_captions:  # the same token weights for both encoders (their tokenizers split alike)
            ids1, weights = self.tokenize_weighted(models.tokenizers[0], captions)
            ids2, _ = self.tokenize_weighted(models.tokenizers[1], captions)
        else:
            ids1 = self.tokenize(models.tokenizers[0], captions)  # (B, chunks*77)
            ids2 = self.tokenize(models.tokenizers[1], captions)
        ids1, ids2 = ids1.to(encoder1.device), ids2.to(encoder2.device)
        batch, chunks = ids1.shape[0], ids1.shape[1] // (TOKENS_PER_CHUNK + 2)
        output1 = encoder1(ids1.reshape(batch * chunks, -1), output_hidden_states=True)
        output2 = encoder2(ids2.reshape(batch * chunks, -1), output_hidden_states=True)
        # The penultimate layer of each encoder, without its final layer norm, as SDXL was trained.
        hidden1 = merge_chunk_states(output1.hidden_states[-2].reshape(batch, chunks, TOKENS_PER_CHUNK + 2, -1))
        hidden2 = merge_chunk_states(output2.hidden_states[-2].reshape(batch, chunks, TOKENS_PER_CHUNK + 2, -1))
        if weights is not None:
            merged = merge_chunk_states(weights.view(batch, chunks, TOKENS_PER_CHUNK + 2, 1)).squeeze(-1)  # (B, T)
            hidden1 = apply_token_weights(hidden1, merged.to(hidden1.device))
            hidden2 = apply_token_weights(hidden2, merged.to(hidden2.device))
        # Longer captions: the pooled output of the first chunk (kohya's choice), not a mix of chunks.
        pooled = output2.text_embeds.reshape(batch, chunks, -1)[:, 0]
        return {
            "encoder_hidden_states": torch.cat([hidden1, hidden2.to(hidden1.device, hidden1.dtype)], dim=-1),
            "text_embeds": pooled,
        }

    def batch_conditioning(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"time_ids": size_conditioning(batch)}

    def predict(self, models, noisy_latents, timesteps, conditioning) -> torch.Tensor:
        unet = models.denoiser
        dtype = next(unet.parameters()).dtype
        added = {
            "text_embeds": conditioning["text_embeds"].to(noisy_latents.device, dtype),
            "time_ids": conditioning["time_ids"].to(noisy_latents.device, dtype),
        }
        hidden = conditioning["encoder_hidden_states"].to(noisy_latents.device, dtype)
        return unet(noisy_latents.to(dtype), timesteps, hidden, added_cond_kwargs=added).sample

    # ---- sample images -------------------------------------------------------------------------------------

    default_sample_size = 1024

    def make_pipeline(self, models: LoadedModels, scheduler):
        from diffusers import StableDiffusionXLPipeline

        text1, text2 = models.text_encoders
        return StableDiffusionXLPipeline(
            vae=models.vae,
            text_encoder=text1,
            text_encoder_2=text2,
            tokenizer=models.tokenizers[0],
            tokenizer_2=models.tokenizers[1],
            unet=models.denoiser,
            scheduler=scheduler,
            add_watermarker=False,
        )

    def sample_prompt_inputs(self, models: LoadedModels, prompt: str, negative_prompt: str) -> dict:
        """Embeddings as training encodes captions; an empty negative prompt is all zeros, as the SDXL release
        pipeline makes it (force_zeros_for_empty_prompt)."""
        encoded = self.encode_text(models, [prompt, negative_prompt])
        hidden, pooled = encoded["encoder_hidden_states"], encoded["text_embeds"]  # (2, L, D), (2, P)
        if not negative_prompt:
            hidden, pooled = hidden.clone(), pooled.clone()
            hidden[1], pooled[1] = 0, 0
        return {
            "prompt_embeds": hidden[:1],
            "negative_prompt_embeds": hidden[1:],
            "pooled_prompt_embeds": pooled[:1],
            "negative_pooled_prompt_embeds": pooled[1:],
        }

    def text_encoding_settings(self) -> tuple:
        return (self.options.max_token_length,) + (("weighted_captions",) if self.weighted_captions else ())

    # ---- adapter networks and learning rates ---------------------------------------------------------------

    def network_text_encoders(self, models: LoadedModels) -> list[torch.nn.Module]:
        return [with_text_model_level(encoder) for encoder in models.text_encoders]

    def network_denoiser(self, models: LoadedModels) -> torch.nn.Module:
        """The UNet under SGM module names, so LoRA files name its layers as users' tools expect for SDXL."""
        config = dict(models.denoiser.config)
        return sgm_unet_view(models.denoiser, sdxl_keys.unet_module_names(config))

    def text_encoder_learning_rates(self, default: float | None) -> list[float | None]:
        return [default if rate is None else rate for rate in self.options.text_encoder_lrs]

    def denoiser_param_groups(self, denoiser: torch.nn.Module, learning_rate: float) -> list[dict]:
        if self.options.block_lr is None:
            return super().denoiser_param_groups(denoiser, learning_rate)
        config = dict(denoiser.config)
        if sdxl_keys.block_count(config) != len(self.options.block_lr):
            raise ConfigError(
                f"--block_lr gives {len(self.options.block_lr)} rates but this UNet has "
                f"{sdxl_keys.block_count(config)} blocks; it is not an SDXL base UNet"
            )
        named = dict(denoiser.named_parameters())
        blocks = sdxl_keys.block_lr_groups(config, named)
        groups = [{"params": [], "lr": rate} for rate in self.options.block_lr]
        for name, index in blocks.items():
            groups[index]["params"].append(named[name])
        for group in groups:
            if group["lr"] == 0:  # a frozen block: no gradients, no optimizer state
                for param in group["params"]:
                    param.requires_grad_(False)
        return [group for group in groups if group["params"] and group["lr"] != 0]

    # ---- saving and metadata -------------------------------------------------------------------------------

    def save_model(
        self, models: LoadedModels, path: str, save_as: str, dtype: torch.dtype | None, metadata: dict[str, str]
    ) -> None:
        from library.checkpoints.sdxl_save import save_sdxl_model

        save_sdxl_model(models, path, save_as, dtype, metadata, self.options.v_parameterization)

    def base_model_version(self) -> str:
        return BASE_MODEL_VERSION

    def model_spec_architecture(self) -> str:
        return "stable-diffusion-xl-v1-base"


def size_conditioning(batch: dict) -> torch.Tensor:
    """SDXL's time ids per image (B, 6): original size (h, w), crop top-left (top, left), target size (h, w)."""
    target = tuple(batch["target_size"])
    rows = [
        [*original, *crop, *target]
        for original, crop in zip(batch["original_sizes"], batch["crop_top_lefts"], strict=True)
    ]
    return torch.tensor(rows, dtype=torch.float32)
