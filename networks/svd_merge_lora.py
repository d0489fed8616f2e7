"""Merge LoRAs into one LoRA of a new rank: their weighted sum of changes, re-factorised by SVD.

Usage: python networks/svd_merge_lora.py --models a.safetensors b.safetensors --ratios 1 0.5 --new_rank 16 \
    --save_to merged.safetensors
"""

import os
import sys

if __package__ in (None, ""):  # run as `python networks/<tool>.py`: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.lora_tools.cli import run_tool
from library.lora_tools.merge import svd_main

if __name__ == "__main__":
    run_tool(svd_main)
