"""Train a LoRA (or another adapter network) for Stable Diffusion XL.

Usage: accelerate launch sdxl_train_network.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \
    --dataset_config data.toml --output_dir out --output_name my_lora --network_dim 32 --network_alpha 16
"""

from library.training.entry import run_training

if __name__ == "__main__":
    run_training("sdxl", "network", description=__doc__)
