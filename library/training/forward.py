"""The forward pass of a batch, shared by the training step, validation and the benchmarks: latents (cached or
encoded), the conditioning of the captions the method makes, noised inputs at the family's timesteps, the
denoiser's prediction. Loss functions are applied by the callers."""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from library.families.base import LoadedModels, ModelFamily, TrainingInputs
from library.methods.base import TrainingMethod
from library.training.noise import NoiseOptions
from library.training.parallel import global_batch_inputs


@dataclass
class EncodedBatch:
    """A batch in the denoiser's spaces: latents (B, C, h, w) and the conditioning `predict` takes."""

    latents: torch.Tensor
    conditioning: dict[str, torch.Tensor]


def encode_batch(
    family: ModelFamily,
    method: TrainingMethod | None,
    models: LoadedModels,
    batch: dict,
    device: torch.device,
    caption_rng: random.Random | None = None,
) -> EncodedBatch:
    """Latents and conditioning of a batch; gradients reach the text encoders only when the method trains them.

    The method prepares the captions (`caption_rng` is handed to it: validation passes its own, so the training
    run's random choices stay untouched); without a method the captions are used as they are.
    """
    with torch.no_grad():
        # Latents precomputed by a cache or by finetune/prepare_buckets_latents.py arrive in the batch.
        raw = batch["latents"] if batch.get("latents") is not None else family.encode_images(models, batch["images"])
        latents = family.scale_latents(models, raw.to(device))
    captions = batch["captions"] if method is None else method.prepare_captions(batch["captions"], caption_rng)
    with nullcontext() if method is not None and method.trains_text_encoder else torch.no_grad():
        if method is None:
            conditioning = family.encode_conditioning(models, captions, batch)
        else:
            conditioning = method.encode_conditioning(family, models, captions, batch)
    return EncodedBatch(latents, conditioning)


def predict_noised(
    family: ModelFamily,
    models: LoadedModels,
    encoded: EncodedBatch,
    generator: torch.Generator | None,
    noise: NoiseOptions,
    timesteps: torch.Tensor | None = None,
    processes: tuple[int, int] = (1, 0),
) -> tuple[torch.Tensor, TrainingInputs]:
    """Noise the latents (at `timesteps`, or the family's sampled ones) and run the denoiser: (prediction, inputs).

    With several training processes (`processes`: count, this one's index) the draws are those of the global batch
    and this process uses its slice of them (library/training/parallel.py).
    """
    inputs = global_batch_inputs(
        lambda latents: family.training_inputs(latents, generator, noise, timesteps), encoded.latents, processes
    )
    prediction = family.predict(models, inputs.noisy_latents, inputs.timesteps, encoded.conditioning)
    return prediction, inputs
