"""DreamBooth for Stable Diffusion 1.x / 2.x: train the UNet and the text encoder in full, save the whole model.

Usage: accelerate launch train_db.py --pretrained_model_name_or_path model.safetensors \
    --dataset_config data.toml --output_dir out --output_name my_model --prior_loss_weight 1.0 --learning_rate 1e-6
"""

from library.training.entry import run_training

if __name__ == "__main__":
    run_training("sd", "dreambooth", description=__doc__)
