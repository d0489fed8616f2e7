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

from library.atomic import recover_interrupted_writes
from library.data.latent_cache import LatentCacheOptions, cache_dataset_latents
from library.errors import ConfigError, DatasetError
from library.families.base import LoadedModels, ModelFamily
from library.methods.base import TrainingMethod
from library.training import half_storage
from library.training import metadata as md
from library.training.best_checkpoint import BestCheckpoint, BestCheckpointOptions, start_best_checkpoint
from library.training.block_swap import BlockRunner, place_blocks
from library.training.compile import CompileOptions, compile_blocks
from library.training.ema import EMAOptions, ExponentialMovingAverage, start_ema
from library.training.forward import encode_batch, predict_noised
from library.training.fused_optimizers import (
    FusedOptimizers,
    FusedOptions,
    attach_fused_optimizers,
)
from library.training.hub import HubOptions, Uploader
from library.training.interrupts import StopRequest, TrainingInterrupted
from library.training.loop_options import LoopOptions
from library.training.loss import LossOptions, per_sample_loss, report_masks
from library.training.memory_options import (
    MemoryOptions,
    allow_half_gradients,
    apply_attention,
    cast_trained_modules,
    keep_freed_buffers,
)
from library.training.memory_plan import log_memory_plan
from library.training.noise import NoiseOptions
from library.training.optimizers import (
    OptimizerOptions,
    build_lr_scheduler,
    build_optimizer,
    current_learning_rates,
)
from library.training.output_checks import check_run_outputs
from library.training.parallel import (
    DataParallel,
    agree,
    data_parallel,
    decorrelate_random_streams,
    mean_over_processes,
)
from library.training.quantized_base import QuantizationOptions, quantize_frozen_base
from library.training.run_outputs import base_metadata as build_base_metadata
from library.training.run_outputs import (
    remove_old_step_saves,
    remove_stale_epoch_save,
    save_result,
    save_run_state,
    tracker_config,
)
from library.training.sampling import SampleOptions, draw_samples
from library.training.saving import SaveOptions
from library.training.sharding import (
    FullModuleState,
    FullOptimizerState,
    ShardingOptions,
    shard_modules,
    take_over_from_accelerate,
)
from library.training.state import Position, StatePart, check_origin, load_state, read_position
from library.training.tracking import (
    StepMetrics,
    TrackingOptions,
    log_step_metrics,
    start_trackers,
)
from library.training.validation import ValidationOptions, run_validation

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROGRESS_INTERVAL = 10  # steps between loss read-backs for the progress bar (each read-back syncs the device)


@dataclass
class Schedule:
    """How long the run is. Steps are optimizer steps: `accumulation` batches each (the last of an epoch may
    have fewer)."""

    steps_per_epoch: int
    num_epochs: int
    total_steps: int
    batches_per_epoch: int = 0
    accumulation: int = 1


@dataclass
class RunState:
    """What moves during training. `epoch` is the 0-based epoch in progress, `step_in_epoch` its finished batches."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    loss_sum: torch.Tensor | None = None
    loss_count: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    pending_metrics: list[StepMetrics] = field(default_factory=list)  # per-step tracker values not yet read back
    group_loss: torch.Tensor | None = None  # mean loss so far of the batches accumulated for the next step
    stop_agreed: bool = False  # a stop request on any process, as every process learned it before the last batch


@dataclass
class Options:
    """The typed options of the loop's parts."""

    loop: LoopOptions
    saving: SaveOptions
    tracking: TrackingOptions
    optimizer: OptimizerOptions
    noise: NoiseOptions
    loss: LossOptions
    hub: HubOptions = field(default_factory=HubOptions)
    latents: LatentCacheOptions = field(default_factory=LatentCacheOptions)
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    sampling: SampleOptions = field(default_factory=SampleOptions)
    validation: ValidationOptions = field(default_factory=ValidationOptions)
    fused: FusedOptions = field(default_factory=FusedOptions)
    ema: EMAOptions = field(default_factory=EMAOptions)
    best: BestCheckpointOptions = field(default_factory=BestCheckpointOptions)
    quantization: QuantizationOptions = field(default_factory=QuantizationOptions)
    compile: CompileOptions = field(default_factory=CompileOptions)


@dataclass
class Run:
    """Everything one training run holds, so the phases pass one object instead of many values."""

    family: ModelFamily
    method: TrainingMethod
    options: Options
    accelerator: object
    models: LoadedModels
    dataset: object
    dataloader: object
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    schedule: Schedule
    base_metadata: dict[str, str]
    generator: torch.Generator
    stop: StopRequest
    state: RunState = field(default_factory=RunState)
    uploader: Uploader = field(default_factory=Uploader)
    fused: FusedOptimizers | None = None  # --fused_backward_pass / --blockwise_fused_optimizers
    runners: list[BlockRunner] = field(default_factory=list)  # --blocks_to_swap / --cpu_offload_checkpointing
    ema: ExponentialMovingAverage | None = None  # --ema
    best: BestCheckpoint | None = None  # --save_best / --early_stopping_patience
    parallel: DataParallel = field(default_factory=DataParallel)  # gradient exchange with several processes

    @property
    def finished(self) -> bool:
        """The last step is done, or early stopping ended the run."""
        return self.state.global_step >= self.schedule.total_steps or (self.best is not None and self.best.stopped)

    @property
    def state_parts(self) -> list[StatePart]:
        """What a training state holds besides accelerate's state (library/training/state.py `StatePart`)."""
        return [part for part in (self.ema, self.best) if part is not None]


def parse_options(args: argparse.Namespace) -> Options:
    """All loop options, validated (no model loaded, nothing downloaded yet)."""
    hub = HubOptions.from_args(args)
    options = Options(
        LoopOptions.from_args(args),
        SaveOptions.from_args(args),
        TrackingOptions.from_args(args),
        OptimizerOptions.from_args(args),
        NoiseOptions.from_args(args),
        LossOptions.from_args(args),
        hub=hub,
        latents=LatentCacheOptions.from_args(args),
        memory=MemoryOptions.from_args(args, args.mixed_precision),
        sampling=SampleOptions.from_args(args),
        validation=ValidationOptions.from_args(args),
    )
    options.fused = FusedOptions.from_args(args, options.optimizer)
    options.ema = EMAOptions.from_args(args, options.optimizer)
    options.best = BestCheckpointOptions.from_args(args)
    options.quantization = QuantizationOptions.from_args(args)
    options.compile = CompileOptions.from_args(args)
    return options


def train(family: ModelFamily, method: TrainingMethod, args: argparse.Namespace) -> str:
    """Validate everything, load, train, save. Returns the path of the final file."""
    from library.config.dataset_cli import DatasetSource
    from library.data.dataset import build_dataset_group

    options = parse_options(args)
    method.validate()
    family.validate(method)
    options.fused.check_method(method.name)
    options.loss.check_objective(family.v_prediction, has_noise_schedule=family.alphas_cumprod is not None)
    sharding = _sharding_options(family, method, options)
    options.quantization.check(method, fp8=getattr(args, "fp8_base", False) or getattr(args, "fp8_base_unet", False),
                               block_swap=family.offload is not None and family.offload.active)
    options.compile.check(block_swap=family.offload is not None and family.offload.active)
    # a state on the hub is downloaded (into the hub cache) once every option is known to be right
    if options.hub.resume_from_huggingface and options.saving.resume:
        options.saving.resume = args.resume = options.hub.local_resume(options.saving.resume)
    resume_position = read_position(options.saving.resume) if options.saving.resume else None
    if resume_position is not None:
        check_origin(options.saving.resume, resume_position, family.id, method.name)
        _check_steps_left(options.saving.resume, resume_position.global_step, options.loop.max_train_steps,
                          options.loop.max_train_epochs is None)  # fmt: skip
    _choose_seed(options.loop, resume_position)
    source = DatasetSource.from_args(args)
    dataset = build_dataset_group(source, seed=options.loop.seed, prior_loss_weight=args.prior_loss_weight)
    if source.debug_dataset:
        return _write_debug_batches(dataset, options.saving.output_dir)
    options.sampling.check_family(family)
    options.validation.check_dataset(dataset)
    options.best.check_validation(options.validation)
    # validation images need the same caches (text-encoder outputs) as training images
    family.validate_run(dataset.including_validation(), method.trains_text_encoder)
    options.latents.check_dataset(dataset.including_validation())
    report_masks(options.loss, dataset.has_masks)
    method.check_dataset(family, dataset)
    _check_outputs(options, family, dataset.including_validation())

    accelerator = _make_accelerator(options)
    _configure_threads(options.loop, accelerator)
    from accelerate.utils import set_seed

    set_seed(options.loop.seed)
    started = md.new_session()
    load_start = time.perf_counter()
    keep_half = not (options.memory.upcast_frozen_weights or method.trains_base_weights)
    with half_storage.keeping_half_weights(keep_half):
        models = family.load(WEIGHT_DTYPES[options.loop.mixed_precision])
    kept = sum(half_storage.half_stored_layers(model) for model in [models.denoiser, models.vae, *models.text_encoders])
    if kept:
        logger.info("%d frozen layers keep the checkpoint's fp16/bf16 weights and compute in float32 (the same results "
                    "with half the memory; --upcast_frozen_weights makes float32 copies)", kept)  # fmt: skip
    logger.info("models loaded in %.1f s", time.perf_counter() - load_start)
    quantize_frozen_base(options.quantization, models, method.trains_text_encoder,
                         WEIGHT_DTYPES[options.loop.mixed_precision])
    runners = _place_models(family, models, accelerator.device, options.loop, method)
    apply_attention(models, options.memory.attention)
    param_groups = method.setup(family, models)
    cast_trained_modules(method.trainable_modules(), options.memory)
    sharded = []
    if sharding.enabled and accelerator.num_processes > 1:
        text_encoders = [module for module in method.trainable_modules() if module is not models.denoiser]
        sharded = shard_modules(sharding, models.denoiser, family.denoiser_blocks(models), text_encoders,
                                param_groups, accelerator.device)  # fmt: skip
    compile_blocks(options.compile, family.denoiser_blocks(models), models.denoiser)
    family.before_training(models, dataset.including_validation())
    cache_dataset_latents(options.latents, family, models, dataset.including_validation(), accelerator)
    _free_unused_vae(options, method, models)
    if accelerator.device.type == "cpu":
        keep_freed_buffers()

    dataloader = _make_dataloader(dataset, accelerator, args)
    schedule = _make_schedule(options.loop, len(dataloader))
    optimizer = build_optimizer(options.optimizer, param_groups)
    # counted in optimizer steps whatever the number of processes (the accelerator is told not to step it N times)
    lr_scheduler = build_lr_scheduler(options.optimizer, optimizer, schedule.total_steps)
    # The trained modules are registered with accelerate for state saving only; with several processes they are
    # wrapped for gradient exchange by library/training/parallel.py (the forward pass reaches them through the
    # frozen models: LoRA hooks, a UNet inside the family's code). Sharded modules and their optimizer are
    # checkpointed through objects that gather their full state (library/training/sharding.py).
    if sharded:
        lr_scheduler = accelerator.prepare(lr_scheduler)
        for module in sharded:
            accelerator.register_for_checkpointing(FullModuleState(module))
        accelerator.register_for_checkpointing(FullOptimizerState(sharded, optimizer))
    else:
        optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
        allow_half_gradients(accelerator, options.memory)
        for module in method.trainable_modules():
            accelerator.register_for_checkpointing(module)
    fused = attach_fused_optimizers(options.fused, options.optimizer, optimizer, accelerator,
                                    lambda: family.denoiser_blocks(models))

    generator = torch.Generator(device=accelerator.device).manual_seed(options.loop.seed)
    base_metadata = build_base_metadata(family, method, options, dataset, schedule, started, args)
    run = Run(family, method, options, accelerator, models, dataset, dataloader, optimizer, lr_scheduler, schedule,
              base_metadata, generator, StopRequest(), uploader=Uploader(options.hub, accelerator.is_main_process),
              fused=fused, runners=runners)
    run.parallel = data_parallel(accelerator, method.trainable_modules(), _plain_exchange_reason(run),
                                 method.uses_every_trained_parameter, sharded, schedule.accumulation)
    decorrelate_random_streams(options.loop.seed)
    run.ema = start_ema(options.ema, _trainable_parameters(run))
    run.best = start_best_checkpoint(options.best)
    log_memory_plan(run)
    if options.saving.resume:
        _resume(run, options.saving.resume)
    start_trackers(accelerator, options.tracking, _script_name(), tracker_config(args))
    with run.stop.installed():
        _train_epochs(run)
    path = save_result(run, options.loop.output_name, final=True)
    if options.saving.save_state or options.saving.save_state_on_train_end:
        save_run_state(run, f"{options.loop.output_name}-state")
    if run.best is not None:
        run.best.report()
    # every process reaches the end before any tears the process group down: a process that left early once
    # deadlocked the other's gloo teardown (its runloop thread waiting for the GIL the destructor held)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    run.uploader.finish()  # waits for background uploads; raises if any upload failed
    return path


def _write_debug_batches(dataset, output_dir: str) -> str:
    """--debug_dataset: the first batches as images with captions and bucket sizes, in a folder to look at."""
    from library.data.debug_batches import write_debug_batches

    index = write_debug_batches(dataset, os.path.join(output_dir, "debug_dataset"))
    print(f"--debug_dataset: sample batches (images, captions, bucket sizes) written to {os.path.dirname(index)}; "
          f"see {index}")  # the product of --debug_dataset, like the summary printed above
    return index


def _check_outputs(options: Options, family: ModelFamily, dataset) -> None:
    """Every folder the run will write to takes files (else one line now, not a lost result at the first save), and
    what a killed save left in the output folder is put back or removed."""
    output_dir = options.saving.output_dir
    if int(os.environ.get("RANK", "0")) == 0:
        for line in recover_interrupted_writes(output_dir):
            logger.warning("%s", line)
    folders = [(output_dir, "--output_dir")]
    if options.tracking.logging_dir:
        folders.append((options.tracking.logging_dir, "--logging_dir"))
    if options.sampling.enabled:
        folders.append((os.path.join(output_dir, "sample"), "--output_dir (its sample/ folder)"))
    if options.latents.to_disk or family.text_cache_options.to_disk:
        image_folders = sorted({os.path.dirname(path) for group in dataset.datasets for path in group.image_paths})
        option = "an image folder (disk caches are written next to the images)"
        folders += [(folder, option) for folder in image_folders]
    check_run_outputs(folders)


def _choose_seed(loop: LoopOptions, resume_position: Position | None) -> None:
    if resume_position is not None:
        if loop.seed is not None and loop.seed != resume_position.seed:
            logger.warning("--seed %d differs from the resumed run's seed %d; using %d so the data order continues",
                           loop.seed, resume_position.seed, resume_position.seed)
        loop.seed = resume_position.seed
    elif loop.seed is None:
        loop.seed = random.randint(0, 2**31 - 1)
        logger.info("seed %d (chosen at random; pass --seed to repeat this run)", loop.seed)


def _make_accelerator(options: Options):
    from accelerate import Accelerator

    tracking = options.tracking
    return Accelerator(
        # several processes on a machine without an accelerator device: accelerate's multi-CPU mode (gloo)
        cpu=_processes_without_device(),
        # the LR schedule advances once per optimizer step, not once per process and step
        step_scheduler_with_optimizer=False,
        mixed_precision=options.loop.mixed_precision,
        log_with=tracking.trackers or None,
        project_dir=tracking.run_dir(),
    )


def _sharding_options(family: ModelFamily, method: TrainingMethod, options: Options) -> ShardingOptions:
    """FSDP as accelerate's launcher asked for it, checked against the run's options; the trainer shards."""
    sharding = ShardingOptions.from_environment()
    offload = family.offload is not None and family.offload.active
    refused = {
        "--blocks_to_swap / --cpu_offload_checkpointing": offload,
        options.fused.option: options.fused.enabled,
        "--ema": options.ema.enabled,
        "--mixed_precision fp16 (its gradient scaler does not work on shards; use bf16)":
            options.loop.mixed_precision == "fp16",
    }
    sharding.check(method, refused, int(os.environ.get("WORLD_SIZE", "1")))
    if sharding.enabled:
        take_over_from_accelerate()
        if sharding.activation_checkpointing:
            options.loop.gradient_checkpointing = True
    return sharding


def _processes_without_device() -> bool:
    """Launched as several processes (torchrun / `accelerate launch --multi_gpu`) where torch sees no GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    return not torch.cuda.is_available() and not (hasattr(torch, "xpu") and torch.xpu.is_available())


def _plain_exchange_reason(run: Run) -> str | None:
    """Why this run's gradients cannot be exchanged by DistributedDataParallel during backward, if they cannot."""
    if run.fused is not None:
        return "the fused optimizers step inside backward"
    if run.runners:
        return "block swapping moves weights between devices during the step"
    return None


def _free_unused_vae(options: Options, method: TrainingMethod, models: LoadedModels) -> None:
    """The VAE parts nothing will use leave memory (the modules stay, with their configs, on the meta device): with
    no sample images and no full model to save, the decoder is never used; with every latent cached, neither is
    the encoder."""
    if options.sampling.enabled or method.trains_base_weights:
        return
    if options.latents.enabled:
        models.vae.to("meta")
        logger.info("VAE weights freed: every latent is cached and nothing decodes or saves the VAE")
        return
    decoder = [getattr(models.vae, name) for name in ("decoder", "post_quant_conv") if hasattr(models.vae, name)]
    for part in decoder:
        if isinstance(part, torch.nn.Module):
            part.to("meta")
    if decoder:
        logger.info("VAE decoder freed: no sample images, nothing decodes or saves the VAE")


def _configure_threads(loop: LoopOptions, accelerator) -> None:
    """accelerate launch sets OMP_NUM_THREADS=1 on CPU-only machines; use the cores we have instead."""
    if accelerator.device.type != "cpu":
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = loop.cpu_threads or max(1, cores // accelerator.state.num_processes)
    torch.set_num_threads(threads)
    logger.info("training on the CPU with %d threads per process", threads)


def _place_models(
    family: ModelFamily, models: LoadedModels, device: torch.device, loop: LoopOptions, method: TrainingMethod
) -> list[BlockRunner]:
    """Models on the device, or the denoiser's block lists under runners (block swap, activation offload)."""
    runners: list[BlockRunner] = []
    offload = family.offload
    if offload is not None and offload.active:
        lists = [getattr(models.denoiser, name) for name in family.block_list_names]
        counts = family.swap_counts(offload.blocks_to_swap or 0)
        runners = place_blocks(models.denoiser, [models.vae, *models.text_encoders], lists, counts, device, offload)
    else:
        family.place_models(models, device)
    if loop.gradient_checkpointing:
        if not runners:  # runners checkpoint their blocks themselves, so that a recompute swaps nothing
            models.denoiser.enable_gradient_checkpointing()
        if method.trains_text_encoder:
            for text_encoder in models.text_encoders:
                text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return runners


def _make_dataloader(dataset, accelerator, args: argparse.Namespace):
    """The loader of this process's share of every batch, on the accelerator's device.

    The dataset group splits each batch among the processes itself (every rank gets the same bucket at each step),
    so the loader is wrapped for device placement and skipping only, not sharded again by accelerate.
    """
    from accelerate.data_loader import prepare_data_loader

    dataset.set_processes(accelerator.num_processes, accelerator.process_index)
    loader = dataset.make_dataloader(args.max_data_loader_n_workers, args.persistent_data_loader_workers)
    return prepare_data_loader(loader, accelerator.device, num_processes=1, process_index=0, put_on_device=True)


def _make_schedule(loop: LoopOptions, batches_per_epoch: int) -> Schedule:
    accumulation = loop.gradient_accumulation_steps
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    if accumulation > 1:
        logger.info("%d batches per epoch, %d per optimizer step (--gradient_accumulation_steps)", batches_per_epoch,
                    accumulation)
    if loop.max_train_epochs is not None:
        num_epochs = loop.max_train_epochs
        total_steps = num_epochs * steps_per_epoch
    else:
        total_steps = loop.max_train_steps
        num_epochs = math.ceil(total_steps / steps_per_epoch)
    logger.info("%d steps per epoch, %d epochs, %d steps in total", steps_per_epoch, num_epochs, total_steps)
    return Schedule(steps_per_epoch, num_epochs, total_steps, batches_per_epoch, accumulation)


def _check_steps_left(folder: str, done: int, total: int | None, known: bool = True) -> None:
    """A state that already reached the end trains nothing: say so instead of rewriting the final files."""
    if known and total is not None and done >= total:
        raise ConfigError(
            f"--resume {folder} is at step {done}, and this run ends at step {total}: nothing is left to train, and "
            "the saved files stay as they are. Raise --max_train_steps (or --max_train_epochs) to train further"
        )


def _resume(run: Run, folder: str) -> None:
    position = load_state(run.accelerator, folder, run.generator, run.state_parts)
    _check_steps_left(folder, position.global_step, run.schedule.total_steps)
    if position.steps_per_epoch != run.schedule.steps_per_epoch:
        logger.warning("the dataset now gives %d steps per epoch, the resumed run had %d: the data order differs",
                       run.schedule.steps_per_epoch, position.steps_per_epoch)
    run.state.global_step = position.global_step
    run.state.epoch = position.epoch
    run.state.step_in_epoch = position.step_in_epoch


def _train_epochs(run: Run) -> None:
    from tqdm.auto import tqdm

    accelerator, state = run.accelerator, run.state
    progress = tqdm(total=run.schedule.total_steps, initial=state.global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    if run.options.sampling.at_first:
        draw_samples(run)
    while state.epoch < run.schedule.num_epochs and not run.finished:
        loader = run.dataloader
        if state.step_in_epoch:
            loader = accelerator.skip_first_batches(run.dataloader, state.step_in_epoch)
        # accelerate's loaders apply their own epoch counter to the dataset on every iteration, so the epoch
        # (which fixes the data order) is set through the loader.
        loader.set_epoch(state.epoch)
        run.method.on_epoch_start(run.models)
        for batch in _batches(loader):
            # every process learns of a failure or a stop request on any of them, so all stop at the same step
            failure, state.stop_agreed = agree(batch.get("failed"), run.stop.requested, accelerator.device)
            if failure is not None:
                _stop_for_unreadable_data(run, failure)
            loss = _train_step(run, batch)
            state.step_in_epoch += 1
            if loss is None:  # gradients accumulate until the last batch of the group
                continue
            state.global_step += 1
            _track_loss(run, loss, progress)
            _after_step(run)
            if run.finished:
                break
        if state.step_in_epoch >= run.schedule.batches_per_epoch:
            _end_epoch(run)
    _log_epoch_loss(run)  # the last epoch when the step limit ended it early
    progress.close()


def _stop_for_unreadable_data(run: Run, message: str) -> None:
    """An image that fails to decode mid-training: save the result and a state at the last whole step (the state
    replays an unfinished accumulation group), then stop with one line naming the file."""
    saving, state = run.options.saving, run.state
    state.step_in_epoch -= state.step_in_epoch % run.schedule.accumulation
    name = saving.step_name(state.global_step)
    save_result(run, name)
    save_run_state(run, name + "-state")
    folder = os.path.join(saving.output_dir, name + "-state")
    raise DatasetError(
        f"{message}. Training stopped at step {state.global_step}; replace or remove the image, then continue with "
        f"--resume {folder}"
    )


def _batches(loader):
    """Iterate a loader without letting it consume torch's global RNG.

    Starting a DataLoader iterator draws a seed from the global generator. A resumed run starts its iterator at
    another point than the uninterrupted run did, so that draw would shift every later global draw (VAE sampling,
    dropout) and the runs would drift apart; restoring the state after the draw keeps them identical.
    """
    rng_state = torch.random.get_rng_state()
    iterator = iter(loader)
    first = next(iterator, None)
    torch.random.set_rng_state(rng_state)
    if first is None:
        return
    yield first
    yield from iterator


def _accumulation_group(run: Run) -> tuple[int, bool, bool]:
    """For the batch about to run: (batches in its accumulation group, whether it starts the group, whether it
    ends it). Groups are counted from the start of the epoch; the epoch's last group may be shorter."""
    accumulation, done = run.schedule.accumulation, run.state.step_in_epoch
    start = done - done % accumulation
    size = max(1, min(accumulation, run.schedule.batches_per_epoch - start))
    return size, done == start, done + 1 >= start + size


def _batch_loss(run: Run, batch: dict) -> torch.Tensor:
    """The forward pass of one batch and its loss (mean of the per-sample losses)."""
    family, models, accelerator = run.family, run.models, run.accelerator
    with accelerator.autocast():
        encoded = encode_batch(family, run.method, models, batch, accelerator.device)
        prediction, inputs = predict_noised(family, models, encoded, run.generator, run.options.noise,
                                            processes=run.parallel.processes)
    alphas_cumprod = family.alphas_cumprod
    masks = batch.get("masks")  # a subset's masks apply without --masked_loss (see loss.report_masks)
    per_sample = per_sample_loss(
        prediction,
        inputs.target,
        inputs.timesteps,
        alphas_cumprod.to(accelerator.device) if alphas_cumprod is not None else None,
        run.options.loss,
        family.v_prediction,
        masks=masks.to(accelerator.device) if masks is not None else None,
        loss_weights=inputs.weights * batch["loss_weights"].to(accelerator.device),
    )  # (B,)
    return per_sample.mean()


def _train_step(run: Run, batch: dict) -> torch.Tensor | None:
    """Forward and backward of one batch; the optimizer steps on the last batch of an accumulation group.

    Returns the step's loss (the mean over the group's batches), or None while gradients still accumulate.
    """
    group_size, starts_group, ends_group = _accumulation_group(run)
    if starts_group:
        run.method.on_step_start(run.models, run.state.global_step)
    accelerator = run.accelerator
    with run.parallel.accumulating(skip_exchange=not ends_group):
        loss = run.parallel.loss(lambda: _batch_loss(run, batch))
        # the group's gradients sum to those of the mean loss over its batches
        accelerator.backward(loss / group_size if group_size > 1 else loss)
    if group_size > 1:
        group_loss = loss.detach() / group_size
        run.state.group_loss = group_loss if run.state.group_loss is None else run.state.group_loss + group_loss
        if not ends_group:
            return None
        loss, run.state.group_loss = run.state.group_loss, None
    if run.fused is not None:
        run.fused.finish_backward()  # the optimizers stepped inside backward (gradients averaged, clipped, freed)
    else:
        _apply_gradients(run)
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _apply_gradients(run: Run) -> None:
    """Average the gradients across processes (unless backward did), clip their global norm and step the optimizer."""
    accelerator = run.accelerator
    if accelerator.num_processes > 1 and not run.parallel.averages_gradients:
        _average_gradients(_trainable_parameters(run), accelerator.num_processes)
    if run.options.optimizer.max_grad_norm > 0:
        accelerator.clip_grad_norm_(_trainable_parameters(run), run.options.optimizer.max_grad_norm)
    run.optimizer.step()


def _average_gradients(parameters: list[torch.nn.Parameter], num_processes: int) -> None:
    """All-reduce the gradients (in buckets of at most 2**24 values) and divide by the number of processes."""
    import torch.distributed as dist

    grads = [param.grad for param in parameters if param.grad is not None]
    for bucket in _buckets(grads, 2**24):
        flat = torch.cat([grad.reshape(-1) for grad in bucket])
        dist.all_reduce(flat)
        flat /= num_processes
        for grad, part in zip(bucket, flat.split([grad.numel() for grad in bucket])):
            grad.copy_(part.view_as(grad))


def _buckets(tensors: list[torch.Tensor], limit: int):
    """Consecutive groups of tensors with at most `limit` values each (a larger tensor forms its own group)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for tensor in tensors:
        if bucket and size + tensor.numel() > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += tensor.numel()
    if bucket:
        yield bucket


def _trainable_parameters(run: Run) -> list[torch.nn.Parameter]:
    return [param for group in run.optimizer.param_groups for param in group["params"]]


def _track_loss(run: Run, loss: torch.Tensor, progress) -> None:
    state = run.state
    loss = mean_over_processes(loss)  # the loss of the global batch
    state.loss_sum = loss if state.loss_sum is None else state.loss_sum + loss
    state.loss_count += 1
    progress.update(1)
    if run.options.tracking.trackers:
        # kept on the device and read back together at the progress interval, so the curves get every step
        tensors = {"loss/current": loss, "loss/average": state.loss_sum / state.loss_count}
        state.pending_metrics.append(StepMetrics(state.global_step, tensors, _learning_rates(run)))
    if state.global_step % PROGRESS_INTERVAL == 0 or run.finished:
        current, average = loss.item(), (state.loss_sum / state.loss_count).item()
        progress.set_postfix(loss=f"{current:.4f}", avg=f"{average:.4f}")
        log_step_metrics(run.accelerator, state.pending_metrics)


def _learning_rates(run: Run) -> dict[str, float]:
    if run.fused is not None:
        return run.fused.learning_rates(run.lr_scheduler)
    return current_learning_rates(run.optimizer, run.lr_scheduler)


def _after_step(run: Run) -> None:
    """EMA update, sample images, validation, step saves (result, state, old ones removed) and a requested stop."""
    saving, state = run.options.saving, run.state
    if run.ema is not None:
        run.ema.update(state.global_step)
    if run.options.sampling.due_after_step(state.global_step):
        draw_samples(run)
    if run.options.validation.due_after_step(state.global_step):
        _validate(run)
    if saving.is_step_save(state.global_step) and not run.finished:
        save_result(run, saving.step_name(state.global_step))
        if saving.save_state:
            save_run_state(run, saving.step_name(state.global_step) + "-state")
        remove_old_step_saves(run)
    if state.stop_agreed or (run.parallel.processes[0] == 1 and run.stop.requested):
        name = saving.step_name(state.global_step)
        save_result(run, name)
        if saving.save_state:
            save_run_state(run, name + "-state")
        raise TrainingInterrupted(state.global_step, os.path.join(saving.output_dir, name + "-state")
                                  if saving.save_state else None)


def _log_epoch_loss(run: Run) -> None:
    """Log the average loss of the epoch so far (a whole epoch, or the part a run ended in) and reset it."""
    state = run.state
    if state.loss_sum is None:
        return
    log_step_metrics(run.accelerator, state.pending_metrics)  # trackers want the steps in order
    average = (state.loss_sum / state.loss_count).item()
    state.epoch_losses.append(average)
    state.loss_sum, state.loss_count = None, 0
    if not math.isfinite(average):
        logger.warning("epoch %d: the loss is not finite (%s)", state.epoch + 1, average)
    logger.info("epoch %d/%d: average loss %.6f (step %d)", state.epoch + 1, run.schedule.num_epochs, average,
                state.global_step)
    if run.options.tracking.trackers:
        run.accelerator.log({"loss/epoch": average}, step=state.global_step)


def _end_epoch(run: Run) -> None:
    state, saving = run.state, run.options.saving
    _log_epoch_loss(run)
    state.epoch += 1
    state.step_in_epoch = 0
    if run.options.sampling.due_after_epoch(state.epoch):
        draw_samples(run, epoch=state.epoch)
    if run.options.validation.due_after_epoch(state.epoch):
        _validate(run)
    last = state.epoch >= run.schedule.num_epochs or run.finished
    if saving.is_epoch_save(state.epoch) and not last:
        save_result(run, saving.epoch_name(state.epoch))
        if saving.save_state:
            save_run_state(run, saving.epoch_name(state.epoch) + "-state")
        remove_stale_epoch_save(run, state.epoch)


def _validate(run: Run) -> None:
    """The validation loss, and what it decides (--save_best, early stopping)."""
    losses = run_validation(run)
    if run.best is not None:
        run.best.after_validation(run, losses)


def _script_name() -> str:
    import sys

    return os.path.splitext(os.path.basename(sys.argv[0]))[0] or "train"
