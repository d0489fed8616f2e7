"""Extended textual inversion (XTI, P+) for Stable Diffusion 1.x / 2.x: learn a new word's vectors for every UNet
cross-attention layer, all models frozen.

Usage: accelerate launch train_textual_inversion_XTI.py --pretrained_model_name_or_path model.safetensors \
    --dataset_config data.toml --output_dir out --output_name my_word --token_string mychar4 --init_word girl \
    --num_vectors_per_token 4 --learning_rate 5e-4
"""

from library.training.entry import run_training

if __name__ == "__main__":
    run_training("sd", "textual_inversion_xti", description=__doc__)
