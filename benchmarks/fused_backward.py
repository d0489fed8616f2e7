"""Peak memory of full fine-tuning steps with the optimizer step inside the backward pass, against the usual step.

Usage: python benchmarks/fused_backward.py [--width 160] [--resolution 256] [--steps 2] [--warmup 1]
    [--optimizers AdaFactor AdamW] [--modes unfused fused blockwise] [--device cpu|cuda] [--results file.jsonl]

The model is a UNet2DConditionModel with the SD 1.5 layout at a reduced width (random weights, fp32; about 220M
parameters at --width 160), built in each measuring process. A step is: UNet forward on random latents and
text states (batch 1), MSE loss, backward, optimizer step (library/training/optimizers.py, with the schedule of
library/training/lr_schedulers.py; `fused` and `blockwise` through library/training/fused_optimizers.py). Each
setting runs in a fresh Python process, so peak RSS is its own, and prints one JSON line (benchmarks/harness.py)
named `fused_backward/<optimizer>/<mode>`, with `rss_after_model_bytes` (the process once the model is built),
`step_cpu_seconds` (median CPU time of a step, all threads: steadier than wall time on a shared machine) and
`parameters` added; on CUDA `peak_gpu_bytes` is torch's peak allocation.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness

MODES = ("unfused", "fused", "blockwise")
OPTIMIZERS = ("AdaFactor", "AdamW")


def unet_config(width: int) -> dict:
    """SD 1.5's UNet with the channel widths scaled to `width` (SD 1.5 itself is 320)."""
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (width, width * 2, width * 4, width * 4),
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    }


def optimizer_options(name: str):
    from library.training.fused_optimizers import add_fused_arguments
    from library.training.optimizers import OptimizerOptions, add_optimizer_arguments

    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser)
    add_fused_arguments(parser)
    # AdaFactor with its defaults (relative steps), as the guide recommends it for full fine-tuning
    argv = ["--optimizer_type", name, "--learning_rate", "1e-6", "--max_grad_norm", "1.0"]
    return OptimizerOptions.from_args(parser.parse_args(argv))


def measure(optimizer_name: str, mode: str, width: int, resolution: int, warmup: int, steps: int, device: str) -> dict:
    """Train `warmup + steps` steps in this process and return the record."""
    import torch
    from diffusers import UNet2DConditionModel

    from library.training.fused_optimizers import build_fused_optimizers, default_blocks
    from library.training.optimizers import build_lr_scheduler, build_optimizer

    torch.set_num_threads(harness.cpu_count())
    options = optimizer_options(optimizer_name)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(width)).to(device).train()
    parameters = sum(param.numel() for param in unet.parameters())
    optimizer = build_optimizer(options, [{"params": list(unet.parameters()), "lr": options.learning_rate}])
    scheduler = build_lr_scheduler(options, optimizer, warmup + steps)
    fused = None
    if mode != "unfused":
        fused = build_fused_optimizers(options, optimizer, default_blocks(unet) if mode == "blockwise" else None)
    generator = torch.Generator(device).manual_seed(0)
    side = resolution // 8
    latents = torch.randn(1, 4, side, side, generator=generator, device=device)  # (B, C, h, w)
    text = torch.randn(1, 77, 768, generator=generator, device=device)  # (B, tokens, dim)
    timesteps = torch.tensor([500], device=device)
    rss_after_model = harness.current_rss_bytes()

    def step() -> None:
        prediction = unet(latents, timesteps, encoder_hidden_states=text).sample
        loss = torch.nn.functional.mse_loss(prediction, latents)
        loss.backward()
        if fused is not None:
            fused.finish_backward()
        else:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), options.max_grad_norm)
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, cpu_seconds = harness.time_calls(step, warmup, steps, synchronize=device == "cuda")
    settings = {
        "model": f"UNet2DConditionModel, SD 1.5 layout at width {width} (random weights)",
        "optimizer": optimizer_name,
        "mode": mode,
        "resolution": resolution,
        "batch_size": 1,
        "precision": "fp32",
        "warmup_steps": warmup,
    }
    return harness.make_record(
        f"fused_backward/{optimizer_name}/{mode}",
        "sd",
        settings,
        harness.device_name(device),
        seconds,
        harness.peak_rss_bytes(),
        harness.peak_gpu_bytes(),
        rss_after_model_bytes=rss_after_model,
        step_cpu_seconds=round(harness.median(cpu_seconds), 4),
        parameters=parameters,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_arguments(parser)
    parser.add_argument("--width", type=int, default=160, help="channels of the first UNet level (SD 1.5: 320)")
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (latents are 1/8)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per setting")
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--measure", nargs=2, metavar=("OPTIMIZER", "MODE"), help=argparse.SUPPRESS)  # in-process
    args = parser.parse_args()
    if args.measure:
        record = measure(*args.measure, args.width, args.resolution, args.warmup, args.steps, args.device)
        harness.emit(record)
        return
    for optimizer_name in args.optimizers:
        for mode in args.modes:
            command = [
                sys.executable,
                os.path.abspath(__file__),
                "--measure",
                optimizer_name,
                mode,
                "--width",
                str(args.width),
                "--resolution",
                str(args.resolution),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--device",
                args.device,
            ]
            result = subprocess.run(command, cwd=harness.REPO_ROOT, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                print(
                    f"{optimizer_name}/{mode} failed (exit {result.returncode}):\n{result.stderr[-3000:]}",
                    file=sys.stderr,
                )
                continue
            harness.emit(harness.last_json_line(result.stdout), args.results)


if __name__ == "__main__":
    main()
