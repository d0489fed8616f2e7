"""Resize a LoRA (LoRA, DoRA, LoHa or LoKr modules) to a new rank, fixed or chosen per module.

Usage: python networks/resize_lora.py --model my_lora.safetensors --save_to small.safetensors --new_rank 8
"""

import os
import sys

if __package__ in (None, ""):  # run as `python networks/<tool>.py`: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.lora_tools.cli import run_tool
from library.lora_tools.resize import main

if __name__ == "__main__":
    run_tool(main)
