"""Fine-tune Stable Diffusion XL in full: the UNet, and both text encoders with --train_text_encoder.

Usage: accelerate launch sdxl_train.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \
    --dataset_config data.toml --output_dir out --output_name my_sdxl --learning_rate 1e-5 --train_text_encoder
"""

from library.training.entry import run_training

if __name__ == "__main__":
    run_training("sdxl", "finetune", description=__doc__)
