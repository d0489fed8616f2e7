"""Family `sd`: Stable Diffusion 1.x and 2.x (epsilon or v-prediction), from LDM single files or diffusers folders."""

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
    adaptable_layers,
    clip_targets,
    deduplicated,
    lora_name,
    text_encoder_prefix,
    with_text_model_level,
)
from library.checkpoints import sd_keys
from library.checkpoints.family_check import refuse_other_family, refuse_other_family_folder
from library.checkpoints.files import load_state_dict
from library.checkpoints.hub_models import check_hub_model, hub_offline, hub_vae_subfolder, is_hub_id
from library.checkpoints.sd_configs import ddpm_scheduler as make_noise_scheduler
from library.checkpoints.tokenizers import load_clip_tokenizer
from library.checkpoints.weights import assign_weights, empty_model
from library.errors import CheckpointError, ConfigError
from library.families.base import LoadedModels, ModelFamily, TrainingInputs
from library.text.weighted_captions import add_weighted_caption_arguments, apply_token_weights, token_weights
from library.training import fp8
from library.training.noise import NoiseOptions, perturb_input_noise, sample_noise, sample_timesteps

logger = logging.getLogger(__name__)

TOKENS_PER_CHUNK = 75  # CLIP sees 77 positions: BOS + 75 tokens + EOS
# kohya's UNet targets: every Linear / 1x1 conv of the attention blocks; with conv_dim (LoCon) also the ResNet and
# resampler blocks, their 3x3 convs included.
UNET_BLOCK_KINDS = {
    "Transformer2DModel": "attention",
    "ResnetBlock2D": "conv_block",
    "Downsample2D": "conv_block",
    "Upsample2D": "conv_block",
}
SD_TARGET_ARGS = TargetArgs(enables={"conv_dim": ("conv_block",)})
OTHER_SCRIPTS = {  # family of a refused checkpoint -> (name, scripts that train it)
    "sdxl": ("SDXL", "sdxl_train_network.py / sdxl_train.py"),
    "sd3": ("SD3", "sd3_train_network.py / sd3_train.py"),
    "flux": ("FLUX.1", "flux_train_network.py / flux_train.py"),
    "lumina": ("Lumina Image 2.0", "lumina_train_network.py / lumina_train.py"),
}


@dataclass
class SDOptions:
    """The `sd` family's options, typed."""

    pretrained_model_name_or_path: str
    v2: bool
    v_parameterization: bool
    clip_skip: int | None
    max_token_length: int
    vae: str | None
    tokenizer_cache_dir: str | None
    allow_pickle: bool
    no_token_padding: bool = False
    weighted_captions: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SDOptions":
        return cls(
            no_token_padding=args.no_token_padding,
            weighted_captions=args.weighted_captions,
            pretrained_model_name_or_path=args.pretrained_model_name_or_path,
            v2=args.v2,
            v_parameterization=args.v_parameterization,
            clip_skip=args.clip_skip,
            max_token_length=args.max_token_length or TOKENS_PER_CHUNK,
            vae=args.vae,
            tokenizer_cache_dir=args.tokenizer_cache_dir,
            allow_pickle=args.allow_pickle,
        )


def add_shared_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the SD-derived families (sd, sdxl): caption length, VAE replacement, tokenizer folder."""
    parser.add_argument(
        "--max_token_length",
        type=int,
        default=None,
        choices=[75, 150, 225],
        help="caption length in tokens (default 75); 150 and 225 encode the caption in 75-token chunks",
    )
    parser.add_argument(
        "--vae",
        type=str,
        default=None,
        help="replace the base model's VAE: a VAE file, a diffusers VAE folder, or a Hugging Face model id "
        "(e.g. stabilityai/sd-vae-ft-mse; read from the hub cache, downloaded only when online)",
    )
    parser.add_argument(
        "--tokenizer_cache_dir",
        type=str,
        default=None,
        help="folder to read the CLIP tokenizer from (for offline training): its files at the top, or the "
        "subfolders kohya-ss sd-scripts fills (openai_clip-vit-large-patch14/ ...; read only); a CLIP tokenizer "
        "rebuilt from open-clip-torch is saved at its top on first use",
    )


def refuse_other_families(model: str, own: tuple[str, ...], method) -> None:
    """Another family's diffusers folder or .safetensors file ends here, in one line naming its scripts (the file's
    header is enough: nothing is loaded)."""
    full_training = None if method is None else method.trains_base_weights
    if os.path.isdir(model):
        refuse_other_family_folder(model, own, full_training)
    elif model.lower().endswith(".safetensors") and os.path.isfile(model):
        refuse_other_family(model, own, full_training)


def check_model_paths(model: str, vae: str | None) -> None:
    """A checkpoint file or --vae that does not exist, or a hub model id that cannot be had offline, is reported
    before anything loads."""
    looks_like_file = os.path.splitext(model)[1].lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
    if looks_like_file and not os.path.isfile(model):
        raise CheckpointError(f"--pretrained_model_name_or_path: file not found: {model}")
    if is_hub_id(model):
        hint = "a local checkpoint file or diffusers model folder"
        check_hub_model(model, "--pretrained_model_name_or_path", ("unet/config.json",), hint)
    if vae is not None and is_hub_id(vae):
        check_hub_model(vae, "--vae", ("config.json", "vae/config.json"), "a local VAE file or folder")
    elif vae is not None and not os.path.exists(vae):
        raise CheckpointError(f"--vae: file or folder not found: {vae}")


class SDFamily(ModelFamily):
    """Stable Diffusion 1.x / 2.x."""

    id = "sd"

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.options = SDOptions.from_args(args)
        self.noise_scheduler = make_noise_scheduler(self.options.v_parameterization)
        self.is_v2 = self.options.v2
        self.weighted_captions = self.options.weighted_captions
        self.fp8_unet = bool(getattr(args, "fp8_base", False) or getattr(args, "fp8_base_unet", False))
        self.fp8_text_encoders = bool(getattr(args, "fp8_base", False))
        self.mixed_precision = getattr(args, "mixed_precision", "no")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--pretrained_model_name_or_path",
            type=str,
            required=True,
            help="base model: an SD 1.x/2.x checkpoint in the original single-file layout (.safetensors, or .ckpt "
            "read with the safe loader), a local diffusers model folder, or a diffusers model id on the hub",
        )
        parser.add_argument("--v2", action="store_true", help="the base model is SD 2.x (OpenCLIP text encoder)")
        parser.add_argument(
            "--v_parameterization",
            action="store_true",
            help="the base model predicts v (SD 2.x 768-v models); without it the target is the noise (epsilon)",
        )
        parser.add_argument(
            "--clip_skip",
            type=int,
            default=None,
            help="use the output of the N-th text encoder layer from the end (2 = penultimate). Leave unset for "
            "SD 2.x, which already conditions on the penultimate layer",
        )
        add_shared_model_arguments(parser)
        add_weighted_caption_arguments(parser)
        parser.add_argument(
            "--no_token_padding",
            action="store_true",
            help="do not pad captions to 77 tokens: each batch is padded only to its longest caption (the behaviour "
            "of the early diffusers DreamBooth); needs 75-token captions",
        )

    def validate(self, method=None) -> None:
        super().validate(method)
        options = self.options
        if options.clip_skip is not None and options.clip_skip < 1:
            raise ConfigError(f"--clip_skip must be 1 or more, got {options.clip_skip}")
        if self.weighted_captions and options.no_token_padding:
            raise ConfigError("--weighted_captions and --no_token_padding cannot be combined; drop one of them")
        if options.no_token_padding and options.max_token_length != TOKENS_PER_CHUNK:
            raise ConfigError(
                f"--no_token_padding works with 75-token captions only; remove it or --max_token_length "
                f"{options.max_token_length}"
            )
        if options.v_parameterization and not options.v2:
            logger.warning("--v_parameterization without --v2: fine for v-prediction SD 1.x models, unusual otherwise")
        check_model_paths(options.pretrained_model_name_or_path, options.vae)
        refuse_other_families(options.pretrained_model_name_or_path, ("sd1", "sd2"), method)
        self.check_fp8(method)

    def check_fp8(self, method) -> None:
        """--fp8_base / --fp8_base_unet: half-precision compute, and a method that keeps the base frozen."""
        if not self.fp8_unet:
            return
        fp8.check_compute_dtype({"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision))
        if method is not None and method.trains_base_weights:
            raise ConfigError(f"--fp8_base / --fp8_base_unet store the frozen base in fp8; the {method.name} method "
                              "trains those weights. Use them with LoRA-type training")  # fmt: skip

    # ---- loading -------------------------------------------------------------------------------------------

    def load(self, weight_dtype: torch.dtype) -> LoadedModels:
        path = self.options.pretrained_model_name_or_path
        if os.path.isfile(path):
            models = self._load_single_file(path, weight_dtype)
        else:
            models = self._load_diffusers(path, weight_dtype)
        if self.options.vae is not None:
            models.vae = self._load_vae(self.options.vae, weight_dtype)
        for model in [models.denoiser, models.vae, *models.text_encoders]:
            model.requires_grad_(False)
            model.eval()
        self.store_base_in_fp8(models, weight_dtype)
        return models

    def store_base_in_fp8(self, models: LoadedModels, compute_dtype: torch.dtype) -> None:
        """The frozen UNet (and with --fp8_base the text encoders) in fp8, cast per layer to the compute dtype."""
        if self.fp8_unet:
            fp8.store_in_fp8_per_layer(models.denoiser, compute_dtype, fp8.DENOISER_SKIP)
        if self.fp8_text_encoders:
            for encoder in models.text_encoders:
                fp8.store_in_fp8_per_layer(encoder, compute_dtype, fp8.TEXT_ENCODER_SKIP)

    def _load_single_file(self, path: str, weight_dtype: torch.dtype) -> LoadedModels:
        state_dict = load_state_dict(path, allow_pickle=self.options.allow_pickle)
        self._check_model_type(path, sd_keys.detect_model_type(state_dict.keys()))
        try:
            arch = sd_keys.infer_architecture(state_dict)
            components = sd_keys.split_ldm_checkpoint(state_dict, arch)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from err
        logger.info("%s: SD %s checkpoint (original layout)", path, "2.x" if arch.v2 else "1.x")
        del state_dict
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        # Upcasting attention costs nothing in fp32 and keeps SD 2.x from overflowing in fp16 (as its release does).
        unet_config = dict(arch.unet_config, upcast_attention=arch.v2)
        unet = empty_model(lambda: UNet2DConditionModel(**unet_config))
        assign_weights(unet, components.unet, weight_dtype, "UNet", path)
        vae = empty_model(lambda: AutoencoderKL(**arch.vae_config))
        assign_weights(vae, components.vae, weight_dtype, "VAE", path)
        text_encoder = empty_model(lambda: CLIPTextModel(CLIPTextConfig(**arch.text_config)))
        text_state = sd_keys.text_encoder_to_model_keys(components.text_encoder, text_encoder)
        assign_weights(text_encoder, text_state, weight_dtype, "text encoder", path)
        tokenizer = load_clip_tokenizer(arch.v2, cache_dir=self.options.tokenizer_cache_dir)
        extras = dict(components.extras)
        return LoadedModels(unet, vae, [text_encoder], [tokenizer], extras={"ldm_extras": extras})

    def _check_model_type(self, path: str, model_type: str) -> None:
        if model_type in OTHER_SCRIPTS:
            name, scripts = OTHER_SCRIPTS[model_type]
            raise CheckpointError(f"{path} is a {name} checkpoint, which this script does not train; use {scripts}")
        if model_type not in ("sd1", "sd2"):
            raise CheckpointError(f"{path} does not look like a Stable Diffusion 1.x/2.x checkpoint")
        file_is_v2 = model_type == "sd2"
        if file_is_v2 != self.options.v2:
            hint = "add --v2" if file_is_v2 else "remove --v2"
            raise ConfigError(
                f"{path} is an SD {'2.x' if file_is_v2 else '1.x'} checkpoint but --v2 is "
                f"{'not ' if not self.options.v2 else ''}given: {hint}"
            )

    def _load_diffusers(self, path: str, weight_dtype: torch.dtype) -> LoadedModels:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        local = os.path.isdir(path)
        if local and not os.path.isfile(os.path.join(path, "unet", "config.json")):
            raise CheckpointError(
                f"{path} is a folder but not a diffusers model (no unet/config.json); give a diffusers model folder "
                "or a single checkpoint file"
            )
        kwargs = {"torch_dtype": weight_dtype, "local_files_only": local or hub_offline()}  # hub ids: cache first
        try:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kwargs)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kwargs)
            text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kwargs)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot load the diffusers model {path}: {err}") from err
        uses_open_clip = text_encoder.config.hidden_act == "gelu"
        if uses_open_clip != self.options.v2:
            hint = "add --v2" if uses_open_clip else "remove --v2"
            raise ConfigError(f"{path} is an SD {'2.x' if uses_open_clip else '1.x'} model: {hint}")
        tokenizer = load_clip_tokenizer(
            self.options.v2, model_dir=path if local else None, cache_dir=self.options.tokenizer_cache_dir
        )
        return LoadedModels(unet, vae, [text_encoder], [tokenizer])

    def _load_vae(self, path: str, weight_dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import AutoencoderKL

        if os.path.isdir(path):
            subfolder = "vae" if os.path.isdir(os.path.join(path, "vae")) else None
            return AutoencoderKL.from_pretrained(path, subfolder=subfolder, torch_dtype=weight_dtype)
        if is_hub_id(path):  # from the hub cache; downloaded into it when online
            vae = AutoencoderKL.from_pretrained(
                path, subfolder=hub_vae_subfolder(path), torch_dtype=weight_dtype, local_files_only=hub_offline()
            )
            logger.info("VAE replaced by %s (Hugging Face model)", path)
            return vae
        state_dict = load_state_dict(path, allow_pickle=self.options.allow_pickle)
        vae_config, vae_state = sd_keys.split_ldm_vae(state_dict, path)
        vae = empty_model(lambda: AutoencoderKL(**vae_config))
        assign_weights(vae, vae_state, weight_dtype, "VAE", path)
        logger.info("VAE replaced by %s", path)
        return vae

    # ---- conditioning and objective ------------------------------------------------------------------------

    def encode_images(self, models: LoadedModels, images: torch.Tensor) -> torch.Tensor:
        vae = models.vae
        return vae.encode(images.to(vae.device, vae.dtype)).latent_dist.sample()

    def scale_latents(self, models: LoadedModels, latents: torch.Tensor) -> torch.Tensor:
        return latents * models.vae.config.scaling_factor

    def tokenize(self, tokenizer, captions: list[str]) -> torch.Tensor:
        """Token ids (B, chunks * 77): each 75-token chunk of the caption as its own BOS ... EOS sequence.

        With --no_token_padding: (B, L), BOS + caption + EOS padded only to the batch's longest (L <= 77).
        """
        if self.options.no_token_padding:
            return tokenize_unpadded(tokenizer, captions)
        chunks = self.options.max_token_length // TOKENS_PER_CHUNK
        content = tokenizer(
            captions, add_special_tokens=False, truncation=True, max_length=chunks * TOKENS_PER_CHUNK
        ).input_ids
        framed = [
            frame_token_chunks(ids, chunks, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
            for ids in content
        ]
        return torch.tensor(framed, dtype=torch.long)

    def encode_text(self, models: LoadedModels, captions: list[str]) -> dict[str, torch.Tensor]:
        text_encoder = models.text_encoders[0]
        if self.weighted_captions:
            ids, weights = self.tokenize_weighted(models.tokenizers[0], captions)
        else:
            ids, weights = self.tokenize(models.tokenizers[0], captions), None
        ids = ids.to(text_encoder.device)
        if self.options.no_token_padding:  # one chunk of the batch's own length
            return {"encoder_hidden_states": self._text_hidden_states(text_encoder, ids)}
        batch, length = ids.shape
        chunks = length // (TOKENS_PER_CHUNK + 2)
        hidden = self._text_hidden_states(text_encoder, ids.reshape(batch * chunks, TOKENS_PER_CHUNK + 2))
        hidden = merge_chunk_states(hidden.reshape(batch, chunks, TOKENS_PER_CHUNK + 2, -1))
        if weights is not None:
            merged = merge_chunk_states(weights.view(batch, chunks, TOKENS_PER_CHUNK + 2, 1)).squeeze(-1)
            hidden = apply_token_weights(hidden, merged.to(hidden.device, hidden.dtype))
        return {"encoder_hidden_states": hidden}

    def tokenize_weighted(self, tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `tokenize`, for `(text:1.2)` / `[text]` captions: ids without the markup and each token's weight."""
        chunks = self.options.max_token_length // TOKENS_PER_CHUNK
        framed_ids, framed_weights = [], []
        for caption in captions:
            ids, weights = token_weights(tokenizer, caption, chunks * TOKENS_PER_CHUNK)
            framed_ids.append(frame_token_chunks(ids, chunks, tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                 tokenizer.pad_token_id))
            framed_weights.append(frame_token_chunks(weights, chunks, 1.0, 1.0, 1.0))
        return torch.tensor(framed_ids, dtype=torch.long), torch.tensor(framed_weights, dtype=torch.float32)

    def _text_hidden_states(self, text_encoder: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        clip_skip = self.options.clip_skip or 1
        output = text_encoder(ids, output_hidden_states=clip_skip > 1)
        if clip_skip == 1:
            return output.last_hidden_state
        final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
        return final_norm(output.hidden_states[-clip_skip])

    def training_inputs(
        self,
        latents: torch.Tensor,
        generator: torch.Generator | None,
        noise: NoiseOptions,
        timesteps: torch.Tensor | None = None,
    ) -> TrainingInputs:
        batch = latents.shape[0]
        noise_options = noise
        noise = sample_noise(latents, noise_options, generator)
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        if timesteps is None:
            timesteps = sample_timesteps(batch, num_timesteps, noise_options, generator, latents.device)
        noisy = self.noise_scheduler.add_noise(latents, perturb_input_noise(noise, noise_options, generator), timesteps)
        if self.options.v_parameterization:
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        weights = torch.ones(batch, device=latents.device, dtype=torch.float32)
        return TrainingInputs(noisy, timesteps, target, weights)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.noise_scheduler.alphas_cumprod

    @property
    def v_prediction(self) -> bool:
        return self.options.v_parameterization

    def predict(self, models, noisy_latents, timesteps, conditioning) -> torch.Tensor:
        unet = models.denoiser
        hidden = conditioning["encoder_hidden_states"].to(unet.dtype)
        return unet(noisy_latents.to(unet.dtype), timesteps, hidden).sample

    def network_text_encoders(self, models: LoadedModels) -> list[torch.nn.Module]:
        return [with_text_model_level(encoder) for encoder in models.text_encoders]

    @classmethod
    def adapter_targets_for(cls, text_encoders, denoiser) -> TargetTable | None:
        """CLIP encoders (`lora_te`, or `lora_te1`, `lora_te2` ...) and the UNet's attention blocks, plus its ResNet
        and resampler blocks with conv_dim, named by the module paths of the UNet given (SDXL gives an SGM view)."""
        is_unet = denoiser is not None and any(
            UNET_BLOCK_KINDS.get(type(module).__name__) == "attention" for module in denoiser.modules()
        )
        all_clip = all(type(encoder).__name__.startswith(("CLIP", "TextModelLevel")) for encoder in text_encoders)
        if not (is_unet or (denoiser is None and all_clip)):
            return None
        targets = []
        for index, encoder in enumerate(text_encoders):
            targets += clip_targets(encoder, text_encoder_prefix(index, len(text_encoders)), index)
        if denoiser is not None:
            targets += unet_targets(denoiser)
        return TargetTable(targets, len(text_encoders), SD_TARGET_ARGS)

    # ---- sample images -------------------------------------------------------------------------------------

    default_sample_size = 512

    def sample_scheduler(self, sampler: str):
        from library.training.sampling import make_scheduler

        return make_scheduler(sampler, self.noise_scheduler.config)

    def make_pipeline(self, models: LoadedModels, scheduler):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=models.vae,
            text_encoder=models.text_encoders[0],
            tokenizer=models.tokenizers[0],
            unet=models.denoiser,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def sample_prompt_inputs(self, models: LoadedModels, prompt: str, negative_prompt: str) -> dict:
        """Embeddings from our own text encoding, so clip skip and long prompts work as in training."""
        hidden = self.encode_text(models, [prompt, negative_prompt])["encoder_hidden_states"]  # (2, L, D)
        return {"prompt_embeds": hidden[:1], "negative_prompt_embeds": hidden[1:]}

    # ---- saving --------------------------------------------------------------------------------------------

    def save_model(
        self, models: LoadedModels, path: str, save_as: str, dtype: torch.dtype | None, metadata: dict[str, str]
    ) -> None:
        from library.checkpoints.sd_save import save_sd_model

        save_sd_model(models, path, save_as, dtype, metadata, self.options.v2, self.options.v_parameterization)

    # ---- metadata ------------------------------------------------------------------------------------------

    def base_model_version(self) -> str:
        return "sd_v2" if self.options.v2 else "sd_v1"

    def training_metadata(self) -> dict[str, str]:
        return {
            "ss_base_model_version": self.base_model_version(),
            "ss_v2": str(self.options.v2),
            "ss_v_parameterization": str(self.options.v_parameterization),
            "ss_clip_skip": str(self.options.clip_skip),
            "ss_max_token_length": str(self.options.max_token_length),
            "ss_sd_model_name": os.path.basename(self.options.pretrained_model_name_or_path.rstrip("/\\")),
            "ss_vae_name": os.path.basename(self.options.vae) if self.options.vae else "None",
        }

    def model_spec_architecture(self) -> str:
        if not self.options.v2:
            return "stable-diffusion-v1"
        return "stable-diffusion-v2-768-v" if self.options.v_parameterization else "stable-diffusion-v2-512"

    def model_spec_extra(self) -> dict[str, str]:
        spec = {"modelspec.prediction_type": "v" if self.options.v_parameterization else "epsilon"}
        if self.options.clip_skip:
            spec["modelspec.encoder_layer"] = str(self.options.clip_skip)
        return spec


def frame_token_chunks(ids: list[int], chunks: int, bos: int, eos: int, pad: int) -> list[int]:
    """Caption tokens (no BOS/EOS, at most chunks*75) -> chunks*77 ids: BOS, up to 75 tokens, EOS, padding.

    A chunk past the end of the caption is BOS, EOS and padding, like an empty caption.
    """
    framed: list[int] = []
    for index in range(chunks):
        sequence = [bos, *ids[index * TOKENS_PER_CHUNK : (index + 1) * TOKENS_PER_CHUNK], eos]
        framed += sequence + [pad] * (TOKENS_PER_CHUNK + 2 - len(sequence))
    return framed


def tokenize_unpadded(tokenizer, captions: list[str]) -> torch.Tensor:
    """(B, L): BOS, at most 75 caption tokens, EOS; shorter captions padded to the longest caption of the batch."""
    content = tokenizer(captions, add_special_tokens=False, truncation=True, max_length=TOKENS_PER_CHUNK).input_ids
    sequences = [[tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] for ids in content]
    length = max(len(sequence) for sequence in sequences)
    padded = [sequence + [tokenizer.pad_token_id] * (length - len(sequence)) for sequence in sequences]
    return torch.tensor(padded, dtype=torch.long)


def merge_chunk_states(hidden: torch.Tensor) -> torch.Tensor:
    """(B, chunks, 77, D) -> (B, 2 + chunks*75, D): first BOS state, every chunk's 75 inner states, last EOS state."""
    if hidden.shape[1] == 1:
        return hidden[:, 0]
    inner = hidden[:, :, 1:-1].reshape(hidden.shape[0], -1, hidden.shape[-1])
    return torch.cat([hidden[:, 0, :1], inner, hidden[:, -1, -1:]], dim=1)


def unet_targets(unet: torch.nn.Module) -> list[AdapterTarget]:
    """Every Linear / Conv2d inside the UNet's attention blocks (kind `attention`) and ResNet / resampler blocks
    (kind `conv_block`), in module order."""
    targets = []
    for block_name, block in unet.named_modules():
        kind = UNET_BLOCK_KINDS.get(type(block).__name__)
        if kind:
            for name, layer in adaptable_layers(block):
                path = f"{block_name}.{name}"
                targets.append(AdapterTarget(lora_name(UNET_PREFIX, path), (layer,), None, path, kind))
    return deduplicated(targets)
