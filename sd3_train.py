"""Fine-tune the SD3 / SD3.5 MMDiT (and optionally CLIP-L, CLIP-G, T5-XXL) in full; saved in the SAI single-file
layout (or as a diffusers folder).

Usage: accelerate launch sd3_train.py --pretrained_model_name_or_path sd3_medium_incl_clips_t5xxlfp16.safetensors \
    --dataset_config data.toml --output_dir out --output_name my_sd3 --learning_rate 4e-6 --blocks_to_swap 10
"""

from library.training.entry import run_training

if __name__ == "__main__":
    run_training("sd3", "finetune", description=__doc__)
