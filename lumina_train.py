"""Fine-tune the Lumina Image 2.0 transformer in full; saved in the released single-file layout (or as a diffusers
folder).

Usage: accelerate launch lumina_train.py --pretrained_model_name_or_path lumina_2_model_bf16.safetensors \
    --gemma2 gemma_2_2b_fp16.safetensors --ae ae.safetensors --dataset_config data.toml --output_dir out \
    --output_name my_lumina --learning_rate 1e-5 --mixed_precision bf16 --use_flash_attn
"""

from library.training.entry import run_training

if __name__ == "__main__":
    run_training("lumina", "finetune", description=__doc__)
