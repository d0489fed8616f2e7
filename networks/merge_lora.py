"""Merge LoRAs (LoRA, DoRA, LoHa, LoKr) into a base model of any family, or several LoRAs into one.

The family comes from --family, else from the LoRA's metadata, else SD 1.x / 2.x (the reference script's).

Usage: python networks/merge_lora.py --sd_model base.safetensors --models a.safetensors --ratios 0.8 \
    --save_to merged.safetensors
"""

import os
import sys

if __package__ in (None, ""):  # run as `python networks/<tool>.py`: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.lora_tools.cli import run_tool
from library.lora_tools.merge import main

if __name__ == "__main__":
    run_tool(main)
