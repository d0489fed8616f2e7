"""Peak memory and step time of full fine-tuning steps with --ema beside the weights, --ema in CPU memory, and none.

Usage: python benchmarks/ema_memory.py [--width 160] [--resolution 256] [--steps 3] [--warmup 1]
    [--modes none same cpu] [--device cpu|cuda] [--results file.jsonl]

The model is the UNet of benchmarks/fused_backward.py (SD 1.5 layout at a reduced width, random fp32 weights). A
step is: forward, MSE loss, backward, AdamW step, then the EMA update of library/training/ema.py (`same`: on the
weights' device, `cpu`: in CPU memory); after the steps the EMA weights are swapped in and out once, as an
evaluation (sample, validation, save) does. Each mode runs in a fresh process and prints one JSON line named
`ema_memory/<mode>` with `ema_bytes` (the average's size), `ema_device_bytes` (the part of it on the compute device)
and, on CUDA, `peak_gpu_bytes`: with `cpu` it should equal `none`'s, with `same` exceed it by about `ema_bytes`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness
from benchmarks.fused_backward import optimizer_options, unet_config

MODES = ("none", "same", "cpu")


def measure(mode: str, width: int, resolution: int, warmup: int, steps: int, device: str) -> dict:
    """Train `warmup + steps` steps in this process with the EMA of `mode`; returns the record."""
    import torch
    from diffusers import UNet2DConditionModel

    from library.training.ema import EMAOptions, ExponentialMovingAverage
    from library.training.optimizers import build_optimizer

    torch.set_num_threads(harness.cpu_count())
    options = optimizer_options("AdamW")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(width)).to(device).train()
    params = list(unet.parameters())
    optimizer = build_optimizer(options, [{"params": params, "lr": options.learning_rate}])
    ema = None
    if mode != "none":
        ema = ExponentialMovingAverage(params, EMAOptions(enabled=True, decay=0.999, device=mode))
    generator = torch.Generator(device).manual_seed(0)
    side = resolution // 8
    latents = torch.randn(1, 4, side, side, generator=generator, device=device)  # (B, C, h, w)
    text = torch.randn(1, 77, 768, generator=generator, device=device)  # (B, tokens, dim)
    timesteps = torch.tensor([500], device=device)
    step_count = [0]

    def step() -> None:
        prediction = unet(latents, timesteps, encoder_hidden_states=text).sample
        torch.nn.functional.mse_loss(prediction, latents).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_count[0] += 1
        if ema is not None:
            ema.update(step_count[0])

    times = harness.time_calls(step, warmup, steps, synchronize=device == "cuda")
    if ema is not None:
        with ema.in_place():  # an evaluation: the swap must not need a second copy on the device
            pass
    ema_bytes = ema.size_bytes if ema is not None else 0
    on_device = sum(s.numel() * s.element_size() for s in ema.shadows if s.device.type == device) if ema else 0
    settings = {
        "model": f"UNet2DConditionModel, SD 1.5 layout at width {width} (random weights)",
        "ema": mode,
        "optimizer": "AdamW",
        "resolution": resolution,
        "batch_size": 1,
        "precision": "fp32",
        "warmup_steps": warmup,
    }
    return harness.make_record(
        f"ema_memory/{mode}",
        "sd",
        settings,
        harness.device_name(device),
        times.wall,
        harness.peak_rss_bytes(),
        harness.peak_gpu_bytes(),
        step_cpu_seconds=round(harness.median(times.cpu), 4),
        parameters=sum(param.numel() for param in params),
        ema_bytes=ema_bytes,
        ema_device_bytes=on_device,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_arguments(parser)
    parser.add_argument("--width", type=int, default=160, help="channels of the first UNet level (SD 1.5: 320)")
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (latents are 1/8)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per mode")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--measure", metavar="MODE", help=argparse.SUPPRESS)  # in-process
    args = parser.parse_args()
    if args.measure:
        harness.emit(measure(args.measure, args.width, args.resolution, args.warmup, args.steps, args.device))
        return
    for mode in args.modes:
        command = [sys.executable, os.path.abspath(__file__), "--measure", mode, "--width", str(args.width),
                   "--resolution", str(args.resolution), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--device", args.device]  # fmt: skip
        result = subprocess.run(command, cwd=harness.REPO_ROOT, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            print(f"{mode} failed (exit {result.returncode}):\n{result.stderr[-3000:]}", file=sys.stderr)
            continue
        harness.emit(harness.last_json_line(result.stdout), args.results)


if __name__ == "__main__":
    main()
