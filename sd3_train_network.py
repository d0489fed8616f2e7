"""Train a LoRA (or another adapter network) for Stable Diffusion 3 / 3.5.

Usage: accelerate launch sd3_train_network.py --pretrained_model_name_or_path sd3.5_medium.safetensors \
    --clip_l clip_l.safetensors --clip_g clip_g.safetensors --t5xxl t5xxl_fp16.safetensors \
    --dataset_config data.toml --output_dir out --output_name my_lora --network_dim 16 --mixed_precision bf16
"""

from library.training.entry import run_training

if __name__ == "__main__":
    run_training("sd3", "network", description=__doc__)
