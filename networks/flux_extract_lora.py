"""extract_lora_from_models.py for FLUX.1, under the reference's name (the family defaults to flux).

Usage: python networks/flux_extract_lora.py --model_org flux1-dev.safetensors --model_tuned tuned.safetensors \
    --ae ae.safetensors --clip_l clip_l.safetensors --t5xxl t5xxl.safetensors --dim 16 --save_to extracted.safetensors
"""

import os
import sys

if __package__ in (None, ""):  # run as `python networks/<tool>.py`: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.lora_tools.cli import run_tool
from library.lora_tools.extract import main

if __name__ == "__main__":
    run_tool(lambda argv: main(argv, default_family="flux"))
