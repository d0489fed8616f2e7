"""Family `flux`: FLUX.1 [dev] / [schnell], a rectified-flow transformer conditioned on T5-XXL hidden states and the
pooled output of CLIP-L, from the BFL single files users download or a diffusers folder.

Latents (16 channels) are packed 2x2 into tokens of 64 values; each image token carries its (0, row, column)
position, text tokens position 0. The dev model also embeds a guidance scale. The objective is flow matching
(library.training.flow_matching).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

import torch

from library.adapters.targets import (
    UNET_PREFIX,
    AdapterTarget,
    TargetArgs,
    TargetTable,
    clip_targets,
    lora_name,
    t5_targets,
    with_text_model_level,
)
from library.checkpoints import flux_configs, flux_files, flux_keys
from library.checkpoints.family_check import refuse_other_family, refuse_other_family_folder
from library.checkpoints.files import safetensors_keys
from library.checkpoints.t5_tokenizer import load_t5_tokenizer
from library.checkpoints.tokenizers import load_clip_tokenizer
from library.errors import CheckpointError, ConfigError
from library.families.base import LoadedModels, ModelFamily, TrainingInputs
from library.training import flow_matching, fp8
from library.training.noise import NoiseOptions

logger = logging.getLogger(__name__)

BASE_MODEL_VERSION = "flux1"
CAPTION_KEYS = ("pooled_projections", "encoder_hidden_states", "t5_attention_mask")
# Adapter targets: CLIP-L is `lora_te1`, T5-XXL `lora_te3` (kohya's numbering), the transformer is named by the BFL
# layout. Network args of the reference's FLUX network pick ranks per module kind and blocks per list.
IN_LAYERS = ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")
FLUX_TARGET_ARGS = TargetArgs(
    kind_dims={"img_attn_dim": ("img_attn",), "txt_attn_dim": ("txt_attn",), "img_mlp_dim": ("img_mlp",),
               "txt_mlp_dim": ("txt_mlp",), "img_mod_dim": ("img_mod",), "txt_mod_dim": ("txt_mod",),
               "single_dim": ("linear1", "linear2"), "single_mod_dim": ("modulation",)},
    list_dims={"in_dims": IN_LAYERS},
    block_indices={"train_double_block_indices": "double_blocks", "train_single_block_indices": "single_blocks"},
    enables={"train_t5xxl": ("t5",)},
    off_kinds=("final_layer",),
)  # fmt: skip


@dataclass
class FluxOptions:
    """The `flux` family's options, typed."""

    pretrained_model_name_or_path: str
    ae: str | None
    clip_l: str | None
    t5xxl: str | None
    t5xxl_max_token_length: int | None
    apply_t5_attn_mask: bool
    guidance_scale: float
    tokenizer_cache_dir: str | None
    t5xxl_tokenizer: str | None
    allow_pickle: bool
    mixed_precision: str
    flow: flow_matching.FlowMatchingOptions

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FluxOptions:
        return cls(
            pretrained_model_name_or_path=args.pretrained_model_name_or_path,
            ae=args.ae,
            clip_l=args.clip_l,
            t5xxl=args.t5xxl,
            t5xxl_max_token_length=args.t5xxl_max_token_length,
            apply_t5_attn_mask=args.apply_t5_attn_mask,
            guidance_scale=args.guidance_scale,
            tokenizer_cache_dir=args.tokenizer_cache_dir,
            t5xxl_tokenizer=args.t5xxl_tokenizer,
            allow_pickle=args.allow_pickle,
            mixed_precision=args.mixed_precision,
            flow=flow_matching.FlowMatchingOptions.from_args(args),
        )

    def sources(self) -> flux_files.FluxSources:
        path = self.pretrained_model_name_or_path
        folder = path if os.path.isdir(path) else None
        return flux_files.FluxSources(folder, None if folder else path, self.ae, self.clip_l, self.t5xxl,
                                      self.allow_pickle)  # fmt: skip


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the four models come from, and the tokenizers."""
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="the FLUX.1 transformer: a BFL single file (flux1-dev.safetensors, flux1-schnell.safetensors; fp8 "
        "files too) or a local diffusers FLUX folder",
    )
    parser.add_argument("--ae", type=str, default=None, help="the autoencoder file (ae.safetensors)")
    parser.add_argument("--clip_l", type=str, default=None, help="the CLIP-L text encoder file (clip_l.safetensors)")
    parser.add_argument(
        "--t5xxl", type=str, default=None, help="the T5-XXL text encoder file (t5xxl_fp16 or plain fp8 e4m3fn)"
    )
    parser.add_argument(
        "--tokenizer_cache_dir",
        type=str,
        default=None,
        help="folder with the CLIP tokenizer's files and a t5xxl/ subfolder with the T5 tokenizer (for offline "
        "training), or one kohya-ss sd-scripts filled (openai_clip-vit-large-patch14/, google_t5-v1_1-xxl/; read "
        "only); a CLIP tokenizer rebuilt from open-clip-torch is saved at its top on first use",
    )
    parser.add_argument(
        "--t5xxl_tokenizer",
        type=str,
        default=None,
        help="folder of the T5 tokenizer (tokenizer.json, or spiece.model with sentencepiece installed)",
    )


def add_conditioning_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--t5xxl_max_token_length",
        type=int,
        default=None,
        help="T5 tokens per caption (default 512 for dev, 256 for schnell, the lengths they were trained with)",
    )
    parser.add_argument(
        "--apply_t5_attn_mask",
        action="store_true",
        help="mask the T5 padding: in the T5 encoder and in the transformer's attention",
    )
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=3.5,
        help="the guidance value the dev model embeds during training (default 3.5; schnell ignores it)",
    )


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch becomes one token (channel-major within the token)."""
    batch, channels, height, width = latents.shape
    if height % 2 or width % 2:  # images are checked to be multiples of 16 pixels before training starts
        raise ValueError(f"FLUX packs 2x2 latent patches; {height}x{width} latents cannot be packed")
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of `height` x `width`."""
    batch, _, packed_channels = tokens.shape
    channels = packed_channels // 4
    patches = tokens.view(batch, height // 2, width // 2, channels, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)


def image_position_ids(rows: int, columns: int, device: torch.device | str) -> torch.Tensor:
    """(rows*columns, 3) ids of the packed image tokens: (0, row, column)."""
    ids = torch.zeros(rows, columns, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(columns, device=device)[None, :]
    return ids.reshape(rows * columns, 3)


def transformer_targets(transformer: torch.nn.Module) -> list[AdapterTarget]:
    """Every Linear of the transformer under its BFL module name, in file order."""
    targets = []
    for module, parts in flux_keys.linear_modules(dict(transformer.config)):
        path = module.split(".")
        in_block = path[0] in ("double_blocks", "single_blocks")
        targets.append(AdapterTarget(
            lora_name(UNET_PREFIX, module), tuple(transformer.get_submodule(part) for part in parts), None, module,
            kind=path[2] if in_block else path[0], block=(path[0], int(path[1])) if in_block else None,
            diffusers_names=tuple(f"transformer.{part}" for part in parts),
            swapped_halves=module == flux_keys.FINAL_MODULATION,
        ))  # fmt: skip
    return targets


class FluxFamily(ModelFamily):
    """FLUX.1 dev / schnell."""

    id = "flux"
    default_sample_size = 1024
    default_sample_scale = 3.5  # the guidance value the dev model was distilled for
    image_size_multiple = 16  # 8x AE downscaling, then 2x2 latent patches
    text_cache_suffix = "_flux_te.safetensors"
    block_list_names = ("transformer_blocks", "single_transformer_blocks")  # double blocks, single blocks

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.options = FluxOptions.from_args(args)
        self.variant = "dev"  # read from the transformer when loaded
        self.compute_dtype = torch.float32
        self.t5_max_tokens = self.options.t5xxl_max_token_length or flux_configs.T5_MAX_TOKENS["dev"]
        self.sigma_table: torch.Tensor | None = None  # the shifted schedule, for --timestep_sampling sigma

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_model_arguments(parser)
        add_conditioning_arguments(parser)
        flow_matching.add_flow_matching_arguments(parser)

    @classmethod
    def add_method_arguments(cls, method: str, parser: argparse.ArgumentParser) -> None:
        if method == "network":  # FLUX LoRAs need the FLUX network module (BFL names, fused q|k|v)
            parser.set_defaults(network_module="networks.lora_flux")

    def validate(self, method=None) -> None:
        super().validate(method)
        self._check_files()
        options = self.options
        if options.t5xxl_max_token_length is not None and options.t5xxl_max_token_length < 1:
            raise ConfigError(f"--t5xxl_max_token_length must be 1 or more, got {options.t5xxl_max_token_length}")
        if method is not None and method.trains_base_weights:
            self._check_full_training(method)
        if self.offload.fp8_denoiser:
            fp8.check_compute_dtype({"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.mixed_precision))
        for note in options.flow.ignored_settings():
            logger.warning("%s; it has no effect here", note)

    def _check_files(self) -> None:
        options = self.options
        sources = options.sources()
        if sources.folder is None and not os.path.isfile(options.pretrained_model_name_or_path):
            raise CheckpointError(
                f"--pretrained_model_name_or_path: no such file or folder: {options.pretrained_model_name_or_path}"
            )
        for option, path in (("--ae", options.ae), ("--clip_l", options.clip_l), ("--t5xxl", options.t5xxl)):
            if path is not None and not os.path.isfile(path):
                raise CheckpointError(f"{option}: file not found: {path}")
        if sources.folder is None:  # another family's file ends here, naming its scripts
            refuse_other_family(options.pretrained_model_name_or_path, ("flux",), allow_pickle=options.allow_pickle)
        else:
            refuse_other_family_folder(sources.folder, ("flux",))
        missing = sources.missing()
        if missing:
            raise ConfigError(
                f"a FLUX.1 single-file transformer needs the other models as files too: add {', '.join(missing)}"
            )

    def _check_full_training(self, method) -> None:
        """flux_train.py trains the transformer's own weights, and only them."""
        if method.trains_text_encoder:
            raise ConfigError(
                "flux_train.py trains the transformer only (the BFL file it saves holds no text encoders): remove "
                "--train_text_encoder; flux_train_network.py trains CLIP-L / T5-XXL adapters"
            )
        if self.offload.fp8_denoiser:
            raise ConfigError("--fp8_base / --fp8_base_unet store frozen weights in fp8; flux_train.py trains the "
                              "transformer's weights themselves: remove the option")  # fmt: skip

    # ---- loading -------------------------------------------------------------------------------------------

    def load(self, weight_dtype: torch.dtype) -> LoadedModels:
        options = self.options
        models = flux_files.load_models(options.sources(), weight_dtype, weight_dtype)
        transformer = models["transformer"]
        self.variant = flux_keys.variant(transformer.config)
        self.compute_dtype = weight_dtype
        self.t5_max_tokens = options.t5xxl_max_token_length or flux_configs.T5_MAX_TOKENS[self.variant]
        logger.info("FLUX.1 [%s]: %d double and %d single blocks, T5 sequence %d", self.variant,
                    transformer.config.num_layers, transformer.config.num_single_layers, self.t5_max_tokens)
        folder = options.sources().folder
        tokenizers = [
            load_clip_tokenizer(False, model_dir=folder, cache_dir=options.tokenizer_cache_dir),
            load_t5_tokenizer(options.t5xxl_tokenizer, folder, options.tokenizer_cache_dir),
        ]
        loaded = LoadedModels(transformer, models["ae"], [models["clip_l"], models["t5xxl"]], tokenizers)
        for model in [loaded.denoiser, loaded.vae, *loaded.text_encoders]:
            model.requires_grad_(False)
            model.eval()
        self._store_in_fp8(loaded)
        return loaded

    def _store_in_fp8(self, models: LoadedModels) -> None:
        memory = self.offload  # the fp8 options live with the block-swap options
        if memory.fp8_denoiser:
            fp8.store_in_fp8(models.denoiser, self.compute_dtype, fp8.DENOISER_SKIP)
        if memory.fp8_text_encoders:
            for encoder in models.text_encoders:
                fp8.store_in_fp8(encoder, self.compute_dtype, fp8.TEXT_ENCODER_SKIP)

    def block_list_lengths(self) -> list[int] | None:
        """Double and single blocks, from the diffusers config or the single file's tensor names."""
        sources = self.options.sources()
        if sources.folder is not None:
            import json

            with open(os.path.join(sources.folder, "transformer", "config.json")) as file:
                config = json.load(file)
            return [config["num_layers"], config["num_single_layers"]]
        if sources.transformer.lower().endswith(".safetensors"):
            return list(flux_keys.block_counts(safetensors_keys(sources.transformer)))
        return None

    @classmethod
    def swap_counts(cls, blocks_to_swap: int) -> list[int]:
        """N // 2 double blocks and twice the rest in single blocks (a double block holds about twice the weights
        of a single one)."""
        double_swap = blocks_to_swap // 2
        return [double_swap, (blocks_to_swap - double_swap) * 2]

    # ---- conditioning --------------------------------------------------------------------------------------

    def encode_images(self, models: LoadedModels, images: torch.Tensor) -> torch.Tensor:
        ae = models.vae
        return ae.encode(images.to(ae.device, ae.dtype)).latent_dist.sample()

    def scale_latents(self, models: LoadedModels, latents: torch.Tensor) -> torch.Tensor:
        config = models.vae.config
        return (latents - config.shift_factor) * config.scaling_factor

    def tokenize(self, models: LoadedModels, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CLIP ids (B, 77), T5 ids (B, L) and T5 mask (B, L), each padded to its full length."""
        clip = models.tokenizers[0](captions, padding="max_length", max_length=flux_configs.CLIP_MAX_TOKENS,
                                    truncation=True, return_tensors="pt")  # fmt: skip
        t5 = models.tokenizers[1](captions, padding="max_length", max_length=self.t5_max_tokens, truncation=True,
                                  return_tensors="pt")  # fmt: skip
        return clip.input_ids, t5.input_ids, t5.attention_mask

    def encode_text(self, models: LoadedModels, captions: list[str]) -> dict[str, torch.Tensor]:
        """pooled_projections (B, 768), encoder_hidden_states (B, L, 4096), t5_attention_mask (B, L)."""
        clip, t5 = models.text_encoders
        clip_ids, t5_ids, t5_mask = self.tokenize(models, captions)
        pooled = clip(clip_ids.to(clip.device)).pooler_output
        mask = t5_mask.to(t5.device) if self.options.apply_t5_attn_mask else None
        hidden = t5(t5_ids.to(t5.device), attention_mask=mask).last_hidden_state
        return {"pooled_projections": pooled, "encoder_hidden_states": hidden, "t5_attention_mask": t5_mask}

    # ---- objective and prediction --------------------------------------------------------------------------

    def training_inputs(
        self,
        latents: torch.Tensor,
        generator: torch.Generator | None,
        noise: NoiseOptions,
        timesteps: torch.Tensor | None = None,
    ) -> TrainingInputs:
        image_tokens = (latents.shape[2] // 2) * (latents.shape[3] // 2)
        if self.options.flow.timestep_sampling == "sigma" and self.sigma_table is None:
            self.sigma_table = flow_matching.discrete_sigmas(self.options.flow.discrete_flow_shift)
        return flow_matching.training_inputs(
            latents, generator, noise, self.options.flow, image_tokens, self.sigma_table, timesteps
        )

    def predict(self, models, noisy_latents, timesteps, conditioning) -> torch.Tensor:
        """The velocity for (B, 16, H, W) latents, unpacked, in the space the prediction type compares."""
        transformer = models.denoiser
        batch, _, height, width = noisy_latents.shape
        device, dtype = noisy_latents.device, self.compute_dtype
        hidden = conditioning["encoder_hidden_states"].to(device, dtype)  # (B, L, D_t5)
        kwargs = None
        if self.options.apply_t5_attn_mask:
            image_mask = torch.ones(batch, (height // 2) * (width // 2), dtype=torch.bool, device=device)
            joint = torch.cat([conditioning["t5_attention_mask"].to(device).bool(), image_mask], dim=1)
            kwargs = {"attention_mask": joint[:, None, None, :]}  # (B, 1, 1, L_txt + L_img), text first
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((batch,), self.options.guidance_scale, device=device, dtype=dtype)
        output = transformer(
            hidden_states=pack_latents(noisy_latents.to(dtype)),
            encoder_hidden_states=hidden,
            pooled_projections=conditioning["pooled_projections"].to(device, dtype),
            timestep=(timesteps / 1000).to(dtype),
            img_ids=image_position_ids(height // 2, width // 2, device),
            txt_ids=torch.zeros(hidden.shape[1], 3, device=device),
            guidance=guidance,
            joint_attention_kwargs=kwargs,
        ).sample
        velocity = unpack_latents(output, height, width)
        return flow_matching.prediction_for_loss(velocity, noisy_latents, timesteps, self.options.flow)

    def text_encoding_settings(self) -> tuple:
        return (self.t5_max_tokens, self.options.apply_t5_attn_mask)

    # ---- adapter networks ----------------------------------------------------------------------------------

    def network_text_encoders(self, models: LoadedModels) -> list[torch.nn.Module]:
        clip, t5 = models.text_encoders
        return [with_text_model_level(clip), t5]

    @classmethod
    def adapter_targets_for(cls, text_encoders, denoiser) -> TargetTable | None:
        """CLIP-L (`lora_te1`), T5-XXL (`lora_te3`, with train_t5xxl) and every Linear of the transformer under its
        BFL name; a fused BFL Linear (q|k|v, single blocks' linear1) is one target over its diffusers parts."""
        from diffusers import FluxTransformer2DModel

        kinds = [type(encoder).__name__ for encoder in text_encoders]
        clip_first = len(kinds) == 2 and kinds[0].startswith(("CLIP", "TextModelLevel"))
        encoders_match = clip_first and kinds[1].startswith("T5")
        if not (isinstance(denoiser, FluxTransformer2DModel) or (denoiser is None and encoders_match)):
            return None
        targets = []
        if text_encoders:
            targets += clip_targets(text_encoders[0], "lora_te1", 0, "text_encoder")
        if len(text_encoders) > 1:
            targets += t5_targets(text_encoders[1], "lora_te3", 1)
        if denoiser is not None:
            targets += transformer_targets(denoiser)
        return TargetTable(targets, len(text_encoders), FLUX_TARGET_ARGS)

    # ---- sample images -------------------------------------------------------------------------------------

    def sample_scheduler(self, sampler: str):
        """FLUX samples with the flow-matching Euler schedule of its release (resolution-dependent shift)."""
        if sampler not in ("euler", "k_euler", "ddim"):
            logger.info("--sample_sampler %s: FLUX.1 samples with flow-matching Euler", sampler)
        return flux_files.release_scheduler()

    def make_pipeline(self, models: LoadedModels, scheduler):
        from diffusers import FluxPipeline

        clip, t5 = models.text_encoders
        return FluxPipeline(
            scheduler=scheduler,
            vae=models.vae,
            text_encoder=clip,
            tokenizer=models.tokenizers[0],
            text_encoder_2=t5,
            tokenizer_2=models.tokenizers[1],
            transformer=models.denoiser,
        )

    def sample_prompt_inputs(self, models: LoadedModels, prompt: str, negative_prompt: str) -> dict:
        """Our own text encoding (T5 length and mask as in training); the prompt's scale is the guidance the dev
        model embeds (schnell ignores it). FLUX.1 draws without a negative prompt."""
        encoded = self.encode_text(models, [prompt])
        return {
            "prompt_embeds": encoded["encoder_hidden_states"],
            "pooled_prompt_embeds": encoded["pooled_projections"],
        }

    # ---- saving and metadata -------------------------------------------------------------------------------

    def save_model(
        self, models: LoadedModels, path: str, save_as: str, dtype: torch.dtype | None, metadata: dict[str, str]
    ) -> None:
        """The transformer as one BFL file (safetensors / ckpt), or every model as a diffusers folder."""
        if save_as in ("diffusers", "diffusers_safetensors"):
            parts = {"transformer": models.denoiser, "ae": models.vae, "clip_l": models.text_encoders[0],
                     "t5xxl": models.text_encoders[1]}  # fmt: skip
            if dtype is not None:
                logger.warning("--save_precision does not apply to diffusers folders; the weights keep their precision")
            flux_files.save_diffusers_folder(parts, models.tokenizers, path, safe=save_as == "diffusers_safetensors")
            return
        flux_files.save_transformer(models.denoiser, path, dtype, metadata)

    def base_model_version(self) -> str:
        return BASE_MODEL_VERSION

    def training_metadata(self) -> dict[str, str]:
        options = self.options
        return {
            "ss_base_model_version": BASE_MODEL_VERSION,
            "ss_flux_variant": self.variant,
            "ss_sd_model_name": os.path.basename(options.pretrained_model_name_or_path.rstrip("/\\")),
            "ss_ae_name": os.path.basename(options.ae) if options.ae else "None",
            "ss_apply_t5_attn_mask": str(options.apply_t5_attn_mask),
            "ss_t5xxl_max_token_length": str(self.t5_max_tokens),
            "ss_guidance_scale": str(options.guidance_scale),
            **flow_matching.flow_training_metadata(options.flow),
        }

    def model_spec_architecture(self) -> str:
        return f"flux-1-{self.variant}"
