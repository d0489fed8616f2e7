"""Show what a LoRA file holds and, given a base model, check that every module loads onto it.

Usage: python networks/check_lora_weights.py my_lora.safetensors [-s] \
    [--family sdxl --pretrained_model_name_or_path sd_xl_base_1.0.safetensors]
"""

import os
import sys

if __package__ in (None, ""):  # run as `python networks/<tool>.py`: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.lora_tools.check import main
from library.lora_tools.cli import run_tool

if __name__ == "__main__":
    run_tool(main)
