"""Train a LoRA (or another adapter network) for Lumina Image 2.0.

Usage: accelerate launch lumina_train_network.py --pretrained_model_name_or_path lumina_2_model_bf16.safetensors \
    --gemma2 gemma_2_2b_fp16.safetensors --ae ae.safetensors --dataset_config data.toml --output_dir out \
    --output_name my_lora --network_dim 16 --mixed_precision bf16 --timestep_sampling nextdit_shift \
    --system_prompt "You are an assistant designed to generate high-quality images based on user prompts."
"""

from library.training.entry import run_training

if __name__ == "__main__":
    run_training("lumina", "network", description=__doc__)
