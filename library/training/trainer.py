"""The shared training loop: family x method, driven by typed options. Nothing here knows an architecture."""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from library.families.base import LoadedModels, ModelFamily
from library.methods.base import TrainingMethod
from library.training import metadata as md
from library.training.loop_options import LoopOptions
from library.training.optimizers import OptimizerOptions, build_lr_scheduler, build_optimizer

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROGRESS_INTERVAL = 10  # steps between loss read-backs for the progress bar (each read-back syncs the device)


@dataclass
class Schedule:
    """How long the run is."""

    steps_per_epoch: int
    num_epochs: int
    total_steps: int


@dataclass
class RunState:
    """What moves during training."""

    global_step: int = 0
    epoch: int = 0
    loss_sum: torch.Tensor | None = None
    loss_count: int = 0
    epoch_losses: list[float] = field(default_factory=list)


@dataclass
class Run:
    """Everything one training run holds, so the phases pass one object instead of many values."""

    family: ModelFamily
    method: TrainingMethod
    loop: LoopOptions
    optimizer_options: OptimizerOptions
    accelerator: object
    models: LoadedModels
    dataset: object
    dataloader: object
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    schedule: Schedule
    base_metadata: dict[str, str]
    generator: torch.Generator
    state: RunState = field(default_factory=RunState)


def train(family: ModelFamily, method: TrainingMethod, args: argparse.Namespace) -> str:
    """Validate everything, load, train, save. Returns the path of the final file."""
    from library.data.dataset import build_dataset_group

    loop = LoopOptions.from_args(args)
    optimizer_options = OptimizerOptions.from_args(args)
    family.validate()
    method.validate()
    if loop.seed is None:
        loop.seed = random.randint(0, 2**31 - 1)
        logger.info("seed %d (chosen at random; pass --seed to repeat this run)", loop.seed)
    dataset = build_dataset_group(args, seed=loop.seed, prior_loss_weight=args.prior_loss_weight)
    if getattr(args, "debug_dataset", False):
        return ""

    accelerator = _make_accelerator(loop)
    _configure_threads(loop, accelerator)
    from accelerate.utils import set_seed

    set_seed(loop.seed)
    started = md.new_session()
    load_start = time.perf_counter()
    models = family.load(WEIGHT_DTYPES[loop.mixed_precision])
    logger.info("models loaded in %.1f s", time.perf_counter() - load_start)
    _place_models(models, accelerator.device, loop, method)
    param_groups = method.setup(family, models)

    dataloader = dataset.make_dataloader(args.max_data_loader_n_workers, args.persistent_data_loader_workers)
    schedule = _make_schedule(loop, len(dataloader))
    optimizer = build_optimizer(optimizer_options, param_groups)
    lr_scheduler = build_lr_scheduler(optimizer_options, optimizer, schedule.total_steps)
    prepared = accelerator.prepare(*method.trainable_modules(), optimizer, dataloader, lr_scheduler)
    optimizer, dataloader, lr_scheduler = prepared[-3:]

    generator = torch.Generator(device=accelerator.device).manual_seed(loop.seed)
    base_metadata = _base_metadata(family, method, loop, optimizer_options, dataset, schedule, started, args)
    run = Run(family, method, loop, optimizer_options, accelerator, models, dataset, dataloader, optimizer, lr_scheduler, schedule,
              base_metadata, generator)
    _train_epochs(run)
    return _save(run, final=True)


def _make_accelerator(loop: LoopOptions):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=loop.mixed_precision)


def _configure_threads(loop: LoopOptions, accelerator) -> None:
    """accelerate launch sets OMP_NUM_THREADS=1 on CPU-only machines; use the cores we have instead."""
    if accelerator.device.type != "cpu":
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = loop.cpu_threads or max(1, cores // accelerator.state.num_processes)
    torch.set_num_threads(threads)
    logger.info("training on the CPU with %d threads per process", threads)


def _place_models(models: LoadedModels, device: torch.device, loop: LoopOptions, method: TrainingMethod) -> None:
    for model in [models.denoiser, models.vae, *models.text_encoders]:
        model.to(device)
    if loop.gradient_checkpointing:
        models.denoiser.enable_gradient_checkpointing()
        if method.trains_text_encoder:
            for text_encoder in models.text_encoders:
                text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _make_schedule(loop: LoopOptions, steps_per_epoch: int) -> Schedule:
    if loop.max_train_epochs is not None:
        num_epochs = loop.max_train_epochs
        total_steps = num_epochs * steps_per_epoch
    else:
        total_steps = loop.max_train_steps
        num_epochs = math.ceil(total_steps / steps_per_epoch)
    logger.info("%d steps per epoch, %d epochs, %d steps in total", steps_per_epoch, num_epochs, total_steps)
    return Schedule(steps_per_epoch, num_epochs, total_steps)


def _train_epochs(run: Run) -> None:
    from tqdm.auto import tqdm

    accelerator = run.accelerator
    progress = tqdm(total=run.schedule.total_steps, desc="steps", disable=not accelerator.is_local_main_process)
    for epoch in range(run.schedule.num_epochs):
        run.state.epoch = epoch + 1
        # accelerate's prepared loader re-applies its own epoch counter to the dataset on every iteration,
        # so the epoch is set through it (what matters for resuming mid-run).
        run.dataloader.set_epoch(epoch)
        run.method.on_epoch_start(run.models)
        for batch in run.dataloader:
            loss = _train_step(run, batch)
            run.state.global_step += 1
            _track_loss(run, loss, progress)
            if run.state.global_step >= run.schedule.total_steps:
                break
        _end_epoch(run, progress)
        if run.state.global_step >= run.schedule.total_steps:
            break
    progress.close()


def _train_step(run: Run, batch: dict) -> torch.Tensor:
    family, models, accelerator = run.family, run.models, run.accelerator
    run.method.on_step_start(models, run.state.global_step)
    with accelerator.autocast():
        with torch.no_grad():
            # Latents precomputed by a cache or by finetune/prepare_buckets_latents.py arrive in the batch.
            raw = batch["latents"] if batch.get("latents") is not None else family.encode_images(models, batch["images"])
            latents = family.scale_latents(models, raw.to(accelerator.device))
        with torch.set_grad_enabled(run.method.trains_text_encoder):
            conditioning = family.encode_text(models, batch["captions"])
        inputs = family.training_inputs(latents, run.generator)
        prediction = family.predict(models, inputs.noisy_latents, inputs.timesteps, conditioning)
    per_sample = F.mse_loss(prediction.float(), inputs.target.float(), reduction="none")
    per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))  # (B,)
    weights = inputs.weights * batch["loss_weights"].to(per_sample.device)
    loss = (per_sample * weights).mean()
    accelerator.backward(loss)
    if run.optimizer_options.max_grad_norm > 0:
        accelerator.clip_grad_norm_(_trainable_parameters(run), run.optimizer_options.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _trainable_parameters(run: Run) -> list[torch.nn.Parameter]:
    return [param for group in run.optimizer.param_groups for param in group["params"]]


def _track_loss(run: Run, loss: torch.Tensor, progress) -> None:
    state = run.state
    state.loss_sum = loss if state.loss_sum is None else state.loss_sum + loss
    state.loss_count += 1
    progress.update(1)
    if state.global_step % PROGRESS_INTERVAL == 0 or state.global_step == run.schedule.total_steps:
        progress.set_postfix(loss=f"{loss.item():.4f}", avg=f"{(state.loss_sum / state.loss_count).item():.4f}")


def _end_epoch(run: Run, progress) -> None:
    state = run.state
    average = (state.loss_sum / max(state.loss_count, 1)).item() if state.loss_sum is not None else float("nan")
    state.epoch_losses.append(average)
    state.loss_sum, state.loss_count = None, 0
    if not math.isfinite(average):
        logger.warning("epoch %d: the loss is not finite (%s)", state.epoch, average)
    logger.info("epoch %d/%d: average loss %.6f (step %d)", state.epoch, run.schedule.num_epochs, average,
                state.global_step)
    every = run.loop.save_every_n_epochs
    last_epoch = state.epoch >= run.schedule.num_epochs or state.global_step >= run.schedule.total_steps
    if every and state.epoch % every == 0 and not last_epoch:
        _save(run, final=False)


def _save(run: Run, final: bool) -> str:
    accelerator = run.accelerator
    state = run.state
    name = run.loop.output_name if final else f"{run.loop.output_name}-{state.epoch:06d}"
    path = os.path.join(run.loop.output_dir, name + run.method.output_extension())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        metadata = dict(run.base_metadata)
        metadata.update(
            {
                "ss_epoch": str(state.epoch),
                "ss_steps": str(state.global_step),
                "ss_training_finished_at": str(time.time()),
                "modelspec.title": f"{run.loop.output_name} epoch {state.epoch}",
            }
        )
        run.method.save(path, metadata, accelerator.unwrap_model)
        logger.info("saved %s", path)
    return path


def _base_metadata(family, method, loop, optimizer_options, dataset, schedule, started, args) -> dict[str, str]:
    summary = dataset.summary()
    resolution = summary["datasets"][0]["resolution"] if summary.get("datasets") else (512, 512)
    values = {
        **started,
        "ss_output_name": loop.output_name,
        "ss_learning_rate": optimizer_options.learning_rate,
        "ss_optimizer": f"{optimizer_options.optimizer_type}({optimizer_options.optimizer_args})",
        "ss_lr_scheduler": optimizer_options.lr_scheduler,
        "ss_lr_warmup_steps": optimizer_options.lr_warmup_steps,
        "ss_max_grad_norm": optimizer_options.max_grad_norm,
        "ss_max_train_steps": schedule.total_steps,
        "ss_num_epochs": schedule.num_epochs,
        "ss_num_batches_per_epoch": schedule.steps_per_epoch,
        "ss_num_train_images": dataset.num_train_images,
        "ss_num_reg_images": dataset.num_reg_images,
        "ss_mixed_precision": loop.mixed_precision,
        "ss_gradient_checkpointing": loop.gradient_checkpointing,
        "ss_seed": loop.seed,
        "ss_prior_loss_weight": args.prior_loss_weight,
        "ss_datasets": summary.get("datasets"),
        **family.training_metadata(),
        **method.metadata(),
    }
    metadata = md.stringify(values)
    metadata.update(
        md.model_spec(
            family.model_spec_architecture(),
            method.adapter,
            loop.output_name,
            tuple(resolution),
            getattr(family, "model_spec_extra", dict)(),
        )
    )
    return metadata
