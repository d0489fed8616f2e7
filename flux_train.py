"""Fine-tune the FLUX.1 transformer in full; saved in the BFL single-file layout (or as a diffusers folder).

Usage: accelerate launch flux_train.py --pretrained_model_name_or_path flux1-dev.safetensors \
    --ae ae.safetensors --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors \
    --dataset_config data.toml --output_dir out --output_name my_flux --learning_rate 1e-5 --blocks_to_swap 18
"""

from library.training.entry import run_training

if __name__ == "__main__":
    run_training("flux", "finetune", description=__doc__)
