"""Extract a LoRA from the weight difference of a tuned model and its original, for any family.

The family is --family (SD 1.x / 2.x by default, --sdxl or --family sdxl for SDXL, --family flux ...).

Usage: python networks/extract_lora_from_models.py --model_org base.safetensors --model_tuned tuned.safetensors \
    --dim 16 --save_to extracted.safetensors
"""

import os
import sys

if __package__ in (None, ""):  # run as `python networks/<tool>.py`: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.lora_tools.cli import run_tool
from library.lora_tools.extract import main

if __name__ == "__main__":
    run_tool(main)
