"""Peak GPU memory and step time of FLUX.1 LoRA steps with --blocks_to_swap N (fp8 base weights, bf16 compute).

Usage: python benchmarks/flux_block_swap.py --device cuda [--swaps 0 8 16] [--resolution 512] [--steps 3]
    [--warmup 1] [--config dev|tiny] [--results file.jsonl]

The model is the full-size FLUX.1 [dev] transformer (19 double, 38 single blocks) with random bf16 weights stored in
float8 e4m3fn (library/training/fp8.py), a rank-16 networks.lora_flux LoRA on every block, gradient
checkpointing, and the blocks run by library/training/block_swap.py exactly as `flux_train_network.py
--fp8_base --gradient_checkpointing --blocks_to_swap N` runs them. A step is: forward on random packed latents
(batch 1; 512 px -> 1024 image tokens) with random T5 states (512 tokens) and pooled CLIP output, MSE loss,
backward, AdamW step of the LoRA. Each N runs in a fresh process and prints one JSON line (benchmarks/harness.py)
named `flux_block_swap/<N>` with `peak_gpu_bytes` (torch's peak allocation). `--config tiny --device cpu` checks
the script itself in seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness


def build_transformer(config_name: str):
    """The transformer with random weights (normal, std 0.02) in bf16, built without a float32 copy."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from library.checkpoints import flux_configs
    from library.testing import tiny_configs

    if config_name == "dev":
        config = flux_configs.transformer_config("dev")
    else:
        config = tiny_configs.tiny_flux_transformer_config()
    with init_empty_weights():
        transformer = FluxTransformer2DModel(**config).to(torch.bfloat16)  # on the meta device: nothing allocated
    transformer.to_empty(device="cpu")  # 24 GB of bf16 for the full-size model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in transformer.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    return transformer.requires_grad_(False).eval(), config


def measure(swap: int, config_name: str, resolution: int, warmup: int, steps: int, device: str) -> dict:
    import torch

    from library.families.flux import FluxFamily, image_position_ids
    from library.training import fp8
    from library.training.block_swap import OffloadOptions, make_runners
    from networks import lora_flux

    transformer, config = build_transformer(config_name)
    fp8.store_in_fp8(transformer, torch.bfloat16, fp8.DENOISER_SKIP)
    network = lora_flux.create_network(1.0, 16, 16, None, [], transformer)
    network.apply_to([], transformer, False, True)
    network.to(device)
    options = OffloadOptions(blocks_to_swap=swap or None, gradient_checkpointing=True)
    for name, child in transformer.named_children():
        if name not in FluxFamily.block_list_names:
            child.to(device)
    lists = [getattr(transformer, name) for name in FluxFamily.block_list_names]
    runners = make_runners(lists, FluxFamily.swap_counts(swap), device, options)
    for runner in runners:
        runner.prepare()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    side = resolution // 16  # 8x AE downscaling, then 2x2 packing
    generator = torch.Generator(device).manual_seed(0)
    tokens = torch.randn(1, side * side, config["in_channels"], generator=generator, device=device,
                         dtype=torch.bfloat16)  # fmt: skip
    text = torch.randn(1, 512, config["joint_attention_dim"], generator=generator, device=device, dtype=torch.bfloat16)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=generator, device=device, dtype=torch.bfloat16)
    ids = image_position_ids(side, side, device)

    def step() -> None:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            output = transformer(hidden_states=tokens, encoder_hidden_states=text, pooled_projections=pooled,
                                 timestep=torch.tensor([0.5], device=device), img_ids=ids,
                                 txt_ids=torch.zeros(512, 3, device=device),
                                 guidance=torch.tensor([3.5], device=device)).sample  # fmt: skip
        torch.nn.functional.mse_loss(output.float(), tokens.float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = harness.time_calls(step, warmup, steps, synchronize=device.startswith("cuda"))
    settings = {"model": f"FluxTransformer2DModel {config_name} (random weights, fp8 storage, bf16 compute)",
                "blocks_to_swap": swap, "resolution": resolution, "lora_rank": 16, "gradient_checkpointing": True,
                "batch_size": 1, "t5_tokens": 512, "warmup_steps": warmup}  # fmt: skip
    return harness.make_record(f"flux_block_swap/{swap}", "flux", settings, harness.device_name(device), seconds,
                               harness.peak_rss_bytes(), harness.peak_gpu_bytes(),
                               swapped=[runner.swap for runner in runners])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_arguments(parser)
    parser.add_argument("--swaps", type=int, nargs="+", default=[0, 8, 16], help="--blocks_to_swap values")
    parser.add_argument("--config", choices=("dev", "tiny"), default="dev")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per setting")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu with --config tiny")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # one setting, in this process
    args = parser.parse_args()
    if args.measure is not None:
        harness.emit(measure(args.measure, args.config, args.resolution, args.warmup, args.steps, args.device))
        return
    for swap in args.swaps:
        command = [sys.executable, os.path.abspath(__file__), "--measure", str(swap), "--config", args.config,
                   "--resolution", str(args.resolution), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--device", args.device]  # fmt: skip
        result = subprocess.run(command, cwd=harness.REPO_ROOT, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            print(f"blocks_to_swap {swap} failed (exit {result.returncode}):\n{result.stderr[-3000:]}", file=sys.stderr)
            continue
        harness.emit(harness.last_json_line(result.stdout), args.results)


if __name__ == "__main__":
    main()
