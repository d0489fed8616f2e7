"""Convert a LoRA between the kohya, diffusers / PEFT (ai-toolkit) and ComfyUI key formats, for any family.

Usage: python networks/convert_lora.py --family sdxl --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \
    --src_path diffusers_lora.safetensors --dst kohya --dst_path kohya_lora.safetensors
"""

import os
import sys

if __package__ in (None, ""):  # run as `python networks/<tool>.py`: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.lora_tools.cli import run_tool
from library.lora_tools.convert import main

if __name__ == "__main__":
    run_tool(main)
