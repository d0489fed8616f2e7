"""merge_lora.py for SDXL, under the reference's name (the family defaults to sdxl).

Usage: python networks/sdxl_merge_lora.py --sd_model sd_xl_base_1.0.safetensors --models a.safetensors \
    --ratios 1 --save_to merged.safetensors
"""

import os
import sys

if __package__ in (None, ""):  # run as `python networks/<tool>.py`: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.lora_tools.cli import run_tool
from library.lora_tools.merge import main

if __name__ == "__main__":
    run_tool(lambda argv: main(argv, default_family="sdxl"))
