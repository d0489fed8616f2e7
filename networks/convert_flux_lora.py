"""convert_lora.py for FLUX.1, under the reference's name (the family defaults to flux; --src ai-toolkit
and --dst sd-scripts are the diffusers and kohya formats).

Usage: python networks/convert_flux_lora.py --pretrained_model_name_or_path flux1-dev.safetensors --ae ae.safetensors \
    --clip_l clip_l.safetensors --t5xxl t5xxl.safetensors --src ai-toolkit --dst sd-scripts \
    --src_path ai_toolkit_lora.safetensors --dst_path kohya_lora.safetensors
"""

import os
import sys

if __package__ in (None, ""):  # run as `python networks/<tool>.py`: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.lora_tools.cli import run_tool
from library.lora_tools.convert import main

if __name__ == "__main__":
    run_tool(lambda argv: main(argv, default_family="flux"))
