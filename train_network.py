"""Train a LoRA (or another adapter network) for Stable Diffusion 1.x / 2.x.

Usage: accelerate launch train_network.py --pretrained_model_name_or_path model.safetensors \
    --dataset_config data.toml --output_dir out --output_name my_lora --network_dim 16
"""

from library.training.entry import run_training

if __name__ == "__main__":
    run_training("sd", "network", description=__doc__)
