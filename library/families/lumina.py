"""Family `lumina`: Lumina Image 2.0, a Next-DiT transformer reading the second-to-last hidden state of Gemma2-2B
and the latents of FLUX.1's 16-channel AE, from the released single files or a diffusers folder.

Captions are read as `<system prompt> <Prompt Start> <caption>` when a system prompt is set. The transformer counts
time the other way round (t = 1 is the clean image) and predicts clean minus noise, the negative of the velocity
library.training.flow_matching trains, so `predict` turns both around.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass

import torch

from library.adapters.targets import (
    UNET_PREFIX,
    AdapterTarget,
    TargetArgs,
    TargetTable,
    encoder_linear_targets,
    lora_name,
)
from library.checkpoints import lumina_configs, lumina_files, lumina_keys
from library.checkpoints.files import safetensors_keys
from library.checkpoints.gemma_tokenizer import load_gemma_tokenizer
from library.errors import CheckpointError, ConfigError
from library.families import lumina_attention
from library.families.base import LoadedModels, ModelFamily, TrainingInputs
from library.training import flow_matching, fp8
from library.training.noise import NoiseOptions

logger = logging.getLogger(__name__)

BASE_MODEL_VERSION = "lumina2"  # the reference's ss_base_model_version
ARCHITECTURE = "lumina-2"  # modelspec.architecture
IMPLEMENTATION = "https://github.com/Alpha-VLLM/Lumina-Image-2.0"  # modelspec.implementation, as the reference writes
GEMMA2_BLOCKS = ("Gemma2*Attention", "Gemma2MLP")  # the Gemma2 blocks whose Linears the reference adapts
BLOCK_LISTS = ("layers", "noise_refiner", "context_refiner")
BLOCK_PARTS = {"attention": "attn", "feed_forward": "mlp", "adaLN_modulation": "mod"}
EMBEDDERS = ("x_embedder", "t_embedder", "cap_embedder")
# kind_dims: a later arg wins where two name the same kind, so attention, feed-forward and modulation ranks beat
# refiner_dim inside the refiners (the reference's order of precedence).
LUMINA_TARGET_ARGS = TargetArgs(
    kind_dims={"refiner_dim": ("refiner_attn", "refiner_mlp", "refiner_mod"),
               "mod_dim": ("mod", "refiner_mod", "final_mod"),
               "mlp_dim": ("mlp", "refiner_mlp"),
               "attn_dim": ("attn", "refiner_attn")},
    list_dims={"embedder_dims": EMBEDDERS},
    block_indices={"train_block_indices": "layers"},
)  # fmt: skip
SD_ONLY_OPTIONS = ("v2", "v_parameterization", "clip_skip")
SAMPLE_SIZE_MULTIPLE = 16  # Lumina2Pipeline draws only sides divisible by 16 (8x AE, 2x2 patches)


@dataclass
class LuminaOptions:
    """The `lumina` family's options, typed."""

    pretrained_model_name_or_path: str
    gemma2: str | None
    ae: str | None
    gemma2_max_token_length: int | None
    system_prompt: str
    use_flash_attn: bool
    use_sage_attn: bool
    sample_batch_size: int | None
    tokenizer_cache_dir: str | None
    gemma2_tokenizer: str | None
    allow_pickle: bool
    mixed_precision: str
    sample_prompts: str | None
    refused: list[str]  # SD-only or attention options given, refused by `validate`
    flow: flow_matching.FlowMatchingOptions

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LuminaOptions:
        refused = [f"--{name}" for name in SD_ONLY_OPTIONS if getattr(args, name, None) not in (None, False)]
        refused += [f"--{name}" for name in ("xformers", "mem_eff_attn") if getattr(args, name, False)]
        return cls(
            pretrained_model_name_or_path=args.pretrained_model_name_or_path,
            gemma2=args.gemma2,
            ae=args.ae,
            gemma2_max_token_length=args.gemma2_max_token_length,
            system_prompt=args.system_prompt or "",
            use_flash_attn=args.use_flash_attn,
            use_sage_attn=args.use_sage_attn,
            sample_batch_size=args.sample_batch_size,
            tokenizer_cache_dir=args.tokenizer_cache_dir,
            gemma2_tokenizer=args.gemma2_tokenizer,
            allow_pickle=args.allow_pickle,
            mixed_precision=args.mixed_precision,
            sample_prompts=getattr(args, "sample_prompts", None),
            refused=refused,
            flow=flow_matching.FlowMatchingOptions.from_args(args),
        )

    def sources(self) -> lumina_files.LuminaSources:
        """Where each model comes from; a ComfyUI all-in-one checkpoint also provides Gemma2 and the AE."""
        path = self.pretrained_model_name_or_path
        if os.path.isdir(path):
            return lumina_files.LuminaSources(path, None, self.gemma2, self.ae, self.allow_pickle)
        gemma2, ae = self.gemma2, self.ae
        if path.endswith(".safetensors") and lumina_keys.component_of(safetensors_keys(path)) == "checkpoint":
            gemma2, ae = gemma2 or path, ae or path
        return lumina_files.LuminaSources(None, path, gemma2, ae, self.allow_pickle)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the three models and the tokenizer come from."""
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="the Lumina Image 2.0 transformer: the released single file (or its bf16 repack), a ComfyUI all-in-one "
        "checkpoint, or a local diffusers Lumina2Pipeline folder",
    )
    parser.add_argument("--gemma2", type=str, default=None, help="the Gemma2-2B text encoder file (.safetensors)")
    parser.add_argument("--ae", type=str, default=None, help="the autoencoder file: FLUX.1's ae.safetensors")
    parser.add_argument(
        "--gemma2_tokenizer",
        type=str,
        default=None,
        help="folder of the Gemma tokenizer (tokenizer.json, or tokenizer.model with sentencepiece installed); by "
        "default the diffusers folder's tokenizer/, --tokenizer_cache_dir (gemma2/ or sd-scripts' layout) or the "
        "Hugging Face cache",
    )
    parser.add_argument(
        "--tokenizer_cache_dir",
        type=str,
        default=None,
        help="folder whose gemma2/ subfolder holds the Gemma tokenizer (for offline training), or one kohya-ss "
        "sd-scripts filled (models--google--gemma-2-2b/; read only); a tokenizer found in the Hugging Face cache is "
        "saved in its gemma2/ on first use",
    )


def add_conditioning_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gemma2_max_token_length",
        type=int,
        default=None,
        help=f"Gemma2 tokens per caption, system prompt included (default {lumina_configs.GEMMA2_MAX_TOKENS})",
    )
    parser.add_argument(
        "--system_prompt",
        type=str,
        default="",
        help="text put before every caption and sample prompt, joined by ' <Prompt Start> ' (e.g. 'You are an "
        "assistant designed to generate high-quality images based on user prompts.'); default none",
    )
    parser.add_argument(
        "--use_flash_attn",
        action="store_true",
        help="compute attention with FlashAttention (the flash-attn package, a CUDA GPU, bf16 / fp16)",
    )
    parser.add_argument(
        "--use_sage_attn",
        action="store_true",
        help="compute attention with SageAttention where no gradient is needed: sample images and validation "
        "(the sageattention package, a CUDA GPU, bf16 / fp16)",
    )
    parser.add_argument(
        "--sample_batch_size",
        type=int,
        default=None,
        help="accepted for the reference's commands; sample images are drawn one prompt at a time, each with its "
        "own seed",
    )


def add_refused_arguments(parser: argparse.ArgumentParser) -> None:
    """SD 1.x / 2.x options the reference's Lumina scripts accept but ignore: refused with a line saying so."""
    parser.add_argument("--v2", action="store_true", help="SD 2.x only; refused (Lumina 2 has no such variant)")
    parser.add_argument(
        "--v_parameterization", action="store_true", help="SD only; refused (Lumina 2 is trained by flow matching)"
    )
    parser.add_argument("--clip_skip", type=int, default=None, help="SD only; refused (Lumina 2 has no CLIP)")


def target_kind(module: str) -> str:
    """What the family's --network_args select a transformer Linear by (see LUMINA_TARGET_ARGS)."""
    path = module.split(".")
    if path[0] in BLOCK_LISTS:
        part = BLOCK_PARTS[path[2]]
        return part if path[0] == "layers" else f"refiner_{part}"
    if path[0] == "final_layer":
        return "final_mod" if path[1] == "adaLN_modulation" else "final"
    return path[0]  # an embedder


def transformer_targets(transformer: torch.nn.Module) -> list[AdapterTarget]:
    """Every Linear of the transformer under its released module name; the fused q|k|v is one target over its
    three diffusers parts (grouped-query attention: q is wider than k and v)."""
    targets = []
    for module, parts in lumina_keys.linear_modules(dict(transformer.config)):
        path = module.split(".")
        targets.append(AdapterTarget(
            lora_name(UNET_PREFIX, module), tuple(transformer.get_submodule(part) for part in parts), None, module,
            kind=target_kind(module), block=(path[0], int(path[1])) if path[0] in BLOCK_LISTS else None,
            diffusers_names=tuple(f"transformer.{part}" for part in parts),
        ))  # fmt: skip
    return targets


def other_family_line(path: str) -> str | None:
    """A message naming the right scripts when `path` holds another family's model (None: not recognised)."""
    from library.checkpoints.sd_keys import detect_model_type
    from library.families.sd import OTHER_SCRIPTS

    if os.path.isdir(path):
        family = _folder_family(path)
    else:
        family = detect_model_type(safetensors_keys(path)) if path.endswith(".safetensors") else "unknown"
        family = {"sd1": "sd", "sd2": "sd"}.get(family, family)
    if family in ("lumina", "unknown", None):
        return None
    name, scripts = OTHER_SCRIPTS.get(family, ("Stable Diffusion 1.x / 2.x", "train_network.py / fine_tune.py"))
    return f"{path}: a {name} model, not Lumina Image 2.0; train it with {scripts}"


def _folder_family(folder: str) -> str | None:
    """The family of a diffusers folder, from its pipeline class."""
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        return None
    with open(index, encoding="utf-8") as handle:
        pipeline = json.load(handle).get("_class_name", "")
    for prefix, family in (("Lumina", "lumina"), ("Flux", "flux"), ("StableDiffusion3", "sd3"),
                           ("StableDiffusionXL", "sdxl"), ("StableDiffusion", "sd")):  # fmt: skip
        if pipeline.startswith(prefix):
            return family
    return None


class LuminaFamily(ModelFamily):
    """Lumina Image 2.0 (Next-DiT 2B, Gemma2-2B, FLUX.1 AE)."""

    id = "lumina"
    default_sample_size = 1024
    default_sample_scale = 4.0  # Lumina2Pipeline's default CFG scale
    image_size_multiple = 16  # 8x AE downscaling, then 2x2 patches
    text_cache_suffix = "_lumina_te.safetensors"
    block_list_names = ("layers",)  # the joint blocks; the short refiner lists (2 blocks each) stay on the device

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.options = LuminaOptions.from_args(args)
        self.max_tokens = self.options.gemma2_max_token_length or lumina_configs.GEMMA2_MAX_TOKENS
        self.kernel: lumina_attention.Kernel | None = None  # set by `validate`
        self.compute_dtype = torch.float32
        self.saves_gemma2 = False  # lumina_train.py with --train_text_encoder writes Gemma2 beside the transformer
        self.sigma_table: torch.Tensor | None = None  # the shifted schedule, for --timestep_sampling sigma

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_model_arguments(parser)
        add_conditioning_arguments(parser)
        add_refused_arguments(parser)
        flow_matching.add_flow_matching_arguments(
            parser, timestep_sampling="shift", discrete_flow_shift=lumina_configs.DISCRETE_FLOW_SHIFT,
            model_prediction_type="raw",
        )  # fmt: skip

    @classmethod
    def add_method_arguments(cls, method: str, parser: argparse.ArgumentParser) -> None:
        if method == "network":  # the reference's module name; it is networks.lora with this family's targets
            parser.set_defaults(network_module="networks.lora_lumina")

    # ---- checks before loading -----------------------------------------------------------------------------

    def validate(self, method=None) -> None:
        options = self.options
        self._refuse_options()
        self._check_files()  # before the shared checks: their --blocks_to_swap limit reads this file
        super().validate(method)
        for name, value in (("--gemma2_max_token_length", options.gemma2_max_token_length),
                            ("--sample_batch_size", options.sample_batch_size)):  # fmt: skip
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be 1 or more, got {value}")
        if options.sample_batch_size not in (None, 1):
            logger.warning("--sample_batch_size %d is ignored: sample images are drawn one prompt at a time, each "
                           "with its own seed", options.sample_batch_size)  # fmt: skip
        self._check_sample_sizes()
        self.kernel = lumina_attention.chosen_kernel(options.use_flash_attn, options.use_sage_attn)
        lumina_attention.check_kernel(self.kernel, options.mixed_precision)
        if self.offload.fp8_denoiser:
            fp8.check_compute_dtype({"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.mixed_precision))
        if method is not None and method.trains_base_weights:
            self._check_full_training(method)
        for note in options.flow.ignored_settings():
            logger.warning("%s; it has no effect here", note)

    def _refuse_options(self) -> None:
        refused = self.options.refused
        if refused:
            verb, pronoun = ("does", "it") if len(refused) == 1 else ("do", "them")
            attention = any(name in ("--xformers", "--mem_eff_attn") for name in refused)
            hint = "; --use_flash_attn selects a faster attention kernel" if attention else ""
            raise ConfigError(
                f"{', '.join(refused)} {verb} not apply to Lumina Image 2.0 (a flow-matching transformer reading "
                f"Gemma2, with rotary positions in its own attention): remove {pronoun}{hint}"
            )

    def _check_files(self) -> None:
        options = self.options
        path = options.pretrained_model_name_or_path
        if not os.path.exists(path):
            raise CheckpointError(f"--pretrained_model_name_or_path: no such file or folder: {path}")
        for option, file in (("--gemma2", options.gemma2), ("--ae", options.ae)):
            if file is not None and not os.path.isfile(file):
                raise CheckpointError(f"{option}: file not found: {file}")
        other = other_family_line(path)
        if other is not None:
            raise CheckpointError(other)
        missing = options.sources().missing()
        if missing:
            raise ConfigError(
                f"a Lumina 2 single-file transformer needs the other models as files too: add {', '.join(missing)}"
            )

    def _check_sample_sizes(self) -> None:
        """Sample sizes the pipeline cannot draw are refused now rather than at the first sample."""
        if self.options.sample_prompts is None or not os.path.isfile(self.options.sample_prompts):
            return  # the sampling options report a missing file themselves
        from library.training.sampling import read_prompt_file, sample_size

        for index, prompt in enumerate(read_prompt_file(self.options.sample_prompts)):
            width, height = sample_size(prompt, self.default_sample_size)
            if width % SAMPLE_SIZE_MULTIPLE or height % SAMPLE_SIZE_MULTIPLE:
                raise ConfigError(
                    f"--sample_prompts {self.options.sample_prompts}: prompt {index + 1} is drawn at {width}x{height}; "
                    f"Lumina 2 draws sides in multiples of {SAMPLE_SIZE_MULTIPLE} pixels: change --w / --h"
                )

    def _check_full_training(self, method) -> None:
        if self.offload.fp8_denoiser:
            raise ConfigError("--fp8_base / --fp8_base_unet store frozen weights in fp8; lumina_train.py trains the "
                              "transformer's weights themselves: remove the option")  # fmt: skip
        self.saves_gemma2 = method.trains_text_encoder

    # ---- loading -------------------------------------------------------------------------------------------

    def load(self, weight_dtype: torch.dtype) -> LoadedModels:
        options = self.options
        sources = options.sources()
        tokenizer = load_gemma_tokenizer(options.gemma2_tokenizer, sources.folder, options.tokenizer_cache_dir)
        models = lumina_files.load_models(sources, weight_dtype, weight_dtype)
        transformer = models["transformer"]
        self.compute_dtype = weight_dtype
        logger.info("Lumina Image 2.0: %d layers, %d wide; Gemma2 sequence %d%s", transformer.config.num_layers,
                    transformer.config.hidden_size, self.max_tokens,
                    "; system prompt set" if options.system_prompt else "")  # fmt: skip
        loaded = LoadedModels(transformer, models["ae"], [models["gemma2"]], [tokenizer])
        for model in [loaded.denoiser, loaded.vae, *loaded.text_encoders]:
            model.requires_grad_(False)
            model.eval()
        lumina_attention.install(transformer, self.kernel)
        self._store_in_fp8(loaded)
        return loaded

    def _store_in_fp8(self, models: LoadedModels) -> None:
        from diffusers import Lumina2Transformer2DModel

        if self.offload.fp8_denoiser:
            skip = (*fp8.DENOISER_SKIP, *Lumina2Transformer2DModel._skip_layerwise_casting_patterns)
            fp8.store_in_fp8(models.denoiser, self.compute_dtype, skip)
        if self.offload.fp8_text_encoders:
            fp8.store_in_fp8(models.text_encoders[0], self.compute_dtype, fp8.TEXT_ENCODER_SKIP)

    def block_list_lengths(self) -> list[int] | None:
        """Joint blocks, from the diffusers config or the single file's tensor names."""
        path = self.options.pretrained_model_name_or_path
        if os.path.isdir(path):
            config_path = os.path.join(path, "transformer", "config.json")
            if not os.path.isfile(config_path):
                return None  # `validate` names the folder's problem
            with open(config_path, encoding="utf-8") as file:
                return [json.load(file)["num_layers"]]
        if path.endswith(".safetensors") and os.path.isfile(path):
            return [lumina_keys.block_counts(safetensors_keys(path))["layers"]]
        return None

    # ---- conditioning --------------------------------------------------------------------------------------

    def encode_images(self, models: LoadedModels, images: torch.Tensor) -> torch.Tensor:
        ae = models.vae
        return ae.encode(images.to(ae.device, ae.dtype)).latent_dist.sample()

    def scale_latents(self, models: LoadedModels, latents: torch.Tensor) -> torch.Tensor:
        config = models.vae.config
        return (latents - config.shift_factor) * config.scaling_factor

    def encode_prompts(self, models: LoadedModels, texts: list[str]) -> dict[str, torch.Tensor]:
        """Texts as Gemma2 reads them -> encoder_hidden_states (B, L, D) (its second-to-last hidden state) and
        encoder_attention_mask (B, L), padded on the right to the max length."""
        tokens = models.tokenizers[0](texts, padding="max_length", max_length=self.max_tokens, truncation=True,
                                      return_tensors="pt")  # fmt: skip
        gemma2 = models.text_encoders[0]
        device = gemma2.get_input_embeddings().weight.device
        output = gemma2(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device),
                        output_hidden_states=True)  # fmt: skip
        hidden = output.hidden_states[lumina_configs.GEMMA2_HIDDEN_STATE]
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": tokens.attention_mask}

    def encode_text(self, models: LoadedModels, captions: list[str]) -> dict[str, torch.Tensor]:
        """Captions with the system prompt in front, encoded."""
        prompt = self.options.system_prompt
        return self.encode_prompts(models, [lumina_configs.with_system_prompt(text, prompt) for text in captions])

    def text_encoding_settings(self) -> tuple:
        return (self.max_tokens, self.options.system_prompt)

    # ---- objective and prediction --------------------------------------------------------------------------

    def training_inputs(
        self,
        latents: torch.Tensor,
        generator: torch.Generator | None,
        noise: NoiseOptions,
        timesteps: torch.Tensor | None = None,
    ) -> TrainingInputs:
        image_tokens = (latents.shape[2] // 2) * (latents.shape[3] // 2)  # 2x2 patches
        if self.options.flow.timestep_sampling == "sigma" and self.sigma_table is None:
            self.sigma_table = flow_matching.discrete_sigmas(self.options.flow.discrete_flow_shift)
        return flow_matching.training_inputs(
            latents, generator, noise, self.options.flow, image_tokens, self.sigma_table, timesteps
        )

    def predict(self, models, noisy_latents, timesteps, conditioning) -> torch.Tensor:
        """The velocity for (B, 16, H, W) latents, in the space the prediction type compares."""
        device, dtype = noisy_latents.device, self.compute_dtype
        output = models.denoiser(
            hidden_states=noisy_latents.to(dtype),
            timestep=1 - timesteps.float() / flow_matching.NUM_TRAIN_TIMESTEPS,  # Lumina's t: 0 noise, 1 image
            encoder_hidden_states=conditioning["encoder_hidden_states"].to(device, dtype),  # (B, L, D)
            encoder_attention_mask=conditioning["encoder_attention_mask"].to(device),  # (B, L)
            return_dict=False,
        )[0]
        velocity = -output  # the transformer predicts clean minus noise
        return flow_matching.prediction_for_loss(velocity, noisy_latents, timesteps, self.options.flow)

    # ---- adapter networks ----------------------------------------------------------------------------------

    @classmethod
    def adapter_targets_for(cls, text_encoders, denoiser) -> TargetTable | None:
        """Gemma2's attention and MLP Linears (`lora_te`) and every Linear of the transformer under its released
        name (`lora_unet_layers_0_attention_qkv` ...); embedders only with embedder_dims."""
        from diffusers import Lumina2Transformer2DModel

        encoders_match = [type(encoder).__name__ for encoder in text_encoders] == ["Gemma2Model"]
        if not (isinstance(denoiser, Lumina2Transformer2DModel) or (denoiser is None and encoders_match)):
            return None
        targets = []
        if text_encoders:
            targets += encoder_linear_targets(text_encoders[0], "lora_te", 0, GEMMA2_BLOCKS, "gemma2", "",
                                              "text_encoder")  # fmt: skip
        if denoiser is not None:
            targets += transformer_targets(denoiser)
        return TargetTable(targets, len(text_encoders), LUMINA_TARGET_ARGS)

    # ---- sample images -------------------------------------------------------------------------------------

    def sample_scheduler(self, sampler: str):
        """Lumina 2 samples with the flow-matching Euler schedule of its release (shift 6)."""
        if sampler not in ("euler", "k_euler", "ddim"):
            logger.info("--sample_sampler %s: Lumina 2 samples with flow-matching Euler", sampler)
        return lumina_files.release_scheduler()

    def make_pipeline(self, models: LoadedModels, scheduler):
        from diffusers import Lumina2Pipeline

        return Lumina2Pipeline(transformer=models.denoiser, scheduler=scheduler, vae=models.vae,
                               text_encoder=models.text_encoders[0], tokenizer=models.tokenizers[0])  # fmt: skip

    def sample_prompt_inputs(self, models: LoadedModels, prompt: str, negative_prompt: str) -> dict:
        """Our own text encoding: the prompt with the system prompt, the negative prompt without (as the reference
        and Lumina2Pipeline do), on the transformer's device."""
        device = models.denoiser.x_embedder.weight.device
        positive = self.encode_text(models, [prompt])
        negative = self.encode_prompts(models, [negative_prompt])
        return {
            "prompt_embeds": positive["encoder_hidden_states"].to(device),
            "prompt_attention_mask": positive["encoder_attention_mask"].to(device),
            "negative_prompt_embeds": negative["encoder_hidden_states"].to(device),
            "negative_prompt_attention_mask": negative["encoder_attention_mask"].to(device),
        }

    # ---- saving and metadata -------------------------------------------------------------------------------

    def save_model(
        self, models: LoadedModels, path: str, save_as: str, dtype: torch.dtype | None, metadata: dict[str, str]
    ) -> None:
        """The transformer as one file in the released layout (and a trained Gemma2 beside it), or every model as
        a diffusers folder."""
        if save_as in ("diffusers", "diffusers_safetensors"):
            parts = {"transformer": models.denoiser, "gemma2": models.text_encoders[0], "ae": models.vae}
            if dtype is not None:
                logger.warning("--save_precision does not apply to diffusers folders; the weights keep their precision")
            lumina_files.save_diffusers_folder(
                parts, models.tokenizers[0], path, safe=save_as == "diffusers_safetensors"
            )
            return
        lumina_files.save_transformer(models.denoiser, path, dtype, metadata)
        if self.saves_gemma2:
            stem, extension = os.path.splitext(path)
            gemma2_path = f"{stem}_gemma2{extension}"
            lumina_files.save_gemma2(models.text_encoders[0], gemma2_path, dtype)
            logger.info("trained Gemma2 saved to %s", gemma2_path)

    def base_model_version(self) -> str:
        return BASE_MODEL_VERSION

    def training_metadata(self) -> dict[str, str]:
        options = self.options
        return {
            "ss_base_model_version": BASE_MODEL_VERSION,
            "ss_sd_model_name": os.path.basename(options.pretrained_model_name_or_path.rstrip("/\\")),
            "ss_gemma2_name": os.path.basename(options.gemma2) if options.gemma2 else "None",
            "ss_ae_name": os.path.basename(options.ae) if options.ae else "None",
            "ss_system_prompt": options.system_prompt,
            "ss_gemma2_max_token_length": str(self.max_tokens),
            **flow_matching.flow_training_metadata(options.flow),
        }

    def model_spec_architecture(self) -> str:
        return ARCHITECTURE

    def model_spec_extra(self) -> dict[str, str]:
        return {"modelspec.implementation": IMPLEMENTATION}
