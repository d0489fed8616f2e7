"""Fine-tune Stable Diffusion 1.x / 2.x: train the UNet (and with --train_text_encoder the text encoder) in full.

Usage: accelerate launch fine_tune.py --pretrained_model_name_or_path model.safetensors \
    --dataset_config data.toml --output_dir out --output_name my_model --learning_rate 5e-6
"""

from library.training.entry import run_training

if __name__ == "__main__":
    run_training("sd", "finetune", description=__doc__)
