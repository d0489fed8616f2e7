"""Family `sd3`: Stable Diffusion 3 Medium, 3.5 Medium (MMDiT-X) and 3.5 Large, from the SAI single files users
download (with or without the text encoders inside), separate encoder files, or a diffusers folder.

Conditioning: CLIP-L's and CLIP-G's penultimate hidden states side by side, zero-padded to T5-XXL's width and
followed by T5-XXL's states along the sequence; the two CLIPs' pooled outputs side by side. The objective is SD3's
flow matching (timesteps drawn by --weighting_scheme, shifted by --training_shift, loss on the clean latents).
T5-XXL lives in `models.extras["t5xxl"]`; it joins `models.text_encoders` only when sd3_train.py trains its weights,
so the shared code never moves or trains it otherwise (it may run on its own device and dtype).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os

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
from library.checkpoints import sd3_files, sd3_keys
from library.checkpoints.family_check import file_keys, refuse_other_family
from library.data.cache_files import tensors_fingerprint
from library.data.text_cache import cache_text_outputs
from library.errors import CheckpointError, ConfigError
from library.families import sd3_options
from library.families.base import LoadedModels, ModelFamily, TrainingInputs
from library.families.sd3_positions import PositionCrop, latent_sizes
from library.training import flow_matching, fp8
from library.training.noise import NoiseOptions

logger = logging.getLogger(__name__)

# The model-spec architecture per variant; ss_base_model_version is the variant itself (sd3-medium, sd3.5-large ...):
# it starts with the family id, which the LoRA tools read. The reference writes medium / 5-medium / 5-large.
ARCHITECTURES = {"sd3-medium": "stable-diffusion-v3-medium", "sd3.5-medium": "stable-diffusion-v3.5-medium",
                 "sd3.5-large": "stable-diffusion-v3.5-large"}  # fmt: skip
TEXT_KEYS = ("clip_l_hidden", "clip_g_hidden", "t5_hidden", "clip_l_pooled", "clip_g_pooled")
DROPPED_KEYS = (("clip_l_hidden", "clip_l_pooled"), ("clip_g_hidden", "clip_g_pooled"), ("t5_hidden",))
# Adapter targets: CLIP-L `lora_te1`, CLIP-G `lora_te2`, T5-XXL `lora_te3`, the MMDiT by its SAI module names. Every
# Linear of the joint blocks by default; the embedders and the final layer only with emb_dims, ranked in this order.
EMB_KINDS = ("context_embedder", "t_embedder", "x_embedder", "y_embedder", "final_mod", "final_linear")
SD3_TARGET_ARGS = TargetArgs(
    kind_dims={
        f"{side}_{part}_dim": (f"{side}_{part}",) for side in ("context", "x") for part in ("attn", "mlp", "mod")
    },  # fmt: skip
    list_dims={"emb_dims": EMB_KINDS},
    block_indices={"train_block_indices": "joint_blocks"},
    enables={"train_t5xxl": ("t5",)},
)
BLOCK_PART_KINDS = {"attn": "attn", "attn2": "attn", "mlp": "mlp", "adaLN_modulation": "mod"}
COMPONENT_WORDS = {"vae": "a VAE", "clip": "a CLIP text encoder", "t5xxl": "a T5 text encoder",
                   "diffusers": "an SD3 transformer in diffusers naming (give its diffusers folder)"}  # fmt: skip


def target_kind(module: str) -> str:
    """What --network_args rank an SAI module by: `x_attn`, `context_mod` ... in the joint blocks (attn2 counts as
    attention), else the embedder or final-layer part it is."""
    path = module.split(".")
    if path[0] == "joint_blocks":
        side = "context" if path[2] == "context_block" else "x"
        return f"{side}_{BLOCK_PART_KINDS[path[3]]}"
    if path[0] == "final_layer":
        return "final_linear" if path[1] == "linear" else "final_mod"
    return path[0]


def transformer_targets(transformer: torch.nn.Module) -> list[AdapterTarget]:
    """The patch embedding and every Linear of the MMDiT under SAI module names; a fused q|k|v is one target over
    diffusers' three Linears."""
    config = dict(transformer.config)
    swapped = sd3_keys.half_swapped_modules(config)
    patch = AdapterTarget(
        lora_name(UNET_PREFIX, "x_embedder.proj"),
        (transformer.pos_embed.proj,),
        None,
        "x_embedder.proj",
        kind="x_embedder",
        diffusers_names=("transformer.pos_embed.proj",),
    )
    targets = [patch]
    for module, parts in sd3_keys.linear_modules(config):
        path = module.split(".")
        targets.append(AdapterTarget(
            lora_name(UNET_PREFIX, module), tuple(transformer.get_submodule(part) for part in parts), None, module,
            kind=target_kind(module), block=("joint_blocks", int(path[1])) if path[0] == "joint_blocks" else None,
            diffusers_names=tuple(f"transformer.{part}" for part in parts), swapped_halves=module in swapped,
        ))  # fmt: skip
    return targets


def joint_context(conditioning: dict, width: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(context (B, 77 + L, width), pooled (B, 768 + 1280)): the CLIP states side by side, zero-padded to T5's width,
    then T5's states along the sequence (what StableDiffusion3Pipeline.encode_prompt builds)."""
    parts = {key: conditioning[key].to(device, dtype) for key in TEXT_KEYS}
    clip = torch.cat([parts["clip_l_hidden"], parts["clip_g_hidden"]], dim=-1)  # (B, 77, 2048)
    clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
    context = torch.cat([clip, parts["t5_hidden"]], dim=-2)
    return context, torch.cat([parts["clip_l_pooled"], parts["clip_g_pooled"]], dim=-1)


def training_resolutions(group) -> list[tuple[int, int]]:
    """A dataset's (width, height) setting; its buckets when prepared latents fix the sizes instead."""
    if group.config.resolution is not None:
        return [tuple(group.config.resolution)]
    return [tuple(int(side) for side in size) for size in group.bucket_sizes]


class SD3Family(ModelFamily):
    """Stable Diffusion 3 / 3.5."""

    id = "sd3"
    default_sample_size = 1024
    image_size_multiple = 16  # 8x VAE downscaling, then 2x2 patches
    text_cache_suffix = "_sd3_te.safetensors"
    block_list_names = ("transformer_blocks",)  # the joint blocks

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.options = sd3_options.SD3Options.from_args(args)
        self.variant = "sd3-medium"  # read from the transformer when loaded
        self.compute_dtype = torch.float32
        self.t5_trains = False  # sd3_train.py --train_t5xxl: T5-XXL's own weights train
        self.clip_trains = False  # sd3_train.py --train_text_encoder
        self.text_encoders_train = False  # gradients reach the text encoders (adapters or weights)
        self.sizes: list[int] | None = None  # latent sides of the datasets, for --enable_scaled_pos_embed
        self.positions: PositionCrop | None = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        sd3_options.add_model_arguments(parser)
        sd3_options.add_conditioning_arguments(parser)
        sd3_options.add_objective_arguments(parser)
        sd3_options.add_refused_arguments(parser)

    @classmethod
    def add_method_arguments(cls, method: str, parser: argparse.ArgumentParser) -> None:
        sd3_options.add_method_arguments(method, parser)

    # ---- checks before loading -----------------------------------------------------------------------------

    def validate(self, method=None) -> None:
        options = self.options
        options.validate()
        self._check_files(method)  # before the block-swap limit, which reads the file's tensor names
        super().validate(method)
        if method is not None:
            self.text_encoders_train = method.trains_text_encoder
            self.clip_trains = method.trains_base_weights and method.trains_text_encoder
            self.t5_trains = self.clip_trains and options.train_t5xxl
            if method.trains_base_weights:
                self._check_full_training(method)
            elif options.save_clip or options.save_t5xxl:
                logger.warning("--save_clip / --save_t5xxl have no effect here: the network file holds adapters only")
        if self.offload.fp8_denoiser:
            fp8.check_compute_dtype({"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.mixed_precision))

    def _check_files(self, method) -> None:
        options = self.options
        path = options.pretrained_model_name_or_path
        sources = options.sources()
        if sources.folder is not None:
            found = sd3_options.diffusers_folder_class(path)
            if found not in (None, "StableDiffusion3Pipeline"):
                raise CheckpointError(f"{path} is a diffusers {found} folder, not SD3 / SD3.5")
        elif not os.path.isfile(path):
            raise CheckpointError(f"--pretrained_model_name_or_path: no such file or folder: {path}")
        else:
            self._check_family_of(path, method)
        for option, value in (("--clip_l", options.clip_l), ("--clip_g", options.clip_g), ("--t5xxl", options.t5xxl),
                              ("--vae", options.vae)):  # fmt: skip
            if value is not None and not os.path.isfile(value):
                raise CheckpointError(f"{option}: file not found: {value}")
        missing = sources.missing()
        if missing:
            raise ConfigError(f"{path} holds no {', '.join(name[2:] for name in missing)}: add {' '.join(missing)}")

    def _check_family_of(self, path: str, method) -> None:
        """Another family's checkpoint ends here, with the script that trains it; so does a single component."""
        keys = file_keys(path, self.options.allow_pickle)
        refuse_other_family(path, ("sd3",), None if method is None else method.trains_base_weights, keys=keys)
        found = sd3_keys.component_of(keys)
        if found != "transformer":
            raise CheckpointError(
                f"{path} holds {COMPONENT_WORDS.get(found, 'no known model')}, not an SD3 / SD3.5 "
                "model; give the model file (--clip_l / --clip_g / --t5xxl / --vae take the others)"
            )

    def _check_full_training(self, method) -> None:
        options = self.options
        if self.offload.fp8_denoiser:
            raise ConfigError("--fp8_base / --fp8_base_unet store frozen weights in fp8; sd3_train.py trains the "
                              "MMDiT's weights themselves: remove the option")  # fmt: skip
        if options.train_t5xxl and not method.trains_text_encoder:
            raise ConfigError("--train_t5xxl trains T5-XXL next to CLIP-L and CLIP-G: add --train_text_encoder")
        blocks = self.block_list_lengths()
        freeze = options.num_last_block_to_freeze
        if freeze and blocks is not None and freeze > blocks[0]:
            raise ConfigError(f"--num_last_block_to_freeze {freeze}: this MMDiT has {blocks[0]} joint blocks")
        if self.clip_trains and not options.save_clip:
            logger.info("CLIP-L and CLIP-G train: they are written into the saved single file (as with --save_clip)")
        if self.t5_trains and not options.save_t5xxl:
            logger.info("T5-XXL trains: it is written into the saved single file (as with --save_t5xxl)")

    def validate_run(self, dataset, trains_text_encoder: bool) -> None:
        super().validate_run(dataset, trains_text_encoder)
        if self.options.enable_scaled_pos_embed:
            self.sizes = latent_sizes([size for group in dataset.datasets for size in training_resolutions(group)])
            logger.info("scaled position embeddings for latent sizes %s", self.sizes)

    def block_list_lengths(self) -> list[int] | None:
        """Joint blocks, from the diffusers config or the single file's tensor names."""
        sources = self.options.sources()
        if sources.folder is not None:
            import json

            config_path = os.path.join(sources.folder, "transformer", "config.json")
            if not os.path.isfile(config_path):
                return None
            with open(config_path, encoding="utf-8") as file:
                return [json.load(file)["num_layers"]]
        if not sources.checkpoint.lower().endswith(".safetensors"):
            return None
        prefix = sd3_keys.TRANSFORMER_PREFIX
        names = (key.removeprefix(prefix) for key in file_keys(sources.checkpoint))
        indices = {name.split(".")[1] for name in names if name.startswith("joint_blocks.")}
        return [len(indices)] if indices else None

    # ---- loading and placing -------------------------------------------------------------------------------

    def load(self, weight_dtype: torch.dtype) -> LoadedModels:
        options = self.options
        loaded = sd3_files.load_models(options.sources(), weight_dtype, weight_dtype, options.t5_dtype)
        self.variant = loaded.variant
        self.compute_dtype = weight_dtype
        config = loaded.transformer.config
        logger.info("SD3 %s: %d joint blocks%s, T5 sequence %d", self.variant, config.num_layers,
                    f", MMDiT-X attention in {len(config.dual_attention_layers)}" if config.dual_attention_layers
                    else "", options.t5xxl_max_token_length)  # fmt: skip
        tokenizers = sd3_files.load_tokenizers(options.sources().folder, options.tokenizer_cache_dir,
                                               options.t5xxl_tokenizer)  # fmt: skip
        encoders = [loaded.clip_l, loaded.clip_g] + ([loaded.t5xxl] if self.t5_trains else [])
        models = LoadedModels(loaded.transformer, loaded.vae, encoders, tokenizers,
                              extras={"t5xxl": loaded.t5xxl, "file_extras": loaded.extras})  # fmt: skip
        for model in (models.denoiser, models.vae, loaded.clip_l, loaded.clip_g, loaded.t5xxl):
            model.requires_grad_(False)
            model.eval()
        self._install_positions(models.denoiser)
        self._store_in_fp8(models)
        return models

    def _install_positions(self, transformer: torch.nn.Module) -> None:
        options = self.options
        if not (options.pos_emb_random_crop_rate or options.enable_scaled_pos_embed):
            return
        if self.variant != "sd3.5-medium":
            logger.warning("--pos_emb_random_crop_rate / --enable_scaled_pos_embed were made for SD3.5 Medium; this "
                           "is %s", self.variant)  # fmt: skip
        self.positions = PositionCrop(transformer.pos_embed, options.pos_emb_random_crop_rate, self.sizes)
        self.positions.install()

    def _store_in_fp8(self, models: LoadedModels) -> None:
        if self.offload.fp8_denoiser:
            fp8.store_in_fp8(models.denoiser, self.compute_dtype, fp8.DENOISER_SKIP)
        if self.offload.fp8_text_encoders:
            t5 = self.t5(models)
            for encoder in (*models.text_encoders[:2], t5):
                dtype = (self.options.t5_dtype or self.compute_dtype) if encoder is t5 else self.compute_dtype
                fp8.store_in_fp8(encoder, dtype, fp8.TEXT_ENCODER_SKIP)

    @staticmethod
    def t5(models: LoadedModels) -> torch.nn.Module:
        return models.extras["t5xxl"]

    def place_models(self, models: LoadedModels, device: torch.device) -> None:
        super().place_models(models, device)
        self.t5(models).to(self.options.t5xxl_device or device)

    @staticmethod
    def compute_device(models: LoadedModels) -> torch.device:
        """Where the MMDiT computes (its embedders stay there under block swapping)."""
        return models.denoiser.pos_embed.proj.weight.device

    def before_training(self, models: LoadedModels, dataset) -> None:
        """T5-XXL to its device, checkpointed when adapters in it train; then the text-encoder output cache."""
        t5 = self.t5(models)
        t5.to(self.options.t5xxl_device or self.compute_device(models))
        if self.offload.gradient_checkpointing and self.text_encoders_train and t5 not in models.text_encoders:
            t5.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not self.text_cache_options.enabled:
            return
        encoders = [*models.text_encoders[:2], t5]
        weights = [param for encoder in encoders for param in encoder.parameters()]
        fingerprint = tensors_fingerprint(weights, self.id, *self.text_encoding_settings())
        self.text_cache, self.text_cache_counts = cache_text_outputs(
            self.text_cache_options, dataset, encoders, fingerprint, lambda captions: self.encode_text(models, captions)
        )

    # ---- conditioning --------------------------------------------------------------------------------------

    def encode_images(self, models: LoadedModels, images: torch.Tensor) -> torch.Tensor:
        vae = models.vae
        return vae.encode(images.to(vae.device, vae.dtype)).latent_dist.sample()

    def scale_latents(self, models: LoadedModels, latents: torch.Tensor) -> torch.Tensor:
        config = models.vae.config
        return (latents - config.shift_factor) * config.scaling_factor

    def tokenize(self, models: LoadedModels, captions: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(ids, mask) of CLIP-L (B, 77), CLIP-G (B, 77) and T5 (B, L), each padded to its full length."""
        lengths = (77, 77, self.options.t5xxl_max_token_length)
        tokens = []
        for tokenizer, length in zip(models.tokenizers, lengths):
            encoded = tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                                return_tensors="pt")  # fmt: skip
            tokens.append((encoded.input_ids, encoded.attention_mask))
        return tokens

    def encode_text(self, models: LoadedModels, captions: list[str]) -> dict[str, torch.Tensor]:
        """Each encoder's outputs: CLIP-L / CLIP-G penultimate states (B, 77, 768 / 1280) and pooled outputs
        (B, 768 / 1280), T5-XXL's last states (B, L, 4096). The masks reach the encoders with the apply options."""
        options = self.options
        (l_ids, l_mask), (g_ids, g_mask), (t5_ids, t5_mask) = self.tokenize(models, captions)
        encoded = {}
        for name, encoder, ids, mask in (("clip_l", models.text_encoders[0], l_ids, l_mask),
                                         ("clip_g", models.text_encoders[1], g_ids, g_mask)):  # fmt: skip
            mask = mask.to(encoder.device) if options.apply_lg_attn_mask else None
            output = encoder(ids.to(encoder.device), attention_mask=mask, output_hidden_states=True)
            encoded[f"{name}_hidden"], encoded[f"{name}_pooled"] = output.hidden_states[-2], output.text_embeds
        t5 = self.t5(models)
        mask = t5_mask.to(t5.device) if options.apply_t5_attn_mask else None
        encoded["t5_hidden"] = t5(t5_ids.to(t5.device), attention_mask=mask).last_hidden_state
        return encoded

    def encode_conditioning(self, models: LoadedModels, captions: list[str], batch: dict) -> dict[str, torch.Tensor]:
        """Encoded or cached captions, with each encoder's output zeroed for a random share of the samples
        (--clip_l_dropout_rate, --clip_g_dropout_rate, --t5_dropout_rate; validation draws them too, as the
        reference trainer does)."""
        conditioning = dict(super().encode_conditioning(models, captions, batch))
        for rate, keys in zip(self.options.dropout_rates, DROPPED_KEYS):
            if rate <= 0:
                continue
            keep = (torch.rand(len(captions)) >= rate).float()  # (B,) drawn on the CPU: no device sync
            for key in keys:
                value = conditioning[key]
                conditioning[key] = value * keep.to(value.device, value.dtype).view(-1, *[1] * (value.ndim - 1))
        return conditioning

    def text_encoding_settings(self) -> tuple:
        options = self.options
        return (options.t5xxl_max_token_length, options.apply_lg_attn_mask, options.apply_t5_attn_mask)

    # ---- objective and prediction --------------------------------------------------------------------------

    def training_inputs(
        self,
        latents: torch.Tensor,
        generator: torch.Generator | None,
        noise: NoiseOptions,
        timesteps: torch.Tensor | None = None,
    ) -> TrainingInputs:
        options = self.options
        if timesteps is None:
            timesteps = flow_matching.sample_shifted_timesteps(latents.shape[0], options.flow, generator,
                                                               options.training_shift, noise)  # fmt: skip
        return flow_matching.training_inputs(latents, generator, noise, options.flow, timesteps=timesteps)

    def predict(self, models, noisy_latents, timesteps, conditioning) -> torch.Tensor:
        """The clean latents (B, 16, H, W) implied by the MMDiT's velocity (SD3's preconditioning)."""
        transformer = models.denoiser
        device, dtype = noisy_latents.device, self.compute_dtype
        context, pooled = joint_context(conditioning, transformer.config.joint_attention_dim, device, dtype)
        positions = self.positions.training() if self.positions is not None else contextlib.nullcontext()
        with positions:
            velocity = transformer(
                hidden_states=noisy_latents.to(dtype),
                encoder_hidden_states=context,
                pooled_projections=pooled,
                timestep=timesteps.to(device, torch.float32),  # 0..1000, as the pipeline passes them
            ).sample
        return flow_matching.prediction_for_loss(velocity, noisy_latents, timesteps, self.options.flow)

    # ---- training the weights themselves (sd3_train.py) ----------------------------------------------------

    def text_encoder_learning_rates(self, default: float | None) -> list[float | None]:
        """CLIP-L, CLIP-G, T5-XXL: --learning_rate_te1/2/3, else `default`."""
        return [default if rate is None else rate for rate in self.options.text_encoder_lrs]

    def denoiser_param_groups(self, denoiser: torch.nn.Module, learning_rate: float) -> list[dict]:
        """The MMDiT's parameters, without the last --num_last_block_to_freeze joint blocks: those are frozen here
        (no gradients), so they stay bit-identical."""
        freeze = self.options.num_last_block_to_freeze or 0
        if freeze:
            for block in list(denoiser.transformer_blocks)[-freeze:]:
                block.requires_grad_(False)
            logger.info("the last %d joint blocks stay frozen (--num_last_block_to_freeze)", freeze)
        return [{"params": [param for param in denoiser.parameters() if param.requires_grad], "lr": learning_rate}]

    # ---- adapter networks ----------------------------------------------------------------------------------

    def network_text_encoders(self, models: LoadedModels) -> list[torch.nn.Module]:
        clip_l, clip_g = models.text_encoders[:2]
        return [with_text_model_level(clip_l), with_text_model_level(clip_g), self.t5(models)]

    @classmethod
    def adapter_targets_for(cls, text_encoders, denoiser) -> TargetTable | None:
        """CLIP-L (`lora_te1`), CLIP-G (`lora_te2`), T5-XXL (`lora_te3`, with train_t5xxl) and the MMDiT under SAI
        module names (`lora_unet_joint_blocks_0_x_block_attn_qkv` ...), the names ComfyUI maps."""
        from diffusers import SD3Transformer2DModel

        kinds = [type(encoder).__name__ for encoder in text_encoders]
        clips = all(kind.startswith(("CLIP", "TextModelLevel")) for kind in kinds[:2])
        encoders_match = len(kinds) == 3 and clips and kinds[2].startswith("T5")
        if not (isinstance(denoiser, SD3Transformer2DModel) or (denoiser is None and encoders_match)):
            return None
        targets = []
        for index, encoder in enumerate(text_encoders[:2]):
            targets += clip_targets(encoder, f"lora_te{index + 1}", index, ("text_encoder", "text_encoder_2")[index])
        if len(text_encoders) > 2:
            targets += t5_targets(text_encoders[2], "lora_te3", 2)
        if denoiser is not None:
            targets += transformer_targets(denoiser)
        return TargetTable(targets, len(text_encoders), SD3_TARGET_ARGS)

    # ---- sample images -------------------------------------------------------------------------------------

    def sample_scheduler(self, sampler: str):
        """SD3 samples with the releases' flow-matching Euler schedule (shift 3.0)."""
        if sampler not in ("euler", "k_euler", "ddim"):
            logger.info("--sample_sampler %s: SD3 samples with flow-matching Euler", sampler)
        return sd3_files.release_scheduler()

    def make_pipeline(self, models: LoadedModels, scheduler):
        """StableDiffusion3Pipeline without text encoders: prompts arrive encoded (`sample_prompt_inputs`)."""
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=models.denoiser, scheduler=scheduler, vae=models.vae, text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
        )  # fmt: skip

    def sample_prompt_inputs(self, models: LoadedModels, prompt: str, negative_prompt: str) -> dict:
        """Prompt and negative prompt encoded as training encodes captions (no dropout), on the MMDiT's device."""
        device, width = self.compute_device(models), models.denoiser.config.joint_attention_dim
        inputs = {}
        for name, text in (("", prompt), ("negative_", negative_prompt or "")):
            context, pooled = joint_context(self.encode_text(models, [text]), width, device, self.compute_dtype)
            inputs[f"{name}prompt_embeds"], inputs[f"{name}pooled_prompt_embeds"] = context, pooled
        return inputs

    # ---- saving and metadata -------------------------------------------------------------------------------

    def sd3_models(self, models: LoadedModels) -> sd3_files.SD3Models:
        clip_l, clip_g = models.text_encoders[:2]
        return sd3_files.SD3Models(models.denoiser, models.vae, clip_l, clip_g, self.t5(models),
                                   extras=models.extras.get("file_extras", {}))  # fmt: skip

    def saved_text_encoders(self) -> tuple[str, ...]:
        """Encoders written into a saved single file: those asked for and those trained."""
        clips = ("clip_l", "clip_g") if self.options.save_clip or self.clip_trains else ()
        return clips + (("t5xxl",) if self.options.save_t5xxl or self.t5_trains else ())

    def save_model(
        self, models: LoadedModels, path: str, save_as: str, dtype: torch.dtype | None, metadata: dict[str, str]
    ) -> None:
        """One SAI-layout file (MMDiT, VAE and the encoders of `saved_text_encoders`), or a diffusers folder."""
        if save_as in ("diffusers", "diffusers_safetensors"):
            if dtype is not None:
                logger.warning("--save_precision does not apply to diffusers folders; the weights keep their precision")
            sd3_files.save_diffusers_folder(self.sd3_models(models), models.tokenizers, path,
                                            safe=save_as == "diffusers_safetensors")  # fmt: skip
            return
        sd3_files.save_checkpoint(self.sd3_models(models), path, dtype, metadata, self.saved_text_encoders())

    def base_model_version(self) -> str:
        return self.variant

    def training_metadata(self) -> dict[str, str]:
        options = self.options

        def name(path: str | None) -> str:
            return os.path.basename(path.rstrip("/\\")) if path else "None"

        return {
            "ss_base_model_version": self.base_model_version(),
            "ss_sd_model_name": name(options.pretrained_model_name_or_path),
            "ss_vae_name": name(options.vae),
            "ss_clip_l": name(options.clip_l),
            "ss_clip_g": name(options.clip_g),
            "ss_t5xxl": name(options.t5xxl),
            "ss_apply_lg_attn_mask": str(options.apply_lg_attn_mask),
            "ss_apply_t5_attn_mask": str(options.apply_t5_attn_mask),
            "ss_t5xxl_max_token_length": str(options.t5xxl_max_token_length),
            "ss_clip_l_dropout_rate": str(options.dropout_rates[0]),
            "ss_clip_g_dropout_rate": str(options.dropout_rates[1]),
            "ss_t5_dropout_rate": str(options.dropout_rates[2]),
            "ss_pos_emb_random_crop_rate": str(options.pos_emb_random_crop_rate),
            "ss_enable_scaled_pos_embed": str(options.enable_scaled_pos_embed),
            "ss_training_shift": str(options.training_shift),
            "ss_weighting_scheme": options.flow.weighting_scheme,
            "ss_logit_mean": str(options.flow.logit_mean),
            "ss_logit_std": str(options.flow.logit_std),
            "ss_mode_scale": str(options.flow.mode_scale),
        }

    def model_spec_architecture(self) -> str:
        return ARCHITECTURES[self.variant]
