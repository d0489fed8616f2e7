"""Sample images during training: the prompt file, when to draw, the sampler, and the drawing pass itself.

The pass draws with the models exactly as they are (adapters applied, evaluation mode, the run's precision) and
leaves the training run as it found it: module modes, optimizer mode and every random number generator.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib.util
import inspect
import json
import logging
import os
import re
import time
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from library.atomic import atomic_path
from library.errors import ConfigError, MissingPackageError
from library.training.evaluation import evaluation_weights

if TYPE_CHECKING:
    from library.families.base import ModelFamily
    from library.training.trainer import Run

logger = logging.getLogger(__name__)

# sampler name -> diffusers scheduler class and the settings that differ from its defaults. The SD releases ship
# DDIM / PNDM with set_alpha_to_one off and PNDM without its Runge-Kutta warm-up steps; first-order DPM-Solver
# cannot end on sigma 0 in diffusers.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": False}),
    "pndm": ("PNDMScheduler", {"set_alpha_to_one": False, "skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}
SAMPLER_ALIASES = {
    "k_lms": "lms",
    "k_euler": "euler",
    "k_euler_a": "euler_a",
    "k_dpm_2": "dpm_2",
    "k_dpm_2_a": "dpm_2_a",
}
SAMPLER_NAMES = (*SAMPLERS, *SAMPLER_ALIASES)
SCIPY_SAMPLERS = ("lms",)  # diffusers' LMS scheduler integrates its coefficients with scipy

SIZE_STEP = 8  # sample sides are rounded down to a multiple of the VAE's downscaling factor ...
MIN_SIZE = 64  # ... and kept at least this large
DEFAULT_STEPS = 30

# Prompt-file keys: the per-line option letter of .txt files and the key of .toml / .json entries.
PROMPT_KEYS = {
    "n": "negative_prompt",
    "w": "width",
    "h": "height",
    "d": "seed",
    "l": "scale",
    "s": "sample_steps",
}
_OPTION = re.compile(r"(?:^|\s)--([a-z]+)(?=\s|$)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the sample images drawn during training."""
    parser.add_argument(
        "--sample_every_n_steps", type=int, default=None, help="draw sample images every N training steps"
    )
    parser.add_argument(
        "--sample_every_n_epochs",
        type=int,
        default=None,
        help="draw sample images every N epochs (wins over --sample_every_n_steps when both are given)",
    )
    parser.add_argument(
        "--sample_at_first", action="store_true", help="also draw sample images before the first training step"
    )
    parser.add_argument(
        "--sample_prompts",
        type=str,
        default=None,
        help="prompt file: .txt (one prompt per line with --n --w --h --d --l --s options), .toml or .json",
    )
    parser.add_argument(
        "--sample_sampler",
        type=str,
        default="ddim",
        choices=SAMPLER_NAMES,
        help="sampler of the sample images (default ddim); k_* names are aliases of the names without k_",
    )


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image to draw. None: the family's default size and scale, or a seed derived from the run's seed."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    scale: float | None = None
    sample_steps: int = DEFAULT_STEPS


@dataclass
class SampleOptions:
    """Typed sampling options, with the prompt file already read and checked."""

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    at_first: bool = False
    prompts_file: str | None = None
    sampler: str = "ddim"
    prompts: list[SamplePrompt] = field(default_factory=list)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SampleOptions:
        options = cls(
            every_n_steps=getattr(args, "sample_every_n_steps", None),
            every_n_epochs=getattr(args, "sample_every_n_epochs", None),
            at_first=getattr(args, "sample_at_first", False),
            prompts_file=getattr(args, "sample_prompts", None),
            sampler=getattr(args, "sample_sampler", "ddim"),
        )
        options.validate()
        if options.prompts_file is not None:
            options.prompts = read_prompt_file(options.prompts_file)
        return options

    def validate(self) -> None:
        for name in ("every_n_steps", "every_n_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--sample_{name} must be 1 or more, got {value}")
        scheduled = self.every_n_steps is not None or self.every_n_epochs is not None or self.at_first
        if scheduled and self.prompts_file is None:
            raise ConfigError("sample images need prompts: add --sample_prompts <file> (.txt, .toml or .json)")
        if self.prompts_file is not None and not scheduled:
            logger.warning(
                "--sample_prompts is given but no sample is drawn: add --sample_every_n_steps, "
                "--sample_every_n_epochs or --sample_at_first"
            )
        if self.every_n_steps is not None and self.every_n_epochs is not None:
            logger.info("--sample_every_n_epochs wins over --sample_every_n_steps: samples are drawn per epoch")
        if canonical_sampler(self.sampler) in SCIPY_SAMPLERS and importlib.util.find_spec("scipy") is None:
            raise MissingPackageError(f"--sample_sampler {self.sampler} needs scipy: pip install scipy")

    @property
    def enabled(self) -> bool:
        return bool(self.prompts) and (
            self.at_first or self.every_n_steps is not None or self.every_n_epochs is not None
        )

    def check_family(self, family: ModelFamily) -> None:
        """Refuse sampling before any model loads when the family cannot draw yet."""
        if self.enabled and family.default_sample_size is None:
            raise ConfigError(f"the {family.id} family cannot draw sample images yet; leave out the --sample_* options")

    def due_after_step(self, global_step: int) -> bool:
        if not self.enabled or self.every_n_epochs is not None or self.every_n_steps is None:
            return False
        return global_step % self.every_n_steps == 0

    def due_after_epoch(self, epoch: int) -> bool:
        """`epoch` counts the finished epochs (1 after the first)."""
        return self.enabled and self.every_n_epochs is not None and epoch % self.every_n_epochs == 0


# ---- prompt files ------------------------------------------------------------------------------------------


def read_prompt_file(path: str) -> list[SamplePrompt]:
    """The prompts of a .txt, .toml or .json prompt file; ConfigError naming the file and entry on mistakes."""
    if not os.path.isfile(path):
        raise ConfigError(f"--sample_prompts: file not found: {path}")
    with open(path, encoding="utf-8-sig") as handle:
        text = handle.read()
    extension = os.path.splitext(path)[1].lower()
    if extension == ".toml":
        prompts = prompts_from_toml(text, path)
    elif extension == ".json":
        prompts = prompts_from_json(text, path)
    else:
        prompts = prompts_from_text(text, path)
    if not prompts:
        raise ConfigError(f"--sample_prompts {path} holds no prompt")
    return prompts


def prompts_from_text(text: str, source: str) -> list[SamplePrompt]:
    """One prompt per line; `#` starts a comment line; options `--n --w --h --d --l --s` follow the prompt."""
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(parse_prompt_line(line, f"{source} line {number}"))
    return prompts


def parse_prompt_line(line: str, where: str) -> SamplePrompt:
    """`a cat --n blurry, dark --w 512 --d 3`: each option's value runs up to the next option."""
    parts = _OPTION.split(line)  # [prompt, letter, value, letter, value, ...]
    values: dict[str, Any] = {"prompt": parts[0].strip()}
    for letter, value in zip(parts[1::2], parts[2::2], strict=True):
        if letter not in PROMPT_KEYS:
            allowed = ", ".join(f"--{known}" for known in PROMPT_KEYS)
            raise ConfigError(f"{where}: unknown option --{letter}; prompt lines take {allowed}")
        key = PROMPT_KEYS[letter]
        if key in values:
            raise ConfigError(f"{where}: option --{letter} is given twice")
        values[key] = value.strip() if key == "negative_prompt" else _number(key, value.strip(), f"{where}: --{letter}")
    return _checked(values, where)


def prompts_from_toml(text: str, source: str) -> list[SamplePrompt]:
    """`[prompt]` holds defaults for its `[[prompt.subset]]` entries, one entry per image."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source} is not valid TOML: {err}") from None
    table = data.get("prompt")
    if set(data) != {"prompt"} or not isinstance(table, dict) or not isinstance(table.get("subset"), list):
        raise ConfigError(
            f"{source}: expected a [prompt] table (shared defaults) with [[prompt.subset]] entries, one per image"
        )
    defaults = {key: value for key, value in table.items() if key != "subset"}
    return [
        prompt_from_record(
            defaults | _table(entry, f"{source} prompt.subset[{index}]"), f"{source} prompt.subset[{index}]"
        )
        for index, entry in enumerate(table["subset"])
    ]


def prompts_from_json(text: str, source: str) -> list[SamplePrompt]:
    """A list of objects with the keys of `PROMPT_KEYS` and `prompt`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source} is not valid JSON: {err}") from None
    if not isinstance(data, list):
        raise ConfigError(f'{source}: expected a list of prompt objects, e.g. [{{"prompt": "a cat", "seed": 1}}]')
    return [
        prompt_from_record(_table(entry, f"{source}[{index}]"), f"{source}[{index}]")
        for index, entry in enumerate(data)
    ]


def prompt_from_record(record: Mapping[str, Any], where: str) -> SamplePrompt:
    """One prompt from a .toml / .json entry; unknown keys are refused with a did-you-mean."""
    allowed = ("prompt", *PROMPT_KEYS.values())
    for key in record:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(allowed)}"
            raise ConfigError(f"{where}: unknown key '{key}'; {hint}")
    if not isinstance(record.get("prompt"), str):
        raise ConfigError(f"{where}: needs a text 'prompt'")
    values: dict[str, Any] = {"prompt": record["prompt"]}
    for key, value in record.items():
        if key == "negative_prompt":
            if not isinstance(value, str):
                raise ConfigError(f"{where}: negative_prompt must be text, got {value!r}")
            values[key] = value
        elif key != "prompt":
            values[key] = _number(key, value, f"{where}: {key}")
    return _checked(values, where)


def _table(entry: Any, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a table of prompt settings, got {entry!r}")
    return entry


def _number(key: str, value: Any, where: str) -> int | float:
    kind = float if key == "scale" else int
    if isinstance(value, bool) or (isinstance(value, float) and kind is int):
        raise ConfigError(f"{where} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be {'a number' if kind is float else 'an integer'}, got {value!r}") from None


def _checked(values: dict[str, Any], where: str) -> SamplePrompt:
    for key in ("width", "height"):
        if key in values and values[key] < SIZE_STEP:
            raise ConfigError(f"{where}: {key} must be at least {SIZE_STEP}, got {values[key]}")
    if values.get("sample_steps", 1) < 1:
        raise ConfigError(f"{where}: sample_steps must be 1 or more, got {values['sample_steps']}")
    if values.get("scale", 0.0) < 0:
        raise ConfigError(f"{where}: scale (CFG) must not be negative, got {values['scale']}")
    if values.get("seed", 0) < 0:
        raise ConfigError(f"{where}: seed must not be negative, got {values['seed']}")
    return SamplePrompt(**values)


# ---- samplers, sizes, names --------------------------------------------------------------------------------


def canonical_sampler(name: str) -> str:
    """`k_euler_a` -> `euler_a`; unknown names raise ConfigError."""
    name = SAMPLER_ALIASES.get(name, name)
    if name not in SAMPLERS:
        raise ConfigError(f"--sample_sampler {name} is unknown; choose one of {', '.join(SAMPLER_NAMES)}")
    return name


def make_scheduler(sampler: str, training_config: Mapping[str, Any]):
    """The diffusers scheduler of `sampler`, on the training noise schedule (betas, prediction type)."""
    import diffusers

    name = canonical_sampler(sampler)
    class_name, settings = SAMPLERS[name]
    if name in SCIPY_SAMPLERS and importlib.util.find_spec("scipy") is None:
        raise MissingPackageError(f"--sample_sampler {sampler} needs scipy: pip install scipy")
    scheduler_class = getattr(diffusers, class_name)
    # steps_offset 1 is the SD releases' inference setting (the last step lands on t=1, not t=0)
    extra = {"steps_offset": 1} if "steps_offset" in inspect.signature(scheduler_class.__init__).parameters else {}
    return scheduler_class.from_config(training_config, **extra, **settings)


def sample_size(prompt: SamplePrompt, default: int, multiple: int = SIZE_STEP) -> tuple[int, int]:
    """(width, height) to draw at: the prompt's or the family's default, rounded down to a multiple of `multiple`
    (the family's image-size multiple: 8, or 16 for the patch-based transformers)."""
    width = prompt.width if prompt.width is not None else default
    height = prompt.height if prompt.height is not None else default
    smallest = max(MIN_SIZE, multiple)
    return max(smallest, width - width % multiple), max(smallest, height - height % multiple)


def sample_file_name(output_name: str, when: str, index: int, timestamp: str, seed: int) -> str:
    """`<output_name>_<when>_<prompt index, 2 digits>_<YYYYmmddHHMMSS>_<seed>.png`."""
    return f"{output_name}_{when}_{index:02d}_{timestamp}_{seed}.png"


def when_label(global_step: int, epoch: int | None) -> str:
    """`e000002` after epoch 2; `000010` after step 10 (and at the start, `000000`)."""
    return f"e{epoch:06d}" if epoch is not None else f"{global_step:06d}"


# ---- the drawing pass --------------------------------------------------------------------------------------


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Run a block without consuming the training run's random numbers (torch CPU and the CUDA device)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=True):
        yield


@contextlib.contextmanager
def placed_on(module: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """`module` on `device` for the block and back where it was afterwards (a latent cache parks the VAE on the
    CPU, but the pipeline decodes on the device)."""
    original = next(module.parameters()).device
    module.to(device)
    try:
        yield
    finally:
        module.to(original)


def draw_samples(run: Run, epoch: int | None = None) -> list[str]:
    """Draw every prompt with the models as they are now; main process only, the others wait (with sharded modules
    every process draws, in step, and the main one writes). Returns paths."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    paths: list[str] = []
    if accelerator.is_main_process or run.parallel.every_process_evaluates:
        paths = _draw_on_main(run, epoch)
    accelerator.wait_for_everyone()
    return paths


def _draw_on_main(run: Run, epoch: int | None) -> list[str]:
    options, family, models = run.options.sampling, run.family, run.models
    folder = os.path.join(run.options.loop.output_dir, "sample")
    when = when_label(run.state.global_step, epoch)
    timestamp = time.strftime("%Y%m%d%H%M%S")
    started = time.perf_counter()
    device = run.accelerator.device
    with evaluation_weights(run, "samples"), preserved_rng(device), placed_on(models.vae, device), torch.no_grad():
        pipeline = family.make_pipeline(models, family.sample_scheduler(options.sampler))
        pipeline.set_progress_bar_config(disable=True)
        paths = [
            _draw_one(run, pipeline, prompt, index, folder, when, timestamp)
            for index, prompt in enumerate(options.prompts)
        ]
    if run.accelerator.is_main_process:
        logger.info("%d sample image(s) in %s (%.1f s)", len(paths), folder, time.perf_counter() - started)
    return paths


def _draw_one(run: Run, pipeline, prompt: SamplePrompt, index: int, folder: str, when: str, timestamp: str) -> str:
    family, models, accelerator = run.family, run.models, run.accelerator
    seed = prompt.seed if prompt.seed is not None else run.options.loop.seed + index
    width, height = sample_size(prompt, family.default_sample_size, family.image_size_multiple)
    scale = prompt.scale if prompt.scale is not None else family.default_sample_scale
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same image from the same seed on any device
    with accelerator.autocast():
        inputs = family.sample_prompt_inputs(models, prompt.prompt, prompt.negative_prompt)
        # embeddings encoded where the text encoders are (the CPU once their outputs are cached) go to the device
        inputs = {name: value.to(accelerator.device) if torch.is_tensor(value) else value
                  for name, value in inputs.items()}  # fmt: skip
        image = pipeline(
            **inputs,
            width=width,
            height=height,
            num_inference_steps=prompt.sample_steps,
            guidance_scale=scale,
            generator=generator,
        ).images[0]
    path = os.path.join(folder, sample_file_name(run.options.loop.output_name, when, index, timestamp, seed))
    described = replace(prompt, width=width, height=height, seed=seed, scale=scale)
    if accelerator.is_main_process:
        save_png(image, path, png_parameters(described, run.options.sampling.sampler))
    return path


def png_parameters(prompt: SamplePrompt, sampler: str) -> str:
    """The generation settings in the text layout image viewers of AUTOMATIC1111 / ComfyUI users read."""
    negative = f"\nNegative prompt: {prompt.negative_prompt}" if prompt.negative_prompt else ""
    return (
        f"{prompt.prompt}{negative}\nSteps: {prompt.sample_steps}, Sampler: {sampler}, CFG scale: {prompt.scale}, "
        f"Seed: {prompt.seed}, Size: {prompt.width}x{prompt.height}"
    )


def save_png(image, path: str, parameters: str) -> None:
    """Write a PIL image as PNG (atomically) with its settings in a `parameters` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    with atomic_path(path) as temp:
        image.save(temp, format="PNG", pnginfo=info)
