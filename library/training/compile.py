"""--compile: torch.compile for the denoiser, one block at a time.

Each large block of the family's block list is compiled in place (`nn.Module.compile`: the module, its parameters
and its state-dict keys stay as they are, so saving, LoRA hooks, DDP and FSDP see the same model). Compiling blocks
instead of the whole model keeps compile time short (repeated blocks share code) and lets graph breaks (a LoRA's
module dropout, a Python-side check) cost only a block's graph. Bucketed datasets hand the blocks several image
sizes: after the first change of shape a block's graph is recompiled with dynamic sizes, and after
`RECOMPILE_LIMIT` different graphs a block runs eagerly for shapes it has not seen.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from dataclasses import dataclass

import torch

from library.errors import ConfigError

logger = logging.getLogger(__name__)

BACKENDS = ("inductor", "aot_eager", "eager")
RECOMPILE_LIMIT = 16
BLOCK_SHARE = 0.02  # blocks with at least this share of the denoiser's parameters are compiled


def add_compile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile",
        "--torch_compile",
        dest="compile",
        action="store_true",
        help="compile the denoiser's blocks with torch.compile: faster steps after a first slow one per image size",
    )
    parser.add_argument(
        "--compile_backend",
        choices=BACKENDS,
        default="inductor",
        help="torch.compile backend: inductor (generated kernels; needs a C++ compiler on the CPU), aot_eager "
        "(traced forward and backward, no code generation), eager (tracing only, for debugging)",
    )


@dataclass(frozen=True)
class CompileOptions:
    enabled: bool = False
    backend: str = "inductor"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CompileOptions:
        return cls(bool(getattr(args, "compile", False)), getattr(args, "compile_backend", "inductor"))

    def check(self, block_swap: bool) -> None:
        """One line for what cannot be compiled here (before any model loads)."""
        if not self.enabled:
            return
        if block_swap:
            raise ConfigError("--compile cannot be combined with --blocks_to_swap (swapped blocks change device)")
        if self.backend == "inductor" and not torch.cuda.is_available() and not _cpp_compiler():
            raise ConfigError(
                "--compile with the inductor backend generates C++ code on the CPU and finds no C++ compiler: install "
                "one (e.g. apt install g++) or use --compile_backend aot_eager"
            )


def _cpp_compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")


def compile_blocks(options: CompileOptions, blocks: list[tuple[str, torch.nn.Module]], denoiser) -> int:
    """Compile the large blocks of the denoiser in place; returns how many."""
    if not options.enabled:
        return 0
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    total = sum(param.numel() for param in denoiser.parameters())
    compiled = 0
    for _, block in blocks:
        if sum(param.numel() for param in block.parameters()) >= BLOCK_SHARE * total:
            block.compile(backend=options.backend, dynamic=None)
            compiled += 1
    logger.info("--compile: %d denoiser blocks compiled with %s (the first step of each image size compiles)",
                compiled, options.backend)  # fmt: skip
    return compiled
