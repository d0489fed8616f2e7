"""Train a LoRA (or another adapter network) for FLUX.1 dev / schnell.

Usage: accelerate launch flux_train_network.py --pretrained_model_name_or_path flux1-dev.safetensors \
    --ae ae.safetensors --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors \
    --dataset_config data.toml --output_dir out --output_name my_lora --network_dim 16 --mixed_precision bf16
"""

from library.training.entry import run_training

if __name__ == "__main__":
    run_training("flux", "network", description=__doc__)
