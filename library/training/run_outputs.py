"""What a run writes: its result files (with their metadata) and training states, under the names saving options
give, replacing old ones as asked; a full disk costs no trained weights (previous saves stay, the final result goes
where there is room)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import tempfile
import time
from typing import TYPE_CHECKING

from library.errors import DiskFullError
from library.training import metadata as md
from library.training.ema import ema_metadata, result_variants
from library.training.evaluation import evaluation_weights
from library.training.saving import remove_path, step_saves
from library.training.state import Position, save_state

if TYPE_CHECKING:
    from library.training.trainer import Run

logger = logging.getLogger(__name__)

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
MIB = 2**20


def save_result(run: Run, name: str, final: bool = False, metadata: dict[str, str] | None = None) -> str | None:
    """Write the trained result as `<output_dir>/<name><ext>` with the evaluation weights (and `metadata` added to
    the run's); returns where it went.

    Out of space: a step or epoch save is skipped with an error line (training goes on, the previous saves stay);
    the final save goes to the first other folder with room, or raises DiskFullError naming what is needed.
    """
    accelerator, state = run.accelerator, run.state
    path = os.path.join(run.options.saving.output_dir, name + run.method.output_extension())
    accelerator.wait_for_everyone()
    for runner in run.runners:
        runner.synchronize()  # swapped weights reach their host copies before they are read
    with run.parallel.full_weights():  # sharded modules: every process helps gather, the main one writes
        if not accelerator.is_main_process:
            return path
        metadata = {**run.base_metadata, **(metadata or {})}
        metadata.update(
            {"ss_epoch": str(state.epoch), "ss_steps": str(state.global_step),
             "ss_training_finished_at": str(time.time())}
        )  # fmt: skip
        try:
            _write_result(run, path, metadata)
        except OSError as err:
            if err.errno not in NO_SPACE:
                raise
            path = _write_elsewhere(run, path, metadata, final)
            if path is None:
                return None
    logger.info("saved %s", path)
    run.uploader.upload_result(path)
    return path


def _write_result(run: Run, path: str, metadata: dict[str, str]) -> None:
    """The result, and with --save_both the EMA weights beside it (library/training/ema.py)."""
    for target, purpose in result_variants(run.ema, run.options.saving.output_name, path):
        with evaluation_weights(run, purpose):  # validation measures what is saved (trained or EMA weights)
            run.method.save(target, {**metadata, **ema_metadata(run.ema, purpose)}, run.accelerator.unwrap_model)
        if target != path:
            logger.info("saved %s (EMA weights)", target)
            run.uploader.upload_result(target)


def _write_elsewhere(run: Run, path: str, metadata: dict[str, str], final: bool) -> str | None:
    needed = result_bytes(run)
    logger.error("no space left on the disk of %s: it needs about %.0f MiB, %.0f MiB are free there; earlier saves "
                 "are kept", path, needed / MIB, free_bytes(os.path.dirname(path)) / MIB)  # fmt: skip
    if not final:
        return None
    for folder in fallback_folders():
        if free_bytes(folder) < needed * 1.2:
            continue
        target = os.path.join(folder, os.path.basename(path))
        try:
            _write_result(run, target, metadata)
        except OSError:
            continue
        logger.warning("the output folder's disk is full: the result is saved as %s instead", target)
        return target
    places = ", ".join(fallback_folders())
    raise DiskFullError(
        f"no space left to save {path} (about {needed / MIB:.0f} MiB) in its folder or in {places}; free some space, "
        "then continue from the last saved state with --resume"
    )


def result_bytes(run: Run) -> int:
    """About how large the saved result is: the trained modules' tensors (every model for full training)."""
    modules = list(run.method.trainable_modules())
    if run.method.trains_base_weights:
        modules += [run.models.vae, *run.models.text_encoders]
    seen, total = set(), 0
    for module in modules:
        for tensor in module.state_dict().values():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def fallback_folders() -> list[str]:
    """Where a final result goes when the output folder's disk is full."""
    folders = [tempfile.gettempdir(), os.path.expanduser("~"), os.getcwd()]
    return list(dict.fromkeys(folder for folder in folders if os.path.isdir(folder)))


def free_bytes(folder: str) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def save_run_state(run: Run, name: str) -> str | None:
    """Write the training state folder `<output_dir>/<name>`; returns it, or None when the disk was full (an
    error line; the previous states stay usable)."""
    state = run.state
    folder = os.path.join(run.options.saving.output_dir, name)
    position = Position(state.global_step, state.epoch, state.step_in_epoch, run.options.loop.seed,
                        run.schedule.steps_per_epoch, family=run.family.id, method=run.method.name)  # fmt: skip
    try:
        save_state(run.accelerator, folder, position, run.generator, run.state_parts)
    except OSError as err:
        if err.errno not in NO_SPACE:
            raise
        logger.error("no space left on the disk of %s: the training state was not saved (%.0f MiB free); earlier "
                     "states are kept", folder, free_bytes(os.path.dirname(folder)) / MIB)  # fmt: skip
        return None
    run.uploader.upload_state(folder)
    return folder


def remove_old_step_saves(run: Run) -> None:
    """Remove the step saves (results and states) older than --save_last_n_steps allows."""
    saving = run.options.saving
    limit = saving.stale_steps(run.state.global_step)
    if not limit or not run.accelerator.is_main_process:
        return
    for output_name, _ in result_variants(run.ema, saving.output_name, saving.output_name):  # with EMA copies
        for step, path in step_saves(saving.output_dir, output_name):
            if step <= limit:
                remove_path(path)


def remove_stale_epoch_save(run: Run, epoch: int) -> None:
    """Remove the epoch save (result and state) that --save_last_n_epochs no longer keeps after `epoch`."""
    saving = run.options.saving
    stale = saving.stale_epoch(epoch)
    if stale is not None and run.accelerator.is_main_process:
        result = os.path.join(saving.output_dir, saving.epoch_name(stale) + run.method.output_extension())
        for path, _ in result_variants(run.ema, saving.output_name, result):  # with its EMA copy
            remove_path(path)
        remove_path(os.path.join(saving.output_dir, saving.epoch_name(stale) + "-state"))


# ---- metadata ------------------------------------------------------------------------------------------------


def tracker_config(args: argparse.Namespace) -> dict:
    """The options as logged to trackers, without secrets."""
    values = {key: value for key, value in vars(args).items() if key not in md.SECRET_OPTIONS and value is not None}
    return md.redact_secrets(values, md.secret_values(args), "tracked option")


def model_spec_resolution(summary: dict) -> tuple[int, int]:
    """The first dataset's resolution; with prepared latents (no resolution given) its most used bucket."""
    if not summary.get("datasets"):
        return (512, 512)
    first = summary["datasets"][0]
    if first["resolution"] is not None:
        return tuple(first["resolution"])
    return tuple(max(first["buckets"], key=lambda bucket: bucket[1])[0])


def base_metadata(family, method, options, dataset, schedule, started, args) -> dict[str, str]:
    """The `ss_*` and `modelspec.*` keys every file of the run carries (secrets redacted)."""
    summary = dataset.summary()
    loop, optimizer = options.loop, options.optimizer
    values = {
        **started,
        "ss_output_name": loop.output_name,
        "ss_learning_rate": optimizer.learning_rate,
        "ss_optimizer": f"{optimizer.optimizer_type}({optimizer.optimizer_args})",
        "ss_lr_scheduler": optimizer.lr_scheduler,
        "ss_lr_warmup_steps": optimizer.lr_warmup_steps,
        "ss_max_grad_norm": optimizer.max_grad_norm,
        "ss_max_train_steps": schedule.total_steps,
        "ss_num_epochs": schedule.num_epochs,
        "ss_num_batches_per_epoch": schedule.batches_per_epoch,
        "ss_gradient_accumulation_steps": loop.gradient_accumulation_steps,
        "ss_cache_latents": options.latents.enabled,
        "ss_full_fp16": options.memory.full_precision == "fp16",
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
    resolution = model_spec_resolution(summary)
    spec = md.model_spec(family.model_spec_architecture(), method.adapter, loop.output_name, tuple(resolution),
                         family.model_spec_extra())  # fmt: skip
    metadata.update(spec)
    return md.redact_secrets(metadata, md.secret_values(args))
