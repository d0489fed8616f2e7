"""GPU suite: seconds per LoRA step and peak memory of SD 1.5, SDXL and FLUX.1 denoisers with the memory engine's
settings (base weights in bf16, fp8, int8 or nf4; blocks_to_swap; torch.compile), at 512 and 1024 px.

Usage:
    python benchmarks/gpu_suite.py                                   # the whole grid on cuda, dated results
    python benchmarks/gpu_suite.py --models flux --resolutions 1024 --bases fp8 --swaps 16
    python benchmarks/gpu_suite.py --config tiny --device cpu --models sd15 flux --bases fp8 --swaps 0 1 \
        --resolutions 64                                             # checks the script itself in seconds

Each setting runs in a fresh process (so that one's memory never counts towards another's) that builds the
full-size denoiser with random weights (no download: the released architectures from our configs), stores the
frozen base the way the trainer does (`library/training/fp8.py`, `library/training/quantized_base.py`), places it
as the trainer does (block runners of `library/training/block_swap.py` when blocks swap, gradient checkpointing on
in every setting), attaches a rank-16 `networks.lora` LoRA (fp32, trained under bf16 autocast) and compiles the
denoiser's large blocks with `--compile` (`library/training/compile.py`). A step is: forward on random latents and
random text states of the model's real shapes (what `--cache_text_encoder_outputs` and cached latents feed it),
MSE loss, backward, AdamW step. Text encoders and VAE are not part of it.

Every setting prints one JSON line (`benchmarks/harness.py`) named `gpu/<model>/<resolution>/<base>/swap<N>[/compile]`
with `seconds` (median step), `peak_gpu_bytes` (torch's peak allocation over the whole process, building included)
and `peak_gpu_step_bytes` (the peak over the steps alone). On CUDA the lines are appended to
`benchmarks/results/<date>-gpu.jsonl` (or `--results`) and the table `<date>-gpu.md` beside it is rewritten from
that file.
Settings the trainer refuses (a quantized base with swapped blocks, compile with swapped blocks, swapping in the UNet
families) are left out of the grid.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness

MODELS = ("sd15", "sdxl", "flux")
BASES = ("bf16", "fp8", "int8", "nf4")
TRANSFORMERS = ("flux",)  # block lists to swap
FAMILY = {"sd15": "sd", "sdxl": "sdxl", "flux": "flux"}
LORA_RANK = 16
FLUX_TEXT_TOKENS = 512  # --t5xxl_max_token_length of FLUX.1 [dev]
CLIP_TOKENS = 77


@dataclass(frozen=True)
class Setting:
    model: str
    resolution: int
    base: str
    swap: int = 0
    compile: bool = False

    @property
    def name(self) -> str:
        return f"gpu/{self.model}/{self.resolution}/{self.base}/swap{self.swap}" + ("/compile" if self.compile else "")


def grid(models, resolutions, bases, swaps, compile_values) -> list[Setting]:
    """Every combination the trainer accepts: swapping only in the transformer families and only with a bf16 or fp8
    base (quantized weights do not swap), compile only without swapping."""
    settings = []
    for model, resolution, base, swap, compiled in itertools.product(models, resolutions, bases, swaps,
                                                                     compile_values):  # fmt: skip
        if swap and (model not in TRANSFORMERS or base in ("int8", "nf4") or compiled):
            continue
        settings.append(Setting(model, resolution, base, swap, compiled))
    return settings


# ---- one setting, in its own process ---------------------------------------------------------------------------


def denoiser_config(model: str, size: str) -> dict:
    from library.checkpoints import flux_configs
    from library.testing import tiny_configs

    configs = {
        ("sd15", "full"): tiny_configs.sd15_unet_config,
        ("sd15", "tiny"): lambda: tiny_configs.tiny_unet_config(False),
        ("sdxl", "full"): tiny_configs.sdxl_unet_config,
        ("sdxl", "tiny"): tiny_configs.tiny_sdxl_unet_config,
        ("flux", "full"): lambda: flux_configs.transformer_config("dev"),
        ("flux", "tiny"): tiny_configs.tiny_flux_transformer_config,
    }
    return configs[(model, size)]()


def build_denoiser(model: str, config: dict, fill_device: str, dtype):
    """The denoiser with random weights (normal, std 0.02) in `dtype` on the CPU, built without a float32 copy; the
    random numbers are drawn on `fill_device` (fast on a GPU) and copied."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    model_class = FluxTransformer2DModel if model == "flux" else UNet2DConditionModel
    with init_empty_weights():
        denoiser = model_class(**config).to(dtype)  # on the meta device: nothing allocated
    denoiser.to_empty(device="cpu")
    generator = torch.Generator(fill_device).manual_seed(0)
    with torch.no_grad():
        for tensor in itertools.chain(denoiser.parameters(), denoiser.buffers()):
            values = torch.randn(tensor.shape, generator=generator, device=fill_device, dtype=dtype)
            tensor.copy_(values.mul_(0.02))
    return denoiser.requires_grad_(False).eval()


def step_inputs(model: str, config: dict, resolution: int, device: str) -> tuple[dict, object]:
    """The denoiser's keyword arguments for one batch-1 step at `resolution`, and the regression target."""
    import torch

    from library.families.flux import image_position_ids

    generator = torch.Generator(device).manual_seed(0)

    def noise(*shape):
        return torch.randn(*shape, generator=generator, device=device)

    if model == "flux":
        side = resolution // 16  # 8x AE downscaling, then 2x2 packing
        tokens = noise(1, side * side, config["in_channels"])
        text_tokens = FLUX_TEXT_TOKENS if config["num_layers"] > 4 else 16
        inputs = dict(hidden_states=tokens, encoder_hidden_states=noise(1, text_tokens, config["joint_attention_dim"]),
                      pooled_projections=noise(1, config["pooled_projection_dim"]),
                      timestep=torch.tensor([0.5], device=device), img_ids=image_position_ids(side, side, device),
                      txt_ids=torch.zeros(text_tokens, 3, device=device))  # fmt: skip
        if config.get("guidance_embeds"):
            inputs["guidance"] = torch.tensor([3.5], device=device)
        return inputs, noise(*tokens.shape)
    side = resolution // 8
    latents = noise(1, config["in_channels"], side, side)
    inputs = dict(sample=latents, timestep=torch.tensor([500], device=device),
                  encoder_hidden_states=noise(1, CLIP_TOKENS, config["cross_attention_dim"]))  # fmt: skip
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        size_ids = [resolution, resolution, 0, 0, resolution, resolution]  # original size, crop, target size
        time_ids = torch.tensor([size_ids], device=device, dtype=torch.float32)
        inputs["added_cond_kwargs"] = {"text_embeds": noise(1, pooled), "time_ids": time_ids}
    return inputs, noise(*latents.shape)


def measure(setting: Setting, size: str, device: str, warmup: int, steps: int) -> dict:
    import torch

    from library.families import get_family_class
    from library.training import fp8
    from library.training.block_swap import OffloadOptions, place_blocks
    from library.training.compile import CompileOptions, compile_blocks
    from library.training.fused_optimizers import default_blocks
    from library.training.quantized_base import quantize_module
    from networks import lora

    cuda = device.startswith("cuda")
    config = denoiser_config(setting.model, size)
    # bf16 compute on CUDA; the CPU check of the script computes in float32 (CPU autocast leaves norms in bf16
    # against float32 outputs of quantized layers, and bf16 is slow there)
    compute = torch.bfloat16 if cuda else torch.float32
    denoiser = build_denoiser(setting.model, config, device if cuda else "cpu", compute)
    if setting.base == "fp8" and setting.model in TRANSFORMERS:
        fp8.store_in_fp8(denoiser, compute, fp8.DENOISER_SKIP)
    elif setting.base == "fp8":  # the UNet families cast per layer (library/families/sd.py)
        fp8.store_in_fp8_per_layer(denoiser, compute, fp8.DENOISER_SKIP)
    elif setting.base in ("int8", "nf4"):
        quantize_module(denoiser, setting.base, compute, fp8.DENOISER_SKIP)
    runners = []
    if setting.swap:
        family = get_family_class(FAMILY[setting.model])
        lists = [getattr(denoiser, name) for name in family.block_list_names]
        options = OffloadOptions(blocks_to_swap=setting.swap, gradient_checkpointing=True)
        runners = place_blocks(denoiser, [], lists, family.swap_counts(setting.swap), device, options)
    else:
        denoiser.to(device)
        denoiser.enable_gradient_checkpointing()
    network = lora.create_network(1.0, LORA_RANK, LORA_RANK, None, [], denoiser)
    network.apply_to([], denoiser, False, True)
    network.to(device)
    compile_blocks(CompileOptions(setting.compile), default_blocks(denoiser), denoiser)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    inputs, target = step_inputs(setting.model, config, setting.resolution, device)

    def step() -> None:
        with torch.autocast(torch.device(device).type, dtype=compute):
            output = denoiser(**inputs).sample
        torch.nn.functional.mse_loss(output.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if cuda:
        build_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = harness.time_calls(step, warmup, steps, synchronize=cuda)
    settings = {**asdict(setting), "config": size, "lora_rank": LORA_RANK, "batch_size": 1, "compute": str(compute),
                "gradient_checkpointing": True, "warmup_steps": warmup}  # fmt: skip
    return harness.make_record(setting.name, FAMILY[setting.model], settings,
                               harness.device_name(device), times.wall, harness.peak_rss_bytes(),
                               max(build_peak, torch.cuda.max_memory_allocated()) if cuda else None,
                               peak_gpu_step_bytes=torch.cuda.max_memory_allocated() if cuda else None,
                               swapped=[runner.swap for runner in runners])  # fmt: skip


# ---- the grid, one process per setting -------------------------------------------------------------------------


def default_results(device: str) -> str | None:
    """The dated results file on CUDA; elsewhere (the script's own check) none unless asked."""
    if not device.startswith("cuda"):
        return None
    return os.path.join(harness.REPO_ROOT, "benchmarks", "results", f"{datetime.date.today().isoformat()}-gpu.jsonl")


def write_table(jsonl: str, markdown: str) -> None:
    """The dated results as one table (a later line of the same setting replaces an earlier one)."""
    with open(jsonl, encoding="utf-8") as handle:
        records = {record["name"]: record for record in map(json.loads, filter(str.strip, handle))}
    gib = 1024**3
    lines = [f"# GPU suite: {os.path.basename(jsonl)}", "",
             "LoRA rank 16 on the denoiser, batch 1, bf16 compute, gradient checkpointing, cached latents and text "
             "(benchmarks/gpu_suite.py).", "",
             "| model | px | base | blocks_to_swap | compile | s/step | peak GPU GiB (steps) | peak GPU GiB (all) | "
             "peak RSS GiB | device |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for record in records.values():
        s = record["settings"]
        gpu = [f"{value / gib:.2f}" if value is not None else "-"
               for value in (record["peak_gpu_step_bytes"], record["peak_gpu_bytes"])]  # fmt: skip
        compiled = "on" if s["compile"] else "off"
        lines.append(f"| {s['model']} | {s['resolution']} | {s['base']} | {s['swap']} | {compiled} "
                     f"| {record['seconds']:.3f} | {gpu[0]} | {gpu[1]} | {record['peak_rss_bytes'] / gib:.1f} | "
                     f"{record['device']} |")  # fmt: skip
    lines.append("")
    from library.atomic import atomic_write_text

    atomic_write_text(markdown, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--bases", nargs="+", choices=BASES, default=list(BASES))
    parser.add_argument("--swaps", type=int, nargs="+", default=[0, 8, 16], help="blocks_to_swap values (FLUX)")
    parser.add_argument("--compile", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument("--config", choices=("full", "tiny"), default="full", help="tiny: the test models")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (compilation happens here)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--results", default=None, help="append the lines here and write the table beside it "
                        "(default on cuda: benchmarks/results/<date>-gpu.jsonl)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one setting may take")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # one setting as JSON, measured in this process
    args = parser.parse_args()
    if args.measure:
        harness.emit(measure(Setting(**json.loads(args.measure)), args.config, args.device, args.warmup, args.steps))
        return
    jsonl = args.results or default_results(args.device)
    failed = 0
    for setting in grid(args.models, args.resolutions, args.bases, args.swaps, [v == "on" for v in args.compile]):
        command = [sys.executable, os.path.abspath(__file__), "--measure", json.dumps(asdict(setting)),
                   "--config", args.config, "--device", args.device, "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]  # fmt: skip
        try:
            result = subprocess.run(command, cwd=harness.REPO_ROOT, capture_output=True, text=True, check=False,
                                    timeout=args.timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            print(f"{setting.name}: no result within {args.timeout:.0f} s", file=sys.stderr, flush=True)
            failed += 1
            continue
        if result.returncode != 0:
            print(f"{setting.name} failed (exit {result.returncode}):\n{result.stderr[-3000:]}", file=sys.stderr,
                  flush=True)  # fmt: skip
            failed += 1
            continue
        harness.emit(harness.last_json_line(result.stdout), jsonl)
    if jsonl and os.path.isfile(jsonl):
        write_table(jsonl, os.path.splitext(jsonl)[0] + ".md")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
